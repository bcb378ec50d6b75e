"""Latency of one answer, split by stage, side by side with transformers' InstructBLIP at equal sub-configs.

    python benchmarks/bench_latency.py --config nano [--repeats 5] [--new-tokens 30] [--threads N]

One pair, one prompt (24 tokens), greedy, exactly --new-tokens new tokens (min_new_tokens = max_new_tokens).
Stages are timed inside one `generate()` call with forward pre/post hooks on the public sub-modules
(`vision_model.embeddings/encoder/post_layernorm` = vision, `difference_module` = CSRM, `qformer` +
`language_projection` = Q-Former, the language model's first call = prefill, its later calls = decode);
"other" is the rest of `generate()` (embedding lookup, masks, logits processing, Python).

The InstructBLIP peer is `InstructBlipForConditionalGeneration` built from the same vision / Q-Former / text
sub-configs and the SAME module objects (weights shared), on the before image only, with the same prompt and
token budget. DeltaVLM and InstructBLIP runs are interleaved, so both sides see the same machine load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

STAGES = ["vision", "csrm", "qformer", "llm_prefill", "decode", "other"]


def peer_image_token_index(config) -> int:
    """InstructBLIP looks its placeholders up in the LLM's embedding: take the last vocabulary id that is not pad
    (synthetic prompts never use the last two ids)."""
    last = config.text_config.vocab_size - 1
    return last if last != config.text_config.pad_token_id else last - 1


def build_instructblip_peer(model):
    """InstructBlipForConditionalGeneration from `model`'s sub-configs, sharing its modules (no extra memory)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    config = model.config
    image_token_index = peer_image_token_index(config)
    peer_config = InstructBlipConfig(
        vision_config=config.vision_config.to_dict(),
        qformer_config=config.qformer_config.to_dict(),
        text_config=config.text_config.to_dict(),
        num_query_tokens=config.num_query_tokens,
        image_token_index=image_token_index,
    )
    with torch.device("meta"):
        peer = InstructBlipForConditionalGeneration(peer_config)
    peer.vision_model = model.vision_model
    peer.qformer = model.qformer
    peer.language_projection = model.language_projection
    peer.query_tokens = model.query_tokens
    peer.language_model = model.language_model
    return peer.eval()


def peer_inputs(model, inputs: dict) -> dict:
    """The same prompt for InstructBLIP: its placeholder id, the before image only."""
    image_token_index = peer_image_token_index(model.config)
    input_ids = inputs["input_ids"].masked_fill(inputs["input_ids"] == model.config.image_token_id, image_token_index)
    return {
        "input_ids": input_ids,
        "attention_mask": inputs["attention_mask"],
        "qformer_input_ids": inputs["qformer_input_ids"],
        "qformer_attention_mask": inputs["qformer_attention_mask"],
        "pixel_values": inputs["pixel_values"][:, 0],
    }


def _one_run(generate, stages, language_model, device, num_tokens):
    timer = common.StageTimer(stages, language_model, device)
    try:
        with torch.inference_mode():
            total, output = common.timed(generate, device)
    finally:
        timer.remove()
    times = dict(timer.totals)
    times["other"] = total - sum(times.values())
    times["total"] = total
    return times, output


def run(model, config_name: str, args, device, dtype) -> tuple[dict, str]:
    inputs = common.synthetic_inputs(model.config, batch_size=1, prompt_lengths=24, device=device, dtype=dtype)
    peer = build_instructblip_peer(model)
    inputs_peer = peer_inputs(model, inputs)
    gen = common.generation_kwargs(args.new_tokens)

    def deltavlm():
        return model.generate(**inputs, **gen)

    def instructblip():
        return peer.generate(**inputs_peer, **gen)

    runs = {"deltavlm": [], "instructblip": []}
    lengths = {}
    for index in range(args.warmup + args.repeats):
        for name, fn, stages in (
            ("deltavlm", deltavlm, common.deltavlm_stages(model)),
            ("instructblip", instructblip, common.instructblip_stages(peer)),
        ):
            times, output = _one_run(fn, stages, model.language_model, device, args.new_tokens)
            lengths[name] = int(output.shape[1])
            if index >= args.warmup:
                runs[name].append(times)
    summary = {
        name: {stage: common.summarize([r.get(stage, 0.0) for r in rs]) for stage in STAGES + ["total"]}
        for name, rs in runs.items()
    }
    ratios = [d["total"] / i["total"] for d, i in zip(runs["deltavlm"], runs["instructblip"])]
    summary["ratio_deltavlm_over_instructblip"] = common.summarize(ratios)
    payload = {
        "benchmark": "latency", "config": config_name, "dtype": str(dtype), "new_tokens": args.new_tokens,
        "prompt_tokens": 24, "output_lengths": lengths, "repeats": args.repeats, "warmup": args.warmup,
        "timing_method": "forward pre/post hooks on sub-modules inside one generate() call",
        "summary": summary, "runs": runs,
    }
    rows = []
    for stage in STAGES + ["total"]:
        d, i = summary["deltavlm"][stage], summary["instructblip"][stage]
        rows.append([stage, common.fmt(d, 1e3, 1), common.fmt(i, 1e3, 1),
                     f"{(d['median'] - i['median']) * 1e3:+.1f}"])
    table = common.markdown_table(["stage", "DeltaVLM ms (median [spread])", "InstructBLIP ms", "difference ms"], rows)
    ratio = summary["ratio_deltavlm_over_instructblip"]
    markdown = (
        f"Config `{config_name}` ({dtype}), 1 pair, 24-token prompt, greedy, {args.new_tokens} new tokens; "
        f"{args.repeats} runs after {args.warmup} warm-up, interleaved. Spread: IQR for >= 4 runs, else min–max.\n\n"
        f"{table}\n\nDeltaVLM / InstructBLIP per answer: **{common.fmt(ratio, 1, 2)}** (ratio of paired runs)\n"
    )
    return payload, markdown


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="nano", default_repeats=5)
    common.run_benchmark(parser.parse_args(argv), run, "latency")


if __name__ == "__main__":
    main()
