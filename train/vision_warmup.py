"""Vision warm-up for a DeltaVLM whose ViT starts from scratch (DeltaVLM-Nano).

The paper's ViT is EVA-CLIP-g, pretrained on billions of images; Nano's has no pretrained weights that install
offline. Before the instruction tuning, this stage teaches the ViT, `ln_vision` and the difference module to
see change: a linear probe on the difference module's per-patch outputs predicts, for each patch, whether a
road and whether a building changed there, supervised by the synthetic data set's change masks (0 = none,
128 = road, 255 = building). It costs no language-model compute, so it is cheap, and the probe is thrown
away afterwards: only the model's own weights carry over.
"""

import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

ROAD, BUILDING = 128, 255


def change_pairs(data_dir, split: str = "train") -> list[tuple[str, str, str]]:
    """(before, after, mask) paths of a LEVIR-CC/LEVIR-MCI style tree: images/{split}/A|B|label/NAME.png."""
    root = Path(data_dir) / "images" / split
    masks = sorted((root / "label").glob("*.png"))
    if not masks:
        raise FileNotFoundError(f"no change masks under {root / 'label'}: the warm-up needs labelled pairs")
    return [(str(root / "A" / m.name), str(root / "B" / m.name), str(m)) for m in masks]


def patch_targets(mask_paths: list[str], grid: int) -> torch.Tensor:
    """(B, grid*grid, 2) float targets: does a changed road / building cover at least 5% of the patch."""
    targets = []
    for path in mask_paths:
        mask = np.asarray(Image.open(path))
        height, width = mask.shape
        cells = []
        for value in (ROAD, BUILDING):
            hit = (mask == value).astype(np.float32)
            # average over each patch's pixels (crop to a multiple of the grid first)
            hit = hit[: height - height % grid, : width - width % grid]
            fraction = hit.reshape(grid, hit.shape[0] // grid, grid, hit.shape[1] // grid).mean(axis=(1, 3))
            cells.append(fraction.reshape(-1) >= 0.05)
        targets.append(np.stack(cells, axis=-1))
    return torch.from_numpy(np.stack(targets)).float()


class ChangeProbe(nn.Module):
    """Per-patch logits (road changed, building changed) from the difference module's output for A and B."""

    def __init__(self, width: int):
        super().__init__()
        self.classifier = nn.Linear(2 * width, 2)

    def forward(self, pair_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 2*S, D) -> (B, S-1, 2), CLS token dropped"""
        before, after = pair_embeds.chunk(2, dim=1)
        return self.classifier(torch.cat([before, after], dim=-1)[:, 1:])


def warm_up_vision(
    model,
    image_processor,
    data_dir,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    seed: int = 0,
    log_every: int = 25,
    log=print,
) -> list[dict]:
    """Train model.vision_model, the difference module (and ln_vision) on change masks; returns the log."""
    pairs = change_pairs(data_dir)
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    probe = ChangeProbe(vision.hidden_size)
    parameters = (
        list(model.vision_model.parameters()) + list(model.difference_module.parameters()) + list(probe.parameters())
    )
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.05)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )
    # changes cover a small share of the patches: weight positives so the probe cannot win by saying "none"
    positive_weight = torch.tensor([4.0, 4.0])
    loss_function = nn.BCEWithLogitsLoss(pos_weight=positive_weight)
    rng = random.Random(seed)
    was_training = model.training
    model.train()
    history, started = [], time.time()
    for step in range(steps):
        batch = rng.sample(pairs, min(batch_size, len(pairs)))
        pixel_values = image_processor([(before, after) for before, after, _ in batch])["pixel_values"]
        targets = patch_targets([mask for _, _, mask in batch], grid)
        logits = probe(model.get_pair_embeds(pixel_values).pair_embeds)
        loss = loss_function(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps - 1:
            predicted = logits.detach() > 0
            hits = (predicted & targets.bool()).sum().item()
            f1 = 2 * hits / max(1, predicted.sum().item() + targets.sum().item())
            entry = {"step": step, "loss": round(loss.item(), 4), "patch_f1": round(f1, 3), "seconds": round(time.time() - started, 1)}
            history.append(entry)
            log(f"vision warm-up step {step}: loss {entry['loss']}, patch F1 {entry['patch_f1']}")
    model.train(was_training)
    return history


__all__ = ["ChangeProbe", "change_pairs", "patch_targets", "warm_up_vision"]
