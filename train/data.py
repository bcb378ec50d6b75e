"""Training and validation data: ChangeChat-105k files and LEVIR-CC captions -> (images, prompt, answer) samples.

Records come from `processing.changechat_data.load_records` (one record per image pair and dialogue). Training
samples are strings only; images stay paths until the collator opens them, so a 100k-sample data set costs
nothing to build.

- Dialogues: one sample per round, as the authors trained (`expand_rounds`: earlier answers are the ground truth).
- Caption records (LEVIR-CC, ChangeChat caption files) carry five references: with `captions_per_pair="all"`
  (default) each reference is one sample, so an epoch sees every caption once and the data order is a
  plain, resumable permutation; "first" keeps one sample per pair.
- Templates: "deltavlm" renders prompts as the released checkpoint saw them ("q: Q1 a: A1  q: Q2", lowercased,
  punctuation dropped, the last 50 words kept) and normalises answers the same way (first 50 words kept, as the
  authors' `blip_caption` did); "plain" uses the current question and the answer verbatim, which is what the
  processor's `prompt_format="plain"` renders at inference.
"""

import json
import logging
import math
import warnings
from collections import Counter

import datasets
import numpy as np

from processing.changechat_data import TASKS, load_records, missing_images
from processing.conversation import GRID_CELLS, MAX_PROMPT_WORDS, TASK_PROMPTS, expand_rounds, normalize_text

logger = logging.getLogger(__name__)

SAMPLE_FEATURES = datasets.Features(
    {
        "id": datasets.Value("string"),
        "task": datasets.Value("string"),
        "image_before": datasets.Value("string"),
        "image_after": datasets.Value("string"),
        "prompt": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "index": datasets.Value("int64"),  # row number: the augmentation's per-sample seed
        # characters of prompt + answer: what `train_sampling_strategy: group_by_length` sorts by (DeltaVLMTrainer)
        "length": datasets.Value("int64"),
    }
)
MAX_ANSWER_WORDS = 50  # blip_caption's max_words, applied by the authors to the targets as well


def load_train_records(data_args) -> datasets.Dataset:
    """All training annotation sources -> one record set, validated before any model is loaded."""
    parts = []
    if data_args.train_files and data_args.image_root is None:
        raise ValueError("data.image_root is required with data.train_files")
    for path in data_args.train_files:
        parts.append(load_records(path, data_args.image_root))
    if data_args.levircc_captions is not None and data_args.levircc_train_split is not None:
        parts.append(load_records(data_args.levircc_captions, _levircc_root(data_args), split=data_args.levircc_train_split))
    if not parts:
        raise ValueError("no training data: set data.train_files and/or data.levircc_captions")
    records = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    check_answers(records)
    return check_images(records, skip_missing=data_args.skip_missing_images, what="training")


def load_val_records(data_args) -> datasets.Dataset | None:
    """LEVIR-CC's validation split (caption records with five references), or None when not configured."""
    if data_args.val_split is None:
        return None
    if data_args.levircc_captions is None:
        raise ValueError(f"data.val_split={data_args.val_split!r} needs data.levircc_captions (or set val_split: null)")
    records = load_records(data_args.levircc_captions, _levircc_root(data_args), split=data_args.val_split)
    if data_args.val_max_samples is not None:
        records = records.select(range(min(data_args.val_max_samples, len(records))))
    return check_images(records, skip_missing=data_args.skip_missing_images, what="validation")


def check_answers(records: datasets.Dataset) -> None:
    """Every round needs a non-empty answer: a dialogue ending in a question cannot be trained on."""
    bad = [
        record_id
        for record_id, questions, answers in zip(records["id"], records["questions"], records["answers"])
        if not answers or len(answers) != len(questions) or any(not a.strip() for a in answers)
    ]
    if bad:
        raise ValueError(f"{len(bad)} record(s) have a question without an answer (first ids: {bad[:10]})")


def check_images(records: datasets.Dataset, skip_missing: bool, what: str) -> datasets.Dataset:
    """Fail listing the missing image files, or (skip_missing) drop the records that use them and say how many."""
    missing = missing_images(records)
    if not missing:
        return records
    if not skip_missing:
        listed = "\n  ".join(missing[:20]) + ("\n  ..." if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} {what} image file(s) not found or not readable as images (set data.skip_missing_images "
            f"to drop their records):\n  {listed}"
        )
    missing = set(missing)
    keep = [
        i
        for i, (before, after) in enumerate(zip(records["image_before"], records["image_after"]))
        if before not in missing and after not in missing
    ]
    logger.warning("%s: skipped %d of %d records whose images are missing", what, len(records) - len(keep), len(records))
    if not keep:
        raise FileNotFoundError(f"no {what} record has both of its images on disk")
    return records.select(keep)


