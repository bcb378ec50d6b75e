"""How much of a model's change map (`deltavlm predict --heatmap`) falls inside the true change mask.

For each pair with a mask: the fraction of the heat map's mass inside the mask, next to the mask's area
fraction (what a uniform map would score). Pairs: the test split of a `deltavlm synth` folder (changed pairs
only: an unchanged pair has an empty mask) and, with `--levircc`, the LEVIR-CC sample pairs that ship a mask.

    python benchmarks/bench_change_map.py --model ~/.cache/deltavlm/nano --data deltavlm-demo/data \
        --levircc ../shared/data/levir_cc/sample/images/train
"""

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import machine_info, markdown_table, save  # noqa: E402


def masked_pairs(image_dir: Path, limit: int) -> list[tuple[Path, Path, Path]]:
    pairs = []
    for mask_path in sorted((image_dir / "label").glob("*.png")):
        if np.asarray(Image.open(mask_path)).any():
            pairs.append((image_dir / "A" / mask_path.name, image_dir / "B" / mask_path.name, mask_path))
        if len(pairs) == limit:
            break
    return pairs


def measure(model, processor, pairs, method: str) -> list[dict]:
    from eval.change_map import change_map, mass_in_mask

    rows = []
    for before_path, after_path, mask_path in pairs:
        before, after = Image.open(before_path).convert("RGB"), Image.open(after_path).convert("RGB")
        mask = np.asarray(Image.open(mask_path))
        _, heat = change_map(model, processor, before, after, method=method)
        rows.append({"pair": before_path.name, "mass_in_mask": mass_in_mask(heat, mask), "mask_area": float((mask > 0).mean())})
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", help="a deltavlm synth folder (its images/test/{A,B,label})")
    parser.add_argument("--levircc", help="a LEVIR-CC image folder with A/, B/ and label/")
    parser.add_argument("--limit", type=int, default=50, help="changed synthetic test pairs to use")
    parser.add_argument("--method", default="difference", choices=["difference", "gate"])
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_deltavlm  # noqa: F401

    torch.set_num_threads(1)
    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    groups = {}
    if args.data:
        groups["synthetic test"] = measure(model, processor, masked_pairs(Path(args.data) / "images" / "test", args.limit), args.method)
    if args.levircc:
        groups["LEVIR-CC sample"] = measure(model, processor, masked_pairs(Path(args.levircc), args.limit), args.method)
    info = machine_info()
    table_rows = []
    for name, rows in groups.items():
        mass = [row["mass_in_mask"] for row in rows]
        area = [row["mask_area"] for row in rows]
        table_rows.append([name, len(rows), f"{statistics.mean(mass):.3f}", f"{statistics.mean(area):.3f}",
                           f"{statistics.mean(m / a for m, a in zip(mass, area)):.2f}x"])
    table = markdown_table(["pairs", "N", "mass in mask (mean)", "mask area (mean)", "ratio to uniform (mean)"], table_rows)
    markdown = f"Change-map mass inside the change mask. Model: `{args.model}`, method: {args.method}.\n\n{table}\n"
    save("change_map", {"machine": info, "model": args.model, "method": args.method, "groups": groups}, markdown, args.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
