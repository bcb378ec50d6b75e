"""Convert the authors' released DeltaVLM checkpoint (LAVIS format) into a HuggingFace DeltaVLM folder.

    deltavlm convert --checkpoint checkpoint_best.pth --vision eva_vit_g.pth --llm vicuna-7b-v1.5 \\
        --qformer-tokenizer bert-base-uncased --out deltavlm-7b [--dtype float16]

The released `checkpoint_best.pth` holds only what the authors trained (the last two ViT blocks, ln_vision, the
CSRM, the Q-Former, the query tokens, the projection); the rest comes from three public inputs:

| DeltaVLM part                                  | source                                                   |
| ---------------------------------------------- | -------------------------------------------------------- |
| ViT embeddings + blocks 0..36                  | `eva_vit_g.pth` (EVA key format) or an InstructBLIP HF folder |
| ViT blocks 37, 38; ln_vision; CSRM; Q-Former; query tokens; projection | `checkpoint_best.pth`             |
| language model                                 | the Vicuna-7B-v1.5 folder, plus one `[PAD]` row (mean of the others) |

Everything is derived from the inputs' shapes (widths, depths, vocabularies), so the same code converts the real
7B files and the tiny fixture. Every input key is either mapped (with its shape checked against the model) or
listed as ignored with a reason; a key the model needs that no input provides is an error. Inputs are read with
`torch.load(weights_only=True)`: no arbitrary unpickling. The folder is written next to `--out` and renamed into
place at the end, so a failed conversion leaves nothing behind.
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# Names and shapes of the released checkpoint, read off the authors' code (DESIGN.md §2). ------------------------

# EVA-ViT key (inside `eva_vit_g.pth`, or after `visual_encoder.` in the checkpoint) -> InstructBlipVisionModel key.
# `attn.q_bias` + `attn.v_bias` become one `self_attn.qkv.bias` (see `_merge_qkv_biases`).
EVA_RENAMES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.weight", r"encoder.layers.\1.self_attn.qkv.weight"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
]
EVA_QKV_BIAS = re.compile(r"blocks\.(\d+)\.attn\.(q_bias|v_bias)")

# LAVIS Q-Former (BertModel under `Qformer.bert.`) -> InstructBlipQFormerModel, as transformers' BLIP-2 conversion.
QFORMER_RENAMES = [
    (r"embeddings\.LayerNorm\.", "embeddings.layernorm."),
    (r"\.attention\.self\.", ".attention.attention."),
    (r"\.crossattention\.self\.", ".crossattention.attention."),
]

# Top-level prefixes of the checkpoint -> DeltaVLM.
CHECKPOINT_PREFIXES = [
    ("query_tokens", "query_tokens"),
    ("ln_vision.", "vision_model.post_layernorm."),
    ("llm_proj.", "language_projection."),
    ("context1.", "difference_module.context1."),
    ("context2.", "difference_module.context2."),
    ("context3.", "difference_module.context3."),
    ("gate1.", "difference_module.gate1."),
    ("gate2.", "difference_module.gate2."),
]

# Checkpoint keys the model does not use, with the reason (they go to the report, not the folder).
IGNORED_CHECKPOINT_KEYS = [
    (r"temp", "BLIP-2 contrastive temperature: used by neither forward() nor generate()"),
    (r"(vision_proj|text_proj)\..*", "BLIP-2 contrastive projection: used by neither forward() nor generate()"),
    (r".*\.position_ids", "buffer (0..N-1), rebuilt by the model"),
    (r"llm_model\..*rotary_emb\.inv_freq", "rotary buffer of the original modeling_llama, rebuilt by the model"),
    (r"Qformer\.cls\..*", "masked-LM head, set to None by the authors' model"),
]
CHECKPOINT_TOP_LEVEL_IGNORED = {"optimizer", "config", "scaler", "epoch"}

DIFFERENCE_MODULE_LAYERS = ("context1", "context2", "gate1", "gate2", "context3")
EVA_HEAD_DIM = 88  # LAVIS builds EVA-ViT-g with num_heads = 1408 // 88; nothing in the weights fixes the head count
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MAX_SHARD_SIZE = "5GB"


class ConversionError(ValueError):
    """An input does not fit (wrong file, wrong architecture, missing or mis-shaped weights)."""


# --- reading inputs --------------------------------------------------------------------------------------------


def load_torch_file(path, what: str) -> object:
    """`torch.load(weights_only=True)` (memory-mapped where the format allows) with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise ConversionError(f"{what} {path} is not a PyTorch checkpoint: {_first_line(error)}") from error
    except Exception as error:  # noqa: BLE001 - pickle/zip errors come in many types
        raise _load_error(path, what, error) from error
    try:  # legacy (non-zip) files cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001
        raise _load_error(path, what, error) from error


