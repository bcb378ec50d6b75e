"""`deltavlm convert` and `init_from_instructblip`: folder contents, derived config, key accounting, CSRM diagnostic,
`--no-llm`, dtypes, sharding, the full-size key map (on the meta device) and clear errors on bad inputs.
Numerical parity with the authors' code is in test_parity_original.py."""

import datetime
import hashlib
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open

import deltavlm_cli
import modeling_deltavlm  # noqa: F401  (Auto-class registration)
from modeling_deltavlm import DeltaVLMConfig, DeltaVLMForConditionalGeneration
from modeling_deltavlm.convert_original_checkpoint import (
    VisionSource,
    assemble_state_dict,
    build_config,
    check_state_dict,
    convert_eva_state_dict,
    convert_original_checkpoint,
    diagnose_difference_module,
    optimizer_parameter_names,
)
from modeling_deltavlm.init_from_instructblip import init_from_instructblip
from modeling_deltavlm.modeling_deltavlm import append_mean_rows
from transformers import AutoModelForImageTextToText, AutoProcessor


@pytest.fixture(scope="module")
def fixture_dir(shared_dir):
    return shared_dir / "fixtures" / "original_tiny"


@pytest.fixture(scope="module")
def inputs(fixture_dir):
    return fixture_dir / "original_checkpoint"


@pytest.fixture(scope="module")
def meta(fixture_dir):
    return json.loads((fixture_dir / "expected.json").read_text())


@pytest.fixture(scope="module")
def vision_heads(meta):
    return meta["tiny_config"]["vision"]["num_attention_heads"]


@pytest.fixture(scope="module")
def original(inputs):
    return torch.load(inputs / "checkpoint_best.pth", map_location="cpu", weights_only=True)


def _cli_args(inputs, out, vision_heads, *extra):
    return [
        "--checkpoint", str(inputs / "checkpoint_best.pth"), "--vision", str(inputs / "eva_vit_g.pth"),
        "--llm", str(inputs / "vicuna"), "--qformer-tokenizer", str(inputs / "bert-base-uncased"),
        "--out", str(out), "--vision-heads", str(vision_heads), *extra,
    ]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, inputs, vision_heads):
    out = tmp_path_factory.mktemp("convert") / "deltavlm-tiny"
    assert deltavlm_cli.main(["convert", *_cli_args(inputs, out, vision_heads)]) == 0
    return out


@pytest.fixture(scope="module")
def converted_model(converted):
    return AutoModelForImageTextToText.from_pretrained(converted).eval()


def _convert(inputs, out, vision_heads, **overrides):
    kwargs = dict(
        checkpoint=inputs / "checkpoint_best.pth", vision=inputs / "eva_vit_g.pth", llm=inputs / "vicuna",
        qformer_tokenizer=inputs / "bert-base-uncased", out=out, vision_num_heads=vision_heads,
    )
    kwargs.update(overrides)
    return convert_original_checkpoint(**kwargs)


def _saved_tensors(folder) -> dict:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


# --- the folder -------------------------------------------------------------------------------------------------


