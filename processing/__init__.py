"""Turning image pairs and conversations into DeltaVLM inputs, and prompt-format helpers.

The processor classes are imported lazily: `processing.conversation` (pure string functions) is used by
tools such as `deltavlm synth` that should not pay for importing transformers.
"""

__all__ = ["DeltaVLMImageProcessor", "DeltaVLMProcessor"]


def __getattr__(name):
    if name == "DeltaVLMImageProcessor":
        from .image_processing_deltavlm import DeltaVLMImageProcessor

        return DeltaVLMImageProcessor
    if name == "DeltaVLMProcessor":
        from .processing_deltavlm import DeltaVLMProcessor

        return DeltaVLMProcessor
    raise AttributeError(f"module 'processing' has no attribute {name!r}")
