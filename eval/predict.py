"""`deltavlm predict`: answer a prompt about a pair of images, or about every pair of a batch.

    deltavlm predict --before A --after B [--task caption|binary|count|localize|"free prompt"] [--model M]
                     [--json] [--num-beams 5] [--max-new-tokens 256] [--bands 3,2,1] [--tile 256]
                     [--heatmap map.png] [--heatmap-method difference|gate]
    deltavlm predict --pairs DIR | --list FILE.csv|FILE.jsonl  [--out results.jsonl] [--batch-size 8] ...

Batch mode: DIR holds A/ and B/ subfolders of same-named files (LEVIR-CC layout); a list file has columns
`before`, `after` and optionally `prompt` (relative paths are relative to the list file's folder). Results
are appended to --out per batch (flushed and fsync'ed); rerunning skips the pairs already answered there.

Without --model the default model folder is used: $DELTAVLM_HOME, else ~/.cache/deltavlm/nano (where
`deltavlm demo` saves DeltaVLM-Nano).

The model-facing helpers here (`load_model`, `encode_pairs`, `answer`) are shared with `deltavlm chat` and
`deltavlm serve`.
"""

import argparse
import csv
import json
import os
import pickle
import sys
import warnings
from pathlib import Path

import torch

from processing.conversation import TASK_PROMPTS

from eval.generation import PROMPT_FORMATS, GenerationSettings, append_lines, model_generation_config, read_lines
from eval.imagery import MIN_IMAGE_SIDE, ImageryError, ImageryWarning, parse_bands, read_pair, tile_pair

