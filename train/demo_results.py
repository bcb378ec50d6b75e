"""What `deltavlm demo` reports: the learning curve, the trivial baselines and the results table.

The curve is probed during training (CurveCallback: greedy answers on a few validation records); the final
scores come from `deltavlm eval` and are set against trivial answers to the same test records (baseline_scores).
"""

import time
from collections import Counter
from pathlib import Path

import torch
from transformers import TrainerCallback

from modeling_deltavlm.build_nano import NANO_MAX_NEW_TOKENS
from processing.changechat_data import load_records
from processing.conversation import task_of_question

TASK_FILES = {
    "caption": "changechat_test_caption.json",
    "binary": "changechat_test_binary.json",
    "count": "changechat_test_count.json",
    "localization": "changechat_test_loc.json",
    "open": "changechat_test_open.json",
    "dialogue": "changechat_test_dialog.json",
}
# The number each task is judged by in the summary table, and whether higher is better.
HEADLINE = {
    "caption": ("CIDEr", True),
    "binary": ("accuracy", True),
    "count": ("MAE (mean of roads, buildings)", False),
    "localization": ("micro-F1 (mean of roads, buildings)", True),
    "open": ("CIDEr", True),
    "dialogue": ("final-turn CIDEr", True),
}


class CurveCallback(TrainerCallback):
    """Every `every` steps: greedy answers on a few validation records of binary, count and localization,
    scored, with the training minutes so far. Gives the demo's metric-against-time curve."""

    def __init__(self, data_dir: Path, processor, every: int, seed: int = 0, num_records: int = 16,
                 minutes_before: float = 0.0, steps_before: int = 0, score_at_end: bool = False,
                 until: int | None = None):
        self.processor, self.every, self.points = processor, every, []
        # probes only before step `until` (default: the run's max_steps), so a run that a deadline ends gets the
        # probes its time was planned with
        self.until = until
        # a run that continues an earlier one: its points go after that run's on the curve
        self.minutes_before, self.steps_before, self.score_at_end = minutes_before, steps_before, score_at_end
        self.records = {}
        for task, suffix in (("binary", "binary"), ("count", "count"), ("localization", "loc")):
            records = load_records(data_dir / "annotations" / f"changechat_val_{suffix}.json", data_dir / "images")
            self.records[task] = records.shuffle(seed=seed).select(range(min(num_records, len(records))))
        self.started = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # where the final evaluation's scores go on the curve (or, with score_at_end, this run's own)
        point = self._point(state)
        if self.score_at_end:
            point.update(quick_scores(model, self.processor, self.records))
        self.points.append(point)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every or state.global_step >= (self.until or state.max_steps):
            return
        point = self._point(state)
        point.update(quick_scores(model, self.processor, self.records))
        self.points.append(point)
        print(f"  curve at step {point['step']}: {point}", flush=True)

    def _point(self, state) -> dict:
        return {"minutes": self.minutes_before + (time.time() - self.started) / 60,
                "step": self.steps_before + state.global_step}


def quick_scores(model, processor, records_by_task: dict) -> dict:
    from eval.metrics import score_task

    was_training = model.training
    model.eval()
    results = {}
    for task, records in records_by_task.items():
        prompts = [processor.apply_chat_template([{"role": "user", "content": q[0]}]) for q in records["questions"]]
        inputs = processor(images=list(zip(records["image_before"], records["image_after"])), text=prompts)
        inputs = inputs.to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=NANO_MAX_NEW_TOKENS, do_sample=False)
        answers = processor.batch_decode(output, prompt_length=inputs["input_ids"].shape[1])
        scores = score_task(task, answers, [a[0] for a in records["answers"]], meteor=False)
        results.update(headline_point({task: scores}))
    model.train(was_training)
    return results


def headline_point(metrics: dict) -> dict:
    point = {}
    if "binary" in metrics:
        point["binary accuracy"] = metrics["binary"]["accuracy"] / 100
    if "count" in metrics:
        point["count MAE"] = _mean(metrics["count"][k]["mae"] for k in ("roads", "buildings"))
    if "localization" in metrics:
        point["localization F1"] = _mean(metrics["localization"][k]["f1"] for k in ("roads", "buildings")) / 100
    return point


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def baseline_scores(data_dir: Path, limit: int) -> dict:
    """Scores of trivial answers on the same test records: the majority class for binary, always-zero counts,
    empty localization, the most frequent training answer for captions and open questions, and for each
    dialogue turn the most frequent training answer at that turn."""
    from eval.metrics import score_dialogues, score_task

    train = load_records(data_dir / "annotations" / "changechat_train.json", data_dir / "images")
    most_common = {}
    for task in ("caption", "binary", "open"):
        answers = [r["answers"][0] for r in train if r["task"] == task]
        most_common[task] = Counter(answers).most_common(1)[0][0] if answers else ""
    constant = {
        "caption": most_common["caption"],
        "binary": most_common["binary"],
        "count": "No roads has changed, and no buildings has changed.",
        "localization": "roads [] buildings []",
        "open": most_common["open"],
    }
    dialogue_answers = [r["answers"] for r in train if r["task"] == "dialogue"]
    by_turn = [Counter(answers[i] for answers in dialogue_answers if len(answers) > i) for i in range(8)]
    turn_constant = [counter.most_common(1)[0][0] if counter else "" for counter in by_turn]
    results = {}
    for task, file_name in TASK_FILES.items():
        records = load_records(data_dir / "annotations" / file_name, data_dir / "images")
        records = records.select(range(min(limit, len(records))))
        if task == "dialogue":
            dialogues = [
                {
                    "questions": record["questions"],
                    "predictions": [
                        turn_constant[i] if i < len(turn_constant) and turn_constant[i] else constant[task_of_question(q)]
                        for i, q in enumerate(record["questions"])
                    ],
                    "references": record["answers"],
                }
                for record in records
            ]
            results[task] = score_dialogues(dialogues, meteor=False)
        else:
            references = records["references"] if task == "caption" else [a[-1] for a in records["answers"]]
            changed = [flag == 1 for flag in records["changeflag"]] if task == "caption" else None
            results[task] = score_task(task, [constant[task]] * len(records), references, changed=changed, meteor=False)
    return results