def _load_error(path, what: str, error: Exception) -> "ConversionError":
    """torch's weights-only refusal invites a retry with weights_only=False; say instead what was refused."""
    text = str(error)
    if not (isinstance(error, pickle.UnpicklingError) and "Weights only load failed" in text):
        return ConversionError(f"{what} {path} is not a PyTorch checkpoint: {_first_line(error)}")
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    detail = next((line.strip() for line in text.splitlines() if line.strip() and not line.startswith(boilerplate)), "")
    if "global" not in detail.lower():  # not a pickle at all, or opcodes the weights-only reader does not take
        return ConversionError(f"{what} {path} is not a PyTorch checkpoint: the weights-only reader stopped ({detail})")
    return ConversionError(
        f"{what} {path} refused: it holds pickled Python objects other than tensors, which could run code when "
        f"loaded ({detail}); only plain weights are read (torch.load with weights_only=True)"
    )


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)


def load_original_checkpoint(path) -> dict:
    """The authors' `checkpoint_best.pth`: `{"model": state_dict, "optimizer", "config", "scaler", "epoch"}`."""
    checkpoint = load_torch_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("model"), dict):
        raise ConversionError(
            f"checkpoint {path} is not a DeltaVLM/LAVIS training checkpoint: expected a dict with a 'model' state dict"
        )
    state_dict = checkpoint["model"]
    required = ["query_tokens", "llm_proj.weight", "ln_vision.weight", "context3.weight"]
    absent = [key for key in required if key not in state_dict]
    if absent:
        raise ConversionError(
            f"checkpoint {path} is not a DeltaVLM checkpoint (a different architecture?): it lacks {absent}"
        )
    return checkpoint


def _rename(key: str, table) -> str | None:
    for pattern, replacement in table:
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", replacement, key)
    return None


def _merge_qkv_biases(eva: dict, converted: dict, used: set) -> None:
    """EVA has q_bias and v_bias and no k bias; InstructBLIP stores cat(q_bias, 0, v_bias) as `qkv.bias`."""
    blocks = sorted({int(m.group(1)) for key in eva if (m := EVA_QKV_BIAS.fullmatch(key))})
    for block in blocks:
        q_key, v_key = f"blocks.{block}.attn.q_bias", f"blocks.{block}.attn.v_bias"
        if q_key not in eva or v_key not in eva:
            raise ConversionError(f"block {block} has only one of attn.q_bias / attn.v_bias")
        q_bias, v_bias = eva[q_key], eva[v_key]
        converted[f"encoder.layers.{block}.self_attn.qkv.bias"] = torch.cat([q_bias, torch.zeros_like(q_bias), v_bias])
        used.update((q_key, v_key))


def convert_eva_state_dict(eva: dict, source: str) -> tuple[dict, dict]:
    """EVA-format ViT weights -> (InstructBlipVisionModel state dict, {unknown key: reason})."""
    converted, used, unknown = {}, set(), {}
    _merge_qkv_biases(eva, converted, used)
    for key, tensor in eva.items():
        if key in used:
            continue
        new_key = _rename(key, EVA_RENAMES)
        if new_key is None:
            unknown[key] = f"not an EVA-ViT weight ({source})"
        else:
            converted[new_key] = tensor
    return converted, unknown


def interpolate_position_embedding(position_embedding: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, D) -> (1, 1 + grid*grid, D), bicubic on the patch grid in float32, CLS kept: what LAVIS'
    `interpolate_pos_embed` does when the model's image size differs from the EVA file's 224."""
    cls_token, patches = position_embedding[:, :1].float(), position_embedding[:, 1:].float()
    old_grid = math.isqrt(patches.shape[1])
    if old_grid == grid:
        return position_embedding
    patches = patches.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
    patches = torch.nn.functional.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([cls_token, patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)


@dataclass
class VisionSource:
    """The frozen ViT weights (InstructBlipVisionModel names, no `vision_model.` prefix) and what fixes its config."""

    state_dict: dict
    kind: str  # "eva" or "instructblip"
    num_heads: int | None = None  # known for InstructBLIP (its config.json), not for an EVA file
    layer_norm_eps: float = 1e-6
    ignored: dict = field(default_factory=dict)


def load_vision_source(path) -> VisionSource:
    """`eva_vit_g.pth` (EVA key format) or an InstructBLIP folder in HF format (its `vision_model.*` weights)."""
    path = Path(path)
    if path.is_dir():
        return _load_instructblip_vision(path)
    weights = load_torch_file(path, "vision weights")
    if isinstance(weights, dict) and isinstance(weights.get("model"), dict):
        weights = weights["model"]  # some EVA releases wrap the state dict
    if not isinstance(weights, dict) or "pos_embed" not in weights or "patch_embed.proj.weight" not in weights:
        raise ConversionError(f"vision weights {path} are not an EVA-ViT state dict (no pos_embed/patch_embed)")
    state_dict, unknown = convert_eva_state_dict(weights, str(path))
    if unknown:
        raise ConversionError(f"vision weights {path} hold keys that are not EVA-ViT weights: {sorted(unknown)[:10]}")
    return VisionSource(state_dict=state_dict, kind="eva")


def _load_instructblip_vision(folder: Path) -> VisionSource:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"vision folder {folder} has no config.json (expected an InstructBLIP checkpoint)")
    config = json.loads(config_path.read_text())
    if config.get("model_type") not in ("instructblip", "blip-2") or "vision_config" not in config:
        raise ConversionError(f"vision folder {folder} is not an InstructBLIP/BLIP-2 checkpoint (model_type={config.get('model_type')!r})")
    state_dict = {key.removeprefix("vision_model."): tensor for key, tensor in _read_hf_weights(folder, "vision_model.").items()}
    if not state_dict:
        raise ConversionError(f"vision folder {folder} holds no vision_model.* weights")
    vision_config = config["vision_config"]
    return VisionSource(
        state_dict=state_dict,
        kind="instructblip",
        num_heads=vision_config.get("num_attention_heads", 16),
        layer_norm_eps=vision_config.get("layer_norm_eps", 1e-6),
    )


def _read_hf_weights(folder: Path, prefix: str) -> dict:
    """Tensors under `prefix` from an HF folder's safetensors (single or sharded) or pytorch_model*.bin files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if files:
        tensors = {}
        for file in files:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    if key.startswith(prefix):
                        tensors[key] = handle.get_tensor(key)
        return tensors
    tensors = {}
    for file in sorted(folder.glob("pytorch_model*.bin")):
        shard = load_torch_file(file, "weights shard")
        tensors.update({key: value for key, value in shard.items() if key.startswith(prefix)})
    return tensors