# --task names -> ChangeChat prompts; anything else is taken as a free prompt.
TASKS = {
    "caption": TASK_PROMPTS["caption"],
    "binary": TASK_PROMPTS["binary"],
    "count": TASK_PROMPTS["count"],
    "localize": TASK_PROMPTS["localization"],
}
# The other names the project uses for a task (`deltavlm eval`, ChangeChat file names) are the same task here,
# not a free prompt that happens to be one word.
TASK_NAME_ALIASES = {"localization": "localize", "loc": "localize", "captioning": "caption"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
UNSAFE_WEIGHTS = ("its weights file holds pickled Python objects other than tensors and is refused (loading it could "
                  "run code); use a folder saved with safetensors")


class PredictError(ValueError):
    """Bad input or setup: printed as the command's one error line."""


# ---------------------------------------------------------------------------------------------
# the model

def default_model_dir() -> Path:
    """$DELTAVLM_HOME (the model folder, or a folder holding nano/), else ~/.cache/deltavlm/nano."""
    home = os.environ.get("DELTAVLM_HOME")
    if not home:
        return Path.home() / ".cache" / "deltavlm" / "nano"
    home = Path(home).expanduser()
    if not (home / "config.json").is_file() and (home / "nano" / "config.json").is_file():
        return home / "nano"
    return home


def resolve_model(model: str | None) -> str:
    if model is not None:
        return model
    folder = default_model_dir()
    if not (folder / "config.json").is_file():
        raise PredictError(f"no model in {folder}: run `deltavlm demo` to build DeltaVLM-Nano there, or pass --model")
    return str(folder)


def load_model(model: str, device: str | None = None):
    """(model, processor) from a DeltaVLM folder or Hub id, in eval mode on `device` (default: cuda if any)."""
    import modeling_deltavlm  # noqa: F401  (registers DeltaVLM with the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(model).expanduser()
    if (model.startswith((".", "/", "~")) or path.exists()) and not (path / "config.json").is_file():
        raise PredictError(f"{model}: not a DeltaVLM model folder (no config.json)")
    device = resolve_device(device)
    try:
        loaded = AutoModelForImageTextToText.from_pretrained(str(path) if path.exists() else model)
        processor = AutoProcessor.from_pretrained(str(path) if path.exists() else model)
    except pickle.UnpicklingError:  # transformers reads pytorch_model.bin with torch.load(weights_only=True)
        raise PredictError(f"cannot load model {model}: {UNSAFE_WEIGHTS}") from None
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PredictError(f"cannot load model {model}: {first_line}") from None
    return loaded.to(device).eval(), processor


def resolve_device(device: str | None) -> torch.device:
    """--device -> a torch device this machine has (default: cuda if any, else cpu); a name torch does not know, or
    an accelerator this torch build or machine lacks, is refused by name before the model loads."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise PredictError(f"--device {device!r} is not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    available = {
        "cpu": lambda: True,
        "cuda": torch.cuda.is_available,
        "mps": lambda: torch.backends.mps.is_available(),
        "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available(),
    }.get(chosen.type, lambda: True)  # other backends: torch says at .to() time
    if not available():
        raise PredictError(f"--device {device}: no {chosen.type} device here (this torch build or machine has none)")
    if chosen.type == "cuda" and chosen.index is not None and chosen.index >= torch.cuda.device_count():
        raise PredictError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return chosen


def task_prompt(task: str) -> str:
    """A --task name (caption, binary, count, localize) -> its ChangeChat prompt; other text is the prompt."""
    text = task.strip()
    if not text:
        raise PredictError("--task is empty: give a task name or a question")
    name = text.lower()
    return TASKS.get(TASK_NAME_ALIASES.get(name, name), text)


def task_name(prompt: str) -> str:
    """The --task name of a prompt, or "free" for a free prompt (written to JSON output)."""
    return next((name for name, text in TASKS.items() if text == prompt), "free")


@torch.no_grad()
def encode_pairs(model, processor, pairs) -> torch.Tensor:
    """The vision side (ViT + CSRM) of a batch of (before, after) PIL pairs: pair_embeds (B, 2*S, D)."""
    pixel_values = processor.image_processor(list(pairs))["pixel_values"].to(model.device)
    return model.get_pair_embeds(pixel_values).pair_embeds


@torch.no_grad()
def answer(model, processor, pair_embeds, conversations, settings: GenerationSettings,
           prompt_format: str | None = None) -> list[str]:
    """One answer per conversation ([{"role", "content"}, ...] ending with the question), row i about
    pair_embeds[i]. Prompts are rendered with the processor's chat template, as the model was trained."""
    prompts = [processor.apply_chat_template(messages, prompt_format=prompt_format) for messages in conversations]
    inputs = processor(text=prompts).to(model.device)
    prompt_length = inputs["input_ids"].shape[1]
    output_ids = model.generate(
        **inputs, pair_embeds=pair_embeds, **settings.generate_kwargs(processor.tokenizer, prompt_length)
    )
    return processor.batch_decode(output_ids, prompt_length=prompt_length)


def ask(model, processor, pair_embeds, question: str, settings: GenerationSettings, prompt_format=None) -> str:
    """One question about one encoded pair (pair_embeds (1, 2*S, D))."""
    return answer(model, processor, pair_embeds, [[{"role": "user", "content": question}]], settings, prompt_format)[0]


# ---------------------------------------------------------------------------------------------
# command line

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), like every other error here."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Options shared by predict, chat and serve: the model, decoding and how imagery is read."""
    defaults = GenerationSettings()
    parser.add_argument("--model", help="DeltaVLM model folder or Hub id (default: $DELTAVLM_HOME or ~/.cache/deltavlm/nano)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    # decoding: unless given, what the model's generation_config.json sets, else the authors' settings
    parser.add_argument("--num-beams", type=int,
                        help=f"beam width; 1 = greedy (default: the model's, else {defaults.num_beams})")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"answer length cap (default: the model's, else {defaults.max_new_tokens})")
    parser.add_argument("--repetition-penalty", type=float,
                        help=f"(default: the model's, else {defaults.repetition_penalty})")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                        help="deltavlm: the released checkpoint's training format; plain: the question verbatim "
                        "(default: the format the model was trained with, from its processor)")
    parser.add_argument("--static-cache", action="store_true",
                        help="pre-allocated KV cache; on CUDA the decoding step is then torch.compile'd "
                        "(~25 s once, then faster per answer: pays for many answers)")
    parser.add_argument("--bands", help="1-based bands to use as R,G,B for multi-band imagery, e.g. 3,2,1")


def generation_settings(args, model: str) -> GenerationSettings:
    """The decoding flags given, else what `model`'s generation_config.json sets, else the authors' settings."""
    try:
        return GenerationSettings.for_model(
            model_generation_config(model),
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
            static_cache=getattr(args, "static_cache", False),
        )
    except ValueError as error:
        raise PredictError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="deltavlm predict", description="Answer a prompt about a pair of images (or a batch).")
    parser.add_argument("--before", help="the earlier image (A)")
    parser.add_argument("--after", help="the later image (B)")
    parser.add_argument("--pairs", help="batch: folder with A/ and B/ subfolders of same-named images")
    parser.add_argument("--list", help="batch: CSV or JSONL with columns before, after[, prompt]")
    parser.add_argument("--task", default="caption",
                        help="caption, binary, count, localize, or a free prompt in quotes (default: caption)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the answer text")
    parser.add_argument("--out", default="results.jsonl", help="batch: results file, appended and resumed")
    parser.add_argument("--batch-size", type=int, default=8, help="batch: pairs per model call (default 8)")
    parser.add_argument("--tile", type=int, help="answer per tile x tile crop of a large scene (one pair only)")
    parser.add_argument("--heatmap", help="save a change map over the after image as this PNG (one pair only)")
    parser.add_argument("--heatmap-method", default="difference", choices=("difference", "gate"),
                        help="difference: |Z_B - Z_A| per patch (default); gate: |S_B|, CSRM's gated change term")
    add_model_arguments(parser)
    return parser


