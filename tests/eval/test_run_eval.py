"""`deltavlm eval` end to end on a tiny random model and a ChangeChat-format data set built from the six
real sample pairs (images referenced in ../shared, never copied)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from processing.conversation import TASK_PROMPTS

import eval.generation
from eval.generation import GenerationSettings, read_lines
from eval.run_eval import main

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_IMAGES = REPO_ROOT.parent / "shared" / "data" / "levir_cc" / "sample" / "images"
# Greedy and short: the tiny random model's text is noise anyway; what is tested is the plumbing.
FAST = ["--num-beams", "1", "--max-new-tokens", "6", "--no-meteor", "--batch-size", "4"]
TASK_KEYS = {
    "caption": {"all", "changed", "unchanged"},
    "binary": {"accuracy", "precision", "recall", "f1"},
    "count": {"roads", "buildings"},
    "localization": {"roads", "buildings"},
    "open": {"BLEU-4", "CIDEr", "ROUGE-L"},
    "dialogue": {"turns", "final_turn"},
}
CELLS = ["top-left", "center-center", "bottom-right", "top-right", "center-left", "bottom-center"]


def _instruction(record_id, image, rounds):
    conversations = []
    for k, (question, answer) in enumerate(rounds):
        conversations += [
            {"from": "human", "value": ("<image> <image> " if k == 0 else "") + question},
            {"from": "gpt", "value": answer},
        ]
    return {"id": record_id, "image": image, "conversations": conversations}


def write_changechat_test_set(folder: Path, shared_dir: Path) -> None:
    """All six ChangeChat test files for the six sample pairs: captions from captions.json, the other
    answers made up but in the data set's forms."""
    entries = json.loads((shared_dir / "data" / "levir_cc" / "sample" / "captions.json").read_text())["images"]
    files = {name: [] for name in ("caption", "binary", "count", "loc", "open", "dialog")}
    for k, entry in enumerate(entries):
        stem = entry["filename"].rsplit(".", 1)[0]
        image = [f"{entry['filepath']}/A/{entry['filename']}", f"{entry['filepath']}/B/{entry['filename']}"]
        binary = (TASK_PROMPTS["binary"], "Yes" if k % 2 == 0 else "No")
        count = (TASK_PROMPTS["count"], f"{k % 3} roads have changed, and {k + 1} buildings have changed.")
        files["caption"].append({
            "id": stem, "image_A": image[0], "image_B": image[1],
            "captions": [s["raw"].strip() for s in entry["sentences"]], "changeflag": entry["changeflag"],
        })
        files["binary"].append(_instruction(f"{stem}_binary", image, [binary]))
        files["count"].append(_instruction(f"{stem}_count", image, [count]))
        files["loc"].append(_instruction(f"{stem}_loc", image, [(
            TASK_PROMPTS["localization"],
            f"Roads: {CELLS[k]}. Buildings: {CELLS[(k + 2) % 6]}, {CELLS[(k + 4) % 6]}.",
        )]))
        files["open"].append(_instruction(f"{stem}_open", image, [("Where are the new buildings?", "near the road")]))
        summary = (TASK_PROMPTS["dialogue_summary"], entry["sentences"][0]["raw"].strip())
        files["dialog"].append(_instruction(f"{stem}_dialog", image, [binary, count, summary][: 2 + k % 2]))
    folder.mkdir(parents=True, exist_ok=True)
    for name, items in files.items():
        (folder / f"changechat_test_{name}.json").write_text(json.dumps(items))
    # a mixed training-style file in the same folder must be ignored
    (folder / "changechat_test.json").write_text(json.dumps(files["binary"] + files["count"]))


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, shared_dir):
    folder = tmp_path_factory.mktemp("changechat") / "annotations"
    write_changechat_test_set(folder, shared_dir)
    return folder


def run(model_dir, data_dir, out, *extra):
    return main(["--model", str(model_dir), "--data", str(data_dir), "--image-root", str(SAMPLE_IMAGES),
                 "--out", str(out), *FAST, *extra])


