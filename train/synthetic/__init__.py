"""Synthetic bi-temporal change data: aerial-looking before/after pairs with exact ground truth, written in
the public LEVIR-CC / ChangeChat layout so the real loaders run on it (`deltavlm synth`).

    from train.synthetic import generate_pair, write_dataset
    pair = generate_pair(seed=3)                 # images A/B, mask, ground truth, captions
    write_dataset("data/synth", num_pairs=1000)  # the full file layout

Modules: scene (layout: roads, buildings, trees, water, what changes), render (drawing, nuisances,
change labels), language (captions and task answers), dataset (records, files, command line).
"""

from .dataset import SyntheticPair, encode_png, generate_pair, main, touched_cells, write_dataset
from .language import GroundTruth, NO_CHANGE_CAPTIONS, count_answer, parse_count_answer

__all__ = [
    "GroundTruth",
    "NO_CHANGE_CAPTIONS",
    "SyntheticPair",
    "count_answer",
    "encode_png",
    "generate_pair",
    "main",
    "parse_count_answer",
    "touched_cells",
    "write_dataset",
]