def test_convert_writes_a_complete_folder(converted, converted_model, inputs):
    for name in ("config.json", "generation_config.json", "model.safetensors", "processor_config.json",
                 "tokenizer.json", "qformer_tokenizer/tokenizer.json", "chat_template.jinja", "README.md",
                 "conversion_report.json", "modeling_deltavlm.py", "configuration_deltavlm.py"):
        assert (converted / name).is_file(), name
    config = json.loads((converted / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_deltavlm.DeltaVLMForConditionalGeneration"
    assert isinstance(converted_model, DeltaVLMForConditionalGeneration)
    # the authors' decoding travels with the weights: model.generate and the commands' defaults reproduce it
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["num_beams"], generation["max_new_tokens"], generation["repetition_penalty"]) == (5, 256, 1.5)
    # no staging folder left beside the output
    assert [p.name for p in converted.parent.iterdir()] == [converted.name]
    card = (converted / "README.md").read_text()
    digest = hashlib.sha256((inputs / "checkpoint_best.pth").read_bytes()).hexdigest()
    assert card.startswith("---") and "## Provenance" in card and digest in card
    assert "checkpoint_best.pth" in card and "eva_vit_g.pth" in card
    assert datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d") in card
    assert "Difference module (CSRM):** CSRM weights look trained" in card


def test_convert_config_is_derived_from_the_input_shapes(converted_model, meta):
    tiny = meta["tiny_config"]
    config = converted_model.config
    vision, qformer, text = config.vision_config, config.qformer_config, config.text_config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                "patch_size", "layer_norm_eps"):
        assert getattr(vision, key) == tiny["vision"][key], key
    assert config.ln_vision_eps == tiny["ln_vision"]["layer_norm_eps"]
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "max_position_embeddings", "layer_norm_eps", "cross_attention_frequency", "encoder_hidden_size"):
        assert getattr(qformer, key) == tiny["qformer"][key], key
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings"):
        assert getattr(text, key) == tiny["text"][key], key
    tokenizer = meta["llm_tokenizer"]
    assert (text.pad_token_id, text.bos_token_id, text.eos_token_id) == (
        tokenizer["pad_token_id"], tokenizer["bos_token_id"], tokenizer["eos_token_id"]
    )
    assert config.num_query_tokens == tiny["num_query_tokens"]
    assert config.image_token_id == tokenizer["len_after_add_special_tokens"]  # <image> comes right after [PAD]
    assert config.use_difference_module is True
    assert converted_model.generation_config.pad_token_id == tokenizer["pad_token_id"]


def test_convert_tokenizers_reproduce_the_original_setup(converted, meta):
    processor = AutoProcessor.from_pretrained(converted)
    tokenizer, qformer_tokenizer = processor.tokenizer, processor.qformer_tokenizer
    expected = meta["llm_tokenizer"]
    assert tokenizer.pad_token == expected["pad_token"] and tokenizer.pad_token_id == expected["pad_token_id"]
    assert tokenizer.bos_token_id == tokenizer.eos_token_id == tokenizer.unk_token_id == expected["bos_token_id"]
    expected_q = meta["qformer_tokenizer"]
    assert qformer_tokenizer.bos_token == expected_q["bos_token"] and len(qformer_tokenizer) == expected_q["vocab_size_after_adding_[DEC]"]
    for sample in meta["samples"]:  # the tokenizer on its own prepends </s> like the authors' slow tokenizer
        assert tokenizer(sample["prompt"]).input_ids == sample["llm_prompt_input_ids_unpadded"]
        assert qformer_tokenizer(sample["prompt"]).input_ids == sample["qformer_input_ids"]
    assert processor.chat_template and processor.num_query_tokens == meta["tiny_config"]["num_query_tokens"]


def test_convert_accounts_for_every_input_key(converted, original):
    report = json.loads((converted / "conversion_report.json").read_text())
    ignored, superseded = report["ignored"], report["superseded"]
    for key in ("temp", "vision_proj.weight", "text_proj.bias", "Qformer.bert.embeddings.position_ids",
                "optimizer", "config", "scaler", "epoch"):
        assert key in ignored, key
    assert any("rotary_emb.inv_freq" in key for key in ignored)
    assert any(key.startswith("vision:encoder.layers.39.") for key in ignored)  # EVA's 40th block
    assert {key.split(".")[2] for key in superseded if ".layers." in key} == {"37", "38"}
    assert all(key in ignored or not re.fullmatch(r"temp|(vision|text)_proj\..*|.*position_ids|.*inv_freq", key)
               for key in original["model"])
    assert report["mapped"] == len(_saved_tensors(converted))


