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
        ("changed", "id", "prediction", "prompt", "question", "references", "task", "turn", "turns"),
        ("id", "prediction", "prompt", "question", "references", "task", "turn", "turns"),
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


def test_decoding_comes_from_the_flags_then_the_model_then_the_authors(tmp_path):
    from transformers import GenerationConfig

    from eval.generation import model_generation_config

    def fields(settings):
        return settings.num_beams, settings.max_new_tokens, settings.repetition_penalty, settings.length_penalty

    authors = fields(GenerationSettings())
    assert fields(GenerationSettings.for_model(None)) == authors  # no generation_config.json
    assert fields(GenerationSettings.for_model(GenerationConfig(bos_token_id=1))) == authors  # states no decoding
    nano_like = GenerationConfig(num_beams=1, repetition_penalty=1.0, max_new_tokens=48)
    assert fields(GenerationSettings.for_model(nano_like)) == (1, 48, 1.0, 1.0)
    assert fields(GenerationSettings.for_model(nano_like, num_beams=3, repetition_penalty=None)) == (3, 48, 1.0, 1.0)
    assert model_generation_config(str(tmp_path)) is None
    nano_like.save_pretrained(tmp_path)
    assert model_generation_config(str(tmp_path)).max_new_tokens == 48


def test_eval_decodes_as_the_models_generation_config_says(tiny_model_dir, data_dir, tmp_path):
    import shutil

    from transformers import GenerationConfig

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    GenerationConfig(num_beams=1, repetition_penalty=1.0, max_new_tokens=3).save_pretrained(model)
    common = ["--model", str(model), "--data", str(data_dir / "changechat_test_binary.json"), "--image-root",
              str(SAMPLE_IMAGES), "--limit", "1", "--no-meteor"]
    assert main([*common, "--out", str(tmp_path / "from_model")]) == 0
    generation = json.loads((tmp_path / "from_model" / "metrics.json").read_text())["generation"]
    assert (generation["decoding"], generation["max_new_tokens"], generation["repetition_penalty"]) == ("greedy", 3, 1.0)
    assert main([*common, "--out", str(tmp_path / "flagged"), "--num-beams", "2", "--repetition-penalty", "1.2"]) == 0
    generation = json.loads((tmp_path / "flagged" / "metrics.json").read_text())["generation"]
    assert (generation["decoding"], generation["max_new_tokens"], generation["repetition_penalty"]) == (
        "beam search (2 beams)", 3, 1.2)
    assert main([*common, "--out", str(tmp_path / "bad"), "--num-beams", "0"]) == 2  # a clear error, no traceback


def test_a_models_repetition_penalty_does_not_leak_into_other_settings(tiny_model, tiny_processor, sample_pairs):
    """transformers fills unset fields of a passed GenerationConfig from the model's: ours must set them all."""
    import torch

    before, after = sample_pairs[0]
    inputs = tiny_processor(images=[(before, after)], text=[tiny_processor.apply_chat_template(
        [{"role": "user", "content": TASK_PROMPTS["caption"]}])], return_tensors="pt")
    greedy = GenerationSettings(num_beams=1, max_new_tokens=8, repetition_penalty=1.0)
    kwargs = greedy.generate_kwargs(tiny_processor.tokenizer, inputs["input_ids"].shape[1])
    saved = tiny_model.generation_config.repetition_penalty
    with torch.no_grad():
        plain = tiny_model.generate(**inputs, **kwargs)
        tiny_model.generation_config.repetition_penalty = 0.001  # < 1: seen tokens win, a sure change
        try:
            leaked = tiny_model.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1,
                                         pad_token_id=tiny_processor.tokenizer.pad_token_id)
            ours = tiny_model.generate(**inputs, **kwargs)
        finally:
            tiny_model.generation_config.repetition_penalty = saved
    assert not torch.equal(plain, leaked)  # the model's penalty changes an answer it is allowed to reach
    assert torch.equal(plain, ours)
