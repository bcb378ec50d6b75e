"""Synthetic change data: determinism, exact ground truth, and the public file formats."""

import io
import json
from collections import deque
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

import deltavlm_cli
from processing.conversation import GRID_CELLS, TASK_PROMPTS, conversation_to_rounds
from train.synthetic import NO_CHANGE_CAPTIONS, count_answer, encode_png, generate_pair, parse_count_answer, write_dataset
from train.synthetic.language import GroundTruth

TASKS = ("caption", "binary", "count", "loc", "open", "dialog")


# ---------------------------------------------------------------------------------------------- helpers


def count_blobs(mask: np.ndarray) -> int:
    """8-connected components of a boolean mask (plain BFS: independent of the generator's code)."""
    seen = np.zeros_like(mask, bool)
    height, width = mask.shape
    blobs = 0
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        blobs += 1
        seen[y, x] = True
        queue = deque([(y, x)])
        while queue:
            cy, cx = queue.popleft()
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
    return blobs


def cells_of(mask: np.ndarray, min_pixels: int = 12) -> list:
    """The documented rule: a 3x3 cell counts when >= 12 mask pixels (at 256 px) fall in it; edges at round(k*size/3)."""
    size = mask.shape[0]
    edges = [round(k * size / 3) for k in range(4)]
    return [
        GRID_CELLS[3 * r + c]
        for r in range(3)
        for c in range(3)
        if mask[edges[r] : edges[r + 1], edges[c] : edges[c + 1]].sum() >= min_pixels
    ]


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    write_dataset(out, num_pairs=30, seed=11)
    return out


def load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- determinism


def test_same_seed_gives_identical_pairs_and_different_seeds_differ():
    first, again, other = generate_pair(5), generate_pair(5), generate_pair(6)
    assert np.array_equal(first.image_a, again.image_a) and np.array_equal(first.image_b, again.image_b)
    assert np.array_equal(first.mask, again.mask) and first.captions == again.captions
    assert not np.array_equal(first.image_a, other.image_a)


def test_same_seed_gives_byte_identical_files(tmp_path):
    runs = {}
    for name, seed in (("one", 3), ("two", 3), ("other", 4)):
        write_dataset(tmp_path / name, num_pairs=5, seed=seed)
        runs[name] = {p.relative_to(tmp_path / name): p.read_bytes() for p in sorted((tmp_path / name).rglob("*")) if p.is_file()}
    assert runs["one"] == runs["two"]
    assert runs["one"].keys() == runs["other"].keys()
    assert runs["one"][Path("images/train/A/train_000001.png")] != runs["other"][Path("images/train/A/train_000001.png")]


# ---------------------------------------------------------------------------------------------- ground truth


@pytest.mark.parametrize("variation", ["light", "heavy"])
def test_counts_and_cells_agree_with_the_mask(variation):
    changed = 0
    for seed in range(24):
        pair = generate_pair(seed, variation=variation)
        truth, mask = pair.truth, pair.mask
        assert set(np.unique(mask)) <= {0, 128, 255}
        assert count_blobs(mask == 128) == truth.roads_changed, seed
        assert count_blobs(mask == 255) == truth.buildings_changed, seed
        assert cells_of(mask == 128) == truth.road_cells, seed
        assert cells_of(mask == 255) == truth.building_cells, seed
        assert truth.changeflag == int(mask.any()) == int(bool(truth.road_cells or truth.building_cells))
        if truth.changeflag:
            changed += 1
            assert len(set(pair.captions)) == 5
        else:
            assert pair.captions == list(NO_CHANGE_CAPTIONS)
        assert pair.image_a.shape == pair.image_b.shape == (256, 256, 3) and pair.image_a.dtype == np.uint8
    assert 4 <= changed <= 20  # about half the pairs change, as in LEVIR-CC


@pytest.mark.parametrize("variation", ["light", "heavy"])
def test_changes_stand_out_from_the_nuisances(variation):
    """After removing global brightness/contrast, A and B differ much more inside the mask than outside it."""

    def standardise(image):
        image = image.astype(float)
        return (image - image.mean((0, 1))) / image.std((0, 1))

    for seed in range(20):
        pair = generate_pair(seed, variation=variation)
        if pair.truth.changeflag:
            diff = np.abs(standardise(pair.image_a) - standardise(pair.image_b)).sum(-1)
            assert diff[pair.mask > 0].mean() > 1.5 * diff[pair.mask == 0].mean(), seed


