"""`deltavlm demo`: the whole mission on a laptop CPU, offline.

1. generate a synthetic bi-temporal data set (`deltavlm synth`),
2. build DeltaVLM-Nano from its PyPI parts and warm its from-scratch ViT up on the change masks,
3. instruction-tune it with the project's Trainer path (`deltavlm train`),
4. evaluate all six ChangeChat tasks on the held-out split (`deltavlm eval`) next to trivial baselines,
5. answer the task prompts about a held-out pair (and about `--before/--after` if given),
6. save the model where `deltavlm predict` / `chat` / `serve` look when no model is named.

Nano is a demonstration trained on synthetic scenes, not the paper's checkpoint: see the README for the real
model. `--budget-minutes` trades time for quality.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError

from modeling_deltavlm.build_nano import NANO_IMAGE_SIZE, NANO_MAX_NEW_TOKENS
from processing.changechat_data import load_records
from processing.conversation import TASK_PROMPTS
from train.deadline import CosineToDeadline, tail_deadline
from train.demo_results import (
    TASK_FILES,
    CurveCallback,
    baseline_scores,
    headline_point,
    plot_curve,
    summary_table,
)
from train.export import staged_model_folder

# The mask phase's learning rate at batch 32 (the Q-Former phase keeps warm_up_vision's 1e-3). Measured on the
# 60-minute demo's data (3 780 training pairs, 360 mask steps at batch 32, 2 cores, 2026-11-27): held-out per-patch
# change F1 0.684 at 3e-3 against 0.648 at 1e-3 (0.634 / 0.607 after 180 steps).
VISION_LEARNING_RATE = 3e-3
# ... and at the batch of 16 that a slow machine's short budget gets (size_warm_up). There the noisier steps at
# 3e-3 could leave the mask probe on "nothing changed" for half the phase: on the 15-minute demo's data (1 350
# pairs, 90 mask steps at batch 16; EPYC, 2026-11-28) held-out patch F1 was 0.0 until step 45 and 0.186 after 90
# at 3e-3 (0.452 with another seed), 0.465 and 0.439 at 1e-3 (0.418 at 1.5e-3); on the 10-minute data (60 steps)
# 0.372 at 3e-3, 0.386 at 1e-3. The demo's two 15-minute runs with 3e-3 lost one and five of six tasks.
SMALL_BATCH_VISION_LEARNING_RATE = 1e-3
# The Q-Former phase's rate at batch 16 (its fresh layers and the queries; MiniLM's own layers a tenth of it). Its
# 60 steps at the 10-minute default must take the queries' change read-out off chance; at 1e-3 that came late or
# not at all: held-out change accuracy after the phase 0.469 (and a default demo that lost two tasks), 0.938,
# 0.875 and 0.906 over four warm-ups (10-minute data, two seeds, mask phase at 1e-3 or 3e-3; EPYC, 2026-11-28);
# at 2e-3 0.906, 0.938 and 0.906 for three of them, and 0.875 on the 15-minute data (0.875 at 1e-3).
SMALL_BATCH_QFORMER_LEARNING_RATE = 2e-3
QFORMER_LEARNING_RATE = 1e-3  # at batch 32: warm_up_vision's default, as every earlier measurement ran
# Below SMALL_BATCH_BELOW_MINUTES, where the warm-up runs at batch 16 (1e-3), the mask phase also trains each pair's
# yes/no from its most confident patch (`pair_change_loss`, this weight). The queries' held-out change accuracy after the 10-minute default's warm-up
# (120 steps at batch 16, 90 validation pairs, EPYC, 2026-11-28), without and with it: seeds 0, 2, 4, 6 gave 0.833,
# 0.767, 0.911, 0.889 and 0.944, 0.922, 0.878, 0.878 — the weak warm-ups rescued, the strong ones within 3 pairs.
# The per-patch change F1 fell in all four (by 0.04-0.08), and the longer budgets are judged on localization: they
# keep the patch loss alone. A fast machine's short budget warms up at batch 32 (3e-3): there the term killed the
# mask probe at seed 4 (held-out patch F1 0.0 from step 30, the queries' change accuracy 0.52; 0.441 and 0.867
# without it; `bench_change_flag.py --seeds 4 --batch-size 32`, EPYC, 2026-11-28), and that demo answered every
# binary question "yes". So batch 32 keeps the patch loss alone, as every batch-32 warm-up before it did.
SHORT_BUDGET_CHANGE_FLAG_WEIGHT = 1.0
# Share of the budget the stages get (measured on 2 cores: the rest goes to data, loading and saving).
TRAIN_SHARE = 0.62
# The vision warm-up takes 12 steps a budget minute, but at most this share of the budget at this machine's measured
# speed. On the 2-core Xeon the defaults were tuned on, 120 steps took 27% of the 10-minute default; on a 2-core EPYC
# without AVX-512 (2026-11-27) every step took 2.1-2.3 times as long, the same 120 steps took 5.4 minutes, the
# language stage got 20 steps, the run 14.1 minutes, and the answers lost to the constant baselines on caption,
# localization, open QA and dialogue. Each stage now sizes itself on this machine's speed: a slower machine gets
# fewer steps of each, not a longer run.
WARMUP_SHARE = 0.3
# Never fewer: with 25 mask steps (51 in all; EPYC, 2026-11-27) the held-out patch F1 was still 0.0 — the mask
# probe had not left "nothing changed" — where 60 reached 0.47.
MIN_WARMUP_STEPS = 120
# The mask phase's ramp to 3e-3 at batch 32, at least (`vision_ramp_steps`). With a tenth of 60 mask steps (the
# fewest MIN_WARMUP_STEPS leaves, a machine too slow for the planned ones) seed 2's mask probe died for good
# (held-out patch F1 0.0 from step 15) and left seeds 0, 1, 3, 5 weaker, where an 18-step ramp kept all of seeds
# 0-5 alive, at 60 mask steps and at 180 (the 30-minute plan) (EPYC, 2026-11-28, benchmarks/bench_warmup_batch32.py).
MIN_BATCH32_RAMP_STEPS = 18
# A warm-up step costs this many times the mask-phase step that `_measure_warmup_step_seconds` times: the Q-Former
# phase's steps and the held-out scoring cost more. On the EPYC (2026-11-27) the timed step read 2.5 s and the
# 120 steps at batch 32 took 324 s (2.7 s each): 1.4 errs on the side of the budget.
WARMUP_STEP_FACTOR = 1.4
# Below this budget the language stage trains at batch 8, from it at 16. On the same warmed-up Nano (10-minute data,
# 120 warm-up steps; EPYC, 2026-11-27; 40 test records per task, greedy): 20 steps at batch 16 lost to the constant
# baselines on four tasks (caption CIDEr 61.7, dialogue 14.6), 40 steps at batch 8 — the same 320 samples, in 1.2x
# the time — beat all six (caption 131.2 against 125.4, dialogue 588.9 against 575.3). Early on, updates count
# more than samples. The longer budgets' numbers in the README were measured at batch 16.
SMALL_BATCH_BELOW_MINUTES = 30.0
# The evaluation and what follows it, in the language stage's steps (EPYC, 2026-11-27, batch 8 as 2 x 4, 4.1-4.9 s
# a step): evaluating 40 records of each task took 66-90 s (16-21 steps; a model that answers more than constants
# writes longer answers), the answers about a pair, the model card, the copy and the interpreter's start and exit,
# which the demo's clock does not see, ~15 s. At 0.5 and 6 the run ended at 9.2 min with the evaluation at 66 s.
# A model whose localization answers list cells took 96 s (and the answers ~25 s) at ~4.6 s a step: 0.45 ended that
# run at 10.2 min; 0.55 would have kept it inside with the deadline following the run's own step time.
# A curve probe (16 records of three tasks, ~14 s) runs inside the stage's time.
EVAL_STEPS_PER_RECORD = 0.55
FINAL_STEPS = 5.0
# ... measured in steps of this batch: a step of 16 takes about twice as long and the evaluation no longer, so the
# reserve in steps halves. Unscaled, the 60-minute demo on the EPYC (2026-11-28, batch 16, ~7.5 s a step) kept
# 115 steps (~14 min) for an evaluation of 200 records a task that took 5.9 min.
RESERVE_BATCH = 8
# Where the budget leaves more than TRAIN_SHARE allows, the stage may still grow up to the budget's end less this
# many times the reserve for what follows it: that run ended its language stage at 46 of 60 minutes (the share's
# cap) and finished at 47.6.
RESERVE_MARGIN = 1.2
PROBE_STEPS = 3.0
# With a deadline the Trainer may run up to this many times the estimated steps: the clock ends the run. The estimate
# times two random batches, whose task mix sets their length: on the EPYC (2026-11-28, four runs) it read 3.8, 4.9,
# 5.7 and 6.9 s where the runs then took ~4.3-5.1 s a step. At 1.5 the last run (23 steps estimated) stopped at its
# bound of 35 with 1.6 minutes of the budget unused; the bound only has to stay out of the clock's way.
DEADLINE_STEP_ROOM = 2.5
# A step's samples go through in this many micro-batches, sorted by length (gradient accumulation): 3.6 s against
# 4.35 for one padded batch of 8 (forward and backward, EPYC, 2026-11-27).
MICRO_BATCHES = 2
# the evaluation's generation batch (one batch a task at the default 40 records; 94 s against 127 s at 16 on the EPYC)
EVAL_BATCH_SIZE = 40
# projection alignment after the warm-up (train.projection_alignment): examples and steps, ~15 s on the EPYC
ALIGNMENT_EXAMPLES = 512
ALIGNMENT_STEPS = 300


def _position_table(value: str) -> str:
    """argparse type of --position-table: the names `build_nano.set_position_table` knows."""
    from modeling_deltavlm.build_nano import parse_position_table

    try:
        parse_position_table(value)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return value


def _patch_grid(model) -> int:
    """Patches a side of the model's ViT."""
    vision = model.config.vision_config
    return vision.image_size // vision.patch_size


