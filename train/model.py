"""Model set-up for training: load, freeze as the paper, LoRA, mixed-precision dtypes.

Everything here takes the model and plain arguments and returns the model: no Trainer involved.
"""

import logging
import re

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

import modeling_deltavlm  # noqa: F401  (registers DeltaVLM with the Auto classes)
from processing import DeltaVLMImageProcessor, DeltaVLMProcessor

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model_and_processor(model_args):
    """A DeltaVLM folder (or, with `init_from_instructblip`, an InstructBLIP checkpoint) -> (model, processor)."""
    if model_args.model_name_or_path is None:
        raise ValueError("model.model_name_or_path is required")
    overrides = {}
    if model_args.use_difference_module is not None:
        overrides["use_difference_module"] = model_args.use_difference_module
    dtype = "auto" if model_args.dtype == "auto" else DTYPES[model_args.dtype]
    if model_args.qlora:
        overrides["quantization_config"] = _qlora_quantization_config()
    if model_args.init_from_instructblip:
        model, processor = init_from_instructblip(model_args.model_name_or_path, dtype=dtype, **overrides)
    else:
        model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path, dtype=dtype, **overrides)
        processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    check_processor_matches(model, processor)
    return model, processor


def init_from_instructblip(path, dtype="auto", quantization_config=None, **config_overrides):
    """An InstructBLIP checkpoint -> (DeltaVLM with every shared weight loaded and a fresh CSRM, processor).

    The weights come through `modeling_deltavlm.init_from_instructblip`; the processor pairs the checkpoint's two
    tokenizers with DeltaVLM's image processor at the checkpoint's image size."""
    from modeling_deltavlm.init_from_instructblip import deltavlm_config_from_instructblip
    from modeling_deltavlm.init_from_instructblip import init_from_instructblip as load_weights

    instructblip_config = AutoConfig.from_pretrained(path)
    if instructblip_config.model_type != "instructblip":
        raise ValueError(f"{path}: model_type {instructblip_config.model_type!r}, expected 'instructblip'")
    config = deltavlm_config_from_instructblip(instructblip_config, **config_overrides)
    extra = {"quantization_config": quantization_config} if quantization_config is not None else {}
    model = load_weights(path, config=config, dtype=dtype, **extra)
    image_size = instructblip_config.vision_config.image_size
    processor = DeltaVLMProcessor(
        DeltaVLMImageProcessor(size={"height": image_size, "width": image_size}),
        AutoTokenizer.from_pretrained(path),
        AutoTokenizer.from_pretrained(path, subfolder="qformer_tokenizer"),
        num_query_tokens=instructblip_config.num_query_tokens,
    )
    return model, processor


def check_processor_matches(model, processor) -> None:
    config = model.config
    if processor.image_token_id != config.image_token_id or processor.num_query_tokens != config.num_query_tokens:
        raise ValueError(
            f"processor and model disagree: image token {processor.image_token_id} vs {config.image_token_id}, "
            f"{processor.num_query_tokens} vs {config.num_query_tokens} query tokens"
        )


# parameter names of the encoder side (ViT, CSRM, Q-Former, queries), also under a peft wrapper's "base_model.model."
ENCODER_PARAMETER = re.compile(r"(^|\.)(vision_model|difference_module|qformer)\.|(^|\.)query_tokens$")


def freeze_encoder(model) -> int:
    """Freeze the encoder side: only the projection (and LoRA adapters) train. Returns how many tensors were frozen.
    For a second stage after the encoder has been taught to see (the Nano demo's warm-up)."""
    frozen = 0
    for name, param in model.named_parameters():
        if param.requires_grad and ENCODER_PARAMETER.search(name):
            param.requires_grad_(False)
            frozen += 1
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("encoder_learning_rate 0 leaves nothing to train (no projection or adapter is trainable)")
    return frozen


def frozen_subtrees(model: nn.Module) -> list[nn.Module]:
    """The largest submodules of `model` none of whose parameters train (LoRA adapters inside a module count as
    training). Modules without parameters (activations, a dropout layer of its own) are not listed: they sit
    inside a listed module or follow their trained parent."""
    found = []

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(param.requires_grad for param in params):
            found.append(module)
            return
        for child in module.children():
            visit(child)

    visit(model)
    return found


def freeze_as_paper(model) -> dict[str, int]:
    """Train what the paper trains (last two ViT blocks, ln_vision, CSRM, queries, Q-Former, projection)."""
    counts = model.set_trainable_as_paper()
    logger.info("trainable parameters: %s", counts)
    return counts


def trainable_parameter_names(model) -> list[str]:
    return [name for name, param in model.named_parameters() if param.requires_grad]


def apply_lora(model, model_args):
    """LoRA adapters on the language model's `lora_target_modules`, with the paper's non-LLM set still trained.

    peft's `get_peft_model` freezes every base weight; the paper's set is switched back on afterwards instead of
    going through `modules_to_save`, which copies modules and cannot hold the bare `query_tokens` parameter
    (shared/DESIGN.md §4). The checkpoint format (trainable weights by name) then covers adapters and the rest alike.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if model_args.qlora:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    modules = "|".join(model_args.lora_target_modules)
    lora_config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        # a regex over full module names: adapters only inside the language model, whatever the ViT/Q-Former call theirs
        target_modules=rf"language_model\..*\.({modules})",
    )
    peft_model = get_peft_model(model, lora_config)
    adapters = [param for param in peft_model.parameters() if param.requires_grad]
    if not adapters:
        raise ValueError(f"no language-model module matches lora_target_modules={model_args.lora_target_modules}")
    model.set_trainable_as_paper()  # `model` is the base inside peft_model: freezes adapters too, so re-enable them
    for param in adapters:
        param.requires_grad_(True)
    return peft_model


def cast_for_mixed_precision(model, dtype: torch.dtype | None) -> None:
    """Frozen weights in `dtype` (half the memory), trainable weights in fp32: bf16 keeps ~3 significant digits, so
    updates ~1e-5 of a weight's size (lr 1e-5) would round away, and fp16 AMP refuses to unscale fp16 gradients.
    Autocast then runs the matmuls in `dtype`. Without mixed precision (`dtype` None) every floating weight is fp32:
    nothing autocasts then, and a frozen bf16 weight (a model exported in bf16, or loaded with --dtype bfloat16)
    would meet fp32 activations from the trainable modules in a matmul and fail."""
    frozen_dtype = torch.float32 if dtype is None else dtype
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
        elif param.dtype.is_floating_point and param.dtype != frozen_dtype:
            param.data = param.data.to(frozen_dtype)


def _qlora_quantization_config():
    if not torch.cuda.is_available():
        raise RuntimeError("QLoRA needs a CUDA GPU (bitsandbytes 4-bit kernels)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError("QLoRA needs bitsandbytes: pip install bitsandbytes") from error
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
        # only the language model is quantized: everything trained in full stays in full precision
        llm_int8_skip_modules=["vision_model", "qformer", "difference_module", "language_projection", "query_tokens", "lm_head"],
    )


__all__ = [
    "ENCODER_PARAMETER",
    "freeze_encoder",
    "apply_lora",
    "cast_for_mixed_precision",
    "check_processor_matches",
    "freeze_as_paper",
    "frozen_subtrees",
    "init_from_instructblip",
    "load_model_and_processor",
    "trainable_parameter_names",
]
