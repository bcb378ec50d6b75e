"""The `bitemporal-image-text-to-text` pipeline on a tiny random model saved to tmp: loading through
`transformers.pipeline`, the input forms, and equality with a direct `generate()`."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import modeling_deltavlm  # noqa: F401  (Auto-class registration)
from processing.pipeline_deltavlm import TASK, BitemporalImageTextToTextPipeline, collate_pairs, register_pipeline

GREEDY = dict(max_new_tokens=4, num_beams=1, do_sample=False)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def pipe(model_dir):
    from transformers import pipeline

    register_pipeline()
    return pipeline(TASK, model=str(model_dir))


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    return tuple(Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(2))


def direct_answer(pipe, pair, messages):
    """What generate() gives on the processor's inputs for this conversation."""
    processor = pipe.processor
    prompt = processor.apply_chat_template(messages)
    inputs = processor(images=[pair], text=[prompt])
    output_ids = pipe.model.generate(**inputs, **GREEDY, pad_token_id=processor.tokenizer.pad_token_id)
    return processor.batch_decode(output_ids, prompt_length=inputs["input_ids"].shape[1])[0]


def test_pipeline_loads_by_task_name(pipe):
    assert isinstance(pipe, BitemporalImageTextToTextPipeline)
    assert type(pipe.model).__name__ == "DeltaVLMForConditionalGeneration"


def test_register_twice_is_silent(caplog):
    register_pipeline()
    with caplog.at_level(logging.WARNING):
        register_pipeline()
    assert "Overwriting" not in caplog.text


def test_prompt_input_matches_direct_generate(pipe, pair):
    result = pipe({"before": pair[0], "after": pair[1], "prompt": "What has changed?"}, **GREEDY)
    expected = direct_answer(pipe, pair, [{"role": "user", "content": "What has changed?"}])
    assert result["generated_text"] == expected
    assert result["messages"] == [
        {"role": "user", "content": "What has changed?"},
        {"role": "assistant", "content": expected},
    ]


def test_conversation_input_and_keyword_form(pipe, pair):
    messages = [
        {"role": "user", "content": "Have these two images changed?"},
        {"role": "assistant", "content": "yes"},
        {"role": "user", "content": "What is new?"},
    ]
    result = pipe(before=pair[0], after=pair[1], messages=messages, **GREEDY)
    assert result["generated_text"] == direct_answer(pipe, pair, messages)
    assert result["messages"][:3] == messages and result["messages"][3]["role"] == "assistant"


def test_list_input_gives_one_result_per_item(pipe, pair, tmp_path):
    paths = []
    for name, image in zip(("a.png", "b.png"), pair):
        image.save(tmp_path / name)
        paths.append(str(tmp_path / name))
    inputs = [{"before": paths[0], "after": paths[1], "prompt": p} for p in ("What changed?", "Count the buildings.")]
    results = pipe(inputs, **GREEDY)
    assert len(results) == 2 and all(isinstance(r["generated_text"], str) for r in results)


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"before": "a.png", "prompt": "x"}, "missing after"),
        ({"before": "a.png", "after": "b.png"}, "exactly one of 'prompt'"),
        ({"before": "a.png", "after": "b.png", "prompt": "x", "messages": []}, "exactly one of 'prompt'"),
        ({"before": "a.png", "after": "b.png", "messages": [{"role": "assistant", "content": "x"}]}, "end with a user"),
        ("a.png", "takes a dict"),
        ({"before": "a.png", "after": "b.png", "messages": ["hi"]}, r"'messages'\[0\] must be a dict"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, inputs, message):
    with pytest.raises(ValueError, match=message):
        pipe(inputs)


def test_batched_answers_equal_one_at_a_time(pipe, sample_pairs):
    # prompts of different lengths: the stock collate right-padded input_ids, so the shorter row generated after [PAD]
    prompts = ["What changed?", "Count the new buildings along the road please, and the roads", "Where?"]
    inputs = [{"before": a, "after": b, "prompt": q} for (a, b), q in zip(sample_pairs, prompts)]
    one_by_one = [result["generated_text"] for result in pipe(inputs, batch_size=1, **GREEDY)]
    batched = pipe(inputs, batch_size=2, **GREEDY)  # a full batch, then a batch of one
    assert [result["generated_text"] for result in batched] == one_by_one
    assert [result["messages"][0]["content"] for result in batched] == prompts


def test_collate_gives_the_processors_batch_layout(pipe, sample_pairs):
    processor = pipe.processor
    prompts = ["q what changed", "q count the new buildings along the road please"]
    items = [pipe.preprocess({"before": a, "after": b, "prompt": q}, prompt_format="plain")
             for (a, b), q in zip(sample_pairs, prompts)]
    batch = collate_pairs(items, processor)
    expected = processor(images=sample_pairs[:2], text=prompts)
    for key in expected:
        assert torch.equal(batch[key], expected[key]), key
    assert batch["messages"] == [item["messages"] for item in items]


def test_several_return_sequences_come_back_as_a_list(pipe, pair):
    question = {"before": pair[0], "after": pair[1], "prompt": "What changed?"}
    results = pipe(question, num_beams=3, num_return_sequences=3, max_new_tokens=3)
    assert isinstance(results, list) and len(results) == 3
    assert all(r["messages"][-1] == {"role": "assistant", "content": r["generated_text"]} for r in results)
    best = pipe(question, num_beams=3, max_new_tokens=3)  # the top beam is the single answer
    assert results[0]["generated_text"] == best["generated_text"]
