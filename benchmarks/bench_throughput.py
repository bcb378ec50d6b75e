"""Throughput in pairs/s for batch sizes 1, 4, 8, 16 (left-padded batches of mixed prompt lengths).

    python benchmarks/bench_throughput.py --config nano [--batch-sizes 1 4 8 16] [--repeats 3] [--threads N]

Each batch: B pairs, prompts of 12–40 tokens (left padded as the processor pads them), greedy, exactly
--new-tokens new tokens per row. pairs/s = B / wall time of one `generate()`. The batch sizes are interleaved
within each repeat, so they see the same machine load.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402


def run(model, config_name: str, args, device, dtype) -> tuple[dict, str]:
    gen = common.generation_kwargs(args.new_tokens)
    rng = random.Random(0)
    batches = {}
    for size in args.batch_sizes:
        lengths = [rng.randint(12, 40) for _ in range(size)]
        batches[size] = common.synthetic_inputs(model.config, size, lengths, seed=size, device=device, dtype=dtype)
    runs = {size: [] for size in args.batch_sizes}
    with torch.inference_mode():
        for index in range(args.warmup + args.repeats):
            for size in args.batch_sizes:
                elapsed, output = common.timed(lambda: model.generate(**batches[size], **gen), device)
                assert output.shape[0] == size
                if index >= args.warmup:
                    runs[size].append(size / elapsed)
    summary = {str(size): common.summarize(values) for size, values in runs.items()}
    base = args.batch_sizes[0]
    speedups = {
        str(size): common.summarize([v / b for v, b in zip(runs[size], runs[base])]) for size in args.batch_sizes
    }
    payload = {
        "benchmark": "throughput", "config": config_name, "dtype": str(dtype), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "warmup": args.warmup, "pairs_per_s": summary, f"speedup_vs_batch{base}": speedups,
    }
    rows = [
        [size, common.fmt(summary[str(size)], 1, 2), common.fmt(speedups[str(size)], 1, 2)]
        for size in args.batch_sizes
    ]
    table = common.markdown_table(["batch", "pairs/s", f"x batch {base} (paired)"], rows)
    markdown = (
        f"Config `{config_name}` ({dtype}), prompts 12–40 tokens left padded, greedy, {args.new_tokens} new tokens; "
        f"{args.repeats} runs per batch size after {args.warmup} warm-up, interleaved.\n\n{table}\n"
    )
    return payload, markdown


def add_arguments(parser):
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16])


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="nano", default_repeats=3)
    add_arguments(parser)
    common.run_benchmark(parser.parse_args(argv), run, "throughput")


if __name__ == "__main__":
    main()
