"""Vision warm-up for a DeltaVLM whose ViT starts from scratch (DeltaVLM-Nano).

The paper's ViT is EVA-CLIP-g, pretrained on billions of images; Nano's has no pretrained weights that install
offline. Before the instruction tuning, this stage teaches the ViT, `ln_vision` and the difference module to
see change: a linear probe on the difference module's per-patch outputs predicts, for each patch, whether a
road and whether a building changed there, supervised by the synthetic data set's change masks (0 = none,
128 = road, 255 = building).

Given the training annotations (`facts=pair_facts(...)`), a second phase then teaches the Q-Former to carry what
it sees, with the vision side frozen: a second probe reads the query outputs and predicts the pair's facts that
the instruction records state (changed or not, how many roads / buildings changed, which 3x3 cells). Without
it the Q-Former's fresh cross-attention starts nearly uniform over the 2 x S image tokens, so a local change is
averaged away (measured on a default-budget Nano: the projected queries varied across pairs by < 1% of their
scale) and the language-model stage, the expensive one, spends its steps discovering where to look.

Neither stage costs language-model compute, so both are cheap, and the probes are thrown away afterwards:
only the model's own weights carry over.
"""

import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from eval.parsers import parse_binary, parse_count, parse_localization
from processing.changechat_data import load_records
from processing.conversation import GRID_CELLS, TASK_PROMPTS, task_of_question

ROAD, BUILDING = 128, 255
# 0..8 changed objects, and 9 = "nine or more". The synthetic scenes change up to 8 buildings; with 6 classes
# (5 = "five or more") the queries had no reason to tell 5 from 8, and the 60-minute demo's Nano never answered
# more than 3 buildings: pairs with 4 or more made 55% of its building-count error (200 test records).
COUNT_CLASSES = 10
FACT_PROMPTS = [TASK_PROMPTS[task] for task in ("caption", "binary", "count", "localization")]
# held-out score keys kept in the warm-up's record but left out of its log lines
PER_CATEGORY_SUFFIXES = ("_roads", "_buildings", "_mae_zero", "_said", "_changed")


def change_pairs(data_dir, split: str = "train") -> list[tuple[str, str, str]]:
    """(before, after, mask) paths of a LEVIR-CC/LEVIR-MCI style tree: images/{split}/A|B|label/NAME.png."""
    root = Path(data_dir) / "images" / split
    masks = sorted((root / "label").glob("*.png"))
    if not masks:
        raise FileNotFoundError(f"no change masks under {root / 'label'}: the warm-up needs labelled pairs")
    return [(str(root / "A" / m.name), str(root / "B" / m.name), str(m)) for m in masks]


def cell_rule_patch_pixels(data_dir, grid: int, split: str = "train") -> int | None:
    """The `patch_target_pixels` that makes the patch targets agree with the synthetic cell rule, for a ViT of
    `grid` patches a side: the rule's pixel count (`min_cell_pixels` of the masks' side) where the patches split
    evenly into the 3x3 cells, else None (5% of the patch: a boundary patch straddles two cells whatever the rule)."""
    from train.synthetic.dataset import min_cell_pixels

    if grid % 3:
        return None
    side = Image.open(change_pairs(data_dir, split)[0][2]).size[0]
    return min_cell_pixels(side)


def dihedral(pixel_values: torch.Tensor, targets: torch.Tensor, generator: torch.Generator) -> tuple:
    """One random symmetry of the square (rot90 k times, then maybe a transpose) per pair, the same on A, B and
    the pair's patch targets.

    pixel_values (B, 2, C, H, W) with H == W; targets (B, grid*grid, 2) in row-major patch order. A patch's
    targets move with its pixels because the image side is a whole number of patches. For the mask phase only:
    positions in the answers would move too, and the Q-Former phase reads fixed pair facts.
    """
    grid = math.isqrt(targets.shape[1])
    target_grid = targets.unflatten(1, (grid, grid))  # (B, grid, grid, 2)
    images, grids = [], []
    for image, target in zip(pixel_values, target_grid):
        turns = int(torch.randint(0, 4, (), generator=generator))
        transpose = bool(torch.randint(0, 2, (), generator=generator))
        image, target = image.rot90(turns, dims=(-2, -1)), target.rot90(turns, dims=(0, 1))
        if transpose:
            image, target = image.transpose(-2, -1), target.transpose(0, 1)
        images.append(image)
        grids.append(target)
    return torch.stack(images), torch.stack(grids).flatten(1, 2)


def patch_cells(patch_hits: torch.Tensor) -> torch.Tensor:
    """(B, grid*grid, 2) bool per-patch hits -> (B, 18) bool: roads' 9 cells, then buildings' (GRID_CELLS order).

    A cell is hit when a patch whose centre lies in it is: the reading of the 3x3 answer that the patches alone
    allow, whatever the Q-Former and the language model then make of it.
    """
    grid = math.isqrt(patch_hits.shape[1])
    centre_cell = ((torch.arange(grid) + 0.5) * 3 / grid).long().clamp(max=2)  # patch row/column -> cell row/column
    cell_of_patch = (3 * centre_cell[:, None] + centre_cell[None, :]).reshape(-1)  # (grid*grid,)
    owner = nn.functional.one_hot(cell_of_patch, 9).float()  # (grid*grid, 9)
    per_cell = torch.einsum("bpk,pc->bkc", patch_hits.float(), owner) > 0  # (B, 2, 9)
    return per_cell.flatten(1)


