"""Argument groups of `deltavlm train` and the YAML-config-plus-overrides parsing.

A config is YAML with one section per argument group:

    model:    ModelArguments      (what to load, LoRA)
    data:     DataArguments       (annotation files, template, augmentation)
    eval:     EvalArguments       (generation-based validation)
    export:   ExportArguments     (the final, complete model folder)
    training: transformers.TrainingArguments

Command-line `--key value` pairs override any section's key (the names are unique across groups).
Parsing goes through one `HfArgumentParser`, so YAML values and overrides get the same type checks.
"""

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser, TrainingArguments


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "a DeltaVLM folder or Hub id; with init_from_instructblip, an InstructBLIP checkpoint"},
    )
    init_from_instructblip: bool = field(
        default=False, metadata={"help": "model_name_or_path is an InstructBLIP checkpoint: start CSRM from scratch"}
    )
    use_difference_module: bool | None = field(
        default=None, metadata={"help": "override config.use_difference_module (false: the authors' training forward)"}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "dtype to load the weights in, before the mixed-precision cast"}
    )
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the language model (peft)"})
    qlora: bool = field(default=False, metadata={"help": "LoRA on a 4-bit (NF4) language model; needs CUDA + bitsandbytes"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        metadata={"help": "module names inside the language model that get adapters"},
    )
    encoder_learning_rate: float | None = field(
        default=None,
        metadata={"help": "learning rate of the ViT, CSRM, Q-Former and query tokens (default: training.learning_rate); "
                  "the projection and LoRA adapters keep training.learning_rate. 0 freezes the encoder side"},
    )
    frozen_dropout: bool = field(
        default=False,
        metadata={"help": "keep dropout on in modules none of whose weights train (default: such modules run in "
                  "eval mode during training, as LAVIS runs its frozen ViT)"},
    )


@dataclass
class DataArguments:
    train_files: list[str] = field(
        default_factory=list, metadata={"help": "ChangeChat-105k annotation files (instruction or caption schema)"}
    )
    image_root: str | None = field(default=None, metadata={"help": "folder the ChangeChat image paths are relative to"})
    levircc_captions: str | None = field(default=None, metadata={"help": "LEVIR-CC LevirCCcaptions.json"})
    levircc_image_root: str | None = field(
        default=None, metadata={"help": "folder holding {split}/A|B/*.png (default: image_root)"}
    )
    levircc_train_split: str | None = field(
        default="train", metadata={"help": "LEVIR-CC split trained on (null: no LEVIR-CC training captions)"}
    )
    val_split: str | None = field(default="val", metadata={"help": "LEVIR-CC split for validation (null: none)"})
    val_max_samples: int | None = field(default=None, metadata={"help": "validate on the first N pairs only"})
    template: Literal["deltavlm", "plain"] = field(
        default="deltavlm",
        metadata={"help": "deltavlm: the released checkpoint's 'q: .. a: ..' normalised prompts; plain: verbatim"},
    )
    captions_per_pair: Literal["all", "first"] = field(
        default="all", metadata={"help": "caption records: one sample per reference caption, or the first only"}
    )
    task_weights: dict | str | None = field(
        default=None,
        metadata={"help": "per-task sampling weights, e.g. {localization: 3, binary: 0.5} in YAML or "
                  "'{\"localization\": 3}' on the command line: a sample of a task weighted w appears floor(w) "
                  "times, plus once more with probability w - floor(w); unnamed tasks keep weight 1"},
    )
    dialogue_image_swap: float = field(
        default=0.0,
        metadata={"help": "share of the dialogues' closing rounds trained on another dialogue's images, so that the "
                  "answer must follow the conversation so far (train.data.swap_closing_round_images)"},
    )
    localization_cell_questions: int = field(
        default=0,
        metadata={"help": "yes/no questions about one grid cell derived from each localization sample, per category "
                  "(train.data.add_cell_questions); 0: none"},
    )
    length_window_steps: int = field(
        default=4,
        metadata={"help": "with training.train_sampling_strategy group_by_length: optimizer steps per window of "
                  "samples sorted by length. 1, with gradient_accumulation_steps > 1, keeps each step a random mix "
                  "and sorts only its own samples into micro-batches by length (short runs: see train.trainer)"},
    )
    sample_order: Literal["random", "stratified"] = field(
        default="random",
        metadata={"help": "random: a random permutation each epoch; stratified: a permutation in which every stretch "
                  "of steps holds the tasks, and each task's answers, in the data's proportions (less order noise "
                  "in short runs; train.sample_order)"},
    )
    augment: Literal["none", "crop", "geometric"] = field(
        default="none",
        metadata={"help": "paired augmentation (same transform on A and B): crop, or crop + flips/rot90"},
    )
    skip_missing_images: bool = field(
        default=False, metadata={"help": "drop records whose images are missing (counted) instead of failing"}
    )


@dataclass
class EvalArguments:
    eval_num_beams: int = 1
    eval_max_new_tokens: int = 40
    eval_repetition_penalty: float = 1.0
    eval_meteor: bool = field(default=False, metadata={"help": "also METEOR (needs java; slow to start)"})
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after this many evaluations without a better metric_for_best_model"}
    )