# --- checkpoint -> DeltaVLM names --------------------------------------------------------------------------------


def convert_checkpoint_state_dict(state_dict: dict) -> tuple[dict, dict, dict]:
    """The checkpoint's `model` entry -> (DeltaVLM state dict without the frozen parts, ignored {key: reason},
    vision overrides {InstructBlipVisionModel key: tensor} for the trained ViT blocks)."""
    converted, ignored, unknown, vision = {}, {}, [], {}
    eva_part = {key.removeprefix("visual_encoder."): t for key, t in state_dict.items() if key.startswith("visual_encoder.")}
    vision, eva_unknown = convert_eva_state_dict(eva_part, "checkpoint visual_encoder")
    unknown += [f"visual_encoder.{key}" for key in eva_unknown]
    for key, tensor in state_dict.items():
        if key.startswith("visual_encoder."):
            continue
        reason = next((why for pattern, why in IGNORED_CHECKPOINT_KEYS if re.fullmatch(pattern, key)), None)
        if reason is not None:
            ignored[key] = reason
        elif key.startswith("Qformer.bert."):
            new_key = "qformer." + key.removeprefix("Qformer.bert.")
            for pattern, replacement in QFORMER_RENAMES:
                new_key = re.sub(pattern, replacement, new_key)
            converted[new_key] = tensor
        elif (prefix := next(((old, new) for old, new in CHECKPOINT_PREFIXES if key == old or key.startswith(old)), None)):
            converted[prefix[1] + key[len(prefix[0]) :]] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ConversionError(
            f"the checkpoint holds {len(unknown)} keys DeltaVLM does not know (a different architecture?): "
            f"{sorted(unknown)[:12]}"
        )
    return converted, ignored, vision


# --- configuration ------------------------------------------------------------------------------------------------


def _vision_config(vision: VisionSource, trained_blocks: dict, image_size: int | None, num_heads: int | None) -> dict:
    state = vision.state_dict
    width = state["embeddings.class_embedding"].shape[-1]
    patch_size = state["embeddings.patch_embedding.weight"].shape[-1]
    source_blocks = {int(m.group(1)) for key in state if (m := re.match(r"encoder\.layers\.(\d+)\.", key))}
    trained = {int(m.group(1)) for key in trained_blocks if (m := re.match(r"encoder\.layers\.(\d+)\.", key))}
    # The model's depth is set by the last trained block (38 -> 39 blocks); EVA-CLIP-g's 40th block is dropped by
    # LAVIS. Without trained blocks, LAVIS' rule applies: one block fewer than the EVA file.
    depth = max(trained) + 1 if trained else (len(source_blocks) - (vision.kind == "eva"))
    native_grid = math.isqrt(state["embeddings.position_embedding"].shape[1] - 1)
    image_size = image_size or native_grid * patch_size
    if image_size % patch_size:
        raise ConversionError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
    heads = num_heads or vision.num_heads
    if heads is None:
        if width % EVA_HEAD_DIM:
            raise ConversionError(
                f"the number of ViT attention heads is not stored in an EVA file and width {width} is not a multiple "
                f"of EVA's head width {EVA_HEAD_DIM}: pass --vision-heads"
            )
        heads = width // EVA_HEAD_DIM
    return dict(
        hidden_size=width,
        intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=depth,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",
        layer_norm_eps=vision.layer_norm_eps,
        qkv_bias=True,
    )


