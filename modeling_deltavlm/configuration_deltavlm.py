"""DeltaVLM model configuration.

The defaults ARE the paper's model (Deng, Zhou & Wu, arXiv 2507.22346; authors' code
hanlinwu/DeltaVLM): EVA-ViT-g/14 without its 40th block, a BERT-base Q-Former with 32 queries and
cross-attention every second layer, the CSRM difference module, and Vicuna-7B-v1.5 with the
`[PAD]` token the authors add.
"""

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.instructblip.configuration_instructblip import (
    InstructBlipQFormerConfig,
    InstructBlipVisionConfig,
)

# Vicuna-7B-v1.5's config.json, with the vocabulary grown by the `[PAD]` token (id 32000) that the
# authors add at load time; bos = eos = `</s>` (id 2) because they set bos_token = eos_token = '</s>'.
VICUNA_7B_V15_TEXT_CONFIG = {
    "model_type": "llama",
    "vocab_size": 32001,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "pad_token_id": 32000,
    "bos_token_id": 2,
    "eos_token_id": 2,
}

# EVA-ViT-g/14 as BLIP-2/InstructBLIP use it: 39 of EVA-CLIP-g's 40 blocks, MLP 6144 = int(1408 * 4.3637).
EVA_VIT_G_VISION_CONFIG = {
    "hidden_size": 1408,
    "intermediate_size": 6144,
    "num_hidden_layers": 39,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
}

# BERT-base Q-Former; vocab 30523 = bert-base-uncased's 30522 + the `[DEC]` bos token LAVIS adds.
BERT_BASE_QFORMER_CONFIG = {
    "vocab_size": 30523,
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "intermediate_size": 3072,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-12,
    "cross_attention_frequency": 2,
    "max_position_embeddings": 512,
}


@strict
class DeltaVLMConfig(PreTrainedConfig):
    r"""
    Configuration of [`DeltaVLMForConditionalGeneration`].

    vision_config (`dict` or `InstructBlipVisionConfig`): the per-image ViT (EVA-ViT-g/14 by default).
    qformer_config (`dict` or `InstructBlipQFormerConfig`): the instruction-aware Q-Former (BERT-base).
        Its `encoder_hidden_size` is derived from the vision width.
    text_config (`dict` or any causal-LM `PreTrainedConfig`): the language model (Vicuna-7B-v1.5).
    num_query_tokens (`int`, defaults to 32): learned queries (at least 1); also the number of image placeholder tokens.
    image_token_id (`int`, defaults to 32001): placeholder id the processor puts where the projected
        queries go. It may lie outside the language model's vocabulary (the default does): the
        placeholders are replaced before the embedding lookup, so the released checkpoint's 32001-row
        vocabulary (and its logits) stay exactly as trained.
    use_difference_module (`bool`, defaults to `True`): apply CSRM. `False` feeds the Q-Former the
        plain concatenation of the two images' features, which is what the authors' training
        `forward()` did (its CSRM call is commented out).
    difference_dropout (`float`, defaults to 0.5): dropout on CSRM's tanh and sigmoid outputs.
    ln_vision_eps (`float`, defaults to 1e-5): eps of `ln_vision`, LAVIS' LayerNorm on the ViT output.
        It is torch's default, unlike the ViT's own 1e-6 (LAVIS builds it as `LayerNorm(1408)`).
    num_trainable_vision_layers (`int`, defaults to 2): final ViT blocks trained by the paper (37, 38).
    language_model_weights (`str`, *optional*): path or Hub id of a causal LM whose weights fill `language_model`
        when the folder is loaded (`deltavlm convert --no-llm` writes such folders, which then hold no LLM weights).
        Rows the reference lacks (the `[PAD]` token) are appended as the mean of its other rows. A relative path is
        looked up inside the loaded folder first.
    """

    model_type = "deltavlm"
    attribute_map = {"image_token_index": "image_token_id"}
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=InstructBlipVisionConfig, init_kwargs=EVA_VIT_G_VISION_CONFIG),
        "qformer_config": SubConfigSpec(config_class=InstructBlipQFormerConfig, init_kwargs=BERT_BASE_QFORMER_CONFIG),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=VICUNA_7B_V15_TEXT_CONFIG),
    }

    vision_config: dict | PreTrainedConfig | None = None
    qformer_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    num_query_tokens: int = 32
    image_token_id: int = 32001
    use_difference_module: bool = True
    difference_dropout: float | int = 0.5
    ln_vision_eps: float = 1e-5
    num_trainable_vision_layers: int = 2
    initializer_range: float = 0.02
    language_model_weights: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.qformer_config.encoder_hidden_size = self.vision_config.hidden_size
        if not 0 <= self.num_trainable_vision_layers <= self.vision_config.num_hidden_layers:
            raise ValueError(
                f"num_trainable_vision_layers={self.num_trainable_vision_layers} must lie in "
                f"[0, {self.vision_config.num_hidden_layers}] (the ViT's depth)"
            )
        if self.num_query_tokens < 1:  # no queries: no image tokens, the model would answer without the images
            raise ValueError(f"num_query_tokens must be at least 1, got {self.num_query_tokens}")
        if not 0.0 <= self.difference_dropout < 1.0:
            raise ValueError(f"difference_dropout must lie in [0, 1), got {self.difference_dropout}")


__all__ = ["DeltaVLMConfig"]
