"""Processor for DeltaVLM: image pairs + instructions -> model inputs.

Language-model sequences (Q = num_query_tokens image placeholders, `<s>` = the tokenizer's bos,
which for the released checkpoint is `</s>`, id 2):

    generation (left padding):  [<image> x Q][pad ...][<s> prompt]
    training   (right padding): [<image> x Q][<s> prompt][answer </s>][pad ...]
    labels:                     -100 ...................[answer </s>][-100 ...]

which is the authors' layout token for token. The prompt also goes, in BERT's vocabulary, to the Q-Former
(`qformer_input_ids`).
"""

import warnings

import torch
from transformers import AddedToken
from transformers.image_processing_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

from .conversation import (
    IMAGE_PLACEHOLDER,
    MAX_PROMPT_WORDS,
    format_dialogue_prompt,
    messages_to_rounds,
    normalize_text,
    strip_image_placeholders,
)

# Renders a conversation the way the released checkpoint saw it (authors' dataset.py + LAVIS blip_caption):
# "q: Q1 a: A1  q: Q2" -> lowercase, `. ! " ( ) * # : ; ~` removed, whitespace collapsed, last 50 words kept.
# `prompt_format="plain"` renders the last user message verbatim (what the authors' inference scripts fed).
DELTAVLM_CHAT_TEMPLATE = (
    "{%- set ns = namespace(text='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set content = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join(' ') -%}{%- endif -%}"
    "{%- set content = content | replace('<image>', '') | trim -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- set ns.text = (ns.text ~ '  q: ' ~ content) if prompt_format != 'plain' else content -%}"
    "{%- elif message['role'] == 'assistant' and prompt_format != 'plain' -%}"
    "{%- set ns.text = ns.text ~ ' a: ' ~ content -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if prompt_format == 'plain' -%}{{ ns.text }}"
    "{%- else -%}"
    "{%- set words = (ns.text | lower | replace('.', ' ') | replace('!', ' ') | replace('\"', ' ') | replace('(', ' ')"
    " | replace(')', ' ') | replace('*', ' ') | replace('#', ' ') | replace(':', ' ') | replace(';', ' ')"
    " | replace('~', ' ')).split() -%}"
    "{{ words[-(max_words | default(50)):] | join(' ') }}"
    "{%- endif -%}"
)

PROMPT_FORMATS = ("deltavlm", "plain")
# Tokenizer call options a user may pass out of habit; the processor decides them itself.
TOKENIZER_OPTIONS = frozenset({"padding", "truncation", "max_length", "padding_side", "add_special_tokens",
                               "return_attention_mask", "pad_to_multiple_of"})
IMAGE_TOKEN = IMAGE_PLACEHOLDER  # the text placeholder is also the added token whose id marks the query positions


