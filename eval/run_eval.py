"""`deltavlm eval`: run a DeltaVLM model on ChangeChat / LEVIR-CC test data and score every task.

    deltavlm eval --model M --data D [--task all|caption|binary|count|localization|open|dialogue]
                  [--image-root R] [--out DIR] [--batch-size 8] [--limit N] [--split test]
                  [--prompt-format deltavlm|plain] [--num-beams 5] [--max-new-tokens 256]
                  [--repetition-penalty 1.5] [--length-penalty 1] [--min-length 1] [--penalize-prompt]
                  [--protocol standard|authors|coco] [--no-meteor] [--dtype auto] [--overwrite]

D is one annotation file (a ChangeChat test file of any task, LEVIR-CC's LevirCCcaptions.json with
--split, a Hub data set id) or a folder holding the ChangeChat per-task test files, recognised by the
name's last part: `_caption`, `_binary`, `_count`, `_loc`, `_open`, `_dialog` (ChangeChat-105k's
`changechat_105k_test_binary.json`, ..., the synthetic generator's `changechat_test_caption.json`, ...)
and a bare `..._test.json` in the caption schema (ChangeChat-105k's caption file). A folder with an
`annotations/` subfolder (the generator's layout) is searched there too.

Prompts: `--prompt-format deltavlm` (default) renders each round as the released checkpoint was trained
(`q: Q1 a: A1  q: Q2`, lowercased, punctuation dropped; earlier answers are the ground truth). The authors'
own evaluation scripts fed the bare question instead (`plain`), a train/test mismatch (DESIGN.md §3); use
`--prompt-format plain` to reproduce their numbers' setting.

Outputs in DIR: predictions.jsonl (see eval.generation), metrics.json, metrics.md, run_config.json.
Rerunning with the same DIR resumes: finished (task, id, turn) predictions are kept, the rest generated,
and the metrics are computed from the complete file, so they equal an uninterrupted run's.

Under `accelerate launch` (or torchrun) the batches are split across processes; each appends to its own
predictions.rank<k>.jsonl, and the main process merges them into predictions.jsonl, in data order,
before scoring.
"""

import argparse
import json
import pickle
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import is_mps_available, is_xpu_available, parse_flag_from_env
from tqdm.auto import tqdm

from processing.changechat_data import FILE_SUFFIX_TASKS, TASKS, load_records, missing_images

from eval.generation import (
    PROMPT_FORMATS,
    GenerationSettings,
    append_lines,
    generate_batch,
    line_key,
    model_generation_config,
    model_prompt_format,
    read_lines,
    write_atomic,
)
from eval.metrics import PROTOCOLS, java_available
from eval.score import Prediction, Reference, markdown_report, score_pairs

PREDICTIONS = "predictions.jsonl"
MISSING_SHOWN = 10


class EvalError(ValueError):
    """Bad input: printed as the command's one error line (exit status 2)."""


# ---------------------------------------------------------------------------------------------
# command line