def assert_masks_match_metadata(folder: Path) -> None:
    """Every saved mask has one blob per changed object, and the annotated cells are the mask's."""
    meta = load(folder / "metadata.json")
    min_pixels = max(1, round(12 * (meta["args"]["size"] / 256) ** 2))
    for entry in meta["pairs"]:
        mask = read_png(folder / "images" / entry["split"] / "label" / entry["filename"])
        assert mask.dtype == np.uint8 and mask.ndim == 2
        name = entry["filename"]
        assert count_blobs(mask == 128) == entry["roads_added"] + entry["roads_removed"] == entry["roads_changed"], name
        assert count_blobs(mask == 255) == entry["buildings_changed"], name
        assert cells_of(mask == 128, min_pixels) == entry["road_cells"], name
        assert cells_of(mask == 255, min_pixels) == entry["building_cells"], name


def test_written_masks_match_metadata(dataset):
    meta = load(dataset / "metadata.json")
    assert meta["seed"] == 11 and len(meta["pairs"]) == 30
    assert_masks_match_metadata(dataset)


@pytest.mark.parametrize("seed, size", [(1, 256), (11, 256), (13, 256), (0, 64), (1, 128)])
def test_each_changed_object_is_one_blob_when_every_pair_changes(tmp_path, seed, size):
    """Changed roads that leave their parent beside a crossing once left a sliver cut off by the unchanged roads
    (pairs (11, 80), (13, 23)), and two new spurs could touch (pair (1, 21)): checked on every pair, all changed."""
    write_dataset(tmp_path, num_pairs=100, seed=seed, size=size, splits="train=1", change_probability=1.0)
    assert_masks_match_metadata(tmp_path)


@pytest.mark.parametrize("size, pairs", [(64, 200), (256, 300)])
def test_change_probability_one_changes_every_pair_and_zero_none(tmp_path, size, pairs):
    """Probability 1 once left pairs unchanged when no planned change could be placed (17 of 200 at 64 px, pair
    (0, 235) at 256 px): every pair must show a change, one blob per changed object."""
    write_dataset(tmp_path / "all", num_pairs=pairs, seed=0, size=size, splits="train=1", change_probability=1.0)
    entries = load(tmp_path / "all" / "metadata.json")["pairs"]
    assert [entry["filename"] for entry in entries if not entry["changeflag"]] == []
    for entry in entries:
        assert read_png(tmp_path / "all" / "images" / "train" / "label" / entry["filename"]).any(), entry["filename"]
    assert_masks_match_metadata(tmp_path / "all")

    write_dataset(tmp_path / "none", num_pairs=pairs // 4, seed=0, size=size, splits="train=1", change_probability=0.0)
    entries = load(tmp_path / "none" / "metadata.json")["pairs"]
    assert [entry["filename"] for entry in entries if entry["changeflag"]] == []
    for entry in entries:
        assert not read_png(tmp_path / "none" / "images" / "train" / "label" / entry["filename"]).any(), entry["filename"]


def test_trees_are_counted_only_when_they_are_in_the_picture(tmp_path):
    """Trees are scattered over the canvas, margin included: pairs (0, 35) and (0, 248) at 64 px counted trees with
    no pixel in the image, and (0, 248) answered "Yes" to "Are there any trees in the scene?". The oracle redraws
    each tree of the pair's layout alone."""
    from train.synthetic.scene import build_layout, choose_change_plan

    write_dataset(tmp_path, num_pairs=250, seed=0, size=64, splits="train=1")
    entries = load(tmp_path / "metadata.json")["pairs"]
    for entry in entries:
        rng = np.random.default_rng((0, entry["imgid"]))
        layout = build_layout(rng, 64, choose_change_plan(rng, 0.5))
        visible = 0
        for tree in layout.trees:
            canopy = Image.new("L", (layout.canvas, layout.canvas), 0)
            x, y, r = tree.x, tree.y, tree.radius
            ImageDraw.Draw(canopy).ellipse([x - r, y - r, x + r, y + r], fill=255)
            visible += bool(np.asarray(canopy)[layout.margin : layout.margin + 64, layout.margin : layout.margin + 64].any())
        assert entry["num_trees"] == visible, entry["filename"]
    assert entries[35]["num_trees"] == entries[248]["num_trees"] == 0
    answers = {
        record["id"]: record["conversations"][1]["value"]
        for record in load(tmp_path / "annotations" / "changechat_train.json")
        if record["conversations"][0]["value"].endswith("Are there any trees in the scene?")
    }
    assert answers["train_000249_open"] == "No"
    for record_id, answer in answers.items():
        assert answer == ("Yes" if entries[int(record_id.split("_")[1]) - 1]["num_trees"] else "No"), record_id


def test_encode_png_round_trips():
    rgb = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    grey = rgb[..., 0].copy()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(rgb)))), rgb)
    assert Image.open(io.BytesIO(encode_png(grey))).mode == "L"
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(encode_png(grey)))), grey)


