"""Change maps: where in the pair the model's difference module sees change, as a heat map over image B.

Per ViT patch token (the CLS token left out) one score, from the vision side the answer uses anyway, so a map
costs no extra ViT pass:

- "difference" (default): the norm of Z_B - Z_A, the difference of the difference module's two outputs at the
  same patch. Zero for an unchanged pair by construction (X_A = X_B gives D = 0 and Z_A = Z_B); works when the
  module is switched off too (then Z = the ViT features).
- "gate": the norm of CSRM's gated change semantics for the after image, S_B = G_B * C_B (see
  `DeltaVLMDifferenceModule`): what the module passes on as "changed" at that patch. It carries the after
  image's own content as well (G and C see X_B), so it is not zero on an unchanged pair. Read with a forward
  hook on `context3`, whose input is cat[X_t, D, S_t], so the model's code is not restated here.

The patch grid (image_size / patch_size per side: 16 at 224 px, 2 for the 28 px test model) is min-max scaled
to [0, 1] (the map is relative: its hottest patch is 1) and upsampled bilinearly to the after image's size.
"""

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

METHODS = ("difference", "gate")


def check_method(model, method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"change-map method must be one of {METHODS}, got {method!r}")
    if method == "gate" and not model.config.use_difference_module:
        raise ValueError("the 'gate' change map needs the difference module (CSRM); this model has it switched off")


@torch.no_grad()
def pair_embeds_with_scores(model, pixel_values: torch.Tensor, method: str = "difference"):
    """The vision side of a batch of pairs and a change score per patch.

    pixel_values (B, 2, 3, H, W) -> (pair_embeds (B, 2*S, D), scores (B, g, g)) with g*g = S - 1.
    """
    check_method(model, method)
    gated = []
    hook = None
    if method == "gate":
        width = model.config.vision_config.hidden_size

        def keep_gated_term(module, inputs):
            gated.append(inputs[0][..., 2 * width :])  # cat[X_t, D, S_t] -> S_t: (B, S, D)

        hook = model.difference_module.context3.register_forward_pre_hook(keep_gated_term)
    try:
        vision = model.get_pair_embeds(pixel_values)
    finally:
        if hook is not None:
            hook.remove()
    pair_embeds = vision.pair_embeds
    num_tokens = pair_embeds.shape[1] // 2
    if method == "gate":
        token_scores = gated[1].float().norm(dim=-1)  # the after image's call is the second: (B, S)
    else:
        before, after = pair_embeds[:, :num_tokens], pair_embeds[:, num_tokens:]
        token_scores = (after - before).float().norm(dim=-1)  # (B, S)
    patch_scores = token_scores[:, 1:]  # drop CLS: (B, g*g)
    side = int(round(patch_scores.shape[1] ** 0.5))
    if side * side != patch_scores.shape[1]:
        raise ValueError(f"{patch_scores.shape[1]} patch tokens do not form a square grid")
    return pair_embeds, patch_scores.reshape(-1, side, side).cpu()


def heat_map(scores: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Patch scores (g, g) -> heat map (height, width) in [0, 1] for an image of PIL `size` (width, height).

    Min-max scaled first: the norms share a large per-patch baseline, and the map is about where change is
    stronger than elsewhere in this pair. A constant grid gives an all-zero map, and so does one whose spread is
    float noise (below 1e-5 of its largest score, or 1e-5 where that is below 1): identical images, batched, came
    out of the ViT ~1e-7 apart on a 2-core EPYC, and scaling that noise up would paint a full map.
    """
    scores = scores.float()
    low, high = scores.min(), scores.max()
    noise = 1e-5 * max(1.0, high.abs().item())
    scaled = (scores - low) / (high - low) if high - low > noise else torch.zeros_like(scores)
    width, height = size
    upsampled = F.interpolate(scaled[None, None], size=(height, width), mode="bilinear", align_corners=False)
    return upsampled[0, 0].clamp(0, 1).numpy()


def overlay(image: Image.Image, heat: np.ndarray, opacity: float = 0.6) -> Image.Image:
    """The heat map drawn over `image`: yellow (weak) to red (strong), transparent where there is no change."""
    base = np.asarray(image.convert("RGB"), dtype=np.float32)
    if heat.shape != base.shape[:2]:
        raise ValueError(f"heat map {heat.shape} does not match the image {base.shape[:2]}")
    color = np.stack([np.full_like(heat, 255.0), 220.0 * (1.0 - heat), np.zeros_like(heat)], axis=-1)
    alpha = (opacity * heat)[..., None]
    blended = base * (1.0 - alpha) + color * alpha
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def mass_in_mask(heat: np.ndarray, mask: np.ndarray) -> float:
    """The fraction of the heat map's total in the mask's pixels (mask: any nonzero = changed, resized to the
    map with nearest neighbour). A uniform map scores the mask's area fraction; 1.0 is all heat on the change."""
    mask_image = Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255)
    if mask_image.size != (heat.shape[1], heat.shape[0]):
        mask_image = mask_image.resize((heat.shape[1], heat.shape[0]), Image.Resampling.NEAREST)
    inside = np.asarray(mask_image) > 0
    total = float(heat.sum())
    return float(heat[inside].sum()) / total if total > 0 else 0.0


def change_map(model, processor, before: Image.Image, after: Image.Image, method: str = "difference"):
    """(pair_embeds (1, 2*S, D), heat (H, W) over the after image) for one pair of PIL images."""
    pixel_values = processor.image_processor([(before, after)])["pixel_values"].to(model.device)
    pair_embeds, scores = pair_embeds_with_scores(model, pixel_values, method)
    return pair_embeds, heat_map(scores[0], after.size)


__all__ = ["METHODS", "change_map", "heat_map", "mass_in_mask", "overlay", "pair_embeds_with_scores", "check_method"]