def _qformer_config(converted: dict, bert_config: dict) -> dict:
    layers = {int(m.group(1)) for key in converted if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.", key))}
    cross = sorted({int(m.group(1)) for key in converted if (m := re.match(r"qformer\.encoder\.layer\.(\d+)\.crossattention", key))})
    if not layers or not cross:
        raise ConversionError("the checkpoint's Q-Former has no layers or no cross-attention")
    frequency = cross[1] - cross[0] if len(cross) > 1 else len(layers)
    if cross != list(range(0, len(layers), frequency)):
        raise ConversionError(f"Q-Former cross-attention in layers {cross} is not every {frequency}th layer from 0")
    word_embeddings = converted["qformer.embeddings.word_embeddings.weight"]
    return dict(
        vocab_size=word_embeddings.shape[0],
        hidden_size=word_embeddings.shape[1],
        num_hidden_layers=len(layers),
        num_attention_heads=bert_config.get("num_attention_heads", 12),
        intermediate_size=converted["qformer.encoder.layer.0.intermediate.dense.weight"].shape[0],
        hidden_act=bert_config.get("hidden_act", "gelu"),
        hidden_dropout_prob=bert_config.get("hidden_dropout_prob", 0.1),
        attention_probs_dropout_prob=bert_config.get("attention_probs_dropout_prob", 0.1),
        max_position_embeddings=converted["qformer.embeddings.position_embeddings.weight"].shape[0],
        layer_norm_eps=bert_config.get("layer_norm_eps", 1e-12),
        pad_token_id=bert_config.get("pad_token_id", 0),
        cross_attention_frequency=frequency,
    )


# --- tokenizers ---------------------------------------------------------------------------------------------------


def build_processor(llm_tokenizer_path, qformer_tokenizer_path, image_size: int, num_query_tokens: int):
    """The authors' tokenizer set-up, reproduced exactly (DESIGN.md §1):

    - LLaMA: a new `[PAD]` token as pad (id = the sentencepiece vocabulary size, 32000 for Vicuna), and
      bos = eos = unk = `</s>` (id 2), so every prompt starts with `</s>`; the processor then adds `<image>`.
    - BERT: `[DEC]` added as bos (id 30522), as LAVIS' `init_tokenizer` does.
    """
    from processing import DeltaVLMImageProcessor, DeltaVLMProcessor

    tokenizer = _load_tokenizer(llm_tokenizer_path, "language-model tokenizer")
    if "[PAD]" not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    else:
        tokenizer.pad_token = "[PAD]"
    tokenizer.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})
    if hasattr(tokenizer, "update_post_processor"):
        tokenizer.update_post_processor()  # else the fast tokenizer still prepends <s> (DESIGN.md §4)
    qformer_tokenizer = _load_tokenizer(qformer_tokenizer_path, "Q-Former tokenizer")
    qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    image_processor = DeltaVLMImageProcessor(size={"height": image_size, "width": image_size})
    return DeltaVLMProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=num_query_tokens)


def _load_tokenizer(path, what: str):
    from transformers import AutoTokenizer

    if Path(str(path)).exists() and not Path(str(path)).is_dir():
        raise ConversionError(f"{what}: {path} is a file, expected a tokenizer folder")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as error:
        if not Path(str(path)).exists():
            raise FileNotFoundError(f"{what} not found: {path}") from error
        raise ConversionError(f"{what} {path} cannot be loaded: {error}") from error


# --- the difference-module diagnostic ----------------------------------------------------------------------------


@dataclass
class DifferenceModuleDiagnostic:
    """Were the CSRM weights trained? The authors' training forward() skips the CSRM (DESIGN.md §2), so in a
    checkpoint from that code they stay at PyTorch's default init, |w| <= 1/sqrt(fan_in), with no optimizer state."""

    max_weight_to_init_bound: dict  # layer -> max |w| / (1/sqrt(fan_in)) over its weight and bias; <= 1 at init
    within_default_init: bool
    optimizer_state: str  # "present", "absent" or "unavailable"
    optimizer_detail: str
    trained: bool
    verdict: str


