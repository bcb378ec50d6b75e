"""One synthetic pair with its exact ground truth (`generate_pair`), and a whole data set in the public
LEVIR-CC / ChangeChat file layout (`write_dataset`, and the `deltavlm synth` command, `main`).

Layout written under DIR (image paths in the annotations are relative to DIR/images):

    images/{split}/A/{split}_{k:06d}.png       before, RGB        (k counts from 1 within a split, as LEVIR-CC)
    images/{split}/B/{split}_{k:06d}.png       after, RGB
    images/{split}/label/{split}_{k:06d}.png   change mask, 8-bit: 0 none, 128 changed road, 255 changed building
    LevirCCcaptions.json                       LEVIR-CC caption file schema, 5 references per pair
    annotations/changechat_{split}.json        instruction records of all six tasks, mixed (for training)
    annotations/changechat_{split}_{task}.json per task, for every split but train: caption (caption schema),
                                               binary, count, loc, open, dialog (instruction schema)
    metadata.json                              generator version, seed, arguments, per-pair ground truth

metadata.json is written last, and only when everything else is: a folder that has it holds a complete data
set (`deltavlm demo` reuses one on that sign). The generator owns the paths above (OWNED_PATHS) and nothing
else in DIR. It writes into a folder that holds none of them; a folder that already holds this exact run
(same version, seed and arguments) is left as it is; anything else there (another run, an unfinished one, a
LEVIR-CC copy) is refused unless `overwrite` (--overwrite) is given, which deletes the owned paths first.

Ground-truth rules:
- The mask is in image A's frame; image B may be offset by up to 1 px ("light") or 2 px ("heavy").
- A changed road or building is exactly one 8-connected blob of its value in the mask; the counts in
  the annotations are those blobs (added plus removed).
- A grid cell is listed for a category when at least `min_cell_pixels` (12 at 256 px, scaled by area)
  of the mask pixels of that category fall in it. The cells split the image at round(k * size / 3).
"""

import argparse
import json
import math
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from processing.conversation import GRID_CELLS, TASK_PROMPTS

from . import language
from .render import BUILDING_ADDED, BUILDING_REMOVED, MASK_VALUES, ROAD_ADDED, ROAD_REMOVED, count_visible_trees, render_pair
from .scene import ONLY_A, ONLY_B, build_layout, choose_change_plan

GENERATOR_VERSION = "1.1"  # 1.1: one blob per changed road, changed pairs always change, visible trees counted
VARIATIONS = ("light", "heavy")
DEFAULT_SPLITS = "train=0.7,val=0.1,test=0.2"
TASK_FILES = ("caption", "binary", "count", "loc", "open", "dialog")  # suffixes of the per-task files
IMAGE_TAG = "<image> <image> "
# Everything the generator writes under its output folder, and so all that --overwrite deletes there. metadata.json
# comes first: it marks a complete data set, so it goes before anything else does.
OWNED_PATHS = ("metadata.json", "metadata.json.tmp", "LevirCCcaptions.json", "annotations", "images")
OWNED_TEXT = "metadata.json, LevirCCcaptions.json, annotations/ and images/"  # for messages
MIN_SIZE = 64
# LEVIR-CD's tiles are 1024 px; a pair is held in memory as several float32 copies of its canvas, so far larger
# sizes end in a MemoryError rather than a data set.
MAX_SIZE = 1024


@dataclass
class SyntheticPair:
    image_a: np.ndarray  # (size, size, 3) uint8, before
    image_b: np.ndarray  # (size, size, 3) uint8, after
    mask: np.ndarray  # (size, size) uint8: 0 no change, 128 changed road, 255 changed building
    truth: language.GroundTruth
    captions: list  # 5 reference captions
    open_qa: tuple  # (question, answer)
    nuisance: dict  # the irrelevant variation applied to A and B


# ----------------------------------------------------------------------------------------------
# Grid cells


def min_cell_pixels(size: int) -> int:
    return max(1, round(12 * (size / 256) ** 2))


def cell_bounds(size: int) -> list:
    return [round(k * size / 3) for k in range(4)]