def test_convert_takes_trained_blocks_from_the_checkpoint_not_the_eva_file(converted_model, original, inputs):
    eva = torch.load(inputs / "eva_vit_g.pth", map_location="cpu", weights_only=True)
    layers = converted_model.vision_model.encoder.layers
    for block in (37, 38):
        attention = layers[block].self_attn
        trained = original["model"]
        assert torch.equal(attention.qkv.weight, trained[f"visual_encoder.blocks.{block}.attn.qkv.weight"])
        assert not torch.equal(attention.qkv.weight, eva[f"blocks.{block}.attn.qkv.weight"].float())
        q_bias, k_bias, v_bias = attention.qkv.bias.chunk(3)
        assert torch.equal(q_bias, trained[f"visual_encoder.blocks.{block}.attn.q_bias"])
        assert not k_bias.any()
        assert torch.equal(v_bias, trained[f"visual_encoder.blocks.{block}.attn.v_bias"])
    assert torch.equal(layers[0].mlp.fc1.weight, eva["blocks.0.mlp.fc1.weight"].float())
    assert converted_model.vision_model.post_layernorm.eps == 1e-5
    assert torch.equal(converted_model.vision_model.post_layernorm.weight, original["model"]["ln_vision.weight"])


def test_convert_pad_rows_are_the_mean_of_the_other_rows(converted_model):
    pad_id = converted_model.config.text_config.pad_token_id
    for matrix in (converted_model.get_input_embeddings().weight, converted_model.get_output_embeddings().weight):
        assert matrix.shape[0] == pad_id + 1
        torch.testing.assert_close(matrix[pad_id], matrix[:pad_id].mean(dim=0), rtol=0, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_convert_casts_to_the_requested_dtype(tmp_path, inputs, vision_heads, dtype):
    _convert(inputs, tmp_path / "out", vision_heads, dtype=dtype)
    dtypes = {tensor.dtype for tensor in _saved_tensors(tmp_path / "out").values()}
    assert dtypes == {getattr(torch, dtype)}
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == dtype


def test_convert_shards_large_folders(tmp_path, inputs, vision_heads, converted_model, tiny_processor, sample_pairs):
    _convert(inputs, tmp_path / "out", vision_heads, max_shard_size="1MB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    sharded = AutoModelForImageTextToText.from_pretrained(tmp_path / "out").eval()
    batch = tiny_processor(images=sample_pairs[:2], text=["q describe", "q what changed"])
    with torch.no_grad():
        assert torch.equal(sharded(**batch).logits, converted_model(**batch).logits)


# --- the CSRM diagnostic -----------------------------------------------------------------------------------------


def test_optimizer_indices_map_onto_parameter_names(original):
    mapping = optimizer_parameter_names(original["model"], original["optimizer"])
    assert mapping is not None
    without_state = {mapping[index] for index in mapping if index not in original["optimizer"]["state"]}
    # the parameters forward() and generate() never use got no gradient (fixture README)
    assert without_state == {"temp", "vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias"}


def _untrained_csrm(original) -> dict:
    """The fixture checkpoint as the authors' code would leave it: CSRM at torch's default init, no AdamW moments."""
    checkpoint = {**original, "model": dict(original["model"]), "optimizer": dict(original["optimizer"])}
    mapping = optimizer_parameter_names(original["model"], original["optimizer"])
    torch.manual_seed(0)
    for layer in ("context1", "context2", "gate1", "gate2", "context3"):
        weight = checkpoint["model"][f"{layer}.weight"]
        fresh = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=f"{layer}.bias" in checkpoint["model"])
        checkpoint["model"][f"{layer}.weight"] = fresh.weight.detach()
        if fresh.bias is not None:
            checkpoint["model"][f"{layer}.bias"] = fresh.bias.detach()
    checkpoint["optimizer"]["state"] = {
        index: state for index, state in original["optimizer"]["state"].items()
        if mapping[index].split(".")[0] not in ("context1", "context2", "gate1", "gate2", "context3")
    }
    return checkpoint


def test_difference_module_diagnostic(original):
    trained = diagnose_difference_module(original)
    assert trained.trained and trained.optimizer_state == "present" and not trained.within_default_init
    untrained = diagnose_difference_module(_untrained_csrm(original))
    assert not untrained.trained and untrained.within_default_init and untrained.optimizer_state == "absent"
    assert "UNTRAINED" in untrained.verdict
    no_optimizer = diagnose_difference_module({**_untrained_csrm(original), "optimizer": None})
    assert not no_optimizer.trained and no_optimizer.optimizer_state == "unavailable"
    in_range_but_updated = diagnose_difference_module({**_untrained_csrm(original), "optimizer": original["optimizer"]})
    assert in_range_but_updated.trained  # small trained weights still count as trained when AdamW moved them


def test_convert_switches_an_untrained_difference_module_off(tmp_path, inputs, original, vision_heads):
    checkpoint = tmp_path / "checkpoint_untrained_csrm.pth"
    torch.save(_untrained_csrm(original), checkpoint)
    report = _convert(inputs, tmp_path / "out", vision_heads, checkpoint=checkpoint)
    assert report.use_difference_module is False
    assert json.loads((tmp_path / "out" / "config.json").read_text())["use_difference_module"] is False
    assert "UNTRAINED" in (tmp_path / "out" / "README.md").read_text()
    forced = _convert(inputs, tmp_path / "forced", vision_heads, checkpoint=checkpoint, difference_module="on")
    assert forced.use_difference_module is True


# --- --no-llm -----------------------------------------------------------------------------------------------------


def test_no_llm_folder_loads_the_language_model_in_one_call(tmp_path, inputs, vision_heads, converted_model,
                                                             tiny_processor, sample_pairs):
    out = tmp_path / "no-llm"
    assert deltavlm_cli.main(["convert", *_cli_args(inputs, out, vision_heads, "--no-llm")]) == 0
    saved = _saved_tensors(out)
    assert saved and not any(key.startswith("language_model.") for key in saved)
    assert json.loads((out / "config.json").read_text())["language_model_weights"] == str(inputs / "vicuna")
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    batch = tiny_processor(images=sample_pairs[:2], text=["q describe", "q what changed"])
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, converted_model(**batch).logits)
    # saving again keeps the language model out; reloading reads the reference again
    model.save_pretrained(tmp_path / "again")
    assert not any(key.startswith("language_model.") for key in _saved_tensors(tmp_path / "again"))
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "again").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, converted_model(**batch).logits)


