"""Batches for training and validation: open the image pairs (lazily, here) and run the processor.

Training uses the processor's `answers=` path: right padding, labels -100 on the image tokens, the prompt and
the padding. Validation uses its generation path: prompt only, left padding.
"""

import numpy as np
import torch
from PIL import Image
from transformers import TrainerCallback

from .augment import PairedAugment


def open_pair(before_path: str, after_path: str) -> tuple[Image.Image, Image.Image]:
    with Image.open(before_path) as before, Image.open(after_path) as after:
        return before.convert("RGB"), after.convert("RGB")


class TrainCollator:
    """Samples ({image_before, image_after, prompt, answer, index, ...}) -> model inputs with labels.

    With augmentation, sample `index` in epoch `epoch` (set by `EpochCallback`) is transformed with a generator seeded
    from (seed, epoch, index): the same draw however the run is split into processes or interrupted.

    The epoch lives in shared memory: dataloader workers run their own copy of the collator, made when they start,
    and persistent workers (`dataloader_persistent_workers`) start once for the whole run, so an epoch set as a
    plain attribute in the main process would never reach them (every epoch would reuse epoch 0's draws)."""

    def __init__(self, processor, augment: str = "none", seed: int = 0):
        self.processor = processor
        self.augment = None if augment == "none" else PairedAugment(augment)
        self.seed = seed
        # a forked worker maps the same memory; a spawned one receives it through torch's shared-memory pickling
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    @epoch.setter
    def epoch(self, value: int) -> None:
        self._epoch.fill_(value)

    def __call__(self, samples: list[dict]):
        pairs = []
        epoch = self.epoch  # read once: one batch, one epoch
        for sample in samples:
            pair = open_pair(sample["image_before"], sample["image_after"])
            if self.augment is not None:
                entropy = np.random.SeedSequence([self.seed, epoch, sample["index"]]).generate_state(1)[0]
                generator = torch.Generator().manual_seed(int(entropy))
                pair = self.augment(*pair, text=sample["prompt"] + " " + sample["answer"], generator=generator)
            pairs.append(pair)
        return self.processor(
            images=pairs, text=[s["prompt"] for s in samples], answers=[s["answer"] for s in samples]
        )


class EpochCallback(TrainerCallback):
    """Tells the collator which epoch its batches belong to (fresh augmentations every epoch)."""

    def __init__(self, collator: TrainCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.epoch = int(state.epoch + 1e-6)  # state.epoch is a float: 1.0 may arrive as 0.9999999


class GenerationCollator:
    """Records + one prompt for all -> generation inputs (left padded, no labels)."""

    def __init__(self, processor, prompt: str):
        self.processor = processor
        self.prompt = prompt

    def __call__(self, records: list[dict]):
        pairs = [open_pair(r["image_before"], r["image_after"]) for r in records]
        return self.processor(images=pairs, text=[self.prompt] * len(records))


__all__ = ["EpochCallback", "GenerationCollator", "TrainCollator", "open_pair"]
