"""Interrupted jobs: `deltavlm eval`, batch `deltavlm predict` and `deltavlm train` killed with SIGKILL at random
points and restarted end with the same files as an uninterrupted run.

Each job runs as a real subprocess (`python -m deltavlm_cli ...`, one torch thread) and the test kills it with
`os.kill(pid, SIGKILL)`: no handler runs, so what is on disk is all a restart gets. Kill points are drawn from a
seeded RNG; the seed is random per run (set DELTAVLM_KILL_SEED to replay one) and is printed in every failure
message along with the points used.
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_IMAGES = REPO_ROOT.parent / "shared" / "data" / "levir_cc" / "sample" / "images"
FAST = ["--num-beams", "1", "--max-new-tokens", "4"]
SEED = int(os.environ.get("DELTAVLM_KILL_SEED", random.randrange(10**6)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT),
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def deltavlm(*args) -> list[str]:
    return [sys.executable, "-m", "deltavlm_cli", *map(str, args)]


def run_to_end(command, timeout=300) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"seed {SEED}: {' '.join(command)}\n{result.stderr[-3000:]}"
    return result


def run_until_killed(command, ready, extra_delay: float, timeout=300) -> bool:
    """Start `command`, SIGKILL it `extra_delay` seconds after `ready()` first holds. Returns False when the job
    finished on its own before that (the kill point came too late), True when it was killed."""
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            if process.poll() is not None:
                return False
            if time.monotonic() > deadline:
                raise TimeoutError(f"seed {SEED}: {' '.join(command)} never reached its kill point")
            time.sleep(0.01)
        time.sleep(extra_delay)
        if process.poll() is not None:
            return False
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
        assert process.returncode == -signal.SIGKILL
        return True
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


# ---------------------------------------------------------------------------------------------
# deltavlm eval


@pytest.fixture(scope="module")
def eval_data(tmp_path_factory, sample_pairs):
    """Binary and count test files over the six sample pairs (12 records, one turn each)."""
    from processing.conversation import TASK_PROMPTS

    folder = tmp_path_factory.mktemp("eval_data")
    for task, answer in (("binary", "Yes."), ("count", "2 roads and 1 building have changed.")):
        items = []
        for k, (before, after) in enumerate(sample_pairs):
            image = [str(Path(before).relative_to(SAMPLE_IMAGES)), str(Path(after).relative_to(SAMPLE_IMAGES))]
            items.append({"id": f"{task}_{k}", "image": image, "conversations": [
                {"from": "human", "value": "<image> <image> " + TASK_PROMPTS[task]}, {"from": "gpt", "value": answer}]})
        (folder / f"changechat_test_{task}.json").write_text(json.dumps(items))
    return folder


def eval_command(model_dir, data, out):
    return deltavlm("eval", "--model", model_dir, "--data", data, "--image-root", SAMPLE_IMAGES, "--out", out,
                    "--batch-size", 2, "--no-meteor", *FAST)


OUTPUTS = ("predictions.jsonl", "metrics.json", "metrics.md", "run_config.json")


def test_eval_killed_at_random_points_resumes_to_the_same_files(model_dir, eval_data, tmp_path):
    reference = tmp_path / "reference"
    run_to_end(eval_command(model_dir, eval_data, reference))
    total = count_lines(reference / "predictions.jsonl")
    assert total == 12

    out = tmp_path / "killed"
    rng = random.Random(SEED)
    kills = []
    for attempt in range(3):  # killed up to three times, each at a random number of written lines plus a random delay
        written = count_lines(out / "predictions.jsonl")
        if written >= total:
            break
        # the first kill in the first half (so one surely lands mid-run), later ones anywhere up to the merge
        after_lines = rng.randint(written + 1, total // 2 if attempt == 0 else total)
        delay = rng.uniform(0, 0.05 if attempt == 0 else 0.2)
        killed = run_until_killed(eval_command(model_dir, eval_data, out),
                                  lambda: count_lines(out / "predictions.jsonl") >= after_lines, delay)
        kills.append((after_lines, round(delay, 3), killed))
        if not killed:
            break
    assert kills[0][2], f"seed {SEED}: the first kill did not land ({kills})"
    run_to_end(eval_command(model_dir, eval_data, out))
    for name in OUTPUTS:
        assert (out / name).read_text() == (reference / name).read_text(), f"seed {SEED}, kills {kills}: {name} differs"
    assert not list(out.glob("*.tmp")) and not list(out.glob("predictions.rank*"))


def test_eval_killed_before_any_output_starts_cleanly(model_dir, eval_data, tmp_path):
    """A kill during start-up (before the first line) leaves at most run_config.json; the rerun completes."""
    out = tmp_path / "early"
    delay = random.Random(SEED + 1).uniform(0.5, 2.0)
    assert run_until_killed(eval_command(model_dir, eval_data, out), lambda: True, delay), f"seed {SEED}"
    run_to_end(eval_command(model_dir, eval_data, out))
    assert count_lines(out / "predictions.jsonl") == 12
    assert json.loads((out / "metrics.json").read_text())["num_unscored"] == 0


# ---------------------------------------------------------------------------------------------
# deltavlm predict (batch)


def pairs_folder(root: Path, sample_pairs) -> Path:
    for side in ("A", "B"):
        (root / side).mkdir(parents=True)
    for k, (before, after) in enumerate(sample_pairs):
        os.symlink(before, root / "A" / f"pair{k}.png")
        os.symlink(after, root / "B" / f"pair{k}.png")
    return root


def test_batch_predict_killed_at_random_points_resumes_to_the_same_results(model_dir, sample_pairs, tmp_path):
    folder = pairs_folder(tmp_path / "pairs", sample_pairs)

    def command(out):
        # one pair per batch: a resumed run then runs exactly the batches of an uninterrupted one
        return deltavlm("predict", "--model", model_dir, "--pairs", folder, "--out", out, "--batch-size", 1,
                        "--task", "count", *FAST)

    reference = tmp_path / "reference.jsonl"
    run_to_end(command(reference))
    assert count_lines(reference) == 6

    out = tmp_path / "results.jsonl"
    rng = random.Random(SEED + 2)
    kills = []
    for attempt in range(2):
        if count_lines(out) >= 6:
            break
        after_lines = rng.randint(count_lines(out) + 1, 3 if attempt == 0 else 6)
        delay = rng.uniform(0, 0.05 if attempt == 0 else 0.2)
        killed = run_until_killed(command(out), lambda: count_lines(out) >= after_lines, delay)
        kills.append((after_lines, round(delay, 3), killed))
        if not killed:
            break
    assert kills[0][2], f"seed {SEED}: the first kill did not land ({kills})"
    result = run_to_end(command(out))
    assert out.read_text() == reference.read_text(), f"seed {SEED}, kills {kills}"
    assert "already in" in result.stderr


# ---------------------------------------------------------------------------------------------
# deltavlm train


def _train_helpers():
    """tests/train/test_train_run.py's workspace builders (tiny model folder, ChangeChat file, YAML config)."""
    spec = importlib.util.spec_from_file_location("_train_run_helpers", REPO_ROOT / "tests" / "train" / "test_train_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_killed_and_resumed_gives_the_same_weights(tmp_path, make_tiny_config, tiny_processor, sample_pairs):
    """8 steps saving every 2: killed at a random point after a random checkpoint (possibly while the next one is
    being written), resumed with `--resume`; checkpoint-8 and the exported model equal an uninterrupted run's."""
    helpers = _train_helpers()
    workspace = helpers.build_workspace(tmp_path / "workspace", make_tiny_config, tiny_processor, sample_pairs)
    training = {"max_steps": 8, "save_steps": 2, "learning_rate": 1e-3}

    def config(name):
        return helpers.write_config(tmp_path / f"{name}.yaml", workspace, tmp_path / name, training=training,
                                    data={"augment": "geometric"})

    run_to_end(deltavlm("train", "--config", config("straight")), timeout=600)

    rng = random.Random(SEED + 3)
    step, delay = rng.choice([2, 4, 6]), rng.uniform(0, 1.0)
    killed_dir = tmp_path / "killed"
    killed = run_until_killed(deltavlm("train", "--config", config("killed")),
                              lambda: (killed_dir / f"checkpoint-{step}" / "trainer_state.json").is_file(), delay,
                              timeout=600)
    assert killed, f"seed {SEED}: training finished before the kill (step {step}, delay {delay:.2f} s)"
    run_to_end(deltavlm("train", "--config", config("killed"), "--resume"), timeout=600)

    for name in ("checkpoint-8/model.safetensors", "final/model.safetensors"):
        expected = safetensors.torch.load_file(tmp_path / "straight" / name)
        actual = safetensors.torch.load_file(killed_dir / name)
        assert expected.keys() == actual.keys()
        assert all(torch.equal(expected[k], actual[k]) for k in expected), f"seed {SEED}, step {step}, delay {delay}: {name}"


def test_resume_skips_a_checkpoint_cut_short_while_saving(tmp_path, caplog):
    """What a kill during a save leaves: checkpoint-6 with weights but no trainer_state.json (written last). The
    Trainer's own `--resume` would pick it and fail inside the Trainer; it is skipped for the last complete one."""
    from train.run_train import complete_checkpoint

    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\x00" * 8)
        if step < 6:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-10").mkdir()
    (tmp_path / "checkpoint-10" / "trainer_state.json").write_text('{"global_step": 1')  # torn JSON
    assert complete_checkpoint(True, str(tmp_path)) == str(tmp_path / "checkpoint-4")
    assert "checkpoint-6" in caplog.text and "checkpoint-10" in caplog.text
    assert complete_checkpoint(str(tmp_path / "checkpoint-2"), str(tmp_path)) == str(tmp_path / "checkpoint-2")
    with pytest.raises(ValueError, match="checkpoint-6 is incomplete"):
        complete_checkpoint(str(tmp_path / "checkpoint-6"), str(tmp_path))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        complete_checkpoint(True, str(tmp_path / "empty"))
    assert complete_checkpoint(None, str(tmp_path)) is None