def touched_cells(binary_mask: np.ndarray) -> list:
    """Grid cells (GRID_CELLS names, grid order) holding at least min_cell_pixels of the mask."""
    size = binary_mask.shape[0]
    edges, threshold = cell_bounds(size), min_cell_pixels(size)
    cells = []
    for row in range(3):
        for column in range(3):
            block = binary_mask[edges[row] : edges[row + 1], edges[column] : edges[column + 1]]
            if np.count_nonzero(block) >= threshold:
                cells.append(GRID_CELLS[3 * row + column])
    return cells


# ----------------------------------------------------------------------------------------------
# One pair


def generate_pair(seed, size: int = 256, variation: str = "light", change_probability: float = 0.5) -> SyntheticPair:
    """A before/after pair with its exact ground truth. `seed` is an int or a sequence of ints (numpy
    SeedSequence entropy); the same seed always gives the same pair."""
    if variation not in VARIATIONS:
        raise ValueError(f"variation must be one of {VARIATIONS}, got {variation!r}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE}, got {size}")
    rng = np.random.default_rng(seed)
    plan = choose_change_plan(rng, change_probability)
    layout = build_layout(rng, size, plan)
    image_a, image_b, labels, nuisance = render_pair(layout, rng, variation)

    def placed(kind, presence):
        return sum(1 for obj in getattr(layout, kind) if obj.presence == presence)

    truth = language.GroundTruth(
        roads_added=placed("roads", ONLY_B),
        roads_removed=placed("roads", ONLY_A),
        buildings_added=placed("buildings", ONLY_B),
        buildings_removed=placed("buildings", ONLY_A),
        road_cells=touched_cells((labels == ROAD_ADDED) | (labels == ROAD_REMOVED)),
        building_cells=touched_cells((labels == BUILDING_ADDED) | (labels == BUILDING_REMOVED)),
        group_cells={
            "roads_added": touched_cells(labels == ROAD_ADDED),
            "roads_removed": touched_cells(labels == ROAD_REMOVED),
            "buildings_added": touched_cells(labels == BUILDING_ADDED),
            "buildings_removed": touched_cells(labels == BUILDING_REMOVED),
        },
        terrain=layout.terrain,
        has_water=layout.pond is not None,
        num_trees=count_visible_trees(layout),  # the layout also holds trees in the margin, outside the picture
    )
    return SyntheticPair(
        image_a=image_a,
        image_b=image_b,
        mask=np.take(MASK_VALUES, labels),
        truth=truth,
        captions=language.make_captions(rng, truth),
        open_qa=language.pick_open_question(rng, truth),
        nuisance=nuisance,
    )


# ----------------------------------------------------------------------------------------------
# Records of the public formats


def levircc_entry(pair: SyntheticPair, split: str, filename: str, imgid: int) -> dict:
    sentids = [imgid * 5 + k for k in range(len(pair.captions))]
    sentences = [
        {"tokens": caption.split(), "raw": f" {caption} .", "imgid": imgid, "sentid": sentid}
        for caption, sentid in zip(pair.captions, sentids)
    ]
    return {
        "filepath": split,
        "filename": filename,
        "imgid": imgid,
        "split": split,
        "sentids": sentids,
        "sentences": sentences,
        "changeflag": pair.truth.changeflag,
    }


