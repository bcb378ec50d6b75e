"""Input side: the processor's cost per pair (PNG decoding, resize/normalise, tokenisation), batched vs per pair.

    python benchmarks/bench_processor.py --config tiny [--batch-sizes 1 8 32] [--repeats 5]

Pairs are the six real LEVIR-CC 256x256 PNG pairs in ../shared (cycled to fill a batch); tokenizers are the
tests' fixture tokenizers (`tiny`) or Nano's (`nano`: SmolLM2 from the GGUF + MiniLM's BERT tokenizer, ~10 s
to load, not timed). Rows, in ms per pair:

- decode: `load_image(path)` for both images (PIL open + load);
- images: the image processor on decoded images (resize, rescale, normalise, stack);
- text (generation): `processor(text=prompts)` (LLM + Q-Former tokenisation, left padding);
- text (training): `processor(text=prompts, answers=answers)` (right padding + labels);
- processor, batched: `processor(images=paths, text=prompts)`, one call for the batch;
- processor, per pair: the same pairs, one call per pair (what a loop over samples costs).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO.parent / "shared" / "data" / "levir_cc" / "sample" / "images"
PROMPT = "q: what has changed between the two images? a: some buildings were built along the road  q: how many buildings"
ANSWER = "three new buildings appear in the lower left, next to a new road"


def sample_pairs() -> list[tuple[str, str]]:
    pairs = [(str(a), str(a.parent.parent / "B" / a.name)) for a in sorted(SAMPLE_IMAGES.glob("*/A/*.png"))]
    if not pairs:
        raise SystemExit(f"no sample pairs under {SAMPLE_IMAGES}")
    return pairs


def build_processor(config_name: str):
    if config_name == "tiny":
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import build_tiny_processor

        return build_tiny_processor()
    if config_name == "nano":
        from modeling_deltavlm.build_nano import NANO_IMAGE_SIZE, NANO_NUM_QUERY_TOKENS, load_nano_tokenizers
        from processing import DeltaVLMImageProcessor, DeltaVLMProcessor

        tokenizer, qformer_tokenizer = load_nano_tokenizers()
        image_processor = DeltaVLMImageProcessor(size={"height": NANO_IMAGE_SIZE, "width": NANO_IMAGE_SIZE})
        return DeltaVLMProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=NANO_NUM_QUERY_TOKENS,
                                 max_prompt_tokens=96)
    raise SystemExit("bench_processor supports --config tiny or nano")


def run(processor, config_name: str, args) -> tuple[dict, str]:
    from processing.image_processing_deltavlm import load_image

    pairs = sample_pairs()
    cases = {}
    for size in args.batch_sizes:
        batch = [pairs[i % len(pairs)] for i in range(size)]
        prompts = [PROMPT[: 40 + 7 * (i % 10)] for i in range(size)]
        answers = [ANSWER[: 20 + 5 * (i % 8)] for i in range(size)]
        decoded = [(load_image(a), load_image(b)) for a, b in batch]
        cases[size] = {
            "decode": lambda batch=batch: [(load_image(a), load_image(b)) for a, b in batch],
            "images": lambda decoded=decoded: processor.image_processor(decoded),
            "text (generation)": lambda prompts=prompts: processor(text=prompts),
            "text (training)": lambda prompts=prompts, answers=answers: processor(text=prompts, answers=answers),
            "processor, batched": lambda batch=batch, prompts=prompts: processor(images=batch, text=prompts),
            "processor, per pair": lambda batch=batch, prompts=prompts: [
                processor(images=[pair], text=[prompt]) for pair, prompt in zip(batch, prompts)
            ],
        }
    names = list(next(iter(cases.values())))
    runs = {size: {name: [] for name in names} for size in args.batch_sizes}
    for index in range(args.warmup + args.repeats):
        for size, fns in cases.items():
            for name, fn in fns.items():
                elapsed, _ = common.timed(fn)
                if index >= args.warmup:
                    runs[size][name].append(elapsed / size)
    summary = {str(size): {name: common.summarize(values) for name, values in r.items()} for size, r in runs.items()}
    rows = [[name] + [common.fmt(summary[str(size)][name], 1e3, 2) for size in args.batch_sizes] for name in names]
    table = common.markdown_table(["ms per pair"] + [f"batch {size}" for size in args.batch_sizes], rows)
    payload = {"benchmark": "processor", "config": config_name, "repeats": args.repeats, "warmup": args.warmup,
               "summary": summary}
    markdown = (
        f"Processor `{config_name}`, LEVIR-CC 256x256 PNG pairs -> {processor.image_processor.size}; "
        f"{args.repeats} runs after {args.warmup} warm-up, interleaved; ms per pair.\n\n{table}\n"
    )
    return payload, markdown


def main(argv=None):
    parser = common.base_parser(__doc__.splitlines()[0], default_config="tiny", default_repeats=5)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args(argv)
    common.setup(args)
    info = common.machine_info("cpu")
    processor = build_processor(args.config)
    payload, markdown = run(processor, args.config, args)
    payload["machine"] = info
    common.save(args.name or f"processor_{args.config}", payload, markdown, args.out)


if __name__ == "__main__":
    main()
