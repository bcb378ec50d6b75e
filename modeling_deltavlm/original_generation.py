"""Reproduce the authors' generation semantics with the stock `generate()`.

The authors called `llm_model.generate(inputs_embeds=..., attention_mask=...)` under transformers 4.33 with the
Vicuna generation config (bos 1, eos 2, pad 0). In that version, with embeddings only:

1. the returned ids start with a placeholder, `generation_config.bos_token_id` = 1, that is never fed to the model;
2. `max_length` counts that placeholder: `max_length=20` allows 19 new tokens (so `min_length=1` does nothing);
3. the repetition penalty sees the placeholder and the generated ids, never the prompt;
4. finished rows are padded with 0; the authors then rewrite every 0 to 2 (`outputs[outputs == 0] = 2`);
5. `batch_decode(skip_special_tokens=True)` then `.strip()`.

A DeltaVLM `generate()` call is given the prompt as `input_ids`, so the stock repetition penalty would see the
prompt and the output would start with the prompt instead of the placeholder. `original_generation_kwargs` builds
the arguments that make the stock `generate()` choose exactly the authors' tokens, and `to_original_output_ids`
turns its output into the authors' ids:

```python
inputs = processor(images=pairs, text=prompts)
sequences = model.generate(**inputs, **original_generation_kwargs(inputs["input_ids"].shape[1], num_beams=5, max_length=256))
raw_ids, output_ids = to_original_output_ids(sequences, inputs["input_ids"].shape[1], max_length=256)
texts = [text.strip() for text in processor.tokenizer.batch_decode(output_ids, skip_special_tokens=True)]
```

Beam search (length_penalty 1, early_stopping False): 4.33 divided a hypothesis that ended with eos by its length
without the eos but with the placeholder, the current code by the generated length with the eos: the same number.
A beam cut off at `max_length` was divided by `max_length` (placeholder included), which
`ForcedEndAtMaxLengthLogitsProcessor` reproduces. One difference remains: once `num_beams` hypotheses have
finished, 4.33's stop heuristic divided the best running score by one more (the placeholder) than the current one,
so the current code may stop slightly earlier in that case. On the authors' fixture (greedy and beam 3) the ids, beam
scores and texts are identical (tests/modeling_deltavlm/test_parity_original.py).
"""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

# The authors' defaults (model/blip2_vicua.py generate()) and Vicuna's generation_config.json.
ORIGINAL_PLACEHOLDER_TOKEN_ID = 1  # Vicuna's bos `<s>`; no longer special after the authors' tokenizer set-up
ORIGINAL_PAD_TOKEN_ID = 0
ORIGINAL_EOS_TOKEN_ID = 2
ORIGINAL_MAX_LENGTH = 256
ORIGINAL_REPETITION_PENALTY = 1.5


class PlaceholderRepetitionPenaltyLogitsProcessor(LogitsProcessor):
    r"""
    Repetition penalty over the generated ids plus a placeholder id, ignoring the prompt: what transformers 4.33 did
    when `generate()` got only `inputs_embeds` (its `input_ids` were `[placeholder]` + generated ids).

    Like the stock penalty, a logit x of a seen id becomes x / penalty if x > 0, else x * penalty (once per id).

    Args:
        penalty (`float`): > 1 discourages repeats.
        prompt_length (`int`): width of the `input_ids` given to `generate()`; earlier columns are not penalised.
        placeholder_token_id (`int`, *optional*, defaults to 1): always counted as seen (`None`: no placeholder).
    """

    def __init__(self, penalty: float, prompt_length: int, placeholder_token_id: int | None = ORIGINAL_PLACEHOLDER_TOKEN_ID):
        if not penalty > 0:
            raise ValueError(f"penalty must be a positive float, got {penalty}")
        self.penalty = penalty
        self.prompt_length = prompt_length
        self.placeholder_token_id = placeholder_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        seen = input_ids[:, self.prompt_length :]  # (B, generated so far)
        if self.placeholder_token_id is not None:
            placeholder = torch.full_like(input_ids[:, :1], self.placeholder_token_id)
            seen = torch.cat([placeholder, seen], dim=1)
        seen_scores = scores.gather(1, seen)
        seen_scores = torch.where(seen_scores < 0, seen_scores * self.penalty, seen_scores / self.penalty)
        return scores.scatter(1, seen, seen_scores)


