"""Can the language stage learn to read one grid cell from the soft prompt? Short tails on one-cell questions.

    python benchmarks/bench_reader_tail.py --model DIR --data DIR [--variants plain sink scale:0.27 rank:64 layers:4]
        [--steps 72] [--questions 4] [--learning-rate 1e-3] [--limit 120] [--seed 5] [--name reader_tail]
        [--out DIR] [--threads 2]

`--model` is a trained Nano (a demo's `model-mixed/` or `model/`), `--data` its synthetic data set. Each variant
trains a tail from it with the demo's tail config (LoRA on the merged model, batch 16, `--steps` steps) on
localization samples only, with `--questions` one-cell questions a category per sample added
(`data.localization_cell_questions`: "has any building changed in the top-left cell of the 3x3 grid?"), then
answers balanced one-cell questions about the test pairs (`bench_localization_reading.cell_question_records`;
0.5 is chance) and, as a control, one question about each unchanged test pair (all "no": a tail that reads whether
a pair changed gets them right without reading cells). A reader that learns the cells moves that accuracy; the probes of
`bench_localization_reading.py` say whether the soft prompt carries them at all. Variants:

- `plain`: the model as it is;
- `sink`: one `<|im_start|>` token before the soft prompt, in training and in the answers (the soft prompt
  otherwise starts the sequence, where a language model keeps its attention sink);
- `scale:F`: the language projection's weight and bias multiplied by F before the tail (the soft prompt's norm
  against the token embeddings'; `bench_localization_reading.py` reports both);
- `rank:R`: LoRA adapters of rank R (alpha 2R) instead of the demo's 16;
- `layers:N`: the language model's first N decoder layers trained whole besides the adapters (the layers that
  first read the soft prompt).

Measured on the 30-minute sine-cosine model (docs/nano_experiments.md, "Where, not whether").
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_localization_reading import (  # noqa: E402
    answer,
    cell_question_record,
    cell_question_records,
    cell_question_statistics,
)

LOCALIZATION_ONLY = {"localization": 1.0, "count": 0.0, "caption": 0.0, "binary": 0.0, "open": 0.0, "dialogue": 0.0}


VARIANT_FORMS = "plain, sink, scale:F (F > 0), rank:R or layers:N (whole numbers >= 1)"


def parse_variant(text: str) -> tuple[str, float]:
    """'plain', 'sink', 'scale:F', 'rank:R' or 'layers:N' -> (kind, value)."""
    if text in ("plain", "sink"):
        return text, 1.0
    kind, _, value = text.partition(":")
    try:
        number = float(value)
    except ValueError:
        number = 0.0
    if kind == "scale" and number > 0:
        return kind, number
    if kind in ("rank", "layers") and number >= 1 and number.is_integer():
        return kind, number
    raise argparse.ArgumentTypeError(f"variant {text!r}: expected {VARIANT_FORMS}")


def variant_name(kind: str, value: float) -> str:
    return kind if kind in ("plain", "sink") else f"{kind}:{value:g}"


@contextlib.contextmanager
def whole_first_layers(count: int):
    """While active, `deltavlm train` trains the language model's first `count` decoder layers whole (their base
    weights as well as their LoRA adapters): the layers that first read the soft prompt, free to re-represent it."""
    report = {"tensors": 0, "parameters": 0}  # what was freed, filled in when the model is built
    if not count:
        yield report
        return
    import train.run_train as run_train

    original = run_train.apply_lora
    prefixes = tuple(f"language_model.model.layers.{index}." for index in range(count))

    def apply_lora_and_free_layers(model, model_args):
        peft_model = original(model, model_args)
        for name, param in peft_model.named_parameters():
            bare = name.replace("base_model.model.", "", 1)
            if bare.startswith(prefixes) and not param.requires_grad:
                param.requires_grad_(True)
                report["tensors"] += 1
                report["parameters"] += param.numel()
        if not report["tensors"]:
            raise ValueError(f"layers:{count}: no language-model layer parameter matched {prefixes[0]}...")
        return peft_model

    run_train.apply_lora = apply_lora_and_free_layers
    try:
        yield report
    finally:
        run_train.apply_lora = original


@contextlib.contextmanager
def sink_before_soft_prompt(enabled: bool):
    """While active, the processor puts one `<|im_start|>` token before the image placeholders (label -100)."""
    if not enabled:
        yield
        return
    from processing.processing_deltavlm import DeltaVLMProcessor

    original = DeltaVLMProcessor._with_image_tokens

    def with_sink_first(self, input_ids, attention_mask, labels=None):
        result = original(self, input_ids, attention_mask, labels)
        sink = self.tokenizer.convert_tokens_to_ids("<|im_start|>")
        if sink is None or sink == self.tokenizer.unk_token_id:
            raise ValueError("the sink variant needs a tokenizer with <|im_start|> (SmolLM2's, as in Nano)")
        column = torch.full((input_ids.shape[0], 1), sink, dtype=input_ids.dtype)
        result["input_ids"] = torch.cat([column, result["input_ids"]], dim=1)
        result["attention_mask"] = torch.cat([torch.ones_like(column), result["attention_mask"]], dim=1)
        if labels is not None:
            result["labels"] = torch.cat([torch.full_like(column, -100), result["labels"]], dim=1)
        return result

    DeltaVLMProcessor._with_image_tokens = with_sink_first
    try:
        yield
    finally:
        DeltaVLMProcessor._with_image_tokens = original


def scaled_copy(model_dir: Path, factor: float, target: Path) -> Path:
    """A copy of the model folder whose language projection is multiplied by `factor`."""
    import modeling_deltavlm  # noqa: F401  (Auto classes)
    from transformers import AutoModelForImageTextToText

    shutil.copytree(model_dir, target)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    with torch.no_grad():
        model.language_projection.weight.mul_(factor)
        model.language_projection.bias.mul_(factor)
    model.save_pretrained(target)
    return target


def unchanged_pair_records(annotations: Path, limit: int, seed: int = 0) -> list[dict]:
    """One-cell questions (category and cell drawn at random) about the unchanged pairs among the first `limit` test
    localization records, all answered "No": the control. A tail that reads whether a pair changed through these
    questions says "no" here, whether or not it reads which cell."""
    import random

    from eval.parsers import parse_localization
    from processing.conversation import GRID_CELLS

    rng = random.Random(seed)
    records = []
    for record in json.loads((annotations / "changechat_test_loc.json").read_text())[:limit]:
        cells = parse_localization(record["conversations"][1]["value"])
        if cells is not None and not any(cells.values()):
            noun = rng.choice(("road", "building"))
            records.append(cell_question_record(record, noun, rng.choice(GRID_CELLS), "No"))
    return records


def check_model_and_data(parser: argparse.ArgumentParser, args) -> Path:
    """`--data` must be a synthetic data set (training and test localization files), `--model` a model folder;
    refused through `parser` naming the option. Returns the data folder."""
    data = Path(args.data)
    for path in (data / "annotations" / "changechat_train.json", data / "annotations" / "changechat_test_loc.json"):
        if not path.is_file():
            parser.error(f"--data {data}: {path} not found (expected a synthetic data set: deltavlm synth --out DIR)")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")
    return data


def run_variant(variant: str, factor: float, args, scratch: Path, questions_dir: Path, limit: int,
                control_dir: Path | None = None, control_limit: int = 0) -> dict:
    from train.demo import _write_train_config
    from train.run_train import main as train_main

    data = Path(args.data)
    start = Path(args.model) if variant != "scale" else scaled_copy(Path(args.model), factor, scratch / "scaled")
    model_out = scratch / "model"
    config = _write_train_config(scratch, start, data, model_out, max_steps=args.steps, seed=args.seed,
                                 task_weights=LOCALIZATION_ONLY, name="tail")
    options = ["--localization_cell_questions", str(args.questions), "--learning_rate", str(args.learning_rate)]
    if variant == "rank":  # alpha at twice the rank, as the demo's 16 / 32
        options += ["--lora_r", str(int(factor)), "--lora_alpha", str(2 * int(factor))]
    with sink_before_soft_prompt(variant == "sink"), \
            whole_first_layers(int(factor) if variant == "layers" else 0) as freed:
        code = train_main(["--config", str(config), *options])
        if code:
            raise RuntimeError(f"variant {variant}: training failed (exit code {code})")
        lines = answer(str(model_out), questions_dir, data / "images", "test", limit, scratch / "answers", task="binary")
        result = cell_question_statistics(lines)
        if control_dir is not None:
            control = answer(str(model_out), control_dir, data / "images", "test", control_limit, scratch / "control",
                             task="binary")
            result["unchanged_pairs"] = cell_question_statistics(control)
    if variant == "layers":
        result["trained_whole"] = freed
    return result


def markdown(payload: dict) -> str:
    rows = []
    for name, result in payload["variants"].items():
        control = result.get("unchanged_pairs")
        said_no = f"{control['answers'].get('no answered no', 0)} of {control['questions']}" if control else "–"
        rows.append([name, result["questions"], result["accuracy"], result["answers"], said_no])
    text = common.markdown_table(["variant", "one-cell questions (changed categories)", "answered right", "answers",
                                  "control: 'no' on unchanged pairs"], rows)
    return (text + f"\n\nTail: {payload['steps']} steps at batch 16, lr {payload['learning_rate']}, localization samples "
            f"with {payload['questions']} one-cell questions a category each, seed {payload['seed']}; chance 0.5. "
            f"Model: `{payload['model']}`; data: `{payload['data']}`.\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained Nano folder (a demo's model-mixed/ or model/)")
    parser.add_argument("--data", required=True, help="its synthetic data folder (annotations/ and images/)")
    parser.add_argument("--variants", nargs="+", type=parse_variant, default=[("plain", 1.0)],
                        help=f"{VARIANT_FORMS} (default: plain)")
    parser.add_argument("--steps", type=int, default=72)
    parser.add_argument("--questions", type=int, default=4, help="one-cell questions a category per sample")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=120, help="test localization records the questions come from")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="reader_tail", help="results file stem")
    args = parser.parse_args(argv)
    data = check_model_and_data(parser, args)
    if args.steps < 1 or args.questions < 1:
        parser.error("--steps and --questions must be >= 1")
    torch.set_num_threads(args.threads)
    info = common.machine_info()

    if any(kind == "sink" for kind, _ in args.variants):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.convert_tokens_to_ids("<|im_start|>") in (None, tokenizer.unk_token_id):
            parser.error(f"--variants sink: the tokenizer of {args.model} has no <|im_start|> token (Nano's has)")
    questions = cell_question_records(data / "annotations", args.limit)
    if not questions:
        parser.error(f"--data {data}: no test pair with a changed cell among the first {args.limit}")
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        questions_dir = Path(scratch) / "questions"
        questions_dir.mkdir()
        (questions_dir / "changechat_test_binary.json").write_text(json.dumps(questions))
        control = unchanged_pair_records(data / "annotations", args.limit)
        control_dir = Path(scratch) / "control"
        control_dir.mkdir()
        (control_dir / "changechat_test_binary.json").write_text(json.dumps(control))
        for kind, factor in args.variants:
            name = variant_name(kind, factor)
            variant_dir = Path(scratch) / name.replace(":", "_")
            variant_dir.mkdir()
            results[name] = run_variant(kind, factor, args, variant_dir, questions_dir, len(questions),
                                        control_dir if control else None, len(control))
            print(f"{name}: {results[name]}", flush=True)

    payload = {"model": str(args.model), "data": str(data), "machine": info, "steps": args.steps,
               "questions": args.questions, "learning_rate": args.learning_rate, "seed": args.seed,
               "variants": results}
    common.save(args.name, payload, markdown(payload), args.out)


if __name__ == "__main__":
    main()
