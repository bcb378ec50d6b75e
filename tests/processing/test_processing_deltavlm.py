import numpy as np
import pytest
import torch
from PIL import Image

import modeling_deltavlm  # noqa: F401  (Auto-class registration)
from processing import DeltaVLMProcessor
from transformers import AutoProcessor
from processing.conversation import expand_rounds, format_dialogue_prompt, normalize_text


def _pair_as(form, pair):
    before, after = (Image.open(path).convert("RGB") for path in pair)
    if form == "path":
        return pair
    if form == "pil":
        return (before, after)
    if form == "numpy":
        return (np.array(before), np.array(after))
    if form == "tensor_chw":
        return (torch.from_numpy(np.array(before)).permute(2, 0, 1), torch.from_numpy(np.array(after)).permute(2, 0, 1))
    raise AssertionError(form)


@pytest.mark.parametrize("form", ["path", "pil", "numpy", "tensor_chw"])
def test_every_input_form_gives_the_same_pixels(tiny_processor, sample_pairs, form):
    reference = tiny_processor.image_processor(sample_pairs[0])["pixel_values"]
    pixels = tiny_processor.image_processor(_pair_as(form, sample_pairs[0]))["pixel_values"]
    assert pixels.shape == (1, 2, 3, 28, 28)
    torch.testing.assert_close(pixels, reference, rtol=0, atol=1e-6)


def test_pixel_values_match_the_authors_preprocessing(tiny_processor, shared_dir):
    import json

    from safetensors.torch import load_file

    fixture = shared_dir / "fixtures" / "original_tiny"
    samples = json.loads((fixture / "expected.json").read_text())["samples"]
    expected = load_file(fixture / "expected.safetensors")
    pairs = [(str(shared_dir / s["image_A"]), str(shared_dir / s["image_B"])) for s in samples]
    pixels = tiny_processor.image_processor(pairs)["pixel_values"]
    torch.testing.assert_close(pixels[:, 0], expected["pixel_values_A"], rtol=0, atol=1e-6)
    torch.testing.assert_close(pixels[:, 1], expected["pixel_values_B"], rtol=0, atol=1e-6)


def test_batch_of_pairs_and_stacked_array(tiny_processor, sample_pairs):
    batch = tiny_processor.image_processor(sample_pairs[:4])["pixel_values"]
    assert batch.shape == (4, 2, 3, 28, 28)
    stacked = np.stack([np.stack([np.array(Image.open(p)) for p in pair]) for pair in sample_pairs[:4]])  # (4, 2, H, W, 3)
    torch.testing.assert_close(tiny_processor.image_processor(stacked)["pixel_values"], batch, rtol=0, atol=1e-6)


def test_single_image_or_three_images_are_refused(tiny_processor, sample_pairs):
    before = sample_pairs[0][0]
    with pytest.raises(ValueError, match="single image"):
        tiny_processor(images=before, text="q describe")
    with pytest.raises(ValueError, match="exactly 2"):
        tiny_processor(images=[before, before, before], text="q describe")
    with pytest.raises(ValueError, match="item 1 has 3 images"):
        tiny_processor(images=[sample_pairs[0], (before, before, before)], text=["a", "b"])
    with pytest.raises(ValueError, match="2 image pairs but 1 prompts"):
        tiny_processor(images=sample_pairs[:2], text=["only one"])
    with pytest.raises(FileNotFoundError, match="missing.png"):
        tiny_processor(images=(before, "/nonexistent/missing.png"), text="q describe")


def test_generation_layout_is_left_padded_after_image_tokens(tiny_processor, sample_pairs):
    inputs = tiny_processor(images=sample_pairs[:2], text=["q a much longer prompt than the other one", "q short"])
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert torch.equal(ids[:, :4], torch.full((2, 4), 501))
    assert mask[1, 4] == 0 and ids[1, 4] == 500  # the shorter row is padded between image tokens and text
    first_text = (mask[1, 4:] == 1).nonzero()[0].item() + 4
    assert ids[1, first_text] == 2  # bos '</s>' right before the prompt, as the authors' tokenizer set-up gives
    assert "labels" not in inputs
    assert inputs["qformer_input_ids"][0, 0] == 101 and inputs["qformer_attention_mask"].shape[0] == 2


