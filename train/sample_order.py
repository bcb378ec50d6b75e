"""Stratified sample order: every stretch of a run sees the tasks, and each task's answers, in the data's proportions.

A random permutation leaves short runs to chance: in the 10-minute demo's first 45 steps (seed 0) the caption
samples drawn between steps 10 and 35 were 17 change captions and 2 "there is no difference", and the model
answered a change caption to every test pair; the same steps at seed 1 drew them near half and half.

`stratified_order` sorts the samples by a key (task, then answer, ties in random order) and visits the sorted
list at golden-ratio strides: sample of rank r goes to time frac(u + r / phi), u random. By the three-distance
theorem the ranks that land in any window of consecutive times are spread evenly over the sorted list, so a window
of k samples holds each key block (a task; within it, an answer such as "there is no difference") in proportion to
its size, up to about one sample. It is still a permutation: an epoch sees every sample once.
"""

import math

import torch

INVERSE_GOLDEN_RATIO = (math.sqrt(5) - 1) / 2


def stratified_order(keys: list, generator: torch.Generator | None = None) -> list[int]:
    """Indices 0..N-1 of N samples with sortable `keys`, in an order whose every window is stratified by key.

    Samples with equal keys keep a random relative order; `generator` draws it and the offset u (None: torch's
    global generator, which the Trainer seeds).
    """
    if not keys:
        return []
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    draw = torch.Generator().manual_seed(seed)
    tie_break = torch.randperm(len(keys), generator=draw).tolist()
    ranked = sorted(range(len(keys)), key=lambda i: (keys[i], tie_break[i]))
    offset = float(torch.rand((), generator=draw))
    time_of = {index: (offset + rank * INVERSE_GOLDEN_RATIO) % 1.0 for rank, index in enumerate(ranked)}
    return sorted(ranked, key=time_of.__getitem__)


class EpochSeededOrder:
    """An order drawn from (seed, epoch) alone, as accelerate's seeded random sampler draws the default one. The
    Trainer calls `set_epoch` before each epoch (through accelerate's data loader), so a run resumed inside epoch
    k draws epoch k's order again, whatever torch's global generator went through before: drawing from that
    generator instead, a resume inside any epoch after the first saw another order (the global state at an
    epoch's start is not what a checkpoint restores). Iterated again without `set_epoch`, it moves to the next
    epoch, so a plain DataLoader still gets a fresh order each pass."""

    seed: int = 0
    epoch: int = 0
    _epoch_given: bool = False
    _iterated: bool = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._epoch_given = epoch, True

    def epoch_generator(self) -> torch.Generator:
        if self._iterated and not self._epoch_given:
            self.epoch += 1
        self._iterated, self._epoch_given = True, False
        return torch.Generator().manual_seed(self.seed + self.epoch)


class StratifiedLengthGroupedSampler(EpochSeededOrder, torch.utils.data.Sampler):
    """`stratified_order` over the samples' keys, cut into windows of `window_size` samples (an optimizer step's
    samples, or several steps'), each sorted from long to short so that micro-batches hold similar lengths.
    `window_size` None: no sorting. A fresh order every epoch, from (`seed`, epoch) (`EpochSeededOrder`), or from
    `generator` when one is given."""

    def __init__(self, keys: list, lengths: list[int] | None = None, window_size: int | None = None,
                 generator: torch.Generator | None = None, seed: int = 0):
        if lengths is not None and len(lengths) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(lengths)} lengths")
        if window_size is not None and (window_size < 1 or lengths is None):
            raise ValueError(f"window_size must be >= 1 and needs lengths, got {window_size}")
        self.keys, self.lengths, self.window_size, self.generator = keys, lengths, window_size, generator
        self.seed = seed

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        order = stratified_order(self.keys, self.generator if self.generator is not None else self.epoch_generator())
        if self.window_size is None:
            return iter(order)
        windows = (order[start : start + self.window_size] for start in range(0, len(order), self.window_size))
        return iter([i for window in windows for i in sorted(window, key=lambda i: -self.lengths[i])])


__all__ = ["EpochSeededOrder", "StratifiedLengthGroupedSampler", "stratified_order"]