@dataclass
class ExportArguments:
    export_dir: str | None = field(
        default=None, metadata={"help": "complete model folder written after training (default: OUTPUT_DIR/final)"}
    )
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "auto: bfloat16 after bf16 training, float16 after fp16, else float32"}
    )
    merge_lora: bool = field(default=True, metadata={"help": "merge LoRA adapters into the exported model"})
    reference_language_model: str | None = field(
        default=None,
        metadata={"help": "leave the (frozen, unchanged) LLM out of the export and read it from this causal-LM path "
                  "or Hub id on load (config.language_model_weights); default: include it"},
    )
    skip_export: bool = False


SECTIONS = {
    "model": ModelArguments,
    "data": DataArguments,
    "eval": EvalArguments,
    "export": ExportArguments,
    "training": TrainingArguments,
}

# Defaults this project needs that differ from TrainingArguments' own (applied unless the config sets them).
TRAINING_DEFAULTS = {
    # image paths and prompt strings are not model inputs: the collator needs them
    "remove_unused_columns": False,
    "label_names": ["labels"],
    # some trainable weights get no gradient on some steps (the last Q-Former layer's text FFN; CSRM when it
    # is switched off), which DDP without find_unused_parameters reports as an error
    "ddp_find_unused_parameters": True,
    "report_to": "none",
}


def parse_args(argv: list[str]) -> tuple:
    """`--config FILE.yaml [--key value ...] [--resume [CHECKPOINT]]` -> the five argument groups.

    YAML values and command-line overrides are merged by field name (overrides win; `null` means None) and typed by
    the parser's own converters, then the dataclasses are built once. Unknown sections, keys or options are
    errors that name them, raised before anything is loaded.
    """
    argv = list(argv)
    config_path, resume = _pop_option(argv, "--config"), _pop_resume(argv)
    parser = HfArgumentParser(tuple(SECTIONS.values()))
    values = dict(TRAINING_DEFAULTS)
    if config_path is not None:
        for key, value in read_config(config_path).items():
            values[key] = _coerce_config_value(parser, key, value)
    values.update(_parse_overrides(parser, argv))
    _check_choices(parser, values)
    model_args, data_args, eval_args, export_args, training_args = parser.parse_dict(values)
    if resume is not None:
        training_args.resume_from_checkpoint = resume
    return model_args, data_args, eval_args, export_args, training_args