def patch_targets(mask_paths: list[str], grid: int, min_pixels: int | None = None) -> torch.Tensor:
    """(B, grid*grid, 2) float targets: does a changed road / building cover at least 5% of the patch, or with
    `min_pixels` at least that many of the mask's pixels (the synthetic cell rule's count: then on a patch grid
    that splits into the 3x3 cells, a cell holds a target patch nearly exactly when the annotation lists it)."""
    targets = []
    for path in mask_paths:
        mask = np.asarray(Image.open(path))
        if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
            raise ValueError(f"change mask {path}: expected a square single-channel image, got shape {mask.shape}")
        # BOX fractions are means over a patch of (side / grid)^2 mask pixels
        threshold = 0.05 if min_pixels is None else (min_pixels - 0.5) / (mask.shape[0] / grid) ** 2
        cells = []
        for value in (ROAD, BUILDING):
            hit = Image.fromarray((mask == value).astype(np.float32), mode="F")
            # each patch's share of the mask: a box filter averages the pixels whose centres lie in the patch, also
            # where the side is not a multiple of the grid (256 px on 10 patches: 25.6 px each; cropping to 250 px
            # instead dropped the last 6 px and shifted the patch edges)
            fraction = np.asarray(hit.resize((grid, grid), Image.Resampling.BOX))
            cells.append(fraction.reshape(-1) >= threshold)
        targets.append(np.stack(cells, axis=-1))
    return torch.from_numpy(np.stack(targets)).float()


