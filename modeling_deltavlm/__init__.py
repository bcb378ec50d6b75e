"""DeltaVLM model: configuration, model and the transformers Auto-class registration.

`import modeling_deltavlm` makes `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`,
`AutoImageProcessor` and `AutoProcessor` resolve `model_type="deltavlm"`, and marks the classes for
`save_pretrained` to ship their code (auto_map), so a saved folder also loads with
`trust_remote_code=True` where this package is not installed.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

from processing import DeltaVLMImageProcessor, DeltaVLMProcessor
from processing.pipeline_deltavlm import register_pipeline

from .configuration_deltavlm import DeltaVLMConfig
from .modeling_deltavlm import DeltaVLMDifferenceModule, DeltaVLMForConditionalGeneration, DeltaVLMPreTrainedModel

AutoConfig.register(DeltaVLMConfig.model_type, DeltaVLMConfig, exist_ok=True)
AutoModel.register(DeltaVLMConfig, DeltaVLMForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(DeltaVLMConfig, DeltaVLMForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(DeltaVLMConfig, image_processor_classes={"pil": DeltaVLMImageProcessor}, exist_ok=True)
AutoProcessor.register(DeltaVLMConfig, DeltaVLMProcessor, exist_ok=True)

register_pipeline()  # pipeline("bitemporal-image-text-to-text", model=...)

DeltaVLMConfig.register_for_auto_class()
# One Auto class per model class is recorded here; save_pretrained also names AutoModel in auto_map
# (modeling_deltavlm.AUTO_MAP_MODEL_CLASSES), so both load a saved folder through remote code.
DeltaVLMForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
DeltaVLMImageProcessor.register_for_auto_class("AutoImageProcessor")
DeltaVLMProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "DeltaVLMConfig",
    "DeltaVLMDifferenceModule",
    "DeltaVLMForConditionalGeneration",
    "DeltaVLMImageProcessor",
    "DeltaVLMPreTrainedModel",
    "DeltaVLMProcessor",
]
