"""A transformers pipeline for DeltaVLM: a (before, after) pair and a prompt or conversation in, an answer out.

```python
import modeling_deltavlm  # registers DeltaVLM, and this pipeline's task name, with transformers
from transformers import pipeline

pipe = pipeline("bitemporal-image-text-to-text", model="path/to/deltavlm-folder")
pipe({"before": "A.png", "after": "B.png", "prompt": "Please briefly describe the changes in these two images."})
# {"generated_text": "...", "messages": [..., {"role": "assistant", "content": "..."}]}
pipe({"before": a, "after": b, "messages": [{"role": "user", "content": "..."}, ...]})
pipe(before=a, after=b, prompt="...")      # the same, as keyword arguments
pipe([{...}, {...}])                        # a list of inputs -> a list of results
pipe([{...}, {...}], batch_size=8)          # generated in batches: the same answers as one at a time
```

Images are anything `DeltaVLMProcessor` takes (PIL images, arrays, tensors, paths). The conversation is rendered
with the processor's chat template (`prompt_format="plain"` passes the last question verbatim).
"""

import functools
from collections.abc import Sized

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForImageTextToText, GenerationConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY
from transformers.pipelines.pt_utils import PipelineDataset, PipelineIterator

TASK = "bitemporal-image-text-to-text"


class BitemporalImageTextToTextPipeline(Pipeline):
    """Answers a prompt, or the last user message of a conversation, about a bi-temporal image pair."""

    # the processor carries both tokenizers and the image processor; nothing else is loaded
    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=256)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.processor is None:
            raise ValueError(f"the {TASK} pipeline needs the model's processor (DeltaVLMProcessor)")
        # Rows are left-padded with [PAD]; without this generate() would fall back to eos and warn.
        tokenizer = self.processor.tokenizer
        if tokenizer.pad_token_id is not None:
            self._generation_defaults.setdefault("pad_token_id", tokenizer.pad_token_id)

    def __call__(self, inputs=None, **kwargs):
        if inputs is None and "before" in kwargs:
            inputs = {key: kwargs.pop(key) for key in ("before", "after", "prompt", "messages") if key in kwargs}
        return super().__call__(inputs, **kwargs)

    def get_iterator(self, inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params):
        """transformers' iterator with `collate_pairs` as the batch collate (batch_size > 1). The stock collate pads
        input_ids on the right, after the prompt, so a shorter prompt's row would generate after [PAD] tokens."""
        if batch_size == 1:
            return super().get_iterator(
                inputs, num_workers, batch_size, preprocess_params, forward_params, postprocess_params
            )
        if isinstance(inputs, Sized):
            dataset = PipelineDataset(inputs, self.preprocess, preprocess_params)
        else:  # a generator: one worker, as the stock iterator does
            dataset, num_workers = PipelineIterator(inputs, self.preprocess, preprocess_params), min(num_workers, 1)
        collate = functools.partial(collate_pairs, processor=self.processor)
        loader = DataLoader(dataset, num_workers=num_workers, batch_size=batch_size, collate_fn=collate)
        model_iterator = PipelineIterator(loader, self.forward, forward_params, loader_batch_size=batch_size)
        return PipelineIterator(model_iterator, self.postprocess, postprocess_params)

    def _sanitize_parameters(self, prompt_format=None, max_new_tokens=None, generate_kwargs=None, **kwargs):
        preprocess_params, forward_params = {}, {}
        if prompt_format is not None:
            preprocess_params["prompt_format"] = prompt_format
        generate_kwargs = dict(generate_kwargs or {})
        if max_new_tokens is not None:
            generate_kwargs["max_new_tokens"] = max_new_tokens
        generate_kwargs.update(kwargs)  # e.g. num_beams=5 passed straight to the call
        if generate_kwargs:
            forward_params["generate_kwargs"] = generate_kwargs
        return preprocess_params, forward_params, {}

    def preprocess(self, inputs, prompt_format=None):  # None: the processor's (the format the model learned)
        before, after, messages = _unpack(inputs)
        prompt = self.processor.apply_chat_template(messages, prompt_format=prompt_format)
        model_inputs = self.processor(images=[(before, after)], text=[prompt])
        return {**model_inputs, "messages": messages}

    def _forward(self, model_inputs, generate_kwargs=None):
        messages = model_inputs.pop("messages")
        prompt_length = model_inputs["input_ids"].shape[1]
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)
        # (B * n, T) -> (B, n, T): the pipeline's unbatching then hands each pair its n answers
        batch_size = model_inputs["input_ids"].shape[0]
        output_ids = output_ids[:, prompt_length:].reshape(batch_size, -1, output_ids.shape[1] - prompt_length)
        return {"output_ids": output_ids, "messages": messages}

    def postprocess(self, model_outputs):
        """One answer: {"generated_text", "messages"}; with num_return_sequences=n > 1, a list of n of them."""
        output_ids = model_outputs["output_ids"]
        answers = self.processor.batch_decode(output_ids.reshape(-1, output_ids.shape[-1]))
        results = [{"generated_text": answer, "messages": [*model_outputs["messages"],
                                                           {"role": "assistant", "content": answer}]}
                   for answer in answers]
        return results[0] if len(results) == 1 else results