def optimizer_parameter_names(model_state: dict, optimizer: dict) -> dict[int, str] | None:
    """Map the authors' AdamW state indices to parameter names, or None when the layout does not fit.

    The optimizer saw `named_parameters()` with requires_grad in module order, split by `Blip2Base.
    get_optimizer_params` into groups "decay" / "no_decay" (1-d tensors and biases) and, for ViT parameters, one pair
    per block, groups in order of first appearance; indices run over the concatenated groups. The checkpoint's
    `model` entry is `state_dict()` minus frozen parameters, i.e. the same parameters in the same order plus buffers.
    The mapping is accepted only if every group size and every state tensor's shape agree.
    """
    try:
        groups = optimizer["param_groups"]
        states = optimizer["state"]
    except (KeyError, TypeError):
        return None
    parameters = [
        (key, tensor)
        for key, tensor in model_state.items()
        if tensor.is_floating_point() and not re.fullmatch(r".*(\.position_ids|rotary_emb\.inv_freq)", key)
    ]
    by_group: dict[tuple, list[str]] = {}
    for key, tensor in parameters:
        no_decay = tensor.ndim == 1 or key.endswith(".bias")
        block = re.match(r"visual_encoder\.blocks\.(\d+)\.", key)
        vit = f"vit{block.group(1)}" if block else ("vit" if key.startswith("visual_encoder.") else "")
        by_group.setdefault((vit, no_decay), []).append(key)
    names_per_group = list(by_group.values())
    if [len(names) for names in names_per_group] != [len(group["params"]) for group in groups]:
        return None
    mapping = {}
    for group, names in zip(groups, names_per_group):
        mapping.update(zip(group["params"], names))
    shapes = dict(parameters)
    for index, state in states.items():
        average = state.get("exp_avg") if isinstance(state, dict) else None
        if index not in mapping or average is None or tuple(average.shape) != tuple(shapes[mapping[index]].shape):
            return None
    return mapping


def diagnose_difference_module(checkpoint: dict) -> DifferenceModuleDiagnostic:
    state_dict = checkpoint["model"]
    ratios = {}
    for layer in DIFFERENCE_MODULE_LAYERS:
        weight = state_dict[f"{layer}.weight"]
        bound = weight.shape[1] ** -0.5  # torch's nn.Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for w and b
        tensors = [weight] + ([state_dict[f"{layer}.bias"]] if f"{layer}.bias" in state_dict else [])
        ratios[layer] = round(max(t.float().abs().max().item() for t in tensors) / bound, 4)
    within = all(ratio <= 1.0 for ratio in ratios.values())

    optimizer = checkpoint.get("optimizer")
    mapping = optimizer_parameter_names(state_dict, optimizer) if isinstance(optimizer, dict) else None
    if mapping is None:
        optimizer_state = "unavailable"
        detail = "no optimizer state" if not isinstance(optimizer, dict) else "optimizer state does not map onto the parameters"
    else:
        csrm = {index: name for index, name in mapping.items() if name.split(".")[0] in DIFFERENCE_MODULE_LAYERS}
        updated = [
            name for index, name in csrm.items()
            if index in optimizer["state"] and optimizer["state"][index]["exp_avg"].abs().max().item() > 0
        ]
        optimizer_state = "present" if updated else "absent"
        detail = (
            f"{len(updated)} of {len(csrm)} CSRM parameters have AdamW moments "
            f"({len(optimizer['state'])} of {len(mapping)} parameters in all)"
        )
    trained = optimizer_state == "present" or not within
    if trained:
        verdict = "CSRM weights look trained: " + (
            "the optimizer state holds updates for them" if optimizer_state == "present" else
            "they lie outside PyTorch's default-init range"
        ) + "; the difference module is ON."
    else:
        verdict = (
            "CSRM weights look UNTRAINED (still within PyTorch's default-init range"
            + (", no optimizer state for them" if optimizer_state == "absent" else ", optimizer state unavailable")
            + "): this checkpoint was trained without CSRM, as the authors' forward() skips it. The difference "
            "module is OFF (use_difference_module=False), which reproduces how it was trained."
        )
    return DifferenceModuleDiagnostic(ratios, within, optimizer_state, detail, trained, verdict)


# --- assembling and writing --------------------------------------------------------------------------------------


@dataclass
class ConversionReport:
    out: str
    sources: dict
    config: dict
    mapped: int
    ignored: dict  # key -> reason
    superseded: dict  # key -> reason (frozen weights replaced by the checkpoint's trained ones)
    difference_module: DifferenceModuleDiagnostic
    use_difference_module: bool
    pad_rows: str
    language_model_weights: str | None
    date: str

    def to_dict(self) -> dict:
        return asdict(self)


def build_config(checkpoint: dict, vision: VisionSource, llm_config, bert_config: dict, tokenizer_info: dict,
                 image_size: int | None = None, vision_num_heads: int | None = None):
    """DeltaVLMConfig derived from the inputs' shapes (see the module docstring)."""
    from .configuration_deltavlm import DeltaVLMConfig

    converted, _, trained_vision = convert_checkpoint_state_dict(checkpoint["model"])
    if image_size is None:
        image_size = (checkpoint.get("config") or {}).get("model", {}).get("image_size")
    vision_config = _vision_config(vision, trained_vision, image_size, vision_num_heads)
    text_config = llm_config.to_dict()
    for key in ("architectures", "transformers_version", "torch_dtype", "dtype", "_name_or_path"):
        text_config.pop(key, None)
    text_config.update(
        vocab_size=tokenizer_info["vocab_size"],
        pad_token_id=tokenizer_info["pad_token_id"],
        bos_token_id=tokenizer_info["bos_token_id"],
        eos_token_id=tokenizer_info["eos_token_id"],
    )
    return DeltaVLMConfig(
        vision_config=vision_config,
        qformer_config=_qformer_config(converted, bert_config),
        text_config=text_config,
        num_query_tokens=converted["query_tokens"].shape[1],
        image_token_id=tokenizer_info["image_token_id"],
    )