def test_no_llm_reference_can_be_a_folder_inside_the_model_folder(tmp_path, inputs, vision_heads, converted_model):
    out = tmp_path / "bundle"
    _convert(inputs, out, vision_heads, no_llm=True, llm_reference="base-llm")
    shutil.copytree(inputs / "vicuna", out / "base-llm")
    model = AutoModelForImageTextToText.from_pretrained(out)
    assert torch.equal(model.get_output_embeddings().weight, converted_model.get_output_embeddings().weight)


# --- the full-size key map, on the meta device ------------------------------------------------------------------


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, device="meta", dtype=dtype)


def _eva_block(prefix, width=1408, mlp=6144):
    return {
        f"{prefix}norm1.weight": _meta(width), f"{prefix}norm1.bias": _meta(width),
        f"{prefix}attn.q_bias": _meta(width), f"{prefix}attn.v_bias": _meta(width),
        f"{prefix}attn.qkv.weight": _meta(3 * width, width),
        f"{prefix}attn.proj.weight": _meta(width, width), f"{prefix}attn.proj.bias": _meta(width),
        f"{prefix}norm2.weight": _meta(width), f"{prefix}norm2.bias": _meta(width),
        f"{prefix}mlp.fc1.weight": _meta(mlp, width), f"{prefix}mlp.fc1.bias": _meta(mlp),
        f"{prefix}mlp.fc2.weight": _meta(width, mlp), f"{prefix}mlp.fc2.bias": _meta(width),
    }


def _linear(prefix, out_features, in_features, bias=True):
    tensors = {f"{prefix}.weight": _meta(out_features, in_features)}
    if bias:
        tensors[f"{prefix}.bias"] = _meta(out_features)
    return tensors


def _layer_norm(prefix, width):
    return {f"{prefix}.weight": _meta(width), f"{prefix}.bias": _meta(width)}


