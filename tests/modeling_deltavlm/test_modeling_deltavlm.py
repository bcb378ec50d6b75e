import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import modeling_deltavlm  # noqa: F401
from modeling_deltavlm import DeltaVLMForConditionalGeneration
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor


PROMPTS = [
    "q please briefly describe the changes in these two images",
    "q please judge whether these two images have changed please answer yes or no a yes q how many buildings",
    "q where",
]


@pytest.fixture(scope="module")
def batch(tiny_processor, sample_pairs):
    return tiny_processor(images=sample_pairs[:3], text=PROMPTS)


def test_forward_shapes_and_loss(tiny_model, tiny_processor, sample_pairs):
    inputs = tiny_processor(images=sample_pairs[:2], text=["q describe", "q is there a change"], answers=["a road", "yes"])
    output = tiny_model(**inputs)
    assert output.logits.shape == (*inputs["input_ids"].shape, 501)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    features = output.image_features
    assert features.vision_outputs.pair_embeds.shape == (2, 2 * 5, 32)
    assert features.pooler_output.shape == (2, 4, 32)


def test_return_dict_false_gives_tuples(tiny_model, tiny_processor, sample_pairs, batch):
    # transformers' convention: return_dict=False (argument, else config.return_dict) -> output.to_tuple()
    expected = tiny_model(**batch)
    logits = tiny_model(**batch, return_dict=False)[0]
    torch.testing.assert_close(logits, expected.logits, rtol=0, atol=0)
    inputs = tiny_processor(images=sample_pairs[:2], text=["q describe", "q b"], answers=["a road", "yes"])
    loss, logits = tiny_model(**inputs, return_dict=False)[:2]
    torch.testing.assert_close(loss, tiny_model(**inputs).loss, rtol=0, atol=0)
    tiny_model.train()  # labels in training mode take the chunked-loss path
    try:
        torch.manual_seed(0)  # the same dropout masks for both calls
        training_loss = tiny_model(**inputs).loss
        torch.manual_seed(0)
        output = tiny_model(**inputs, return_dict=False)
    finally:
        tiny_model.eval()
    assert isinstance(output, tuple)
    torch.testing.assert_close(output[0], training_loss, rtol=0, atol=0)
    # config.return_dict=False is honoured, and generate (which asks for return_dict=True) still works
    tiny_model.config.return_dict = False
    try:
        output = tiny_model(**batch)
        assert isinstance(output, tuple)
        torch.testing.assert_close(output[0], expected.logits, rtol=0, atol=0)
        assert torch.equal(tiny_model.generate(**batch, max_new_tokens=2), tiny_model.generate(**batch, max_new_tokens=2))
    finally:
        tiny_model.config.return_dict = True


def test_difference_module_off_is_plain_concatenation(tiny_model, batch, make_tiny_config):
    model = DeltaVLMForConditionalGeneration(make_tiny_config(use_difference_module=False)).eval()
    model.load_state_dict(tiny_model.state_dict())
    vision = model.get_pair_embeds(batch["pixel_values"])
    # direct computation: ViT on each image separately, ln_vision, concatenate along tokens
    expected = []
    for index in (0, 1):
        hidden = model.vision_model.embeddings(batch["pixel_values"][:, index])
        hidden = model.vision_model.encoder(inputs_embeds=hidden).last_hidden_state
        expected.append(torch.nn.functional.layer_norm(
            hidden, (32,), model.vision_model.post_layernorm.weight, model.vision_model.post_layernorm.bias, eps=1e-5
        ))
    torch.testing.assert_close(vision.pair_embeds, torch.cat(expected, dim=1), rtol=1e-5, atol=1e-5)
    # and with CSRM on, the same features go through the difference module equations
    with_csrm = tiny_model.get_pair_embeds(batch["pixel_values"]).pair_embeds
    module = tiny_model.difference_module
    before, after = expected
    diff = after - before
    manual = []
    for image in (before, after):
        context = torch.tanh(module.context1(diff) + module.context2(image))
        gate = torch.sigmoid(module.gate1(diff) + module.gate2(image))
        manual.append(module.context3(torch.cat([image, diff, gate * context], dim=-1)))
    torch.testing.assert_close(with_csrm, torch.cat(manual, dim=1), rtol=1e-5, atol=1e-5)


def _greedy(model, inputs, **kwargs):
    return model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)


def test_left_padded_batch_equals_single_samples(tiny_model, tiny_processor, sample_pairs, batch):
    batched = _greedy(tiny_model, batch)
    prompts = PROMPTS
    width = batch["input_ids"].shape[1]
    for index in range(3):
        single_inputs = tiny_processor(images=[sample_pairs[index]], text=[prompts[index]])
        single = _greedy(tiny_model, single_inputs)
        new_tokens = single[0, single_inputs["input_ids"].shape[1]:]
        assert torch.equal(batched[index, width : width + len(new_tokens)], new_tokens)