def _instruction(record_id: str, images: list, rounds: list) -> dict:
    conversations = []
    for k, (question, answer) in enumerate(rounds):
        # Only the first question carries the two image placeholders, as in ChangeChat's dialogues.
        conversations.append({"from": "human", "value": (IMAGE_TAG if k == 0 else "") + question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": record_id, "image": images, "conversations": conversations}


def changechat_records(pair: SyntheticPair, split: str, filename: str) -> dict:
    """{task file suffix: record} for one pair; "caption" in the caption schema, the rest instructions."""
    stem = filename.rsplit(".", 1)[0]
    images = [f"{split}/A/{filename}", f"{split}/B/{filename}"]
    truth = pair.truth
    binary = (TASK_PROMPTS["binary"], language.binary_answer(truth))
    count = (TASK_PROMPTS["count"], language.count_answer(truth))
    return {
        "caption": {"image_A": images[0], "image_B": images[1], "captions": list(pair.captions), "changeflag": truth.changeflag, "id": stem},
        "binary": _instruction(f"{stem}_binary", images, [binary]),
        "count": _instruction(f"{stem}_count", images, [count]),
        "loc": _instruction(f"{stem}_loc", images, [(TASK_PROMPTS["localization"], language.localization_answer(truth))]),
        "open": _instruction(f"{stem}_open", images, [pair.open_qa]),
        "dialog": _instruction(
            f"{stem}_dialog", images, [binary, count, (TASK_PROMPTS["dialogue_summary"], pair.captions[0])]
        ),
        # The training mix sees each pair's caption task as an instruction too, with one reference: the first, as
        # the dialogue's summary turn has it. (Rotating through the five made the unchanged pairs' answer five
        # equally likely wordings, and a short run's greedy answer a blend of them that matches none.)
        "caption_instruction": _instruction(f"{stem}_caption", images, [(TASK_PROMPTS["caption"], pair.captions[0])]),
    }


# ----------------------------------------------------------------------------------------------
# Files


def encode_png(array: np.ndarray) -> bytes:
    """8-bit grey (h, w) or RGB (h, w, 3) -> PNG bytes.

    A minimal encoder: "Up" row filter in numpy and Huffman-only deflate. About twice as fast as
    PIL's encoder (which tries every filter on every row) for ~10% larger files; the writing is over
    half the cost of a pair otherwise. Output depends only on the pixels (and zlib), so it is
    reproducible.
    """
    height, width = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    rows = np.ascontiguousarray(array, np.uint8).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = 2  # filter type "Up": each byte minus the one above it
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])
    compressor = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_HUFFMAN_ONLY)
    data = compressor.compress(filtered.tobytes()) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def parse_splits(text: str) -> dict:
    """"train=0.7,val=0.1,test=0.2" -> {"train": 0.7, ...}; fractions must be >= 0 and sum to 1."""
    splits = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not name.isidentifier():
            raise ValueError(f"bad split {part!r} in {text!r}; expected e.g. {DEFAULT_SPLITS}")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"bad fraction {value!r} for split {name!r}") from None
        if not math.isfinite(fraction):  # nan passes every comparison below and fails when sizes are rounded
            raise ValueError(f"bad fraction {value!r} for split {name!r}: not a finite number")
        if fraction < 0 or name in splits:
            raise ValueError(f"split {name!r} is repeated or negative in {text!r}")
        splits[name] = fraction
    if abs(sum(splits.values()) - 1) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {sum(splits.values()):g} in {text!r}")
    return splits


def split_sizes(num_pairs: int, splits: dict) -> dict:
    """Pairs per split: floors of the fractions, the remainder to the largest fractional parts."""
    exact = {name: fraction * num_pairs for name, fraction in splits.items()}
    sizes = {name: int(value) for name, value in exact.items()}
    by_remainder = sorted(splits, key=lambda name: (-(exact[name] - sizes[name]), list(splits).index(name)))
    for name in by_remainder[: num_pairs - sum(sizes.values())]:
        sizes[name] += 1
    return sizes


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj), encoding="utf-8")