def full_size_original_inputs():
    """checkpoint_best.pth's `model` entry and eva_vit_g.pth at full size, as DESIGN.md §2 lists their keys."""
    vision, hidden, text = 1408, 768, 4096
    checkpoint = {"query_tokens": _meta(1, 32, hidden), "temp": _meta()}
    for block in (37, 38):
        checkpoint.update(_eva_block(f"visual_encoder.blocks.{block}."))
    checkpoint.update(_layer_norm("ln_vision", vision))
    bert = "Qformer.bert."
    checkpoint.update({
        f"{bert}embeddings.word_embeddings.weight": _meta(30523, hidden),
        f"{bert}embeddings.position_embeddings.weight": _meta(512, hidden),
        f"{bert}embeddings.position_ids": _meta(1, 512, dtype=torch.int64),
        **_layer_norm(f"{bert}embeddings.LayerNorm", hidden),
    })
    for layer in range(12):
        prefix = f"{bert}encoder.layer.{layer}."
        for name in ("query", "key", "value"):
            checkpoint.update(_linear(f"{prefix}attention.self.{name}", hidden, hidden))
        checkpoint.update(_linear(f"{prefix}attention.output.dense", hidden, hidden))
        checkpoint.update(_layer_norm(f"{prefix}attention.output.LayerNorm", hidden))
        if layer % 2 == 0:
            checkpoint.update(_linear(f"{prefix}crossattention.self.query", hidden, hidden))
            checkpoint.update(_linear(f"{prefix}crossattention.self.key", hidden, vision))
            checkpoint.update(_linear(f"{prefix}crossattention.self.value", hidden, vision))
            checkpoint.update(_linear(f"{prefix}crossattention.output.dense", hidden, hidden))
            checkpoint.update(_layer_norm(f"{prefix}crossattention.output.LayerNorm", hidden))
        for suffix in ("", "_query"):
            checkpoint.update(_linear(f"{prefix}intermediate{suffix}.dense", 3072, hidden))
            checkpoint.update(_linear(f"{prefix}output{suffix}.dense", hidden, 3072))
            checkpoint.update(_layer_norm(f"{prefix}output{suffix}.LayerNorm", hidden))
    checkpoint.update(_linear("llm_proj", text, hidden))
    checkpoint.update(_linear("context1", vision, vision, bias=False))
    checkpoint.update(_linear("context2", vision, vision))
    checkpoint.update(_linear("gate1", vision, vision, bias=False))
    checkpoint.update(_linear("gate2", vision, vision))
    checkpoint.update(_linear("context3", vision, 3 * vision))
    checkpoint.update(_linear("vision_proj", 256, hidden))
    checkpoint.update(_linear("text_proj", 256, hidden))
    for layer in range(32):
        checkpoint[f"llm_model.model.layers.{layer}.self_attn.rotary_emb.inv_freq"] = _meta(64)
    eva = {"cls_token": _meta(1, 1, vision), "pos_embed": _meta(1, 257, vision),
           "patch_embed.proj.weight": _meta(vision, 3, 14, 14), "patch_embed.proj.bias": _meta(vision)}
    for block in range(40):
        eva.update(_eva_block(f"blocks.{block}."))
    return {"model": checkpoint}, eva