def build_parser() -> argparse.ArgumentParser:
    defaults = GenerationSettings()
    parser = argparse.ArgumentParser(
        prog="deltavlm eval",
        description="Run a DeltaVLM model on ChangeChat / LEVIR-CC test data and score every task.",
    )
    parser.add_argument("--model", required=True, help="DeltaVLM model folder (or Hub id)")
    parser.add_argument("--data", required=True,
                        help="annotation file, folder of ChangeChat per-task test files, or Hub data set id")
    parser.add_argument("--task", default="all", choices=("all", *TASKS), help="task to evaluate (default: all found)")
    parser.add_argument("--image-root", help="folder the annotations' image paths are relative to "
                        "(default: an 'images' folder in or beside --data)")
    parser.add_argument("--split", default="test", help="split to read from a LEVIR-CC file or Hub data set, "
                        "and the split a --data folder's file names must name (default test)")
    parser.add_argument("--out", default="eval_output", help="output folder (default ./eval_output)")
    parser.add_argument("--batch-size", type=int, default=8, help="records per batch (per process)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records of each task")
    parser.add_argument("--prompt-format", default=None, choices=PROMPT_FORMATS,
                        help="deltavlm: the released checkpoint's training format; plain: the question verbatim, "
                        "as the authors' evaluation scripts fed it (default: the format the model was trained "
                        "with, saved in its processor_config.json; deltavlm where it says none)")
    generation = parser.add_argument_group(
        "generation (defaults: what the model's generation_config.json sets, else the authors' evaluation settings)")
    generation.add_argument("--num-beams", type=int, help=f"1 = greedy (authors: {defaults.num_beams})")
    generation.add_argument("--max-new-tokens", type=int, help=f"(authors: {defaults.max_new_tokens})")
    generation.add_argument("--repetition-penalty", type=float, help=f"(authors: {defaults.repetition_penalty})")
    generation.add_argument("--length-penalty", type=float, help=f"(authors: {defaults.length_penalty})")
    generation.add_argument("--min-length", type=int, default=defaults.min_length,
                            help="as transformers 4.33 counted it for the authors: 1 = no minimum")
    generation.add_argument("--penalize-prompt", action="store_true",
                            help="apply the repetition penalty to prompt tokens too (the authors' did not)")
    generation.add_argument("--static-cache", action="store_true",
                            help="pre-allocated KV cache; on CUDA the decoding step is then torch.compile'd "
                            "(~25 s once, then faster per answer: see benchmarks/README.md)")
    generation.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                            help="auto: bfloat16 on a GPU that supports it, else float32")
    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--protocol", default="standard", choices=PROTOCOLS,
                         help="caption normalisation (standard = DESIGN.md §5)")
    scoring.add_argument("--no-meteor", action="store_true", help="skip METEOR (needs java, ~5 s to start)")
    parser.add_argument("--overwrite", action="store_true",
                        help="discard earlier predictions in --out instead of resuming")
    return parser


def settings_from_args(args) -> GenerationSettings:
    """The flags given, else the model's generation_config.json, else the authors' settings."""
    try:
        return GenerationSettings.for_model(
            model_generation_config(args.model),
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            repetition_penalty=args.repetition_penalty,
            length_penalty=args.length_penalty,
            min_length=args.min_length,
            penalize_prompt=args.penalize_prompt,
            static_cache=args.static_cache,
        )
    except ValueError as error:
        raise EvalError(str(error)) from None


# ---------------------------------------------------------------------------------------------
# data

def task_files(folder: Path, split: str) -> list[tuple[Path, str]]:
    """(file, task) of the per-task test files in a folder (and its annotations/ subfolder)."""
    candidates = sorted(folder.glob("*.json"))
    if (folder / "annotations").is_dir():
        candidates += sorted((folder / "annotations").glob("*.json"))
    found: dict[str, Path] = {}
    for path in candidates:
        parts = path.stem.lower().split("_")
        if split not in parts[:-1] and parts[-1] != split:
            continue
        task = FILE_SUFFIX_TASKS.get(parts[-1])
        if task is None and parts[-1] == split and _is_caption_schema(path):
            task = "caption"  # ChangeChat-105k's caption file has no task suffix
        if task is None:
            continue  # e.g. a mixed instruction file: its records are in the per-task files
        if task in found:
            raise EvalError(f"two {task} files in {folder}: {found[task].name} and {path.name}; pass one with --data")
        found[task] = path
    if not found:
        raise EvalError(
            f"no {split} files found in {folder}: expected names ending in _{split}.json (captions) or "
            f"_caption/_binary/_count/_loc/_open/_dialog.json"
        )
    return sorted(((path, task) for task, path in found.items()), key=lambda item: TASKS.index(item[1]))


def _is_caption_schema(path: Path) -> bool:
    with open(path, encoding="utf-8") as handle:
        return '"image_A"' in handle.read(4096)


def default_image_root(data: Path) -> Path | None:
    """An `images` folder in or beside the data (the generator's and LEVIR-CC's layouts)."""
    folder = data if data.is_dir() else data.parent
    for candidate in (folder / "images", folder.parent / "images"):
        if candidate.is_dir():
            return candidate
    return None


def resolve_image_root(data: str, image_root: str | None) -> Path | None:
    """--image-root, else an images folder found beside local data; None for a Hub data set without one."""
    if image_root:
        return Path(image_root).resolve()
    path = Path(data)
    if not path.exists():
        return None
    root = default_image_root(path)
    if root is None:
        raise EvalError(f"no --image-root given and no 'images' folder in or beside {path}")
    return root.resolve()