def _image_size(value: str) -> int:
    """argparse type of --image-size: a positive multiple of Nano's 16 px patch."""
    from modeling_deltavlm.build_nano import check_image_size

    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {value!r}") from None
    try:
        check_image_size(size)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deltavlm demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="deltavlm-demo", help="working folder (data, checkpoints, results)")
    parser.add_argument("--budget-minutes", "--budget", type=float, default=10.0,
                        help="total wall time to aim for, in minutes")
    parser.add_argument("--pairs", type=int, default=None, help="synthetic pairs to generate (default: from the budget)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variation", choices=["light", "heavy"], default="light", help="irrelevant variation in B")
    parser.add_argument("--no-difference-module", action="store_true", help="train Nano with CSRM switched off")
    parser.add_argument("--position-table", type=_position_table, default="normal",
                        help="how the ViT's position table starts: normal (N(0, 0.02), the default), sincos (2-D sines "
                             "and cosines) or sincos:SCALE; measured in benchmarks/bench_position_table.py")
    parser.add_argument("--image-size", type=_image_size, default=NANO_IMAGE_SIZE,
                        help=f"the side Nano's ViT reads, a multiple of 16 (default {NANO_IMAGE_SIZE}); at 144 or 192 "
                             "its patches split evenly into the 3x3 localization cells; measured in "
                             "benchmarks/bench_patch_grid.py")
    parser.add_argument("--frozen-llm", action="store_true",
                        help="no LoRA adapters on the language model (the paper's set-up; learns far slower at this size)")
    parser.add_argument("--no-projection-alignment", action="store_true",
                        help="skip aligning the language projection with the answers' tokens after the warm-up")
    parser.add_argument("--before", help="a real before image to ask about at the end")
    parser.add_argument("--after", help="the matching after image")
    parser.add_argument("--eval-limit", type=int, default=None, help="test records per task (default: from the budget)")
    parser.add_argument("--train-steps", type=int, default=None,
                        help="instruction-tuning steps (default: what fits the budget, timed on this machine)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="vision warm-up steps (default: from the budget)")
    parser.add_argument("--focused-tail", type=float, default=None, metavar="SHARE",
                        help="share of the instruction-tuning steps that end the stage on localization and count "
                             f"answers only (default: {FOCUSED_TAIL_SHARE} from a {FOCUSED_TAIL_MIN_MINUTES:g}-minute "
                             "budget up, else 0)")
    parser.add_argument("--dialogue-image-swap", type=float, default=DIALOGUE_IMAGE_SWAP, metavar="SHARE",
                        help="share of the dialogues' closing rounds trained on another pair's images, so that the "
                             f"closing answer follows the conversation (default: {DIALOGUE_IMAGE_SWAP})")
    parser.add_argument("--save-to", default=None, help="where to save the model (default: $DELTAVLM_HOME or ~/.cache/deltavlm/nano)")
    parser.add_argument("--no-save", action="store_true", help="do not copy the model to the default location")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if (args.before is None) != (args.after is None):
        print("deltavlm demo: error: give both --before and --after, or neither", file=sys.stderr)
        return 2
    for path in (args.before, args.after):
        if path is not None and not Path(path).is_file():
            print(f"deltavlm demo: error: image not found: {path}", file=sys.stderr)
            return 2
    if args.focused_tail is not None and not 0 <= args.focused_tail < 1:
        print(f"deltavlm demo: error: --focused-tail must lie in [0, 1), got {args.focused_tail}", file=sys.stderr)
        return 2
    if not 0 <= args.dialogue_image_swap <= 1:
        print(f"deltavlm demo: error: --dialogue-image-swap must lie in [0, 1], got {args.dialogue_image_swap}",
              file=sys.stderr)
        return 2
    if args.budget_minutes <= 0:
        print("deltavlm demo: error: --budget-minutes must be positive", file=sys.stderr)
        return 2
    try:
        run_demo(args)
    except (OSError, SafetensorError) as error:  # a full disk, a folder it may not write: the work done is kept
        print(f"deltavlm demo: error: {error}\n(what was finished is kept in {args.out}: the same command resumes "
              f"from it)", file=sys.stderr)
        return 1
    return 0


def run_demo(args) -> dict:
    started = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.budget_minutes * 60
    say = _timer(started)

    # 1. data
    data_dir = out / "data"
    num_pairs = args.pairs or budget_pairs(args.budget_minutes)
    generation = None
    if not (data_dir / "metadata.json").is_file():
        say(f"generating {num_pairs} synthetic pairs ({args.variation} variation) in {data_dir}, in the background")
        generation = BackgroundGeneration(data_dir, num_pairs, seed=args.seed, variation=args.variation)
    else:
        say(f"reusing the synthetic data in {data_dir}")
    try:
        return _run_demo_stages(args, started, out, budget, say, data_dir, num_pairs, generation)
    finally:
        if generation is not None:
            generation.stop()


def _run_demo_stages(args, started, out, budget, say, data_dir, num_pairs, generation) -> dict:

    # registers the Auto classes: a rerun that reuses nano-init/ or model/ loads them without building Nano first
    import modeling_deltavlm  # noqa: F401

    # 2. Nano + vision warm-up
    init_dir = out / "nano-init"
    if not (init_dir / "config.json").is_file():
        from modeling_deltavlm.build_nano import build_nano
        from train.vision_warmup import FrozenVisionCache, cell_rule_patch_pixels, pair_facts, warm_up_vision

        say("building DeltaVLM-Nano (MiniLM Q-Former, SmolLM2-135M-Instruct from GGUF)")
        model, processor = build_nano(seed=args.seed, use_difference_module=not args.no_difference_module,
                                      position_table=args.position_table, image_size=args.image_size)
        if generation is not None:
            generation.wait()
            say(f"the synthetic data is ready in {data_dir}")
        # 12 steps a budget minute, half on the masks, half on the facts (size_warm_up: batch 16 on every machine
        # below 30 minutes; from 30 up batch 32, the steps cut to this machine's speed). Measured at the 10-minute
        # default on the Xeon: 18 a minute gave a better encoder (binary 90% vs 80%) but left the language stage 37
        # steps instead of 48, and the caption and dialogue answers stayed at the constant.
        warmup_steps, warmup_batch = args.warmup_steps or planned_warmup_steps(args.budget_minutes), 32
        if not args.warmup_steps:
            short = args.budget_minutes < SMALL_BATCH_BELOW_MINUTES
            step_seconds = None if short else _measure_warmup_step_seconds(model, processor.image_processor, data_dir)
            planned = warmup_steps
            warmup_steps, warmup_batch = size_warm_up(args.budget_minutes, warmup_steps, step_seconds)
            if step_seconds is not None and (warmup_steps, warmup_batch) != (planned, 32):
                say(f"a mask-phase step takes {step_seconds:.1f} s here: {warmup_steps} warm-up steps at batch "
                    f"{warmup_batch} fit {WARMUP_SHARE:.0%} of the budget")
        flag_weight = change_flag_weight(args.budget_minutes, warmup_batch)
        flag = " and each pair's yes/no" if flag_weight else ""
        say(f"vision warm-up: {warmup_steps} steps at batch {warmup_batch}, half on the change masks{flag} (learning "
            f"rate {vision_learning_rate(warmup_batch):g}), half on the pairs' facts ({qformer_learning_rate(warmup_batch):g})")
        facts = pair_facts(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
        # held-out probe scores in the log (val split): what the queries carry before the language stage
        validation_file = data_dir / "annotations" / "changechat_val.json"
        validation_facts = pair_facts(validation_file, data_dir / "images") if validation_file.is_file() else None
        vision_cache = FrozenVisionCache(model, processor.image_processor)
        history = warm_up_vision(model, processor.image_processor, data_dir, steps=warmup_steps, seed=args.seed,
                                 batch_size=warmup_batch,
                                 vision_learning_rate=vision_learning_rate(warmup_batch),
                                 learning_rate=qformer_learning_rate(warmup_batch),
                                 change_flag_weight=flag_weight,
                                 vision_ramp_steps=vision_ramp_steps(warmup_batch, warmup_steps // 2),
                                 log_every=max(1, warmup_steps // 4), log=say, processor=processor, facts=facts,
                                 validation_facts=validation_facts, validation_pairs=32, vision_cache=vision_cache,
                                 patch_target_pixels=cell_rule_patch_pixels(data_dir, _patch_grid(model)))
        if not args.no_projection_alignment:
            history.append({"phase": "projection", **_align_projection(model, processor, data_dir, vision_cache,
                                                                        args.seed, say)})
        (out / "warmup.json").write_text(json.dumps(history, indent=2))
        with staged_model_folder(init_dir) as staging:  # a rerun reuses nano-init/ only if it was written whole
            model.save_pretrained(staging)
            processor.save_pretrained(staging)
        del model
    else:
        say(f"reusing the warmed-up Nano in {init_dir}")
        if generation is not None:
            generation.wait()

    # 3. instruction tuning with the Trainer
    model_dir = out / "model"
    curve = []
    eval_limit = args.eval_limit or int(min(200, max(24, 4 * args.budget_minutes)))
    batch_size = train_batch_size(args.budget_minutes)
    probes = probes_per_run(args.budget_minutes)
    if not (model_dir / "config.json").is_file():
        deadline, latest, steps_after = None, None, 0.0
        if args.train_steps:
            max_steps = args.train_steps
            say(f"training {max_steps} steps at batch {batch_size}")
        else:
            step_seconds = _measure_step_seconds(init_dir, data_dir, lora=not args.frozen_llm, batch_size=batch_size,
                                                 seed=args.seed)
            elapsed = time.time() - started
            # what must still fit after the stage: the evaluation, the answers and the copy
            steps_after = steps_after_stage(eval_limit, batch_size)
            train_seconds, latest_seconds = stage_seconds(budget, elapsed, step_seconds * steps_after)
            # the stage ends on the clock (CosineToDeadline): the step count is an estimate, the curve probes
            # taken out of it
            deadline = time.time() + train_seconds
            latest = time.time() + latest_seconds  # how late the deadline may move if the steps run faster
            max_steps = max(20, int(train_seconds / step_seconds - PROBE_STEPS * probes))
            say(f"training ~{max_steps} steps at batch {batch_size} (~{step_seconds:.1f} s each) for "
                f"{train_seconds / 60:.1f} min: the learning rate follows the clock to zero")
        share = args.focused_tail
        if share is None:
            share = FOCUSED_TAIL_SHARE if args.budget_minutes >= FOCUSED_TAIL_MIN_MINUTES else 0.0
        tail_steps = min(int(round(share * max_steps)), max_steps - 1)  # the mixed run keeps at least one step
        curve = _instruction_tuning(out, init_dir, data_dir, model_dir, max_steps - tail_steps, tail_steps, args, say,
                                    batch_size=batch_size, probes=probes, deadline=deadline,
                                    tail_seconds=tail_steps * step_seconds if deadline else 0.0,
                                    budget_end=started + budget if deadline else None, steps_after=steps_after,
                                    latest=latest)
        (out / "curve.json").write_text(json.dumps(curve, indent=2))
    else:
        say(f"reusing the trained model in {model_dir}")
        if (out / "curve.json").is_file():
            curve = json.loads((out / "curve.json").read_text())

    # 4. evaluation next to trivial baselines
    say(f"evaluating six tasks on {eval_limit} held-out records each")
    from eval.run_eval import main as eval_main

    eval_dir = out / "eval"
    code = eval_main([
        "--model", str(model_dir), "--data", str(data_dir / "annotations"), "--image-root", str(data_dir / "images"),
        "--task", "all", "--limit", str(eval_limit),
        # The decoding is Nano's own, from its generation_config.json (build_nano): greedy, 96 new tokens, no
        # repetition penalty. The authors' 1.5 is for their 7B captions; a cell list repeats its tokens by design,
        # and at 1.5 Nano garbled them ('center-' and '/bottom'): on the 60-minute run's model, localization
        # micro-F1 went from 20.9 / 11.8 to 27.7 / 34.3 without it (roads / buildings, 200 test records).
        # The curve probe and the answers below decode the same way.
        "--no-meteor", "--batch-size", str(EVAL_BATCH_SIZE), "--out", str(eval_dir),
    ])
    if code:
        raise RuntimeError(f"evaluation failed with exit code {code}")
    metrics = json.loads((eval_dir / "metrics.json").read_text())["tasks"]
    baselines = baseline_scores(data_dir, eval_limit)
    table = summary_table(metrics, baselines)
    elapsed_minutes = (time.time() - started) / 60
    report = f"# DeltaVLM-Nano demo\n\n{table}\n\nwall time so far: {elapsed_minutes:.1f} min (budget {args.budget_minutes} min)\n"
    (out / "results.md").write_text(report)
    print("\n" + table + "\n")

    # the saved model says what it is (the generic card would name the GGUF's local path as its base model)
    sizes = json.loads((data_dir / "metadata.json").read_text()).get("split_sizes", {})
    (model_dir / "README.md").write_text(nano_model_card(model_dir, table, args, sum(sizes.values()) or num_pairs))

    # curve plot: the probe points, then the final evaluation at the end of training
    end_of_training = curve[-1] if curve else {"minutes": 0.0}
    curve_points = curve[:-1] + [{**end_of_training, **headline_point(metrics)}]
    plot_curve(curve_points, out / "curve.png")
    say(f"wrote {out / 'results.md'} and {out / 'curve.png'}")

    # 5. questions about pairs
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_deltavlm  # noqa: F401

    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    processor = AutoProcessor.from_pretrained(model_dir)
    held_out = load_records(data_dir / "annotations" / TASK_FILES["caption"], data_dir / "images")[0]
    pairs = [("held-out synthetic pair " + held_out["id"], (held_out["image_before"], held_out["image_after"]))]
    if args.before:
        pairs.append((f"your pair {args.before} -> {args.after}", (args.before, args.after)))
    answers = {}
    for name, pair in pairs:
        print(f"\n{name}")
        answers[name] = ask_all_tasks(model, processor, pair)
        for task, answer in answers[name].items():
            print(f"  {task:>12}: {answer}")
    (out / "answers.json").write_text(json.dumps(answers, indent=2))

    # 6. the default model location
    if not args.no_save:
        target = Path(args.save_to) if args.save_to else _default_home()
        if target.resolve() != model_dir.resolve():
            if target.exists():  # an older Nano: none of its files may mix with this one's
                shutil.rmtree(target)
            with staged_model_folder(target) as staging:  # `deltavlm predict` takes it only once it is whole
                shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        say(f"saved DeltaVLM-Nano to {target}: `deltavlm predict --before A --after B` uses it by default")
    return {"metrics": metrics, "baselines": baselines, "curve": curve_points, "answers": answers}


class BackgroundGeneration:
    """`write_dataset` in a child process, so that the data is generated while Nano is built.

    Generating is numpy and PIL on one core; building Nano is mostly Python parsing the GGUF file (~40 s on 2
    cores). Side by side they take about as long as the build alone (EPYC, 2026-11-27: 900 pairs in 30 s, the build
    42 s). A fresh "spawn" process: forking a process that has started torch's thread pool is unsafe."""

    def __init__(self, data_dir: Path, num_pairs: int, seed: int, variation: str):
        import multiprocessing

        from train.synthetic import write_dataset

        self.data_dir = data_dir
        # overwrite: the demo starts a generation only when data/ has no metadata.json, so what is there is an
        # unfinished earlier generation of its own, which the generator would otherwise refuse to write over.
        self.process = multiprocessing.get_context("spawn").Process(
            target=write_dataset, args=(data_dir, num_pairs),
            kwargs={"seed": seed, "variation": variation, "overwrite": True},
            name="deltavlm-synth", daemon=True)
        self.process.start()

    def wait(self) -> None:
        """Block until the data is written; raises if the generator failed (its traceback is on stderr)."""
        self.process.join()
        if self.process.exitcode != 0 or not (self.data_dir / "metadata.json").is_file():
            raise RuntimeError(f"generating the synthetic data in {self.data_dir} failed (exit code "
                               f"{self.process.exitcode}); run `deltavlm synth --out {self.data_dir}` to see why")

    def stop(self) -> None:
        """End the generator if it is still running (the demo failed before it needed the data)."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()


# --- training helpers ---


# Half of the dialogues' closing rounds train on another dialogue's images (train.data.swap_closing_round_images), so
# the closing description follows the conversation ("No" / "Yes, 2 buildings") rather than a misread of the images.
# Without it the 10-minute model's closing answer contradicted the conversation's change flag in 0-5 of 40 test
# dialogues (a changed pair called unchanged, or an unchanged pair described as changed: each costs up to 25
# final-turn CIDEr points). From the same warm-ups and step counts (seeds 1, 2, 4, 0; EPYC, 2026-11-28;
# benchmarks/results/demo_dialogue_image_swap_*.md): contradictions 4, 4, 4, 0 -> 0 in every run, dialogue
# +28.3, +42.7, +5.5, +3.7, binary +2.5 in three runs; caption -4.1, -2.1, +2.6, 0.0 and open QA -1.1, -7.2, +44.5,
# 0.0, both still far above their baselines. Over seeds 0-7 on the clock (benchmarks/results/demo_default_seeds.md):
# 4 contradictions in 320 dialogues against 20 before, captions lower in 5 of 8 (all above their baselines).
# A quarter kept more of the captions (+5.2, +14.7, 0, 0 against 0.5, same A/B) but let 8 contradictions of 160
# through and left seed 2's dialogue 1.7 above its baseline; the dialogue is the task with no margin to spare.
DIALOGUE_IMAGE_SWAP = 0.5

# The focused tail. After the mixed stage the answers to localization questions come from a few constant cell lists
# (the 60-minute demo's 508-step Nano: 11 and 15 distinct answers over 200 test pairs, micro-F1 26.0 / 39.4 on its
# own *training* records: underfitting). 120 further LoRA steps on localization and count answers only, fresh
# adapters on the merged model, lifted held-out localization from 30.4 to 39.9 (mean of roads and buildings) and left
# binary, caption, open QA and dialogue where they were (2 cores, 2026-11-27, docs/nano_experiments.md). Inside a
# fixed budget the tail takes its steps from the mix, so there it is a trade: the 60-minute demo with it (240 + 80
# steps) gave localization 37.7 against 31.0 without (305 mixed steps, a day earlier), caption CIDEr 127 against
# 137, dialogue 523 against 534.
# Short budgets keep every step on the mix: at 10 minutes the stage has ~60 steps and the captions are still forming.
FOCUSED_TAIL_SHARE = 0.25
FOCUSED_TAIL_MIN_MINUTES = 30.0
FOCUSED_TAIL_WEIGHTS = {"localization": 1.0, "count": 1.0, "caption": 0.0, "binary": 0.0, "open": 0.0, "dialogue": 0.0}
# Without a tail (short budgets), the mixed run samples localization twice as often as the file holds it. The data
# asks it once a pair while the binary and count questions come back in the dialogues' rounds (12% of the samples
# against 37% dialogue rounds), and ~50 steps at batch 8 then answered every localization question with empty lists:
# teacher-forced, the token that opens a building list got 4% on unchanged pairs and 15-46% on changed ones, against
# 42% of the training answers. From one warm-up on the EPYC (2026-11-27, 50 steps, 40 test records): localization
# tied the empty baseline in all 5 runs at the file's mix and beat it in all 6 at twice the share (10.9-30.5
# micro-F1); which other task fell to its baseline in a given run varied (docs/nano_experiments.md).
# Captions twice too: in the stratified order (sample_order) the caption learns its prior evenly, and greedy decoding
# then writes a change caption only where the model puts ~65% on "changed" (change captions split their first word;
# "there is no difference" holds its half alone). From the same warm-up, 45 steps at seed 2 answered "there is no
# difference" to every caption (CIDEr 125.41, the baseline's) at the file's caption share and beat every baseline
# at twice it (caption 142.11); at seed 0 both shares beat every baseline.
UNTAILED_TASK_WEIGHTS = {"localization": 2.0, "caption": 2.0}


def train_batch_size(budget_minutes: float) -> int:
    """The language stage's batch: 8 below SMALL_BATCH_BELOW_MINUTES (more updates in a short run), else 16."""
    return 8 if budget_minutes < SMALL_BATCH_BELOW_MINUTES else 16


def steps_after_stage(eval_limit: int, batch_size: int) -> float:
    """The language stage's steps (at `batch_size`) that the evaluation of `eval_limit` records a task and the demo's
    last work take."""
    return (EVAL_STEPS_PER_RECORD * eval_limit + FINAL_STEPS) * RESERVE_BATCH / batch_size


def stage_seconds(budget: float, elapsed: float, after: float) -> tuple[float, float]:
    """(planned, latest) seconds of the language stage from now, for a `budget` with `elapsed` seconds spent and
    `after` seconds needed after the stage. The plan keeps TRAIN_SHARE of the budget for the stages; the deadline
    may move later, while the run's own steps say the evaluation still fits, up to the larger of that share and
    the budget less RESERVE_MARGIN times `after`."""
    share = TRAIN_SHARE * budget - elapsed * 0.5
    planned = max(60.0, min(share, budget - elapsed - after))
    return planned, max(planned, share, budget - elapsed - RESERVE_MARGIN * after)


def budget_pairs(budget_minutes: float) -> int:
    """Synthetic pairs the demo generates for a budget: 90 a minute, between 400 and 20 000."""
    return int(min(20000, max(400, 90 * budget_minutes)))


def planned_warmup_steps(budget_minutes: float) -> int:
    """The vision warm-up's planned steps (half on the masks, half on the facts): 12 a minute, between 60 and 800;
    `size_warm_up` may cut them or halve the batch."""
    return int(min(800, max(60, 12 * budget_minutes)))


def size_warm_up(budget_minutes: float, steps: int, step_seconds: float | None) -> tuple[int, int]:
    """(steps, batch) of the vision warm-up, given its planned steps and the measured seconds of one mask-phase step
    at batch 32 (not needed, and None, below SMALL_BATCH_BELOW_MINUTES).

    A short budget (below SMALL_BATCH_BELOW_MINUTES) keeps its steps at batch 16 on every machine: the mask phase
    needs its ~60 steps (with 25 its held-out patch F1 was 0.0), and batch 16 at 1e-3 is the one set-up measured
    on many seeds. Until 2026-11-28 a machine fast enough for batch 32 got it, at 3e-3: on such an hour (EPYC,
    10-minute default) 2 of the 5 batch-32 warm-ups lost their mask probe for good (held-out patch F1 0.0 from step
    30; seed 2 without the pair's yes/no, seed 4 with it) and their demos answered every binary question alike,
    where none of the batch-16 warm-ups measured since 2026-11-27 (more than 20) did (the cause, measured since: the
    6-step ramp to 3e-3, now at least MIN_BATCH32_RAMP_STEPS). A longer budget keeps batch 32 and its steps where
    they fit WARMUP_SHARE of the budget, else cuts the steps (not below MIN_WARMUP_STEPS)."""
    if budget_minutes < SMALL_BATCH_BELOW_MINUTES:
        return steps, 16
    per_step = WARMUP_STEP_FACTOR * step_seconds
    if steps * per_step <= WARMUP_SHARE * budget_minutes * 60:
        return steps, 32
    return max(MIN_WARMUP_STEPS, min(steps, int(WARMUP_SHARE * budget_minutes * 60 / per_step))), 32


def vision_ramp_steps(batch_size: int, mask_steps: int) -> int:
    """Steps of the mask phase's linear ramp to its rate: a tenth of its steps, and at batch 32 (3e-3) never fewer
    than MIN_BATCH32_RAMP_STEPS."""
    ramp = max(1, mask_steps // 10)
    return max(ramp, MIN_BATCH32_RAMP_STEPS) if batch_size >= 32 else ramp


def vision_learning_rate(batch_size: int) -> float:
    """The mask phase's learning rate at the warm-up's `batch_size`: VISION_LEARNING_RATE at 32 and above,
    SMALL_BATCH_VISION_LEARNING_RATE below."""
    return VISION_LEARNING_RATE if batch_size >= 32 else SMALL_BATCH_VISION_LEARNING_RATE


def qformer_learning_rate(batch_size: int) -> float:
    """The Q-Former phase's learning rate at the warm-up's `batch_size`: QFORMER_LEARNING_RATE at 32 and above,
    SMALL_BATCH_QFORMER_LEARNING_RATE below."""
    return QFORMER_LEARNING_RATE if batch_size >= 32 else SMALL_BATCH_QFORMER_LEARNING_RATE


def change_flag_weight(budget_minutes: float, batch_size: int) -> float:
    """The mask phase's weight on each pair's yes/no (`pair_change_loss`): SHORT_BUDGET_CHANGE_FLAG_WEIGHT for a
    warm-up below SMALL_BATCH_BELOW_MINUTES at a batch below 32 (the small batch's rate, where it was measured),
    else 0."""
    short = budget_minutes < SMALL_BATCH_BELOW_MINUTES and batch_size < 32
    return SHORT_BUDGET_CHANGE_FLAG_WEIGHT if short else 0.0


def probes_per_run(budget_minutes: float) -> int:
    """Curve probes inside each Trainer run: one in a short run (each costs ~3 steps), three from 30 minutes."""
    return 1 if budget_minutes < SMALL_BATCH_BELOW_MINUTES else 3


def probe_every(steps: int, probes: int) -> int:
    """Steps between curve probes so that `probes` of them fall inside a run of `steps` (none at its last step)."""
    if probes >= 3:
        return max(1, steps // 3)  # the longer budgets' curves in the README were probed this way
    return max(1, -(-steps // (probes + 1)))


def _instruction_tuning(out: Path, init_dir: Path, data_dir: Path, model_dir: Path, mixed_steps: int,
                        tail_steps: int, args, say, batch_size: int = 16, probes: int = 3,
                        deadline: float | None = None, tail_seconds: float = 0.0, budget_end: float | None = None,
                        steps_after: float = 0.0, latest: float | None = None) -> list[dict]:
    """The Trainer runs of the language stage; returns the curve points (minutes and steps count on across runs).

    `mixed_steps` on the training file's task mix (localization weighted by UNTAILED_TASK_WEIGHTS when there is no
    tail), then (if `tail_steps`) a second run from the merged result on
    localization and count answers only (FOCUSED_TAIL_WEIGHTS) with fresh adapters. The mixed model is kept in
    `out/model-mixed` so that an interrupted tail reruns alone. With `deadline`, the tail stops there and the mixed
    run `tail_seconds` before it. With `budget_end`, each run's deadline also keeps `steps_after` steps (the tail's
    steps too, for the mixed run before one) before it at the run's own step time, never past `latest` (less the
    tail's time for the mixed run; CosineToDeadline).
    """
    from transformers import AutoProcessor

    from train.run_train import main as train_main

    processor = AutoProcessor.from_pretrained(init_dir)
    runs = [("train", init_dir, out / "model-mixed" if tail_steps else model_dir, mixed_steps,
             None if tail_steps else UNTAILED_TASK_WEIGHTS, deadline - tail_seconds if deadline else None,
             steps_after + tail_steps, latest - tail_seconds if latest else None)]
    if tail_steps:
        say(f"the last {tail_steps} steps: localization and count answers only (a focused tail)")
        runs.append(("train-tail", out / "model-mixed", model_dir, tail_steps, FOCUSED_TAIL_WEIGHTS, deadline,
                     steps_after, latest))
    curve, minutes_before, steps_before = [], 0.0, 0
    for name, source, target, steps, weights, run_deadline, run_steps_after, run_latest in runs:
        if name == "train-tail" and run_deadline is not None:
            run_deadline = tail_deadline(run_deadline, tail_seconds, run_latest)
        if (target / "config.json").is_file():
            say(f"reusing {target}")
            if (out / f"curve-{name}.json").is_file():
                points = json.loads((out / f"curve-{name}.json").read_text())
                curve += points
                minutes_before, steps_before = points[-1]["minutes"], points[-1]["step"]
            continue
        # with a deadline the clock ends the run (CosineToDeadline) and `steps` is the estimate: the Trainer gets
        # room for a machine faster than timed
        bound = steps if run_deadline is None else math.ceil(DEADLINE_STEP_ROOM * steps)
        config_path = _write_train_config(out, source, data_dir, target, bound, args.seed, lora=not args.frozen_llm,
                                          task_weights=weights, name=name, batch_size=batch_size,
                                          dialogue_image_swap=args.dialogue_image_swap)
        # a run followed by another scores its own end: the curve then shows what the tail changed
        probe = CurveCallback(data_dir, processor, every=probe_every(steps, probes), seed=args.seed,
                              minutes_before=minutes_before, steps_before=steps_before,
                              score_at_end=target != model_dir, until=steps)
        callbacks = [probe] + ([CosineToDeadline(run_deadline, say, budget_end, run_steps_after, run_latest)]
                               if run_deadline else [])
        code = train_main(["--config", str(config_path)], callbacks=callbacks)
        if code:
            raise RuntimeError(f"training failed with exit code {code}")
        (out / f"curve-{name}.json").write_text(json.dumps(probe.points, indent=2))
        curve += probe.points
        minutes_before, steps_before = probe.points[-1]["minutes"], probe.points[-1]["step"]
    return curve


def nano_model_card(model_dir: Path, results_table: str, args, num_pairs: int) -> str:
    from transformers import AutoConfig

    from modeling_deltavlm.modeling_deltavlm import default_model_card

    lora = "no adapters (frozen)" if args.frozen_llm else "LoRA adapters (r 16, every linear layer) merged into it"
    description = f"""

**DeltaVLM-Nano**: a demonstration model made by `deltavlm demo` on {num_pairs} synthetic bi-temporal pairs
({args.variation} irrelevant variation, seed {args.seed}). It is **not** the paper's checkpoint and has never seen
real imagery. Parts: an EVA-style ViT trained from scratch, the difference module (CSRM,
{"off" if args.no_difference_module else "on"}), a Q-Former initialised from all-MiniLM-L6-v2, and
SmolLM2-135M-Instruct with {lora}.

Held-out synthetic test split, greedy decoding without repetition penalty, next to trivial baselines:

{results_table}

Its `generation_config.json` holds that decoding (greedy, at most {NANO_MAX_NEW_TOKENS} new tokens, no repetition
penalty: the paper's penalty of 1.5 garbles Nano's cell lists), so `model.generate(**inputs)` and `deltavlm predict`
/ `eval` / `chat` / `serve` use it unless told otherwise.
"""
    config = AutoConfig.from_pretrained(model_dir)
    return default_model_card(
        config,
        base_models=["HuggingFaceTB/SmolLM2-135M-Instruct", "sentence-transformers/all-MiniLM-L6-v2"],
        description=description,
        datasets=[],
    )


def _timer(started: float):
    def say(message: str) -> None:
        print(f"[{(time.time() - started) / 60:5.1f} min] {message}", flush=True)

    return say


def _default_home() -> Path:
    home = os.environ.get("DELTAVLM_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "deltavlm" / "nano"


# The instruction-tuning stage after the warm-up. Measured on one warmed-up Nano, batches of 16 from the same data:
# - LoRA on every linear layer of the language model's blocks (pretrained weights frozen, adapters merged at
#   export): training loss 0.5-0.9 after 30 steps, against 2.1-2.6 with the soft prompt alone, which after 30
#   steps still answered every count question with "The roads have changed, and the buildings have not.";
# - the encoder side (ViT, CSRM, Q-Former, queries) frozen: trained on at 3e-4 with the language loss, its
#   queries lost what the warm-up taught them (the changed-vs-unchanged difference of the projected queries fell
#   from 2.3 to 0.6 per query in 52 steps) and the answers became constants; frozen, with the projection and
#   adapters at 1e-3, binary accuracy on 32 validation pairs was 1.00 after 40 steps.
NANO_LORA = {
    "lora": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}
NANO_LEARNING_RATE = 1e-3


def _align_projection(model, processor, data_dir: Path, vision_cache, seed: int, say) -> dict:
    """The language projection, aligned with the training answers' tokens (train.projection_alignment) on
    ALIGNMENT_EXAMPLES single-round samples rendered as the language stage renders them."""
    from processing.changechat_data import load_records
    from train.data import records_to_samples
    from train.projection_alignment import align_projection, alignment_examples

    records = load_records(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
    examples = alignment_examples(records_to_samples(records, captions_per_pair="first"), ALIGNMENT_EXAMPLES, seed)
    return align_projection(model, processor, examples, steps=ALIGNMENT_STEPS, seed=seed,
                            vision_cache=vision_cache, log=say)


def _write_train_config(out: Path, init_dir: Path, data_dir: Path, model_dir: Path, max_steps: int, seed: int,
                        lora: bool = True, task_weights: dict | None = None, name: str = "train",
                        batch_size: int = 16, dialogue_image_swap: float = 0.0) -> Path:
    if batch_size % MICRO_BATCHES:
        raise ValueError(f"the demo's batch size must be a multiple of {MICRO_BATCHES} (its micro-batches), "
                         f"got {batch_size}")
    config = {
        "model": {"model_name_or_path": str(init_dir), "encoder_learning_rate": 0.0, **(NANO_LORA if lora else {})},
        "data": {
            "train_files": [str(data_dir / "annotations" / "changechat_train.json")],
            "image_root": str(data_dir / "images"),
            "val_split": None,
            "levircc_train_split": None,
            # one caption sample per pair: with all five, captions would be ~45% of a short run's samples
            "captions_per_pair": "first",
            "task_weights": task_weights,
            "dialogue_image_swap": dialogue_image_swap,
            "length_window_steps": 1,
            # every stretch of steps sees the tasks and their answers in the data's proportions (train.sample_order):
            # from one warm-up (EPYC, 2026-11-27), 45 steps of the random order at seed 0 drew 17 change captions
            # and 2 "no change" between steps 10 and 35 and answered a change caption to every test pair (caption
            # CIDEr 18.8, also at 50 steps; 55 beat it); the stratified order at 45 steps beat all six baselines
            "sample_order": "stratified",
        },
        "export": {"export_dir": str(model_dir), "export_dtype": "float32"},
        "training": {
            "output_dir": str(out / name),
            "seed": seed,
            "max_steps": max_steps,
            # each step a random mix of the tasks, its samples sorted by length into two micro-batches (less
            # padding); windows of several steps made each step nearly one task (see train.trainer, item 5)
            "per_device_train_batch_size": batch_size // MICRO_BATCHES,
            "gradient_accumulation_steps": MICRO_BATCHES,
            "train_sampling_strategy": "group_by_length",
            # higher than the paper's 1e-5: the projection starts from scratch, and LoRA adapters take large rates
            "learning_rate": NANO_LEARNING_RATE,
            "weight_decay": 0.05,
            "lr_scheduler_type": "cosine",
            "warmup_steps": 0.05,  # a float below 1 is a fraction of max_steps
            "max_grad_norm": 1.0,
            "logging_steps": max(1, max_steps // 20),
            "save_strategy": "no",
            "eval_strategy": "no",
            "dataloader_num_workers": 0,
            "report_to": "none",
            "disable_tqdm": False,
        },
    }
    path = out / ("train_config.yaml" if name == "train" else f"{name}_config.yaml")
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _measure_warmup_step_seconds(model, image_processor, data_dir: Path, batch_size: int = 32) -> float:
    """Seconds per mask-phase step of the vision warm-up on this machine: both images of `batch_size` pairs through
    the ViT and the difference module, forward and backward, timed once after one untimed call. The gradients are
    dropped and the random state restored, so the warm-up that follows is the one it would have been."""
    from train.vision_warmup import change_pairs

    pairs = change_pairs(data_dir)[:batch_size]  # raises, naming the folder, where there are none
    timings = []
    with torch.random.fork_rng():
        for _ in range(2):
            begin = time.time()
            pixel_values = image_processor([(before, after) for before, after, _ in pairs])["pixel_values"]
            model.get_pair_embeds(pixel_values).pair_embeds.square().mean().backward()
            timings.append(time.time() - begin)
    model.zero_grad(set_to_none=True)
    return timings[-1]


def _measure_step_seconds(model_dir: Path, data_dir: Path, lora: bool = True, batch_size: int = 16,
                          seed: int = 0) -> float:
    """Seconds per training step at `batch_size` on this machine: three steps of random training samples (the
    first untimed), each as training runs it: the collator reads and encodes the samples (`TrainCollator`), sorted
    by length into MICRO_BATCHES micro-batches, forward and backward. The mean of the two timed steps, plus 15%
    for the optimizer step and the Trainer's own work (EPYC: 3.8 s timed, 4.4 s a step in the run)."""
    import random

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_deltavlm  # noqa: F401

    from train.args import ModelArguments
    from train.collator import TrainCollator
    from train.data import records_to_samples
    from train.model import apply_lora, freeze_encoder

    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    model.set_trainable_as_paper()
    if lora:
        model = apply_lora(model, ModelArguments(**NANO_LORA))
    freeze_encoder(model)  # as the demo's training stage runs: encoder_learning_rate 0
    model.train()
    # random samples of the training mix, dialogue rounds with their history: the lengths differ a lot between
    # tasks. The first 8 records' first rounds (what this timed before) read 3.7 s a step where the run took 4.4.
    records = load_records(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
    samples = records_to_samples(records, captions_per_pair="first")
    collate = TrainCollator(processor)
    draw = random.Random(seed)
    size = max(1, batch_size // MICRO_BATCHES)
    timings = []
    for _ in range(3):
        batch = sorted((samples[i] for i in draw.sample(range(len(samples)), min(batch_size, len(samples)))),
                       key=lambda sample: sample["length"], reverse=True)
        begin = time.time()
        for start in range(0, len(batch), size):
            model(**collate(batch[start : start + size])).loss.backward()
        timings.append(time.time() - begin)
    del model
    return 1.15 * sum(timings[1:]) / len(timings[1:])


# --- asking ---


def ask_all_tasks(model, processor, pair) -> dict:
    prompts = {
        "caption": TASK_PROMPTS["caption"],
        "binary": TASK_PROMPTS["binary"],
        "count": TASK_PROMPTS["count"],
        "localization": TASK_PROMPTS["localization"],
    }
    rendered = [processor.apply_chat_template([{"role": "user", "content": p}]) for p in prompts.values()]
    inputs = processor(images=[pair] * len(rendered), text=rendered)
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=NANO_MAX_NEW_TOKENS, do_sample=False)
    answers = processor.batch_decode(output, prompt_length=inputs["input_ids"].shape[1])
    return dict(zip(prompts, answers))


if __name__ == "__main__":
    sys.exit(main())
