"""Smoke test: every benchmark script runs end to end on the tiny config with one repeat (no timing asserts)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--config", "tiny", "--repeats", "1", "--warmup", "1", "--new-tokens", "3", "--threads", "1", "--device", "cpu"]


def _run(script: str, tmp_path, *extra):
    command = [sys.executable, str(REPO / "benchmarks" / script), *COMMON, "--out", str(tmp_path), *extra]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def _load(tmp_path, name):
    payload = json.loads((tmp_path / f"{name}.json").read_text())
    markdown = (tmp_path / f"{name}.md").read_text()
    assert "Intel" in markdown or "cores" in markdown  # machine line
    for key in ("cpu", "cpu_cores", "torch", "transformers", "date", "load_average_start", "load_average_end"):
        assert key in payload["machine"]
    return payload, markdown


def test_latency(tmp_path):
    _run("bench_latency.py", tmp_path)
    payload, markdown = _load(tmp_path, "latency_tiny")
    for side in ("deltavlm", "instructblip"):
        assert payload["summary"][side]["total"]["n"] == 1
        assert payload["summary"][side]["decode"]["median"] > 0
    # same prompt and token budget on both sides: Q + 1 + 24 prompt + 3 new tokens
    assert payload["output_lengths"]["deltavlm"] == 4 + 1 + 24 + 3
    assert payload["summary"]["deltavlm"]["csrm"]["median"] > 0
    assert "DeltaVLM / InstructBLIP" in markdown


def test_dialogue(tmp_path):
    _run("bench_dialogue.py", tmp_path)
    payload, _ = _load(tmp_path, "dialogue_tiny")
    assert payload["prompt_tokens_per_turn"] == [24, 51, 78]
    assert set(payload["summary"]["cached"]) >= {"turn1", "turn2", "turn3", "dialogue"}


def test_throughput(tmp_path):
    _run("bench_throughput.py", tmp_path, "--batch-sizes", "1", "2")
    payload, _ = _load(tmp_path, "throughput_tiny")
    assert set(payload["pairs_per_s"]) == {"1", "2"}


def test_training(tmp_path):
    _run("bench_training.py", tmp_path, "--batch-size", "2")
    payload, markdown = _load(tmp_path, "training_tiny")
    assert set(payload["results"]) == {"baseline", "activation_checkpointing"}
    for result in payload["results"].values():
        assert result["peak_rss"] >= result["rest_rss"] > 0
        # the fixed allocator threshold reaches the variants' processes (the RSS then tracks live tensors)
        assert result["malloc_mmap_threshold_env"] == "131072"
    budget = payload["memory_budget_full_bf16"]
    assert 6.7e9 < budget["parameters"]["language_model"] < 6.8e9
    assert budget["total_with_gb"] < budget["total_without_gb"]
    assert "Memory budget" in markdown


def test_processor(tmp_path, shared_dir):
    _run("bench_processor.py", tmp_path)
    payload, _ = _load(tmp_path, "processor_tiny")
    assert payload["summary"]


def test_gpu_script_cpu_path(tmp_path):
    """bench_gpu.py (what gpu.sh runs on the full model) on CPU with the tiny config, model built on meta."""
    completed = _run("bench_gpu.py", tmp_path)
    assert "built tiny" in completed.stdout
    summary = json.loads((tmp_path / "gpu_summary_tiny_cpu.json").read_text())
    assert not summary["errors"] and not summary["skipped"]
    assert set(summary["results"]) == {"latency", "dialogue", "throughput", "compile", "training"}
    for name in ("latency", "dialogue", "throughput", "compile", "training"):
        assert (tmp_path / f"{name}_tiny_cpu.json").exists()
    training = json.loads((tmp_path / "training_tiny_cpu.json").read_text())
    assert set(training["results"]) == {"baseline", "activation_checkpointing"}
    assert training["trainable_parameters"] > 0 and training["memory_budget"]["total_with_gb"] > 0


def test_compile(tmp_path):
    """Without --compile-on-cpu the CPU run compares the dynamic and static caches only; their tokens agree."""
    _run("bench_compile.py", tmp_path, "--compile-batch-sizes", "1", "2")
    payload, markdown = _load(tmp_path, "compile_tiny")
    assert set(payload["results"]) == {"dynamic@1", "static@1", "dynamic@2", "static@2"}
    assert all(r["tokens_equal_dynamic"] and r["generated_tokens_agreeing"]["fraction"] == 1.0
               for r in payload["results"].values())
    assert "speed-up vs dynamic" in markdown


def test_gpu_sh_is_valid_bash():
    script = REPO / "benchmarks" / "gpu.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    assert "bench_gpu.py" in script.read_text()


def test_meta_init_matches_buffers():
    """The meta-device build (used for the 7B model) fills rotary buffers exactly as a normal build."""
    import torch

    sys.path.insert(0, str(REPO))
    from benchmarks.common import build_model

    normal, meta = build_model("tiny"), build_model("tiny", meta_init=True)
    for (name, a), (_, b) in zip(normal.named_buffers(), meta.named_buffers()):
        assert torch.equal(a, b), name
    assert all(p.device.type == "cpu" for p in meta.parameters())



@pytest.mark.slow
def test_warmup_ablation(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts, twice
    command = [sys.executable, str(REPO / "benchmarks" / "bench_warmup_ablation.py"), "--pairs", "30", "--steps", "2",
               "--validation-pairs", "3", "--data", str(tmp_path / "data"), "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "warmup_ablation_heavy")
    assert set(payload["histories"]) == {"CSRM", "concatenation"}
    assert payload["data_args"]["variation"] == "heavy"
    for history in payload["histories"].values():
        assert [(entry["step"], entry["phase"]) for entry in history] == [(0, "vision"), (1, "qformer")]
        assert all(0.0 <= entry["val_patch_f1"] <= 1.0 for entry in history)
        assert 0.0 <= history[1]["val_cell_f1"] <= 1.0 and "val_cell_f1" not in history[0]
    assert "CSRM / concat." in markdown


@pytest.mark.slow
def test_change_flag_benchmark(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts, twice
    command = [sys.executable, str(REPO / "benchmarks" / "bench_change_flag.py"), "--seeds", "3", "--pairs", "30",
               "--steps", "2", "--batch-size", "4", "--validation-pairs", "3", "--data-root", str(tmp_path / "data"),
               "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "change_flag_warmup")
    assert set(payload["histories"]) == {"seed3_weight0", "seed3_weight1"}
    without, with_flag = payload["histories"]["seed3_weight0"], payload["histories"]["seed3_weight1"]
    assert [entry["phase"] for entry in with_flag] == ["vision", "qformer"]
    # only the run with the weight trains (and logs) the pair's yes/no; both are scored on the held-out pairs
    assert "pair_change_loss" in with_flag[0] and "pair_change_loss" not in without[0]
    assert all(0.0 <= run[-1]["val_change_accuracy"] <= 1.0 for run in (without, with_flag))
    assert "| 3 | 0 |" in markdown and "| 3 | 1 |" in markdown


@pytest.mark.slow
def test_warmup_categories_benchmark(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts, twice
    command = [sys.executable, str(REPO / "benchmarks" / "bench_warmup_categories.py"), "--seeds", "3", "--pairs",
               "30", "--steps", "2", "--batch-size", "4", "--validation-pairs", "3", "--data-root",
               str(tmp_path / "data"), "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "warmup_categories")
    assert set(payload["histories"]) == {"seed3_demo", "seed3_inverse_frequency", "seed3_road_patches",
                                         "seed3_long_ramp"}
    plain, weighted = payload["histories"]["seed3_demo"], payload["histories"]["seed3_inverse_frequency"]
    roads = payload["histories"]["seed3_road_patches"]
    assert plain[0]["loss"] == weighted[0]["loss"] and plain[1]["loss"] != weighted[1]["loss"]  # only the facts differ
    assert roads[0]["loss"] != plain[0]["loss"]  # the mask loss weighs road patches apart
    long_ramp = payload["histories"]["seed3_long_ramp"]  # 1 mask step: the first of 18 rungs, not the top
    assert long_ramp[0]["learning_rate"] == pytest.approx(plain[0]["learning_rate"] / 18)
    assert payload["change_flag_weight"] > 0 and "pair_change_loss" in plain[0]  # the demo's short warm-up
    for history in (plain, weighted, roads, long_ramp):
        assert history[-1]["val_roads_changed"] <= 3 and 0.0 <= history[-1]["val_cell_f1_roads"] <= 1.0
    assert all(f"| 3 | {variant} |" in markdown for variant in ("demo", "inverse_frequency", "road_patches", "long_ramp"))


@pytest.mark.slow
def test_warmup_batch32_benchmark(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts
    from train.vision_warmup import change_pairs

    command = [sys.executable, str(REPO / "benchmarks" / "bench_warmup_batch32.py"), "--seeds", "3", "--pairs", "30",
               "--mask-steps", "4", "--validation-pairs", "3", "--data-root", str(tmp_path / "data"),
               "--out", str(tmp_path), "--mask-subgrid", "2", "--qformer-steps", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "warmup_batch32")
    history = payload["histories"]["seed3"]
    # the mask phase at the longer budgets' batch, then the Q-Former steps asked for, scored held out
    assert [entry["phase"] for entry in history] == ["vision"] * 4 + ["qformer"] * 2  # 6 steps: each one logged
    assert payload["mask_subgrid"] == 2 and 0.0 <= history[-1]["val_cell_f1"] <= 1.0
    training_pairs = len(change_pairs(tmp_path / "data" / "seed3"))
    assert all(entry["batch_size"] == min(32, training_pairs) for entry in history)  # batch 32, or all there are
    assert payload["mask_steps"] == 4 and payload["change_flag_weight"] == 0
    # the demo's ramp at batch 32: never shorter than 18 steps, so 4 mask steps stay on its first rungs
    assert payload["ramp_steps"] == 18 and history[0]["learning_rate"] == pytest.approx(3e-3 / 18)
    assert "4 steps (its plan: 180) at batch 32, the rate ramped up over 18 steps" in markdown
    dead = history[3]["val_patch_f1"] < payload["dead_below"]
    assert payload["dead"] == ([3] if dead else []) and ("| dead |" if dead else "| alive |") in markdown
    too_short = subprocess.run(command[:2] + ["--budget-minutes", "10"], capture_output=True, text=True, cwd=REPO,
                               timeout=300, check=False)
    assert too_short.returncode != 0 and "below 30 the demo's warm-up runs at batch 16" in too_short.stderr


@pytest.mark.slow
def test_position_table_benchmark(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts, twice
    command = [sys.executable, str(REPO / "benchmarks" / "bench_position_table.py"), "--seeds", "3", "--pairs", "30",
               "--steps", "4", "--tables", "normal", "sincos:0.5", "--validation-pairs", "3", "--data-root",
               str(tmp_path / "data"), "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "position_table")
    normal, sincos = payload["histories"]["seed3_normal"], payload["histories"]["seed3_sincos:0.5"]
    # the 10-minute default's warm-up: batch 16, half the steps on the masks with the pair's yes/no, half on the facts
    assert payload["batch_size"] == 16 and payload["change_flag_weight"] > 0
    assert [entry["phase"] for entry in normal] == ["vision", "vision", "qformer", "qformer"]
    assert normal[0]["loss"] != sincos[0]["loss"]  # same seed and batch: only the position table differs
    for history in (normal, sincos):
        assert 0.0 <= history[1]["val_position_accuracy"] <= 1.0 and 0.0 <= history[-1]["val_cell_f1"] <= 1.0
    assert "| 3 | normal |" in markdown and "| 3 | sincos:0.5 |" in markdown
    wrong = subprocess.run(command[:2] + ["--tables", "sincos:half"], capture_output=True, text=True, cwd=REPO,
                           timeout=300, check=False)
    assert wrong.returncode != 0 and "SCALE must be a number" in wrong.stderr


@pytest.mark.slow
def test_position_probe_benchmark(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts, twice
    command = [sys.executable, str(REPO / "benchmarks" / "bench_position_probe.py"), "--pairs", "30", "--steps", "2",
               "--vision-steps", "1", "--validation-pairs", "3", "--probe-pairs", "4", "--data", str(tmp_path / "data"),
               "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "position_probe")
    assert set(payload["results"]) == {"position_weight=0", "position_weight=1"}
    for name, result in payload["results"].items():
        assert 0.0 <= result["position_accuracy"] <= 1.0
        assert [entry["phase"] for entry in result["history"]] == ["vision", "qformer"]
        # the warm-up logs the position probe's own held-out score only when it trains one
        assert ("val_position_accuracy" in result["history"][0]) == (name == "position_weight=1")
    assert "position readable" in markdown and "position_weight 1 (default)" in markdown


def test_localization_reading_statistics():
    from benchmarks.bench_localization_reading import answer_statistics

    lines = [
        {"prediction": "roads ['top-left'] buildings []",
         "references": ["roads ['top-left', 'center-center'] buildings ['bottom-right']"]},
        {"prediction": "roads ['top-left'] buildings []", "references": ["roads [] buildings []"]},
        {"prediction": "no idea", "references": ["roads [] buildings ['top-left']"]},  # unparsed: names nothing
    ]
    stats = answer_statistics(lines)
    assert stats["records"] == 3 and stats["distinct_answers"] == 2
    assert stats["micro_f1"] == {"roads": round(2 * 1 / (2 + 2), 3), "buildings": 0.0}
    assert stats["cells"]["roads"]["top-left"] == {"named": 2, "true": 1, "both": 1}
    assert stats["cells"]["buildings"]["top-left"] == {"named": 0, "true": 1, "both": 0}


def test_within_pair_auc_asks_where_not_whether():
    """Only pairs where a category changed in some but not all cells count; a score that ranks every changed cell
    first gets 1, one that ranks them last 0, ties a half."""
    import torch

    from benchmarks.bench_localization_reading import within_pair_auc

    cells = torch.zeros(4, 18)
    cells[0, [0, 1]] = 1  # roads changed in two cells
    cells[1, 9:] = 1  # buildings everywhere: no unchanged cell to rank against
    cells[2, [9, 12]] = 1
    scores = torch.zeros(4, 18)  # pair 3 changed nowhere: left out, whatever its scores
    scores[0, [0, 1]] = 2.0
    scores[0, 2] = 3.0  # one unchanged road cell above both changed ones: 6 of 7 comparisons won
    scores[2] = torch.arange(18.0)  # changed building cells 0 and 3 of 9: beat 0 and 2 of the 7 unchanged
    assert within_pair_auc(scores, cells) == {"roads": {"auc": round(6 / 7, 3), "pairs": 1},
                                              "buildings": {"auc": round(1 / 7, 3), "pairs": 1}}
    assert within_pair_auc(torch.zeros(4, 18), cells)["roads"]["auc"] == 0.5  # all ties: no idea where
    assert within_pair_auc(scores, torch.zeros(4, 18))["roads"] == {"auc": None, "pairs": 0}


def test_patches_belong_to_the_cell_their_centre_lies_in():
    from benchmarks.bench_localization_reading import cell_patches

    ten = [cells.tolist() for cells in cell_patches(10)]  # Nano: 10x10 patches, cell edges at 3.33 and 6.67
    assert ten[0] == [0, 1, 2, 10, 11, 12, 20, 21, 22] and len(ten[4]) == 16 and ten[8][-1] == 99
    assert sorted(sum(ten, [])) == list(range(100))  # each patch in exactly one cell
    assert [cells.tolist() for cells in cell_patches(3)] == [[k] for k in range(9)]
    two = [cells.tolist() for cells in cell_patches(2)]  # no centre in the middle band: the overlapping patches
    assert two[0] == [0] and two[1] == [0, 1] and two[4] == [0, 1, 2, 3] and two[8] == [3]


def test_localization_reading_benchmark(tmp_path, tiny_model_dir):
    from train.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 30, seed=3)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_localization_reading.py"), "--model",
               str(tiny_model_dir), "--data", str(data), "--limit", "3", "--probe-pairs", "6", "--probe-steps", "5",
               "--threads", "1", "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "localization_reading")
    for side in ("answers_held_out", "answers_training"):
        assert payload[side]["records"] == 3
        for cells in payload[side]["cells"].values():
            assert all(counts["both"] <= min(counts["named"], counts["true"]) for counts in cells.values())
    assert payload["probe_pairs"]["train"] == 6
    assert 0.0 <= payload["probe"]["held_out_micro_f1"] <= 1.0
    assert "Linear probe on the frozen queries" in markdown and "answers, training records" in markdown
    for scores in (payload["probe"]["held_out_within_pair_auc"], payload["mean_query_probe"]["held_out_within_pair_auc"],
                   payload["patch_probe"]["within_pair_auc"]):
        assert set(scores) == {"roads", "buildings"}
        assert all(side["auc"] is None or 0.0 <= side["auc"] <= 1.0 for side in scores.values())
    assert payload["soft_prompt"]["soft_prompt_norm"] > 0 and payload["soft_prompt"]["token_embedding_norm"] > 0
    assert 0.0 <= payload["soft_prompt"]["share_common_to_all_pairs"] <= 1.0
    questions = payload["cell_questions"]
    assert questions["questions"] == sum(questions["answers"].values()) and 0.0 <= questions["accuracy"] <= 1.0
    assert "within-pair cell AUC" in markdown and "One cell at a time" in markdown and "queries' mean" in markdown
    # a folder that is not a data set is named in the error, before any model is loaded
    bad = subprocess.run(command[:4] + ["--data", str(tmp_path / "nothing")], capture_output=True, text=True,
                         cwd=REPO, timeout=300, check=False)
    assert bad.returncode == 2 and "nothing" in bad.stderr and "deltavlm synth" in bad.stderr


def test_reader_tail_trains_each_variant_and_scores_the_one_cell_questions(tmp_path, tiny_model_dir):
    """bench_reader_tail.py: a tail per variant (the model as it is, its projection scaled), each scored on the
    balanced one-cell questions; a variant that needs a token the tokenizer lacks is refused before any training."""
    from train.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 40, seed=3)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_reader_tail.py"), "--model", str(tiny_model_dir),
               "--data", str(data), "--steps", "1", "--questions", "1", "--limit", "8", "--threads", "1",
               "--out", str(tmp_path)]
    completed = subprocess.run(command + ["--variants", "plain", "scale:0.5", "rank:4", "layers:1"],
                               capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "reader_tail")
    assert list(payload["variants"]) == ["plain", "scale:0.5", "rank:4", "layers:1"]
    # the tiny LLM's first decoder layer (hidden 32, MLP 64): 4 attention and 3 MLP weights, 2 norms
    whole = payload["variants"]["layers:1"]["trained_whole"]
    assert whole == {"tensors": 9, "parameters": 4 * 32 * 32 + 3 * 32 * 64 + 2 * 32}
    assert "trained_whole" not in payload["variants"]["rank:4"]
    for result in payload["variants"].values():
        assert result["questions"] > 0 and result["questions"] == sum(result["answers"].values())
        assert 0.0 <= result["accuracy"] <= 1.0
        control = result["unchanged_pairs"]  # one question per unchanged test pair, all answered "No" in the data
        assert control["questions"] > 0 and set(control["answers"]) <= {"no answered no", "no answered yes",
                                                                          "no answered unparsed"}
    assert "one-cell questions" in markdown and "control" in markdown
    refused = subprocess.run(command + ["--variants", "sink"], capture_output=True, text=True, cwd=REPO, timeout=300,
                             check=False)
    assert refused.returncode == 2 and "<|im_start|>" in refused.stderr
    bad = subprocess.run(command + ["--variants", "scale:-1"], capture_output=True, text=True, cwd=REPO, timeout=300,
                         check=False)
    assert bad.returncode == 2 and "scale:F (F > 0)" in bad.stderr
    for wrong in ("rank:0", "layers:1.5"):
        bad = subprocess.run(command + ["--variants", wrong], capture_output=True, text=True, cwd=REPO, timeout=300,
                             check=False)
        assert bad.returncode == 2 and "rank:R or layers:N (whole numbers >= 1)" in bad.stderr


def test_tail_with_trainable_qformer_moves_the_qformer_and_not_the_vision_side(tmp_path, tiny_model_dir):
    """bench_tail_qformer.py: the demo's tail config with `encoder_learning_rate` > 0 trains the Q-Former and the
    queries while the ViT and CSRM keep the warm-up's weights."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from train.demo import FOCUSED_TAIL_WEIGHTS, _write_train_config
    from train.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 12, seed=5)
    config_path = _write_train_config(tmp_path, tiny_model_dir, data, tmp_path / "model", max_steps=2, seed=0,
                                      task_weights=FOCUSED_TAIL_WEIGHTS, name="train-tail")
    config = yaml.safe_load(config_path.read_text())
    config["model"]["encoder_learning_rate"] = 1e-2
    config["training"]["per_device_train_batch_size"] = 2
    config_path.write_text(yaml.safe_dump(config))
    command = [sys.executable, str(REPO / "benchmarks" / "bench_tail_qformer.py"), str(config_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]

    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(tmp_path / "model" / "model.safetensors")
    vision = [name for name in before if name.startswith(("vision_model.", "difference_module."))]
    qformer = [name for name in before if name.startswith("qformer.encoder.") or name == "query_tokens"]
    assert vision and qformer
    assert all(torch.equal(before[name], after[name]) for name in vision)
    assert sum(not torch.equal(before[name], after[name]) for name in qformer) > len(qformer) // 2


def _finished_demo_folder(run_dir: Path, binary_accuracy: float) -> dict:
    """A demo folder as `deltavlm demo` leaves it, with the trivial answers' own scores as the model's except for
    binary, which gets `binary_accuracy`."""
    from train.demo_results import baseline_scores
    from train.synthetic import write_dataset

    write_dataset(run_dir / "data", 30, seed=0, variation="light")
    tasks = baseline_scores(run_dir / "data", 4)
    tasks["binary"] = {**tasks["binary"], "accuracy": binary_accuracy}
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"tasks": tasks, "num_records": {"binary": 4, "count": 3}}))
    (run_dir / "warmup.json").write_text(json.dumps([{"step": 0, "phase": "vision"},
                                                     {"step": 1, "phase": "qformer", "val_change_accuracy": 0.75}]))
    (run_dir / "curve.json").write_text(json.dumps([{"minutes": 0.5, "step": 3}, {"minutes": 1.5, "step": 7}]))
    (run_dir / "demo.log").write_text("[  0.0 min] generating\n[  9.3 min] wrote results\n[ 10.1 min] saved\n")
    return tasks


