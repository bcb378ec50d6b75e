"""A 3-turn dialogue about one pair, with and without reusing the vision features (`pair_embeds=`).

    python benchmarks/bench_dialogue.py --config full-vision [--repeats 3] [--new-tokens 30] [--threads N]

Each turn generates exactly --new-tokens tokens (greedy). The prompt grows as the chat template makes it grow:
turn k's prompt holds the earlier questions and answers (24, 24+30+24, 24+2*(30+24) tokens by default).

- recompute: every turn calls `generate(pixel_values=...)`: ViT + CSRM + Q-Former + LLM.
- cached: turn 1 runs `get_pair_embeds(pixel_values)` once; every turn calls `generate(pair_embeds=...)`:
  Q-Former + LLM only (the Q-Former must rerun: it reads the instruction).

Both variants are interleaved (recompute dialogue, cached dialogue, repeat) so they see the same load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

NUM_TURNS = 3
QUESTION_TOKENS = 24


def turn_prompt_lengths(new_tokens: int) -> list[int]:
    return [QUESTION_TOKENS + turn * (new_tokens + QUESTION_TOKENS) for turn in range(NUM_TURNS)]


def run(model, config_name: str, args, device, dtype) -> tuple[dict, str]:
    gen = common.generation_kwargs(args.new_tokens)
    lengths = turn_prompt_lengths(args.new_tokens)
    turns = [
        common.synthetic_inputs(model.config, 1, length, seed=turn, device=device, dtype=dtype)
        for turn, length in enumerate(lengths)
    ]
    pixel_values = turns[0]["pixel_values"]
    text_inputs = [{k: v for k, v in t.items() if k != "pixel_values"} for t in turns]

    def recompute():
        times = []
        for inputs in text_inputs:
            elapsed, _ = common.timed(lambda: model.generate(**inputs, pixel_values=pixel_values, **gen), device)
            times.append(elapsed)
        return times

    def cached():
        times = []
        pair_embeds = None
        for inputs in text_inputs:
            def turn():
                nonlocal pair_embeds
                if pair_embeds is None:
                    pair_embeds = model.get_pair_embeds(pixel_values).pair_embeds
                return model.generate(**inputs, pair_embeds=pair_embeds, **gen)

            elapsed, _ = common.timed(turn, device)
            times.append(elapsed)
        return times

    runs = {"recompute": [], "cached": []}
    with torch.inference_mode():
        for index in range(args.warmup + args.repeats):
            for name, fn in (("recompute", recompute), ("cached", cached)):
                times = fn()
                if index >= args.warmup:
                    runs[name].append(times)

    def per_turn(name, turn):
        return common.summarize([r[turn] for r in runs[name]])

    summary = {name: {f"turn{t + 1}": per_turn(name, t) for t in range(NUM_TURNS)} for name in runs}
    for name in runs:
        summary[name]["dialogue"] = common.summarize([sum(r) for r in runs[name]])
    follow_up = [
        (rec[t] / cac[t]) for rec, cac in zip(runs["recompute"], runs["cached"]) for t in range(1, NUM_TURNS)
    ]
    summary["follow_up_speedup"] = common.summarize(follow_up)
    summary["dialogue_speedup"] = common.summarize(
        [sum(rec) / sum(cac) for rec, cac in zip(runs["recompute"], runs["cached"])]
    )
    payload = {
        "benchmark": "dialogue", "config": config_name, "dtype": str(dtype), "new_tokens": args.new_tokens,
        "prompt_tokens_per_turn": lengths, "repeats": args.repeats, "warmup": args.warmup,
        "summary": summary, "runs": runs,
    }
    rows = []
    for key in [f"turn{t + 1}" for t in range(NUM_TURNS)] + ["dialogue"]:
        rec, cac = summary["recompute"][key], summary["cached"][key]
        rows.append([key, common.fmt(rec, 1e3, 0), common.fmt(cac, 1e3, 0), f"{rec['median'] / cac['median']:.2f}x"])
    table = common.markdown_table(["turn", "recompute ms", "cached pair_embeds ms", "speed-up (medians)"], rows)
    markdown = (
        f"Config `{config_name}` ({dtype}), 3 turns about one pair, prompts {lengths} tokens, {args.new_tokens} new "
        f"tokens per turn, greedy; {args.repeats} dialogues after {args.warmup} warm-up, interleaved.\n\n{table}\n\n"
        f"Follow-up turn (2 and 3) speed-up, paired runs: **{common.fmt(summary['follow_up_speedup'], 1, 2)}x**; "
        f"whole dialogue: {common.fmt(summary['dialogue_speedup'], 1, 2)}x\n"
    )
    return payload, markdown


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="full-vision", default_repeats=3)
    common.run_benchmark(parser.parse_args(argv), run, "dialogue")


if __name__ == "__main__":
    main()