def load_eval_records(data: str, root: Path | None, task: str, split: str,
                      limit: int | None) -> tuple[list[dict], list[str]]:
    """(records to evaluate, grouped by task in TASKS order, each task in file order; the files read)."""
    path = Path(data)
    sources = task_files(path, split) if path.is_dir() else [(data, None)]
    by_task: dict[str, list[dict]] = {}
    read = []
    for source, file_task in sources:
        if task not in ("all", file_task) and file_task is not None:
            continue
        read.append(str(source))
        try:
            records = load_records(source, root, task=file_task, split=split).to_list()
        except (OSError, ValueError) as error:
            raise EvalError(str(error)) from None
        for record in records:
            by_task.setdefault(record["task"], []).append(record)
    if task != "all":
        if task not in by_task:
            raise EvalError(f"no {task} records in {data} (found: {', '.join(by_task) or 'none'})")
        by_task = {task: by_task[task]}
    records = [record for name in TASKS for record in by_task.get(name, [])[:limit]]
    if not records:
        raise EvalError(f"no records to evaluate in {data}")
    return records, read


def check_images(records: list[dict]) -> None:
    """Fail before any compute is spent, naming the missing files."""
    missing = missing_images({
        "image_before": [record["image_before"] for record in records],
        "image_after": [record["image_after"] for record in records],
    })
    if missing:
        shown = "\n  ".join(missing[:MISSING_SHOWN])
        more = f"\n  ... and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise EvalError(f"{len(missing)} image files not found or not readable as images (check --image-root):"
                        f"\n  {shown}{more}")


# ---------------------------------------------------------------------------------------------
# model

def check_model_folder(model: str) -> None:
    """A local --model must be a saved DeltaVLM folder; say what it is otherwise."""
    path = Path(model)
    if not path.exists():
        if model.count("/") == 1 and not model.startswith((".", "/")):
            return  # a Hub id: from_pretrained will say if it is not there
        raise EvalError(f"model folder not found: {path}")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EvalError(f"{path} is not a DeltaVLM model folder: it has no config.json")
    model_type = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
    if model_type != "deltavlm":
        raise EvalError(f"{path} holds a {model_type!r} model, not DeltaVLM (model_type 'deltavlm')")
    if not (path / "processor_config.json").is_file() and not (path / "preprocessor_config.json").is_file():
        raise EvalError(f"{path} has no processor files: save the DeltaVLMProcessor into the model folder")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(model: str, device: torch.device, dtype: torch.dtype):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from processing import DeltaVLMProcessor

    try:
        processor = DeltaVLMProcessor.from_pretrained(model)
        network = DeltaVLMForConditionalGeneration.from_pretrained(model, dtype=dtype)
    except pickle.UnpicklingError:  # transformers reads pytorch_model.bin with torch.load(weights_only=True)
        raise EvalError(f"cannot load a DeltaVLM model from {model}: its weights file holds pickled Python objects "
                        "other than tensors and is refused (loading it could run code); use safetensors") from None
    except (OSError, ValueError) as error:
        raise EvalError(f"cannot load a DeltaVLM model from {model}: {error}") from None
    return network.to(device).eval(), processor


# ---------------------------------------------------------------------------------------------
# resumable generation

def shard_path(out: Path, state: PartialState) -> Path:
    """Where this process appends: predictions.jsonl itself when it runs alone."""
    return out / (PREDICTIONS if state.num_processes == 1 else f"predictions.rank{state.process_index}.jsonl")


def existing_lines(out: Path) -> list[dict]:
    """Lines already written by earlier runs: the merged file, then any shards (a killed multi-process run)."""
    lines = read_lines(out / PREDICTIONS)
    for shard in sorted(out.glob("predictions.rank*.jsonl")):
        lines += read_lines(shard)
    return lines


def plan_batches(records: list[dict], batch_size: int, done: set) -> list[list[tuple[int, set]]]:
    """Batches of (record index, pending 0-based turns). Batches are cut from the full record list, task by
    task, before finished records are dropped: a resumed or multi-process run then runs the very batches
    of a fresh single-process run, padding included, and produces the same text."""
    batches = []
    for task in dict.fromkeys(record["task"] for record in records):
        indices = [i for i, record in enumerate(records) if record["task"] == task]
        for start in range(0, len(indices), batch_size):
            batch = []
            for i in indices[start:start + batch_size]:
                record = records[i]
                turns = {t for t in range(len(record["questions"])) if (task, record["id"], t + 1) not in done}
                if turns:
                    batch.append((i, turns))
            if batch:
                batches.append(batch)
    return batches