def test_prompt_with_image_placeholders_generates_as_without(tiny_model, tiny_processor, sample_pairs):
    # ChangeChat questions start with "<image> <image>": the processor drops it (the model used to refuse the row)
    question = "Please briefly describe the changes in these two images."
    plain = tiny_processor(images=sample_pairs[:1], text=[question])
    placeholder = tiny_processor(images=sample_pairs[:1], text=["<image> <image> " + question])
    assert torch.equal(_greedy(tiny_model, placeholder), _greedy(tiny_model, plain))


def test_cache_and_no_cache_and_cached_vision_agree(tiny_model, batch):
    with_cache = _greedy(tiny_model, batch)
    assert torch.equal(with_cache, _greedy(tiny_model, batch, use_cache=False))
    pair_embeds = tiny_model.get_pair_embeds(batch["pixel_values"]).pair_embeds
    inputs = {key: value for key, value in batch.items() if key != "pixel_values"}
    assert torch.equal(with_cache, _greedy(tiny_model, inputs, pair_embeds=pair_embeds))


def test_beam_search_and_sampling_run(tiny_model, batch):
    beams = tiny_model.generate(**batch, max_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert beams.shape[0] == 6
    torch.manual_seed(0)
    sampled = tiny_model.generate(**batch, max_new_tokens=6, do_sample=True, top_p=0.9)
    assert sampled.shape[0] == 3
    assert not (beams[:, batch["input_ids"].shape[1]:] == 501).any()  # never generates the image placeholder


def test_float32_pair_embeds_on_a_bfloat16_model(tiny_model, batch):
    # cached float32 features used to fail in the bf16 Q-Former with a dtype error; they are cast like pixel_values
    model = DeltaVLMForConditionalGeneration(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model = model.to(torch.bfloat16).eval()
    pair_embeds = model.get_pair_embeds(batch["pixel_values"]).pair_embeds  # bf16
    inputs = {key: value for key, value in batch.items() if key != "pixel_values"}
    expected = model(**inputs, pair_embeds=pair_embeds).logits
    torch.testing.assert_close(model(**inputs, pair_embeds=pair_embeds.float()).logits, expected, rtol=0, atol=0)


def test_training_steps_lower_loss_and_touch_only_the_trainable_set(tiny_processor, sample_pairs, make_tiny_config):
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(make_tiny_config(difference_dropout=0.0))
    counts = model.set_trainable_as_paper()
    model.train()
    inputs = tiny_processor(
        images=sample_pairs[:2], text=["q describe the changes", "q describe"], answers=["some houses appear", "a road"]
    )
    before = {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(8):
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        for name, parameter in model.named_parameters():
            assert (parameter.grad is not None) == (name in trainable), name
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert counts["total"] == sum(model.get_parameter(name).numel() for name in trainable)
    last_layers = {f"vision_model.encoder.layers.{i}." for i in (2, 3)}
    for name, parameter in model.named_parameters():
        changed = not torch.equal(before[name], parameter)
        expected_trainable = (
            any(name.startswith(prefix) for prefix in last_layers)
            or name.startswith(("vision_model.post_layernorm", "difference_module", "qformer", "language_projection"))
            or name == "query_tokens"
        )
        assert (name in trainable) == expected_trainable, name
        if not expected_trainable:
            assert not changed, f"frozen {name} changed"
    # EVA has no key bias: its third of qkv.bias must stay exactly zero
    for index in (2, 3):
        bias = model.vision_model.encoder.layers[index].self_attn.qkv.bias
        assert torch.count_nonzero(bias[32:64]) == 0


def test_activation_checkpointing_gives_the_same_gradients(tiny_processor, sample_pairs, make_tiny_config):
    inputs = tiny_processor(images=sample_pairs[:2], text=["q a", "q b"], answers=["x", "y"])
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(make_tiny_config(difference_dropout=0.0))
        model.set_trainable_as_paper()
        model.train()
        model.qformer.config.hidden_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.activation_checkpointing_enable()
        model(**inputs).loss.backward()
        grads.append(model.query_tokens.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_eager_attention_matches_sdpa(tiny_model, batch, make_tiny_config):
    eager = DeltaVLMForConditionalGeneration._from_config(make_tiny_config(), attn_implementation="eager").eval()
    eager.load_state_dict(tiny_model.state_dict())
    assert eager.qformer.config._attn_implementation == "eager"
    torch.testing.assert_close(eager(**batch).logits, tiny_model(**batch).logits, rtol=1e-4, atol=1e-4)


def test_bad_inputs_raise_clear_errors(tiny_model, batch):
    with pytest.raises(ValueError, match=r"\(batch_size, 2, num_channels"):
        tiny_model(**{**batch, "pixel_values": batch["pixel_values"][:, 0]})
    with pytest.raises(ValueError, match="image pairs but"):
        tiny_model(**{**batch, "pixel_values": batch["pixel_values"][:2]})
    no_room = batch["input_ids"].clone()
    no_room[:, 0] = 2  # one placeholder overwritten, as a truncated prompt would
    with pytest.raises(ValueError, match="exactly 4 image tokens"):
        tiny_model(**{**batch, "input_ids": no_room})
    with pytest.raises(ValueError, match="qformer_input_ids"):
        tiny_model(**{**batch, "qformer_input_ids": None})


@pytest.mark.parametrize("image_shape", [(3, 224, 224), (3, 14, 14), (3, 20, 36), (1, 28, 28)])
def test_pixel_values_of_another_size_or_channel_count_are_refused(tiny_model, batch, image_shape):
    # the tiny model takes 3 x 28 x 28: larger images used to fail deep in the ViT, smaller ones ran on a sliced
    # position table, 1 channel failed in the patch convolution
    pixel_values = torch.randn(3, 2, *image_shape)
    message = rf"\(num_channels, height, width\) = \(3, 28, 28\).*got \({', '.join(map(str, image_shape))}\)"
    with pytest.raises(ValueError, match=message):
        tiny_model(**{**batch, "pixel_values": pixel_values})
    with pytest.raises(ValueError, match=message):
        tiny_model.generate(**{**batch, "pixel_values": pixel_values}, max_new_tokens=2)
    if image_shape[0] == 3 and min(image_shape[1:]) >= 14:  # a resized position table takes any size of 3 channels
        assert tiny_model(**{**batch, "pixel_values": pixel_values}, interpolate_pos_encoding=True).logits is not None


def test_save_load_round_trip_through_auto_classes(tmp_path, tiny_model, tiny_processor, batch, sample_pairs):
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---") and "pipeline_tag: image-text-to-text" in card and "base_model:" in card
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, DeltaVLMForConditionalGeneration)
    assert isinstance(AutoModel.from_pretrained(tmp_path), DeltaVLMForConditionalGeneration)
    torch.testing.assert_close(loaded(**batch).logits, tiny_model(**batch).logits, rtol=0, atol=0)
    processor = AutoProcessor.from_pretrained(tmp_path)
    reloaded_batch = processor(images=sample_pairs[:3], text=PROMPTS)
    for key in batch:
        assert torch.equal(reloaded_batch[key], batch[key]), key


def test_remote_code_loads_without_the_package(tmp_path, tiny_model, tiny_processor, batch):
    tiny_model.save_pretrained(tmp_path)
    tiny_processor.save_pretrained(tmp_path)
    for name in ("configuration_deltavlm.py", "modeling_deltavlm.py", "processing_deltavlm.py", "image_processing_deltavlm.py"):
        assert (tmp_path / name).is_file()
    # AutoModel too, as where the package is installed (register_for_auto_class records one class per model class)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    for auto_class in ("AutoModel", "AutoModelForImageTextToText"):
        assert auto_map[auto_class] == "modeling_deltavlm.DeltaVLMForConditionalGeneration", auto_map
    expected = _greedy(tiny_model, batch)
    torch.save({"batch": dict(batch), "expected": expected}, tmp_path / "case.pt")
    script = textwrap.dedent(
        f"""
        import sys
        for blocked in ("modeling_deltavlm", "processing", "train", "eval"):
            sys.modules[blocked] = None  # make `import modeling_deltavlm` fail, as where the package is not installed
        try:
            import modeling_deltavlm
            raise SystemExit("package still importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor
        folder = {str(tmp_path)!r}
        model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        case = torch.load(folder + "/case.pt", weights_only=True)
        output = model.generate(**case["batch"], max_new_tokens=8, do_sample=False)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        assert type(processor).__name__ == "DeltaVLMProcessor"
        assert torch.equal(output, case["expected"]), (output, case["expected"])
        from transformers import AutoModel
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(base).__module__.startswith("transformers_modules"), type(base).__module__
        assert torch.equal(base.generate(**case["batch"], max_new_tokens=8, do_sample=False), case["expected"])
        print("REMOTE OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert "REMOTE OK" in result.stdout, result.stderr[-3000:]


def test_inputs_the_model_cannot_read_are_named(tiny_model, batch):
    inputs = {key: value for key, value in batch.items() if key != "pixel_values"}
    pair_embeds = tiny_model.get_pair_embeds(batch["pixel_values"]).pair_embeds
    with pytest.raises(ValueError, match="pair_embeds must have shape"):  # not two images' tokens
        tiny_model(**inputs, pair_embeds=pair_embeds[:, 1:])
    # a processor whose image placeholder is not the model's: its id lies outside the vocabulary
    vocab_size = tiny_model.get_input_embeddings().num_embeddings
    wrong_ids = batch["input_ids"].masked_fill(batch["input_ids"] == tiny_model.config.image_token_id, vocab_size + 7)
    with pytest.raises(ValueError, match=f"id {vocab_size + 7} outside the language model's vocabulary"):
        tiny_model(**{**batch, "input_ids": wrong_ids})