def _write_json_atomic(path: Path, obj) -> None:
    """Via a temporary file and os.replace: a reader never sees half a metadata.json."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(obj), encoding="utf-8")
    os.replace(temporary, path)


def run_identity(num_pairs: int, seed: int, size: int, splits: dict, variation: str, change_probability: float) -> dict:
    """What makes two runs write the same files: the metadata.json keys that a rerun is compared on."""
    return {
        "generator": "deltavlm synth",
        "version": GENERATOR_VERSION,
        "seed": seed,
        "args": {
            "pairs": num_pairs,
            "size": size,
            "splits": splits,
            "variation": variation,
            "change_probability": change_probability,
        },
    }


def folder_contents(out_dir, identity: dict) -> str | None:
    """None when `out_dir` holds none of the generator's paths; "same" when it holds the complete data set of
    the run `identity` describes; else a description of what is there, for the refusal."""
    out = Path(out_dir)
    present = [name for name in OWNED_PATHS if os.path.lexists(out / name)]
    if not present:
        return None
    try:
        metadata = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"{', '.join(present)} but no readable metadata.json (an unfinished run, or data not made by deltavlm synth)"
    if not isinstance(metadata, dict) or metadata.get("generator") != identity["generator"]:
        return "a metadata.json not written by deltavlm synth"
    if {key: metadata.get(key) for key in identity} == identity:
        return "same"
    return (
        f"another synthetic data set (version {metadata.get('version')}, seed {metadata.get('seed')}, "
        f"{(metadata.get('args') or {}).get('pairs')} pairs)"
    )


def _remove_owned_paths(out: Path) -> None:
    for name in OWNED_PATHS:  # metadata.json first: an interrupted clean-up must not leave a "complete" folder
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()  # a file, or a link (never followed: what it points to is not ours)


def write_dataset(
    out_dir,
    num_pairs: int,
    seed: int = 0,
    size: int = 256,
    splits=DEFAULT_SPLITS,
    variation: str = "light",
    change_probability: float = 0.5,
    overwrite: bool = False,
) -> dict:
    """Generate `num_pairs` pairs into `out_dir` (layout and folder rules in the module docstring). Pair i
    (global index, splits in the order given) comes from seed (seed, i), so any pair can be regenerated alone.
    Returns {split: number of pairs}. A folder that already holds this run is left as it is unless `overwrite`;
    one that holds other data raises ValueError unless `overwrite`, which deletes the generator's paths first."""
    if num_pairs <= 0:
        raise ValueError(f"the number of pairs must be positive, got {num_pairs}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0 (numpy seeds are non-negative), got {seed}")
    if variation not in VARIATIONS:
        raise ValueError(f"variation must be one of {VARIATIONS}, got {variation!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be in [{MIN_SIZE}, {MAX_SIZE}], got {size}")
    if not 0 <= change_probability <= 1:  # also false for nan
        raise ValueError(f"change_probability must be in [0, 1], got {change_probability}")
    split_fractions = parse_splits(splits) if isinstance(splits, str) else dict(splits)
    sizes = split_sizes(num_pairs, split_fractions)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output path {out} is a file, not a folder")
    identity = run_identity(num_pairs, seed, size, split_fractions, variation, change_probability)
    contents = folder_contents(out, identity)
    if contents == "same" and not overwrite:
        return sizes
    if contents is not None and contents != "same" and not overwrite:
        raise ValueError(f"{out} already holds {contents}; overwrite (--overwrite) deletes {OWNED_TEXT} there")
    if contents is not None:
        _remove_owned_paths(out)
    (out / "annotations").mkdir(parents=True, exist_ok=True)

    levircc, metadata_pairs = [], []
    imgid = 0
    for split, count in sizes.items():
        if count == 0:
            # No files for an empty split: an empty changechat_val_*.json made `deltavlm eval` fail with a bare "no
            # records"; without the files it says that no val files were found.
            continue
        folders = {kind: out / "images" / split / kind for kind in ("A", "B", "label")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        per_task = {task: [] for task in TASK_FILES}
        mixed = []
        for k in range(1, count + 1):
            filename = f"{split}_{k:06d}.png"
            pair = generate_pair((seed, imgid), size, variation, change_probability)
            (folders["A"] / filename).write_bytes(encode_png(pair.image_a))
            (folders["B"] / filename).write_bytes(encode_png(pair.image_b))
            (folders["label"] / filename).write_bytes(encode_png(pair.mask))
            levircc.append(levircc_entry(pair, split, filename, imgid))
            records = changechat_records(pair, split, filename)
            for task in TASK_FILES:
                per_task[task].append(records[task])
            mixed += [records["caption_instruction"]] + [records[t] for t in TASK_FILES if t != "caption"]
            metadata_pairs.append(
                {"imgid": imgid, "split": split, "filename": filename, **pair.truth.as_dict(), "nuisance": pair.nuisance}
            )
            imgid += 1
        _write_json(out / "annotations" / f"changechat_{split}.json", mixed)
        if split != "train":
            for task, records in per_task.items():
                _write_json(out / "annotations" / f"changechat_{split}_{task}.json", records)

    _write_json(out / "LevirCCcaptions.json", {"images": levircc})
    metadata = {
        **identity,
        "split_sizes": sizes,
        "mask_values": {"no_change": 0, "road": 128, "building": 255},
        "cell_rule": (
            f"a cell is listed for a category when >= {min_cell_pixels(size)} of its pixels carry that "
            f"category's mask value; cell edges at {cell_bounds(size)}"
        ),
        "pairs": metadata_pairs,
    }
    _write_json_atomic(out / "metadata.json", metadata)  # last: its presence says the data set is complete
    return sizes


# ----------------------------------------------------------------------------------------------
# Command line


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one clear line instead of usage + message + exit
        raise _UsageError(message)


def _integer_in(low: int, high: float = float("inf")):
    """An argparse type: an integer in [low, high], else an error line argparse prefixes with the option's name.
    --pairs: >= 1; --seed: >= 0 (numpy's SeedSequence takes no negatives); --size: MIN_SIZE..MAX_SIZE."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {value!r}") from None
        if not low <= number <= high:
            bound = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {number}")
        return number

    return parse


def _probability(value: str) -> float:
    """argparse type of --change-probability."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {value!r}") from None
    if not 0 <= number <= 1:  # also false for nan
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return number


