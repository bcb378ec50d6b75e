"""Static KV cache and `torch.compile` for generation: per-answer latency against the default dynamic cache.

    python benchmarks/bench_compile.py --config nano [--repeats 5] [--batch-sizes 1 8] [--compile-on-cpu]
    (bench_gpu.py runs it on the full model: `--only ... compile`)

Three ways to run the same greedy `generate()` (exactly --new-tokens new tokens, 24-token prompts):

  dynamic   the default: `DynamicCache`, eager PyTorch;
  static    `cache_implementation="static"`: a pre-allocated `StaticCache`, eager (on CPU transformers does not
            compile unless asked; `--compile-on-cpu` asks);
  compiled  the static cache with transformers' automatic `torch.compile` of the decoding forward (on CUDA it is
            on by default for a static cache; `GenerationSettings(static_cache=True)` / `--static-cache` use it).

Reported per batch size: the first call of each way (for `compiled` this includes compiling), the steady-state
median of --repeats calls after it, a SECOND prompt length's first call (a new cache length recompiles), and
whether the generated tokens equal the dynamic cache's. The first compiled call is the price; the steady
state is what a long evaluation or a server gets.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

WAYS = ("dynamic", "static", "compiled")


def way_kwargs(way: str, compile_on_cpu: bool) -> dict:
    from transformers import CompileConfig

    if way == "dynamic":
        return {}
    kwargs = {"cache_implementation": "static"}
    if way == "static":
        kwargs["disable_compile"] = True
    elif compile_on_cpu:
        config = CompileConfig()
        config._compile_all_devices = True  # transformers' own switch for compiling off CUDA
        kwargs["compile_config"] = config
    return kwargs


def agreement(output: torch.Tensor, reference: torch.Tensor, prompt_length: int) -> dict:
    new, ref = output[:, prompt_length:].cpu(), reference[:, prompt_length:].cpu()
    same = new == ref
    first = [int((~row).nonzero()[0]) if (~row).any() else None for row in same]
    return {"fraction": float(same.float().mean()), "first_difference_per_row": first}


def run(model, config_name: str, args, device, dtype) -> tuple[dict, str]:
    gen = common.generation_kwargs(args.new_tokens)
    on_cuda = torch.device(device).type == "cuda"
    ways = [w for w in WAYS if w != "compiled" or on_cuda or args.compile_on_cpu]
    results = {}
    for size in args.compile_batch_sizes:
        inputs = common.synthetic_inputs(model.config, size, 24, seed=size, device=device, dtype=dtype)
        second = common.synthetic_inputs(model.config, size, 40, seed=size + 1, device=device, dtype=dtype)
        reference = None
        for way in ways:
            kwargs = {**gen, **way_kwargs(way, args.compile_on_cpu)}
            torch._dynamo.reset()  # each way's first call starts from nothing compiled
            with torch.inference_mode():
                first, output = common.timed(lambda: model.generate(**inputs, **kwargs), device)
                times = [common.timed(lambda: model.generate(**inputs, **kwargs), device)[0] for _ in range(args.repeats)]
                second_first, _ = common.timed(lambda: model.generate(**second, **kwargs), device)
            if reference is None:
                reference = output
            results[f"{way}@{size}"] = {
                "way": way, "batch_size": size, "first_call_s": first, "steady": common.summarize(times),
                "second_shape_first_call_s": second_first,
                "tokens_equal_dynamic": bool(torch.equal(output.cpu(), reference.cpu())),
                # bf16 kernels differ between eager and compiled code; random weights give near-tied logits, so
                # greedy paths can part: how many generated tokens agree, and where rows first differ
                "generated_tokens_agreeing": agreement(output, reference, inputs["input_ids"].shape[1]),
            }
            print(f"{way} batch {size}: first {first:.2f} s, steady {results[f'{way}@{size}']['steady']['median']:.3f} s",
                  flush=True)
    rows = []
    for key, r in results.items():
        base = results[f"dynamic@{r['batch_size']}"]["steady"]["median"]
        rows.append([
            r["way"], r["batch_size"], f"{r['first_call_s']:.2f}", common.fmt(r["steady"], 1e3, 1),
            f"{base / r['steady']['median']:.2f}x", f"{r['second_shape_first_call_s']:.2f}",
            "yes" if r["tokens_equal_dynamic"] else f"{r['generated_tokens_agreeing']['fraction']:.0%} of tokens",
        ])
    table = common.markdown_table(
        ["way", "batch", "first call s", "steady ms (median [spread])", "speed-up vs dynamic",
         "new prompt length, first call s", "tokens == dynamic"],
        rows,
    )
    markdown = (
        f"Config `{config_name}` ({dtype}), greedy, {args.new_tokens} new tokens, 24-token prompts (second shape: 40); "
        f"{args.repeats} steady-state calls after the first.\n\n{table}\n"
    )
    payload = {
        "benchmark": "compile", "config": config_name, "dtype": str(dtype), "new_tokens": args.new_tokens,
        "repeats": args.repeats, "results": results,
    }
    return payload, markdown


def add_arguments(parser) -> None:
    parser.add_argument("--compile-batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--compile-on-cpu", action="store_true", help="also compile on CPU (inductor; slow to build)")


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="nano", default_repeats=5)
    add_arguments(parser)
    common.run_benchmark(parser.parse_args(argv), run, "compile")


if __name__ == "__main__":
    main()
