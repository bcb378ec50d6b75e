"""Where does a trained model lose the 3x3-grid localization: in what the queries carry, or in how the language
model reads them?

    python benchmarks/bench_localization_reading.py --model DIR --data DIR [--limit 200] [--probe-pairs 1500]
        [--probe-steps 300] [--name localization_reading] [--out DIR] [--threads 2]

`--data` is a synthetic data set (`deltavlm synth`, or a demo's `data/`): its annotations (the
ChangeChat-105k layout) and its `images/` tree. Three measurements on one model:

1. **answers, held out**: `deltavlm eval --task localization` on `--limit` test records, greedy, no repetition
   penalty (Nano's decoding);
2. **answers, training records**: the same on `--limit` single-turn localization records of the training file.
   Equal scores on both say the language stage did not fit its own training answers (underfitting, not
   overfitting);
3. **what the queries carry**: a linear probe on the frozen Q-Former outputs (all queries flattened, the
   localization prompt as the Q-Former's instruction) fitted on `--probe-pairs` training pairs' 18
   (category, cell) facts and scored on the test pairs, overall and per cell. It bounds what a reader of the
   queries could get from them without changing the encoder. Micro-F1 over all pairs mostly rewards knowing
   *whether* a category changed (an unchanged pair's 18 noes); the **within-pair cell AUC** asks *where*: over the
   test pairs where a category changed in some but not all cells, how often the probe scores a changed cell of
   that category above an unchanged one (0.5: no idea where, 1: always right); both also for a probe on the
   queries' mean (what an attention that weighs the queries alike would pass on to the language model);
4. **what the patches carry**: the same two scores for a probe shared by the nine cells on the difference
   module's patch tokens (max and mean over each cell's patches of Z_B - Z_A, Z_A and Z_B; a patch belongs to
   the cell its centre lies in): the vision side's *where*, read with the position given;
5. **one cell at a time**: the model's yes/no answers to `train.data.CELL_QUESTION` ("has any building changed
   in the top-left cell of the 3x3 grid?"), one question about a changed and one about an unchanged cell of
   each category that changed in a test pair (balanced: 0.5 is chance), through `deltavlm eval --task binary`.

Per cell it also counts how often the answers name the cell, how often it is true and how often both: a reader
that ignores the image names the same few cells whatever the pair.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

CATEGORIES = ("roads", "buildings")
# the evaluation's decoding for Nano (its generation_config.json), spelled out so that a model without one is
# decoded the same way
DECODING = ["--num-beams", "1", "--repetition-penalty", "1.0", "--max-new-tokens", "48"]


def training_localization_records(annotations: Path, limit: int) -> list[dict]:
    """The first `limit` single-turn records of changechat_train.json whose question is the localization prompt."""
    from processing.conversation import task_of_question

    records = json.loads((annotations / "changechat_train.json").read_text())
    picked = [
        record for record in records
        if len(record["conversations"]) == 2 and task_of_question(record["conversations"][0]["value"]) == "localization"
    ]
    if not picked:
        raise ValueError(f"no single-turn localization record in {annotations / 'changechat_train.json'}")
    return picked[:limit]


def answer(model: str, annotations: Path, image_root: Path, split: str, limit: int, out: Path,
           task: str = "localization") -> list[dict]:
    """Greedy answers to `task` records through `deltavlm eval`; returns its prediction lines."""
    from eval.run_eval import main as eval_main

    code = eval_main(["--model", model, "--data", str(annotations), "--image-root", str(image_root), "--split", split,
                      "--task", task, "--limit", str(limit), "--no-meteor", "--batch-size", "16",
                      *DECODING, "--out", str(out)])
    if code:
        raise RuntimeError(f"deltavlm eval failed on the {split} {task} records (exit code {code})")
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]


def answer_statistics(lines: list[dict]) -> dict:
    """Micro-F1 per category, distinct answers, and per cell: answers naming it, true, both."""
    from eval.metrics import localization_metrics
    from eval.parsers import parse_localization
    from processing.conversation import GRID_CELLS

    named, true, both = Counter(), Counter(), Counter()
    predictions = [parse_localization(line["prediction"]) for line in lines]
    references = [parse_localization(line["references"][0]) for line in lines]
    for predicted, reference in zip(predictions, references):
        predicted = predicted or {category: [] for category in CATEGORIES}
        for category in CATEGORIES:
            for cell in predicted[category]:
                named[category, cell] += 1
            for cell in reference[category]:
                true[category, cell] += 1
            for cell in set(predicted[category]) & set(reference[category]):
                both[category, cell] += 1
    # the evaluation's own scores (x100), as fractions like the probe's
    scores = localization_metrics(predictions, references)
    f1 = {category: round(scores[category]["f1"] / 100, 3) for category in CATEGORIES}
    cells = {
        category: {cell: {"named": named[category, cell], "true": true[category, cell], "both": both[category, cell]}
                   for cell in GRID_CELLS}
        for category in CATEGORIES
    }
    return {"records": len(lines), "micro_f1": f1, "distinct_answers": len({line["prediction"] for line in lines}),
            "cells": cells}


def _f1(hits: int, predicted: int, true: int) -> float:
    return round(2 * hits / max(1, predicted + true), 3)


@torch.no_grad()
def query_features(model, processor, pairs: list[tuple[str, str]], batch_size: int = 32) -> torch.Tensor:
    """(N, Q * Hq) Q-Former outputs for the pairs under the localization prompt."""
    from processing.conversation import TASK_PROMPTS

    prompt = processor.apply_chat_template([{"role": "user", "content": TASK_PROMPTS["localization"]}])
    features = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        inputs = processor(images=batch, text=[prompt] * len(batch))
        output = model.get_image_features(
            pixel_values=inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        )
        features.append(output.query_output.flatten(1).float())
    return torch.cat(features)


@torch.no_grad()
def soft_prompt_statistics(model, query_features: torch.Tensor) -> dict:
    """What the language model receives, from `query_features` (N, Q * Hq) (their projection, the soft prompt)
    beside its own token embeddings: mean norms, and the share of the soft prompt's energy that is the same for
    every pair."""
    queries = query_features.reshape(len(query_features), model.config.num_query_tokens, -1)
    projected = model.language_projection(queries.to(model.language_projection.weight.dtype)).float()  # (N, Q, H)
    flat = projected.flatten(1)
    return {
        "soft_prompt_norm": round(projected.norm(dim=-1).mean().item(), 3),
        "token_embedding_norm": round(model.get_input_embeddings().weight.float().norm(dim=-1).mean().item(), 3),
        "share_common_to_all_pairs": round((flat.mean(0).pow(2).sum() / flat.pow(2).sum(1).mean()).item(), 3),
    }


def labelled_pairs(annotations: Path, image_root: Path, split: str, limit: int) -> tuple[list, torch.Tensor]:
    """Up to `limit` (before, after) pairs of a split whose records state the cells, and their (N, 18) cells."""
    from train.vision_warmup import pair_facts

    facts = pair_facts(annotations / f"changechat_{split}.json", image_root)
    pairs, cells = [], []
    for before, pair in facts.items():
        if "cells" in pair:
            before = Path(before)  # images/<split>/A/NAME -> images/<split>/B/NAME
            pairs.append((str(before), str(before.parent.parent / "B" / before.name)))
            cells.append(pair["cells"])
        if len(pairs) == limit:
            break
    if not pairs:
        raise ValueError(f"no pair of {annotations / f'changechat_{split}.json'} states its changed cells")
    return pairs, torch.tensor(cells)


def fit_linear_probe(train_x, train_y, test_x, steps: int, seed: int = 0):
    """A linear probe (..., F) -> (..., C) fitted with Adam on standardised inputs (statistics over all but the last
    dimension of `train_x`), positives weighted 2x (changes are rare). Returns it and the standardised inputs."""
    torch.manual_seed(seed)
    flat = train_x.flatten(0, -2)
    mean, std = flat.mean(0), flat.std(0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    probe = torch.nn.Linear(train_x.shape[-1], train_y.shape[-1])
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-3, weight_decay=1e-3)
    weight = torch.full((train_y.shape[-1],), 2.0)
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            torch.nn.functional.binary_cross_entropy_with_logits(probe(train_x), train_y, pos_weight=weight).backward()
            optimizer.step()
    return probe, train_x, test_x


def probe_scores(train_x, train_y, test_x, test_y, steps: int, seed: int = 0) -> dict:
    """Fit a linear probe (standardised inputs, changed cells weighted 2x) and score micro-F1 and per-cell F1."""
    from processing.conversation import GRID_CELLS

    probe, train_x, test_x = fit_linear_probe(train_x, train_y, test_x, steps, seed)
    scores = {}
    for name, x, y in (("train", train_x, train_y), ("held_out", test_x, test_y)):
        predicted, true = probe(x) > 0, y.bool()
        scores[f"{name}_micro_f1"] = _f1((predicted & true).sum().item(), predicted.sum().item(), true.sum().item())
    with torch.no_grad():
        test_scores = probe(test_x)
    scores["held_out_within_pair_auc"] = within_pair_auc(test_scores, test_y)
    predicted, true = test_scores > 0, test_y.bool()
    scores["held_out_cell_f1"] = {
        category: {cell: _f1((predicted[:, 9 * k + j] & true[:, 9 * k + j]).sum().item(),
                             predicted[:, 9 * k + j].sum().item(), true[:, 9 * k + j].sum().item())
                   for j, cell in enumerate(GRID_CELLS)}
        for k, category in enumerate(CATEGORIES)
    }
    return scores


def within_pair_auc(scores: torch.Tensor, cells: torch.Tensor) -> dict:
    """scores, cells (N, 18) in (roads' 9 cells, buildings' 9 cells) order -> per category the mean, over the pairs
    where that category changed in some but not all cells, of P(score of a changed cell > score of an unchanged
    one) (ties count half), and how many pairs that is."""
    result = {}
    for k, category in enumerate(CATEGORIES):
        values = []
        for row_scores, row_cells in zip(scores[:, 9 * k : 9 * k + 9], cells[:, 9 * k : 9 * k + 9].bool()):
            if 0 < row_cells.sum() < 9:
                above = row_scores[row_cells][:, None] - row_scores[~row_cells][None, :]
                values.append(((above > 0).float() + 0.5 * (above == 0).float()).mean().item())
        result[category] = {"auc": round(sum(values) / len(values), 3) if values else None, "pairs": len(values)}
    return result


def cell_patches(grid: int) -> list[torch.Tensor]:
    """For each of the 9 cells (row-major), the indices of the patches of a grid x grid patch grid whose centre lies
    in it; a cell that no centre falls in (grids under 3x3) takes the patches that overlap it."""
    centre_band = [(2 * p + 1) * 3 // (2 * grid) for p in range(grid)]  # row/column of patches -> band 0..2
    members = []
    for cell in range(9):
        bands = [[p for p in range(grid) if centre_band[p] == band] or
                 [p for p in range(grid) if p * 3 < (band + 1) * grid and (p + 1) * 3 > band * grid]
                 for band in divmod(cell, 3)]
        members.append(torch.tensor([r * grid + c for r in bands[0] for c in bands[1]]))
    return members


@torch.no_grad()
def patch_cell_features(model, processor, pairs: list[tuple[str, str]], batch_size: int = 32) -> torch.Tensor:
    """(N, 9, 6D) per grid cell: max and mean over the cell's patches of the difference module's Z_B - Z_A, Z_A and
    Z_B (each image's first token, the class token, left out); a patch belongs to the cell its centre lies in
    (`cell_patches`)."""
    features = []
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        inputs = processor(images=batch, text=[""] * len(batch))
        pair_embeds = model.get_pair_embeds(inputs["pixel_values"]).pair_embeds.float()  # (B, 2S, D)
        tokens = pair_embeds.shape[1] // 2
        grid = math.isqrt(tokens - 1)
        if grid * grid != tokens - 1:
            raise ValueError(f"expected a class token and a square patch grid per image, got {tokens} tokens")
        before, after = pair_embeds[:, 1:tokens], pair_embeds[:, tokens + 1 :]
        patches = torch.cat([after - before, before, after], dim=-1)  # (B, grid*grid, 3D)
        members = cell_patches(grid)
        pooled = [torch.cat([patches[:, index].amax(1), patches[:, index].mean(1)], -1) for index in members]
        features.append(torch.stack(pooled, dim=1))
    return torch.cat(features)


def patch_probe_scores(train_x, train_y, test_x, test_y, steps: int, seed: int = 0) -> dict:
    """A linear probe shared by the nine cells ((N, 9, F) -> roads / buildings changed there), standardised inputs,
    changed cells weighted 2x: held-out micro-F1 and within-pair cell AUC."""
    per_cell = torch.stack([train_y[:, :9], train_y[:, 9:]], dim=-1).float()  # (N, 18) -> (N, 9, 2)
    probe, _, test_x = fit_linear_probe(train_x, per_cell, test_x, steps, seed)
    with torch.no_grad():
        logits = probe(test_x)  # (N, 9, 2)
    scores = torch.cat([logits[..., 0], logits[..., 1]], dim=1)  # back to (N, 18)
    predicted, true = scores > 0, test_y.bool()
    return {"held_out_micro_f1": _f1((predicted & true).sum().item(), predicted.sum().item(), true.sum().item()),
            "within_pair_auc": within_pair_auc(scores, test_y)}


def cell_question_records(annotations: Path, limit: int, seed: int = 0) -> list[dict]:
    """Balanced single-cell yes/no records (instruction schema) from the first `limit` test localization records:
    for each category that changed in a pair, one question about a changed cell and, unless all nine changed, one
    about an unchanged cell."""
    import random

    from eval.parsers import parse_localization
    from processing.conversation import GRID_CELLS

    rng = random.Random(seed)
    records = []
    for record in json.loads((annotations / "changechat_test_loc.json").read_text())[:limit]:
        cells = parse_localization(record["conversations"][1]["value"])
        for category, noun in (("roads", "road"), ("buildings", "building")):
            changed = cells[category] if cells else []
            if not changed:
                continue
            unchanged = [cell for cell in GRID_CELLS if cell not in changed]
            for answer, pool in (("Yes", changed), ("No", unchanged)):
                if pool:
                    records.append(cell_question_record(record, noun, rng.choice(pool), answer))
    return records


def cell_question_record(record: dict, noun: str, cell: str, answer: str) -> dict:
    """A one-cell yes/no record (instruction schema) about the pair of `record`."""
    from train.data import CELL_QUESTION

    question = "<image> <image> " + CELL_QUESTION.format(category=noun, cell=cell)
    return {"id": f"{record['id']}_{noun}_{cell}", "image": record["image"], "conversations": [
        {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def cell_question_statistics(lines: list[dict]) -> dict:
    """Accuracy of the yes/no answers, and the (truth, answer) counts."""
    from eval.parsers import parse_binary

    pairs = Counter()
    for line in lines:
        truth, said = parse_binary(line["references"][0]), parse_binary(line["prediction"])
        pairs[f"{'yes' if truth else 'no'} answered {'unparsed' if said is None else 'yes' if said else 'no'}"] += 1
    right = pairs["yes answered yes"] + pairs["no answered no"]
    return {"questions": len(lines), "accuracy": round(right / max(1, len(lines)), 3), "answers": dict(pairs)}


def markdown(payload: dict) -> str:
    from processing.conversation import GRID_CELLS

    held_out, training, probe = payload["answers_held_out"], payload["answers_training"], payload["probe"]
    rows = [
        ["answers, held-out test records", held_out["records"], held_out["micro_f1"]["roads"],
         held_out["micro_f1"]["buildings"], held_out["distinct_answers"]],
        ["answers, training records", training["records"], training["micro_f1"]["roads"],
         training["micro_f1"]["buildings"], training["distinct_answers"]],
    ]
    text = common.markdown_table(["localization", "records", "micro-F1 roads", "micro-F1 buildings",
                                  "distinct answers"], rows)
    text += (f"\n\nLinear probe on the frozen queries (all 18 cells): micro-F1 {probe['train_micro_f1']} on its "
             f"{payload['probe_pairs']['train']} training pairs, **{probe['held_out_micro_f1']}** on "
             f"{payload['probe_pairs']['held_out']} held-out test pairs.\n\n")
    auc_rows = [[reader, *(f"{side[c]['auc']} ({side[c]['pairs']} pairs)" for c in CATEGORIES), f1]
                for reader, side, f1 in (
                    ("probe on the queries", probe["held_out_within_pair_auc"], probe["held_out_micro_f1"]),
                    ("probe on the queries' mean", payload["mean_query_probe"]["held_out_within_pair_auc"],
                     payload["mean_query_probe"]["held_out_micro_f1"]),
                    ("probe on the patches (shared by the cells)", payload["patch_probe"]["within_pair_auc"],
                     payload["patch_probe"]["held_out_micro_f1"]))]
    text += "Where, not whether (held out; 0.5: no idea where):\n\n" + common.markdown_table(
        ["reader", "within-pair cell AUC roads", "within-pair cell AUC buildings", "micro-F1"], auc_rows)
    prompt = payload["soft_prompt"]
    text += (f"\n\nThe language model's input (held-out pairs, localization prompt): soft-prompt vectors of mean norm "
             f"{prompt['soft_prompt_norm']} against {prompt['token_embedding_norm']} for its token embeddings; "
             f"{prompt['share_common_to_all_pairs']} of the soft prompt's energy is the same for every pair.")
    questions = payload["cell_questions"]
    text += (f"\n\nOne cell at a time (balanced yes/no, chance 0.5): the model answers **{questions['accuracy']}** "
             f"of {questions['questions']} right; {questions['answers']}.\n\n")
    cell_rows = []
    for category in CATEGORIES:
        for cell in GRID_CELLS:
            counts = held_out["cells"][category][cell]
            cell_rows.append([category, cell, counts["named"], counts["true"], counts["both"],
                              probe["held_out_cell_f1"][category][cell]])
    text += common.markdown_table(["category", "cell", "answers naming it", "true", "both", "probe F1 (held out)"],
                                  cell_rows)
    return text + f"\n\nModel: `{payload['model']}`; data: `{payload['data']}`.\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained DeltaVLM folder (e.g. a demo's model/)")
    parser.add_argument("--data", required=True, help="synthetic data folder (annotations/ and images/)")
    parser.add_argument("--limit", type=int, default=200, help="localization records answered per split")
    parser.add_argument("--probe-pairs", type=int, default=1500, help="training pairs the probe is fitted on")
    parser.add_argument("--probe-steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="localization_reading", help="results file stem")
    args = parser.parse_args(argv)
    data = Path(args.data)
    annotations, image_root = data / "annotations", data / "images"
    for path in (annotations / "changechat_train.json", annotations / "changechat_test_loc.json", image_root):
        if not path.exists():
            parser.error(f"--data {data}: {path} not found (expected a synthetic data set: deltavlm synth --out DIR)")
    if not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: no config.json there")
    torch.set_num_threads(args.threads)
    info = common.machine_info()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        held_out = answer(args.model, annotations, image_root, "test", args.limit, scratch / "test")
        training_dir = scratch / "training_records"
        training_dir.mkdir()
        (training_dir / "changechat_train_loc.json").write_text(
            json.dumps(training_localization_records(annotations, args.limit)))
        training = answer(args.model, training_dir, image_root, "train", args.limit, scratch / "train")
        questions_dir = scratch / "cell_questions"
        questions_dir.mkdir()
        questions = cell_question_records(annotations, args.limit)
        (questions_dir / "changechat_test_binary.json").write_text(json.dumps(questions))
        cell_answers = answer(args.model, questions_dir, image_root, "test", max(1, len(questions)),
                              scratch / "cell_answers", task="binary") if questions else []

    import modeling_deltavlm  # noqa: F401  (Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(args.model).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    train_pairs, train_cells = labelled_pairs(annotations, image_root, "train", args.probe_pairs)
    test_pairs, test_cells = labelled_pairs(annotations, image_root, "test", args.limit)
    train_queries, test_queries = query_features(model, processor, train_pairs), query_features(model, processor, test_pairs)
    probe = probe_scores(train_queries, train_cells, test_queries, test_cells, args.probe_steps)
    # the queries' mean: what an attention that weighs the 16 queries alike would pass on
    mean_of_queries = [features.reshape(len(features), model.config.num_query_tokens, -1).mean(1)
                       for features in (train_queries, test_queries)]
    mean_probe = probe_scores(mean_of_queries[0], train_cells, mean_of_queries[1], test_cells, args.probe_steps)
    patches = patch_probe_scores(patch_cell_features(model, processor, train_pairs), train_cells,
                                 patch_cell_features(model, processor, test_pairs), test_cells, args.probe_steps)

    payload = {
        "model": str(args.model), "data": str(data), "machine": info,
        "answers_held_out": answer_statistics(held_out), "answers_training": answer_statistics(training),
        "probe": probe, "probe_pairs": {"train": len(train_pairs), "held_out": len(test_pairs)},
        "mean_query_probe": mean_probe, "patch_probe": patches,
        "soft_prompt": soft_prompt_statistics(model, test_queries), "cell_questions": cell_question_statistics(cell_answers),
    }
    common.save(args.name, payload, markdown(payload), args.out)


if __name__ == "__main__":
    main()