def assemble_state_dict(checkpoint: dict, vision: VisionSource, depth: int, image_size: int) -> tuple[dict, dict, dict]:
    """All non-LLM weights under DeltaVLM names -> (state dict, ignored {key: reason}, superseded {key: reason})."""
    converted, ignored, trained_vision = convert_checkpoint_state_dict(checkpoint["model"])
    superseded = {}
    for key, tensor in vision.state_dict.items():
        block = re.match(r"encoder\.layers\.(\d+)\.", key)
        if block and int(block.group(1)) >= depth:
            ignored[f"vision:{key}"] = f"ViT block {block.group(1)}: the model has {depth} blocks (LAVIS drops EVA's last)"
        elif key.startswith("post_layernorm."):
            superseded[f"vision:{key}"] = "InstructBLIP's ln_vision; the checkpoint's trained ln_vision is used"
        elif key in trained_vision:
            superseded[f"vision:{key}"] = "pre-finetuning value; the checkpoint's trained block is used"
        else:
            converted[f"vision_model.{key}"] = tensor
    for key, tensor in trained_vision.items():
        converted[f"vision_model.{key}"] = tensor
    grid = image_size // converted["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    position_key = "vision_model.embeddings.position_embedding"
    converted[position_key] = interpolate_position_embedding(converted[position_key], grid)
    return converted, ignored, superseded


def check_state_dict(state_dict: dict, expected: dict, skip_prefix: str | None = None) -> None:
    """Every expected key present with its shape, nothing extra; one error naming all problems."""
    wanted = {key for key in expected if not (skip_prefix and key.startswith(skip_prefix))}
    missing = sorted(wanted - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{key}: inputs give {tuple(state_dict[key].shape)}, the model needs {tuple(expected[key].shape)}"
        for key in sorted(wanted & state_dict.keys())
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} weights no input provides: {missing[:20]}")
    if unexpected:
        problems.append(f"{len(unexpected)} weights the model does not have: {unexpected[:20]}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {mismatched[:20]}")
    if problems:
        raise ConversionError("the inputs do not fit the model: " + "; ".join(problems))


def _llm_state_dict(llm_path, dtype: torch.dtype, vocab_size: int) -> dict:
    """The language model's weights under `language_model.`, with `[PAD]` rows appended (mean of the others)."""
    from transformers import AutoModelForCausalLM

    from .modeling_deltavlm import append_mean_rows

    language_model = AutoModelForCausalLM.from_pretrained(str(llm_path), dtype=dtype)
    state_dict = language_model.state_dict()
    del language_model
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        if key in state_dict and state_dict[key].shape[0] < vocab_size:
            state_dict[key] = append_mean_rows(state_dict[key], vocab_size - state_dict[key].shape[0])
    return {f"language_model.{key}": tensor for key, tensor in state_dict.items()}


def _describe_file(path) -> dict:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        return {"path": str(path), "files": {p.name: p.stat().st_size for p in files}}
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _model_card(config, report: ConversionReport) -> str:
    from .modeling_deltavlm import default_model_card

    base_models = ["hlwu/DeltaVLM"]
    if report.language_model_weights and not os.path.exists(report.language_model_weights):
        base_models.append(report.language_model_weights)
    card = default_model_card(
        config, base_models=base_models,
        description="Converted from the authors' released checkpoint with `deltavlm convert`.",
    )
    sources = "\n".join(
        f"- **{role}**: `{Path(info['path']).name}`"
        + (f" ({info['bytes']:,} bytes, sha256 `{info['sha256']}`)" if "sha256" in info else f" (folder, {len(info['files'])} files)")
        for role, info in report.sources.items()
    )
    llm_line = (
        f"The language-model weights are NOT in this folder: `from_pretrained` reads them from "
        f"`{report.language_model_weights}`."
        if report.language_model_weights else "The language-model weights are included."
    )
    return card + f"""
## Provenance

Converted on {report.date} by `deltavlm convert` from:

{sources}

{report.mapped} tensors mapped; {len(report.ignored)} input keys ignored and {len(report.superseded)} frozen weights
superseded by the checkpoint's trained ones (listed in `conversion_report.json`). {llm_line}

**Difference module (CSRM):** {report.difference_module.verdict}
Max |w| relative to PyTorch's default-init bound 1/sqrt(fan_in): {report.difference_module.max_weight_to_init_bound};
optimizer state: {report.difference_module.optimizer_detail}.

**`[PAD]` rows:** {report.pad_rows}

To reproduce the authors' generation exactly (placeholder token, repetition penalty that skips the prompt), see
`modeling_deltavlm.original_generation`.
"""