def test_full_size_checkpoint_maps_onto_the_default_model_on_meta():
    from transformers import AutoModelForCausalLM, LlamaConfig

    checkpoint, eva = full_size_original_inputs()
    vision_state, unknown = convert_eva_state_dict(eva, "eva_vit_g.pth")
    assert not unknown
    vision = VisionSource(state_dict=vision_state, kind="eva")
    reference = DeltaVLMConfig()
    vicuna = LlamaConfig(**{**reference.text_config.to_dict(), "vocab_size": 32000, "pad_token_id": 0, "bos_token_id": 1})
    bert_base = {"num_attention_heads": 12, "hidden_act": "gelu", "layer_norm_eps": 1e-12}
    config = build_config(checkpoint, vision, vicuna, bert_base, dict(
        vocab_size=32001, pad_token_id=32000, bos_token_id=2, eos_token_id=2, image_token_id=32001,
    ))
    for name in ("vision_config", "qformer_config"):
        derived, default = getattr(config, name).to_dict(), getattr(reference, name).to_dict()
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                    "patch_size", "vocab_size", "cross_attention_frequency", "max_position_embeddings"):
            assert derived.get(key) == default.get(key), (name, key)
    assert (config.num_query_tokens, config.image_token_id) == (reference.num_query_tokens, reference.image_token_id)

    state_dict, ignored, superseded = assemble_state_dict(checkpoint, vision, depth=39, image_size=224)
    with torch.device("meta"):
        language_model = AutoModelForCausalLM.from_config(vicuna)
        model = DeltaVLMForConditionalGeneration(reference)
    for key, tensor in language_model.state_dict().items():
        if key.endswith(("embed_tokens.weight", "lm_head.weight")):
            tensor = append_mean_rows(tensor, 1)
        state_dict[f"language_model.{key}"] = tensor
    check_state_dict(state_dict, model.state_dict())  # no missing, no unexpected, every shape right
    assert sum(key.startswith("vision:encoder.layers.39.") for key in ignored) == 12
    assert sum(".layers.37." in key or ".layers.38." in key for key in superseded) == 24
    assert {"temp", "vision_proj.weight", "text_proj.weight"} <= ignored.keys()


# --- bad inputs -----------------------------------------------------------------------------------------------------


def _expect_failure(tmp_path, inputs, vision_heads, capsys, error, match, **overrides):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        _convert(inputs, out, vision_heads, **overrides)
    assert not out.exists() and list(tmp_path.iterdir()) == [p for p in tmp_path.iterdir() if p.name != "out"]
    assert not any(p.name.startswith(".out.") for p in tmp_path.iterdir())
    # the command line: exit status 1 and one line naming the problem
    args = _cli_args(inputs, out, vision_heads)
    for flag, key in (("--checkpoint", "checkpoint"), ("--vision", "vision"), ("--llm", "llm")):
        if key in overrides:
            args[args.index(flag) + 1] = str(overrides[key])
    capsys.readouterr()
    assert deltavlm_cli.main(["convert", *args]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("deltavlm convert: error:") and re.search(match, message)
    assert not out.exists()


def test_convert_refuses_a_file_that_is_not_a_checkpoint(tmp_path, inputs, vision_heads, capsys):
    bad = tmp_path / "notes.pth"
    bad.write_text("not a checkpoint")
    _expect_failure(tmp_path, inputs, vision_heads, capsys, ValueError, "notes.pth is not a PyTorch checkpoint",
                    checkpoint=bad)


def test_convert_refuses_a_checkpoint_of_another_architecture(tmp_path, inputs, vision_heads, original, capsys):
    other = {key: value for key, value in original["model"].items() if not key.startswith(("context", "gate"))}
    other["opt_proj.weight"] = other.pop("llm_proj.weight")  # BLIP-2 OPT-style
    path = tmp_path / "blip2_opt.pth"
    torch.save({"model": other}, path)
    _expect_failure(tmp_path, inputs, vision_heads, capsys, ValueError, "not a DeltaVLM checkpoint", checkpoint=path)


def test_convert_names_unknown_keys_and_shape_mismatches(tmp_path, inputs, vision_heads, original, capsys):
    extra = {**original, "model": {**original["model"], "mask_decoder.weight": torch.zeros(2)}}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"does not know.*mask_decoder\.weight"):
        _convert(inputs, tmp_path / "out", vision_heads, checkpoint=tmp_path / "extra.pth")
    wrong = {**original, "model": {**original["model"], "context2.bias": torch.zeros(31)}}
    torch.save(wrong, tmp_path / "wrong.pth")
    _expect_failure(tmp_path, inputs, vision_heads, capsys, ValueError,
                    r"difference_module\.context2\.bias: inputs give \(31,\), the model needs \(32,\)",
                    checkpoint=tmp_path / "wrong.pth")


def test_convert_refuses_a_missing_vision_file(tmp_path, inputs, vision_heads, capsys):
    _expect_failure(tmp_path, inputs, vision_heads, capsys, FileNotFoundError, "vision weights not found",
                    vision=tmp_path / "eva_vit_g.pth")


