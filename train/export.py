"""After training: a complete model folder that `from_pretrained` loads (LLM included), and for LoRA runs the
adapter folder as well.

The adapter folder is peft's (`adapter_config.json`, `adapter_model.safetensors`: the LLM's LoRA weights) plus
`non_lora_trainables.safetensors` with the rest of what was trained (ViT blocks, ln_vision, CSRM, query tokens,
Q-Former, projection), which peft's own files cannot carry (`query_tokens` is a bare parameter).
`load_lora_adapter` puts both back on a base model.

Readers take a folder with a `config.json` for a complete model (`from_pretrained`, the demo's resume, `deltavlm
predict`'s default), while `save_pretrained` writes that file first. `staged_model_folder` therefore writes the
folder beside its target and moves `config.json` in last: a run killed mid-save, or a full disk, leaves no folder
that looks complete (a 2-core run of `deltavlm demo` that hit a full disk in `save_pretrained` had left `config.json`
and the code files without weights, and a rerun would have tried to reuse them).
"""

import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import safetensors.torch
import torch

CONFIG_NAME = "config.json"
NON_LORA_WEIGHTS_NAME = "non_lora_trainables.safetensors"


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
        save_lora_adapter(model, os.path.join(export_dir, "adapter"))
        if not merge_lora:
            processor.save_pretrained(os.path.join(export_dir, "adapter"))
            return
        if reference_language_model is not None:
            raise ValueError("the LoRA adapters are merged into the language model: it is no longer the base "
                             "model, so it cannot be referenced; export it in full or set merge_lora to false")
        model = model.merge_and_unload()
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


def save_lora_adapter(peft_model, adapter_dir: str) -> None:
    peft_model.save_pretrained(adapter_dir)
    base = peft_model.get_base_model()
    lora_names = {name for name, _ in base.named_parameters() if "lora_" in name}  # peft's lora_A / lora_B naming
    weights = {
        name: param.detach().to("cpu").contiguous()
        for name, param in base.named_parameters()
        if param.requires_grad and name not in lora_names
    }
    safetensors.torch.save_file(weights, os.path.join(adapter_dir, NON_LORA_WEIGHTS_NAME), metadata={"format": "pt"})


def load_lora_adapter(base_model, adapter_dir: str, is_trainable: bool = False):
    """A DeltaVLM base model + an adapter folder written by `save_lora_adapter` -> the trained PeftModel."""
    from peft import PeftModel

    weights = safetensors.torch.load_file(os.path.join(adapter_dir, NON_LORA_WEIGHTS_NAME))
    result = base_model.load_state_dict(weights, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: weights the model does not have: {result.unexpected_keys[:5]}")
    return PeftModel.from_pretrained(base_model, adapter_dir, is_trainable=is_trainable)


__all__ = ["NON_LORA_WEIGHTS_NAME", "export_model", "staged_model_folder", "is_peft_model", "load_lora_adapter", "save_lora_adapter"]