# ---------------------------------------------------------------------------------------------- LEVIR-CC format


def _shape(value):
    """Key set and value types of a JSON object, recursively for dicts (lists by first element)."""
    if isinstance(value, dict):
        return {key: _shape(v) for key, v in value.items()}
    if isinstance(value, list):
        return ["list", _shape(value[0]) if value else None]
    return type(value).__name__


def test_levircc_schema_is_identical_to_the_public_file(dataset, shared_dir):
    public = load(shared_dir / "data" / "levir_cc" / "LevirCCcaptions.json")
    ours = load(dataset / "LevirCCcaptions.json")
    assert set(ours) == set(public) == {"images"}
    public_shape = _shape(public["images"][0])
    for entry in ours["images"]:
        assert _shape(entry) == public_shape
    unchanged_public = next(e for e in public["images"] if e["changeflag"] == 0)
    unchanged_ours = next(e for e in ours["images"] if e["changeflag"] == 0)
    assert [s["raw"] for s in unchanged_ours["sentences"]] == [s["raw"] for s in unchanged_public["sentences"]]
    assert [s["tokens"] for s in unchanged_ours["sentences"]] == [s["tokens"] for s in unchanged_public["sentences"]]


def test_levircc_entries_are_consistent(dataset):
    entries = load(dataset / "LevirCCcaptions.json")["images"]
    assert [e["imgid"] for e in entries] == list(range(30))
    assert [e["split"] for e in entries] == ["train"] * 21 + ["val"] * 3 + ["test"] * 6
    assert entries[21]["filename"] == "val_000001.png"
    sentids = [s for e in entries for s in e["sentids"]]
    assert len(sentids) == len(set(sentids)) == 150
    for e in entries:
        assert e["filepath"] == e["split"] and e["filename"].startswith(e["split"] + "_")
        for k in ("A", "B"):
            image = Image.open(dataset / "images" / e["split"] / k / e["filename"])
            assert image.mode == "RGB" and image.size == (256, 256)
        for sentence, sentid in zip(e["sentences"], e["sentids"]):
            raw = sentence["raw"]
            assert raw.startswith(" ") and raw.endswith(" .") and raw == raw.lower()
            assert sentence["tokens"] == raw.split()[:-1]
            assert sentence["imgid"] == e["imgid"] and sentence["sentid"] == sentid
            assert all(token.isalpha() for token in sentence["tokens"])


# ---------------------------------------------------------------------------------------------- ChangeChat format


def test_changechat_files_parse_and_answers_match_truth(dataset):
    annotations = dataset / "annotations"
    truth_by_stem = {p["filename"][:-4]: p for p in load(dataset / "metadata.json")["pairs"]}
    assert not (annotations / "changechat_train_binary.json").exists()
    for split, n in (("train", 21), ("val", 3), ("test", 6)):
        mixed = load(annotations / f"changechat_{split}.json")
        assert len(mixed) == 6 * n
        for record in mixed:
            assert set(record) == {"id", "image", "conversations"} and isinstance(record["id"], str)
            assert record["conversations"][0]["value"].startswith("<image> <image> ")
            assert conversation_to_rounds(record["conversations"])
            for path in record["image"]:
                assert (dataset / "images" / path).is_file()
        if split == "train":
            continue
        files = {task: load(annotations / f"changechat_{split}_{task}.json") for task in TASKS}
        assert all(len(records) == n for records in files.values())
        for record in files["caption"]:
            assert set(record) == {"image_A", "image_B", "captions", "changeflag", "id"}
            assert record["image_A"] == f"{split}/A/{record['id']}.png" and len(record["captions"]) == 5
            assert record["changeflag"] == truth_by_stem[record["id"]]["changeflag"]
        for task in TASKS[1:]:
            for record in files[task]:
                stem = record["image"][0].split("/")[-1][:-4]
                truth = truth_by_stem[stem]
                rounds = conversation_to_rounds(record["conversations"])
                if task == "binary":
                    assert rounds == [(TASK_PROMPTS["binary"], "Yes" if truth["changeflag"] else "No")]
                if task == "count":
                    assert rounds[0][0] == TASK_PROMPTS["count"]
                    assert parse_count_answer(rounds[0][1]) == (truth["roads_changed"], truth["buildings_changed"])
                if task == "loc":
                    assert rounds == [(TASK_PROMPTS["localization"], f"roads {truth['road_cells']} buildings {truth['building_cells']}")]
                if task == "open":
                    assert len(rounds) == 1 and rounds[0][1]
                if task == "dialog":
                    assert [q for q, _ in rounds] == [TASK_PROMPTS["binary"], TASK_PROMPTS["count"], TASK_PROMPTS["dialogue_summary"]]
                    caption = next(c for c in files["caption"] if c["id"] == stem)
                    assert rounds[2][1] == caption["captions"][0]


