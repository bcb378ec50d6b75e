"""Speed of the synthetic change-data generator on ONE CPU core.

    python benchmarks/bench_synth.py [--pairs 300] [--size 256] [--variation light] [--json PATH]

Prints pairs/s for (1) generating pairs in memory, (2) generating and PNG-encoding them, and
(3) `write_dataset` end to end (images, masks and all annotation files on disk), and saves them
as JSON with the machine and date. Each figure is the best of --repeats runs, because other
processes on a shared machine only ever make a run slower.
"""

import os

# One core, one thread: set before numpy is imported so no BLAS/OpenMP pool starts.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import PIL  # noqa: E402

from train.synthetic import encode_png, generate_pair, write_dataset  # noqa: E402


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _best_rate(work, pairs: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return pairs / best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--variation", choices=("light", "heavy"), default="light")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=os.path.join(tempfile.gettempdir(), "bench_synth.json"), help="where to save the results")
    args = parser.parse_args(argv)

    core = None
    if hasattr(os, "sched_setaffinity"):
        core = sorted(os.sched_getaffinity(0))[-1]
        os.sched_setaffinity(0, {core})

    def generate():
        for i in range(args.pairs):
            generate_pair((0, i), args.size, args.variation)

    def generate_and_encode():
        for i in range(args.pairs):
            pair = generate_pair((0, i), args.size, args.variation)
            encode_png(pair.image_a), encode_png(pair.image_b), encode_png(pair.mask)

    scratch = Path(tempfile.mkdtemp(prefix="bench_synth_"))

    def write():
        write_dataset(scratch / "data", args.pairs, seed=0, size=args.size, variation=args.variation)

    generate_pair(0, args.size, args.variation)  # warm caches and imports
    try:
        rates = {
            "generate": _best_rate(generate, args.pairs, args.repeats),
            "generate_and_encode_png": _best_rate(generate_and_encode, args.pairs, args.repeats),
            "write_dataset": _best_rate(write, args.pairs, args.repeats),
        }
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    result = {
        "benchmark": "deltavlm synth",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_model(),
            "pinned_core": core,
            "cores_visible": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": PIL.__version__,
        },
        "args": {"pairs": args.pairs, "size": args.size, "variation": args.variation, "repeats": args.repeats},
        "pairs_per_second": {name: round(rate, 1) for name, rate in rates.items()},
    }
    for name, rate in rates.items():
        print(f"{name:<24} {rate:7.1f} pairs/s  ({args.size}x{args.size}, {args.variation}, 1 core)")
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
