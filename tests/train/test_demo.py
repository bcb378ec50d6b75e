"""`deltavlm demo`: its scoring pieces on a small synthetic set (fast), and the whole run on a tiny budget (slow)."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from modeling_deltavlm.build_nano import NANO_MAX_NEW_TOKENS
from train.deadline import StopAtDeadline
from train.demo import (
    DIALOGUE_IMAGE_SWAP, SMALL_BATCH_BELOW_MINUTES, build_parser, main, nano_model_card,
    UNTAILED_TASK_WEIGHTS, probe_every, probes_per_run, size_warm_up, train_batch_size,
    change_flag_weight, qformer_learning_rate, vision_learning_rate, vision_ramp_steps, MIN_BATCH32_RAMP_STEPS,
)
from train.demo_results import HEADLINE, baseline_scores, headline, plot_curve, summary_table
from train.synthetic import write_dataset

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic")
    write_dataset(folder, 40, seed=3)
    return folder


def test_baselines_are_the_trivial_answers(synthetic):
    baselines = baseline_scores(synthetic, limit=8)
    assert set(baselines) == set(HEADLINE)
    # always "no change" for counts: MAE equals the mean true count; empty localization: F1 0
    assert headline("localization", baselines["localization"]) == 0.0
    assert headline("count", baselines["count"]) >= 0.0
    assert baselines["binary"]["num_samples"] == 8 and 0.0 <= baselines["binary"]["accuracy"] <= 100.0


def test_summary_table_compares_in_the_right_direction():
    ours = {"binary": {"accuracy": 80.0}, "count": {"roads": {"mae": 0.5}, "buildings": {"mae": 0.5}}}
    theirs = {"binary": {"accuracy": 50.0}, "count": {"roads": {"mae": 0.4}, "buildings": {"mae": 0.4}}}
    table = summary_table(ours, theirs)
    assert "| binary | accuracy | 80.00 | 50.00 | yes |" in table
    assert "| count | MAE (mean of roads, buildings) | 0.50 | 0.40 | no |" in table  # lower is better


def test_summary_table_shows_each_category_under_its_task():
    # the mean beats the baseline on buildings alone; the roads row must say that roads did not
    ours = {"count": {"roads": {"mae": 0.225}, "buildings": {"mae": 0.4}},
            "localization": {"roads": {"f1": 0.0}, "buildings": {"f1": 30.0}}}
    theirs = {"count": {"roads": {"mae": 0.225}, "buildings": {"mae": 0.6}},
              "localization": {"roads": {"f1": 0.0}, "buildings": {"f1": 0.0}}}
    lines = summary_table(ours, theirs).splitlines()
    count_row = lines.index("| count | MAE (mean of roads, buildings) | 0.31 | 0.41 | yes |")
    assert lines[count_row + 1:count_row + 3] == ["| count: roads | MAE | 0.225 | 0.225 | no |",
                                                   "| count: buildings | MAE | 0.400 | 0.600 | yes |"]
    assert "| localization: roads | micro-F1 | 0.00 | 0.00 | no |" in lines
    assert "| localization: buildings | micro-F1 | 30.00 | 0.00 | yes |" in lines


def test_curve_plot_is_written(tmp_path):
    points = [{"minutes": 0.5, "binary accuracy": 0.4, "count MAE": 1.2}, {"minutes": 1.0, "binary accuracy": 0.7}]
    plot_curve(points, tmp_path / "curve.png")
    assert Image.open(tmp_path / "curve.png").size == (640, 400)


def test_nano_model_card_names_its_real_parts_and_results(tiny_model_dir):
    table = summary_table({"binary": {"accuracy": 80.0}}, {"binary": {"accuracy": 50.0}})
    card = nano_model_card(tiny_model_dir, table, build_parser().parse_args(["--frozen-llm"]), num_pairs=123)
    front_matter = card.split("---")[1]
    assert "- HuggingFaceTB/SmolLM2-135M-Instruct" in front_matter and "/" + "root" not in front_matter
    assert "datasets:" not in front_matter  # synthetic data only: no LEVIR-CC / ChangeChat claim
    assert "**not** the paper's checkpoint" in card and "123 synthetic" in card and "no adapters (frozen)" in card
    assert "| binary | accuracy | 80.00 | 50.00 | yes |" in card


def test_bad_arguments_exit_with_one_line(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--before", str(tmp_path / "a.png")]) == 2
    assert "both --before and --after" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--before", "nope.png", "--after", "nope.png"]) == 2
    assert "image not found" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--budget", "0"]) == 2  # the spelling of --budget-minutes
    assert "--budget-minutes must be positive" in capsys.readouterr().err


def test_budget_is_short_for_budget_minutes():
    assert build_parser().parse_args(["--budget", "25"]).budget_minutes == 25.0
    assert build_parser().parse_args([]).budget_minutes == 10.0


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_budget(tmp_path, sample_pairs):
    pytest.importorskip("gguf")
    before, after = sample_pairs[1]
    out = tmp_path / "demo"
    code = main(["--out", str(out), "--budget-minutes", "1", "--pairs", "60", "--eval-limit", "6",
                 "--before", before, "--after", after, "--save-to", str(tmp_path / "home")])
    assert code == 0
    assert (tmp_path / "home" / "config.json").is_file()
    results = (out / "results.md").read_text()
    for task in HEADLINE:
        assert f"| {task} |" in results
    answers = json.loads((out / "answers.json").read_text())
    assert len(answers) == 2 and all(set(a) == {"caption", "binary", "count", "localization"} for a in answers.values())
    assert (out / "curve.png").is_file()
    # the evaluation decodes as the curve probe and the answers do, from Nano's own generation_config.json
    generation = json.loads((out / "eval" / "metrics.json").read_text())["generation"]
    assert (generation["num_beams"], generation["repetition_penalty"], generation["max_new_tokens"]) == (1, 1.0, NANO_MAX_NEW_TOKENS)
    saved = json.loads((tmp_path / "home" / "generation_config.json").read_text())
    assert (saved["num_beams"], saved["repetition_penalty"], saved["max_new_tokens"]) == (1, 1.0, NANO_MAX_NEW_TOKENS)
    # the warm-up ran its two phases, masks first, then the Q-Former on the facts; then the projection was aligned
    warmup = json.loads((out / "warmup.json").read_text())
    phases = [entry["phase"] for entry in warmup]
    assert phases[0] == "vision" and phases[-2] == "qformer" and phases[-1] == "projection"
    # a short budget's mask phase also trains each pair's yes/no, at batch 16 (its 1-minute warm-up never fits batch 32)
    vision_entries = [entry for entry in warmup if entry["phase"] == "vision"]
    assert vision_entries[0]["batch_size"] == 16 and all("pair_change_loss" in entry for entry in vision_entries)
    # each phase's rate follows the batch (at 16: masks 1e-3, Q-Former 2e-3); the log shows both
    for phase, rate in (("vision", vision_learning_rate), ("qformer", qformer_learning_rate)):
        entries = [entry for entry in warmup if entry["phase"] == phase]
        peak = rate(entries[0]["batch_size"])
        assert all(0 < entry["learning_rate"] <= peak for entry in entries)
        assert max(entry["learning_rate"] for entry in entries) > peak / 4
    assert warmup[-1]["loss_end"] < warmup[-1]["loss_start"]

    # an interrupted run resumes from what it left: a fresh process (no Auto classes registered by building Nano)
    # reuses the data and the warmed-up Nano and redoes only the missing training stage
    shutil.rmtree(out / "model")
    rerun = subprocess.run([sys.executable, "-m", "train.demo", "--out", str(out), "--budget-minutes", "1",
                            "--train-steps", "2", "--eval-limit", "2", "--no-save"],
                           capture_output=True, text=True, cwd=REPO_ROOT)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "reusing the warmed-up Nano" in rerun.stdout and "training 2 steps" in rerun.stdout
    assert (out / "model" / "config.json").is_file()


def test_a_full_disk_while_saving_the_warmed_up_nano_leaves_nothing_to_reuse(tmp_path, synthetic, tiny_processor,
                                                                              make_tiny_config, monkeypatch, capsys):
    """The demo reuses `nano-init/` when it holds a config.json; save_pretrained writes that first, so a save cut
    short by a full disk must not leave it (a 10-minute run on 2 cores did, before the staged save)."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    import modeling_deltavlm.build_nano as build_nano_module
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    def tiny_nano(seed=0, use_difference_module=True, position_table="normal", image_size=160):
        return DeltaVLMForConditionalGeneration(make_tiny_config()), tiny_processor

    def disk_full(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(build_nano_module, "build_nano", tiny_nano)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    out = tmp_path / "demo"
    shutil.copytree(synthetic, out / "data")
    code = main(["--out", str(out), "--warmup-steps", "2", "--no-projection-alignment", "--no-save"])
    assert code == 1
    error = capsys.readouterr().err
    assert "No space left on device" in error and f"kept in {out}" in error
    assert not (out / "nano-init" / "config.json").exists()  # a rerun builds and warms Nano up again
    assert not (out / ".nano-init.partial").exists()
    assert (out / "warmup.json").is_file() and (out / "data" / "metadata.json").is_file()


@pytest.mark.parametrize("batch_size", [16, 32])
def test_the_pairs_yes_no_trains_only_in_the_small_batch_warm_up(tmp_path, synthetic, tiny_processor, make_tiny_config,
                                                                monkeypatch, batch_size):
    """A 10-minute demo warms up at batch 16 (1e-3) on every machine, its mask phase with each pair's yes/no, and
    never times a warm-up step for it; `--warmup-steps` keeps batch 32 (3e-3), where the yes/no term killed the
    mask probe (seed 4, 2026-11-28), and so trains without it."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    import modeling_deltavlm.build_nano as build_nano_module
    import train.demo as demo
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    def stop_after_the_warm_up(self, save_directory, *args, **kwargs):
        raise SafetensorError("stop here: the warm-up log is written")

    monkeypatch.setattr(build_nano_module, "build_nano",
                        lambda seed=0, use_difference_module=True, position_table="normal", image_size=160: (
                            DeltaVLMForConditionalGeneration(make_tiny_config()), tiny_processor))
    monkeypatch.setattr(demo, "_measure_warmup_step_seconds",
                        lambda *args, **kwargs: pytest.fail("a short budget timed a warm-up step"))
    real_size_warm_up = demo.size_warm_up
    # the default's 120 steps, cut to 2 for the test once the batch is decided
    monkeypatch.setattr(demo, "size_warm_up", lambda *args: (2, real_size_warm_up(*args)[1]))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", stop_after_the_warm_up)
    out = tmp_path / "demo"
    shutil.copytree(synthetic, out / "data")
    schedule = [] if batch_size == 16 else ["--warmup-steps", "2"]
    assert main(["--out", str(out), "--no-projection-alignment", "--no-save", *schedule]) == 1
    vision = [entry for entry in json.loads((out / "warmup.json").read_text()) if entry["phase"] == "vision"]
    assert vision and all(entry["batch_size"] <= batch_size for entry in vision)  # 32 is cut to the data's 28 pairs
    assert all(("pair_change_loss" in entry) == (batch_size == 16) for entry in vision)
    # the one mask step's rate: batch 32 starts its ramp of at least 18 steps, batch 16 its one-step ramp at the top
    assert vision[0]["learning_rate"] == pytest.approx(vision_learning_rate(batch_size) / vision_ramp_steps(batch_size, 1))


def test_position_table_reaches_the_nano_the_demo_builds(tmp_path, synthetic, tiny_processor, make_tiny_config,
                                                         monkeypatch, capsys):
    """`--position-table` starts the warmed-up ViT from the named table (default: the initialiser's draw); a name
    that `set_position_table` does not know is refused before any work, naming the option."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    import modeling_deltavlm.build_nano as build_nano_module
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    built = []

    def tiny_nano(seed=0, use_difference_module=True, position_table="normal", image_size=160):
        model = DeltaVLMForConditionalGeneration(make_tiny_config())
        build_nano_module.set_position_table(model, position_table)
        built.append((position_table, model.vision_model.embeddings.position_embedding.detach().clone()))
        return model, tiny_processor

    def stop_after_the_warm_up(self, save_directory, *args, **kwargs):
        raise SafetensorError("stop here: the warm-up log is written")

    monkeypatch.setattr(build_nano_module, "build_nano", tiny_nano)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", stop_after_the_warm_up)
    for table in (None, "sincos:0.5"):
        out = tmp_path / f"demo-{table}"
        shutil.copytree(synthetic, out / "data")
        option = ["--position-table", table] if table else []
        assert main(["--out", str(out), "--warmup-steps", "2", "--no-projection-alignment", "--no-save", *option]) == 1
    assert [name for name, _ in built] == ["normal", "sincos:0.5"]
    vision = make_tiny_config().vision_config
    grid = vision.image_size // vision.patch_size
    expected = 0.5 * build_nano_module.sincos_position_embeddings(grid, vision.hidden_size)
    assert torch.allclose(built[1][1][0], expected) and not torch.allclose(built[0][1][0], expected)
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--position-table", "fourier"])
    assert "--position-table" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_image_size_reaches_the_nano_and_its_patch_targets_follow_the_cell_rule(tmp_path, synthetic, make_tiny_config,
                                                                                monkeypatch, capsys):
    """`--image-size` is the side of the Nano the demo builds; where its patches split evenly into the 3x3 cells the
    warm-up's patch targets count the cell rule's pixels (12 at the synthetic 256 px), else 5% of the patch. A size
    that is no multiple of the 16 px patch is refused before any work, naming the option."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    import modeling_deltavlm.build_nano as build_nano_module
    import train.vision_warmup as vision_warmup
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from tests.conftest import build_tiny_processor

    built, rules = [], []

    def tiny_nano(seed=0, use_difference_module=True, position_table="normal", image_size=160):
        side = image_size // 16 * 14  # the tiny ViT's 14 px patches, as many a side as Nano's would be
        built.append(image_size)
        config = make_tiny_config(vision_config={**make_tiny_config().vision_config.to_dict(), "image_size": side})
        return DeltaVLMForConditionalGeneration(config), build_tiny_processor(side)

    real_warm_up = vision_warmup.warm_up_vision

    def recording_warm_up(*args, patch_target_pixels=None, **kwargs):
        rules.append(patch_target_pixels)
        return real_warm_up(*args, patch_target_pixels=patch_target_pixels, **kwargs)

    def stop_after_the_warm_up(self, save_directory, *args, **kwargs):
        raise SafetensorError("stop here: the warm-up has run")

    monkeypatch.setattr(build_nano_module, "build_nano", tiny_nano)
    monkeypatch.setattr(vision_warmup, "warm_up_vision", recording_warm_up)
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", stop_after_the_warm_up)
    for size in (None, "48", "32"):  # Nano's default 10 x 10 patches, then 3 x 3 and 2 x 2
        out = tmp_path / f"demo-{size}"
        shutil.copytree(synthetic, out / "data")
        option = ["--image-size", size] if size else []
        assert main(["--out", str(out), "--warmup-steps", "2", "--no-projection-alignment", "--no-save", *option]) == 1
    assert built == [160, 48, 32]
    assert rules == [None, 12, None]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "bad"), "--image-size", "150"])
    assert "--image-size" in capsys.readouterr().err and not (tmp_path / "bad").exists()


def test_a_run_without_tail_samples_localization_and_captions_twice(tmp_path, synthetic, tiny_model_dir, caplog):
    """Short budgets have no focused tail: their one Trainer run weights localization and captions by
    UNTAILED_TASK_WEIGHTS."""
    import logging

    import yaml

    out = tmp_path / "demo"
    shutil.copytree(synthetic, out / "data")
    shutil.copytree(tiny_model_dir, out / "nano-init")
    with caplog.at_level(logging.INFO):
        assert main(["--out", str(out), "--train-steps", "2", "--eval-limit", "2", "--no-save"]) == 0
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert config["data"]["task_weights"] == UNTAILED_TASK_WEIGHTS == {"localization": 2.0, "caption": 2.0}
    # half of the dialogues' closing rounds train on another dialogue's images (one dialogue a training pair)
    assert config["data"]["dialogue_image_swap"] == DIALOGUE_IMAGE_SWAP == 0.5
    train_records = json.loads((out / "data" / "annotations" / "changechat_train.json").read_text())
    dialogues = sum(record["id"].endswith("_dialog") for record in train_records)
    swap = next(record.getMessage() for record in caplog.records if "closing rounds" in record.getMessage())
    moved, closing = map(int, re.search(r"(\d+) of (\d+) dialogues' closing rounds", swap).groups())
    assert closing == dialogues and 0 < moved < closing
    assert not (out / "train-tail_config.yaml").exists()
    mix = next(record.getMessage() for record in caplog.records if "training mix" in record.getMessage())
    shares = dict(re.findall(r"(\w+) (\d+) \(", mix))
    assert int(shares["localization"]) == 2 * int(shares["binary"])  # one record of each a pair in the file
    assert int(shares["caption"]) == 2 * int(shares["binary"])  # one caption sample a pair (captions_per_pair first)


def test_focused_tail_ends_the_language_stage_on_localization_and_counts(tmp_path, synthetic, tiny_model_dir, capsys):
    """`--focused-tail SHARE`: the last steps train on localization and count answers only, from the mixed run's
    merged model, and the curve runs on across both runs. A tiny model stands in for the warmed-up Nano (the demo
    reuses `nano-init/` and `data/` when it finds them)."""
    import yaml

    out = tmp_path / "demo"
    shutil.copytree(synthetic, out / "data")
    shutil.copytree(tiny_model_dir, out / "nano-init")
    code = main(["--out", str(out), "--train-steps", "4", "--focused-tail", "0.5", "--eval-limit", "2", "--no-save"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "the last 2 steps: localization and count answers only" in printed
    assert (out / "model-mixed" / "config.json").is_file() and (out / "model" / "config.json").is_file()
    mixed = yaml.safe_load((out / "train_config.yaml").read_text())
    tail = yaml.safe_load((out / "train-tail_config.yaml").read_text())
    assert mixed["data"]["task_weights"] is None and mixed["training"]["max_steps"] == 2
    # the default 10-minute budget trains at batch 8 (more updates in a short run): each step a random mix of the
    # tasks, sorted by length into two micro-batches of 4
    for config in (mixed, tail):
        training = config["training"]
        assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 8
        assert training["gradient_accumulation_steps"] == 2 and training["train_sampling_strategy"] == "group_by_length"
        assert config["data"]["length_window_steps"] == 1 and config["data"]["sample_order"] == "stratified"
    assert tail["model"]["model_name_or_path"] == str(out / "model-mixed")
    assert tail["training"]["max_steps"] == 2 and tail["export"]["export_dir"] == str(out / "model")
    assert {task for task, weight in tail["data"]["task_weights"].items() if weight} == {"localization", "count"}
    curve = json.loads((out / "curve.json").read_text())
    steps = [point["step"] for point in curve]
    assert steps == sorted(steps) and steps[-1] == 4
    assert [point["minutes"] for point in curve] == sorted(point["minutes"] for point in curve)
    mixed_end = next(point for point in curve if point["step"] == 2)  # scored: the curve shows what the tail changed
    assert {"binary accuracy", "count MAE", "localization F1"} <= set(mixed_end)


def test_focused_tail_share_is_checked(tmp_path, capsys):
    assert main(["--out", str(tmp_path), "--focused-tail", "1.0"]) == 2
    assert "--focused-tail must lie in [0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize("share", ["-0.1", "1.5"])
def test_dialogue_image_swap_share_is_checked(tmp_path, capsys, share):
    assert main(["--out", str(tmp_path), "--dialogue-image-swap", share]) == 2
    assert "--dialogue-image-swap must lie in [0, 1]" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any data is written


def test_short_budgets_take_smaller_batches_and_fewer_probes():
    assert train_batch_size(10) == 8 and train_batch_size(SMALL_BATCH_BELOW_MINUTES) == 16
    # the warm-up keeps its plan where it fits 30% of the budget (the Xeon's 0.9 s mask steps); else a short budget
    # halves the batch (the EPYC's 2 s steps) and a long one cuts the steps
    # a short budget warms up at batch 16 however fast the machine (batch 32 at 3e-3 lost its mask probe in 2 of 5
    # warm-ups on a fast hour); a long one at 32, its steps cut to what fits
    assert size_warm_up(10, 120, step_seconds=0.9) == (120, 16)
    assert size_warm_up(10, 120, step_seconds=None) == (120, 16)
    assert size_warm_up(29, 348, step_seconds=0.1) == (348, 16)
    assert size_warm_up(60, 720, step_seconds=1.0) == (720, 32)
    assert size_warm_up(60, 720, step_seconds=2.0) == (385, 32)
    assert size_warm_up(60, 720, step_seconds=60.0) == (120, 32)  # never below MIN_WARMUP_STEPS
    # the halved batch takes a lower mask-phase rate (3e-3 at batch 16 stalled the mask probe on "no change") and a
    # higher Q-Former rate (its 60 steps at 1e-3 could end with the queries' change read-out at chance)
    assert vision_learning_rate(32) == 3e-3 and vision_learning_rate(16) == 1e-3
    assert qformer_learning_rate(32) == 1e-3 and qformer_learning_rate(16) == 2e-3
    assert probes_per_run(10) == 1 and probes_per_run(60) == 3
    # a short budget's small-batch mask phase also learns each pair's yes/no; a long one keeps the per-patch loss
    # alone, and so does batch 32 at its 3e-3 (where the term killed the mask probe at seed 4)
    assert change_flag_weight(10, 16) > 0 and change_flag_weight(SMALL_BATCH_BELOW_MINUTES, 16) == 0.0
    assert change_flag_weight(10, 32) == 0.0
    # batch 32's rate ramps over at least MIN_BATCH32_RAMP_STEPS (a 6-step ramp to 3e-3 killed a mask probe); the
    # ramp is a tenth of the mask steps otherwise
    assert MIN_BATCH32_RAMP_STEPS == 18
    assert vision_ramp_steps(32, 60) == 18 and vision_ramp_steps(32, 180) == 18 and vision_ramp_steps(32, 360) == 36
    assert vision_ramp_steps(16, 60) == 6 and vision_ramp_steps(16, 5) == 1
    for steps in (1, 2, 3, 7, 20, 40, 41, 661):
        for probes in (1, 3):
            every = probe_every(steps, probes)
            probed = [step for step in range(1, steps) if step % every == 0]  # CurveCallback skips the last step
            assert len(probed) <= probes
            if steps >= 2 * (probes + 1):
                assert len(probed) >= min(probes, 2), (steps, probes, probed)


def test_training_stops_at_the_deadline_and_still_exports(tmp_path, synthetic, tiny_model_dir):
    """A run sized by a step estimate that proves too low stops at the budget's deadline, with its model exported."""
    import time

    import yaml

    from train.demo import _write_train_config
    from train.run_train import main as train_main

    config_path = _write_train_config(tmp_path, tiny_model_dir, synthetic, tmp_path / "model", max_steps=6, seed=0,
                                      batch_size=2)
    training = yaml.safe_load(config_path.read_text())["training"]
    assert training["per_device_train_batch_size"] * training["gradient_accumulation_steps"] == 2
    said = []
    assert train_main(["--config", str(config_path)], callbacks=[StopAtDeadline(time.time() - 1, said.append)]) == 0
    assert said == ["the budget's deadline has passed: stopping at step 1 of 6"]
    assert (tmp_path / "model" / "config.json").is_file()


def test_learning_rate_follows_the_clock_to_zero_at_the_deadline(tmp_path, synthetic, tiny_model_dir):
    """CosineToDeadline: however many steps fit, the run ends at the deadline with the rate decayed on the clock
    (max_steps is only a bound), and the model is exported."""
    import math
    import time

    import yaml
    from transformers import TrainerCallback

    from train.deadline import CosineToDeadline
    from train.demo import NANO_LEARNING_RATE, _write_train_config
    from train.run_train import main as train_main

    class RecordRates(TrainerCallback):
        rates, ends, steps = [], [], 0

        def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
            self.rates.append(lr_scheduler.get_last_lr()[0])  # the rate the next step will use
            self.ends.append(time.time())
            self.steps = state.global_step

    class TenSecondsFromTheFirstStep(CosineToDeadline):
        # the deadline counts from the training loop's start, not from before the model and data load: on a busy
        # machine the loading alone took longer than the run's 10 s, and the first step met a passed deadline
        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = time.time()
            self.deadline = self.begin + 10
            super().on_train_begin(args, state, control, **kwargs)

    config_path = _write_train_config(tmp_path, tiny_model_dir, synthetic, tmp_path / "model", max_steps=100000,
                                      seed=0, batch_size=2)
    config = yaml.safe_load(config_path.read_text())
    config["training"]["warmup_steps"] = 2
    config_path.write_text(yaml.safe_dump(config))
    said, record = [], RecordRates()
    schedule = TenSecondsFromTheFirstStep(time.time() + 3600, said.append)
    assert train_main(["--config", str(config_path)], callbacks=[schedule, record]) == 0
    assert time.time() >= schedule.deadline and record.steps < 100000
    assert (tmp_path / "model" / "config.json").is_file()
    assert said == [f"the stage's time is up after {record.steps} steps (learning rate down to zero)"]
    assert record.rates[0] == pytest.approx(NANO_LEARNING_RATE / 2)  # warm-up: step 1 of 2

    def on_the_clock(moment: float) -> float:
        return NANO_LEARNING_RATE * 0.5 * (1 + math.cos(math.pi * min(1.0, (moment - schedule.begin) / 10)))

    # after the warm-up each step's rate is the cosine of the moment the scheduler stepped, which lies between the
    # previous step's end and its own (bounds rather than a value: a busy machine stretches the steps, not the rule;
    # with the test suite beside a demo, the 10 s held 3 steps of the tiny model)
    decay = record.rates[1:]
    for rate, previous_end, end in zip(decay, record.ends, record.ends[1:]):
        assert on_the_clock(end) - 1e-9 <= rate <= on_the_clock(previous_end) + 1e-9
    assert decay and decay == sorted(decay, reverse=True) and decay[-1] < 0.05 * NANO_LEARNING_RATE


def test_the_deadline_moves_earlier_to_leave_the_evaluation_its_steps(tmp_path, synthetic, tiny_model_dir):
    """With budget_end, CosineToDeadline keeps `steps_after` steps' worth of the run's own median step time before
    the budget's end: slower steps than timed move the deadline earlier, faster ones later, up to `latest`."""
    import time

    from train.deadline import CosineToDeadline
    from train.demo import _write_train_config
    from train.run_train import main as train_main

    config_path = _write_train_config(tmp_path, tiny_model_dir, synthetic, tmp_path / "model", max_steps=100000,
                                      seed=0, batch_size=2)
    begin = time.time()
    planned = begin + 120
    # far more steps after the stage than fit: the deadline passes as soon as three steps are timed
    callback = CosineToDeadline(planned, lambda _: None, budget_end=planned, steps_after=1e6)
    assert train_main(["--config", str(config_path)], callbacks=[callback]) == 0
    assert len(callback.step_seconds) == 3 and callback.deadline < begin
    assert time.time() - begin < 100 and (tmp_path / "model" / "config.json").is_file()
    # with room to spare the deadline stays where it was
    roomy = CosineToDeadline(planned, lambda _: None, budget_end=planned + 1e6, steps_after=1.0)
    roomy.step_seconds, roomy._last_step_end = [0.1, 0.2, 0.3], time.time()

    class Control:
        should_training_stop = False

    class State:
        global_step, max_steps = 4, 10

    roomy.on_step_end(None, State(), Control())
    assert roomy.deadline == planned
    # faster steps than timed: the deadline moves later, up to `latest`
    later = CosineToDeadline(planned, lambda _: None, budget_end=planned + 1e6, steps_after=1.0, latest=planned + 30)
    later.step_seconds, later._last_step_end = [0.1, 0.2, 0.3], time.time()
    later.on_step_end(None, State(), Control())
    assert later.deadline == planned + 30
    nearer = CosineToDeadline(planned, lambda _: None, budget_end=planned + 40, steps_after=100.0, latest=planned + 30)
    nearer.step_seconds, nearer._last_step_end = [0.1, 0.2, 0.3], time.time()
    nearer.on_step_end(None, State(), Control())
    assert nearer.deadline == pytest.approx(planned + 40 - 100 * 0.2, abs=0.05)  # the median step, 0.2 s or so
    with pytest.raises(ValueError, match="steps_after"):
        CosineToDeadline(planned, steps_after=-1)


def test_warm_up_step_timing_leaves_no_trace(synthetic, tiny_processor):
    """The demo times a mask-phase step before sizing the warm-up: no gradients left behind, the random state as
    it was, so the warm-up that follows is the one it would have been."""
    import torch

    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from train.demo import _measure_warmup_step_seconds

    from tests.conftest import tiny_config

    model = DeltaVLMForConditionalGeneration(tiny_config()).train()
    state = torch.get_rng_state()
    seconds = _measure_warmup_step_seconds(model, tiny_processor.image_processor, synthetic, batch_size=4)
    assert seconds > 0
    assert torch.equal(torch.get_rng_state(), state)
    assert all(parameter.grad is None for parameter in model.parameters())
    with pytest.raises(FileNotFoundError, match="no change masks under"):
        _measure_warmup_step_seconds(model, tiny_processor.image_processor, synthetic / "nowhere")


def test_background_generation_writes_what_write_dataset_writes(tmp_path):
    from train.demo import BackgroundGeneration

    write_dataset(tmp_path / "direct", 6, seed=5)
    generation = BackgroundGeneration(tmp_path / "background", 6, seed=5, variation="light")
    generation.wait()
    for name in ("metadata.json", "LevirCCcaptions.json", "annotations/changechat_train.json"):
        assert (tmp_path / "background" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes()
    generation.stop()  # a finished generator: nothing to end


def test_background_generation_replaces_an_unfinished_generation(tmp_path):
    """The demo generates only into a data folder without metadata.json: what is there is its own unfinished
    generation, which the generator refuses to write over unless told to."""
    from train.demo import BackgroundGeneration

    write_dataset(tmp_path / "direct", 6, seed=5)
    data = tmp_path / "background"
    write_dataset(data, 9, seed=1)
    (data / "metadata.json").unlink()  # as an interrupted run leaves it
    generation = BackgroundGeneration(data, 6, seed=5, variation="light")
    generation.wait()
    assert (data / "metadata.json").read_bytes() == (tmp_path / "direct" / "metadata.json").read_bytes()
    assert len(list((data / "images" / "train" / "A").iterdir())) == 4


def test_background_generation_failure_names_the_folder(tmp_path):
    from train.demo import BackgroundGeneration

    blocked = tmp_path / "data"
    blocked.write_text("a file where the data folder should go")
    generation = BackgroundGeneration(blocked, 4, seed=0, variation="light")
    with pytest.raises(RuntimeError, match=f"generating the synthetic data in {blocked} failed"):
        generation.wait()


def test_step_timing_runs_training_samples_through_the_collator(synthetic, tiny_model_dir):
    """The language stage is sized by timing steps of random training samples (dialogue rounds with history), read
    and encoded as the Trainer's collator does, in the demo's length-sorted micro-batches."""
    import math

    from train.demo import _measure_step_seconds

    seconds = _measure_step_seconds(tiny_model_dir, synthetic, lora=True, batch_size=4)
    assert 0 < seconds < 60 and math.isfinite(seconds)


def test_curve_probes_stop_at_the_planned_step(synthetic, tiny_processor, tiny_model):
    """A run that the clock ends has max_steps as a bound only: the curve is probed at the planned steps, not past
    them (a probe there would take time the budget did not plan)."""
    from types import SimpleNamespace

    from train.demo_results import CurveCallback

    probe = CurveCallback(synthetic, tiny_processor, every=2, num_records=2, until=4)
    probe.on_train_begin(None, None, None)
    for step in range(1, 9):
        probe.on_step_end(None, SimpleNamespace(global_step=step, max_steps=100), None, model=tiny_model)
    assert [point["step"] for point in probe.points] == [2]


def test_the_demo_batch_must_split_into_its_micro_batches(tmp_path, synthetic, tiny_model_dir):
    from train.demo import MICRO_BATCHES, _write_train_config

    with pytest.raises(ValueError, match=f"multiple of {MICRO_BATCHES}"):
        _write_train_config(tmp_path, tiny_model_dir, synthetic, tmp_path / "model", max_steps=2, seed=0,
                            batch_size=MICRO_BATCHES + 1)


def test_the_tail_deadline_is_set_when_the_tail_starts():
    from train.deadline import tail_deadline

    # the mixed run ended on plan: the tail keeps the stage's deadline
    assert tail_deadline(100.0, 20.0, latest=130.0, now=80.0) == 100.0
    # it ended late (its deadline followed faster steps): the tail still gets its planned seconds, up to `latest`
    assert tail_deadline(100.0, 20.0, latest=130.0, now=105.0) == 125.0
    assert tail_deadline(100.0, 20.0, latest=115.0, now=105.0) == 115.0
    assert tail_deadline(100.0, 20.0, latest=None, now=105.0) == 125.0


def test_the_reserve_after_the_stage_follows_the_batch_and_long_budgets_use_their_time():
    from train.demo import RESERVE_BATCH, stage_seconds, steps_after_stage

    # the evaluation costs the same at any training batch: in steps of 16 half what it is in steps of 8
    assert steps_after_stage(200, 16) == pytest.approx(steps_after_stage(200, RESERVE_BATCH) / 2)
    # the 10-minute default (EPYC numbers): planned and latest as the training share gives them
    planned, latest = stage_seconds(600.0, 220.0, 126.0)
    assert planned == pytest.approx(254.0) and latest == pytest.approx(0.62 * 600 - 110)
    # the 60-minute run (17.5 min spent, ~7 min needed after the stage): the share alone would end the stage at
    # 46 of 60 minutes; the deadline may now move up to the budget less 1.2x what follows
    planned, latest = stage_seconds(3600.0, 1050.0, 420.0)
    assert planned == pytest.approx(0.62 * 3600 - 525)
    assert latest == pytest.approx(3600 - 1050 - 1.2 * 420) and latest > planned
    # at least a minute, and never a latest end before the planned one, whatever the numbers
    planned, latest = stage_seconds(600.0, 800.0, 300.0)
    assert planned == 60.0 and latest == 60.0


def test_a_mixed_run_that_ends_late_leaves_the_focused_tail_its_time(tmp_path, synthetic, tiny_model_dir, monkeypatch):
    """The mixed run's deadline follows its own steps and may end it after the stage's planned end less the tail;
    the tail then still gets its planned seconds (up to `latest`), not one step at a zero rate."""
    import argparse
    import types

    import train.deadline
    import train.demo_results
    from train.demo import _instruction_tuning

    # the deadlines' clock (and the curve's) moves one second each time it is read, so that the steps the deadlines
    # allow are the same on any machine (on the real clock a tiny step took 0.5 s idle and over 10 s beside other
    # jobs, and this failed)
    readings = iter(range(10**9))
    clock = types.SimpleNamespace(time=lambda: float(next(readings)))
    monkeypatch.setattr(train.deadline, "time", clock)
    monkeypatch.setattr(train.demo_results, "time", clock)
    out, said = tmp_path / "demo", []
    out.mkdir()
    # planned: the stage ends at 30, the last 20 s the tail's. The budget's end is far, so after three steps the
    # mixed run's deadline moves to `latest` less the tail's 20 s: 30 (the step counts are only bounds).
    curve = _instruction_tuning(out, tiny_model_dir, synthetic, out / "model", mixed_steps=1000, tail_steps=1000,
                                args=argparse.Namespace(seed=0, frozen_llm=False, dialogue_image_swap=0.5),
                                say=said.append, batch_size=8,
                                probes=0, deadline=30.0, tail_seconds=20.0, budget_end=1e6,
                                steps_after=1.0, latest=50.0)
    mixed_end = json.loads((out / "curve-train.json").read_text())[-1]["step"]
    assert any("time is up after" in line for line in said), said  # the clock, not the step bound, ended the mixed run
    # held to the planned 30, the tail would stop after its first step (it did: 1 step against 8 now)
    assert curve[-1]["step"] - mixed_end >= 3, (said, curve)
    assert (out / "model" / "config.json").is_file() and (out / "model-mixed" / "config.json").is_file()
