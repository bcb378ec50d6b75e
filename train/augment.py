"""Paired geometric augmentation: the SAME random transform on the before and the after image.

A change is defined pixel to pixel between A and B, so A and B must move together. Flips and 90-degree
rotations also move what the text says ("houses appear at the bottom", the 3x3-grid localization answers):
they are applied only to samples whose prompt and answer use no position word. Random numbers come from a
generator the caller seeds per (run seed, epoch, sample), not from the global one: the data loader collates a
batch ahead of the step that uses it, so draws from the global generator would depend on where a run was
interrupted, and on the number of processes. Off by default (the authors trained without augmentation: their paired transform is commented out).
"""

import re

import torch
from PIL import Image

# Words whose meaning a flip or rotation would change.
POSITION_WORDS = re.compile(
    r"\b(top|bottom|left|right|upper|lower|north|south|east|west|corner|above|below|horizontal|vertical)", re.IGNORECASE
)


class PairedAugment:
    """mode "crop": one random square-ish crop of `min_crop_scale`..1 of each side, same box on A and B;
    mode "geometric": that crop, then (when the text allows) random horizontal/vertical flips and a rot90."""

    def __init__(self, mode: str = "crop", min_crop_scale: float = 0.9):
        if mode not in ("crop", "geometric"):
            raise ValueError(f"augment mode must be 'crop' or 'geometric', got {mode!r}")
        if not 0 < min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must lie in (0, 1], got {min_crop_scale}")
        self.mode = mode
        self.min_crop_scale = min_crop_scale

    def __call__(self, before: Image.Image, after: Image.Image, text: str = "",
                 generator: torch.Generator | None = None) -> tuple[Image.Image, Image.Image]:
        if before.size != after.size:
            raise ValueError(f"before and after images differ in size: {before.size} vs {after.size}")
        width, height = before.size
        # one crop box, drawn once, applied to both images
        scale = self.min_crop_scale + (1 - self.min_crop_scale) * torch.rand((), generator=generator).item()
        crop_w, crop_h = max(1, round(width * scale)), max(1, round(height * scale))
        left = int(torch.randint(0, width - crop_w + 1, (), generator=generator).item())
        top = int(torch.randint(0, height - crop_h + 1, (), generator=generator).item())
        box = (left, top, left + crop_w, top + crop_h)
        before, after = before.crop(box), after.crop(box)
        if self.mode == "geometric" and not POSITION_WORDS.search(text):
            ops = []
            if torch.rand((), generator=generator).item() < 0.5:
                ops.append(Image.Transpose.FLIP_LEFT_RIGHT)
            if torch.rand((), generator=generator).item() < 0.5:
                ops.append(Image.Transpose.FLIP_TOP_BOTTOM)
            ops += [Image.Transpose.ROTATE_90] * int(torch.randint(0, 4, (), generator=generator).item())
            for op in ops:
                before, after = before.transpose(op), after.transpose(op)
        return before, after


__all__ = ["POSITION_WORDS", "PairedAugment"]
