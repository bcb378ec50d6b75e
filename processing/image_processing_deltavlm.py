"""Image processor for DeltaVLM: (before, after) pairs -> `pixel_values` of shape (B, 2, 3, H, W).

Both images of a pair get exactly the same treatment as in the authors' `BlipImageEvalProcessor`:
RGB, bicubic resize to 224x224, scale to [0, 1], normalise with the CLIP mean/std.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, PILImageResampling, is_scaled_image
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Images smaller than this are almost certainly a mistake (a thumbnail, an icon, a mask); LEVIR-CC tiles are 256.
MIN_IMAGE_SIDE = 16
# PIL modes whose conversion to RGB clips at 255 (16/32-bit integer, float): a 16-bit scene would come out white.
HIGH_BIT_DEPTH_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
_HIGH_BIT_DEPTH_HINT = "convert it to 8-bit RGB first (eval.imagery.read_image stretches 16-bit and multi-band imagery)"
# transformers' image processors' warning (e.g. Emu3's) for the same mistake, worded alike so it is recognised
RESCALED_IMAGES_WARNING = (
    "It looks like you are trying to rescale already rescaled images. If the input images have pixel values between "
    "0 and 1, set `do_rescale=False` to avoid rescaling them again."
)


def load_image(image):
    """A path (str or Path) -> PIL image; any other accepted input is returned unchanged."""
    if not isinstance(image, (str, os.PathLike)):
        return image
    path = Path(image)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with Image.open(path) as opened:
            opened.load()
            return opened.copy()
    except Image.DecompressionBombError as error:  # PIL's MAX_IMAGE_PIXELS guard: refused before decoding
        raise ValueError(f"cannot read {path} as an image: too large to open safely ({error})") from None
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read {path} as an image: {error}") from error


def _is_single_image(item) -> bool:
    if isinstance(item, (Image.Image, str, os.PathLike)):
        return True
    if isinstance(item, (np.ndarray, torch.Tensor)):
        return item.ndim in (2, 3)
    return False


def make_pair_list(images) -> list[tuple]:
    """Normalise the accepted forms into a list of (before, after) pairs.

    Accepted: one pair `(before, after)`; a list of pairs `[(A1, B1), (A2, B2), ...]`; an array or
    tensor of shape (2, ...) for one pair or (batch, 2, ...) for a batch. Each image may be a PIL
    image, a numpy array, a tensor, or a file path.
    """
    if isinstance(images, (np.ndarray, torch.Tensor)):
        if images.ndim == 4 and images.shape[0] == 2:  # (2, H, W, C) or (2, C, H, W): one pair
            return [(images[0], images[1])]
        if images.ndim == 5 and images.shape[1] == 2:
            return [(pair[0], pair[1]) for pair in images]
        raise ValueError(
            f"an image array must have shape (2, ...) for one pair or (batch, 2, ...) for pairs, got {tuple(images.shape)}"
        )
    if _is_single_image(images):
        raise ValueError("DeltaVLM needs a (before, after) pair of images, got a single image")
    if not isinstance(images, (list, tuple)) or len(images) == 0:
        raise ValueError(f"expected a (before, after) pair or a list of pairs, got {type(images).__name__}")
    if all(_is_single_image(item) for item in images):
        if len(images) != 2:
            raise ValueError(f"a pair has exactly 2 images (before, after), got {len(images)}")
        return [tuple(images)]
    pairs = []
    for index, pair in enumerate(images):
        if _is_single_image(pair) or not isinstance(pair, (list, tuple, np.ndarray, torch.Tensor)):
            raise ValueError(f"item {index} is not a (before, after) pair")
        if len(pair) != 2:
            raise ValueError(f"item {index} has {len(pair)} images; a pair has exactly 2 (before, after)")
        pairs.append((pair[0], pair[1]))
    return pairs


class DeltaVLMImageProcessor(PilBackend):
    r"""
    Processes (before, after) image pairs. Returns `pixel_values` of shape `(batch_size, 2, 3, height, width)`,
    index 0 along dim 1 the before image. Defaults reproduce the authors' eval transform (bicubic 224x224, CLIP
    normalisation); the same transform is applied to both images of a pair.

    Arrays and tensors are taken as 0-255 values and divided by 255 (`do_rescale`), like PIL images. Float images
    already in [0, 1] (torchvision's `ToTensor`, `np.array(image) / 255`) would be divided again, into a nearly black
    image: as transformers' image processors do, such input logs a warning (once) to pass `do_rescale=False`
    (`processor(images=..., text=..., do_rescale=False)`), which is then what to do.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = OPENAI_CLIP_MEAN
    image_std = OPENAI_CLIP_STD
    size = {"height": 224, "width": 224}
    default_to_square = True
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = True

    def preprocess(self, images, *args, return_tensors="pt", **kwargs) -> BatchFeature:
        pairs = make_pair_list(images)
        flat = []
        for index, pair in enumerate(pairs):
            for which, image in zip(("before", "after"), pair):
                name = f"pair {index}, {which} image" + (f" {image}" if isinstance(image, (str, os.PathLike)) else "")
                image = load_image(image)
                if isinstance(image, torch.Tensor) and image.dtype in (torch.bfloat16, torch.float16):
                    image = image.float()  # the numpy-based resize/normalise backend has no bfloat16
                _check_image_size(image, name)
                flat.append(image)
        if kwargs.get("do_rescale", self.do_rescale) and any(_looks_rescaled(image) for image in flat):
            logger.warning_once(RESCALED_IMAGES_WARNING)
        features = super().preprocess(flat, *args, return_tensors="pt", **kwargs)
        pixel_values = features["pixel_values"]  # (2B, C, H, W), before/after interleaved
        pixel_values = pixel_values.reshape(len(pairs), 2, *pixel_values.shape[1:])
        if return_tensors != "pt":
            pixel_values = pixel_values.numpy()
        return BatchFeature({"pixel_values": pixel_values})


def _check_image_size(image, name: str) -> None:
    """One clear ValueError naming the image for what the resize/normalise backend cannot use (or would use wrongly)."""
    if isinstance(image, Image.Image):
        if image.mode in HIGH_BIT_DEPTH_MODES:
            raise ValueError(f"{name} has PIL mode {image.mode!r} (more than 8 bits per pixel): {_HIGH_BIT_DEPTH_HINT}")
        width, height = image.size
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        shape = tuple(image.shape)
        # channels-first (C, H, W) when the first axis is small, else (H, W[, C])
        channels_first = len(shape) == 3 and shape[0] in (1, 3, 4)
        channels = shape[0] if channels_first else shape[2] if len(shape) == 3 else None
        if len(shape) != 3 or channels not in (1, 3, 4):
            raise ValueError(
                f"{name}: array of shape {shape}; expected (H, W, C) or (C, H, W) with 1, 3 or 4 channels "
                "(pick three bands of multi-band imagery first)"
            )
        # 16-bit data: the backend divides by 255 and the values would come out far above 1
        if _is_wide_integer(image) and image.max() > 255:
            raise ValueError(f"{name}: {image.dtype} array with values above 255: {_HIGH_BIT_DEPTH_HINT}")
        height, width = shape[-2:] if channels_first else shape[:2]
    else:
        raise ValueError(f"{name}: unsupported image type {type(image).__name__} (use PIL, numpy, torch or a path)")
    if min(height, width) < MIN_IMAGE_SIDE:
        raise ValueError(f"{name} is {width}x{height} pixels; at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} is expected")


def _looks_rescaled(image) -> bool:
    """A float array or tensor whose values all lie in [0, 1] (transformers' `is_scaled_image`): most likely
    already divided by 255."""
    if isinstance(image, torch.Tensor):
        if not image.dtype.is_floating_point:
            return False
        image = image.detach().float().cpu().numpy()
    if not isinstance(image, np.ndarray) or image.dtype.kind != "f" or image.size == 0:
        return False
    return bool(is_scaled_image(image))


def _is_wide_integer(array) -> bool:
    """An integer array or tensor of more than 8 bits (not bool), with at least one element."""
    if isinstance(array, torch.Tensor):
        integer = not (array.dtype.is_floating_point or array.dtype.is_complex or array.dtype in (torch.bool, torch.uint8))
        return integer and array.numel() > 0
    return array.dtype.kind in "iu" and array.dtype.itemsize > 1 and array.size > 0


__all__ = ["DeltaVLMImageProcessor"]