class DeltaVLMProcessor(ProcessorMixin):
    r"""
    Holds the [`DeltaVLMImageProcessor`], the language model's tokenizer and the Q-Former's (BERT) tokenizer.

    Call it with `images=[(before, after), ...]` and `text=[prompt, ...]` (one prompt per pair) for generation,
    and add `answers=[...]` for training (labels are returned). Prompts are used as given, except that `<image>`
    placeholders (ChangeChat questions start with `<image> <image>`) are removed from prompts and answers, as
    `apply_chat_template` does: the processor places the image tokens itself. Render conversations first with
    `apply_chat_template`.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        qformer_tokenizer=None,
        num_query_tokens: int = 32,
        max_prompt_tokens: int = 128,
        max_answer_tokens: int = 256,
        llm_prompt_prefix: str = "",
        llm_prompt_suffix: str = "",
        chat_template: str | None = None,
        prompt_format: str = "deltavlm",
        **kwargs,
    ):
        if tokenizer is not None and IMAGE_TOKEN not in tokenizer.get_vocab():
            tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, normalized=False, special=True)], special_tokens=True)
        self.num_query_tokens = num_query_tokens
        self.max_prompt_tokens = max_prompt_tokens
        self.max_answer_tokens = max_answer_tokens
        # Text around every prompt on the language-model side only (the Q-Former sees the bare prompt): empty for
        # the released checkpoint; a chat-tuned LLM (DeltaVLM-Nano's SmolLM2) gets its own turn markers here, in
        # training and inference alike.
        self.llm_prompt_prefix = llm_prompt_prefix
        self.llm_prompt_suffix = llm_prompt_suffix
        # The prompt format the model was trained with, saved with the processor: `apply_chat_template` and the
        # CLIs use it unless told otherwise, so a model trained on bare questions is not asked in another format
        # (the authors evaluated with prompts that differed from their training prompts).
        self.prompt_format = _checked_prompt_format(prompt_format)
        super().__init__(
            image_processor,
            tokenizer,
            qformer_tokenizer,
            chat_template=chat_template if chat_template is not None else DELTAVLM_CHAT_TEMPLATE,
            **kwargs,
        )

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "qformer_input_ids", "qformer_attention_mask", "pixel_values"]

    def __call__(
        self,
        images=None,
        text: str | list[str] | None = None,
        answers: str | list[str] | None = None,
        return_tensors: str = "pt",
        **kwargs,
    ) -> BatchFeature:
        r"""
        images: one `(before, after)` pair or a list of pairs (PIL images, arrays, tensors or file paths).
        text: one prompt per pair.
        answers: one target per pair (training): switches to right padding and adds `labels`.

        Returns a `BatchFeature` with `pixel_values` `(B, 2, 3, H, W)`, `input_ids`/`attention_mask` `(B, T)`,
        `qformer_input_ids`/`qformer_attention_mask` `(B, L)` and, with answers, `labels` `(B, T)`.
        """
        if return_tensors != "pt":
            raise ValueError("DeltaVLMProcessor returns PyTorch tensors only (return_tensors='pt')")
        text_options = sorted(TOKENIZER_OPTIONS.intersection(kwargs))
        if text_options:  # they would reach the image processor and fail there with a confusing TypeError
            raise ValueError(
                f"DeltaVLMProcessor does not take {', '.join(text_options)}: it pads (left for generation, right for "
                "training) and truncates to max_prompt_tokens / max_answer_tokens itself; set those on the processor"
            )
        if text is None:
            raise ValueError("text is required: one prompt per image pair")
        if not isinstance(text, (str, list, tuple)):
            raise ValueError(f"text must be a string or a list of strings, got {type(text).__name__}")
        prompts = [text] if isinstance(text, str) else list(text)
        if not prompts or not all(isinstance(prompt, str) for prompt in prompts):
            raise ValueError("text must be a string or a non-empty list of strings")
        prompts = _without_image_placeholders(prompts)
        encoding = {}
        if images is not None:
            encoding.update(self.image_processor(images, **kwargs))
            num_pairs = encoding["pixel_values"].shape[0]
            if num_pairs != len(prompts):
                raise ValueError(f"{num_pairs} image pairs but {len(prompts)} prompts: give one prompt per pair")
        if answers is None:
            encoding.update(self._encode_prompts(prompts))
        else:
            targets = [answers] if isinstance(answers, str) else list(answers)
            bad = next((i for i, target in enumerate(targets) if not isinstance(target, str)), None)
            if bad is not None:
                raise ValueError(f"answers[{bad}] must be a string, got {type(targets[bad]).__name__}")
            if len(targets) != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {len(targets)} answers: give one answer per prompt")
            targets = _without_image_placeholders(targets)
            encoding.update(self._encode_for_training(prompts, targets))
        encoding.update(self._encode_qformer(prompts))
        return BatchFeature(encoding)

    # --- tokenisation, batched; no per-sample Python loops over tensors ---

    def _tokenize(self, texts: list[str], max_length: int, side: str, truncation_side: str):
        """(ids, mask) of shape (B, L), padded on `side`, without special tokens."""
        tokenizer = self.tokenizer
        saved = tokenizer.padding_side, tokenizer.truncation_side
        tokenizer.padding_side, tokenizer.truncation_side = side, truncation_side
        try:
            encoded = tokenizer(
                texts,
                add_special_tokens=False,
                padding="longest",
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            )
        finally:
            tokenizer.padding_side, tokenizer.truncation_side = saved
        full_rows = [texts[i] for i in (encoded["attention_mask"].sum(dim=1) == max_length).nonzero().flatten().tolist()]
        if full_rows:  # a row at the limit may have been cut: count its tokens untruncated (rare, so cheap)
            lengths = [len(ids) for ids in tokenizer(full_rows, add_special_tokens=False)["input_ids"]]
            if max(lengths) > max_length:
                kept = "last" if truncation_side == "left" else "first"
                warnings.warn(
                    f"text of {max(lengths)} tokens truncated to its {kept} {max_length} "
                    "(raise max_prompt_tokens / max_answer_tokens to keep more)",
                    stacklevel=4,
                )
        return encoded["input_ids"], encoded["attention_mask"]

    def _wrap(self, prompts: list[str]) -> list[str]:
        if not (self.llm_prompt_prefix or self.llm_prompt_suffix):
            return prompts
        return [self.llm_prompt_prefix + prompt + self.llm_prompt_suffix for prompt in prompts]

    def _tokenize_prompts(self, prompts: list[str], max_length: int, side: str):
        """(ids, mask) of shape (B, L) of `llm_prompt_prefix + prompt + llm_prompt_suffix`, padded on `side`.

        A row over `max_length` tokens loses the beginning of its prompt (the current question is at the end), never
        the prefix or suffix: they are the chat-turn markers the language model was trained with, and cutting the
        wrapped text from the left would drop the prefix first."""
        if not (self.llm_prompt_prefix or self.llm_prompt_suffix):
            return self._tokenize(prompts, max_length, side=side, truncation_side="left")
        rows = self.tokenizer(self._wrap(prompts), add_special_tokens=False)["input_ids"]
        cut_lengths = []
        for index, prompt in enumerate(prompts):
            if len(rows[index]) > max_length:
                cut_lengths.append(len(rows[index]))
                rows[index] = self._wrapped_prompt_end(prompt, len(rows[index]), max_length)
        if cut_lengths:
            warnings.warn(
                f"prompt of {max(cut_lengths)} tokens truncated to {max_length}: its beginning dropped, "
                "llm_prompt_prefix and llm_prompt_suffix kept (raise max_prompt_tokens to keep more)",
                stacklevel=4,
            )
        padded = self.tokenizer.pad({"input_ids": rows}, padding="longest", padding_side=side, return_tensors="pt")
        return padded["input_ids"], padded["attention_mask"]

    def _wrapped_prompt_end(self, prompt: str, num_wrapped_tokens: int, max_length: int) -> list[int]:
        """Token ids of prefix + (the longest end of `prompt`, cut at one of its token boundaries) + suffix that fit in
        `max_length`: the cut text is tokenized whole, exactly as if it had been the prompt."""
        tokenizer = self.tokenizer
        offsets = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        num_wrapper_tokens = num_wrapped_tokens - len(offsets)  # prefix and suffix, about (merges at the seams)
        # first guess from the counts; one more prompt token off per try when a seam merges differently
        for first_token in range(max(0, len(offsets) - (max_length - num_wrapper_tokens)), len(offsets) + 1):
            end = prompt[offsets[first_token][0] :].lstrip() if first_token < len(offsets) else ""
            ids = tokenizer(self._wrap([end])[0], add_special_tokens=False)["input_ids"]
            if len(ids) <= max_length:
                return ids
        raise ValueError(
            f"max_prompt_tokens={self.max_prompt_tokens} leaves no room for llm_prompt_prefix and llm_prompt_suffix "
            f"({len(ids)} tokens, plus bos)"
        )

    def _pad_id(self) -> int:
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            raise ValueError("the language-model tokenizer has no pad token; set tokenizer.pad_token")
        return pad_id

    def _with_image_tokens(self, input_ids, attention_mask, labels=None) -> dict:
        batch_size = input_ids.shape[0]
        image_ids = torch.full((batch_size, self.num_query_tokens), self.image_token_id, dtype=input_ids.dtype)
        result = {
            "input_ids": torch.cat([image_ids, input_ids], dim=1),
            "attention_mask": torch.cat([torch.ones_like(image_ids), attention_mask], dim=1),
        }
        if labels is not None:
            result["labels"] = torch.cat([torch.full_like(image_ids, -100), labels], dim=1)
        return result

    def _encode_prompts(self, prompts: list[str]) -> dict:
        """Generation layout, left padded: [image x Q][pad ...][bos prompt]."""
        bos_id = self.tokenizer.bos_token_id
        budget = self.max_prompt_tokens - (bos_id is not None)
        ids, mask = self._tokenize_prompts(prompts, budget, side="left")
        if bos_id is not None:
            # Put bos right before each prompt's first token, i.e. in the last padding column.
            column = (ids.shape[0], 1)  # (not ids[:, :1]: every prompt may be empty, leaving zero columns)
            ids = torch.cat([torch.full(column, self._pad_id(), dtype=ids.dtype), ids], dim=1)
            mask = torch.cat([torch.zeros(column, dtype=mask.dtype), mask], dim=1)
            bos_column = (ids.shape[1] - 1 - mask.sum(dim=1)).unsqueeze(1)  # (B, 1)
            ids.scatter_(1, bos_column, bos_id)
            mask.scatter_(1, bos_column, 1)
        ids = ids.masked_fill(mask == 0, self._pad_id())
        return self._with_image_tokens(ids, mask)

    def _encode_for_training(self, prompts: list[str], answers: list[str]) -> dict:
        """Training layout, right padded: [image x Q][bos prompt][answer eos][pad ...], labels on answer + eos."""
        bos_id, eos_id, pad_id = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id, self._pad_id()
        if eos_id is None:
            raise ValueError("the language-model tokenizer has no eos token; training needs one to end answers")
        prompt_ids, prompt_mask = self._tokenize_prompts(
            prompts, self.max_prompt_tokens - (bos_id is not None), side="right"
        )
        answer_ids, answer_mask = self._tokenize(answers, self.max_answer_tokens - 1, side="right", truncation_side="right")
        batch_size = prompt_ids.shape[0]
        # one spare padding column, so the gathers below have something to index when every prompt is empty
        prompt_ids = torch.cat([prompt_ids, torch.full((batch_size, 1), pad_id, dtype=prompt_ids.dtype)], dim=1)
        prompt_mask = torch.cat([prompt_mask, torch.zeros((batch_size, 1), dtype=prompt_mask.dtype)], dim=1)
        if bos_id is not None:
            prompt_ids = torch.cat([torch.full((batch_size, 1), bos_id, dtype=prompt_ids.dtype), prompt_ids], dim=1)
            prompt_mask = torch.cat([torch.ones((batch_size, 1), dtype=prompt_mask.dtype), prompt_mask], dim=1)
        # append eos after each answer's last token
        answer_ids = torch.cat([answer_ids, torch.full((batch_size, 1), pad_id, dtype=answer_ids.dtype)], dim=1)
        answer_mask = torch.cat([answer_mask, torch.zeros((batch_size, 1), dtype=answer_mask.dtype)], dim=1)
        answer_lengths = answer_mask.sum(dim=1, keepdim=True)
        answer_ids.scatter_(1, answer_lengths, eos_id)
        answer_mask.scatter_(1, answer_lengths, 1)

        # Concatenate [prompt_i][answer_i] per row with one gather: column j of row i reads the prompt while
        # j < len(prompt_i), then the answer.
        prompt_lengths = prompt_mask.sum(dim=1, keepdim=True)  # (B, 1)
        total_lengths = prompt_lengths + answer_lengths + 1
        columns = torch.arange(int(total_lengths.max())).unsqueeze(0)  # (1, T)
        in_prompt = columns < prompt_lengths
        in_answer = (columns >= prompt_lengths) & (columns < total_lengths)
        prompt_part = prompt_ids.gather(1, columns.clamp(max=prompt_ids.shape[1] - 1).expand(batch_size, -1))
        answer_index = (columns - prompt_lengths).clamp(min=0, max=answer_ids.shape[1] - 1)
        answer_part = answer_ids.gather(1, answer_index)
        input_ids = torch.where(in_prompt, prompt_part, torch.where(in_answer, answer_part, pad_id))
        attention_mask = (in_prompt | in_answer).long()
        # Loss only on the answer and its eos: the prompt is given, not predicted.
        labels = torch.where(in_answer, answer_part, -100)
        return self._with_image_tokens(input_ids, attention_mask, labels)

    def _encode_qformer(self, prompts: list[str]) -> dict:
        tokenizer = self.qformer_tokenizer
        saved = tokenizer.truncation_side
        tokenizer.truncation_side = "left"  # keep the end of long dialogues: the current question
        try:
            encoded = tokenizer(
                prompts, padding="longest", truncation=True, max_length=self.max_prompt_tokens, return_tensors="pt"
            )
        finally:
            tokenizer.truncation_side = saved
        return {"qformer_input_ids": encoded["input_ids"], "qformer_attention_mask": encoded["attention_mask"]}

    # --- chat and decoding ---

    def apply_chat_template(self, conversation, chat_template=None, prompt_format: str | None = None, **kwargs):
        """Render a conversation ([{"role": "user"|"assistant", "content": ...}, ...] ending with the question)
        or a batch of them into prompt strings. `prompt_format`: "deltavlm" (the released checkpoint's
        training format) or "plain" (the last question verbatim); default: the processor's `prompt_format`,
        the format the model was trained with."""
        prompt_format = _checked_prompt_format(self.prompt_format if prompt_format is None else prompt_format)
        batched = isinstance(conversation, (list, tuple)) and bool(conversation) and isinstance(conversation[0], (list, tuple))
        for index, messages in enumerate(conversation if batched else [conversation]):
            try:  # the template itself would render a missing turn or an empty conversation without a word
                history, question = messages_to_rounds(messages)
            except ValueError as error:
                raise ValueError(f"conversation {index}: {error}" if batched else str(error)) from None
            if prompt_format == "deltavlm":  # the template keeps the last max_words words: say so when it cuts
                max_words = kwargs.get("max_words", MAX_PROMPT_WORDS)
                num_words = len(normalize_text(format_dialogue_prompt(history, question), max_words=None).split())
                if num_words > max_words:
                    warnings.warn(
                        f"conversation of {num_words} words truncated to its last {max_words} (the question is kept)",
                        stacklevel=2,
                    )
        kwargs.setdefault("tokenize", False)
        return super().apply_chat_template(conversation, chat_template=chat_template, prompt_format=prompt_format, **kwargs)

    def batch_decode(self, sequences, prompt_length: int | None = None, skip_special_tokens: bool = True, **kwargs):
        """Decode generated ids; with `prompt_length` (the input_ids width) the prompt is cut off first."""
        if prompt_length is not None:
            sequences = sequences[:, prompt_length:]
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [text.strip() for text in texts]

    def decode(self, sequence, skip_special_tokens: bool = True, **kwargs):
        return self.tokenizer.decode(sequence, skip_special_tokens=skip_special_tokens, **kwargs).strip()


def _checked_prompt_format(prompt_format: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    return prompt_format


def _without_image_placeholders(texts: list[str]) -> list[str]:
    """`texts` with every `<image>` removed, as the chat template removes it. Tokenized, a placeholder would become
    the image-token id: one more image token than the model has queries to write there (the forward refuses the
    row), an image id among the labels, and the literal text for the Q-Former. Texts without one stay unchanged."""
    return [
        strip_image_placeholders(text) if isinstance(text, str) and IMAGE_PLACEHOLDER in text else text for text in texts
    ]


__all__ = ["DeltaVLMProcessor"]