def run_generation(model, processor, records, batches, settings, prompt_format, path: Path, state) -> int:
    """Generate this process's share of the batches, appending each batch's lines to `path`. Returns the
    number of answers written."""
    with state.split_between_processes(batches) as my_batches:
        my_batches = list(my_batches)
    total = sum(len(turns) for batch in my_batches for _, turns in batch)
    written = 0
    with tqdm(total=total, desc=f"generating (process {state.process_index})", unit="answer",
              disable=not state.is_local_main_process or total == 0) as progress:
        for batch in my_batches:
            try:
                lines = generate_batch(
                    model, processor, [records[i] for i, _ in batch], [turns for _, turns in batch], settings, prompt_format
                )
            except ValueError as error:  # an image that exists but cannot be used (the message names it)
                raise EvalError(f"{error}; earlier batches are saved: fix the file and rerun to resume") from None
            append_lines(path, lines)
            written += len(lines)
            progress.update(len(lines))
    return written


def merge_predictions(out: Path, records: list[dict]) -> list[dict]:
    """One predictions.jsonl in data order (the run's records first, then lines of records outside this run,
    kept), written atomically; shards are removed afterwards. Returns the merged lines."""
    order = {(record["task"], record["id"]): i for i, record in enumerate(records)}
    unique: dict[tuple, dict] = {}
    for line in existing_lines(out):
        unique.setdefault(line_key(line), line)
    ours = sorted((k for k in unique if k[:2] in order), key=lambda k: (order[k[:2]], k[2]))
    others = [k for k in unique if k[:2] not in order]
    merged = [unique[k] for k in ours + others]
    write_atomic(out / PREDICTIONS, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in merged))
    for shard in out.glob("predictions.rank*.jsonl"):
        shard.unlink()
    return merged


# ---------------------------------------------------------------------------------------------
# scoring

def score_lines(lines: list[dict], records: list[dict], protocol: str, meteor: bool) -> tuple[dict, int]:
    """Scores per task of the run's records, computed from the prediction lines alone (what a reader of
    predictions.jsonl sees), through eval.score's scorer so `deltavlm score` agrees.

    Adapter: score.py reads one object per record (a dialogue's turns as a list); the lines here are one
    per model call, so the turns of each record are gathered first. Returns (scores, records left
    unscored for lack of a prediction).
    """
    by_key = {}
    for line in lines:
        by_key.setdefault(line_key(line), line)
    pairs, num_missing = [], 0
    for record in records:
        turns = [by_key.get((record["task"], record["id"], t + 1)) for t in range(len(record["questions"]))]
        if None in turns:
            num_missing += 1
            continue
        pairs.append(_scoring_pair(record["task"], turns))
    if not pairs:
        raise EvalError("no record has a complete prediction to score")
    scores, _ = score_pairs(pairs, task=None, protocol=protocol, meteor=meteor)
    return {task: scores[task] for task in TASKS if task in scores}, num_missing


def _scoring_pair(task: str, turns: list[dict]) -> tuple[Prediction, Reference]:
    last = turns[-1]
    changed = last.get("changed")
    if task == "dialogue":
        prediction = Prediction(id=last["id"], text=[t["prediction"] for t in turns], task=task)
        reference = Reference(
            id=last["id"], task=task, answers=[t["references"][0] for t in turns],
            questions=[t["question"] for t in turns],
        )
    else:  # single-turn tasks are scored on their (only, or last) answer
        prediction = Prediction(id=last["id"], text=last["prediction"], task=task, changed=changed)
        reference = Reference(id=last["id"], task=task, answers=list(last["references"]), changed=changed)
    return prediction, reference


def markdown_header(run: dict) -> str:
    generation = ", ".join(f"{key} {value}" for key, value in run["generation"].items())
    counts = ", ".join(f"{task} {n}" for task, n in run["num_records"].items())
    return "\n".join([
        "## DeltaVLM evaluation",
        "",
        f"- model: `{run['model']}`",
        f"- data: {', '.join(f'`{source}`' for source in run['data'])}",
        f"- records: {counts}",
        f"- prompt format: {run['prompt_format']}; caption protocol: {run['protocol']}",
        f"- generation: {generation}",
    ])


