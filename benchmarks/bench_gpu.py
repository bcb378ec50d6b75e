"""Benchmarks 1–4, the compile comparison and the training memory on the full-size model (EVA-ViT-g + BERT-base Q-Former + CSRM + Vicuna-7B shape) on one GPU.

    python benchmarks/bench_gpu.py [--device cuda] [--config full] [--repeats 3] [--time-budget 200]
    python benchmarks/bench_gpu.py --device cpu --config tiny --repeats 1      # the CPU path (smoke test)

Random weights in bf16 (float32 on CPU). The model is built on the meta device, moved with `to_empty` to the
GPU and filled there (normal(0, 0.02)), which skips a 28 GB float32 CPU initialisation; the InstructBLIP peer
shares its modules. One process runs, in order: latency + stage split + InstructBLIP ratio
(bench_latency), the 3-turn dialogue with/without `pair_embeds` (bench_dialogue), throughput at batch
1/4/8/16 (bench_throughput), dynamic vs static vs compiled generation (bench_compile), and last the measured
training memory (bench_gpu_training: it casts the trainable weights to fp32, so it runs after the others). Results go to $OUT (or --out, else benchmarks/results) as
`<bench>_<config>_<device>.json/.md` plus `gpu_summary.json`. A benchmark that would start after
--time-budget seconds is skipped (and listed as skipped), so the whole run stays within its machine time.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_compile, bench_dialogue, bench_gpu_training, bench_latency, bench_throughput, common  # noqa: E402


def main(argv=None):
    started = time.perf_counter()
    parser = common.base_parser(__doc__.splitlines()[0], default_config="full", default_repeats=3)
    bench_throughput.add_arguments(parser)
    bench_gpu_training.add_arguments(parser)
    bench_compile.add_arguments(parser)
    parser.add_argument("--time-budget", type=float, default=200.0, help="seconds; later benchmarks are skipped")
    parser.add_argument("--only", nargs="+", default=["latency", "dialogue", "throughput", "compile", "training"],
                        choices=["latency", "dialogue", "throughput", "compile", "training"],
                        help="training runs last whatever the order: it casts the trainable weights to fp32")
    args = parser.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    dtype = common.setup(args)
    if torch.device(args.device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    info = common.machine_info(args.device)
    print("machine:", json.dumps(info), flush=True)
    build_start = time.perf_counter()
    model = common.build_model(args.config, device=args.device, dtype=dtype, meta_init=True)
    build_seconds = time.perf_counter() - build_start
    parameters = sum(p.numel() for p in model.parameters())
    print(f"built {args.config} ({parameters / 1e9:.3f} B parameters, {dtype}) on {args.device} in {build_seconds:.1f} s",
          flush=True)
    out_dir = args.out or os.environ.get("OUT") or None
    summary = {"config": args.config, "device": args.device, "dtype": str(dtype), "parameters": parameters,
               "build_seconds": build_seconds, "machine": info, "results": {}, "skipped": [], "errors": {}}
    benches = {"latency": bench_latency, "dialogue": bench_dialogue, "throughput": bench_throughput,
               "compile": bench_compile, "training": bench_gpu_training}
    args.only = sorted(args.only, key=lambda name: name == "training")
    device_tag = torch.device(args.device).type
    for name in args.only:
        elapsed = time.perf_counter() - started
        if elapsed > args.time_budget:
            print(f"skipping {name}: {elapsed:.0f} s > --time-budget {args.time_budget:.0f} s", flush=True)
            summary["skipped"].append(name)
            continue
        bench_start = time.perf_counter()
        try:
            payload, markdown = benches[name].run(model, args.config, args, args.device, dtype)
        except Exception as error:  # keep going: the other benchmarks' results are still worth having
            traceback.print_exc()
            summary["errors"][name] = repr(error)
            continue
        payload["machine"] = dict(info)
        payload["seconds"] = time.perf_counter() - bench_start
        if device_tag == "cuda":
            payload["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        common.save(f"{name}_{args.config}_{device_tag}", payload, markdown, out_dir)
        summary["results"][name] = {k: payload[k] for k in ("summary", "pairs_per_s") if k in payload}
        if name == "training":
            summary["results"][name] = {
                variant: {"seconds_per_step": r["seconds_per_step"]["median"], "peak_gb": r["peak_bytes"] / 1e9}
                for variant, r in payload["results"].items()
            }
    summary["total_seconds"] = time.perf_counter() - started
    summary["machine"]["load_average_end"] = common.load_average()
    target = Path(out_dir or common.RESULTS_DIR) / f"gpu_summary_{args.config}_{device_tag}.json"
    target.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"done in {summary['total_seconds']:.0f} s; wrote {target}", flush=True)
    if summary["errors"]:
        raise SystemExit(f"errors in: {sorted(summary['errors'])}")


if __name__ == "__main__":
    main()
