"""Training on one GPU: seconds per step and MEASURED peak memory of the full model, against `memory_budget()`.

    python benchmarks/bench_gpu_training.py --config full [--batch-size 12] [--repeats 3]   # alone
    (bench_gpu.py runs it last, on the model it already built: `--only ... training`)

The training set-up is the one `deltavlm train --bf16` uses: `set_trainable_as_paper()`, then
`train.model.cast_for_mixed_precision` (frozen weights bf16, trainable weights fp32), forward under
`torch.autocast(bfloat16)`, AdamW over the trainable parameters. One synthetic batch shaped like the budget's
(batch 12, 160 LLM tokens per row: 32 image + prompt + answer; labels on the answer), variants without and with
activation checkpointing, each with a fresh optimizer and `torch.cuda.reset_peak_memory_stats()`.

Memory is `torch.cuda.max_memory_allocated()` (the caching allocator's exact high-water mark of live tensors):
`weights` before the first step, `peak` during the timed steps, `resting` after a step (weights + gradients +
AdamW moments), so `peak - resting` is what a step itself holds (activations, logits, temporaries). The arithmetic
budget for the same batch is printed beside it, term by term.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_training, common  # noqa: E402

GB = 1e9


def training_batch(config, batch_size: int, sequence_length: int, device) -> dict:
    """`bench_training.training_batch` with prompt and answer sized so each row has `sequence_length` LLM tokens."""
    free = sequence_length - config.num_query_tokens - 2  # bos and eos
    prompt = free // 2
    batch = bench_training.training_batch(config, batch_size, prompt_tokens=prompt, answer_tokens=free - prompt)
    return {k: v.to(device) for k, v in batch.items()}


def run(model, config_name: str, args, device, dtype) -> tuple[dict, str]:
    from train.model import cast_for_mixed_precision

    model.set_trainable_as_paper()
    cast_for_mixed_precision(model, dtype)
    model.train()
    batch = training_batch(model.config, args.train_batch_size, args.train_sequence_length, device)
    batch["pixel_values"] = batch["pixel_values"].to(dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cuda = torch.device(device).type == "cuda"
    # on CPU (the smoke test) the memory columns read 0: only CUDA's allocator keeps exact statistics
    allocated = torch.cuda.memory_allocated if cuda else (lambda: 0)
    max_allocated = torch.cuda.max_memory_allocated if cuda else (lambda: 0)
    reset_peak = torch.cuda.reset_peak_memory_stats if cuda else (lambda: None)
    results = {}
    for variant, checkpointing in (("baseline", False), ("activation_checkpointing", True)):
        if checkpointing:
            model.activation_checkpointing_enable()
        optimizer = torch.optim.AdamW(trainable, lr=1e-5, fused=cuda)
        for p in trainable:
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()
        reset_peak()
        weights = allocated()

        def step():
            with torch.autocast(device_type=torch.device(device).type, dtype=dtype):
                loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)
            return float(loss)

        losses = [step() for _ in range(max(args.warmup, 1))]
        common.synchronize(device)
        resting = allocated()
        reset_peak()
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            losses.append(step())  # float() synchronises
            times.append(time.perf_counter() - start)
        peak = max_allocated()
        results[variant] = {
            "seconds_per_step": common.summarize(times), "weights_bytes": weights, "resting_bytes": resting,
            "peak_bytes": peak, "step_bytes": peak - resting, "losses": losses,
            "reserved_bytes": torch.cuda.max_memory_reserved() if cuda else 0,
        }
        del optimizer
        if checkpointing:
            model.activation_checkpointing_disable()
        print(f"training {variant}: {results[variant]['seconds_per_step']['median']:.3f} s/step, "
              f"peak {peak / GB:.2f} GB", flush=True)
    model.eval()
    budget = bench_training.memory_budget(args.train_batch_size, args.train_sequence_length)
    trainable_count = sum(p.numel() for p in trainable)
    payload = {
        "benchmark": "gpu_training", "config": config_name, "dtype": str(dtype),
        "batch_size": args.train_batch_size, "sequence_length": args.train_sequence_length,
        "trainable_parameters": trainable_count, "results": results, "memory_budget": budget,
    }
    base = results["baseline"]
    rows = []
    for variant, r in results.items():
        predicted = budget["total_without_gb"] if variant == "baseline" else budget["total_with_gb"]
        rows.append([
            variant, common.fmt(r["seconds_per_step"], 1, 3), f"{r['weights_bytes'] / GB:.2f}",
            f"{r['resting_bytes'] / GB:.2f}", f"{r['peak_bytes'] / GB:.2f}", f"{r['step_bytes'] / GB:.2f}",
            f"{r['peak_bytes'] / base['peak_bytes']:.2f}" if base["peak_bytes"] else "-", f"{predicted:.2f}",
        ])
    table = common.markdown_table(
        ["variant", "s/step", "weights GB", "resting GB (weights+grads+AdamW)", "peak GB", "step GB",
         "peak / baseline", "budget GB (arithmetic)"],
        rows,
    )
    markdown = (
        f"Config `{config_name}`: frozen weights {dtype}, {trainable_count / 1e6:.1f} M trainable weights fp32, "
        f"autocast {dtype}, {'fused ' if cuda else ''}AdamW; batch {args.train_batch_size} x {args.train_sequence_length} LLM tokens; "
        f"{args.repeats} timed steps after {max(args.warmup, 1)} warm-up. Memory is "
        f"`torch.cuda.max_memory_allocated()`.\n\n{table}\n\n### The arithmetic budget for the same batch\n\n"
        + bench_training.budget_markdown(budget)
    )
    return payload, markdown


def add_arguments(parser) -> None:
    parser.add_argument("--train-batch-size", type=int, default=12)
    parser.add_argument("--train-sequence-length", type=int, default=160)


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="full", default_repeats=3)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is visible")
    dtype = common.setup(args)
    model = common.build_model(args.config, device=args.device, dtype=dtype, meta_init=True)
    payload, markdown = run(model, args.config, args, args.device, dtype)
    payload["machine"] = common.machine_info(args.device)
    common.save(args.name or f"gpu_training_{args.config}", payload, markdown, args.out)


if __name__ == "__main__":
    main()