def headline(task: str, scores: dict) -> float:
    if task == "caption":
        return scores["all"]["CIDEr"] if "all" in scores else scores["CIDEr"]
    if task == "binary":
        return scores["accuracy"]
    if task == "count":
        return _mean(scores[k]["mae"] for k in ("roads", "buildings"))
    if task == "localization":
        return _mean(scores[k]["f1"] for k in ("roads", "buildings"))
    if task == "open":
        return scores["CIDEr"]
    final = scores["final_turn"]
    return final["all"]["CIDEr"] if "all" in final else final["CIDEr"]


# The two tasks scored per category: (metric key, its name, format). Their headline is the mean of the two, which
# can beat its baseline on buildings alone: the 10-minute default never named a changed road (2026-11-28, seeds 0-6),
# so the table shows each category under its task.
PER_CATEGORY = {"count": ("mae", "MAE", ".3f"), "localization": ("f1", "micro-F1", ".2f")}


def beats_baseline(task: str, ours: float, theirs: float) -> bool:
    """Is `ours` better than the baseline's `theirs` in `task`'s direction (HEADLINE: higher or lower is better)?"""
    return ours > theirs if HEADLINE[task][1] else ours < theirs


def category_scores(task: str, metrics: dict, baselines: dict) -> dict[str, tuple[float, float, bool]]:
    """{"roads": (ours, baseline, beats), "buildings": ...} for a PER_CATEGORY task's scores."""
    key = PER_CATEGORY[task][0]
    scores = {}
    for category in ("roads", "buildings"):
        ours, theirs = metrics[task][category][key], baselines[task][category][key]
        scores[category] = (ours, theirs, beats_baseline(task, ours, theirs))
    return scores


def summary_table(metrics: dict, baselines: dict) -> str:
    """The demo's results table: each task's headline against its trivial baseline, then for count and
    localization each category (roads, buildings) on a row of its own."""
    rows = ["| task | metric | DeltaVLM-Nano | trivial baseline | beats it |", "| --- | --- | ---: | ---: | :---: |"]
    for task, (name, _) in HEADLINE.items():
        if task not in metrics:
            continue
        ours, theirs = headline(task, metrics[task]), headline(task, baselines[task])
        rows.append(f"| {task} | {name} | {ours:.2f} | {theirs:.2f} | "
                    f"{'yes' if beats_baseline(task, ours, theirs) else 'no'} |")
        if task in PER_CATEGORY:
            _, metric, form = PER_CATEGORY[task]
            for category, (ours, theirs, wins) in category_scores(task, metrics, baselines).items():
                rows.append(f"| {task}: {category} | {metric} | {ours:{form}} | {theirs:{form}} | "
                            f"{'yes' if wins else 'no'} |")
    return "\n".join(rows)


def plot_curve(points: list[dict], path: Path, width: int = 640, height: int = 400) -> None:
    """A line plot (PIL, no plotting library) of each headline metric against training minutes."""
    from PIL import Image, ImageDraw

    series = [key for key in ("binary accuracy", "localization F1", "count MAE") if any(key in p for p in points)]
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 30, width - 170, height - 50
    draw.rectangle([left, top, right, bottom], outline="black")
    max_minutes = max([p["minutes"] for p in points] + [1e-6])
    max_value = max([1.0] + [p[key] for p in points for key in series if key in p])
    colours = {"binary accuracy": (31, 119, 180), "localization F1": (44, 160, 44), "count MAE": (214, 39, 40)}
    for key in series:
        xy = [
            (left + (right - left) * p["minutes"] / max_minutes, bottom - (bottom - top) * p[key] / max_value)
            for p in points
            if key in p
        ]
        if len(xy) > 1:
            draw.line(xy, fill=colours[key], width=3)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[key])
    for index, key in enumerate(series):
        y = top + 20 * index
        draw.line([right + 15, y + 6, right + 35, y + 6], fill=colours[key], width=3)
        draw.text((right + 40, y), key, fill="black")
    for fraction in (0.0, 0.5, 1.0):
        draw.text((left - 45, bottom - (bottom - top) * fraction - 6), f"{max_value * fraction:.2f}", fill="black")
        draw.text((left + (right - left) * fraction - 10, bottom + 8), f"{max_minutes * fraction:.1f}", fill="black")
    draw.text(((left + right) // 2 - 60, bottom + 28), "training minutes", fill="black")
    draw.text((left, 8), "DeltaVLM-Nano on held-out synthetic pairs", fill="black")
    image.save(path)
