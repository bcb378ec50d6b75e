"""The offline default across seeds: `deltavlm demo --seed N` for several seeds, each beside its own baselines.

    python benchmarks/bench_demo_seeds.py [--seeds 0 1 2 3 4 5 6 7] [--root DIR] [--budget-minutes 10]
        [--from-sweep EARLIER_ROOT] [-- <more demo arguments>]

Each seed is its own data set, warm-up and language stage, so its own trivial baselines (`train.demo_results.
baseline_scores` on the same test records). The runs go one after the other, each in a fresh process (the demo is
clock-driven: never run anything else beside it). A seed whose folder `DIR/seed<N>` already holds an evaluation
is collected, not rerun, so an interrupted sweep resumes where it stopped. For each run the table gives the
queries' held-out change accuracy after the warm-up, the language-stage steps, each task's headline score beside
its baseline (bold: not better), the dialogues' closing answers that contradict the pair's change flag
(an unchanged pair described as changed, a changed pair as unchanged: each costs a dialogue's CIDEr far more than
a weak description does), and the wall time the demo itself reported at its end.

`--from-sweep EARLIER_ROOT` reruns only the language stage of an earlier sweep under other demo arguments (an
A/B of a training setting): each seed starts from that sweep's data and warm-up (`data/`, `nano-init/`, which the
demo reuses) and trains the number of steps that sweep's run reached. A fixed step count runs its learning-rate
schedule over steps instead of to a deadline, so compare such reruns with each other (one of them with the
setting at its default), not with the clock-driven sweep.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common  # noqa: E402

TASKS = ("caption", "binary", "count", "localization", "open", "dialogue")
ELAPSED = re.compile(r"^\[\s*([0-9.]+) min\]", re.MULTILINE)


def run_seed(run_dir: Path, seed: int, budget_minutes: float, extra: list[str]) -> None:
    """One demo in its own process, its output kept beside its results (`demo.log`)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    command = ["deltavlm", "demo", "--seed", str(seed), "--out", str(run_dir), "--no-save",
               "--budget-minutes", f"{budget_minutes:g}", *extra]
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command)}", flush=True)
    with open(run_dir / "demo.log", "w") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if code:
        raise RuntimeError(f"the demo for seed {seed} failed with exit code {code}: see {run_dir / 'demo.log'}")


def reuse_warmup(run_dir: Path, earlier_run: Path) -> int:
    """Copy an earlier run's data and warmed-up model into `run_dir`; returns that run's language-stage steps."""
    for name in ("data", "nano-init"):
        if not (earlier_run / name).is_dir():
            raise FileNotFoundError(f"--from-sweep: {earlier_run / name} is missing (not a finished demo folder)")
        if not (run_dir / name).exists():
            shutil.copytree(earlier_run / name, run_dir / name)
    if (earlier_run / "warmup.json").is_file():  # the warm-up's record: the demo that reuses it writes none
        shutil.copy(earlier_run / "warmup.json", run_dir / "warmup.json")
    curve = json.loads((earlier_run / "curve.json").read_text())
    return curve[-1]["step"]


def closing_turn_errors(run_dir: Path) -> dict | None:
    """The dialogues' last answers against their pair's change flag, from the demo's `eval/predictions.jsonl`:
    {"unchanged", "unchanged_called_changed", "changed", "changed_called_unchanged"}. A pair is unchanged when its
    closing reference is a LEVIR-CC no-change sentence; an answer says "unchanged" when it is one of them. None
    without predictions."""
    from eval.metrics import is_no_change_caption_set

    path = run_dir / "eval" / "predictions.jsonl"
    if not path.is_file():
        return None
    last: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("task") == "dialogue" and entry["turn"] >= last.get(entry["id"], {}).get("turn", 0):
            last[entry["id"]] = entry
    counts = dict.fromkeys(("unchanged", "unchanged_called_changed", "changed", "changed_called_unchanged"), 0)
    for entry in last.values():
        says_unchanged = is_no_change_caption_set([entry["prediction"]])
        if is_no_change_caption_set(entry["references"]):
            counts["unchanged"] += 1
            counts["unchanged_called_changed"] += not says_unchanged
        else:
            counts["changed"] += 1
            counts["changed_called_unchanged"] += says_unchanged
    return counts


def collect(run_dir: Path) -> dict:
    """What one finished demo folder says: scores, baselines, warm-up and language-stage figures, wall time."""
    from train.demo_results import PER_CATEGORY, baseline_scores, beats_baseline, category_scores, headline

    evaluation = json.loads((run_dir / "eval" / "metrics.json").read_text())
    metrics = evaluation["tasks"]
    limit = max(evaluation["num_records"].values())  # the demo's --eval-limit: every task is cut to it
    baselines = baseline_scores(run_dir / "data", limit)
    scores = {}
    for task in TASKS:
        ours, theirs = headline(task, metrics[task]), headline(task, baselines[task])
        scores[task] = {"ours": ours, "baseline": theirs, "beats": beats_baseline(task, ours, theirs)}
    categories = {  # count and localization per category: their mean can beat its baseline on buildings alone
        f"{task}_{category}": {"ours": ours, "baseline": theirs, "beats": wins}
        for task in PER_CATEGORY
        for category, (ours, theirs, wins) in category_scores(task, metrics, baselines).items()
    }
    warmup = json.loads((run_dir / "warmup.json").read_text()) if (run_dir / "warmup.json").is_file() else []
    accuracies = [entry["val_change_accuracy"] for entry in warmup if "val_change_accuracy" in entry]
    curve = json.loads((run_dir / "curve.json").read_text())
    log = (run_dir / "demo.log").read_text() if (run_dir / "demo.log").is_file() else ""
    elapsed = ELAPSED.findall(log)
    return {
        "scores": scores,
        "categories": categories,
        "records_per_task": limit,
        "queries_change_accuracy": accuracies[-1] if accuracies else None,
        "language_steps": curve[-1]["step"] if curve else None,
        "dialogue_closing_turn": closing_turn_errors(run_dir),
        "wall_minutes": float(elapsed[-1]) if elapsed else None,
    }


