"""After training: a complete model folder that `from_pretrained` loads (LLM included), and for LoRA runs the
adapter folder as well.

The adapter folder is peft's (`adapter_config.json`, `adapter_model.safetensors`), with the rest of what was
trained (ViT blocks, ln_vision, CSRM, query tokens, Q-Former, projection) stored in `adapter_model.safetensors`
beside the LLM's LoRA weights, under the wrapped model's names (`base_model.model.qformer...`). Both standard ways
in then restore it all: `PeftModel.from_pretrained(base, folder)` loads every key of that file that names a
parameter, and `AutoModelForImageTextToText.from_pretrained(folder)` (transformers' PEFT integration) loads the
base model named in `adapter_config.json` and then the file the same way. peft's `modules_to_save` is not used for
them: it would copy the modules and cannot hold the bare `query_tokens` parameter (see `train.model.apply_lora`).
Folders written before this kept those weights in `non_lora_trainables.safetensors`, which neither standard path
reads: `load_lora_adapter` still reads them.

Readers take a folder with a `config.json` for a complete model (`from_pretrained`, the demo's resume, `deltavlm
predict`'s default), while `save_pretrained` writes that file first. `staged_model_folder` therefore writes the
folder beside its target and moves `config.json` in last: a run killed mid-save, or a full disk, leaves no folder
that looks complete (a 2-core run of `deltavlm demo` that hit a full disk in `save_pretrained` had left `config.json`
and the code files without weights, and a rerun would have tried to reuse them).
"""

import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

CONFIG_NAME = "config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"  # peft's file name, which transformers looks for too
NON_LORA_WEIGHTS_NAME = "non_lora_trainables.safetensors"  # older adapter folders only
PEFT_PREFIX = "base_model.model."  # a PeftModel's names for the wrapped model's parameters
# peft's adapter tensors (lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector), with or without adapter name
LORA_PARAMETER = re.compile(r"\.lora_[A-Za-z_]+(\.|$)")


@contextmanager
def staged_model_folder(target):
    """Yield an empty staging folder beside `target` to write a model folder into. On success its entries replace
    those of the same name in `target` (other entries of `target` stay), `config.json` last; on an error the
    staging folder is removed and `target` keeps no `config.json` from this write (an older one is removed first
    only once the new files are all written)."""
    target = Path(target)
    staging = target.parent / f".{target.name}.partial"
    if staging.exists():  # left by a run that was killed
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    try:
        yield staging
        target.mkdir(parents=True, exist_ok=True)
        (target / CONFIG_NAME).unlink(missing_ok=True)  # from here on the folder does not claim to be complete
        entries = sorted(staging.iterdir(), key=lambda entry: entry.name == CONFIG_NAME)
        for entry in entries:
            destination = target / entry.name
            if destination.is_dir() and not destination.is_symlink():
                shutil.rmtree(destination)
            os.replace(entry, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_model(model, processor, export_dir: str, dtype: torch.dtype | None = None, merge_lora: bool = True,
                 state_dict: dict | None = None, reference_language_model: str | None = None) -> str:
    """Write `export_dir` (config, weights, processor, code, model card). A LoRA model also gets
    `export_dir/adapter`; with `merge_lora` the adapters are merged into the exported weights, otherwise only the
    adapter folder is written. `state_dict`: a gathered full state dict (DeepSpeed ZeRO-3 / FSDP).

    The language model is included unless `reference_language_model` names where to read it from on load
    (modeling_deltavlm's `config.language_model_weights`): only right when the LLM was frozen and not merged with
    adapters, since the folder then records the base LLM, not the trained one. The folder is written staged
    (`staged_model_folder`): `config.json` appears only once everything else is in place."""
    with staged_model_folder(export_dir) as staging:
        _export_model(model, processor, str(staging), dtype, merge_lora, state_dict, reference_language_model)
    return export_dir if merge_lora or not is_peft_model(model) else os.path.join(export_dir, "adapter")


def _export_model(model, processor, export_dir: str, dtype, merge_lora, state_dict, reference_language_model):
    if is_peft_model(model):
        save_lora_adapter(model, os.path.join(export_dir, "adapter"), state_dict=state_dict)
        if not merge_lora:
            processor.save_pretrained(os.path.join(export_dir, "adapter"))
            return
        if reference_language_model is not None:
            raise ValueError("the LoRA adapters are merged into the language model: it is no longer the base "
                             "model, so it cannot be referenced; export it in full or set merge_lora to false")
        if state_dict is None:
            model = model.merge_and_unload()
        else:  # the live model holds only this process's shards: merge the gathered weights instead
            model, state_dict = merge_gathered_lora(model, state_dict)
    if any(param.requires_grad for param in model.language_model.parameters()) and reference_language_model:
        raise ValueError("the language model was trained: it cannot be replaced by a reference to the base model")
    # a model loaded from a referencing folder would otherwise keep referencing (and drop the LLM) silently
    model.config.language_model_weights = reference_language_model
    if reference_language_model is not None and state_dict is not None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("language_model.")}
    if dtype is not None:
        model = model.to(dtype)
        if state_dict is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.save_pretrained(export_dir, state_dict=state_dict)
    processor.save_pretrained(export_dir)


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def save_lora_adapter(peft_model, adapter_dir: str, state_dict: dict | None = None) -> None:
    """peft's adapter folder, its `adapter_model.safetensors` extended with every other trainable parameter under
    the PeftModel's own name (`base_model.model.<name>`), which is how both peft and transformers load it back.

    `state_dict`: the PeftModel's gathered full state dict (DeepSpeed ZeRO-3 / FSDP), whose values are written in
    place of the live parameters, which there hold only this process's shard (empty tensors under ZeRO-3)."""
    peft_model.save_pretrained(adapter_dir, state_dict=state_dict)
    weights_path = os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME)
    weights = safetensors.torch.load_file(weights_path)
    for name, param in peft_model.named_parameters():
        if param.requires_grad and not LORA_PARAMETER.search(name):
            value = param if state_dict is None else state_dict[name]
            weights[name] = value.detach().to("cpu").contiguous()
    safetensors.torch.save_file(weights, weights_path, metadata={"format": "pt"})  # peft's own metadata


