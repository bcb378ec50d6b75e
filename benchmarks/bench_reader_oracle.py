"""Can the language stage learn cell lists from a soft prompt that states them plainly? An oracle code on the queries.

    python benchmarks/bench_reader_oracle.py --model DIR --data DIR [--scales 0 1] [--steps 72]
        [--learning-rate 1e-3] [--limit 120] [--seed 5] [--out DIR] [--name reader_oracle] [--threads 2]

`--model` is a trained Nano (a demo's `model-mixed/`), `--data` its synthetic data set. For each scale S a
localization-only tail (the demo's tail config: LoRA on the merged model, batch 16, `--steps` steps) trains from the
model while every pair's query outputs carry its true cells: to the Q-Former's output of a pair, each of the 18
(category, cell) facts that holds adds a fixed random direction (one per fact and query, unit length) times S times
that query's own norm. Then it answers the first `--limit` test localization records under the same code, scored
as `deltavlm eval` scores them (micro-F1 roads / buildings) with the number of distinct answers. S = 0 is the
plain tail. The code is linear, strong and the same for every pair: if the reader learns the lists from it in as
many steps as the real tails get, what keeps Nano's answers to stock lists is the queries' signal; if it does not,
it is how fast SmolLM2-135M with LoRA learns to read any soft prompt.

The pairs are told apart by their processed before image (the same processor in training and evaluation), so a
pair the table lacks fails by name rather than getting no code.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402
from benchmarks.bench_localization_reading import answer, answer_statistics  # noqa: E402
from benchmarks.bench_reader_tail import LOCALIZATION_ONLY, check_model_and_data  # noqa: E402


def pair_key(pixel_values: torch.Tensor) -> str:
    """(2, C, H, W) processed pair -> a key from its before image (every 8th pixel, to 1e-2)."""
    sample = torch.round(pixel_values[0, :, ::8, ::8].float() * 100).to(torch.int32)
    return hashlib.sha1(sample.numpy().tobytes()).hexdigest()


def cell_facts(answer_text: str) -> torch.Tensor | None:
    """A localization answer -> (18,) 0/1: roads' nine cells, then buildings' (GRID_CELLS order); None unparsed."""
    from eval.parsers import parse_localization
    from processing.conversation import GRID_CELLS

    cells = parse_localization(answer_text)
    if cells is None:
        return None
    return torch.tensor([float(cell in cells[category]) for category in ("roads", "buildings") for cell in GRID_CELLS])


def oracle_table(image_processor, data: Path, limit: int) -> dict[str, torch.Tensor]:
    """Key of each pair -> its cell facts, for the training localization records and the first `limit` test ones."""
    annotations = data / "annotations"
    records = [r for r in json.loads((annotations / "changechat_train.json").read_text()) if r["id"].endswith("_loc")]
    records += json.loads((annotations / "changechat_test_loc.json").read_text())[:limit]
    table = {}
    for record in records:
        facts = cell_facts(record["conversations"][1]["value"])
        if facts is None:
            raise ValueError(f"record {record['id']}: its localization answer does not parse")
        before, after = (str(data / "images" / path) for path in record["image"])
        pixel_values = image_processor([(before, after)])["pixel_values"][0]
        table[pair_key(pixel_values)] = facts
    return table


@contextlib.contextmanager
def oracle_code(table: dict[str, torch.Tensor], scale: float, num_queries: int, width: int, seed: int = 0):
    """While active, every DeltaVLM's soft prompt is projected from query outputs that carry the pair's cells."""
    if scale == 0:
        yield
        return
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(18, num_queries, width, generator=generator)
    directions = directions / directions.norm(dim=-1, keepdim=True)  # (18, Q, Hq), unit length per fact and query
    original_features = DeltaVLMForConditionalGeneration.get_image_features
    original_pair_embeds = DeltaVLMForConditionalGeneration.get_pair_embeds
    # `deltavlm eval` runs the vision side once a batch and hands the Q-Former copies of its pair_embeds: their
    # facts are looked up by the exact values, recorded when the pixels were seen
    by_embeds = {}

    def embeds_key(pair_embeds: torch.Tensor) -> str:
        return hashlib.sha1(pair_embeds.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()

    def pair_embeds_recorded(self, pixel_values, *args, **kwargs):
        output = original_pair_embeds(self, pixel_values, *args, **kwargs)
        for pair, embeds in zip(pixel_values.detach().cpu(), output.pair_embeds):
            if (facts := table.get(pair_key(pair))) is not None:
                by_embeds[embeds_key(embeds)] = facts
        return output

    def with_code(self, pixel_values=None, *args, **kwargs):
        features = original_features(self, pixel_values, *args, **kwargs)
        if pixel_values is not None:
            found = [table.get(pair_key(pair)) for pair in pixel_values.detach().cpu()]
        else:
            found = [by_embeds.get(embeds_key(embeds)) for embeds in features.vision_outputs.pair_embeds]
        missing = sum(facts is None for facts in found)
        if missing:
            raise KeyError(f"{missing} pair(s) of the batch are not in the oracle's table")
        facts = torch.stack(found).to(features.query_output)  # (B, 18)
        queries = features.query_output  # (B, Q, Hq)
        code = torch.einsum("bk,kqh->bqh", facts, directions.to(queries))
        queries = queries + scale * queries.norm(dim=-1, keepdim=True).detach() * code
        features.query_output = queries
        features.pooler_output = self.language_projection(queries)
        return features

    DeltaVLMForConditionalGeneration.get_image_features = with_code
    DeltaVLMForConditionalGeneration.get_pair_embeds = pair_embeds_recorded
    try:
        yield
    finally:
        DeltaVLMForConditionalGeneration.get_image_features = original_features
        DeltaVLMForConditionalGeneration.get_pair_embeds = original_pair_embeds


def run_scale(scale: float, args, table: dict, config, scratch: Path) -> dict:
    from train.demo import _write_train_config
    from train.run_train import main as train_main

    data = Path(args.data)
    model_out = scratch / "model"
    train_config = _write_train_config(scratch, Path(args.model), data, model_out, max_steps=args.steps,
                                       seed=args.seed, task_weights=LOCALIZATION_ONLY, name="tail")
    with oracle_code(table, scale, config.num_query_tokens, config.qformer_config.hidden_size, seed=args.seed):
        code = train_main(["--config", str(train_config), "--learning_rate", str(args.learning_rate)])
        if code:
            raise RuntimeError(f"scale {scale:g}: training failed (exit code {code})")
        lines = answer(str(model_out), data / "annotations", data / "images", "test", args.limit, scratch / "answers")
    stats = answer_statistics(lines)
    return {"micro_f1": stats["micro_f1"], "distinct_answers": stats["distinct_answers"], "records": stats["records"]}


def markdown(payload: dict) -> str:
    rows = [[f"{float(scale):g}", result["micro_f1"]["roads"], result["micro_f1"]["buildings"],
             result["distinct_answers"], result["records"]] for scale, result in payload["scales"].items()]
    table = common.markdown_table(["code scale (0: none)", "localization F1 roads", "buildings", "distinct answers",
                                   "test records"], rows)
    return (table + f"\n\nTail: {payload['steps']} localization-only steps at batch 16, lr {payload['learning_rate']}, "
            f"seed {payload['seed']}, greedy answers. Model: `{payload['model']}`; data: `{payload['data']}`.\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a trained Nano folder (a demo's model-mixed/)")
    parser.add_argument("--data", required=True, help="its synthetic data folder (annotations/ and images/)")
    parser.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0],
                        help="the code's length against each query's norm (0: the plain tail)")
    parser.add_argument("--steps", type=int, default=72)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--limit", type=int, default=120, help="test localization records to answer")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="reader_oracle", help="results file stem")
    args = parser.parse_args(argv)
    data = check_model_and_data(parser, args)
    if args.steps < 1 or args.limit < 1:
        parser.error("--steps and --limit must be >= 1")
    if any(scale < 0 for scale in args.scales):
        parser.error(f"--scales must be >= 0, got {args.scales}")
    torch.set_num_threads(args.threads)
    info = common.machine_info()

    import modeling_deltavlm  # noqa: F401  (Auto classes)
    from transformers import AutoConfig, AutoProcessor

    config = AutoConfig.from_pretrained(args.model)
    processor = AutoProcessor.from_pretrained(args.model)
    table = oracle_table(processor.image_processor, data, args.limit)
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for scale in args.scales:
            scale_dir = Path(scratch) / f"scale{scale:g}"
            scale_dir.mkdir()
            results[f"{scale:g}"] = run_scale(scale, args, table, config, scale_dir)
            print(f"scale {scale:g}: {results[f'{scale:g}']}", flush=True)
    payload = {"model": str(args.model), "data": str(data), "machine": info, "steps": args.steps,
               "learning_rate": args.learning_rate, "seed": args.seed, "pairs_in_table": len(table),
               "scales": results}
    common.save(args.name, payload, markdown(payload), args.out)


if __name__ == "__main__":
    main()
