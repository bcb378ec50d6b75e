"""Start a new DeltaVLM for training from an InstructBLIP checkpoint in HuggingFace format.

The authors started from InstructBLIP-Vicuna-7B. DeltaVLM names its parts as InstructBLIP does (`vision_model`,
`qformer`, `query_tokens`, `language_projection`, `language_model`), so every shared weight loads by name and only
the difference module (CSRM) starts fresh, at PyTorch's default init as the authors' CSRM did:

```python
from modeling_deltavlm.init_from_instructblip import init_from_instructblip

model = init_from_instructblip("path/to/instructblip-vicuna-7b")        # DeltaVLMForConditionalGeneration
model.set_trainable_as_paper()
```

Vocabulary: HF InstructBLIP-Vicuna checkpoints carry extra language-model rows after Vicuna's 32000 (LAVIS' `[PAD]`,
and in newer conversions an `<image>` row). DeltaVLM keeps the rows up to, not including, InstructBLIP's image token
(its own image placeholder lies outside the vocabulary and is replaced before the embedding lookup). Rows the new
vocabulary has beyond the checkpoint's are the mean of the others, as for the converted release.
"""

from pathlib import Path

import torch

from .configuration_deltavlm import DeltaVLMConfig
from .modeling_deltavlm import DeltaVLMForConditionalGeneration, append_mean_rows

EMBEDDING_KEYS = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")


def deltavlm_config_from_instructblip(instructblip_config, **overrides) -> DeltaVLMConfig:
    """A DeltaVLMConfig with the InstructBLIP checkpoint's vision, Q-Former and language-model sizes.

    The language-model vocabulary ends before InstructBLIP's image token when that token has a row of its own.
    `overrides` go to `DeltaVLMConfig` (e.g. `use_difference_module=False`).
    """
    text_config = instructblip_config.text_config.to_dict()
    rows = text_config["vocab_size"]
    image_token = getattr(instructblip_config, "image_token_index", None)
    vocab_size = image_token if image_token is not None and image_token < rows else rows
    text_config["vocab_size"] = vocab_size
    if text_config.get("pad_token_id") is not None and text_config["pad_token_id"] >= vocab_size:
        text_config["pad_token_id"] = vocab_size - 1  # the pad id must have a row; LAVIS' [PAD] is the last one
    kwargs = dict(
        vision_config=instructblip_config.vision_config.to_dict(),
        qformer_config=instructblip_config.qformer_config.to_dict(),
        text_config=text_config,
        num_query_tokens=instructblip_config.num_query_tokens,
        image_token_id=image_token if image_token is not None else vocab_size,
    )
    kwargs.update(overrides)
    return DeltaVLMConfig(**kwargs)


def init_from_instructblip(instructblip_path, config: DeltaVLMConfig | None = None, **from_pretrained_kwargs):
    """DeltaVLMForConditionalGeneration with every InstructBLIP weight loaded and a fresh difference module.

    instructblip_path: an `InstructBlipForConditionalGeneration` folder (or Hub id) in HF format.
    config: the DeltaVLM configuration; by default `deltavlm_config_from_instructblip` of the checkpoint's config.
    from_pretrained_kwargs: passed to `from_pretrained` (`dtype`, `device_map`, ...).
    """
    from transformers import AutoConfig

    instructblip_config = AutoConfig.from_pretrained(str(instructblip_path))
    if instructblip_config.model_type != "instructblip":
        raise ValueError(f"{instructblip_path} is a {instructblip_config.model_type!r} checkpoint, not InstructBLIP")
    config = config if config is not None else deltavlm_config_from_instructblip(instructblip_config)
    source_rows = instructblip_config.text_config.vocab_size
    target_rows = config.text_config.vocab_size
    if source_rows == target_rows:
        return DeltaVLMForConditionalGeneration.from_pretrained(instructblip_path, config=config, **from_pretrained_kwargs)

    # Different vocabulary sizes: load everything else, then copy the shared rows of the two embedding matrices.
    model = DeltaVLMForConditionalGeneration.from_pretrained(
        instructblip_path, config=config, ignore_mismatched_sizes=True, **from_pretrained_kwargs
    )
    source = _read_tensors(instructblip_path, EMBEDDING_KEYS)
    targets = {
        "language_model.model.embed_tokens.weight": model.get_input_embeddings().weight,
        "language_model.lm_head.weight": model.get_output_embeddings().weight,
    }
    with torch.no_grad():
        for key, target in targets.items():
            if key not in source:  # tied lm_head
                continue
            rows = source[key][:target_rows]
            if rows.shape[0] < target_rows:
                rows = append_mean_rows(rows, target_rows - rows.shape[0])
            target.copy_(rows.to(target.dtype))
    return model


def _read_tensors(folder, keys) -> dict:
    """The given tensors from an HF folder's safetensors files (sharded or not)."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(str(folder), allow_patterns=["*.safetensors", "*.json"]))
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in set(keys) & set(handle.keys()):
                tensors[key] = handle.get_tensor(key)
    return tensors


__all__ = ["deltavlm_config_from_instructblip", "init_from_instructblip"]
