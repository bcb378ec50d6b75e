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
```

Images are anything `DeltaVLMProcessor` takes (PIL images, arrays, tensors, paths). The conversation is rendered
with the processor's chat template (`prompt_format="plain"` passes the last question verbatim).
"""

from transformers import AutoModelForImageTextToText, GenerationConfig, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

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

    def preprocess(self, inputs, prompt_format="deltavlm"):
        before, after, messages = _unpack(inputs)
        prompt = self.processor.apply_chat_template(messages, prompt_format=prompt_format)
        model_inputs = self.processor(images=[(before, after)], text=[prompt])
        return {**model_inputs, "messages": messages}

    def _forward(self, model_inputs, generate_kwargs=None):
        messages = model_inputs.pop("messages")
        prompt_length = model_inputs["input_ids"].shape[1]
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}))
        output_ids = self.model.generate(**model_inputs, **generate_kwargs)
        return {"output_ids": output_ids[:, prompt_length:], "messages": messages}

    def postprocess(self, model_outputs):
        answer = self.processor.batch_decode(model_outputs["output_ids"])[0]
        messages = [*model_outputs["messages"], {"role": "assistant", "content": answer}]
        return {"generated_text": answer, "messages": messages}


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


__all__ = ["BitemporalImageTextToTextPipeline", "TASK", "register_pipeline"]
