import pytest
import torch

import modeling_deltavlm  # noqa: F401  (registers the Auto classes)
from modeling_deltavlm import DeltaVLMConfig, DeltaVLMForConditionalGeneration
from transformers import AutoConfig


def _num_parameters(module):
    return sum(parameter.numel() for parameter in module.parameters())


def test_default_config_is_the_paper_model():
    config = DeltaVLMConfig()
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (1408, 39)
    assert config.vision_config.intermediate_size == 6144 and config.vision_config.num_attention_heads == 16
    assert config.qformer_config.vocab_size == 30523 and config.qformer_config.cross_attention_frequency == 2
    assert config.qformer_config.encoder_hidden_size == 1408
    assert config.num_query_tokens == 32
    assert config.text_config.model_type == "llama" and config.text_config.vocab_size == 32001
    assert config.text_config.pad_token_id == 32000 and config.image_token_id == 32001
    assert config.ln_vision_eps == 1e-5 and config.vision_config.layer_norm_eps == 1e-6
    assert config.use_difference_module and config.difference_dropout == 0.5
    assert config.num_trainable_vision_layers == 2


def test_default_config_parameter_counts_on_meta_device():
    with torch.device("meta"):
        model = DeltaVLMForConditionalGeneration(DeltaVLMConfig())
    qformer = _num_parameters(model.qformer) + model.query_tokens.numel()
    assert abs(qformer / 1e6 - 185.7) < 0.1
    assert abs(_num_parameters(model.difference_module) / 1e6 - 13.88) < 0.01
    assert abs(_num_parameters(model.language_projection) / 1e6 - 3.15) < 0.01
    assert abs(_num_parameters(model.vision_model) / 1e6 - 985) < 1.5
    assert abs(_num_parameters(model.language_model) / 1e9 - 6.74) < 0.005
    assert model.vision_model.post_layernorm.eps == 1e-5
    counts = model.set_trainable_as_paper()
    assert counts["difference_module"] == _num_parameters(model.difference_module)
    assert counts["vision_layers"] == 2 * _num_parameters(model.vision_model.encoder.layers[0])


def test_config_round_trip_and_auto_config(tmp_path, make_tiny_config):
    config = make_tiny_config(use_difference_module=False, difference_dropout=0.1)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DeltaVLMConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}
    assert drop(loaded.to_dict()) == drop(config.to_dict())
    assert loaded.image_token_index == config.image_token_id  # InstructBLIP's alias


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"num_trainable_vision_layers": 5}, "num_trainable_vision_layers"),
        ({"difference_dropout": 1.0}, "difference_dropout"),
        ({"num_query_tokens": 0}, "num_query_tokens"),
        ({"num_query_tokens": -3}, "num_query_tokens"),
    ],
)
def test_config_rejects_impossible_values(make_tiny_config, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_tiny_config(**overrides)