class ForcedEndAtMaxLengthLogitsProcessor(LogitsProcessor):
    r"""
    Once `max_length - 1` tokens are generated (the placeholder takes the last slot), allow only `eos_token_id`, with
    log-probability 0.

    Why: 4.33 divided the score of a beam cut off at `max_length` by `max_length`, placeholder included, while the
    current beam search divides by the number of generated tokens, one less. Generating one more, forced, free eos
    makes the current code divide by `max_length` too; `to_original_output_ids` drops that eos again. (A beam that
    ends with a real eos is scored alike by both versions.)
    """

    def __init__(self, prompt_length: int, max_length: int, eos_token_id: int = ORIGINAL_EOS_TOKEN_ID):
        self.prompt_length = prompt_length
        self.max_length = max_length
        self.eos_token_id = eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_length < self.max_length - 1:
            return scores
        forced = torch.full_like(scores, -float("inf"))
        forced[:, self.eos_token_id] = 0.0
        return forced


def original_generation_kwargs(
    prompt_length: int,
    num_beams: int = 1,
    max_length: int = ORIGINAL_MAX_LENGTH,
    repetition_penalty: float = ORIGINAL_REPETITION_PENALTY,
    length_penalty: float = 1.0,
    placeholder_token_id: int = ORIGINAL_PLACEHOLDER_TOKEN_ID,
    pad_token_id: int = ORIGINAL_PAD_TOKEN_ID,
    eos_token_id: int = ORIGINAL_EOS_TOKEN_ID,
) -> dict:
    """Keyword arguments for `model.generate(**inputs, **kwargs)` that reproduce the authors' `generate()` with the
    same `num_beams`, `max_length` (placeholder included), `repetition_penalty` and `length_penalty`.

    prompt_length: `inputs["input_ids"].shape[1]`. Greedy/beam only (the authors' default `use_nucleus_sampling=False`).
    """
    if max_length < 2:
        raise ValueError("max_length counts the placeholder: it must be at least 2")
    return dict(
        do_sample=False,
        num_beams=num_beams,
        max_new_tokens=max_length,  # max_length - 1 real tokens (the placeholder takes a slot) + one forced eos
        min_new_tokens=0,  # 4.33's min_length=1 was already met by the placeholder
        length_penalty=length_penalty,
        early_stopping=False,
        num_return_sequences=1,
        repetition_penalty=None,  # replaced by the processor below, which skips the prompt
        logits_processor=LogitsProcessorList(
            [
                PlaceholderRepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_length, placeholder_token_id),
                ForcedEndAtMaxLengthLogitsProcessor(prompt_length, max_length, eos_token_id),
            ]
        ),
        pad_token_id=pad_token_id,  # finished rows are padded with Vicuna's pad id 0, as in the original
    )


def to_original_output_ids(
    sequences: torch.LongTensor,
    prompt_length: int,
    max_length: int = ORIGINAL_MAX_LENGTH,
    placeholder_token_id: int = ORIGINAL_PLACEHOLDER_TOKEN_ID,
    pad_token_id: int = ORIGINAL_PAD_TOKEN_ID,
    eos_token_id: int = ORIGINAL_EOS_TOKEN_ID,
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """`generate()` output (with `original_generation_kwargs`) -> (the authors' raw `llm_model.generate` ids, the ids
    they decode).

    raw: `[placeholder][generated ...]`, at most `max_length` wide (the forced final eos is dropped), finished rows
    padded with `pad_token_id`; decoded: raw with every `pad_token_id` rewritten to `eos_token_id` (the authors'
    `outputs[outputs == 0] = 2`, which also turns a generated `<unk>` into `</s>`).
    """
    generated = sequences[:, prompt_length:]
    placeholder = torch.full_like(generated[:, :1], placeholder_token_id)
    raw = torch.cat([placeholder, generated], dim=1)[:, :max_length]
    return raw, raw.masked_fill(raw == pad_token_id, eos_token_id)


__all__ = [
    "ForcedEndAtMaxLengthLogitsProcessor",
    "PlaceholderRepetitionPenaltyLogitsProcessor",
    "original_generation_kwargs",
    "to_original_output_ids",
]