def main(argv=None) -> int:
    return run_cli("deltavlm predict", run, build_parser().parse_args(argv))


def run_cli(command: str, run_command, args) -> int:
    """`run_command(args)` with imagery warnings printed as one line each and bad input as one error line
    (exit status 2) instead of a traceback. Shared by predict and chat."""
    with warnings.catch_warnings():
        warnings.simplefilter("always", ImageryWarning)
        warnings.showwarning = _print_warning(command)
        try:
            return run_command(args)
        except (PredictError, ImageryError) as error:
            print(f"{command}: error: {error}", file=sys.stderr)
            return 2


def _print_warning(prog: str):
    def show(message, category, *rest, **kwargs):
        if issubclass(category, ImageryWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr)
        else:  # not ours: keep Python's format, but no source line
            print(f"{prog}: {category.__name__}: {message}", file=sys.stderr)

    return show


def run(args) -> int:
    batch = args.pairs is not None or args.list is not None
    _check_arguments(args, batch)
    bands = parse_bands(args.bands)
    prompt = task_prompt(args.task)
    model_path = resolve_model(args.model)
    settings = generation_settings(args, model_path)
    if not batch:
        # read the pair before loading the model: a wrong path fails in a second, not after a model load
        before, after = read_pair(args.before, args.after, bands)
        quiet_transformers()
        model, processor = load_model(model_path, args.device)
        return predict_one(args, model, processor, before, after, prompt, settings)
    items = batch_items(args, prompt)
    quiet_transformers()
    model, processor = load_model(model_path, args.device)
    return predict_batch(args, model, processor, items, bands, settings)


def quiet_transformers() -> None:
    """Keep the terminal for answers: transformers' load-time notices are not the user's concern here."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()


def _check_arguments(args, batch: bool) -> None:
    if args.pairs is not None and args.list is not None:
        raise PredictError("give --pairs or --list, not both")
    if args.batch_size < 1:
        raise PredictError("--batch-size must be at least 1")
    if args.tile is not None and args.tile < MIN_IMAGE_SIDE:  # 0 too: not read as "no tiling"
        raise PredictError(f"--tile must be at least {MIN_IMAGE_SIDE} pixels, got {args.tile}")
    if batch:
        if args.before or args.after:
            raise PredictError("--before/--after and batch mode (--pairs/--list) exclude each other")
        if args.tile or args.heatmap:
            raise PredictError("--tile and --heatmap work on one pair (--before/--after), not in batch mode")
        return
    if not args.before and not args.after:
        raise PredictError("give --before and --after (or --pairs DIR / --list FILE for a batch)")
    if not args.before or not args.after:
        missing = "--before" if not args.before else "--after"
        raise PredictError(f"{missing} is missing: a pair needs both images")
    if args.tile and args.heatmap:
        raise PredictError("--tile and --heatmap cannot be combined")
    if args.heatmap and not Path(args.heatmap).parent.is_dir():  # say so now, not after the model has run
        raise PredictError(f"--heatmap {args.heatmap}: folder {Path(args.heatmap).parent} does not exist")


# ---------------------------------------------------------------------------------------------
# one pair

def predict_one(args, model, processor, before, after, prompt, settings) -> int:
    result = {"before": args.before, "after": args.after, "task": task_name(prompt), "prompt": prompt}
    if args.tile:
        result["tiles"] = answer_tiles(model, processor, before, after, prompt, args.tile, settings, args.prompt_format,
                                       args.batch_size)
    else:
        if args.heatmap:
            pair_embeds = save_heatmap(model, processor, before, after, args.heatmap, args.heatmap_method)
            result["heatmap"] = args.heatmap
        else:
            pair_embeds = encode_pairs(model, processor, [(before, after)])
        result["answer"] = ask(model, processor, pair_embeds, prompt, settings, args.prompt_format)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    elif args.tile:
        for tile in result["tiles"]:
            print(f"[row {tile['row']}, col {tile['col']}] {tile['answer']}")
    else:
        print(result["answer"])
    return 0


def answer_tiles(model, processor, before, after, prompt, tile, settings, prompt_format, batch_size: int):
    """Answer `prompt` for every tile of the pair: [{"row", "col", "box": [l, t, r, b], "answer"}, ...]."""
    tiles = tile_pair(before, after, tile)
    results = []
    for start in range(0, len(tiles), batch_size):
        chunk = tiles[start : start + batch_size]
        pair_embeds = encode_pairs(model, processor, [(a, b) for *_, a, b in chunk])
        conversations = [[{"role": "user", "content": prompt}]] * len(chunk)
        answers = answer(model, processor, pair_embeds, conversations, settings, prompt_format)
        for (row, col, box, *_), text in zip(chunk, answers):
            results.append({"row": row, "col": col, "box": list(box), "answer": text})
    return results


def save_heatmap(model, processor, before, after, path, method) -> torch.Tensor:
    """Write the change-map overlay PNG; returns the pair's pair_embeds (the same vision pass)."""
    from eval.change_map import change_map, overlay

    try:
        pair_embeds, heat = change_map(model, processor, before, after, method)
    except ValueError as error:  # e.g. the gate map on a model without CSRM
        raise PredictError(str(error)) from None
    overlay(after, heat).save(path, format="PNG")
    return pair_embeds