def markdown(results: dict) -> str:
    header = ["seed", "queries' change accuracy", "language steps", *TASKS,
              "count MAE roads / buildings", "localization F1 roads / buildings",
              "closing turn: unchanged called changed / changed called unchanged", "wall (min)"]
    rows = []
    for seed, run in results.items():
        cells = []
        for task in TASKS:
            score = run["scores"][task]
            text = f"{score['ours']:.2f} ({score['baseline']:.2f})"
            cells.append(text if score["beats"] else f"**{text}**")
        for task, form in (("count", ".3f"), ("localization", ".2f")):
            if "categories" not in run:  # collected before the per-category columns
                cells.append("–")
                continue
            parts = []
            for category in ("roads", "buildings"):
                score = run["categories"][f"{task}_{category}"]
                text = f"{score['ours']:{form}} ({score['baseline']:{form}})"
                parts.append(text if score["beats"] else f"**{text}**")
            cells.append(" / ".join(parts))
        accuracy, closing = run["queries_change_accuracy"], run["dialogue_closing_turn"]
        flags = "–" if closing is None else (f"{closing['unchanged_called_changed']} of {closing['unchanged']} / "
                                             f"{closing['changed_called_unchanged']} of {closing['changed']}")
        rows.append([seed, "–" if accuracy is None else f"{accuracy:.3f}", run["language_steps"] or "–", *cells,
                     flags, "–" if run["wall_minutes"] is None else f"{run['wall_minutes']:.1f}"])
    all_six = sum(all(score["beats"] for score in run["scores"].values()) for run in results.values())
    lost = {task: sum(not run["scores"][task]["beats"] for run in results.values()) for task in TASKS}
    losses = ", ".join(f"{task} {count}" for task, count in lost.items() if count) or "none"
    collected = [run for run in results.values() if "categories" in run]
    behind = {name: sum(not run["categories"][name]["beats"] for run in collected)
              for name in (collected[0]["categories"] if collected else {})}
    category_losses = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in behind.items() if count)
    return (f"{common.markdown_table(header, rows)}\n\nScore (baseline); bold: not better than the baseline. "
            f"Every baseline beaten in {all_six} of {len(results)} runs; runs not beating a task's baseline: "
            f"{losses}"
            + (f"; runs not beating it in one category: {category_losses or 'none'}" if collected else "") + ".\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    parser.add_argument("--root", default="deltavlm-demo-seeds", help="folder of the runs (seed<N> each; reused)")
    parser.add_argument("--budget-minutes", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="results folder (default: $OUT or benchmarks/results)")
    parser.add_argument("--name", default="demo_default_seeds", help="results file stem")
    parser.add_argument("--from-sweep", default=None, metavar="EARLIER_ROOT",
                        help="rerun only the language stage of the sweep in this folder: same data, warm-up and steps")
    parser.add_argument("demo_args", nargs="*", help="more `deltavlm demo` arguments (after --)")
    args = parser.parse_args(argv)
    info = common.machine_info()
    root = Path(args.root)
    results = {}
    for seed in args.seeds:
        run_dir = root / f"seed{seed}"
        if not (run_dir / "eval" / "metrics.json").is_file():
            extra = list(args.demo_args)
            if args.from_sweep:
                run_dir.mkdir(parents=True, exist_ok=True)
                extra += ["--train-steps", str(reuse_warmup(run_dir, Path(args.from_sweep) / f"seed{seed}"))]
            run_seed(run_dir, seed, args.budget_minutes, extra)
        results[seed] = collect(run_dir)
        print(f"[{time.strftime('%H:%M:%S')}] seed {seed}: " + ", ".join(
            f"{task} {s['ours']:.2f} ({s['baseline']:.2f})" for task, s in results[seed]["scores"].items()), flush=True)
    table = markdown(results)
    origin = (f" from the data and warm-up of the sweep in `{args.from_sweep}`, its language-stage steps at a fixed "
              f"count" if args.from_sweep else "")
    text = (f"`deltavlm demo --budget-minutes {args.budget_minutes:g}` "
            f"{' '.join(args.demo_args)} on seeds {', '.join(map(str, args.seeds))}{origin}: each seed its own "
            f"synthetic data, warm-up and baselines (on the same held-out records).\n\n{table}")
    payload = {"benchmark": "demo_default_seeds", "budget_minutes": args.budget_minutes, "demo_args": args.demo_args,
               "from_sweep": args.from_sweep, "seeds": args.seeds, "runs": results, "machine": info}
    common.save(args.name, payload, text, args.out)


if __name__ == "__main__":
    main()
