"""Training: seconds per step and peak memory, with and without activation checkpointing; 7B memory budget.

    python benchmarks/bench_training.py --config nano [--batch-size 16] [--steps 4] [--threads N]
        [--malloc-mmap-threshold BYTES]

The default batch, 16, is the batch `deltavlm demo` trains Nano with.

Each variant runs in a FRESH subprocess (so one variant's allocations cannot hide another's peak):
build the model (random weights), `set_trainable_as_paper()` (Nano: whole ViT, CSRM, Q-Former, projection
trainable; LLM frozen), AdamW over the trainable parameters, then --warmup + --steps steps of
forward + backward + optimizer step on one synthetic batch (right padded as the processor pads training batches:
[image x Q][bos prompt][answer eos][pad], labels on answer + eos; prompts 24, answers 20 tokens).

Memory is the process RSS, sampled every millisecond by a psutil thread during the timed steps (`peak_rss`;
`ru_maxrss`, the whole-process high-water mark, is saved too). It is split as: `rss_built` (after building the
model, before any step: weights + Python/torch runtime), gradients + AdamW moments (computed: 3 x trainable x
4 bytes), and the rest, `step_memory` = what a step holds at its peak (activations, logits, temporaries).
(The RSS after a step is not used: glibc keeps freed activation memory mapped, so it depends on the variant.)

glibc's allocator raises its mmap threshold each time a large block is freed (up to 32 MiB), after which
activation-sized tensors come from the heap and their memory stays in the RSS after `free`: the peak RSS then
measures the heap's high-water mark, which depends on the order of allocations, not the memory the step holds.
The children therefore run with MALLOC_MMAP_THRESHOLD_ fixed (default 128 KiB: every tensor above it is its own
mapping, returned on free); `--malloc-mmap-threshold 0` keeps glibc's dynamic default, for comparison.

The 7B budget (`--budget`) is arithmetic, printed with its terms; see `memory_budget()`.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

VARIANTS = {
    "baseline": {"checkpointing": False},
    "activation_checkpointing": {"checkpointing": True},
    # before the chunked loss (issue 8): the LM head on the K labelled columns at once, (B, K, V) logits held
    "baseline, labelled columns": {"checkpointing": False, "unchunked": True},
    "activation_checkpointing, labelled columns": {"checkpointing": True, "unchunked": True},
    # before the labelled-columns LM head (issue 8): logits for all T columns, as `logits_to_keep=T` asks
    "baseline, full logits": {"checkpointing": False, "full_logits": True},
    "activation_checkpointing, full logits": {"checkpointing": True, "full_logits": True},
    # the Q-Former's attention dropout (0.1) sends CPU SDPA to its math kernel; what does it cost?
    "baseline, Q-Former attention dropout 0": {
        "checkpointing": False, "config_overrides": {"qformer_config": "attention_probs_dropout_prob=0"},
    },
}
DEFAULT_VARIANTS = ["baseline", "activation_checkpointing"]


def training_batch(config, batch_size: int, prompt_tokens: int = 24, answer_tokens: int = 20, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    text = config.text_config
    num_queries = config.num_query_tokens
    length = num_queries + 1 + prompt_tokens + answer_tokens + 1
    high = min(text.vocab_size - 2, 30000)
    input_ids = torch.full((batch_size, length), text.pad_token_id, dtype=torch.long)
    input_ids[:, :num_queries] = config.image_token_id
    input_ids[:, num_queries] = text.bos_token_id
    body = torch.randint(3, high, (batch_size, prompt_tokens + answer_tokens), generator=generator)
    input_ids[:, num_queries + 1 : -1] = body
    input_ids[:, -1] = text.eos_token_id
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, : num_queries + 1 + prompt_tokens] = -100
    size = config.vision_config.image_size
    qformer_input_ids = torch.randint(1000, 30000, (batch_size, prompt_tokens + 2), generator=generator)
    return {
        "input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
        "qformer_input_ids": qformer_input_ids, "qformer_attention_mask": torch.ones_like(qformer_input_ids),
        "pixel_values": torch.randn((batch_size, 2, 3, size, size), generator=generator),
    }


class RssSampler:
    def __init__(self, interval: float = 0.001):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = self.process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def child(args) -> dict:
    """One variant, in this (fresh) process."""
    import gc

    import psutil

    dtype = common.setup(args)
    variant = json.loads(args.variant_json)
    overrides = {}
    if variant.get("config_overrides", {}).get("qformer_config"):
        qformer = common.build_config(args.config).qformer_config.to_dict()
        key, value = variant["config_overrides"]["qformer_config"].split("=")
        qformer[key] = float(value)
        overrides["qformer_config"] = qformer
    rss_start = psutil.Process().memory_info().rss
    model = common.build_model(args.config, dtype=dtype, **overrides)
    model.set_trainable_as_paper()
    model.train()
    if variant.get("checkpointing"):
        model.activation_checkpointing_enable()
    if variant.get("unchunked"):
        model._plain_lm_head = lambda: None  # the path language models with transformed logits take
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    batch = training_batch(model.config, args.batch_size)
    forward_kwargs = {"logits_to_keep": batch["input_ids"].shape[1]} if variant.get("full_logits") else {}
    gc.collect()
    rss_built = psutil.Process().memory_info().rss  # weights (+ runtime), before any step
    trainable_count = sum(p.numel() for p in trainable)
    element = torch.finfo(dtype).bits // 8
    grads_and_adam = trainable_count * element * 3  # gradient + AdamW exp_avg + exp_avg_sq

    def step():
        loss = model(**batch, **forward_kwargs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep gradient buffers: the resting RSS then includes them
        return float(loss)

    losses = []
    for _ in range(max(args.warmup, 1)):
        losses.append(step())
    gc.collect()
    rest_rss = psutil.Process().memory_info().rss
    times = []
    with RssSampler() as sampler:
        for _ in range(args.steps):
            start = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - start)
    return {
        "seconds_per_step": common.summarize(times),
        "peak_rss": sampler.peak,
        "rss_start": rss_start,
        "rss_built": rss_built,
        "grads_and_adam": grads_and_adam,
        "step_memory": sampler.peak - rss_built - grads_and_adam,
        "rest_rss": rest_rss,
        "step_rss": sampler.peak - rest_rss,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "losses": losses,
        "trainable_parameters": sum(p.numel() for p in trainable),
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "sequence_length": batch["input_ids"].shape[1],
        "malloc_mmap_threshold_env": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def run_variant(args, name: str, variant: dict) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--config", args.config,
        "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--variant-json", json.dumps(variant),
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    if args.dtype:
        command += ["--dtype", args.dtype]
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if completed.returncode != 0:
        raise RuntimeError(f"variant {name} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --- the full model's memory budget (arithmetic) ---

GB = 1e9


def memory_budget(batch_size: int = 12, sequence_length: int = 160, bytes_per_value: int = 2) -> dict:
    """Training memory of the paper's model (EVA-ViT-g, BERT-base Q-Former, CSRM, Vicuna-7B) in bf16.

    Weights are counted from the real module shapes on the meta device. Trainable = the paper's set
    (last 2 ViT blocks, ln_vision, CSRM, queries, Q-Former, projection), with a bf16 gradient and fp32 AdamW
    moments + fp32 master weights (12 bytes/parameter for mixed precision; 8 if the optimizer keeps bf16 masters
    off). Activations are the autograd-saved tensors per layer, bf16, SDPA (no T x T matrices), with coefficients
    MEASURED with `torch.autograd.graph.saved_tensors_hooks` on one transformers layer (parameters excluded):

      Llama decoder layer (h, i, T tokens):  2*T*(8h + 3i) bytes   (measured 32.4*h per token at i = 2.69h)
      EVA/InstructBLIP ViT block (d, m, N):  2*N*(8d + 2m) bytes   (measured, exact to 0.3%)
      BERT Q-Former layer: as the ViT block over its query+text rows, plus the cross-attention K and V over
      the 2*257 image tokens in every 2nd layer.
      with checkpointing: the layer inputs only (2*T*h per layer) plus one layer's full set during its recompute.
      logits: T*V*(2 [bf16] + 4 [fp32 upcast] + 4 [log-softmax saved]) bytes.

    Only layers with something trainable BEFORE them keep activations: the whole LLM (gradients flow through it
    to the soft prompt), the last 2 ViT blocks (the 37 frozen ones run with no grad history), CSRM, Q-Former.
    """
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    config = common.build_config("full")
    with torch.device("meta"):
        model = DeltaVLMForConditionalGeneration(config)
    model.set_trainable_as_paper()
    params = {
        "language_model": sum(p.numel() for p in model.language_model.parameters()),
        "vision_model": sum(p.numel() for p in model.vision_model.parameters()),
        "qformer+queries+projection": sum(p.numel() for p in model.qformer.parameters())
        + model.query_tokens.numel() + sum(p.numel() for p in model.language_projection.parameters()),
        "difference_module": sum(p.numel() for p in model.difference_module.parameters()),
    }
    total = sum(params.values())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    text, vision, qformer = config.text_config, config.vision_config, config.qformer_config
    b = bytes_per_value
    tokens = batch_size * sequence_length
    h, i, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    llm_layer = b * tokens * (8 * h + 3 * i)
    image_tokens = batch_size * 2 * ((vision.image_size // vision.patch_size) ** 2 + 1)
    d, m = vision.hidden_size, vision.intermediate_size
    vit_layer = b * image_tokens * (8 * d + 2 * m)
    trainable_vit_layers = config.num_trainable_vision_layers
    # CSRM: inputs, difference, 4 linear outputs, tanh/sigmoid/dropout masks, the 3d concat: ~ 14 d per token
    csrm = b * image_tokens * 14 * d
    query_rows = batch_size * (config.num_query_tokens + 40)  # queries + a 40-token instruction
    hq, iq = qformer.hidden_size, qformer.intermediate_size
    cross_layers = qformer.num_hidden_layers // qformer.cross_attention_frequency
    qformer_act = b * query_rows * (8 * hq + 2 * iq) * qformer.num_hidden_layers + b * image_tokens * 2 * hq * cross_layers
    logits = tokens * text.vocab_size * (2 + 4 + 4)
    terms = {
        "weights (bf16)": total * b,
        "gradients of trainable (bf16)": trainable * b,
        "AdamW m, v + fp32 master (12 B/param)": trainable * 12,
        "LLM activations": llm_layer * layers,
        "ViT activations (last 2 blocks)": vit_layer * trainable_vit_layers,
        "CSRM + Q-Former activations": csrm + qformer_act,
        "logits + loss": logits,
    }
    with_ckpt = dict(terms)
    with_ckpt["LLM activations"] = b * tokens * h * layers + llm_layer
    with_ckpt["ViT activations (last 2 blocks)"] = b * image_tokens * d * trainable_vit_layers + vit_layer
    return {
        "batch_size": batch_size, "sequence_length": sequence_length, "parameters": params,
        "total_parameters": total, "trainable_parameters": trainable,
        "per_layer_bytes": {"llm_layer": llm_layer, "vit_block": vit_layer},
        "without_checkpointing": {k: v / GB for k, v in terms.items()},
        "with_checkpointing": {k: v / GB for k, v in with_ckpt.items()},
        "total_without_gb": sum(terms.values()) / GB,
        "total_with_gb": sum(with_ckpt.values()) / GB,
    }


def budget_markdown(budget: dict) -> str:
    rows = [
        [term, f"{budget['without_checkpointing'][term]:.2f}", f"{budget['with_checkpointing'][term]:.2f}"]
        for term in budget["without_checkpointing"]
    ]
    rows.append(["**total**", f"**{budget['total_without_gb']:.1f}**", f"**{budget['total_with_gb']:.1f}**"])
    p = budget["parameters"]
    return (
        f"Full model (EVA-ViT-g + BERT-base Q-Former + CSRM + Vicuna-7B), bf16, batch {budget['batch_size']}, "
        f"{budget['sequence_length']} LLM tokens per row (32 image + prompt + answer). Parameters: "
        + ", ".join(f"{k} {v / 1e6:.1f} M" for k, v in p.items())
        + f"; total {budget['total_parameters'] / 1e9:.3f} B, trainable {budget['trainable_parameters'] / 1e6:.1f} M. "
        f"Per layer (saved for backward): Llama layer {budget['per_layer_bytes']['llm_layer'] / 1e6:.0f} MB, "
        f"EVA block {budget['per_layer_bytes']['vit_block'] / 1e6:.0f} MB.\n\n"
        + common.markdown_table(["term", "GB without checkpointing", "GB with"], rows)
        + "\n"
    )


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="nano", default_repeats=4)
    parser.add_argument("--batch-size", type=int, default=16, help="default: the batch the demo trains Nano with")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="MALLOC_MMAP_THRESHOLD_ for the variants' processes (bytes; 0 = glibc's dynamic default)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default --repeats)")
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS),
                        help="default: baseline and activation_checkpointing; see VARIANTS for the others")
    parser.add_argument("--budget-batch-size", type=int, default=12)
    parser.add_argument("--budget-sequence-length", type=int, default=160)
    parser.add_argument("--child", action="store_true", help=argparse_suppress())
    parser.add_argument("--variant-json", default="{}", help=argparse_suppress())
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = args.repeats
    if args.child:
        print(json.dumps(child(args)))
        return
    common.setup(args)
    info = common.machine_info(args.device)
    results = {}
    for name in args.variants:  # one fresh process per variant, run one after the other
        results[name] = run_variant(args, name, VARIANTS[name])
    budget = memory_budget(args.budget_batch_size, args.budget_sequence_length)
    base = results.get("baseline")
    rows = []
    for name, r in results.items():
        rows.append([
            name, common.fmt(r["seconds_per_step"], 1, 2), f"{r['peak_rss'] / 2**20:.0f}",
            f"{r['rss_built'] / 2**20:.0f}", f"{r['grads_and_adam'] / 2**20:.0f}", f"{r['step_memory'] / 2**20:.0f}",
            f"{r['peak_rss'] / base['peak_rss']:.2f}" if base else "-",
            f"{r['step_memory'] / base['step_memory']:.2f}" if base and base["step_memory"] > 0 else "-",
        ])
    table = common.markdown_table(
        ["variant", "s/step", "peak RSS MiB", "weights+runtime MiB", "grads+AdamW MiB", "step (activations, logits) MiB",
         "peak / baseline", "step / baseline"],
        rows,
    )
    any_result = next(iter(results.values()))
    markdown = (
        f"Config `{args.config}` (random weights, {any_result['trainable_parameters'] / 1e6:.1f} M of "
        f"{any_result['total_parameters'] / 1e6:.1f} M parameters trainable), batch {args.batch_size}, "
        f"{any_result['sequence_length']} LLM tokens per row, AdamW; {args.steps} timed steps after {args.warmup} "
        f"warm-up, each variant in a fresh process; MALLOC_MMAP_THRESHOLD_ "
        f"{args.malloc_mmap_threshold or 'unset (glibc dynamic)'}.\n\n{table}\n\n### Memory budget, full model\n\n"
        + budget_markdown(budget)
    )
    payload = {
        "benchmark": "training", "config": args.config, "batch_size": args.batch_size, "steps": args.steps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "threads": args.threads, "variants": {name: VARIANTS[name] for name in args.variants},
        "results": results, "memory_budget_full_bf16": budget, "machine": info,
    }
    common.save(args.name or f"training_{args.config}", payload, markdown, args.out)


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
