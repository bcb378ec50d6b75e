"""Numerical parity with the authors' implementation (shared/fixtures/original_tiny).

The three original-format inputs of the fixture (checkpoint_best.pth, eva_vit_g.pth, vicuna/, bert-base-uncased/)
are converted with `deltavlm convert`; this package's processor and model must then reproduce, fp32 on CPU, every
tensor, id and text the authors' code produced (expected.safetensors / expected.json; no number is restated here).
The original re-randomised the `[PAD]` rows at every load: the rows it used are injected, as the fixture README says.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import modeling_deltavlm  # noqa: F401  (Auto-class registration)
from modeling_deltavlm.convert_original_checkpoint import convert_original_checkpoint
from modeling_deltavlm.original_generation import original_generation_kwargs, to_original_output_ids
from transformers import AutoModelForImageTextToText, AutoProcessor



@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    return shared_dir / "fixtures" / "original_tiny"


@pytest.fixture(scope="module")
def expected(fixture_dir):
    return load_file(fixture_dir / "expected.safetensors")


@pytest.fixture(scope="module")
def meta(fixture_dir):
    return json.loads((fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def converted_dir(tmp_path_factory, fixture_dir, meta):
    inputs = fixture_dir / "original_checkpoint"
    out = tmp_path_factory.mktemp("parity") / "deltavlm-tiny"
    convert_original_checkpoint(
        checkpoint=inputs / "checkpoint_best.pth",
        vision=inputs / "eva_vit_g.pth",
        llm=inputs / "vicuna",
        qformer_tokenizer=inputs / "bert-base-uncased",
        out=out,
        # an EVA file does not store its head count; the real EVA-ViT-g's follows from width / 88, the tiny one's not
        vision_num_heads=meta["tiny_config"]["vision"]["num_attention_heads"],
    )
    return out


def _inject_pad_rows(model, expected):
    pad_id = model.config.text_config.pad_token_id
    with torch.no_grad():
        model.get_input_embeddings().weight[pad_id] = expected["llm_pad_row_embed_tokens"]
        model.get_output_embeddings().weight[pad_id] = expected["llm_pad_row_lm_head"]
    return model


@pytest.fixture(scope="module")
def model(converted_dir, expected):
    return _inject_pad_rows(AutoModelForImageTextToText.from_pretrained(converted_dir).eval(), expected)


@pytest.fixture(scope="module")
def processor(converted_dir):
    return AutoProcessor.from_pretrained(converted_dir)


@pytest.fixture(scope="module")
def samples(meta, shared_dir):
    pairs = [(str(shared_dir / s["image_A"]), str(shared_dir / s["image_B"])) for s in meta["samples"]]
    return pairs, [s["prompt"] for s in meta["samples"]], [s["answer"] for s in meta["samples"]]


@pytest.fixture(scope="module")
def generation_inputs(processor, samples):
    pairs, prompts, _ = samples
    return processor(images=pairs, text=prompts)


@pytest.fixture(scope="module")
def image_features(model, generation_inputs):
    with torch.no_grad():
        return model.get_image_features(
            pixel_values=generation_inputs["pixel_values"],
            qformer_input_ids=generation_inputs["qformer_input_ids"],
            qformer_attention_mask=generation_inputs["qformer_attention_mask"],
        )


def _max_diff(actual, reference):
    return (actual.float() - reference.float()).abs().max().item()


def test_parity_pixels_and_token_ids(generation_inputs, expected, meta, model):
    num_queries = model.config.num_query_tokens
    assert _max_diff(generation_inputs["pixel_values"][:, 0], expected["pixel_values_A"]) <= 1e-6
    assert _max_diff(generation_inputs["pixel_values"][:, 1], expected["pixel_values_B"]) <= 1e-6
    assert torch.equal(generation_inputs["qformer_input_ids"], expected["qformer_input_ids"])
    assert torch.equal(generation_inputs["qformer_attention_mask"], expected["qformer_attention_mask"])
    # generation layout [image x Q][PAD ...][</s> prompt] == the original's [queries][left-padded prompt]
    assert (generation_inputs["input_ids"][:, :num_queries] == model.config.image_token_id).all()
    assert torch.equal(generation_inputs["input_ids"][:, num_queries:], expected["llm_prompt_input_ids"])
    assert torch.equal(generation_inputs["attention_mask"], expected["generate_attention_mask"])
    for row, sample in enumerate(meta["samples"]):
        mask = expected["llm_prompt_attention_mask"][row].bool()
        assert generation_inputs["input_ids"][row, num_queries:][mask].tolist() == sample["llm_prompt_input_ids_unpadded"]


def test_parity_vision_difference_module_qformer_and_projection(image_features, expected):
    vision = image_features.vision_outputs
    tokens = vision.before_embeds.shape[1]
    checks = {
        "vit_A": vision.vision_hidden_states[:, 0],
        "vit_B": vision.vision_hidden_states[:, 1],
        "vit_ln_A": vision.before_embeds,
        "vit_ln_B": vision.after_embeds,
        "csrm_A": vision.pair_embeds[:, :tokens],
        "csrm_B": vision.pair_embeds[:, tokens:],
        "image_embeds": vision.pair_embeds,
        "qformer_last_hidden_state": image_features.qformer_outputs.last_hidden_state,
        "query_output": image_features.query_output,
        "inputs_llm": image_features.pooler_output,
    }
    # relative to each tensor's scale: the fixture was computed on another CPU, and float32 sums taken in another
    # order (AVX2 against AVX-512 kernels) put the ViT's hidden states (magnitudes of several units) up to 1.4e-5
    # apart in absolute terms on a 2-core EPYC (2026-11-27)
    diffs = {name: _max_diff(value, expected[name]) / max(1.0, expected[name].abs().max().item())
             for name, value in checks.items()}
    assert max(diffs.values()) <= 1e-5, diffs


def test_parity_teacher_forced_logits_and_loss(model, processor, samples, expected):
    pairs, prompts, answers = samples
    inputs = processor(images=pairs, text=prompts, answers=answers)
    with torch.no_grad():
        output = model(**inputs)
    assert abs(output.loss.item() - expected["tf_loss"].item()) <= 1e-5
    # The processor pads to its own longest row, the original to prompt + answer widths: compare the unpadded rows.
    lengths = inputs["attention_mask"].sum(dim=1)
    assert torch.equal(lengths, expected["tf_attention_mask"].sum(dim=1))
    worst = 0.0
    for row, length in enumerate(lengths.tolist()):
        assert inputs["attention_mask"][row, :length].all() and expected["tf_attention_mask"][row, :length].all()
        assert torch.equal(inputs["labels"][row, :length], expected["tf_labels"][row, :length])
        worst = max(worst, _max_diff(output.logits[row, :length], expected["tf_logits"][row, :length]))
    assert worst <= 1e-4


def _generate(model, inputs, meta, mode, **extra):
    settings = meta["generation"][mode]
    prompt_length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(
            **inputs,
            **original_generation_kwargs(
                prompt_length,
                num_beams=settings["num_beams"],
                max_length=settings["max_length"],
                repetition_penalty=settings["repetition_penalty"],
                length_penalty=settings["length_penalty"],
            ),
            return_dict_in_generate=True,
            **extra,
        )
    raw, ids = to_original_output_ids(output.sequences, prompt_length, max_length=settings["max_length"])
    return output, raw, ids


def test_parity_greedy_generation(model, processor, generation_inputs, expected, meta):
    output, raw, ids = _generate(model, generation_inputs, meta, "greedy", output_scores=True, output_logits=True)
    assert torch.equal(raw, expected["greedy_output_ids_raw"])
    assert torch.equal(ids, expected["greedy_output_ids"])
    texts = [text.strip() for text in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert texts == [sample["greedy_text"] for sample in meta["samples"]]
    # the first step's logits (before any processor) and the processed scores of every live step
    assert _max_diff(output.logits[0], expected["generate_prefill_logits_last"]) <= 1e-4
    step_scores = expected["greedy_step_scores"]
    for step in range(step_scores.shape[0]):
        live = ~torch.isin(expected["greedy_output_ids_raw"][:, step], torch.tensor([0, 2])) | (step == 0)
        assert _max_diff(output.scores[step][live], step_scores[step][live]) <= 1e-4, step


def test_parity_greedy_generation_one_sample_at_a_time(model, processor, samples, expected, meta):
    pairs, prompts, _ = samples
    for index in range(len(pairs)):
        inputs = processor(images=[pairs[index]], text=[prompts[index]])
        _, raw, _ = _generate(model, inputs, meta, "greedy")
        assert torch.equal(raw, expected[f"greedy_single_{index}_output_ids_raw"]), index


def test_parity_beam3_generation(model, processor, generation_inputs, expected, meta):
    output, raw, ids = _generate(model, generation_inputs, meta, "beam3", output_scores=True)
    assert torch.equal(raw, expected["beam3_output_ids_raw"])
    assert torch.equal(ids, expected["beam3_output_ids"])
    assert _max_diff(output.sequences_scores, expected["beam3_sequences_scores"]) <= 1e-5
    texts = [text.strip() for text in processor.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    assert texts == [sample["beam3_text"] for sample in meta["samples"]]


def test_parity_without_difference_module_matches_the_unpatched_forward(converted_dir, processor, samples, expected):
    model = AutoModelForImageTextToText.from_pretrained(converted_dir, use_difference_module=False).eval()
    model = _inject_pad_rows(model, expected)
    pairs, prompts, answers = samples
    inputs = processor(images=pairs, text=prompts, answers=answers)
    with torch.no_grad():
        output = model(**inputs)
    assert _max_diff(output.image_features.pooler_output, expected["nocsrm_inputs_llm"]) <= 1e-5
    assert abs(output.loss.item() - expected["nocsrm_loss"].item()) <= 1e-5


def test_parity_survives_save_pretrained_round_trip(tmp_path, model, processor, generation_inputs, expected, meta):
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    reloaded_processor = AutoProcessor.from_pretrained(tmp_path)
    inputs = reloaded_processor(images=None, text=[s["prompt"] for s in meta["samples"]])
    assert torch.equal(inputs["input_ids"], generation_inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(reloaded(**generation_inputs).logits, model(**generation_inputs).logits)
    _, raw, _ = _generate(reloaded, generation_inputs, meta, "beam3")
    assert torch.equal(raw, expected["beam3_output_ids_raw"])


def test_parity_with_the_converters_own_pad_rows(converted_dir, generation_inputs, expected, meta):
    """Without injecting the original's random [PAD] rows (the converter's mean rows instead), the attended logits
    and the generated ids stay the same; only the loss moves slightly (the [PAD] column is in the softmax)."""
    model = AutoModelForImageTextToText.from_pretrained(converted_dir).eval()
    _, raw, _ = _generate(model, generation_inputs, meta, "greedy")
    assert torch.equal(raw, expected["greedy_output_ids_raw"])
    with torch.no_grad():
        logits = model(**generation_inputs).logits
    mask = generation_inputs["attention_mask"].bool()
    pad_id = model.config.text_config.pad_token_id
    others = torch.arange(logits.shape[-1]) != pad_id
    reference = _inject_pad_rows(AutoModelForImageTextToText.from_pretrained(converted_dir).eval(), expected)
    with torch.no_grad():
        reference_logits = reference(**generation_inputs).logits
    assert torch.equal(logits[mask][:, others], reference_logits[mask][:, others])