def convert_original_checkpoint(
    checkpoint,
    vision,
    llm=None,
    qformer_tokenizer=None,
    out=None,
    dtype: str | torch.dtype = "float32",
    no_llm: bool = False,
    llm_reference: str | None = None,
    image_size: int | None = None,
    vision_num_heads: int | None = None,
    difference_module: str = "auto",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> ConversionReport:
    """Convert the released checkpoint into a HuggingFace folder at `out` (see the module docstring).

    checkpoint: `checkpoint_best.pth`. vision: `eva_vit_g.pth` or an InstructBLIP HF folder. llm: the Vicuna folder
    (config, weights, tokenizer). qformer_tokenizer: a bert-base-uncased folder (vocab.txt + config.json).
    no_llm: leave the language model out; `llm_reference` (a path or Hub id, default `llm`) is stored in the config
    and `from_pretrained` reads the weights from there. difference_module: "auto" (the diagnostic decides), "on", "off".
    """
    from transformers import AutoConfig

    from .modeling_deltavlm import DeltaVLMForConditionalGeneration

    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    if out is None or qformer_tokenizer is None:
        raise ValueError("out and qformer_tokenizer are required")
    if llm is None and not (no_llm and llm_reference):
        raise ValueError("give llm (the Vicuna folder), or no_llm=True with llm_reference")
    if no_llm and llm_reference is None:
        llm_reference = str(llm)
    llm_source = llm if llm is not None else llm_reference
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty (pass overwrite=True / --overwrite)")
    if difference_module not in ("auto", "on", "off"):
        raise ValueError(f"difference_module must be 'auto', 'on' or 'off', got {difference_module!r}")

    # step 1: read and check the small inputs (fails fast, before the language model is loaded)
    original = load_original_checkpoint(checkpoint)
    vision_source = load_vision_source(vision)
    bert_config = _read_json(Path(qformer_tokenizer) / "config.json", "Q-Former BERT config")
    try:
        llm_config = AutoConfig.from_pretrained(str(llm_source))
    except (OSError, ValueError) as error:
        if not Path(str(llm_source)).exists():
            raise FileNotFoundError(f"language model not found: {llm_source}") from error
        raise ConversionError(f"language model {llm_source} has no usable config.json: {error}") from error
    if getattr(llm_config, "hidden_size", None) != original["model"]["llm_proj.weight"].shape[0]:
        raise ConversionError(
            f"language model {llm_source} has width {getattr(llm_config, 'hidden_size', None)} but the checkpoint's "
            f"llm_proj outputs {original['model']['llm_proj.weight'].shape[0]}"
        )

    # step 2: tokenizers as the authors set them up; they fix the vocabulary and the special ids
    vision_preview = _vision_config(vision_source, convert_checkpoint_state_dict(original["model"])[2],
                                    image_size or (original.get("config") or {}).get("model", {}).get("image_size"),
                                    vision_num_heads)
    processor = build_processor(
        llm_source, qformer_tokenizer, vision_preview["image_size"], original["model"]["query_tokens"].shape[1]
    )
    tokenizer = processor.tokenizer
    pad_id = tokenizer.pad_token_id
    if pad_id != llm_config.vocab_size:
        raise ConversionError(
            f"the tokenizer in {llm_source} does not match its language model: with [PAD] appended it has "
            f"{pad_id} + 1 tokens, the model's vocabulary has {llm_config.vocab_size} rows (+1 for [PAD])"
        )
    qformer_vocab = len(processor.qformer_tokenizer)
    if qformer_vocab != original["model"]["Qformer.bert.embeddings.word_embeddings.weight"].shape[0]:
        raise ConversionError(
            f"the Q-Former tokenizer {qformer_tokenizer} has {qformer_vocab} tokens with [DEC], the checkpoint's "
            f"Q-Former embeds {original['model']['Qformer.bert.embeddings.word_embeddings.weight'].shape[0]}"
        )
    tokenizer_info = dict(
        vocab_size=pad_id + 1, pad_token_id=pad_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, image_token_id=processor.image_token_id,
    )
    config = build_config(original, vision_source, llm_config, bert_config, tokenizer_info,
                          vision_preview["image_size"], vision_preview["num_attention_heads"])
    diagnostic = diagnose_difference_module(original)
    config.use_difference_module = diagnostic.trained if difference_module == "auto" else difference_module == "on"
    if no_llm:
        config.language_model_weights = llm_reference

    # step 3: all weights under DeltaVLM names, checked against the model's own keys and shapes
    state_dict, ignored, superseded = assemble_state_dict(
        original, vision_source, config.vision_config.num_hidden_layers, config.vision_config.image_size
    )
    ignored.update({key: "training state, not weights" for key in CHECKPOINT_TOP_LEVEL_IGNORED & original.keys()})
    with torch.device("meta"):
        model = DeltaVLMForConditionalGeneration(config)
    expected = model.state_dict()
    check_state_dict(state_dict, expected, skip_prefix="language_model.")  # fail before loading the LLM
    if not no_llm:
        state_dict.update(_llm_state_dict(llm, torch_dtype, config.text_config.vocab_size))
        check_state_dict(state_dict, expected)
    state_dict = {key: tensor.to(torch_dtype) if tensor.is_floating_point() else tensor for key, tensor in state_dict.items()}
    model.load_state_dict(state_dict, strict=not no_llm, assign=True)
    model.config.dtype = torch_dtype
    # the authors' decoding (DESIGN.md §1), so that `model.generate(**inputs)` and the commands' defaults reproduce it
    model.generation_config.update(num_beams=5, max_new_tokens=256, repetition_penalty=1.5)

    # step 4: write next to `out`, then move into place
    sources = {"checkpoint": _describe_file(checkpoint), "vision": _describe_file(vision)}
    if llm is not None:
        sources["language model"] = _describe_file(llm)
    sources["Q-Former tokenizer"] = _describe_file(qformer_tokenizer)
    report = ConversionReport(
        out=str(out), sources=sources, config=config.to_dict(), mapped=len(state_dict), ignored=ignored,
        superseded=superseded, difference_module=diagnostic, use_difference_module=config.use_difference_module,
        pad_rows=(
            "the `[PAD]` rows of the input embedding and lm_head are the mean of the other rows (the authors "
            "re-randomised them at every load; with the mean, [PAD] gets the average logit and is never generated)"
        ),
        language_model_weights=config.language_model_weights,
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result should be an ordinary folder
    try:
        model.save_pretrained(staging, max_shard_size=max_shard_size, model_card=_model_card(config, report))
        processor.save_pretrained(staging)
        (staging / "conversion_report.json").write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"{what} {path} is not JSON: {error}") from error


def _move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        backup = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(backup)
        staging.rename(out)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        staging.rename(out)


# --- command line ---------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="deltavlm convert",
        description="Convert the authors' released DeltaVLM checkpoint (checkpoint_best.pth) into a HuggingFace folder.",
    )
    parser.add_argument("--checkpoint", required=True, help="checkpoint_best.pth (hlwu/DeltaVLM)")
    parser.add_argument("--vision", required=True, help="eva_vit_g.pth, or an InstructBLIP-Vicuna-7B folder in HF format")
    parser.add_argument("--llm", help="Vicuna-7B-v1.5 folder (config, weights, tokenizer)")
    parser.add_argument("--qformer-tokenizer", required=True, help="bert-base-uncased folder (vocab.txt, config.json)")
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--no-llm", action="store_true", help="leave the language model out; load it from --llm-reference")
    parser.add_argument("--llm-reference", help="path or Hub id of the language model a --no-llm folder loads (default: --llm)")
    parser.add_argument("--image-size", type=int, help="input size (default: the checkpoint's config, else the ViT's)")
    parser.add_argument("--vision-heads", type=int, help=f"ViT attention heads (default: width / {EVA_HEAD_DIM}, as LAVIS)")
    parser.add_argument("--difference-module", choices=["auto", "on", "off"], default="auto",
                        help="CSRM on/off; auto: off when the diagnostic finds it untrained")
    parser.add_argument("--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = parser.parse_args(argv)
    try:
        report = convert_original_checkpoint(
            checkpoint=args.checkpoint, vision=args.vision, llm=args.llm, qformer_tokenizer=args.qformer_tokenizer,
            out=args.out, dtype=args.dtype, no_llm=args.no_llm, llm_reference=args.llm_reference,
            image_size=args.image_size, vision_num_heads=args.vision_heads, difference_module=args.difference_module,
            max_shard_size=args.max_shard_size, overwrite=args.overwrite,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        message = " ".join(str(error).split())  # one line, whatever the underlying library wrote
        print(f"deltavlm convert: error: {message}", file=sys.stderr)
        return 1
    print(f"wrote {report.out}: {report.mapped} tensors, {len(report.ignored)} input keys ignored, "
          f"{len(report.superseded)} superseded (see conversion_report.json)")
    print(f"CSRM: {report.difference_module.verdict}")
    return 0


__all__ = [
    "ConversionError",
    "ConversionReport",
    "DifferenceModuleDiagnostic",
    "assemble_state_dict",
    "build_config",
    "build_processor",
    "check_state_dict",
    "convert_checkpoint_state_dict",
    "convert_eva_state_dict",
    "convert_original_checkpoint",
    "diagnose_difference_module",
    "load_original_checkpoint",
    "load_vision_source",
    "main",
    "optimizer_parameter_names",
]
