"""Nano's patch grid against the 3x3 answer grid: the ceiling it sets, and the warm-up at another image size.

    python benchmarks/bench_patch_grid.py [--data DIR | --pairs 1600] [--grids 9 10 12] [--warm-up]
        [--image-sizes 160 144] [--budget-minutes 10] [--seeds 0 2] [--data-root DIR] [--validation-pairs 90]
        [--threads 2]

Localization answers name the 3x3 cells that hold at least 12 changed pixels of a category (the synthetic cell
rule, `train.synthetic.dataset.touched_cells`). The vision side sees patches: at Nano's 160 px with 16 px patches a
10 x 10 grid, whose boundary patches straddle two cells. *Ceiling*: the cells read from perfect patch targets
(`train.vision_warmup.patch_targets`, then `patch_cells`: a cell is hit when a patch whose centre lies in it is)
against the annotated cells, micro-F1 over all pairs of the data's label masks, for each patch grid and each
patch-target rule (5% of the patch, or the cell rule's pixel count). No model: it is what a perfect vision side
could report through that grid. *Warm-up* (`--warm-up`): for each seed the 10-minute demo's data and warm-up (as
`bench_position_table.py` runs it) from a fresh Nano at each `--image-sizes` side, the patch targets by the cell
rule where the grid splits into the cells (a multiple of 3 patches a side) and by 5% otherwise, scored on the same
held-out val pairs (patch F1, the cells the patches give, and after the Q-Former phase the queries' facts).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

RULES = {"5% of the patch": None}  # plus the cell rule's pixel count, filled in from the data's mask side


def label_masks(data_dir: Path, limit: int) -> list[Path]:
    """Up to `limit` change masks of the data set (test, then val, then train)."""
    paths = []
    for split in ("test", "val", "train"):
        paths += sorted((data_dir / "images" / split / "label").glob("*.png"))
    if not paths:
        raise FileNotFoundError(f"{data_dir}: no change masks under images/<split>/label (a synthetic data set?)")
    return paths[:limit]


def annotated_cells(mask: np.ndarray) -> np.ndarray:
    """(18,) bool: the cells the synthetic rule lists, roads' nine then buildings' (GRID_CELLS order)."""
    from processing.conversation import GRID_CELLS
    from train.synthetic.dataset import touched_cells
    from train.vision_warmup import BUILDING, ROAD

    listed = [set(touched_cells(mask == value)) for value in (ROAD, BUILDING)]
    return np.array([cell in cells for cells in listed for cell in GRID_CELLS])


def micro_f1(predicted: np.ndarray, wanted: np.ndarray) -> float:
    hits = (predicted & wanted).sum()
    total = predicted.sum() + wanted.sum()
    return float(2 * hits / total) if total else 1.0


def grid_ceiling(mask_paths: list[Path], grids: list[int], rules: dict) -> list[dict]:
    """For each grid and patch-target rule: micro-F1 (all, roads, buildings) of the cells read from perfect
    patch targets against the annotated cells."""
    from PIL import Image

    from train.vision_warmup import patch_cells, patch_targets

    wanted = np.stack([annotated_cells(np.asarray(Image.open(path))) for path in mask_paths])
    rows = []
    for grid in grids:
        for rule, min_pixels in rules.items():
            predicted = patch_cells(patch_targets([str(path) for path in mask_paths], grid, min_pixels).bool()).numpy()
            rows.append({
                "grid": grid, "image_size": grid * 16, "rule": rule,
                "micro_f1": micro_f1(predicted, wanted),
                "roads": micro_f1(predicted[:, :9], wanted[:, :9]),
                "buildings": micro_f1(predicted[:, 9:], wanted[:, 9:]),
                "false_cells": int((predicted & ~wanted).sum()), "missed_cells": int((~predicted & wanted).sum()),
            })
    return rows


def warm_up_rows(args, root: Path) -> tuple[list[list], dict]:
    from benchmarks.bench_change_flag import seed_data, warm_up
    from train.demo import SMALL_BATCH_BELOW_MINUTES, budget_pairs, change_flag_weight, planned_warmup_steps
    from train.demo import vision_ramp_steps
    from train.vision_warmup import cell_rule_patch_pixels

    pairs = args.warm_up_pairs or budget_pairs(args.budget_minutes)
    args.steps = args.steps or planned_warmup_steps(args.budget_minutes)
    args.batch_size = 16 if args.budget_minutes < SMALL_BATCH_BELOW_MINUTES else 32  # train.demo.size_warm_up
    flag_weight = change_flag_weight(args.budget_minutes, args.batch_size)
    ramp = vision_ramp_steps(args.batch_size, args.steps // 2)
    rows, runs = [], {}
    for seed in args.seeds:
        data_dir = seed_data(root, seed, pairs)
        for size in args.image_sizes:
            grid = size // 16
            pixels = cell_rule_patch_pixels(data_dir, grid)
            history = warm_up(data_dir, seed, args, f"seed {seed}, {size} px", nano_options={"image_size": size},
                              change_flag_weight=flag_weight, vision_ramp_steps=ramp, patch_target_pixels=pixels)
            runs[f"seed{seed}_{size}px"] = history
            mask_end = [entry for entry in history if entry["phase"] == "vision"][-1]
            last = history[-1]
            rows.append([seed, size, f"{grid} x {grid}", "cell rule" if pixels else "5%"]
                        + [f"{mask_end[key]:.3f}" for key in ("val_patch_f1", "val_patch_cell_f1")]
                        + [f"{last[key]:.3f}" for key in ("val_change_accuracy", "val_cell_f1",
                                                          "val_road_count_mae", "val_building_count_mae")])
    return rows, {"pairs": pairs, "steps": args.steps, "batch_size": args.batch_size, "histories": runs}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="a synthetic data set (default: generate --pairs pairs)")
    parser.add_argument("--pairs", type=int, default=1600, help="pairs to generate when --data is not given")
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 9, 10, 12, 14, 16], help="patches a side")
    parser.add_argument("--warm-up", action="store_true", help="also run the demo's warm-up at each --image-sizes")
    parser.add_argument("--image-sizes", type=int, nargs="+", default=[160, 144])
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--data-root", default=None, help="folder of the warm-up's per-seed data sets")
    parser.add_argument("--warm-up-pairs", type=int, default=None, help="synthetic pairs a seed (default: the budget's)")
    parser.add_argument("--steps", type=int, default=None, help="warm-up steps, half on the masks (default: the budget's)")
    parser.add_argument("--validation-pairs", type=int, default=90)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="patch_grid", help="results file stem")
    args = parser.parse_args(argv)
    if any(grid < 3 for grid in args.grids):
        parser.error(f"--grids: a grid needs at least 3 patches a side, got {args.grids}")
    if any(size <= 0 or size % 16 for size in args.image_sizes):
        parser.error(f"--image-sizes: Nano needs multiples of its 16 px patch, got {args.image_sizes}")
    torch.set_num_threads(args.threads)
    from PIL import Image

    from train.synthetic import write_dataset
    from train.synthetic.dataset import min_cell_pixels

    if args.data:
        data_dir = Path(args.data)
    else:
        data_dir = Path(tempfile.mkdtemp(prefix="deltavlm-patch-grid-"))
        write_dataset(data_dir, args.pairs, seed=0, variation="light")
    masks = label_masks(data_dir, args.pairs)
    side = np.asarray(Image.open(masks[0])).shape[0]
    rules = {**RULES, f"{min_cell_pixels(side)} changed pixels (the cell rule)": min_cell_pixels(side)}
    ceiling = grid_ceiling(masks, args.grids, rules)
    header = ["patches a side", "image side at 16 px", "patch target", "cells micro-F1", "roads", "buildings",
              "cells listed wrongly", "cells missed"]
    rows = [[r["grid"], r["image_size"], r["rule"], f"{r['micro_f1']:.3f}", f"{r['roads']:.3f}", f"{r['buildings']:.3f}",
             r["false_cells"], r["missed_cells"]] for r in ceiling]
    markdown = (
        f"Cells read from perfect patch targets against the annotated cells, {len(masks)} synthetic label masks "
        f"({side} px):\n\n{common.markdown_table(header, rows)}\n"
    )
    payload = {"benchmark": "patch_grid", "masks": len(masks), "mask_side": side, "ceiling": ceiling,
               "machine": common.machine_info()}
    if args.warm_up:
        root = Path(args.data_root or tempfile.mkdtemp(prefix="deltavlm-patch-grid-warmup-"))
        warm_rows, warm = warm_up_rows(args, root)
        header = ["seed", "image side", "patches", "patch target", "patch F1 (mask phase end)", "cells from the patches",
                  "change accuracy (queries)", "cells (queries)", "road count MAE (queries)",
                  "building count MAE (queries)"]
        markdown += (
            f"\nThe warm-up of `deltavlm demo --budget-minutes {args.budget_minutes:g}` ({warm['steps']} steps at batch "
            f"{warm['batch_size']}, {warm['pairs']} pairs a seed) from a fresh Nano at each image side; scores on up "
            f"to {args.validation_pairs} held-out val pairs:\n\n{common.markdown_table(header, warm_rows)}\n"
        )
        payload["warm_up"] = {**warm, "image_sizes": args.image_sizes, "seeds": args.seeds,
                              "budget_minutes": args.budget_minutes}
    common.save(args.name, payload, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