def test_count_answer_form():
    def truth(roads, buildings):
        return GroundTruth(roads, 0, buildings, 0, [], [])

    assert count_answer(truth(0, 0)) == "No roads has changed, and no buildings has changed."
    assert count_answer(truth(1, 3)) == "1 road has changed, and 3 buildings have changed."
    for roads, buildings in [(0, 2), (2, 0), (1, 1), (3, 12)]:
        assert parse_count_answer(count_answer(truth(roads, buildings))) == (roads, buildings)
    assert parse_count_answer("2 new roads and 3 new buildings") == (2, 3)  # the authors' form also parses


# ---------------------------------------------------------------------------------------------- command line


def test_cli_writes_a_dataset(tmp_path, capsys):
    out = tmp_path / "synth"
    assert deltavlm_cli.main(["synth", "--out", str(out), "--pairs", "12"]) == 0
    meta = load(out / "metadata.json")
    assert meta["split_sizes"] == {"train": 8, "val": 1, "test": 3}
    assert len(load(out / "LevirCCcaptions.json")["images"]) == 12
    assert "wrote 12 pairs" in capsys.readouterr().out


def test_cli_options(tmp_path):
    out = tmp_path / "small"
    args = ["synth", "--out", str(out), "--pairs", "4", "--seed", "7", "--size", "128", "--splits", "train=0.5,test=0.5", "--variation", "heavy"]
    assert deltavlm_cli.main(args) == 0
    assert Image.open(out / "images" / "test" / "B" / "test_000002.png").size == (128, 128)
    assert (out / "annotations" / "changechat_test_dialog.json").is_file()


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--pairs", "0"], "--pairs"),
        (["--pairs", "-3"], "--pairs"),
        (["--pairs", "x"], "--pairs"),
        (["--pairs", "2", "--splits", "train=0.5,test=0.2"], "sum to 1"),
        (["--pairs", "2", "--variation", "extreme"], "--variation"),
        (["--pairs", "2", "--size", "16"], "--size"),
        (["--pairs", "2", "--size", "1025"], "--size"),  # no bound: 100000 was a MemoryError traceback
        (["--pairs", "2", "--seed", "-1"], "--seed"),  # was numpy's message, after the folders were made
        (["--pairs", "2", "--seed", "1.5"], "--seed"),
        (["--pairs", "2", "--splits", "train=nan"], "--splits"),  # passed the checks, then crashed
        (["--pairs", "2", "--splits", "train=inf,test=-inf"], "--splits"),
        (["--pairs", "2", "--change-probability", "nan"], "--change-probability"),
        (["--pairs", "2", "--change-probability", "1.5"], "--change-probability"),
    ],
)
def test_cli_bad_arguments_fail_with_one_line(tmp_path, capsys, extra, expected):
    assert deltavlm_cli.main(["synth", "--out", str(tmp_path / "x")] + extra) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert not (tmp_path / "x").exists()  # nothing is created before every value is checked


def test_a_split_without_pairs_gets_no_files(tmp_path, capsys):
    """Empty changechat_val_*.json files made `deltavlm eval` fail with a bare "no records"."""
    from eval.run_eval import EvalError, task_files

    assert deltavlm_cli.main(["synth", "--out", str(tmp_path), "--pairs", "2", "--splits", "train=0.9,val=0.1"]) == 0
    assert load(tmp_path / "metadata.json")["split_sizes"] == {"train": 2, "val": 0}
    assert [p.name for p in (tmp_path / "annotations").iterdir()] == ["changechat_train.json"]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["train"]
    assert_masks_match_metadata(tmp_path)
    with pytest.raises(EvalError, match="no val files found"):
        task_files(tmp_path, "val")

    write_dataset(tmp_path / "some", num_pairs=4, splits="train=0.5,val=0,test=0.5")
    assert len(task_files(tmp_path / "some", "test")) == 6 and not (tmp_path / "some" / "images" / "val").exists()


