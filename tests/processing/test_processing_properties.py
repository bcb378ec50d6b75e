"""Property-based tests: arbitrary text and image shapes never crash the processor or the chat template except
with the documented errors."""

import warnings

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing.conversation import format_dialogue_prompt, normalize_text

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)


@SETTINGS
@given(prompt=text, answer=text)
def test_any_text_gives_well_formed_training_inputs(tiny_processor, prompt, answer):
    pair = (np.zeros((32, 32, 3), dtype=np.uint8), np.full((32, 32, 3), 255, dtype=np.uint8))
    inputs = tiny_processor(images=[pair], text=[prompt], answers=[answer])
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == 1
    assert (ids[0, :4] == tiny_processor.image_token_id).all()
    assert ids.shape[1] <= 4 + tiny_processor.max_prompt_tokens + tiny_processor.max_answer_tokens
    supervised = labels[0] != -100
    assert supervised.sum() >= 1 and labels[0][supervised][-1] == tiny_processor.tokenizer.eos_token_id
    generation = tiny_processor(images=[pair], text=[prompt])
    assert generation["input_ids"].shape[1] <= 4 + tiny_processor.max_prompt_tokens
    assert generation["qformer_input_ids"].shape[1] <= tiny_processor.max_prompt_tokens


@SETTINGS
@given(
    height=st.integers(1, 80),
    width=st.integers(1, 80),
    channels=st.sampled_from([None, 1, 3, 4]),
    dtype=st.sampled_from([np.uint8, np.float32]),
)
def test_any_image_shape_is_processed_or_refused_clearly(tiny_processor, height, width, channels, dtype):
    shape = (height, width) if channels is None else (height, width, channels)
    image = np.random.default_rng(0).random(shape)
    image = (image * 255).astype(np.uint8) if dtype == np.uint8 else image.astype(np.float32)
    try:
        pixels = tiny_processor.image_processor((image, image))["pixel_values"]
    except ValueError as error:
        assert "pixels" in str(error) or "image" in str(error)
        return
    assert pixels.shape == (1, 2, 3, 28, 28) and torch.isfinite(pixels).all()


@SETTINGS
@given(rounds=st.lists(st.tuples(text, text), max_size=6), question=text)
def test_chat_template_equals_the_python_prompt_format(tiny_processor, rounds, question):
    messages = []
    for asked, answered in rounds:
        messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
    messages.append({"role": "user", "content": question})
    rendered = tiny_processor.apply_chat_template(messages)
    clean = [(q.replace("<image>", "").strip(), a.replace("<image>", "").strip()) for q, a in rounds]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # long histories warn about truncation; the template truncates silently
        expected = normalize_text(format_dialogue_prompt(clean, question.replace("<image>", "").strip()))
    assert rendered == expected