def test_training_layout_and_labels(tiny_processor, sample_pairs):
    prompts, answers = ["q describe the changes", "q describe"], ["several houses appear", "a road"]
    inputs = tiny_processor(images=sample_pairs[:2], text=prompts, answers=answers)
    tokenizer = tiny_processor.tokenizer
    for row in range(2):
        mask = inputs["attention_mask"][row].bool()
        ids = inputs["input_ids"][row][mask].tolist()
        prompt = tokenizer(prompts[row], add_special_tokens=False)["input_ids"]
        answer = tokenizer(answers[row], add_special_tokens=False)["input_ids"]
        assert ids == [501] * 4 + [2] + prompt + answer + [2]
        labels = inputs["labels"][row]
        assert labels[mask].tolist() == [-100] * (5 + len(prompt)) + answer + [2]
        assert (labels[~mask] == -100).all()
        assert mask[: mask.sum()].all()  # right padding


def test_long_prompts_are_truncated_from_the_left_keeping_the_question(tiny_processor, sample_pairs):
    question = "q how many roads changed"
    long_prompt = " ".join(["a no q is it so"] * 60) + " " + question
    inputs = tiny_processor(images=sample_pairs[:1], text=[long_prompt])
    assert inputs["input_ids"].shape[1] == 4 + tiny_processor.max_prompt_tokens
    tail = tiny_processor.tokenizer.decode(inputs["input_ids"][0, -8:])
    assert tail.strip().endswith("how many roads changed")
    assert inputs["input_ids"][0, 4] == 2  # bos kept
    assert inputs["qformer_input_ids"].shape[1] == tiny_processor.max_prompt_tokens
    assert inputs["qformer_input_ids"][0, -1] == 102  # [SEP] kept at the end


def test_chat_template_matches_the_training_format_character_by_character(tiny_processor):
    conversation = [
        {"role": "user", "content": "<image> <image> Please judge whether these two images have changed. Please answer yes or no."},
        {"role": "assistant", "content": "No"},
        {"role": "user", "content": "Please determine how many roads and buildings have changed?"},
    ]
    expected = (
        "q please judge whether these two images have changed please answer yes or no a no "
        "q please determine how many roads and buildings have changed?"
    )
    assert tiny_processor.apply_chat_template(conversation) == expected
    # the same text as the pure-Python path training uses
    rounds = [(conversation[0]["content"].replace("<image>", "").strip(), "No"), (conversation[2]["content"], "x")]
    assert normalize_text(expand_rounds(rounds)[1][0]) == expected
    typed = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Please briefly describe the changes in these two images."}]}]
    assert tiny_processor.apply_chat_template(typed) == "q please briefly describe the changes in these two images"
    assert tiny_processor.apply_chat_template(conversation, prompt_format="plain") == conversation[2]["content"]
    batch = tiny_processor.apply_chat_template([conversation, typed])
    assert batch == [expected, "q please briefly describe the changes in these two images"]


def test_chat_template_keeps_the_last_fifty_words(tiny_processor):
    history = []
    for index in range(12):
        history += [{"role": "user", "content": f"question number {index} here"}, {"role": "assistant", "content": "yes"}]
    conversation = history + [{"role": "user", "content": "Where did the buildings change?"}]
    rendered = tiny_processor.apply_chat_template(conversation)
    assert len(rendered.split()) == 50 and rendered.endswith("q where did the buildings change?")
    with pytest.warns(UserWarning, match="truncated"):
        python_side = normalize_text(format_dialogue_prompt(
            [(f"question number {i} here", "yes") for i in range(12)], "Where did the buildings change?"
        ))
    assert python_side == rendered


def test_batch_decode_strips_the_prompt(tiny_processor, sample_pairs):
    inputs = tiny_processor(images=sample_pairs[:1], text=["q describe"])
    width = inputs["input_ids"].shape[1]
    answer = tiny_processor.tokenizer("several houses appear", add_special_tokens=False)["input_ids"]
    generated = torch.cat([inputs["input_ids"], torch.tensor([answer + [2]])], dim=1)
    assert tiny_processor.batch_decode(generated, prompt_length=width) == ["several houses appear"]