def read_config(path) -> dict:
    """A YAML config -> one flat {field: value} dict, checking every key against its section's dataclass."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    config = yaml.safe_load(path.read_text()) or {}
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
    flat = {}
    for section, entries in config.items():
        if section not in SECTIONS:
            raise ValueError(f"{path}: unknown section {section!r}; expected one of {list(SECTIONS)}")
        if not isinstance(entries, dict):
            raise ValueError(f"{path}: section {section!r} must be a mapping")
        known = {f.name for f in fields(SECTIONS[section]) if f.init}
        for key, value in entries.items():
            if key not in known:
                raise ValueError(
                    f"{path}: config key {section}.{key} is not a field of {SECTIONS[section].__name__}"
                )
            flat[key] = value
    return flat


def _parse_overrides(parser: HfArgumentParser, argv: list[str]) -> dict:
    """`--key v`, `--key=v`, `--key v1 v2` (list fields), `--flag` (booleans) -> {field: typed value}."""
    overrides, key, tokens = {}, None, []
    for token in argv + ["--"]:  # a sentinel flushes the last option
        if token.startswith("--"):
            if key is not None:
                action = _action(parser, key)
                overrides[action.dest] = _convert(action, key, tokens)
            name, _, inline = token[2:].partition("=")
            key, tokens = (name or None), ([inline] if inline else [])
        elif key is None:
            raise ValueError(f"unexpected argument {token!r}: overrides are --key value pairs")
        else:
            tokens.append(token)
    return overrides


def _action(parser, key: str):
    action = parser._option_string_actions.get(f"--{key}")
    if action is None:
        groups = ", ".join(cls.__name__ for cls in SECTIONS.values())
        raise ValueError(f"unknown option --{key}: not a field of {groups}")
    return action


def _convert(action, key: str, tokens: list[str]):
    if not tokens:
        if action.nargs == "?":  # boolean flags: `--lora` means true
            return action.const
        raise ValueError(f"--{key} needs a value")
    if tokens == ["null"]:
        return None
    convert = action.type or str
    try:
        if action.nargs in ("+", "*"):
            return [convert(token) for token in tokens]
        if len(tokens) > 1:
            raise ValueError(f"takes one value, got {tokens}")
        return convert(tokens[0])
    except (TypeError, ValueError) as error:
        raise ValueError(f"--{key}: {error}") from error


def _check_choices(parser, values: dict) -> None:
    """`parse_dict` does not enforce a Literal / Enum field's choices as the command line does: check them here."""
    for key, value in values.items():
        action = parser._option_string_actions.get(f"--{key}")
        choices = getattr(action, "choices", None)
        if choices and value is not None and not isinstance(value, (list, dict)) and value not in choices:
            raise ValueError(f"{key}: {value!r} is not one of {list(choices)}")


def _coerce_config_value(parser, key: str, value):
    """A YAML value -> the field's type, as the command line would give it. YAML reads `1e-5` as a string (YAML
    1.1): strings are converted with the field's own type. A list field written as one value (`train_files:
    a.json`) is a one-item list, not a string to iterate character by character. A number field refuses lists,
    mappings and (int) fractions by name instead of failing later, or not at all."""
    action = parser._option_string_actions[f"--{key}"]
    is_list = action.nargs in ("+", "*")
    if is_list and value is not None and not isinstance(value, list):
        if isinstance(value, dict):
            raise ValueError(f"{key}: expected a list of values, got a mapping {value!r}")
        value = [value]
    if action.type in (None, str):
        return value
    if is_list:
        return None if value is None else [_convert(action, key, [v]) if isinstance(v, str) else v for v in value]
    if isinstance(value, str):
        return _convert(action, key, [value])
    if action.type in (int, float) and (isinstance(value, (list, dict)) or isinstance(value, bool)):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if action.type is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{key}: expected a whole number, got {value!r}")
        return int(value)
    return value


def _pop_option(argv: list[str], name: str) -> str | None:
    for i, token in enumerate(argv):
        if token == name:
            if i + 1 >= len(argv):
                raise ValueError(f"{name} needs a value")
            value = argv[i + 1]
            del argv[i : i + 2]
            return value
        if token.startswith(name + "="):
            del argv[i]
            return token.split("=", 1)[1]
    return None


def _pop_resume(argv: list[str]) -> str | bool | None:
    """`--resume` alone -> True (the last checkpoint in output_dir); `--resume PATH` -> PATH."""
    if "--resume" not in argv:
        return _pop_option(argv, "--resume")
    i = argv.index("--resume")
    if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
        value = argv[i + 1]
        del argv[i : i + 2]
        # as the other boolean options read them; a checkpoint folder is rarely named "true"
        return {"true": True, "false": None}.get(value.lower(), value)
    del argv[i]
    return True


__all__ = ["DataArguments", "EvalArguments", "ExportArguments", "ModelArguments", "SECTIONS", "parse_args", "read_config"]