def pair_change_loss(patch_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of each pair's yes/no, read from its most confident patch.

    patch_logits, targets: (B, patches, 2), as ChangeProbe and patch_targets give them. A pair changed where any
    patch target is set; its logit is the largest patch logit of either category, so an unchanged pair is
    penalised through its one most confident patch and a changed pair until some patch says so. The per-patch
    loss alone weighs a pair by how many of its patches changed, and most of them did not: the yes/no that the
    binary answers, the dialogues and the captions all open with is the one fact that term leaves weakest.
    """
    pair_logits = patch_logits.amax(dim=(1, 2))
    pair_changed = targets.amax(dim=(1, 2)).to(pair_logits.dtype)
    return nn.functional.binary_cross_entropy_with_logits(pair_logits, pair_changed)


class ChangeProbe(nn.Module):
    """Per-patch logits (road changed, building changed) from the difference module's output for A and B.

    With `subgrid` k > 1 each patch predicts its k x k sub-patches instead: the targets then come from the mask at
    k times the patch grid, so a patch learns where inside it the change lies, not only whether it passes the 5%
    rule.
    """

    def __init__(self, width: int, subgrid: int = 1):
        super().__init__()
        if subgrid < 1:
            raise ValueError(f"ChangeProbe: subgrid must be >= 1, got {subgrid}")
        self.subgrid = subgrid
        self.classifier = nn.Linear(2 * width, 2 * subgrid * subgrid)

    def forward(self, pair_embeds: torch.Tensor) -> torch.Tensor:
        """(B, 2*S, D) -> (B, (grid*k)**2, 2), CLS token dropped; grid*grid = S-1, row-major over the fine grid"""
        before, after = pair_embeds.chunk(2, dim=1)
        logits = self.classifier(torch.cat([before, after], dim=-1)[:, 1:])  # (B, grid*grid, k*k*2)
        k = self.subgrid
        if k == 1:
            return logits
        batch, patches = logits.shape[:2]
        grid = math.isqrt(patches)
        # patch (r, c), sub-patch (i, j) -> fine cell (r*k + i, c*k + j)
        fine = logits.reshape(batch, grid, grid, k, k, 2).permute(0, 1, 3, 2, 4, 5)
        return fine.reshape(batch, grid * k * grid * k, 2)


class PositionProbe(nn.Module):
    """Per-patch logits for the patch's own grid row and column, from the difference module's output.

    The Q-Former's cross-attention has no position encoding of its own over the image tokens: it can only tell
    where a patch lies if the patch's features say so. A pretrained EVA-CLIP's do; a ViT trained from scratch on
    the change masks alone, a translation-equivariant target, lets its input position embeddings fade (measured
    on the 60-minute demo's warmed-up Nano: a linear probe told a patch's 3x3 cell from its difference-module
    output 16% of the time, chance being 11%). Training this probe alongside keeps position readable.
    """

    def __init__(self, width: int, grid: int):
        super().__init__()
        self.grid = grid
        self.classifier = nn.Linear(width, 2 * grid)

    def forward(self, pair_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 2*S, D) -> row logits (B, 2, S-1, grid), column logits (B, 2, S-1, grid); CLS tokens dropped"""
        tokens = pair_embeds.unflatten(1, (2, -1))[:, :, 1:]  # (B, 2, S-1, D): before, after
        return self.classifier(tokens).split(self.grid, dim=-1)

    def loss(self, pair_embeds: torch.Tensor) -> torch.Tensor:
        rows, columns = self.forward(pair_embeds)
        patches = torch.arange(self.grid * self.grid, device=rows.device)
        target_rows = (patches // self.grid).expand(rows.shape[:-1])
        target_columns = (patches % self.grid).expand(columns.shape[:-1])
        return (nn.functional.cross_entropy(rows.flatten(0, 2), target_rows.flatten())
                + nn.functional.cross_entropy(columns.flatten(0, 2), target_columns.flatten())) / 2

    def accuracy(self, pair_embeds: torch.Tensor) -> float:
        """Share of patches whose row and column are both predicted right."""
        rows, columns = self.forward(pair_embeds)
        patches = torch.arange(self.grid * self.grid, device=rows.device)
        right = (rows.argmax(-1) == patches // self.grid) & (columns.argmax(-1) == patches % self.grid)
        return right.float().mean().item()


def pair_facts(annotations, image_root=None) -> dict[str, dict]:
    """What the instruction records state about each pair, keyed by the before image's path.

    Reads every round of every record (single-turn and dialogue) with the evaluation parsers: the binary
    answer gives `changed` (0/1), the count answer `roads` / `buildings` (ints), the localization answer
    `cells` (18 floats: the nine GRID_CELLS for roads, then for buildings). Facts no record states are absent.
    """
    facts: dict[str, dict] = {}
    for record in load_records(annotations, image_root):
        pair = facts.setdefault(os.path.realpath(record["image_before"]), {})
        for question, answer in zip(record["questions"], record["answers"]):
            task = task_of_question(question)
            if task == "binary" and (changed := parse_binary(answer)) is not None:
                pair["changed"] = float(changed)
            elif task == "count" and (counts := parse_count(answer)) is not None:
                pair.update(counts)
            elif task == "localization" and (cells := parse_localization(answer)) is not None:
                pair["cells"] = [float(c in cells[k]) for k in ("roads", "buildings") for c in GRID_CELLS]
    return facts


def pair_instructions(annotations, image_root=None) -> dict[str, list[str]]:
    """Every prompt the language stage will give each pair, keyed by the before image's path (as `pair_facts`):
    each round of each record rendered as training renders it (`records_to_samples`, "deltavlm" template, one
    caption instruction a pair), dialogue rounds with their history."""
    from train.data import records_to_samples

    samples = records_to_samples(load_records(annotations, image_root), captions_per_pair="first")
    instructions: dict[str, list[str]] = {}
    for before, prompt in zip(samples["image_before"], samples["prompt"]):
        instructions.setdefault(os.path.realpath(before), []).append(prompt)
    return instructions


class FactProbe(nn.Module):
    """Pair-level logits from the Q-Former's query outputs: changed (1), road and building counts (2 x
    COUNT_CLASSES), changed cells (18). Reads all queries flattened, so each query may specialise."""

    def __init__(self, num_queries: int, width: int):
        super().__init__()
        self.classifier = nn.Linear(num_queries * width, 1 + 2 * COUNT_CLASSES + 18)

    def forward(self, query_output: torch.Tensor) -> dict:
        """(B, Q, Hq) -> changed (B,), roads (B, C), buildings (B, C), cells (B, 18)"""
        logits = self.classifier(query_output.flatten(1))
        changed, roads, buildings, cells = logits.split([1, COUNT_CLASSES, COUNT_CLASSES, 18], dim=-1)
        return {"changed": changed.squeeze(-1), "roads": roads, "buildings": buildings, "cells": cells}


class CellQueryProbe(nn.Module):
    """Per-query logits (road changed, building changed) for one 3x3 cell each: query i reports GRID_CELLS[i].

    One linear head shared by the first nine queries, so "changed here" is the same direction in each of them and
    only the query's slot says where. The FactProbe reads all queries flattened, which lets the cells hide in any
    mix of them; the language model then has to untangle that mix from a few hundred LoRA steps, and on the
    60-minute demo's Nano it did not (greedy test answers never named a right-hand cell: 0 of 120 true ones).
    Measured, not adopted (docs/nano_experiments.md, "Where localization is lost, decomposed"): from the 60-minute
    warm-up, the per-query probe read the held-out cells at 0.48 against the flattened probe's 0.57, and 120 LoRA
    steps after it gave localization F1 23.6 against 26.0 (mixed tasks) and 35.9 against 39.7 (localization answers
    only).
    """

    def __init__(self, width: int):
        super().__init__()
        self.classifier = nn.Linear(width, 2)

    def forward(self, query_output: torch.Tensor) -> torch.Tensor:
        """(B, Q, Hq) -> (B, 18): the nine cells for roads, then for buildings (the `cells` fact's order)"""
        logits = self.classifier(query_output[:, : len(GRID_CELLS)])  # (B, 9, 2)
        return logits.transpose(1, 2).flatten(1)


def fact_targets(batch_facts: list[dict]) -> dict:
    """Tensors for FactProbe's loss; a fact a pair lacks is masked out (counts: -100, ignored by cross-entropy)."""
    changed = torch.tensor([f.get("changed", float("nan")) for f in batch_facts])
    counts = {
        key: torch.tensor([min(f[key], COUNT_CLASSES - 1) if key in f else -100 for f in batch_facts])
        for key in ("roads", "buildings")
    }
    cells = torch.tensor([f.get("cells", [float("nan")] * 18) for f in batch_facts])
    return {"changed": changed, **counts, "cells": cells}


def cell_loss(cell_logits: torch.Tensor, cells: torch.Tensor, cell_positive_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy of (B, 18) cell logits on the pairs that state their cells (the others are NaN)."""
    known = ~torch.isnan(cells).any(dim=-1)  # a pair states all 18 cells or none
    if not known.any():
        return cell_logits.new_zeros(())
    return nn.functional.binary_cross_entropy_with_logits(
        cell_logits[known], cells[known], pos_weight=torch.full((18,), cell_positive_weight)
    )


def fact_loss(logits: dict, targets: dict, cell_positive_weight: float = 1.0,
              count_weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Sum of the fact terms; `cell_positive_weight` > 1 weights the changed cells, the rare positives;
    `count_weights` ({"roads": (COUNT_CLASSES,), "buildings": ...}, from `count_class_weights`) the count classes."""
    loss = cell_loss(logits["cells"], targets["cells"], cell_positive_weight)
    known = ~torch.isnan(targets["changed"])
    if known.any():
        loss = loss + nn.functional.binary_cross_entropy_with_logits(logits["changed"][known], targets["changed"][known])
    for key in ("roads", "buildings"):
        if (targets[key] >= 0).any():
            weight = None if count_weights is None else count_weights[key]
            loss = loss + nn.functional.cross_entropy(logits[key], targets[key], weight=weight, ignore_index=-100)
    return loss


def count_class_weights(facts: dict[str, dict]) -> dict[str, torch.Tensor]:
    """Inverse-frequency weights of the count classes in `facts` (from `pair_facts`), averaging 1 over the classes
    that occur (absent classes 0): {"roads": (COUNT_CLASSES,), "buildings": (COUNT_CLASSES,)}. Most pairs change no
    road, so an unweighted count head can score well by always saying zero."""
    weights = {}
    for key in ("roads", "buildings"):
        counts = torch.zeros(COUNT_CLASSES)
        for pair in facts.values():
            if key in pair:
                counts[min(pair[key], COUNT_CLASSES - 1)] += 1
        present = counts > 0
        if not present.any():
            raise ValueError(f"count_class_weights: no pair states a {key} count")
        weights[key] = torch.where(present, counts.sum() / (present.sum() * counts.clamp(min=1)), 0.0)
    return weights


class FrozenVisionCache:
    """ViT outputs (`ln_vision`, before and after) per pair, for the Q-Former phase, where the ViT is frozen: each
    pair's images are read and go through the ViT once, not once a draw. The difference module still runs every
    step (`relate_pair`), so its dropout draws fresh masks as without the cache. Holds at most `max_pairs` pairs
    (~155 kB each at Nano's size); the rest are recomputed when drawn. On the 10-minute demo's Nano (2-core EPYC,
    2026-11-27) a Q-Former step at batch 32 spent 0.3 s reading the images and 0.6 s in the ViT, of ~2 s."""

    def __init__(self, model, image_processor, max_pairs: int = 4096):
        self.model, self.image_processor, self.max_pairs = model, image_processor, max_pairs
        self.embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def pair_embeds(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        """(before, after) image paths of B pairs -> pair_embeds (B, 2*S, D), through the difference module."""
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self.embeds]
        computed = {}
        if missing:
            # fork_rng: the discarded difference-module pass here must not shift the dropout draws that follow
            with torch.no_grad(), torch.random.fork_rng():
                outputs = self.model.get_pair_embeds(self.image_processor(missing)["pixel_values"])
            for i, pair in enumerate(missing):
                computed[pair] = (outputs.before_embeds[i], outputs.after_embeds[i])
                if len(self.embeds) < self.max_pairs:
                    self.embeds[pair] = computed[pair]
        before, after = zip(*(self.embeds.get(pair) or computed[pair] for pair in pairs))
        return self.model.relate_pair(torch.stack(before), torch.stack(after))


def length_buckets(lengths: list[int], max_ratio: float = 1.5) -> list[list[int]]:
    """Indices grouped so that within a group the longest is at most `max_ratio` times the shortest, shortest first.
    [12, 51, 16, 13] -> [[0, 3, 2], [1]]."""
    buckets = []
    for index in sorted(range(len(lengths)), key=lambda i: (lengths[i], i)):
        if buckets and lengths[index] <= max_ratio * lengths[buckets[-1][0]]:
            buckets[-1].append(index)
        else:
            buckets.append([index])
    return buckets


def query_output_in_length_buckets(model, processor, pair_embeds: torch.Tensor, text: list[str]) -> torch.Tensor:
    """The Q-Former's query outputs (B, Q, Hq) for B pairs (`pair_embeds`, (B, 2*S, D)) under B instructions, run
    in groups of similar instruction length (`length_buckets`) and put back in the batch's order.

    Each query output depends only on its own pair and instruction, so this is the one-batch result without the
    padding: the localization prompt is 51 Q-Former tokens, the other fact prompts 12-16, and a batch of 16 with a
    prompt drawn per pair nearly always holds one, so every row was padded to 51."""
    lengths = processor(text=text)["qformer_attention_mask"].sum(-1).tolist()
    outputs, order = [], []
    for bucket in length_buckets(lengths):
        inputs = processor(text=[text[i] for i in bucket])
        features = model.get_image_features(
            pair_embeds=pair_embeds[bucket], qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        )
        outputs.append(features.query_output)
        order += bucket
    restore = torch.empty(len(order), dtype=torch.long)
    restore[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(outputs)[restore]


def _cosine_with_warmup(optimizer, steps: int, warmup: int | None = None):
    """Linear ramp over `warmup` steps (default a tenth of `steps`), then cosine to zero at `steps`."""
    warmup = max(1, steps // 10) if warmup is None else max(1, warmup)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)),
    )


def warm_up_vision(
    model,
    image_processor,
    data_dir,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    vision_learning_rate: float | None = None,
    seed: int = 0,
    log_every: int = 25,
    log=print,
    processor=None,
    facts: dict[str, dict] | None = None,
    validation_facts: dict[str, dict] | None = None,
    validation_pairs: int = 64,
    vision_steps: int | None = None,
    cell_positive_weight: float = 4.0,
    position_weight: float = 1.0,
    cell_query_weight: float = 0.0,
    mask_augment: bool = False,
    instructions: dict[str, list[str]] | None = None,
    validation_instructions: dict[str, list[str]] | None = None,
    vision_cache: FrozenVisionCache | None = None,
    change_flag_weight: float = 0.0,
    count_weighting: str = "none",
    patch_positive_weight: tuple[float, float] = (4.0, 4.0),
    vision_ramp_steps: int | None = None,
    mask_subgrid: int = 1,
    patch_target_pixels: int | None = None,
) -> list[dict]:
    """Train model.vision_model, the difference module (and ln_vision) on change masks; returns the log.

    With `facts` (from `pair_facts`) and `processor` (for the Q-Former's tokenizer), the Q-Former and the query
    tokens train too, on the pairs' facts read from the query outputs, under a task prompt drawn per pair, in a
    second phase: the first `vision_steps` steps (default: half of `steps`) train the vision side on the masks
    alone, the remaining steps train the Q-Former on the facts with the vision side frozen. The Q-Former's
    pretrained weights (MiniLM for Nano) move at a tenth of `learning_rate`; its fresh cross-attention layers and
    the queries at the full rate. The mask phase runs at `vision_learning_rate` (default `learning_rate`). The
    changed cells are weighted by `cell_positive_weight` in the fact loss.
    The mask phase also trains a `PositionProbe` (weight `position_weight` in its loss; 0 switches it off) so the
    patches keep saying where they are: the Q-Former needs that to report which cells changed.
    With `cell_query_weight` > 0 the Q-Former phase also trains a `CellQueryProbe`: query i must report cell i
    (weight `cell_query_weight` on its loss), so each cell has its own slot among the tokens the language model
    reads.
    With `instructions` (from `pair_instructions`) the Q-Former phase gives each pair one of its own training
    prompts (any task, dialogue rounds included) instead of one of the four fact prompts: the queries then learn
    to carry the facts under every instruction the language stage will give them, not only under those four.
    Measured on the 10-minute demo's data (EPYC, 2026-11-27; 60 Q-Former steps at batch 16 from the same mask
    phase, 90 held-out pairs): it makes no difference there. Trained under the four prompts the queries already
    carry the facts under the pairs' own prompts (change accuracy 0.844, cell F1 0.309, against 0.856 / 0.313
    trained under their own), so the demo keeps the four.
    With `change_flag_weight` > 0 the mask phase also trains each pair's yes/no, read from its most confident patch
    (`pair_change_loss`, that weight on it): the per-patch loss alone lets a short phase end with the yes/no that
    most answers open with still weak. `deltavlm demo` uses it below 30 minutes (train/demo.py has the measurements).
    With `mask_augment` each mask-phase pair is turned or mirrored at random (`dihedral`, the same on A, B and the
    targets). Off by default: at 360 steps on the 60-minute demo's data it lowered held-out patch F1 (0.621 vs
    0.673) with the patches' own cell F1 unchanged (0.691 vs 0.694): that many steps underfit, and harder data does
    not help an underfitting model (docs/nano_experiments.md, "Where localization and the building counts are
    lost").

    Why two phases (`deltavlm demo` warm-ups on light-variation pairs, 2026-11-26, `warmup.json`): under one
    joint loss the fact terms (two count cross-entropies among them) dominate the clipped gradient the ViT
    gets, and its held-out per-patch change F1 was 0.13 after 60 steps and 0.38 after 240 (1 260 training
    pairs); on the masks alone it was 0.61 after 180 steps and 0.66 after 360 (3 780 pairs), and the queries'
    held-out cell micro-F1 rose from at most 0.32 to 0.54. The queries can only carry *where* if the patches
    know it first.

    With `validation_facts` (from `pair_facts` on the validation annotations; needs `facts`), every log step also
    scores the probes on up to `validation_pairs` held-out labelled pairs of the "val" split: patch F1, the cell
    micro-F1 that the predicted patches give (`patch_cells`), and from the queries change accuracy, micro-F1 of the
    18 cells and the MAE of the two counts (entries `val_patch_f1`, `val_change_accuracy`, `val_cell_f1`,
    `val_patch_cell_f1`, `val_road_count_mae`, `val_building_count_mae`; with `cell_query_weight`,
    `val_slot_cell_f1` from the per-query probe). The training-batch figures alone cannot tell learning from
    memorising. Entries also name their `phase` ("vision" or "qformer"). Those query scores are read under the
    localization prompt; with `validation_instructions` (from `pair_instructions` on the validation annotations)
    the Q-Former phase's entries also give them under each pair's own prompts, the k-th held-out pair under its
    (k mod n)-th of n (keys ending in `_own`): what the language stage's varied questions get from the queries.

    With `count_weighting="inverse_frequency"` the fact probe's two count terms weigh each count class by its
    inverse frequency in `facts` (`count_class_weights`). Measured, not adopted: at the 10-minute default's warm-up
    the queries carry too little of the roads for the weights to find (`benchmarks/bench_warmup_categories.py`).
    The held-out scores also come per category (keys ending in `_roads`, `_buildings`), with always-zero's count
    error on the same pairs (`_mae_zero`) and how many pairs the probe says changed a road (`val_roads_said`)
    beside how many did (`val_roads_changed`).

    The mask phase's rate ramps up linearly over `vision_ramp_steps` (default a tenth of its steps), then falls on a
    cosine. At batch 32 and 3e-3 with 60 mask steps, a 6-step ramp lost the mask probe for good on 1 of 6 seeds and
    left the others weaker; an 18-step one kept all 6 alive (`benchmarks/bench_warmup_batch32.py`).
    `patch_positive_weight` weighs the changed patches of roads and of buildings in the mask loss (changes cover a
    small share of the patches). Roads' 12 against 4 was measured and not adopted
    (`benchmarks/bench_warmup_categories.py`).

    With `mask_subgrid` k > 1 each patch predicts its k x k sub-patches (`ChangeProbe(subgrid=k)`): the mask targets,
    the held-out patch F1 and the cells read from the patches then come at k times the patch grid. Measured, not
    adopted: at k = 4 the 30-minute demo's 180 mask steps (batch 32, seed 0) ended with the cells from the patches at
    0.517 against 0.619 at k = 1, and seed 1 trailed too (0.30 against 0.42 at step 45); the probe also read
    positions later (EPYC, 2026-11-28, `bench_warmup_batch32.py --mask-subgrid 4`).

    `patch_target_pixels`: a patch is a mask target when it holds at least that many changed pixels of a category
    (`patch_targets`); None keeps 5% of the patch. The synthetic cell rule's count (12 at 256 px,
    `train.synthetic.dataset.min_cell_pixels`) on a patch grid of 3k patches a side makes the cells read from
    perfect patches the annotated ones (micro-F1 0.998 on 1 600 synthetic pairs at 9 x 9 patches, 0.918 at Nano's
    10 x 10 whose boundary patches straddle two cells; `benchmarks/bench_patch_grid.py`). Measured with Nano at 144 px
    (9 x 9 patches) against 160, not adopted (EPYC, 2026-11-29): the cells the predicted patches give rose on 3 of
    4 warm-ups (10 and 30 minutes, two seeds each), the queries' cells on 1, the queries' change accuracy fell on
    all 4 — the patches' predictions, not the grid, are what limits them.

    `vision_cache` (an empty `FrozenVisionCache` of this model) is the one the Q-Former phase fills, for a caller
    that reads the frozen vision side again afterwards (`train.projection_alignment`).
    """
    pairs = change_pairs(data_dir)
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    if mask_subgrid < 1:
        raise ValueError(f"warm_up_vision: mask_subgrid must be >= 1, got {mask_subgrid}")
    if patch_target_pixels is not None and patch_target_pixels < 1:
        raise ValueError(f"warm_up_vision: patch_target_pixels must be >= 1 or None, got {patch_target_pixels}")
    probe = ChangeProbe(vision.hidden_size, mask_subgrid)
    mask_grid = grid * mask_subgrid  # the grid the mask targets, patch F1 and the patches' cells are read at
    position_probe = PositionProbe(vision.hidden_size, grid)
    if batch_size < 1:
        raise ValueError(f"warm_up_vision: batch_size must be >= 1, got {batch_size}")
    if position_weight < 0:
        raise ValueError(f"warm_up_vision: position_weight must be >= 0, got {position_weight}")
    if cell_query_weight < 0:
        raise ValueError(f"warm_up_vision: cell_query_weight must be >= 0, got {cell_query_weight}")
    if change_flag_weight < 0:
        raise ValueError(f"warm_up_vision: change_flag_weight must be >= 0, got {change_flag_weight}")
    if vision_ramp_steps is not None and vision_ramp_steps < 1:
        raise ValueError(f"warm_up_vision: vision_ramp_steps must be >= 1, got {vision_ramp_steps}")
    if len(patch_positive_weight) != 2 or min(patch_positive_weight) <= 0:
        raise ValueError("warm_up_vision: patch_positive_weight must be two weights > 0 (roads, buildings), got "
                         f"{patch_positive_weight!r}")
    if count_weighting not in ("none", "inverse_frequency"):
        raise ValueError(f"warm_up_vision: count_weighting must be 'none' or 'inverse_frequency', got {count_weighting!r}")
    if cell_query_weight and model.config.num_query_tokens < len(GRID_CELLS):
        raise ValueError(f"warm_up_vision: cell_query_weight needs at least {len(GRID_CELLS)} query tokens (one per "
                         f"cell), the model has num_query_tokens={model.config.num_query_tokens}")
    vision_parameters = list(model.vision_model.parameters()) + list(model.difference_module.parameters())
    use_facts = bool(facts)
    cell_query_probe = None  # built with the Q-Former phase's other probe
    if vision_steps is None:
        vision_steps = steps // 2 if use_facts else steps
    if not 0 <= vision_steps <= steps:
        raise ValueError(f"warm_up_vision: vision_steps must lie in [0, steps={steps}], got {vision_steps}")
    if not use_facts and vision_steps != steps:
        raise ValueError("warm_up_vision: without facts every step trains the vision side (vision_steps == steps)")
    probes = list(probe.parameters()) + (list(position_probe.parameters()) if position_weight else [])
    vision_rate = learning_rate if vision_learning_rate is None else vision_learning_rate
    # fused: one kernel over all tensors, as the Trainer's default optimizer (on 2 CPU cores, 0.04 s a step against
    # 0.08 for the per-tensor loop over the Q-Former's 29 M parameters)
    vision_optimizer = torch.optim.AdamW(vision_parameters + probes, lr=vision_rate, weight_decay=0.05, fused=True)
    vision_schedule = _cosine_with_warmup(vision_optimizer, max(1, vision_steps), vision_ramp_steps)
    if use_facts:
        if processor is None:
            raise ValueError("warm_up_vision: facts need the processor (the Q-Former's tokenizer)")
        fact_probe = FactProbe(model.config.num_query_tokens, model.config.qformer_config.hidden_size)
        cell_query_probe = CellQueryProbe(model.config.qformer_config.hidden_size) if cell_query_weight else None
        probe_parameters = list(fact_probe.parameters()) + (
            list(cell_query_probe.parameters()) if cell_query_probe else [])
        fresh = [p for n, p in model.qformer.named_parameters() if "crossattention" in n]
        fresh_ids = {id(p) for p in fresh}
        pretrained = [p for p in model.qformer.parameters() if id(p) not in fresh_ids]
        qformer_groups = [
            {"params": fresh + [model.query_tokens] + probe_parameters},
            {"params": pretrained, "lr": learning_rate / 10},
        ]
        qformer_parameters = [p for group in qformer_groups for p in group["params"]]
        qformer_optimizer = torch.optim.AdamW(qformer_groups, lr=learning_rate, weight_decay=0.05, fused=True)
        qformer_schedule = _cosine_with_warmup(qformer_optimizer, max(1, steps - vision_steps))
        prompts = [processor.apply_chat_template([{"role": "user", "content": p}]) for p in FACT_PROMPTS]
        facts = {os.path.realpath(path): pair for path, pair in facts.items()}
        count_weights = count_class_weights(facts) if count_weighting == "inverse_frequency" else None
        instructions = {os.path.realpath(path): list(texts) for path, texts in (instructions or {}).items() if texts}
        covered = sum(os.path.realpath(before) in facts for before, _, _ in pairs)
        if not covered:
            raise ValueError("warm_up_vision: none of the labelled pairs has facts in the annotations given")
    if vision_cache is not None and vision_cache.embeds:
        raise ValueError("warm_up_vision: vision_cache must start empty (it holds the ViT after the mask phase)")
    vision_cache = vision_cache if vision_cache is not None else FrozenVisionCache(model, image_processor)
    held_out, own_prompts = [], None
    if validation_instructions and not validation_facts:
        raise ValueError("warm_up_vision: validation_instructions need validation_facts (the held-out pairs' facts)")
    if validation_facts:
        if not use_facts:
            raise ValueError("warm_up_vision: validation_facts need facts and processor (the query probe)")
        validation_facts = {os.path.realpath(path): pair for path, pair in validation_facts.items()}
        held_out = [p for p in change_pairs(data_dir, "val") if os.path.realpath(p[0]) in validation_facts]
        held_out = held_out[:validation_pairs]
        if validation_instructions:
            own = {os.path.realpath(path): texts for path, texts in validation_instructions.items() if texts}
            held_out = [pair for pair in held_out if os.path.realpath(pair[0]) in own]
            own_prompts = [own[os.path.realpath(before)][k % len(own[os.path.realpath(before)])]
                           for k, (before, _, _) in enumerate(held_out)]
            if not held_out:
                raise ValueError("warm_up_vision: no held-out pair with facts has prompts in validation_instructions")
        if not held_out:
            raise ValueError(f"warm_up_vision: no labelled pair under {Path(data_dir) / 'images' / 'val'} "
                             "has facts in validation_facts")
    # changes cover a small share of the patches: weight positives so the probe cannot win by saying "none"
    patch_loss_function = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([float(w) for w in patch_positive_weight]))
    rng = random.Random(seed)
    augment_generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    vision_trainable = [p.requires_grad for p in vision_parameters]
    model.train()
    history, started = [], time.time()
    try:
        for step in range(steps):
            vision_phase = step < vision_steps
            if step == vision_steps:  # the Q-Former phase reads a fixed vision side
                for parameter in vision_parameters:
                    parameter.requires_grad_(False)
            batch = rng.sample(pairs, min(batch_size, len(pairs)))
            images = [(before, after) for before, after, _ in batch]
            entry = {"step": step, "phase": "vision" if vision_phase else "qformer", "batch_size": len(batch)}
            if vision_phase:
                pixel_values = image_processor(images)["pixel_values"]
                targets = patch_targets([mask for _, _, mask in batch], mask_grid, patch_target_pixels)
                if mask_augment:
                    pixel_values, targets = dihedral(pixel_values, targets, augment_generator)
                pair_embeds = model.get_pair_embeds(pixel_values).pair_embeds
                logits = probe(pair_embeds)
                loss = patch_loss_function(logits, targets)
                if change_flag_weight:
                    pair_loss = pair_change_loss(logits, targets)
                    loss = loss + change_flag_weight * pair_loss
                if position_weight:
                    loss = loss + position_weight * position_probe.loss(pair_embeds)
                optimizer, schedule, parameters = vision_optimizer, vision_schedule, vision_parameters
            else:
                text = [rng.choice(instructions.get(os.path.realpath(before)) or prompts) for before, _, _ in batch]
                query_output = query_output_in_length_buckets(model, processor, vision_cache.pair_embeds(images), text)
                facts_logits = fact_probe(query_output)
                batch_facts = fact_targets([facts.get(os.path.realpath(before), {}) for before, _, _ in batch])
                loss = fact_loss(facts_logits, batch_facts, cell_positive_weight, count_weights)
                if cell_query_probe is not None:
                    loss = loss + cell_query_weight * cell_loss(
                        cell_query_probe(query_output), batch_facts["cells"], cell_positive_weight)
                optimizer, schedule, parameters = qformer_optimizer, qformer_schedule, qformer_parameters
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            entry["learning_rate"] = optimizer.param_groups[0]["lr"]  # this step's rate (Q-Former phase: its fresh layers')
            optimizer.step()
            schedule.step()
            if step % log_every == 0 or step == steps - 1 or step == vision_steps - 1:
                message = f"vision warm-up step {step} ({entry['phase']}): loss {loss.item():.4f}"
                if vision_phase:
                    predicted = logits.detach() > 0
                    hits = (predicted & targets.bool()).sum().item()
                    entry["patch_f1"] = round(2 * hits / max(1, predicted.sum().item() + targets.sum().item()), 3)
                    message += f", patch F1 {entry['patch_f1']}"
                    if change_flag_weight:
                        entry["pair_change_loss"] = round(pair_loss.item(), 4)
                        message += f", yes/no loss {entry['pair_change_loss']}"
                else:
                    known = ~torch.isnan(batch_facts["changed"])
                    if known.any():
                        right = (facts_logits["changed"].detach()[known] > 0).float() == batch_facts["changed"][known]
                        entry["change_accuracy"] = round(right.float().mean().item(), 3)
                        message += f", change accuracy (queries) {entry['change_accuracy']}"
                if held_out:
                    # the query probe only learns in the Q-Former phase: before it, its scores would be noise
                    scores = _held_out_scores(model, processor, probe, fact_probe, held_out, validation_facts, mask_grid,
                                              prompts[FACT_PROMPTS.index(TASK_PROMPTS["localization"])],
                                              with_queries=not vision_phase,
                                              position_probe=position_probe if position_weight else None,
                                              cell_query_probe=cell_query_probe,
                                              patch_target_pixels=patch_target_pixels)
                    if own_prompts and not vision_phase:
                        under_own = _held_out_scores(model, processor, probe, fact_probe, held_out, validation_facts,
                                                     mask_grid, own_prompts, patch_target_pixels=patch_target_pixels)
                        scores.update({f"{key}_own": value for key, value in under_own.items()
                                       if key not in ("val_patch_f1", "val_patch_cell_f1")
                                       and not key.endswith(PER_CATEGORY_SUFFIXES)})
                    entry.update(scores)
                    message += ", held out: " + ", ".join(
                        f"{k[4:]} {v}" for k, v in scores.items() if not k.endswith(PER_CATEGORY_SUFFIXES))
                entry.update(loss=round(loss.item(), 4), seconds=round(time.time() - started, 1))
                history.append(entry)
                log(message)
    finally:
        for parameter, trainable in zip(vision_parameters, vision_trainable):
            parameter.requires_grad_(trainable)
        model.train(was_training)
    return history


@torch.no_grad()
def _held_out_scores(model, processor, probe, fact_probe, pairs, facts, grid, prompt, with_queries=True,
                     position_probe=None, cell_query_probe=None, batch_size=32, patch_target_pixels=None) -> dict:
    """Patch F1, (with_queries) change accuracy and cell micro-F1 (also per query, with cell_query_probe),
    (with position_probe) position accuracy of the probes on held-out pairs, in eval mode. `prompt`: one
    instruction for every pair, or a list with one per pair."""
    prompts = [prompt] * len(pairs) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(pairs):
        raise ValueError(f"{len(pairs)} held-out pairs but {len(prompts)} prompts")
    was_training = model.training
    model.eval()
    # F1 tallies [hits, predicted + true] for the patches, the cells the patches give and the queries' cells, in
    # all and per category ("roads" / "buildings": the first / second half of the cells, channel 0 / 1 of a patch)
    tallies = {f"{name}{part}": [0, 0] for name in ("patch", "patch_cell", "cell") for part in ("", "_roads", "_buildings")}
    changes_right = changes_known = slot_hits = slot_total = roads_said = roads_changed = 0
    count_errors = {"roads": [], "buildings": []}
    zero_errors = {"roads": [], "buildings": []}  # always-zero's count error on the same pairs
    positions_right = []

    def tally(name: str, predicted: torch.Tensor, wanted: torch.Tensor, categories: list) -> None:
        for part, index in zip(("", "_roads", "_buildings"), [slice(None), *categories]):
            tallies[name + part][0] += (predicted[..., index] & wanted[..., index]).sum().item()
            tallies[name + part][1] += predicted[..., index].sum().item() + wanted[..., index].sum().item()

    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        inputs = processor(images=[(before, after) for before, after, _ in batch],
                           text=prompts[start : start + batch_size])
        features = model.get_image_features(
            pixel_values=inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        )
        predicted = probe(features.vision_outputs.pair_embeds) > 0  # (B, patches, 2)
        targets = patch_targets([mask for _, _, mask in batch], grid, patch_target_pixels).bool()
        tally("patch", predicted, targets, [0, 1])
        if position_probe is not None:
            positions_right.append(position_probe.accuracy(features.vision_outputs.pair_embeds) * len(batch))
        logits = fact_probe(features.query_output)
        wanted = fact_targets([facts[os.path.realpath(before)] for before, _, _ in batch])
        known = ~torch.isnan(wanted["changed"])
        changes_right += ((logits["changed"][known] > 0).float() == wanted["changed"][known]).sum().item()
        changes_known += known.sum().item()
        for key, errors in count_errors.items():
            stated = wanted[key] >= 0
            said = logits[key][stated].argmax(-1)
            errors += (said - wanted[key][stated]).abs().tolist()
            zero_errors[key] += wanted[key][stated].tolist()
            if key == "roads":
                roads_said += (said > 0).sum().item()
                roads_changed += (wanted[key][stated] > 0).sum().item()
        rows = ~torch.isnan(wanted["cells"]).any(dim=-1)
        cells, cell_targets = logits["cells"][rows] > 0, wanted["cells"][rows].bool()
        halves = [slice(0, 9), slice(9, 18)]
        tally("patch_cell", patch_cells(predicted)[rows], cell_targets, halves)
        tally("cell", cells, cell_targets, halves)
        if cell_query_probe is not None:
            slots = cell_query_probe(features.query_output)[rows] > 0
            slot_hits += (slots & cell_targets).sum().item()
            slot_total += slots.sum().item() + cell_targets.sum().item()
    model.train(was_training)

    def f1(name: str) -> float:
        hits, total = tallies[name]
        return round(2 * hits / max(1, total), 3)

    scores = {"val_patch_f1": f1("patch"), "val_patch_cell_f1": f1("patch_cell")}
    if position_probe is not None:
        scores["val_position_accuracy"] = round(sum(positions_right) / len(pairs), 3)
    if with_queries:
        scores["val_change_accuracy"] = round(changes_right / max(1, changes_known), 3)
        scores["val_cell_f1"] = f1("cell")
        for key, errors in count_errors.items():
            if errors:  # against the clamped target: 9 stands for "nine or more"
                scores[f"val_{key[:-1]}_count_mae"] = round(sum(errors) / len(errors), 3)
        if cell_query_probe is not None:
            scores["val_slot_cell_f1"] = round(2 * slot_hits / max(1, slot_total), 3)
    for category in ("roads", "buildings"):
        scores[f"val_patch_f1_{category}"] = f1(f"patch_{category}")
        scores[f"val_patch_cell_f1_{category}"] = f1(f"patch_cell_{category}")
        if with_queries:
            scores[f"val_cell_f1_{category}"] = f1(f"cell_{category}")
            if zero_errors[category]:
                scores[f"val_{category[:-1]}_count_mae_zero"] = round(
                    sum(zero_errors[category]) / len(zero_errors[category]), 3)
    if with_queries and zero_errors["roads"]:
        scores["val_roads_said"], scores["val_roads_changed"] = roads_said, roads_changed
    return scores


__all__ = ["CellQueryProbe", "ChangeProbe", "FactProbe", "FrozenVisionCache", "PositionProbe", "change_pairs", "cell_loss",
           "cell_rule_patch_pixels", "count_class_weights", "dihedral", "fact_targets", "length_buckets", "pair_change_loss", "pair_facts", "pair_instructions", "query_output_in_length_buckets", "patch_cells", "patch_targets", "warm_up_vision"]