def test_save_load_round_trip_keeps_both_tokenizers(tmp_path, tiny_processor, sample_pairs, make_tiny_config):
    make_tiny_config().save_pretrained(tmp_path)  # a processor lives in a model folder: the image processor is found by model_type
    tiny_processor.save_pretrained(tmp_path)
    assert (tmp_path / "qformer_tokenizer").is_dir() and (tmp_path / "chat_template.jinja").is_file()
    loaded = AutoProcessor.from_pretrained(tmp_path)
    assert isinstance(loaded, DeltaVLMProcessor)
    assert loaded.qformer_tokenizer.bos_token == "[DEC]" and len(loaded.qformer_tokenizer) == 30523
    assert loaded.tokenizer.pad_token_id == 500 and loaded.tokenizer.bos_token_id == 2 and loaded.image_token_id == 501
    original = tiny_processor(images=sample_pairs[:2], text=["q a", "q bb cc"], answers=["x y", "z"])
    again = loaded(images=sample_pairs[:2], text=["q a", "q bb cc"], answers=["x y", "z"])
    for key in original:
        assert torch.equal(original[key], again[key]), key


def test_llm_prompt_prefix_and_suffix_wrap_the_language_model_side_only(tiny_processor, sample_pairs, tmp_path):
    from processing import DeltaVLMProcessor

    wrapped = DeltaVLMProcessor(
        tiny_processor.image_processor, tiny_processor.tokenizer, tiny_processor.qformer_tokenizer,
        num_query_tokens=4, llm_prompt_prefix="user ", llm_prompt_suffix=" answer",
    )
    plain = tiny_processor(images=sample_pairs[:1], text=["q describe"], answers=["a road"])
    inputs = wrapped(images=sample_pairs[:1], text=["q describe"], answers=["a road"])
    expected = tiny_processor(images=sample_pairs[:1], text=["user q describe answer"], answers=["a road"])
    assert torch.equal(inputs["input_ids"], expected["input_ids"]) and torch.equal(inputs["labels"], expected["labels"])
    assert torch.equal(inputs["qformer_input_ids"], plain["qformer_input_ids"])  # the Q-Former sees the bare prompt
    generation = wrapped(images=sample_pairs[:1], text=["q describe"])
    assert torch.equal(generation["input_ids"], tiny_processor(images=sample_pairs[:1], text=["user q describe answer"])["input_ids"])
    wrapped.save_pretrained(tmp_path)
    assert DeltaVLMProcessor.from_pretrained(tmp_path).llm_prompt_suffix == " answer"


@pytest.mark.parametrize(
    "with_placeholder", ["<image> <image> Please describe the changes.", "<image>\nPlease describe the changes."]
)
def test_image_placeholders_in_prompts_and_answers_are_removed(tiny_processor, sample_pairs, with_placeholder):
    # ChangeChat questions carry the placeholder; tokenized, it would be one more image-token id per occurrence
    plain = tiny_processor(images=sample_pairs[:1], text=["Please describe the changes."])
    inputs = tiny_processor(images=sample_pairs[:1], text=[with_placeholder])
    assert (inputs["input_ids"] == tiny_processor.image_token_id).sum() == tiny_processor.num_query_tokens
    for key in plain:
        assert torch.equal(inputs[key], plain[key]), key  # qformer_input_ids too: the Q-Former never sees it
    plain = tiny_processor(images=sample_pairs[:1], text=["q describe"], answers=["a road"])
    inputs = tiny_processor(images=sample_pairs[:1], text=[with_placeholder.replace("Please describe the changes.", "q describe")],
                            answers=["<image> a road"])
    assert not (inputs["labels"] == tiny_processor.image_token_id).any()
    for key in plain:
        assert torch.equal(inputs[key], plain[key]), key