def collate_pairs(items: list[dict], processor) -> dict:
    """Batch the `preprocess` outputs of single pairs into the layout `processor(images=pairs, text=prompts)` gives.

    input_ids / attention_mask (1, T_i) -> (B, T): the Q image tokens stay in front and the text is left-padded after
    them with the tokenizer's pad id, `[image x Q][pad ...][<s> prompt]`, so every prompt ends in the last column
    where generation continues (generation from a right-padded row would follow [PAD] tokens). The Q-Former
    sequences are right-padded (bidirectional: padding is masked, not generated after). pixel_values
    (1, 2, C, H, W) -> (B, 2, C, H, W). Anything else (the conversations) becomes a list.
    """
    num_image_tokens = processor.num_query_tokens
    batch = {
        "input_ids": _pad([item["input_ids"] for item in items], processor.tokenizer.pad_token_id, num_image_tokens),
        "attention_mask": _pad([item["attention_mask"] for item in items], 0, num_image_tokens),
        "pixel_values": torch.cat([item["pixel_values"] for item in items]),
    }
    qformer_pad_id = processor.qformer_tokenizer.pad_token_id or 0
    batch["qformer_input_ids"] = _pad([item["qformer_input_ids"] for item in items], qformer_pad_id, None)
    batch["qformer_attention_mask"] = _pad([item["qformer_attention_mask"] for item in items], 0, None)
    for key in items[0].keys() - batch.keys():
        batch[key] = [item[key] for item in items]
    return batch


def _pad(rows: list[torch.Tensor], value: int, left_after: int | None) -> torch.Tensor:
    """(1, T_i) tensors -> (B, max T_i): padded on the left after the first `left_after` columns, or on the right
    when `left_after` is None."""
    width = max(row.shape[1] for row in rows)
    padded = []
    for row in rows:
        padding = row.new_full((1, width - row.shape[1]), value)
        if left_after is None:
            padded.append(torch.cat([row, padding], dim=1))
        else:
            padded.append(torch.cat([row[:, :left_after], padding, row[:, left_after:]], dim=1))
    return torch.cat(padded)


def _unpack(inputs) -> tuple:
    """{"before", "after", "prompt" | "messages"} -> (before, after, messages)."""
    if not isinstance(inputs, dict):
        raise ValueError(f"{TASK} takes a dict with 'before', 'after' and 'prompt' or 'messages'; got {type(inputs).__name__}")
    missing = [key for key in ("before", "after") if inputs.get(key) is None]
    if missing:
        raise ValueError(f"input is missing {' and '.join(missing)}: a pair needs both images")
    if ("prompt" in inputs) == ("messages" in inputs):
        raise ValueError("give exactly one of 'prompt' (a question) and 'messages' (a conversation)")
    if "prompt" in inputs:
        if not isinstance(inputs["prompt"], str) or not inputs["prompt"].strip():
            raise ValueError("'prompt' must be a non-empty string")
        messages = [{"role": "user", "content": inputs["prompt"]}]
    else:
        messages = list(inputs["messages"])
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError(f"'messages'[{index}] must be a dict with 'role' and 'content', got {message!r}")
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("'messages' must end with a user message (the question to answer)")
    return inputs["before"], inputs["after"], messages


def register_pipeline() -> None:
    """Make `pipeline("bitemporal-image-text-to-text", model=...)` work. Safe to call more than once (transformers
    warns when a task is registered again, so later calls do nothing)."""
    registered = PIPELINE_REGISTRY.supported_tasks.get(TASK)
    if registered is not None and registered["impl"] is BitemporalImageTextToTextPipeline:
        return
    PIPELINE_REGISTRY.register_pipeline(
        TASK, pipeline_class=BitemporalImageTextToTextPipeline, pt_model=AutoModelForImageTextToText, type="multimodal"
    )


__all__ = ["BitemporalImageTextToTextPipeline", "TASK", "collate_pairs", "register_pipeline"]
