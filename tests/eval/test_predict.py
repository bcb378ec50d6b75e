"""`deltavlm predict` through the real entry point (`deltavlm_cli.main`) on a tiny random model saved to tmp,
and the imagery reader (16-bit, multi-band, band selection, stretch, tiling) on small generated files.

The tiny model's answers are noise: what is tested is the plumbing (prompts, pair_embeds, output formats,
batch resume, error lines)."""

import json
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import deltavlm_cli
from processing.conversation import TASK_PROMPTS

import eval.predict
from eval.imagery import (
    ImageryError,
    ImageryWarning,
    parse_bands,
    read_image,
    read_pair,
    stretch_to_uint8,
    tile_boxes,
)

tifffile = pytest.importorskip("tifffile")

# Greedy and short: the tiny model's text is noise anyway.
FAST = ["--num-beams", "1", "--max-new-tokens", "4"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def noise_image(path, size=(48, 40), seed=0, mode="RGB"):
    """A small random image file (width, height)."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def pair(tmp_path):
    return noise_image(tmp_path / "before.png", seed=1), noise_image(tmp_path / "after.png", seed=2)


def predict(capsys, *args):
    """(exit status, stdout, stderr) of `deltavlm predict ARGS`."""
    status = deltavlm_cli.main(["predict", *map(str, args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# one pair

@pytest.mark.parametrize(
    "task, prompt, name",
    [
        ("caption", TASK_PROMPTS["caption"], "caption"),
        ("binary", TASK_PROMPTS["binary"], "binary"),
        ("count", TASK_PROMPTS["count"], "count"),
        ("localize", TASK_PROMPTS["localization"], "localize"),
        ("Localization", TASK_PROMPTS["localization"], "localize"),  # `deltavlm eval`'s name for it
        ("Where were new buildings built?", "Where were new buildings built?", "free"),
    ],
)
def test_every_task_as_json(capsys, model_dir, pair, task, prompt, name):
    status, out, err = predict(capsys, "--model", model_dir, "--before", pair[0], "--after", pair[1], "--task", task,
                               "--json", *FAST)
    assert status == 0, err
    result = json.loads(out)
    assert result["prompt"] == prompt
    assert result["task"] == name
    assert isinstance(result["answer"], str)
    assert result["before"] == pair[0] and result["after"] == pair[1]


def test_answer_is_what_the_model_generates(capsys, model_dir, pair):
    """The printed answer equals a direct generate() on the processor's inputs (chat template, greedy)."""
    import modeling_deltavlm  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor

    status, out, _ = predict(capsys, "--model", model_dir, "--before", pair[0], "--after", pair[1],
                             "--task", "count", "--repetition-penalty", "1", *FAST)
    assert status == 0
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    prompt = processor.apply_chat_template([{"role": "user", "content": TASK_PROMPTS["count"]}])
    inputs = processor(images=[(Image.open(pair[0]), Image.open(pair[1]))], text=[prompt])
    output_ids = model.generate(**inputs, max_new_tokens=4, num_beams=1, do_sample=False,
                                pad_token_id=processor.tokenizer.pad_token_id)
    expected = processor.batch_decode(output_ids, prompt_length=inputs["input_ids"].shape[1])[0]
    assert out == expected + "\n"


def test_static_cache_flag_gives_the_same_answer(capsys, model_dir, pair):
    base = ["--model", model_dir, "--before", pair[0], "--after", pair[1], "--task", "caption", *FAST]
    status, dynamic, _ = predict(capsys, *base)
    assert status == 0
    status, static, err = predict(capsys, *base, "--static-cache")
    assert status == 0, err
    assert static == dynamic


def test_default_model_location(capsys, model_dir, pair, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAVLM_HOME", str(tmp_path / "empty"))
    status, out, err = predict(capsys, "--before", pair[0], "--after", pair[1], *FAST)
    assert status != 0 and out == ""
    assert len(err.strip().splitlines()) == 1 and "deltavlm demo" in err and "--model" in err

    monkeypatch.setenv("DELTAVLM_HOME", str(model_dir))  # the model folder itself
    assert predict(capsys, "--before", pair[0], "--after", pair[1], *FAST)[0] == 0
    home = tmp_path / "home"
    home.mkdir()
    (home / "nano").symlink_to(model_dir, target_is_directory=True)
    monkeypatch.setenv("DELTAVLM_HOME", str(home))  # a folder holding nano/
    assert eval.predict.default_model_dir() == home / "nano"
    monkeypatch.delenv("DELTAVLM_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert eval.predict.default_model_dir() == tmp_path / ".cache" / "deltavlm" / "nano"


def test_heatmap_png_over_the_after_image(capsys, model_dir, pair, tmp_path):
    heatmap = tmp_path / "map.png"
    status, out, err = predict(capsys, "--model", model_dir, "--before", pair[0], "--after", pair[1],
                               "--heatmap", heatmap, "--json", *FAST)
    assert status == 0, err
    assert json.loads(out)["heatmap"] == str(heatmap)
    with Image.open(heatmap) as image:
        assert image.format == "PNG" and image.size == Image.open(pair[1]).size and image.mode == "RGB"


def test_tiles_answer_per_grid_position(capsys, model_dir, tmp_path):
    before = noise_image(tmp_path / "a.png", size=(70, 40), seed=3)
    after = noise_image(tmp_path / "b.png", size=(70, 40), seed=4)
    status, out, err = predict(capsys, "--model", model_dir, "--before", before, "--after", after, "--tile", 32, "--json",
                               *FAST)
    assert status == 0, err
    tiles = json.loads(out)["tiles"]
    # 70 px wide -> columns at 0, 32, 38 (the last shifted back to the border); 40 px high -> rows at 0, 8
    assert [(t["row"], t["col"]) for t in tiles] == [(r, c) for r in range(2) for c in range(3)]
    assert tiles[-1]["box"] == [38, 8, 70, 40]
    status, out, _ = predict(capsys, "--model", model_dir, "--before", before, "--after", after, "--tile", 32, *FAST)
    assert status == 0
    assert [line.split("]")[0] + "]" for line in out.splitlines()] == [
        f"[row {r}, col {c}]" for r in range(2) for c in range(3)
    ]


def test_different_sizes_warn_once_per_pair(capsys, model_dir, tmp_path):
    before = noise_image(tmp_path / "a.png", size=(64, 64))
    after = noise_image(tmp_path / "b.png", size=(40, 30))
    status, out, err = predict(capsys, "--model", model_dir, "--before", before, "--after", after, *FAST)
    assert status == 0
    assert err.count("warning:") == 1 and "64x64" in err and "40x30" in err and "resized" in err


def test_single_band_is_converted_with_a_warning(capsys, model_dir, tmp_path):
    before = noise_image(tmp_path / "a.png", mode="L")
    after = noise_image(tmp_path / "b.png", mode="L", seed=5)
    status, out, err = predict(capsys, "--model", model_dir, "--before", before, "--after", after, *FAST)
    assert status == 0
    assert err.count("single-band image, repeated to grey RGB") == 2


def test_geotiff_with_band_selection(capsys, model_dir, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        tifffile.imwrite(tmp_path / f"{name}.tif", rng.integers(0, 4000, (4, 32, 36), dtype=np.uint16), photometric="minisblack")
    status, out, err = predict(capsys, "--model", model_dir, "--before", tmp_path / "a.tif", "--after",
                               tmp_path / "b.tif", "--bands", "3,2,1", "--json", *FAST)
    assert status == 0 and err == ""
    assert "answer" in json.loads(out)


# ---------------------------------------------------------------------------------------------
# bad input: non-zero exit, one line on stderr naming the problem

def _corrupt(tmp_path):
    path = tmp_path / "corrupt.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 4)
    return str(path)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "no such file"),
        ("corrupt", "cannot read"),
        ("tiny", "10x10 pixels is too small"),
        ("only_before", "--after is missing"),
        ("folder", "not a file"),
        ("bad_bands", "--bands"),
        ("bad_model", "not a DeltaVLM model folder"),
        ("heatmap_folder", "does not exist"),
        ("tile_zero", "--tile must be at least"),
        ("batch_size_zero", "--batch-size must be at least 1"),
        ("bad_device", "is not a torch device"),
        ("absent_device", "no cuda device here" if not torch.cuda.is_available() else "CUDA device(s)"),
    ],
)
def test_bad_input_is_one_line(capsys, model_dir, pair, tmp_path, case, expected):
    before, after, extra = pair[0], pair[1], []
    if case == "missing":
        after = str(tmp_path / "nope.png")
    elif case == "corrupt":
        after = _corrupt(tmp_path)
    elif case == "tiny":
        after = noise_image(tmp_path / "tiny.png", size=(10, 10))
    elif case == "folder":
        after = str(tmp_path)
    elif case == "bad_bands":
        extra = ["--bands", "3,2"]
    elif case == "heatmap_folder":
        extra = ["--heatmap", tmp_path / "no" / "map.png"]
    elif case == "tile_zero":
        extra = ["--tile", "0"]
    elif case == "batch_size_zero":
        extra = ["--tile", "64", "--batch-size", "0"]
    elif case == "bad_device":
        extra = ["--device", "bogus"]
    elif case == "absent_device":
        extra = ["--device", "cuda" if not torch.cuda.is_available() else "cuda:99"]
    args = ["--model", tmp_path if case == "bad_model" else model_dir, "--before", before, *extra, *FAST]
    if case != "only_before":
        args += ["--after", after]
    status, out, err = predict(capsys, *args)
    assert status == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert expected in err and err.startswith("deltavlm predict: error:")


def test_bad_input_through_the_console_script_has_no_traceback(tmp_path):
    corrupt = _corrupt(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "deltavlm_cli", "predict", "--before", corrupt, "--after", corrupt, "--model", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "cannot read" in result.stderr


# ---------------------------------------------------------------------------------------------
# batch mode

def pairs_folder(root, names=("p1.png", "p2.png", "p3.png", "p4.png", "p5.png")):
    for k, name in enumerate(names):
        for side in ("A", "B"):
            (root / side).mkdir(parents=True, exist_ok=True)
            noise_image(root / side / name, seed=10 * k + (side == "B"))
    noise_image(root / "A" / "orphan.png")  # no partner in B: skipped with a warning
    (root / "A" / "notes.txt").write_text("not an image")
    return root


def read_results(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_pairs_folder_resumes_after_interruption(capsys, model_dir, tmp_path, monkeypatch):
    folder = pairs_folder(tmp_path / "pairs")
    out = tmp_path / "results.jsonl"
    args = ["--model", model_dir, "--pairs", folder, "--out", out, "--batch-size", 2, "--task", "binary", *FAST]

    # an uninterrupted run, for reference
    reference = tmp_path / "reference.jsonl"
    status, _, err = predict(capsys, *[a if a != out else reference for a in args])
    assert status == 0 and "orphan.png" in err and "5 answered" in err
    expected = {line["id"]: line["answer"] for line in read_results(reference)}
    assert sorted(expected) == ["p1.png", "p2.png", "p3.png", "p4.png", "p5.png"]

    # interrupted in the second batch: the first batch's results are on disk
    real_answer, calls = eval.predict.answer, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_answer(*a, **k)

    monkeypatch.setattr(eval.predict, "answer", interrupted)
    status, _, err = predict(capsys, *args)
    assert status == 130 and "rerun to resume" in err
    assert [line["id"] for line in read_results(out)] == ["p1.png", "p2.png"]
    monkeypatch.setattr(eval.predict, "answer", real_answer)

    # a run killed mid-write leaves half a line: it is cut off, not glued to the next one
    with open(out, "a") as handle:
        handle.write('{"id": "p3.png", "ans')
    status, _, err = predict(capsys, *args)
    assert status == 0 and "3 answered, 2 already" in err
    lines = read_results(out)
    assert {line["id"]: line["answer"] for line in lines} == expected and len(lines) == 5
    assert all(line["task"] == "binary" and line["prompt"] == TASK_PROMPTS["binary"] for line in lines)

    status, _, err = predict(capsys, *args)  # nothing left to do
    assert status == 0 and "0 answered, 5 already" in err and len(read_results(out)) == 5


@pytest.mark.parametrize("kind", ["csv", "jsonl"])
def test_list_file_with_prompts_and_a_bad_row(capsys, model_dir, tmp_path, kind):
    folder = pairs_folder(tmp_path / "pairs", names=("p1.png", "p2.png"))
    rows = [
        {"before": "pairs/A/p1.png", "after": "pairs/B/p1.png", "prompt": "count"},
        {"before": "pairs/A/p2.png", "after": "pairs/B/p2.png", "prompt": "What is new?"},
        {"before": "pairs/A/p2.png", "after": "pairs/B/missing.png", "prompt": ""},
    ]
    listing = tmp_path / f"list.{kind}"
    if kind == "csv":
        listing.write_text("before,after,prompt\n" + "".join(f"{r['before']},{r['after']},{r['prompt']}\n" for r in rows))
    else:
        listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    status, _, err = predict(capsys, "--model", model_dir, "--list", listing, "--out", out, *FAST)
    assert status == 1  # one pair failed; the others are answered
    assert "skipped 3:" in err and "missing.png: no such file" in err and "2 answered" in err
    lines = read_results(out)
    assert [(line["id"], line["task"], line["prompt"]) for line in lines] == [
        ("1", "count", TASK_PROMPTS["count"]),
        ("2", "free", "What is new?"),
    ]
    assert lines[0]["before"] == str(folder.resolve() / "A" / "p1.png")


def test_batch_mode_argument_errors(capsys, model_dir, tmp_path, pair):
    cases = [
        (["--pairs", tmp_path / "nowhere"], "no such folder"),
        (["--pairs", tmp_path], "expected subfolders A/"),
        (["--pairs", tmp_path, "--list", "x.csv"], "not both"),
        (["--list", tmp_path / "x.txt"], "no such file"),
        (["--pairs", tmp_path, "--tile", 64], "one pair"),
    ]
    for args, expected in cases:
        status, out, err = predict(capsys, "--model", model_dir, *args)
        assert status == 2 and len(err.strip().splitlines()) == 1 and expected in err, (args, err)
    (tmp_path / "bad.jsonl").write_text('{"before": "a.png"}\n')
    status, _, err = predict(capsys, "--model", model_dir, "--list", tmp_path / "bad.jsonl")
    assert status == 2 and "row 1: needs 'before' and 'after'" in err


# ---------------------------------------------------------------------------------------------
# imagery

def test_16_bit_single_band_is_stretched_to_8_bit(tmp_path):
    values = np.linspace(0, 60000, 40 * 50).reshape(40, 50).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    with pytest.warns(ImageryWarning, match="single-band"):
        image = read_image(tmp_path / "g16.png")
    array = np.asarray(image)
    assert image.mode == "RGB" and array.shape == (40, 50, 3)
    assert (array[..., 0] == array[..., 1]).all()
    # the 2nd and 98th percentiles map to 0 and 255: about 2 % of pixels clip at each end
    assert 0.015 < (array[..., 0] == 0).mean() < 0.03 and 0.015 < (array[..., 0] == 255).mean() < 0.03


def test_multiband_geotiff_band_selection_and_order(tmp_path):
    # band k (1-based) holds values around 1000 * k, each with its own gradient, stored band-first (C, H, W)
    gradient = np.linspace(0, 1, 30 * 20).reshape(20, 30)
    bands = np.stack([(1000 * k + 500 * gradient * k) for k in range(1, 6)]).astype(np.uint16)
    tifffile.imwrite(tmp_path / "scene.tif", bands, photometric="minisblack")
    picked = np.asarray(read_image(tmp_path / "scene.tif", bands=(3, 2, 1)))
    expected = stretch_to_uint8(np.moveaxis(bands, 0, -1)[:, :, [2, 1, 0]])
    assert np.array_equal(picked, expected)
    with pytest.warns(ImageryWarning, match="5 bands; using bands 1,2,3"):
        read_image(tmp_path / "scene.tif")
    with pytest.raises(ImageryError, match="has 5 band"):
        read_image(tmp_path / "scene.tif", bands=(6, 2, 1))
    tifffile.imwrite(tmp_path / "two.tif", bands[:2], photometric="minisblack")
    with pytest.raises(ImageryError, match="2 bands; choose one or three"):
        read_image(tmp_path / "two.tif")
    single = np.asarray(read_image(tmp_path / "two.tif", bands=(2,)))
    assert single.shape == (20, 30, 3)


def test_float_imagery_with_nodata(tmp_path):
    data = np.random.default_rng(0).random((3, 24, 24)).astype(np.float32)
    data[:, :4, :4] = np.nan
    tifffile.imwrite(tmp_path / "float.tif", data, photometric="minisblack")
    array = np.asarray(read_image(tmp_path / "float.tif"))
    assert array.dtype == np.uint8 and (array[:4, :4] == 0).all() and array.max() == 255


def test_eight_bit_rgb_is_untouched_and_rgba_drops_alpha(tmp_path):
    rgba = np.random.default_rng(0).integers(0, 256, (20, 20, 4), dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "rgba.png")), rgba[..., :3])


def test_parse_bands():
    assert parse_bands("3,2,1") == (3, 2, 1) and parse_bands("4") == (4,) and parse_bands(None) is None
    for bad in ("3,2", "a,b,c", "0,1,2"):
        with pytest.raises(ImageryError):
            parse_bands(bad)


def test_tile_boxes_cover_the_image():
    boxes = tile_boxes(600, 300, 256)
    covered = np.zeros((300, 600), dtype=bool)
    for _, _, (left, top, right, bottom) in boxes:
        assert right - left == 256 and bottom - top == 256
        covered[top:bottom, left:right] = True
    assert covered.all() and len(boxes) == 6
    assert tile_boxes(100, 50, 256) == [(0, 0, (0, 0, 100, 50))]
    with pytest.raises(ImageryError):
        tile_boxes(100, 100, 8)


def test_read_pair_warns_on_different_sizes(tmp_path):
    noise_image(tmp_path / "a.png", size=(32, 32))
    noise_image(tmp_path / "b.png", size=(32, 48))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        read_pair(tmp_path / "a.png", tmp_path / "b.png")
    assert len(caught) == 1 and "resized to the model's input size" in str(caught[0].message)