def merge_gathered_lora(peft_model, state_dict: dict):
    """A PeftModel and its gathered full state dict (`base_model.model.*` keys, adapters apart) -> (the plain model
    to save, its state dict with the adapters merged), what `merge_and_unload` gives without sharding.

    The merge is peft's own, on a copy of the model built on the meta device (no memory) that takes the gathered
    tensors, so it follows the adapter config as `merge_and_unload` does (scaling, rslora, rank and alpha
    patterns, fan_in_fan_out, DoRA). The returned model is on the meta device: it carries the config and the
    architecture for `save_pretrained(state_dict=...)`, its weights are the returned state dict."""
    import copy

    from peft import get_peft_model

    if len(peft_model.peft_config) != 1:
        raise ValueError(f"cannot merge {len(peft_model.peft_config)} adapters into one export")
    (adapter_name, lora_config), = peft_model.peft_config.items()
    base = peft_model.get_base_model()
    with torch.device("meta"):
        shell = get_peft_model(type(base)(base.config), copy.deepcopy(lora_config), adapter_name=adapter_name)
    # merging adds into the base weights in place: those get their own tensors, the caller's stay as they were
    tensors = {name: value.clone() if name.endswith(".base_layer.weight") else value for name, value in state_dict.items()}
    shell.load_state_dict(tensors, strict=True, assign=True)  # a key missing or left over is an error, not a skip
    merged = shell.merge_and_unload()
    merged_state_dict = merged.state_dict()
    return merged.to("meta"), merged_state_dict


def load_lora_adapter(base_model, adapter_dir: str, is_trainable: bool = False):
    """A DeltaVLM base model + an adapter folder written by `save_lora_adapter` -> the trained PeftModel.

    The same as `PeftModel.from_pretrained(base_model, adapter_dir)`, except that a weight the model does not have
    is an error (peft skips it silently) and that folders written before the non-LoRA weights moved into
    `adapter_model.safetensors` load too (their `non_lora_trainables.safetensors`)."""
    from peft import PeftModel

    model_names = set(base_model.state_dict())
    with safetensors.safe_open(os.path.join(adapter_dir, ADAPTER_WEIGHTS_NAME), framework="pt") as handle:
        stored = [key.removeprefix(PEFT_PREFIX) for key in handle.keys() if not LORA_PARAMETER.search(key)]
    legacy_path = os.path.join(adapter_dir, NON_LORA_WEIGHTS_NAME)
    legacy = safetensors.torch.load_file(legacy_path) if os.path.isfile(legacy_path) else {}
    unexpected = [name for name in [*stored, *legacy] if name not in model_names]
    if unexpected:
        raise ValueError(f"{adapter_dir}: weights the model does not have: {unexpected[:5]}")
    base_model.load_state_dict(legacy, strict=False)
    return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)


__all__ = ["ADAPTER_WEIGHTS_NAME", "NON_LORA_WEIGHTS_NAME", "export_model", "staged_model_folder", "is_peft_model", "load_lora_adapter", "merge_gathered_lora", "save_lora_adapter"]