def test_float_images_already_in_0_1_warn_and_do_rescale_false_reads_them(tiny_processor, sample_pairs, caplog):
    import logging

    from transformers.utils import logging as transformers_logging

    before = Image.open(sample_pairs[0][0]).convert("RGB")
    reference = tiny_processor.image_processor((before, before))["pixel_values"]
    scaled = torch.from_numpy(np.array(before)).permute(2, 0, 1).float() / 255  # torchvision ToTensor's output
    transformers_logging.warning_once.cache_clear()  # the warning comes once per process: forget earlier ones
    with caplog.at_level(logging.WARNING):
        tiny_processor(images=(scaled, scaled), text="q describe")
    assert "trying to rescale already rescaled images" in caplog.text and "do_rescale=False" in caplog.text
    transformers_logging.warning_once.cache_clear()
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # 0-255 values, as uint8 or as floats, are what rescaling is for
        tiny_processor.image_processor((np.array(before), np.array(before).astype(np.float32)))
    assert "rescale" not in caplog.text
    rescaled_once = tiny_processor.image_processor((scaled, scaled.numpy()), do_rescale=False)["pixel_values"]
    torch.testing.assert_close(rescaled_once, reference, rtol=0, atol=1e-5)


def test_long_prompts_keep_llm_prompt_prefix_and_suffix(tiny_processor, sample_pairs):
    # the prefix/suffix are a chat-tuned LLM's turn markers: cutting a long prompt from the left used to cut the prefix
    wrapped = DeltaVLMProcessor(
        tiny_processor.image_processor, tiny_processor.tokenizer, tiny_processor.qformer_tokenizer,
        num_query_tokens=4, llm_prompt_prefix="user says ", llm_prompt_suffix=" answer", max_prompt_tokens=32,
    )
    tokenizer = tiny_processor.tokenizer
    prefix_ids = tokenizer("user says ", add_special_tokens=False)["input_ids"]
    suffix_ids = tokenizer(" answer", add_special_tokens=False)["input_ids"]
    long_prompt = " ".join(["a no q is it so"] * 20) + " q how many roads changed"
    for answers in (None, ["two"]):
        with pytest.warns(UserWarning, match="llm_prompt_prefix and llm_prompt_suffix kept"):
            inputs = wrapped(images=sample_pairs[:1], text=[long_prompt], answers=answers)
        ids = inputs["input_ids"][0][inputs["attention_mask"][0].bool()].tolist()
        prompt_ids = ids[5:] if answers is None else ids[5 : -len(tokenizer("two", add_special_tokens=False)["input_ids"]) - 1]
        assert ids[:5] == [501] * 4 + [2] and len(prompt_ids) == 31  # max_prompt_tokens with bos
        assert prompt_ids[: len(prefix_ids)] == prefix_ids and prompt_ids[-len(suffix_ids) :] == suffix_ids
        assert tokenizer.decode(prompt_ids[: -len(suffix_ids)]).endswith("how many roads changed")


def test_the_trained_prompt_format_is_saved_and_used_by_default(tiny_processor, tmp_path):
    """A model trained on bare questions is asked bare questions unless told otherwise; the folder says which."""
    from eval.generation import model_prompt_format

    question = [{"role": "user", "content": "What is new?"}]
    assert tiny_processor.prompt_format == "deltavlm" and model_prompt_format(str(tmp_path)) == "deltavlm"
    tiny_processor.prompt_format = "plain"
    try:
        tiny_processor.save_pretrained(tmp_path)
    finally:
        tiny_processor.prompt_format = "deltavlm"
    reloaded = type(tiny_processor).from_pretrained(tmp_path)
    assert reloaded.prompt_format == "plain" and model_prompt_format(str(tmp_path)) == "plain"
    assert reloaded.apply_chat_template(question) == "What is new?"
    assert reloaded.apply_chat_template(question, prompt_format="deltavlm") == "q what is new?"
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        reloaded.apply_chat_template(question, prompt_format="chatml")


def test_tokenizer_options_and_non_text_answers_are_named(tiny_processor, sample_pairs):
    with pytest.raises(ValueError, match="does not take padding, truncation"):
        tiny_processor(images=sample_pairs[:1], text=["q"], padding="longest", truncation=True)
    with pytest.raises(ValueError, match=r"answers\[1\] must be a string, got NoneType"):
        tiny_processor(images=sample_pairs[:2], text=["q", "q"], answers=["a", None])


def test_half_precision_tensor_images_are_read(tiny_processor):
    image = torch.randint(0, 256, (3, 40, 40)).float()  # whole numbers: exact in bf16 and fp16
    expected = tiny_processor.image_processor([(image, image)])["pixel_values"]
    half = tiny_processor.image_processor([(image.bfloat16(), image.half())])["pixel_values"]
    torch.testing.assert_close(half, expected, atol=0, rtol=0)