def test_demo_seeds_collects_finished_runs_against_their_own_baselines(tmp_path, monkeypatch):
    from benchmarks import bench_demo_seeds

    _finished_demo_folder(tmp_path / "runs" / "seed0", binary_accuracy=100.0)
    tasks = _finished_demo_folder(tmp_path / "runs" / "seed1", binary_accuracy=0.0)
    tasks["count"]["buildings"]["mae"] += 0.5  # worse than always-zero
    tasks["localization"]["buildings"]["f1"] = 50.0  # better than empty answers
    metrics_file = tmp_path / "runs" / "seed1" / "eval" / "metrics.json"
    metrics_file.write_text(json.dumps({**json.loads(metrics_file.read_text()), "tasks": tasks}))
    # a finished folder is collected, never rerun (an interrupted sweep resumes)
    monkeypatch.setattr(bench_demo_seeds, "run_seed", lambda *args: pytest.fail("reran a finished seed"))
    bench_demo_seeds.main(["--seeds", "0", "1", "--root", str(tmp_path / "runs"), "--out", str(tmp_path)])
    payload, markdown = _load(tmp_path, "demo_default_seeds")
    first, second = payload["runs"]["0"], payload["runs"]["1"]
    assert first["records_per_task"] == 4 and first["language_steps"] == 7 and first["wall_minutes"] == 10.1
    assert first["queries_change_accuracy"] == 0.75
    # the same answers as the baseline do not beat it; a better binary accuracy does, a worse one does not
    assert first["scores"]["binary"]["beats"] and not second["scores"]["binary"]["beats"]
    for task in ("caption", "count", "localization", "open", "dialogue"):
        assert first["scores"][task]["ours"] == first["scores"][task]["baseline"]
        assert not first["scores"][task]["beats"]
    assert "| 0 | 0.750 | 7 |" in markdown and "**0.00 (" in markdown
    assert "Every baseline beaten in 0 of 2 runs" in markdown and "binary 1, count 2" in markdown
    # count and localization also per category: seed 1 beats empty localization on buildings, not on roads
    assert second["categories"]["localization_buildings"] == {"ours": 50.0, "baseline": 0.0, "beats": True}
    assert not second["categories"]["localization_roads"]["beats"]
    assert not second["categories"]["count_buildings"]["beats"] and not first["categories"]["count_roads"]["beats"]
    assert "/ 50.00 (0.00) |" in markdown and "**0.00 (0.00)** / **0.00 (0.00)** |" in markdown
    assert ("runs not beating it in one category: count roads 2, count buildings 2, localization roads 2, "
            "localization buildings 1.") in markdown