def test_cli_refuses_a_file_as_output(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    assert deltavlm_cli.main(["synth", "--out", str(path), "--pairs", "2"]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is a file" in err


# ---------------------------------------------------------------------------------------------- output folder


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_folder_with_another_runs_data_is_refused_unless_overwrite(tmp_path, capsys):
    """A rerun once wrote over part of an earlier run and left the rest (its test split, its extra images)."""
    out = tmp_path / "data"
    assert deltavlm_cli.main(["synth", "--out", str(out), "--pairs", "30", "--seed", "1"]) == 0
    before = snapshot(out)
    second = ["synth", "--out", str(out), "--pairs", "10", "--seed", "2", "--splits", "train=1"]
    assert deltavlm_cli.main(second) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed 1" in err and "--overwrite" in err
    assert snapshot(out) == before

    (out / "notes.txt").write_text("mine")
    (out / "mine").mkdir()
    (out / "mine" / "keep.json").write_text("{}")
    assert deltavlm_cli.main(second + ["--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["LevirCCcaptions.json", "annotations", "images", "metadata.json", "mine", "notes.txt"]
    assert [p.name for p in (out / "annotations").iterdir()] == ["changechat_train.json"]
    assert [p.name for p in (out / "images").iterdir()] == ["train"]
    assert len(list((out / "images" / "train" / "A").iterdir())) == 10
    meta = load(out / "metadata.json")
    assert meta["seed"] == 2 and meta["split_sizes"] == {"train": 10}
    assert (out / "notes.txt").read_text() == "mine" and (out / "mine" / "keep.json").is_file()


def test_the_same_run_into_its_own_folder_is_left_as_it_is(tmp_path, capsys):
    out = tmp_path / "data"
    args = ["synth", "--out", str(out), "--pairs", "6", "--seed", "4"]
    assert deltavlm_cli.main(args) == 0
    before, stamp = snapshot(out), (out / "metadata.json").stat().st_mtime_ns
    capsys.readouterr()
    assert deltavlm_cli.main(args) == 0
    assert "already holds this data set" in capsys.readouterr().out
    assert snapshot(out) == before and (out / "metadata.json").stat().st_mtime_ns == stamp
    assert deltavlm_cli.main(args + ["--overwrite"]) == 0  # regenerates: the same bytes
    assert snapshot(out) == before


def test_an_interrupted_run_leaves_no_metadata(tmp_path, monkeypatch, capsys):
    """metadata.json marks a complete data set (`deltavlm demo` reuses a folder that has one): an interrupted
    rerun once left the earlier run's metadata.json beside its own new images."""
    import train.synthetic.dataset as dataset_module

    out = tmp_path / "data"
    write_dataset(out, num_pairs=20, seed=1)
    real, calls = dataset_module.generate_pair, []

    def interrupted(*args, **kwargs):
        calls.append(args)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(dataset_module, "generate_pair", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(out, num_pairs=20, seed=2, overwrite=True)
    monkeypatch.undo()
    assert not (out / "metadata.json").exists() and not (out / "LevirCCcaptions.json").exists()

    # What is left could be anything's: refused without --overwrite, completed with it.
    args = ["synth", "--out", str(out), "--pairs", "20", "--seed", "2"]
    assert deltavlm_cli.main(args) == 2
    assert "no readable metadata.json" in capsys.readouterr().err
    assert deltavlm_cli.main(args + ["--overwrite"]) == 0
    assert load(out / "metadata.json")["seed"] == 2
    assert np.array_equal(read_png(out / "images" / "train" / "A" / "train_000001.png"), real((2, 0)).image_a)


def test_a_levircc_copy_is_never_written_over_without_overwrite(tmp_path, capsys):
    out = tmp_path / "levir"
    (out / "images" / "train" / "A").mkdir(parents=True)
    (out / "images" / "train" / "A" / "train_000001.png").write_bytes(b"real image")
    (out / "LevirCCcaptions.json").write_text('{"images": []}')
    before = snapshot(out)
    assert deltavlm_cli.main(["synth", "--out", str(out), "--pairs", "2"]) == 2
    assert "no readable metadata.json" in capsys.readouterr().err
    with pytest.raises(ValueError, match="overwrite"):
        write_dataset(out, num_pairs=2)
    assert snapshot(out) == before