def test_convert_refuses_a_tokenizer_that_does_not_match_the_llm(tmp_path, inputs, vision_heads, capsys):
    llm = tmp_path / "vicuna"
    shutil.copytree(inputs / "vicuna", llm)
    config = json.loads((llm / "config.json").read_text())
    config["vocab_size"] -= 1
    (llm / "config.json").write_text(json.dumps(config))
    _expect_failure(tmp_path, inputs, vision_heads, capsys, ValueError, "tokenizer .* does not match", llm=llm)


def test_convert_refuses_to_overwrite_without_asking(tmp_path, inputs, vision_heads):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        _convert(inputs, out, vision_heads)
    assert (out / "keep.txt").read_text() == "mine"
    _convert(inputs, out, vision_heads, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


# --- a new DeltaVLM from InstructBLIP ------------------------------------------------------------------------------


@pytest.mark.parametrize("instructblip_vocab", [502, 501], ids=["image-token-row", "no-image-token-row"])
def test_init_from_instructblip_loads_everything_but_the_difference_module(
    tmp_path, instructblip_vocab, tiny_processor, sample_pairs
):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    config = InstructBlipConfig(
        vision_config=dict(hidden_size=32, intermediate_size=139, num_hidden_layers=3, num_attention_heads=4,
                           image_size=28, patch_size=14),
        qformer_config=dict(vocab_size=30523, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=37),
        text_config=dict(model_type="llama", vocab_size=instructblip_vocab, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, pad_token_id=500),
        num_query_tokens=4,
        image_token_index=501,
    )
    torch.manual_seed(0)
    instructblip = InstructBlipForConditionalGeneration(config)
    instructblip.save_pretrained(tmp_path)
    model = init_from_instructblip(tmp_path).eval()
    assert model.config.text_config.vocab_size == 501 and model.config.image_token_id == 501
    source, target = instructblip.state_dict(), model.state_dict()
    for key, tensor in target.items():
        if key.startswith("difference_module."):
            bound = tensor.shape[-1] ** -0.5 if tensor.ndim == 2 else None
            if bound is not None:
                assert tensor.abs().max() <= bound  # fresh, at torch's default init
            continue
        expected = source[key][:501] if key.endswith(("embed_tokens.weight", "lm_head.weight")) else source[key]
        assert torch.equal(tensor, expected), key
    batch = tiny_processor(images=sample_pairs[:2], text=["q describe", "q what changed"], answers=["a", "b"])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_convert_takes_the_frozen_vit_from_an_instructblip_folder(tmp_path, inputs, meta, original, converted_model):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    tiny = meta["tiny_config"]
    vision = {key: tiny["vision"][key] for key in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                   "num_attention_heads", "image_size", "patch_size")}
    config = InstructBlipConfig(
        vision_config=vision,
        qformer_config=dict(vocab_size=30523, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37),
        text_config=dict(model_type="llama", vocab_size=502, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4),
        num_query_tokens=4,
    )
    torch.manual_seed(0)
    instructblip = InstructBlipForConditionalGeneration(config)
    instructblip.save_pretrained(tmp_path / "instructblip")
    report = _convert(inputs, tmp_path / "out", None, vision=tmp_path / "instructblip")  # heads from its config
    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "out")
    source = instructblip.vision_model
    assert model.config.vision_config.num_attention_heads == tiny["vision"]["num_attention_heads"]
    assert torch.equal(model.vision_model.encoder.layers[0].self_attn.qkv.weight, source.encoder.layers[0].self_attn.qkv.weight)
    assert torch.equal(model.vision_model.embeddings.position_embedding, source.embeddings.position_embedding)
    assert torch.equal(model.vision_model.encoder.layers[38].mlp.fc2.weight,
                       original["model"]["visual_encoder.blocks.38.mlp.fc2.weight"])
    assert torch.equal(model.vision_model.post_layernorm.weight, original["model"]["ln_vision.weight"])
    assert "vision:post_layernorm.weight" in report.superseded