# ---------------------------------------------------------------------------------------------
# main

def prepare_out_dir(out: Path, run_config: dict, overwrite: bool, state: PartialState) -> None:
    """Refuse to mix predictions of different models or settings in one folder (resume needs the same)."""
    config_file = out / "run_config.json"
    if state.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for path in [out / PREDICTIONS, config_file, *out.glob("predictions.rank*.jsonl")]:
                path.unlink(missing_ok=True)
    state.wait_for_everyone()
    if config_file.is_file():
        earlier = json.loads(config_file.read_text(encoding="utf-8"))
        if earlier != run_config:
            changed = sorted(k for k in run_config if earlier.get(k) != run_config[k])
            raise EvalError(
                f"{out} holds predictions made with other settings ({', '.join(changed)} differ): "
                "use another --out, or --overwrite to discard them"
            )
    state.wait_for_everyone()
    if state.is_main_process:
        write_atomic(config_file, json.dumps(run_config, indent=2) + "\n")


def evaluate(args, state: PartialState) -> int:
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        raise EvalError("--batch-size and --limit must be positive")
    if args.protocol == "coco" and not java_available():  # before generating, not after
        raise EvalError("--protocol coco runs the Stanford PTB tokenizer and needs `java` on PATH")
    check_model_folder(args.model)
    args.prompt_format = args.prompt_format or model_prompt_format(args.model)
    settings = settings_from_args(args)
    image_root = resolve_image_root(args.data, args.image_root)
    records, sources = load_eval_records(args.data, image_root, args.task, args.split, args.limit)
    check_images(records)

    dtype = pick_dtype(args.dtype, state.device)
    out = Path(args.out)
    run_config = {
        "model": str(Path(args.model).resolve()) if Path(args.model).exists() else args.model,
        "prompt_format": args.prompt_format,
        "dtype": str(dtype).removeprefix("torch."),
        "generation": settings.describe(),
    }
    prepare_out_dir(out, run_config, args.overwrite, state)
    path = shard_path(out, state)
    read_lines(path, repair=True)  # cut a line torn by a kill before appending after it
    done = {line_key(line) for line in existing_lines(out)}
    batches = plan_batches(records, args.batch_size, done)

    started = time.perf_counter()
    if batches:
        model, processor = load_model(args.model, state.device, dtype)
        written = run_generation(model, processor, records, batches, settings, args.prompt_format, path, state)
        print(f"process {state.process_index}: {written} answers in {time.perf_counter() - started:.1f} s",
              file=sys.stderr)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0

    lines = merge_predictions(out, records)
    scores, num_missing = score_lines(lines, records, args.protocol, meteor=not args.no_meteor)
    num_records = dict(Counter(record["task"] for record in records))
    run = {
        **run_config,
        "data": sources,
        "image_root": str(image_root) if image_root else None,
        "split": args.split,
        "protocol": args.protocol,
        "meteor": not args.no_meteor,
        "num_records": num_records,
        "num_unscored": num_missing,
        "predictions": PREDICTIONS,
        "tasks": scores,
    }
    write_atomic(out / "metrics.json", json.dumps(run, indent=2) + "\n")
    report = markdown_header(run) + "\n\n" + markdown_report(run)
    write_atomic(out / "metrics.md", report + "\n")
    print(report)
    print(f"\nwrote {out / PREDICTIONS}, {out / 'metrics.json'}, {out / 'metrics.md'}")
    return 0


def make_state() -> PartialState:
    """The process group, when launched by `accelerate launch` or torchrun.

    accelerate sets up a multi-process CPU run (gloo) only when asked for cpu=True: `accelerate launch
    --cpu` asks through ACCELERATE_USE_CPU, torchrun cannot, so ask whenever there is no accelerator.
    """
    has_accelerator = torch.cuda.is_available() or is_xpu_available() or is_mps_available()
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU") or not has_accelerator)


def main(argv=None) -> int:
    """`deltavlm eval ...`: returns 0, or 2 with one error message on stderr for bad input."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help or an argparse error (already printed)
        return int(stop.code or 0)
    state = make_state()
    try:
        return evaluate(args, state)
    except EvalError as error:
        print(f"deltavlm eval: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
