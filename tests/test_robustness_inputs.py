"""Bad inputs, one test each, through the public API and the command line (ROBUSTNESS.md lists them all).

Every bad input must end in one clear error naming the item (a ValueError from the library, one
`deltavlm <command>: error: ...` line and exit status 2 from the CLI), or in a documented recovery that is
tested here (a warning, a conversion). Never a traceback from deep inside torch, PIL or transformers.

Images are generated small; the decompression bombs are PNG/TIFF headers claiming huge sizes (a few hundred
bytes on disk), refused before anything is decoded or allocated.
"""

import json
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import deltavlm_cli
from processing.changechat_data import load_records
from processing.conversation import TASK_PROMPTS, conversation_to_rounds, normalize_text

from eval.parsers import parse_binary, parse_count, parse_localization

REPO_ROOT = Path(__file__).resolve().parents[1]
FAST = ["--num-beams", "1", "--max-new-tokens", "3"]
CELLS = {"top-left", "top-center", "top-right", "center-left", "center-center", "center-right",
         "bottom-left", "bottom-center", "bottom-right"}


# ---------------------------------------------------------------------------------------------
# files


def noise_png(path, size=(48, 40), seed=0, mode="RGB") -> str:
    """A small random image (width, height) in `mode` (RGB, L, RGBA, P, I;16)."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16)).save(path)
    else:
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        (image.convert("P") if mode == "P" else image.convert(mode)).save(path)
    return str(path)


def png_header(path, width, height) -> str:
    """A PNG whose header claims width x height RGB pixels, with (almost) no data: PIL's MAX_IMAGE_PIXELS guard
    must refuse it on open, before any decoding (a real decompression bomb compresses GBs into this size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return str(path)


def tiff_header(path, width, height) -> str:
    """A classic little-endian TIFF whose one IFD claims width x height 8-bit pixels over a 16-byte strip:
    tifffile would allocate width*height bytes for it unless the size is checked first."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1),
               (278, 4, height), (279, 4, 16)]
    ifd = struct.pack("<H", len(entries))
    for tag, kind, value in entries:
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    Path(path).write_bytes(b"II*\x00" + struct.pack("<I", 24) + b"\x00" * 16 + ifd + struct.pack("<I", 0))
    return str(path)


def bad_image(kind: str, folder: Path) -> str:
    path = folder / f"{kind}.png"
    if kind == "missing":
        return str(path)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        full = Path(noise_png(folder / "whole.png", size=(64, 64))).read_bytes()
        path.write_bytes(full[: len(full) // 2])
    elif kind == "not_an_image":
        path.write_text("before,after\nA/1.png,B/1.png\n")
    elif kind == "bomb":
        png_header(path, 30_000, 30_000)  # 900 MP: beyond 2x PIL's MAX_IMAGE_PIXELS (~179 MP)
    elif kind == "tiny":
        noise_png(path, size=(10, 10))
    return str(path)


BAD_IMAGES = {  # kind -> what the one error line says
    "missing": "not found",
    "empty": "cannot read",
    "truncated": "truncated",
    "not_an_image": "cannot read",
    "bomb": "too large",
    "tiny": "10x10",
}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def cli(capsys, *args) -> tuple[int, str, str]:
    status = deltavlm_cli.main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(status, err, command, *needles):
    """Exit status 2 and one error line, the last on stderr (a progress bar may come before it), naming the item."""
    assert status == 2, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if ": error:" in line]
    assert len(errors) == 1 and lines[-1] == errors[0] and errors[0].startswith(f"deltavlm {command}: error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])


def raised_in_our_code(excinfo) -> bool:
    """The error was raised by the package (a deliberate message), not deep inside PIL / torch / transformers."""
    last = str(excinfo.traceback[-1].path)
    return f"{REPO_ROOT}/processing/" in last or f"{REPO_ROOT}/eval/" in last


# ---------------------------------------------------------------------------------------------
# image files: library


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_file_through_the_processor(kind, tiny_processor, tmp_path):
    good = noise_png(tmp_path / "good.png")
    path = bad_image(kind, tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as excinfo:
        tiny_processor(images=[(good, path)], text=["q"])
    assert path in str(excinfo.value) and BAD_IMAGES[kind] in str(excinfo.value)
    assert raised_in_our_code(excinfo)


def test_pil_decompression_bomb_guard_is_left_on():
    import eval.imagery  # noqa: F401
    import eval.predict  # noqa: F401
    import processing  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS <= 2**28


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_grayscale_rgba_and_palette_files_become_rgb(mode, tiny_processor, tmp_path):
    path = noise_png(tmp_path / f"{mode}.png", mode=mode)
    assert Image.open(path).mode == mode
    pixels = tiny_processor.image_processor([(path, path)])["pixel_values"]
    assert pixels.shape == (1, 2, 3, 28, 28) and torch.isfinite(pixels).all()


def test_16_bit_and_multiband_files_are_refused_by_the_processor_with_a_pointer(tiny_processor, tmp_path):
    """PIL would clip 16-bit data at 255 (a white image): the processor refuses and names the reader that
    stretches it; `deltavlm predict` reads the same files (see the CLI test below)."""
    tifffile = pytest.importorskip("tifffile")
    sixteen = noise_png(tmp_path / "sixteen.png", mode="I;16")
    multiband = tmp_path / "five_bands.tif"
    tifffile.imwrite(multiband, np.random.default_rng(0).integers(0, 4000, (5, 40, 48), dtype=np.uint16))
    good = noise_png(tmp_path / "good.png")
    for path in (sixteen, str(multiband)):
        with pytest.raises(ValueError, match="eval.imagery.read_image") as excinfo:
            tiny_processor.image_processor([(good, path)])
        assert path in str(excinfo.value)


@pytest.mark.parametrize(
    "array, needle",
    [
        (np.zeros((40, 48, 5), np.uint8), "5"),  # multi-band array
        (np.zeros((40, 48, 2), np.uint8), "channels"),
        (np.zeros((40, 48), np.uint8), "shape (40, 48)"),
        (np.full((40, 48, 3), 4000, np.uint16), "uint16"),  # 16-bit values would be divided by 255
        (torch.full((3, 40, 48), 4000, dtype=torch.int32), "int32"),
    ],
)
def test_unusable_arrays_are_refused_naming_the_image(array, needle, tiny_processor):
    good = np.zeros((40, 48, 3), np.uint8)
    with pytest.raises(ValueError, match="pair 0, after image") as excinfo:
        tiny_processor.image_processor([(good, array)])
    assert needle in str(excinfo.value) and raised_in_our_code(excinfo)


def test_before_and_after_of_different_sizes_are_both_resized(tiny_processor, tmp_path):
    before, after = noise_png(tmp_path / "a.png", size=(64, 48)), noise_png(tmp_path / "b.png", size=(200, 90))
    assert tiny_processor.image_processor([(before, after)])["pixel_values"].shape == (1, 2, 3, 28, 28)


@pytest.mark.parametrize(
    "images, needle",
    [
        ("one", "got a single image"),
        (["one"], "exactly 2 images"),
        (["one", "one", "one"], "got 3"),
        ([("one", "one"), ("one",)], "item 1 has 1 images"),
        ([], "expected a (before, after) pair"),
        (np.zeros((3, 32, 32, 3), np.uint8), "shape (2, ...)"),
        (42, "got int"),
    ],
)
def test_pair_structure_errors(images, needle, tiny_processor, tmp_path):
    path = noise_png(tmp_path / "one.png")

    def fill(item):
        if isinstance(item, str):
            return path
        if isinstance(item, (list, tuple)):
            return type(item)(fill(x) for x in item)
        return item

    with pytest.raises(ValueError) as excinfo:
        tiny_processor(images=fill(images), text=["q"])
    assert needle in str(excinfo.value) and raised_in_our_code(excinfo)


# ---------------------------------------------------------------------------------------------
# image files: command line


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_image_file_through_deltavlm_predict(kind, capsys, model_dir, tmp_path):
    good = noise_png(tmp_path / "good.png")
    path = bad_image(kind, tmp_path)
    status, out, err = cli(capsys, "predict", "--model", model_dir, "--before", good, "--after", path, *FAST)
    assert out == ""
    assert_one_error_line(status, err, "predict", path)


def test_tiff_bomb_is_refused_before_allocation(capsys, model_dir, tmp_path):
    """A 100000 x 100000 TIFF header: without the header check tifffile would allocate ~9.3 GiB."""
    pytest.importorskip("tifffile")
    bomb = tiff_header(tmp_path / "bomb.tif", 100_000, 100_000)
    status, _, err = cli(capsys, "predict", "--model", model_dir, "--before", bomb, "--after", bomb, *FAST)
    assert_one_error_line(status, err, "predict", "bomb.tif", "pixel limit")
    with pytest.raises(ValueError, match="too large"):  # the library refuses it too (PIL's guard)
        from processing.image_processing_deltavlm import load_image

        load_image(bomb)


def test_bomb_through_the_console_script_has_no_traceback(model_dir, tmp_path):
    bomb = png_header(tmp_path / "bomb.png", 30_000, 30_000)
    result = subprocess.run(
        [sys.executable, "-m", "deltavlm_cli", "predict", "--model", str(model_dir), "--before", bomb, "--after", bomb],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and "bomb.png" in result.stderr


def test_odd_but_usable_imagery_through_deltavlm_predict(capsys, model_dir, tmp_path):
    """Grey, RGBA, palette, 16-bit, 5-band and A/B of different sizes: all answered in one batch run, each
    conversion that changes the data announced by one warning line naming the file."""
    tifffile = pytest.importorskip("tifffile")
    reference = noise_png(tmp_path / "rgb.png", seed=9)
    multiband = tmp_path / "five_bands.tif"
    tifffile.imwrite(multiband, np.random.default_rng(0).integers(0, 4000, (5, 40, 48), dtype=np.uint16))
    afters = {
        "grey": noise_png(tmp_path / "grey.png", mode="L"),
        "rgba": noise_png(tmp_path / "rgba.png", mode="RGBA"),
        "palette": noise_png(tmp_path / "palette.png", mode="P"),
        "sixteen": noise_png(tmp_path / "sixteen.png", mode="I;16"),
        "multiband": str(multiband),
        "bigger": noise_png(tmp_path / "bigger.png", size=(120, 100)),
    }
    listing = tmp_path / "pairs.jsonl"
    listing.write_text("".join(json.dumps({"id": k, "before": reference, "after": v}) + "\n" for k, v in afters.items()))
    out = tmp_path / "results.jsonl"
    status, _, err = cli(capsys, "predict", "--model", model_dir, "--list", listing, "--out", out, "--task", "binary", *FAST)
    assert status == 0, err
    assert sorted(json.loads(line)["id"] for line in out.read_text().splitlines()) == sorted(afters)
    assert "Traceback" not in err and "6 answered" in err
    assert "grey.png: single-band image" in err and "sixteen.png: single-band image" in err
    assert "five_bands.tif: 5 bands" in err and "--bands" in err
    assert "48x40 and after is 120x100" in err


# ---------------------------------------------------------------------------------------------
# prompts and conversations


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_empty_and_whitespace_prompts(prompt, tiny_processor, capsys, model_dir, tmp_path):
    """Library: prompts are used as given, an empty one is the bos token alone (documented; the hypothesis
    tests cover it). CLI: refused with one line."""
    inputs = tiny_processor(text=[prompt])
    assert inputs["input_ids"].shape[0] == 1 and inputs["attention_mask"][0, -1] == 1
    good = noise_png(tmp_path / "good.png")
    status, out, err = cli(capsys, "predict", "--model", model_dir, "--before", good, "--after", good, "--task", prompt)
    assert out == ""
    assert_one_error_line(status, err, "predict", "--task is empty")


def test_over_long_prompt_is_cut_from_the_left_with_a_warning_keeping_the_question(tiny_processor):
    question = "is there a new road near the river?"
    long_prompt = "context words " * 300 + question
    with pytest.warns(UserWarning, match="truncated to its last 127"):
        inputs = tiny_processor(text=[long_prompt])
    ids = inputs["input_ids"][0]
    assert ids.shape[0] == 4 + tiny_processor.max_prompt_tokens
    assert tiny_processor.tokenizer.decode(ids[-12:]).replace(" ", "").endswith(question.replace(" ", ""))
    assert tiny_processor.qformer_tokenizer.decode(inputs["qformer_input_ids"][0]).rstrip(" [SEP]").endswith("river?")

    with pytest.warns(UserWarning, match="truncated to its last 50 .the question is kept"):
        rendered = tiny_processor.apply_chat_template([
            {"role": "user", "content": "describe " * 60}, {"role": "assistant", "content": "answer " * 30},
            {"role": "user", "content": question},
        ])
    assert len(rendered.split()) == 50 and rendered.endswith("q is there a new road near the river?")

    with pytest.warns(UserWarning, match="dropped from the left"):
        assert normalize_text("word " * 80 + question).endswith("near the river?")


def test_short_prompts_do_not_warn(tiny_processor):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_processor(text=[TASK_PROMPTS["localization"]] * 2)
        tiny_processor.apply_chat_template([{"role": "user", "content": TASK_PROMPTS["localization"]}])


def test_over_long_prompt_through_deltavlm_predict_warns(capsys, model_dir, tmp_path):
    good = noise_png(tmp_path / "good.png")
    status, out, err = cli(capsys, "predict", "--model", model_dir, "--before", good, "--after", good,
                           "--task", "please look carefully " * 40 + "is there a new road?", *FAST)
    assert status == 0
    assert "truncated to its last 50" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "conversation, needle",
    [
        ([], "must end with a 'user' message"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "assistant answer is missing"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "must end with a 'user'"),
        ([{"role": "assistant", "content": "b"}, {"role": "user", "content": "a"}], "message 0 has role 'assistant'"),
        ([{"content": "a"}], "must end with a 'user'"),
        ("a bare string", "message 0 is a str"),
        ([[{"role": "user", "content": "a"}], [{"role": "assistant", "content": "b"}]], "conversation 1:"),
    ],
)
def test_conversation_with_a_missing_turn_is_refused(conversation, needle, tiny_processor):
    with pytest.raises(ValueError) as excinfo:
        tiny_processor.apply_chat_template(conversation)
    assert needle in str(excinfo.value) and raised_in_our_code(excinfo)


@pytest.mark.parametrize(
    "turns, needle",
    [
        ([{"from": "human", "value": "q"}], "the last question has no answer"),
        ([{"from": "human", "value": "q"}, {"from": "human", "value": "q2"}], "expected 'human' then 'gpt'"),
        (["q", "a"], "turn 0 is a str"),
        ([{"from": "human", "value": None}, {"from": "gpt", "value": "a"}], "turn 0: 'value' must be a string"),
        ("q a", "must be a list of turns"),
        ([], "conversation is empty"),
    ],
)
def test_changechat_turns_with_a_missing_or_malformed_turn(turns, needle):
    with pytest.raises(ValueError) as excinfo:
        conversation_to_rounds(turns)
    assert needle in str(excinfo.value)


# ---------------------------------------------------------------------------------------------
# data set files


def _entry(**changes):
    entry = {"id": "pair_1", "image": ["train/A/x.png", "train/B/x.png"],
             "conversations": [{"from": "human", "value": "<image> <image> Has it changed?"}, {"from": "gpt", "value": "yes"}]}
    return {key: value for key, value in {**entry, **changes}.items() if value is not None}


DATASET_CASES = {  # name -> (file content, text of the error)
    "not_json": ("[{'id': 1}]", "not valid JSON"),
    "not_a_list": ({"id": "pair_1"}, "expected a JSON list of records"),
    "record_not_object": (["pair_1"], "record 1: expected an object"),
    "missing_conversations": ([{"id": "pair_1", "image": ["a", "b"]}], "record 1: neither 'conversations'"),
    "missing_id": ([{**_entry(), "id": None}], "record 1: missing 'id'"),
    "id_wrong_type": ([_entry(id=["a"])], "'id' must be a string or an integer"),
    "image_one_path": ([_entry(image=["train/A/x.png"])], "'image' must be a list of two paths"),
    "image_wrong_type": ([_entry(image=[1, 2])], "'image' must be a list of two paths"),
    "turn_missing": ([_entry(conversations=[{"from": "human", "value": "q"}])], "record 1: conversation has 1 turns"),
    "turn_not_object": ([_entry(conversations=["q", "a"])], "record 1: turn 0 is a str"),
    "changeflag_wrong": ([_entry(changeflag="yes")], "record 1: 'changeflag' must be 0, 1"),
    "duplicate_ids": ([_entry(), _entry()], "record 2: duplicate id 'pair_1'"),
    "escapes_root": ([_entry(image=["../../secrets/A.png", "train/B/x.png"])], "record 1: image path '../../secrets/A.png' escapes"),
    "absolute_path": ([_entry(image=["/etc/passwd", "train/B/x.png"])], "escapes the image root"),
    "caption_missing_captions": ([{"image_A": "train/A/x.png", "image_B": "train/B/x.png"}], "'captions' must be a non-empty list"),
    "caption_path_wrong_type": ([{"image_A": 5, "image_B": "x", "captions": ["c"]}], "'image_A' must be an image path"),
    "caption_escapes_root": ([{"image_A": "../x.png", "image_B": "train/B/x.png", "captions": ["c"]}], "escapes the image root"),
    "levircc_missing_key": ({"images": [{"filepath": "test", "filename": "x.png", "split": "test"}]}, "image 0: missing key 'sentences'"),
    "levircc_images_not_list": ({"images": {"x": 1}}, "'images' must be a list"),
    "levircc_entry_not_object": ({"images": ["x.png"]}, "image 0: expected an object"),
    "levircc_duplicate_imgid": (
        {"images": [{"filepath": "test", "filename": f"{n}.png", "split": "test", "imgid": 7,
                     "sentences": [{"tokens": ["a"]}]} for n in (1, 2)]},
        "image 1: duplicate id 'Levir_CC_test_img7'",
    ),
    "levircc_escapes_root": (
        {"images": [{"filepath": "../..", "filename": "x.png", "split": "test", "sentences": [{"tokens": ["a"]}]}]},
        "escapes the image root",
    ),
}


@pytest.mark.parametrize("case", sorted(DATASET_CASES))
def test_bad_dataset_file_names_the_record(case, tmp_path):
    content, needle = DATASET_CASES[case]
    path = tmp_path / "changechat_test_binary.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError) as excinfo:
        load_records(path, tmp_path / "images")
    assert needle in str(excinfo.value) and raised_in_our_code(excinfo)


@pytest.mark.parametrize("case", ["escapes_root", "duplicate_ids", "turn_missing"])
def test_bad_dataset_file_through_deltavlm_eval(case, capsys, model_dir, tmp_path):
    """Refused before the model is loaded or anything is written."""
    content, needle = DATASET_CASES[case]
    data = tmp_path / "changechat_test_binary.json"
    data.write_text(json.dumps(content))
    (tmp_path / "images").mkdir()
    status, _, err = cli(capsys, "eval", "--model", model_dir, "--data", data, "--image-root", tmp_path / "images",
                         "--out", tmp_path / "out", "--no-meteor")
    assert_one_error_line(status, err, "eval", needle)
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


def test_unreadable_image_during_deltavlm_eval_is_one_line(capsys, model_dir, tmp_path):
    """The file exists (so the up-front check passes) but is truncated: one line naming it; batches before it
    are kept for the rerun."""
    images = tmp_path / "images"
    for side in ("A", "B"):
        (images / side).mkdir(parents=True)
        noise_png(images / side / "good.png", size=(32, 32))
    bad_image("truncated", images / "B")
    entries = [_entry(id="ok", image=["A/good.png", "B/good.png"]), _entry(id="bad", image=["A/good.png", "B/truncated.png"])]
    data = tmp_path / "changechat_test_binary.json"
    data.write_text(json.dumps(entries))
    status, _, err = cli(capsys, "eval", "--model", model_dir, "--data", data, "--image-root", images,
                         "--out", tmp_path / "out", "--batch-size", "1", "--no-meteor", *FAST)
    assert_one_error_line(status, err, "eval", "truncated.png", "rerun to resume")
    lines = (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["ok"]


# ---------------------------------------------------------------------------------------------
# prediction and reference files (`deltavlm score`)


def _prediction(**changes):
    return json.dumps({"id": "p1", "prediction": "a new road", "references": ["a new road was built"], **changes})


PREDICTION_CASES = {  # name -> (file name, content, text of the error)
    "torn_last_line": ("p.jsonl", _prediction() + '\n{"id": "p2", "predic', "line 2: invalid JSON"),
    "garbage_line": ("p.jsonl", _prediction() + "\nnot json at all\n" + _prediction(id="p3"), "line 2: invalid JSON"),
    "empty": ("p.jsonl", "", "is empty"),
    "blank_lines": ("p.jsonl", "\n \n", "is empty"),
    "array_line": ("p.jsonl", _prediction() + "\n[1, 2]\n", "record 2: expected a JSON object"),
    "no_id": ("p.jsonl", json.dumps({"prediction": "x", "references": ["y"]}), "record 1: no id field"),
    "null_id": ("p.jsonl", _prediction(id=None), "record 1: 'id' must be a string or a number"),
    "no_prediction": ("p.jsonl", json.dumps({"id": "p1", "references": ["y"]}), "record 1: no prediction field"),
    "prediction_object": ("p.jsonl", _prediction(prediction={"text": "x"}), "'prediction' must be text"),
    "references_number": ("p.jsonl", _prediction(references=5), "'references' must be a string or a list of strings"),
    "references_mixed": ("p.jsonl", _prediction(references=["a", None]), "'references' must be a string or a list"),
    "unknown_task": ("p.jsonl", _prediction(task="segmentation"), "unknown task 'segmentation'"),
    "changed_text": ("p.jsonl", _prediction(changed="no"), "'changed' must be true/false"),
    "turn_not_integer": ("p.jsonl", _prediction(task="dialogue", turn="one"), "an integer 'turn'"),
    "turn_without_id": ("p.jsonl", json.dumps({"prediction": "a", "references": ["b"], "task": "dialogue", "turn": 1}),
                        "needs an 'id'"),
    "dialogue_turns_mismatch": ("p.jsonl", _prediction(task="dialogue", prediction=["a"], references=["b", "c"]),
                                "dialogue 'p1': 1 predicted turns, 2 reference turns"),
    "utf16": ("p.jsonl", None, "not UTF-8 text"),
    "nested_too_deep": ("p.json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "no_references_anywhere": ("p.jsonl", json.dumps({"id": "p1", "prediction": "a"}), "carry no references"),
}


@pytest.mark.parametrize("case", sorted(PREDICTION_CASES))
def test_malformed_prediction_file_is_one_line(case, capsys, tmp_path):
    name, content, needle = PREDICTION_CASES[case]
    path = tmp_path / name
    if content is None:
        path.write_bytes(_prediction().encode("utf-16"))
    else:
        path.write_text(content)
    status, out, err = cli(capsys, "score", "--predictions", path, "--no-meteor")
    assert out == ""
    assert_one_error_line(status, err, "score", needle)


REFERENCE_CASES = {  # name -> (content, text of the error)
    "levircc_missing_filename": ({"images": [{"split": "test", "imgid": 1, "sentences": [{"raw": "a"}]}]},
                                 "item 1: missing field 'filename'"),
    "levircc_entry_not_object": ({"images": ["x.png"]}, "item 1: a field has the wrong type"),
    "levircc_sentences_text": ({"images": [{"split": "test", "imgid": 1, "filename": "x.png", "sentences": "a"}]},
                               "item 1: a field has the wrong type"),
    "caption_captions_number": ([{"image_A": "x.png", "captions": 5}], "'captions' must be a non-empty list of strings"),
    "caption_captions_empty": ([{"image_A": "x.png", "captions": []}], "'captions' must be a non-empty list of strings"),
    "caption_changeflag_text": ([{"image_A": "x.png", "captions": ["a"], "changeflag": "yes"}],
                                "'changeflag' must be 0, 1 or -1"),
    "instruction_missing_id": ([{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}],
                               "item 1: missing field 'id'"),
    "instruction_missing_turn": ([{"id": "p1", "conversations": [{"from": "human", "value": "q"}]}],
                                 "item 1: conversation has 1 turns"),
    "unknown_layout": ([{"whatever": 1}], "unknown layout"),
}


@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_malformed_reference_file_is_one_line(case, capsys, tmp_path):
    content, needle = REFERENCE_CASES[case]
    predictions, references = tmp_path / "p.jsonl", tmp_path / "refs.json"
    predictions.write_text(json.dumps({"id": "p1", "prediction": "a"}))
    references.write_text(json.dumps(content))
    status, _, err = cli(capsys, "score", "--predictions", predictions, "--references", references, "--no-meteor")
    assert_one_error_line(status, err, "score", needle)


# ---------------------------------------------------------------------------------------------
# answer parsers: arbitrary text never crashes them (hypothesis)

PARSER_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
any_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)
# text made of the words the parsers look for, so the interesting branches are reached, not only "no match"
answer_words = st.sampled_from([
    "roads", "road", "buildings", "building", "no", "not", "none", "yes", "changed", "unchanged", "new", "and", "or",
    "a", "an", "two", "3", "0", "12", "top", "bottom", "left", "right", "center", "middle", "upper", "lower", "the",
    "same", "identical", "[", "]", "'top-left'", ",", ":", ".", "-", "n't", "nothing", "many", "difference",
])
answer_like = st.lists(answer_words, max_size=25).map(" ".join)
texts = st.one_of(any_text, answer_like)


@PARSER_SETTINGS
@given(texts)
def test_parse_binary_returns_a_bool_or_none(text):
    assert parse_binary(text) in (True, False, None)


@PARSER_SETTINGS
@given(texts)
def test_parse_count_returns_two_counts_or_none(text):
    result = parse_count(text)
    if result is not None:
        assert set(result) == {"roads", "buildings"}
        assert all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in result.values())


@PARSER_SETTINGS
@given(texts)
def test_parse_localization_returns_grid_cells_or_none(text):
    result = parse_localization(text)
    if result is not None:
        assert set(result) == {"roads", "buildings"}
        for cells in result.values():
            assert isinstance(cells, list) and set(cells) <= CELLS and len(cells) == len(set(cells))


@PARSER_SETTINGS
@given(st.one_of(st.none(), st.integers(), st.floats(allow_nan=True), st.lists(st.integers(), max_size=3)))
def test_parsers_take_non_text_without_crashing(value):
    """Prediction files may hold a number or null where text belongs; the parsers read str(value)."""
    assert parse_binary(value) in (True, False, None)
    parse_count(value)
    parse_localization(value)