def _closing_turns(run_dir: Path, answers: list[tuple[str, str]]) -> None:
    """eval/predictions.jsonl with one two-turn dialogue per (closing reference, closing answer)."""
    lines = []
    for n, (reference, answer) in enumerate(answers):
        for turn, (ref, pred) in enumerate([("Yes", "yes"), (reference, answer)], start=1):
            lines.append({"id": f"p{n}_dialog", "task": "dialogue", "turn": turn, "prediction": pred, "references": [ref]})
    lines.append({"id": "p0", "task": "caption", "turn": 1, "prediction": "a road is built",
                  "references": ["there is no difference"]})  # not a dialogue: not counted
    (run_dir / "eval" / "predictions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_demo_seeds_counts_closing_answers_that_contradict_the_change_flag(tmp_path):
    from benchmarks import bench_demo_seeds

    run = tmp_path / "seed0"
    _finished_demo_folder(run, binary_accuracy=100.0)
    assert bench_demo_seeds.closing_turn_errors(run) is None  # no predictions kept: nothing to count
    _closing_turns(run, [("there is no difference .", "There is no difference."),
                         ("the scene is the same as before", "a road is built on the left"),
                         ("a house is built", "almost nothing has changed"),
                         ("a house is built", "two houses are built"),
                         ("a road appears", "a road appears")])
    assert bench_demo_seeds.closing_turn_errors(run) == {
        "unchanged": 2, "unchanged_called_changed": 1, "changed": 3, "changed_called_unchanged": 1}
    bench_demo_seeds.main(["--seeds", "0", "--root", str(tmp_path), "--out", str(tmp_path / "results")])
    _, markdown = _load(tmp_path / "results", "demo_default_seeds")
    assert "| 1 of 2 / 1 of 3 |" in markdown


def test_demo_seeds_from_an_earlier_sweep_reuse_its_warm_up_and_step_count(tmp_path, monkeypatch):
    from benchmarks import bench_demo_seeds

    earlier = tmp_path / "earlier" / "seed3"
    _finished_demo_folder(earlier, binary_accuracy=100.0)
    (earlier / "nano-init").mkdir()
    (earlier / "nano-init" / "config.json").write_text("{}")
    calls = []

    def fake_demo(run_dir, seed, budget_minutes, extra):
        calls.append((seed, extra))
        assert (run_dir / "nano-init" / "config.json").is_file() and (run_dir / "data").is_dir()
        assert json.loads((run_dir / "warmup.json").read_text())[-1]["val_change_accuracy"] == 0.75
        shutil.copytree(earlier / "eval", run_dir / "eval")
        shutil.copy(earlier / "curve.json", run_dir / "curve.json")

    monkeypatch.setattr(bench_demo_seeds, "run_seed", fake_demo)
    bench_demo_seeds.main(["--seeds", "3", "--root", str(tmp_path / "rerun"), "--from-sweep", str(tmp_path / "earlier"),
                           "--out", str(tmp_path), "--name", "rerun", "--", "--dialogue-image-swap", "0.5"])
    # the earlier run's curve ends at step 7: the rerun trains exactly that many steps, under the new arguments
    assert calls == [(3, ["--dialogue-image-swap", "0.5", "--train-steps", "7"])]
    payload, markdown = _load(tmp_path, "rerun")
    assert payload["from_sweep"] == str(tmp_path / "earlier") and "warm-up of the sweep in" in markdown
    (tmp_path / "earlier" / "seed4" / "data").mkdir(parents=True)  # a run that stopped before its warm-up ended
    with pytest.raises(FileNotFoundError, match="seed4/nano-init is missing"):
        bench_demo_seeds.main(["--seeds", "4", "--root", str(tmp_path / "rerun"), "--from-sweep",
                               str(tmp_path / "earlier"), "--out", str(tmp_path)])


@pytest.mark.slow
def test_demo_seeds_runs_the_demo(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts
    command = [sys.executable, str(REPO / "benchmarks" / "bench_demo_seeds.py"), "--seeds", "1", "--root",
               str(tmp_path / "runs"), "--budget-minutes", "1", "--out", str(tmp_path), "--",
               "--pairs", "40", "--eval-limit", "2", "--warmup-steps", "2", "--train-steps", "2"]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "demo_default_seeds")
    run = payload["runs"]["1"]
    assert run["records_per_task"] == 2 and run["language_steps"] >= 1 and run["wall_minutes"] > 0
    assert set(run["scores"]) == {"caption", "binary", "count", "localization", "open", "dialogue"}
    assert (tmp_path / "runs" / "seed1" / "demo.log").is_file()
    assert "--pairs 40" in markdown


def test_patch_grid_ceiling_counts_what_boundary_patches_cost(tmp_path):
    """A building across the top-left / top-center edge (x 80-89 at 256 px, the edge at 85): the cell rule lists
    both cells. On 9 patches a side with the cell rule's count the perfect patches give both; on 10 a side, where
    the patch holding x 77-102 has its centre in the top-center cell, only one."""
    import numpy as np
    from PIL import Image

    from benchmarks.bench_patch_grid import grid_ceiling
    from train.vision_warmup import BUILDING

    mask = np.zeros((256, 256), dtype=np.uint8)
    mask[20:30, 80:90] = BUILDING  # 50 pixels each side of x = 85
    Image.fromarray(mask).save(tmp_path / "mask.png")
    rows = {(row["grid"], row["rule"]): row for row in grid_ceiling([tmp_path / "mask.png"], [9, 10],
                                                                      {"share": None, "count": 12})}
    assert rows[(9, "count")]["micro_f1"] == 1.0 and rows[(9, "count")]["missed_cells"] == 0
    assert rows[(10, "count")]["missed_cells"] == 1 and rows[(10, "count")]["false_cells"] == 0
    assert rows[(10, "count")]["micro_f1"] == pytest.approx(2 / 3)
    assert rows[(9, "share")]["roads"] == 1.0  # nothing changed, nothing listed: a perfect empty answer


@pytest.mark.slow
def test_patch_grid_benchmark_warms_up_nano_at_each_image_size(tmp_path):
    pytest.importorskip("gguf")  # builds Nano from its packaged parts, twice
    command = [sys.executable, str(REPO / "benchmarks" / "bench_patch_grid.py"), "--pairs", "24", "--grids", "9", "10",
               "--warm-up", "--image-sizes", "160", "144", "--seeds", "3", "--warm-up-pairs", "30", "--steps", "4",
               "--validation-pairs", "3", "--data-root", str(tmp_path / "data"), "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "patch_grid")
    assert [(row["grid"], row["rule"].split(" ")[0]) for row in payload["ceiling"]] == [
        (9, "5%"), (9, "12"), (10, "5%"), (10, "12")]
    histories = payload["warm_up"]["histories"]
    assert set(histories) == {"seed3_160px", "seed3_144px"}
    for history in histories.values():
        assert [entry["phase"] for entry in history] == ["vision", "vision", "qformer", "qformer"]
        assert 0.0 <= history[-1]["val_patch_cell_f1"] <= 1.0
    assert histories["seed3_160px"][0]["loss"] != histories["seed3_144px"][0]["loss"]
    assert "| 3 | 144 | 9 x 9 | cell rule |" in markdown and "| 3 | 160 | 10 x 10 | 5% |" in markdown
    wrong = subprocess.run(command[:2] + ["--image-sizes", "150"], capture_output=True, text=True, cwd=REPO,
                           timeout=300, check=False)
    assert wrong.returncode != 0 and "--image-sizes: Nano needs multiples of its 16 px patch" in wrong.stderr


def test_reader_oracle_code_adds_each_true_cell_and_refuses_unknown_pairs(tmp_path, tiny_model, tiny_processor):
    """bench_reader_oracle.oracle_code: a pair's query outputs gain one fixed direction per true (category, cell)
    fact, scaled by each query's norm, and the soft prompt is projected from them; a pair outside the table fails
    by name; scale 0 leaves the model alone."""
    import torch

    from benchmarks.bench_reader_oracle import cell_facts, oracle_code, pair_key
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from train.synthetic import write_dataset

    write_dataset(tmp_path / "data", 8, seed=3)
    images = sorted((tmp_path / "data" / "images" / "train" / "A").glob("*.png"))[:2]
    pairs = [(str(path), str(path).replace("/A/", "/B/")) for path in images]
    inputs = tiny_processor(images=pairs, text=["where", "where"])
    facts = cell_facts("roads ['top-left'] buildings ['center-center', 'bottom-right']")
    assert facts.nonzero().flatten().tolist() == [0, 9 + 4, 9 + 8]
    table = {pair_key(inputs["pixel_values"][0]): facts, pair_key(inputs["pixel_values"][1]): torch.zeros(18)}
    arguments = {key: inputs[key] for key in ("pixel_values", "qformer_input_ids", "qformer_attention_mask")}
    with torch.no_grad():
        plain = tiny_model.get_image_features(**arguments)
        config = tiny_model.config
        with oracle_code(table, 0.5, config.num_query_tokens, config.qformer_config.hidden_size):
            coded = tiny_model.get_image_features(**arguments)
            with pytest.raises(KeyError, match="not in the oracle's table"):
                tiny_model.get_image_features(**{**arguments, "pixel_values": arguments["pixel_values"] + 1})
        with oracle_code(table, 0.0, config.num_query_tokens, config.qformer_config.hidden_size):
            untouched = tiny_model.get_image_features(**arguments)
    change = coded.query_output - plain.query_output  # (2, Q, Hq)
    assert torch.equal(change[1], torch.zeros_like(change[1]))  # no true cell, no code
    # three unit directions per query, at half the query's norm: the change is at most 1.5 times that norm
    norms = plain.query_output[0].norm(dim=-1)
    assert (change[0].norm(dim=-1) > 0).all() and (change[0].norm(dim=-1) <= 1.5 * norms + 1e-4).all()
    torch.testing.assert_close(coded.pooler_output, tiny_model.language_projection(coded.query_output))
    torch.testing.assert_close(untouched.pooler_output, plain.pooler_output)
    # the evaluation's path: pair_embeds computed once, a copy handed to the Q-Former, found by their values
    with torch.no_grad(), oracle_code(table, 0.5, config.num_query_tokens, config.qformer_config.hidden_size):
        pair_embeds = tiny_model.get_pair_embeds(inputs["pixel_values"]).pair_embeds
        via_embeds = tiny_model.get_image_features(pair_embeds=pair_embeds[[0, 1]].clone(),
                                                   qformer_input_ids=inputs["qformer_input_ids"],
                                                   qformer_attention_mask=inputs["qformer_attention_mask"])
    torch.testing.assert_close(via_embeds.query_output, coded.query_output)
    restored = (DeltaVLMForConditionalGeneration.get_image_features.__name__,
                DeltaVLMForConditionalGeneration.get_pair_embeds.__name__)
    assert restored == ("get_image_features", "get_pair_embeds")


def test_reader_oracle_benchmark(tmp_path, tiny_model_dir):
    from train.synthetic import write_dataset

    data = tmp_path / "data"
    write_dataset(data, 40, seed=3)
    command = [sys.executable, str(REPO / "benchmarks" / "bench_reader_oracle.py"), "--model", str(tiny_model_dir),
               "--data", str(data), "--steps", "1", "--limit", "4", "--scales", "0", "0.5", "--threads", "1",
               "--out", str(tmp_path)]
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600, check=False)
    assert completed.returncode == 0, completed.stderr[-3000:]
    payload, markdown = _load(tmp_path, "reader_oracle")
    assert list(payload["scales"]) == ["0", "0.5"]
    train_records = json.loads((data / "annotations" / "changechat_train.json").read_text())
    assert payload["pairs_in_table"] == sum(r["id"].endswith("_loc") for r in train_records) + 4
    for result in payload["scales"].values():
        assert result["records"] == 4 and 0.0 <= result["micro_f1"]["roads"] <= 1.0
    assert "code scale" in markdown
    bad = subprocess.run(command[:2] + ["--model", str(tiny_model_dir), "--data", str(data), "--scales", "-1"],
                         capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
    assert bad.returncode == 2 and "--scales must be >= 0" in bad.stderr