def render_sample(question_rounds: list[tuple[str, str]], template: str) -> list[tuple[str, str]]:
    """The (prompt, answer) training pairs of one dialogue, one per round."""
    if template == "plain":
        return [(question, answer.strip()) for question, answer in question_rounds]
    if template != "deltavlm":
        raise ValueError(f"template must be 'deltavlm' or 'plain', got {template!r}")
    return [
        (
            normalize_text(prompt, max_words=MAX_PROMPT_WORDS, truncation_side="left"),
            normalize_text(answer, max_words=MAX_ANSWER_WORDS, truncation_side="right"),
        )
        for prompt, answer in expand_rounds(question_rounds)
    ]


def caption_prompt(template: str) -> str:
    """The validation prompt (LEVIR-CC captioning) in a template."""
    return render_sample([(TASK_PROMPTS["caption"], "-")], template)[0][0]


def records_to_samples(records: datasets.Dataset, template: str = "deltavlm", captions_per_pair: str = "all") -> datasets.Dataset:
    """Records -> flat training samples (SAMPLE_FEATURES), images still as paths."""
    if captions_per_pair not in ("all", "first"):
        raise ValueError(f"captions_per_pair must be 'all' or 'first', got {captions_per_pair!r}")

    def expand(batch):
        out = {name: [] for name in SAMPLE_FEATURES}
        for i, record_id in enumerate(batch["id"]):
            questions, answers, references = batch["questions"][i], batch["answers"][i], batch["references"][i]
            if batch["task"][i] == "caption" and len(questions) == 1 and captions_per_pair == "all" and references:
                rounds_list = [[(questions[0], reference)] for reference in references]
            else:
                rounds_list = [list(zip(questions, answers))]
            for rounds in rounds_list:
                for prompt, answer in render_sample(rounds, template):
                    out["id"].append(record_id)
                    out["task"].append(batch["task"][i])
                    out["image_before"].append(batch["image_before"][i])
                    out["image_after"].append(batch["image_after"][i])
                    out["prompt"].append(prompt)
                    out["answer"].append(answer)
                    out["length"].append(len(prompt) + len(answer))
        out["index"] = [0] * len(out["id"])  # filled below, once rows from all batches are in place
        return out

    with warnings.catch_warnings(record=True) as caught:  # one truncation warning per long prompt: count them instead
        warnings.simplefilter("always")
        samples = records.map(
            expand, batched=True, remove_columns=records.column_names, features=SAMPLE_FEATURES, load_from_cache_file=False
        )
    if caught:
        logger.info("%d prompts/answers were truncated to %d words", len(caught), MAX_PROMPT_WORDS)
    return samples.map(lambda _, i: {"index": i}, with_indices=True, features=SAMPLE_FEATURES)