@pytest.fixture(scope="module")
def full_run(model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert run(model_dir, data_dir, out) == 0
    return out


def _turns_expected():
    # six single-turn records per task; dialogues alternate 2 and 3 rounds
    return 6 * 5 + (2 + 3) * 3


def test_all_tasks_end_to_end(full_run):
    lines = read_lines(full_run / "predictions.jsonl")
    assert len(lines) == _turns_expected()
    assert {tuple(sorted(line)) for line in lines} >= {
        ("changed", "id", "prediction", "prompt", "question", "references", "task", "turn"),
        ("id", "prediction", "prompt", "question", "references", "task", "turn"),
    }
    assert [line["task"] for line in lines[:6]] == ["caption"] * 6  # data order, task by task
    dialog = [line for line in lines if line["id"] == "train_000051_dialog"]
    assert [line["turn"] for line in dialog] == [1, 2, 3]
    # earlier rounds carry the ground-truth answers, in the training format
    assert dialog[1]["prompt"].startswith("q please judge whether") and " a no q please determine" in dialog[1]["prompt"]
    assert len(lines[0]["references"]) == 5

    metrics = json.loads((full_run / "metrics.json").read_text())
    assert set(metrics["tasks"]) == set(TASK_KEYS)
    for task, keys in TASK_KEYS.items():
        assert keys <= set(metrics["tasks"][task]), task
    assert metrics["num_records"] == dict.fromkeys(TASK_KEYS, 6) and metrics["num_unscored"] == 0
    assert metrics["tasks"]["dialogue"]["turns"].keys() == {"1", "2", "3"}
    assert metrics["generation"]["decoding"] == "greedy" and metrics["generation"]["repetition_penalty"] == 1.5
    report = (full_run / "metrics.md").read_text()
    assert "greedy" in report and "### localization" in report and "final turn" in report
    assert not list(full_run.glob("*.tmp"))


def test_score_command_reads_the_eval_output_to_the_same_metrics(full_run, tmp_path):
    from eval.score import main as score_main

    out = tmp_path / "rescored.json"
    assert score_main(["--predictions", str(full_run / "predictions.jsonl"), "--no-meteor", "--out", str(out)]) == 0
    rescored = json.loads(out.read_text())["tasks"]
    metrics = json.loads((full_run / "metrics.json").read_text())["tasks"]
    assert rescored == metrics  # dialogue turns regrouped; ids repeated across task files kept apart


def test_interrupted_run_resumes_to_the_same_metrics(model_dir, data_dir, full_run, tmp_path, monkeypatch):
    calls = []
    real = eval.generation.generate_batch

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr("eval.run_eval.generate_batch", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        run(model_dir, data_dir, tmp_path)
    partial = read_lines(tmp_path / "predictions.jsonl")
    assert len(partial) == 6  # the two caption batches (4 + 2), written as they were produced
    with open(tmp_path / "predictions.jsonl", "a") as handle:
        handle.write('{"id": "torn')  # a kill in the middle of a write

    monkeypatch.setattr("eval.run_eval.generate_batch", real)
    assert run(model_dir, data_dir, tmp_path) == 0
    resumed = read_lines(tmp_path / "predictions.jsonl")
    assert resumed == read_lines(full_run / "predictions.jsonl")
    expected = json.loads((full_run / "metrics.json").read_text())["tasks"]
    assert json.loads((tmp_path / "metrics.json").read_text())["tasks"] == expected

    # a third run has nothing to generate and rescoring gives the same file
    before = (tmp_path / "metrics.json").read_text()
    assert run(model_dir, data_dir, tmp_path) == 0
    assert (tmp_path / "metrics.json").read_text() == before


def test_two_processes_equal_one(model_dir, data_dir, full_run, tmp_path):
    # torchrun, not `accelerate launch --cpu`: accelerate starts one process on CPU unless given --mpirun.
    # --standalone picks a free port (--master_port 0 hangs).
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "eval.run_eval", "--model", str(model_dir), "--data", str(data_dir),
        "--image-root", str(SAMPLE_IMAGES), "--out", str(tmp_path), *FAST,
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0:" in result.stderr and "process 1:" in result.stderr  # both processes generated
    assert read_lines(tmp_path / "predictions.jsonl") == read_lines(full_run / "predictions.jsonl")
    assert not list(tmp_path.glob("predictions.rank*.jsonl"))
    expected = json.loads((full_run / "metrics.json").read_text())["tasks"]
    assert json.loads((tmp_path / "metrics.json").read_text())["tasks"] == expected


def test_single_file_task_filter_limit_and_beams(model_dir, data_dir, tmp_path):
    code = main(["--model", str(model_dir), "--data", str(data_dir / "changechat_test_caption.json"),
                 "--image-root", str(SAMPLE_IMAGES), "--out", str(tmp_path), "--limit", "2", "--task", "caption",
                 "--max-new-tokens", "4", "--prompt-format", "plain"])  # beams 5 and METEOR: the defaults
    assert code == 0
    lines = read_lines(tmp_path / "predictions.jsonl")
    assert [line["id"] for line in lines] == ["train_000016", "train_000051"]
    assert lines[0]["prompt"] == TASK_PROMPTS["caption"]  # plain: the question verbatim
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["generation"]["decoding"] == "beam search (5 beams)" and metrics["prompt_format"] == "plain"
    meteor = metrics["tasks"]["caption"]["all"]
    assert meteor["METEOR"] is not None or "java" in meteor["meteor_error"]
    # resuming with other settings would mix two runs' predictions: refused
    code = main(["--model", str(model_dir), "--data", str(data_dir / "changechat_test_caption.json"),
                 "--image-root", str(SAMPLE_IMAGES), "--out", str(tmp_path), "--limit", "2", "--num-beams", "1"])
    assert code == 2


def test_generation_defaults_are_the_authors(tiny_processor):
    settings = GenerationSettings()
    assert (settings.num_beams, settings.max_new_tokens, settings.repetition_penalty, settings.length_penalty,
            settings.min_length) == (5, 256, 1.5, 1.0, 1)
    kwargs = settings.generate_kwargs(tiny_processor.tokenizer, prompt_length=9)
    assert kwargs["generation_config"].pad_token_id == 500  # [PAD], not 0
    assert kwargs["logits_processor"][0].prompt_ignore_length == 9  # penalty on generated tokens only
    assert kwargs["generation_config"].cache_implementation is None  # the dynamic cache unless asked
    static = GenerationSettings(static_cache=True).generate_kwargs(tiny_processor.tokenizer, prompt_length=9)
    assert static["generation_config"].cache_implementation == "static"


@pytest.mark.parametrize("case", ["missing_image", "empty", "unknown_task", "absent_task", "not_deltavlm"])
def test_bad_input_fails_before_generation(case, model_dir, data_dir, tmp_path, capsys):
    model, data, extra = str(model_dir), str(data_dir), []
    if case == "missing_image":
        items = json.loads((data_dir / "changechat_test_binary.json").read_text())
        items[1]["image"][1] = "train/B/does_not_exist.png"
        data = tmp_path / "changechat_test_binary.json"
        data.write_text(json.dumps(items))
    elif case == "empty":
        data = tmp_path / "changechat_test_binary.json"
        data.write_text("[]")
    elif case == "unknown_task":
        extra = ["--task", "segmentation"]
    elif case == "absent_task":
        data, extra = str(data_dir / "changechat_test_binary.json"), ["--task", "count"]
    elif case == "not_deltavlm":
        (tmp_path / "llama").mkdir()
        (tmp_path / "llama" / "config.json").write_text('{"model_type": "llama"}')
        model = str(tmp_path / "llama")
    code = main(["--model", model, "--data", str(data), "--image-root", str(SAMPLE_IMAGES),
                 "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    message = capsys.readouterr().err
    expected = {
        "missing_image": "does_not_exist.png",
        "empty": "no records",
        "unknown_task": "invalid choice",
        "absent_task": "no count records",
        "not_deltavlm": "not DeltaVLM",
    }[case]
    assert expected in message
    assert not (tmp_path / "out" / "predictions.jsonl").exists()


@pytest.mark.parametrize("task, beams", [("dialogue", "1"), ("caption", "3")])
def test_static_cache_gives_the_same_predictions(task, beams, model_dir, data_dir, tmp_path):
    """--static-cache (pre-allocated KV cache; compiled decoding on CUDA) changes speed, not answers (fp32 CPU)."""
    common = ["--model", str(model_dir), "--data", str(data_dir), "--image-root", str(SAMPLE_IMAGES), "--task", task,
              "--num-beams", beams, "--max-new-tokens", "6", "--no-meteor", "--batch-size", "4", "--limit", "3"]
    assert main([*common, "--out", str(tmp_path / "dynamic")]) == 0
    assert main([*common, "--out", str(tmp_path / "static"), "--static-cache"]) == 0
    dynamic = read_lines(tmp_path / "dynamic" / "predictions.jsonl")
    static = read_lines(tmp_path / "static" / "predictions.jsonl")
    assert len(dynamic) == len(static) > 3 if task == "dialogue" else len(dynamic) == len(static) == 3
    assert [line["prediction"] for line in static] == [line["prediction"] for line in dynamic]
    metrics = json.loads((tmp_path / "static" / "metrics.json").read_text())
    assert metrics["generation"]["static_cache"] is True
