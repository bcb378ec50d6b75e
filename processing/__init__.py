"""Turning image pairs and conversations into DeltaVLM inputs, and prompt-format helpers."""

from .image_processing_deltavlm import DeltaVLMImageProcessor
from .processing_deltavlm import DeltaVLMProcessor

__all__ = ["DeltaVLMImageProcessor", "DeltaVLMProcessor"]