def _splits(value: str) -> dict:
    """argparse type of --splits."""
    try:
        return parse_splits(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deltavlm synth",
        description="Generate a synthetic bi-temporal change data set in the LEVIR-CC / ChangeChat layout.",
    )
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--pairs", type=_integer_in(1), required=True, help="number of image pairs")
    parser.add_argument("--seed", type=_integer_in(0), default=0, help="random seed, >= 0 (same seed -> identical files)")
    parser.add_argument(
        "--size", type=_integer_in(MIN_SIZE, MAX_SIZE), default=256,
        help=f"image side in pixels ({MIN_SIZE} to {MAX_SIZE}, default 256)"
    )
    parser.add_argument(
        "--splits",
        type=_splits,
        default=DEFAULT_SPLITS,
        help=f"split fractions (default {DEFAULT_SPLITS}); a split that gets no pair gets no files",
    )
    parser.add_argument("--variation", choices=VARIATIONS, default="light", help="strength of the irrelevant variation")
    parser.add_argument(
        "--change-probability",
        type=_probability,
        default=0.5,
        help="share of changed pairs, in [0, 1] (default 0.5, as LEVIR-CC)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace the data an earlier run left in --out (deletes only {OWNED_TEXT} there); "
        "without it such a folder is refused, or left as it is when it holds this very run",
    )
    return parser


def main(argv=None) -> int:
    try:
        args = _build_parser().parse_args(argv)
    except _UsageError as error:
        print(f"deltavlm synth: error: {error}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help
        return int(exit_.code or 0)
    # The values themselves were checked by the argparse types; what is left is the folder. All before anything is
    # created in it.
    problem = None
    if Path(args.out).exists() and not Path(args.out).is_dir():
        problem = f"--out {args.out} is a file, not a folder"
    else:
        identity = run_identity(args.pairs, args.seed, args.size, args.splits, args.variation, args.change_probability)
        contents = folder_contents(args.out, identity)
        if contents == "same" and not args.overwrite:
            print(f"{args.out} already holds this data set ({args.pairs} pairs, seed {args.seed}); nothing written "
                  "(--overwrite regenerates it)")
            return 0
        if contents is not None and contents != "same" and not args.overwrite:
            problem = (f"--out {args.out} already holds {contents}; pass --overwrite to replace it (deletes only "
                       f"{OWNED_TEXT} there), or choose another --out")
    if problem:
        print(f"deltavlm synth: error: {problem}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        sizes = write_dataset(
            args.out, args.pairs, args.seed, args.size, args.splits, args.variation, args.change_probability, args.overwrite
        )
    except OSError as error:
        print(f"deltavlm synth: error: cannot write {args.out}: {error}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    counts = ", ".join(f"{name} {n}" for name, n in sizes.items())
    print(f"wrote {args.pairs} pairs ({counts}) to {args.out} in {seconds:.1f} s ({args.pairs / seconds:.0f} pairs/s)")
    return 0
