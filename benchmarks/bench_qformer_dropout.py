"""Why CPU training profiles show `_scaled_dot_product_attention_math` in the Q-Former, and what it costs.

    python benchmarks/bench_qformer_dropout.py --config nano [--batch-size 8] [--repeats 5] [--threads N]

The Q-Former's attention dropout (`attention_probs_dropout_prob`, 0.1 as in BERT/MiniLM and BLIP-2) is applied
inside SDPA; torch's CPU flash kernel has no dropout, so in training SDPA falls back to the math kernel
(the vision tower and the LLM have attention dropout 0 and keep the flash kernel). This script counts the SDPA
kernels of one training forward+backward (torch.profiler), then times training steps (forward + backward)
with the Q-Former attention dropout at its configured value and at 0, interleaved step by step on the same
model, so both see the same load.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_training import training_batch  # noqa: E402


def set_qformer_attention_dropout(model, value: float) -> None:
    for module in model.qformer.modules():
        if hasattr(module, "attention_dropout") and hasattr(module, "attention_head_size"):
            module.attention_dropout = value


def kernels(model, batch) -> dict:
    from torch.profiler import profile

    with profile() as prof:
        model(**batch).loss.backward()
    counts = Counter(e.name for e in prof.events() if "scaled_dot_product" in e.name and "backward" not in e.name)
    model.zero_grad(set_to_none=True)
    return dict(counts)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="nano", default_repeats=5)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args(argv)
    dtype = common.setup(args)
    info = common.machine_info(args.device)
    model = common.build_model(args.config, dtype=dtype)
    model.set_trainable_as_paper()
    model.train()
    batch = training_batch(model.config, args.batch_size)
    configured = model.config.qformer_config.attention_probs_dropout_prob
    settings = {f"dropout {configured}": configured, "dropout 0": 0.0}
    found = {}
    for name, value in settings.items():
        set_qformer_attention_dropout(model, value)
        found[name] = kernels(model, batch)
    runs = {name: [] for name in settings}
    for index in range(args.warmup + args.repeats):
        for name, value in settings.items():
            set_qformer_attention_dropout(model, value)

            def step():
                model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)

            elapsed, _ = common.timed(step)
            if index >= args.warmup:
                runs[name].append(elapsed)
    set_qformer_attention_dropout(model, configured)
    summary = {name: common.summarize(values) for name, values in runs.items()}
    names = list(settings)
    ratio = common.summarize([a / b for a, b in zip(runs[names[0]], runs[names[1]])])
    rows = [[name, common.fmt(summary[name], 1e3, 0), ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in found[name].items())]
            for name in names]
    table = common.markdown_table(["Q-Former attention dropout", "forward+backward ms", "SDPA kernels (forward)"], rows)
    markdown = (
        f"Config `{args.config}`, batch {args.batch_size}, training mode, {args.repeats} steps each after "
        f"{args.warmup} warm-up, interleaved.\n\n{table}\n\nstep time ratio (dropout {configured} / 0, paired): "
        f"**{common.fmt(ratio, 1, 2)}**\n"
    )
    payload = {"benchmark": "qformer_dropout", "config": args.config, "batch_size": args.batch_size,
               "kernels": found, "summary": summary, "ratio": ratio, "machine": info}
    common.save(args.name or f"qformer_dropout_{args.config}", payload, markdown, args.out)


if __name__ == "__main__":
    main()