def swap_closing_round_images(samples: datasets.Dataset, share: float, seed: int = 0) -> datasets.Dataset:
    """Train a `share` of the dialogues' closing rounds on another dialogue's images (one draw per closing round
    from `seed`, so a run and its resumption agree).

    A closing round's prompt carries the conversation so far (the earlier rounds' true answers: changed or not,
    how many roads and buildings), and in the data the images always agree with it, so a short run learns to
    answer from the images alone and contradicts the conversation whenever the images are misread (an unchanged
    pair described as changed after "no"). With the images of another pair the conversation is the only reliable
    cue for whether and what changed. The closing round is the last of a dialogue's samples (they are contiguous).
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"data.dialogue_image_swap must lie in [0, 1], got {share!r}")
    if share == 0.0:
        return samples
    ids, tasks = samples["id"], samples["task"]
    closing = [i for i, task in enumerate(tasks) if task == "dialogue" and (i + 1 == len(ids) or ids[i + 1] != ids[i])]
    if len(closing) < 2:
        return samples
    rng = np.random.default_rng(seed)
    chosen = [i for i, draw in zip(closing, rng.random(len(closing))) if draw < share]
    # each chosen round takes the images of a different closing round (a random one, never its own)
    offsets = rng.integers(1, len(closing), size=len(chosen))
    position = {index: k for k, index in enumerate(closing)}
    donors = {i: closing[(position[i] + offset) % len(closing)] for i, offset in zip(chosen, offsets)}
    before, after = samples["image_before"], samples["image_after"]
    logger.info("data.dialogue_image_swap %g: %d of %d dialogues' closing rounds on another dialogue's images",
                share, len(donors), len(closing))

    def swap(row, i):
        if i in donors:
            return {"image_before": before[donors[i]], "image_after": after[donors[i]]}
        return {}

    return samples.map(swap, with_indices=True, features=SAMPLE_FEATURES, load_from_cache_file=False)


CELL_QUESTION = "Has any {category} changed in the {cell} cell of the 3x3 grid? Please answer yes or no."


def add_cell_questions(samples: datasets.Dataset, per_category: int, template: str = "deltavlm",
                       seed: int = 0) -> datasets.Dataset:
    """Derive `per_category` yes/no questions per category (roads, buildings) from each localization sample ("has
    any building changed in the top-left cell of the 3x3 grid?"), answered from that sample's own cell lists. The
    cell asked about is one the answer lists with probability 1/2 (when it lists any), else one it does not
    (one draw per question from `seed`). The new samples are tagged "localization", so `task_weights` apply to them.

    Why: a localization answer is a list in which every cell is a decision; trained only on the lists, a short
    language stage answers with a few stock lists (docs/nano_experiments.md). A question about one cell is one such
    decision on its own, the kind of yes/no the language stage learns fastest.
    """
    if per_category < 0:
        raise ValueError(f"data.localization_cell_questions must be >= 0, got {per_category!r}")
    if per_category == 0:
        return samples
    from eval.parsers import parse_localization  # the evaluation's reading of the answer format

    rng = np.random.default_rng(seed)
    added = {name: [] for name in SAMPLE_FEATURES}
    for row in samples:
        if row["task"] != "localization":
            continue
        cells = parse_localization(row["answer"])
        if cells is None:
            continue
        for category, noun in (("roads", "road"), ("buildings", "building")):
            listed = cells[category]
            unlisted = [cell for cell in GRID_CELLS if cell not in listed]
            for _ in range(per_category):
                positive = bool(listed) and (not unlisted or rng.random() < 0.5)
                pool = listed if positive else unlisted
                cell = pool[int(rng.integers(len(pool)))]
                question = CELL_QUESTION.format(category=noun, cell=cell)
                prompt, answer = render_sample([(question, "Yes" if positive else "No")], template)[0]
                for name, value in (("id", f"{row['id']}_cell"), ("task", "localization"),
                                    ("image_before", row["image_before"]), ("image_after", row["image_after"]),
                                    ("prompt", prompt), ("answer", answer), ("length", len(prompt) + len(answer)),
                                    ("index", 0)):
                    added[name].append(value)
    if not added["id"]:
        logger.warning("data.localization_cell_questions: no localization sample to derive cell questions from")
        return samples
    logger.info("data.localization_cell_questions %d: %d cell questions added", per_category, len(added["id"]))
    extended = datasets.concatenate_datasets([samples, datasets.Dataset.from_dict(added, features=SAMPLE_FEATURES)])
    return extended.map(lambda _, i: {"index": i}, with_indices=True, features=SAMPLE_FEATURES)


def parse_task_weights(value) -> dict[str, float] | None:
    """`data.task_weights` (a mapping, a JSON string of one, or None) -> {task: weight}, checked."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"data.task_weights: not a JSON mapping ({error}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"data.task_weights must map task names to weights, got {value!r}")
    weights = {}
    for task, weight in value.items():
        if task not in TASKS:
            raise ValueError(f"data.task_weights: unknown task {task!r}; tasks are {list(TASKS)}")
        if isinstance(weight, str):  # YAML 1.1 reads 5e-1 as a string
            try:
                weight = float(weight)
            except ValueError:
                pass
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
            raise ValueError(f"data.task_weights[{task!r}] must be a number >= 0, got {weight!r}")
        weights[task] = float(weight)
    return weights


def weigh_tasks(samples: datasets.Dataset, task_weights: dict[str, float] | None, seed: int = 0) -> datasets.Dataset:
    """Resample training samples by task. A sample of a task weighted w is kept floor(w) times, plus once more with
    probability w - floor(w) (one draw per sample from `seed`, so the mix is fixed for a run and its resumption);
    tasks not named keep weight 1. Repeats sit next to the original (the Trainer's sampler shuffles) and get their
    own `index`, so the augmentation treats them as different samples.

    Why: a data set's task mix is not what every run needs. In ChangeChat-style data the binary and count questions
    come back in the dialogues' rounds while localization is asked once a pair, and binary accuracy saturates long
    before localization is learned.
    """
    weights = parse_task_weights(task_weights)
    if not weights:
        return samples
    rng = np.random.default_rng(seed)
    tasks = samples["task"]
    draws = rng.random(len(tasks))
    keep = []
    for row, (task, draw) in enumerate(zip(tasks, draws)):
        weight = weights.get(task, 1.0)
        keep.extend([row] * (int(weight) + (draw < weight - int(weight))))
    if not keep:
        raise ValueError(f"data.task_weights {weights} leave no training sample (tasks present: {sorted(set(tasks))})")
    weighted = samples.select(keep)
    return weighted.map(lambda _, i: {"index": i}, with_indices=True, features=SAMPLE_FEATURES)


def task_mix(samples: datasets.Dataset) -> str:
    """'binary 40 (33%), caption 20 (17%), ...': the share of each task among the samples, largest first."""
    counts = Counter(samples["task"])
    return ", ".join(f"{task} {n} ({100 * n / len(samples):.0f}%)" for task, n in counts.most_common())


def _levircc_root(data_args) -> str:
    root = data_args.levircc_image_root or data_args.image_root
    if root is None:
        raise ValueError("data.levircc_image_root (or data.image_root) is required with data.levircc_captions")
    return root


__all__ = [
    "SAMPLE_FEATURES",
    "add_cell_questions",
    "caption_prompt",
    "check_answers",
    "check_images",
    "load_train_records",
    "load_val_records",
    "parse_task_weights",
    "records_to_samples",
    "swap_closing_round_images",
    "render_sample",
    "task_mix",
    "weigh_tasks",
]