# ---------------------------------------------------------------------------------------------
# batch mode

def batch_items(args, default_prompt: str) -> list[dict]:
    """Items {"id", "before", "after", "prompt"} from --pairs or --list (paths resolved, prompt filled)."""
    items = folder_items(Path(args.pairs)) if args.pairs else list_items(Path(args.list))
    for item in items:
        item["prompt"] = task_prompt(item["prompt"]) if item.get("prompt") else default_prompt
    if not items:
        raise PredictError(f"no image pairs found in {args.pairs or args.list}")
    return items


def folder_items(folder: Path) -> list[dict]:
    if not folder.is_dir():
        raise PredictError(f"--pairs {folder}: no such folder")
    before_dir, after_dir = folder / "A", folder / "B"
    if not before_dir.is_dir() or not after_dir.is_dir():
        raise PredictError(f"--pairs {folder}: expected subfolders A/ (before) and B/ (after)")
    items = []
    for before in sorted(before_dir.iterdir()):
        if before.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        after = after_dir / before.name
        if not after.is_file():
            warnings.warn(f"{before.name}: in A/ but not in B/; skipped", ImageryWarning, 2)
            continue
        items.append({"id": before.name, "before": str(before.resolve()), "after": str(after.resolve())})
    return items


def list_items(path: Path) -> list[dict]:
    if not path.is_file():
        raise PredictError(f"--list {path}: no such file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise PredictError(f"{path} line {number}: not valid JSON ({error.msg})") from None
    else:
        raise PredictError(f"--list {path}: expected a .csv or .jsonl file")
    items = []
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("before") or not row.get("after"):
            raise PredictError(f"{path} row {number}: needs 'before' and 'after' columns")
        resolve = lambda name: str((path.parent / str(row[name]).strip()).resolve())  # noqa: E731
        items.append({
            "id": str(row.get("id") or number),
            "before": resolve("before"),
            "after": resolve("after"),
            "prompt": str(row.get("prompt") or "").strip(),
        })
    return items


def item_key(item: dict) -> tuple[str, str, str]:
    return item["before"], item["after"], item["prompt"]


def predict_batch(args, model, processor, items, bands, settings) -> int:
    out = Path(args.out)
    try:
        done = {item_key(line) for line in read_lines(out, repair=True) if "answer" in line}
    except ValueError as error:  # a damaged results file: say which line, do not overwrite it
        raise PredictError(str(error)) from None
    pending = [item for item in items if item_key(item) not in done]
    skipped, failed, answered = len(items) - len(pending), 0, 0
    try:
        for start in range(0, len(pending), args.batch_size):
            chunk, pairs = [], []
            for item in pending[start : start + args.batch_size]:
                try:
                    pairs.append(read_pair(item["before"], item["after"], bands))
                    chunk.append(item)
                except ImageryError as error:  # one bad pair must not stop a batch run
                    print(f"deltavlm predict: skipped {item['id']}: {error}", file=sys.stderr)
                    failed += 1
            if not chunk:
                continue
            pair_embeds = encode_pairs(model, processor, pairs)
            conversations = [[{"role": "user", "content": item["prompt"]}] for item in chunk]
            answers = answer(model, processor, pair_embeds, conversations, settings, args.prompt_format)
            lines = [{**item, "task": task_name(item["prompt"]), "answer": text} for item, text in zip(chunk, answers)]
            append_lines(out, lines)
            answered += len(lines)
    except KeyboardInterrupt:
        print(f"deltavlm predict: interrupted; {answered} new results saved in {out}, rerun to resume", file=sys.stderr)
        return 130
    print(f"{answered} answered, {skipped} already in {out}, {failed} failed", file=sys.stderr)
    return 1 if failed else 0


__all__ = ["TASKS", "PredictError", "answer", "ask", "default_model_dir", "encode_pairs", "load_model", "main"]
