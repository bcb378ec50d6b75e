"""Batched generation over evaluation records, and the prediction file it writes.

A record (see `processing.changechat_data`) holds one image pair and one or more question rounds. Every
round is a model call ("turn"): its prompt is the conversation so far rendered with the processor's chat
template, earlier rounds answered with the ground truth (teacher forcing, as the authors trained), so the
turns of a dialogue are independent given the pair and can be batched like single-turn questions.

Per batch of records the vision side (ViT + CSRM) runs once (`model.get_pair_embeds`) and every turn
reuses its `pair_embeds`; only the instruction-aware Q-Former and the language model run per turn.

Prediction file: JSONL, one object per model call, appended and fsync'ed per batch so a killed run
loses at most the batch in flight:

    {"id", "task", "turn" (1-based), "turns" (the record's number of turns), "question", "prompt", "prediction",
     "references", ["changed"]}

references: caption -> every reference caption; other single-turn tasks -> [the answer]; a dialogue
turn -> [that turn's answer]. changed: the pair's changeflag, where the data has one.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

PROMPT_FORMATS = ("deltavlm", "plain")


@dataclass
class GenerationSettings:
    """Decoding settings. Defaults are the authors' evaluation settings (DESIGN.md §1); the commands start from
    the model's own (`for_model`)."""

    num_beams: int = 5  # 1 = greedy
    max_new_tokens: int = 256
    repetition_penalty: float = 1.5
    length_penalty: float = 1.0  # beam search only
    # As the authors' transformers 4.33 counted it: generated tokens plus one placeholder id at the start of
    # the output, so 1 (their value) sets no minimum and n > 1 asks for n - 1 new tokens.
    min_length: int = 1
    # The authors generated from inputs_embeds only, so the repetition penalty never saw the prompt; with
    # input_ids, transformers 5.x penalises prompt tokens too. False reproduces the authors.
    penalize_prompt: bool = False
    # A pre-allocated StaticCache instead of the growing DynamicCache. On CUDA transformers then compiles the
    # decoding step with torch.compile: 2.7x faster per answer on an H200 at full size after a ~25 s first call
    # (benchmarks/results/compile_full_cuda.md), so it pays for long evaluations and servers, not one question.
    static_cache: bool = False

    def __post_init__(self):
        if self.num_beams < 1 or self.max_new_tokens < 1 or self.min_length < 0:
            raise ValueError(f"num_beams and max_new_tokens must be >= 1 and min_length >= 0: {self}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @classmethod
    def for_model(cls, generation_config: GenerationConfig | None, **flags) -> "GenerationSettings":
        """The settings a command uses, field by field: the flag if given (not None); else the value the model's
        `generation_config` sets (see `model_generation_config`); else the authors' setting (the class default).

        DeltaVLM-Nano's generation_config sets greedy decoding, no repetition penalty and 48 new tokens; the
        converted paper checkpoint's sets the authors' beam search, so `model.generate(**inputs)` in user code
        decodes each model as its commands do.
        """
        values = {}
        if generation_config is not None:
            for key in ("num_beams", "max_new_tokens", "repetition_penalty", "length_penalty"):
                if getattr(generation_config, key, None) is not None:
                    values[key] = getattr(generation_config, key)
        values.update({key: value for key, value in flags.items() if value is not None})
        return cls(**values)

    def describe(self) -> dict:
        """The settings as written into metrics.json and the Markdown header."""
        decoding = "greedy" if self.num_beams == 1 else f"beam search ({self.num_beams} beams)"
        return {"decoding": decoding, **asdict(self)}

    def generate_kwargs(self, tokenizer, prompt_length: int) -> dict:
        """Keyword arguments for `model.generate`. Every field these settings control is set explicitly:
        transformers fills the fields a passed GenerationConfig leaves unset (None) from the model's
        generation_config.json, and a model's repetition_penalty would otherwise come back on top of ours."""
        config = dict(
            max_new_tokens=self.max_new_tokens,
            num_beams=self.num_beams,
            do_sample=False,
            # the penalty, if any, is applied below (so that it can skip the prompt) or set here
            repetition_penalty=1.0,
            pad_token_id=tokenizer.pad_token_id,  # [PAD] (32000 for Vicuna), not 0: rows are left-padded
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
        if self.num_beams > 1:
            config["length_penalty"] = self.length_penalty
        if self.min_length > 1:
            config["min_new_tokens"] = self.min_length - 1
        if self.static_cache:
            config["cache_implementation"] = "static"
        kwargs = {}
        if self.repetition_penalty != 1.0:
            if self.penalize_prompt:
                config["repetition_penalty"] = self.repetition_penalty
            else:
                # Penalise only tokens after the prompt (the input_ids width).
                penalty = RepetitionPenaltyLogitsProcessor(self.repetition_penalty, prompt_ignore_length=prompt_length)
                kwargs["logits_processor"] = LogitsProcessorList([penalty])
        return {"generation_config": GenerationConfig(**config), **kwargs}


def model_prompt_format(model: str) -> str:
    """The prompt format a model folder's processor was trained with (`prompt_format` in processor_config.json),
    without loading anything; "deltavlm" (the released checkpoint's) when the folder does not say."""
    from transformers.utils import cached_file

    try:
        path = cached_file(model, "processor_config.json", _raise_exceptions_for_missing_entries=False)
        saved = json.loads(Path(path).read_text(encoding="utf-8")).get("prompt_format") if path else None
    except (OSError, ValueError):
        saved = None
    return saved if saved in PROMPT_FORMATS else "deltavlm"


def model_generation_config(model: str) -> GenerationConfig | None:
    """The generation_config.json of a model folder or Hub id, without loading the model; None if it has none."""
    try:
        return GenerationConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------
# prompts

def conversation(record: dict, turn: int) -> list[dict]:
    """Chat messages for model call `turn` (0-based): earlier rounds with their ground-truth answers."""
    messages = []
    for question, answer in zip(record["questions"][:turn], record["answers"][:turn]):
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": record["questions"][turn]}]


def render_prompts(processor, record: dict, prompt_format: str | None = None) -> list[str]:
    """One prompt per round of `record`, rendered with the processor's chat template (`prompt_format` None: the
    processor's own)."""
    return [
        processor.apply_chat_template(conversation(record, turn), prompt_format=prompt_format)
        for turn in range(len(record["questions"]))
    ]


def turn_references(record: dict, turn: int) -> list[str]:
    """What the answer of call `turn` is scored against: the record's references (all captions) for a
    single-turn record, that round's answer for a dialogue round."""
    if len(record["questions"]) == 1:
        return list(record["references"])
    return [record["answers"][turn]]


# ---------------------------------------------------------------------------------------------
# generation

@torch.no_grad()
def generate_batch(model, processor, records: list[dict], pending: list[set[int]], settings: GenerationSettings,
                   prompt_format: str | None = None) -> list[dict]:
    """Answer the pending turns of a batch of records; returns prediction lines (record order, then turn).

    pending[i]: the 0-based turns of records[i] still to generate (resume skips the others).
    """
    device = model.device
    # step 1: the vision side once per pair: (B, 2, C, H, W) -> pair_embeds (B, 2*S, D)
    pairs = [(record["image_before"], record["image_after"]) for record in records]
    pixel_values = processor.image_processor(pairs)["pixel_values"].to(device)
    pair_embeds = model.get_pair_embeds(pixel_values).pair_embeds
    prompts = [render_prompts(processor, record, prompt_format) for record in records]

    # step 2: one generate() per turn index over the records that have that turn pending
    answers: dict[tuple[int, int], str] = {}
    num_turns = max(len(record["questions"]) for record in records)
    for turn in range(num_turns):
        rows = [i for i, turns in enumerate(pending) if turn in turns]
        if not rows:
            continue
        inputs = processor(text=[prompts[i][turn] for i in rows]).to(device)
        prompt_length = inputs["input_ids"].shape[1]
        output_ids = model.generate(
            **inputs,
            pair_embeds=pair_embeds[rows],
            **settings.generate_kwargs(processor.tokenizer, prompt_length),
        )
        for i, text in zip(rows, processor.batch_decode(output_ids, prompt_length=prompt_length)):
            answers[i, turn] = text

    lines = []
    for i, record in enumerate(records):
        for turn in sorted(pending[i]):
            lines.append(prediction_line(record, turn, prompts[i][turn], answers[i, turn]))
    return lines


def prediction_line(record: dict, turn: int, prompt: str, prediction: str) -> dict:
    line = {
        "id": record["id"],
        "task": record["task"],
        "turn": turn + 1,
        "turns": len(record["questions"]),  # lets a reader tell a finished record from an interrupted one
        "question": record["questions"][turn],
        "prompt": prompt,
        "prediction": prediction,
        "references": turn_references(record, turn),
    }
    if record.get("changeflag", -1) in (0, 1):
        line["changed"] = bool(record["changeflag"])
    return line


# ---------------------------------------------------------------------------------------------
# the prediction file

def line_key(line: dict) -> tuple[str, str, int]:
    """(task, id, turn): ids are unique within a task file, not across the six files."""
    return line["task"], str(line["id"]), int(line["turn"])


def append_lines(path: Path, lines: list[dict]) -> None:
    """Append JSONL lines and make them durable before returning (one write per batch)."""
    if not lines:
        return
    text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def read_lines(path: Path, repair: bool = False) -> list[dict]:
    """The complete lines of a prediction file ([] when it does not exist).

    A run killed mid-write can leave a last line without its newline: it is ignored, and with `repair`
    (the file's writer, about to append) cut off so the next line does not glue onto it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data) and repair:
        with open(path, "r+b") as handle:
            handle.truncate(end)
    lines = []
    for number, text in enumerate(data[:end].decode("utf-8").splitlines(), start=1):
        if text.strip():
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path} line {number}: not valid JSON ({error.msg}); remove it to resume") from None
    return lines


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and os.replace: readers see the old or the new file, never half of one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


__all__ = [
    "PROMPT_FORMATS",
    "model_prompt_format",
    "GenerationSettings",
    "append_lines",
    "conversation",
    "generate_batch",
    "line_key",
    "prediction_line",
    "read_lines",
    "render_prompts",
    "turn_references",
    "write_atomic",
]
