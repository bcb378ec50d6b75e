#!/usr/bin/env bash
# Benchmarks 1-4 (latency + stage split + InstructBLIP ratio, 3-turn dialogue with/without pair_embeds,
# throughput at batch 1/4/8/16), static cache + torch.compile against the default (bench_compile) and the measured
# training memory of benchmark 5 on the full-size DeltaVLM (EVA-ViT-g, BERT-base Q-Former, CSRM, Vicuna-7B
# shape; random weights, bf16) on ONE H100/H200, within about 4 minutes of machine time.
#
#   bash benchmarks/gpu.sh                  # results in $OUT if set, else benchmarks/results
#   bash benchmarks/gpu.sh --repeats 5      # extra arguments go to benchmarks/bench_gpu.py
#
# Needs python3 (or $PYTHON) with torch (CUDA build) and transformers 5.x; the repository root is put on sys.path.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}  # the GPU images often have python3 only
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'PY'
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)
assert torch.cuda.is_available(), "no CUDA device visible"
print("gpu", torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
# hard stop at 300 s so a hang cannot eat the machine's time; --time-budget skips benchmarks that would start late
timeout 300 "$PYTHON" benchmarks/bench_gpu.py --device cuda --config full --time-budget 200 "$@"
