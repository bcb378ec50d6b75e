"""Untrusted files: pickles that would run code, model folders of pickled weights, remote code, data files pointing
outside their image root, and the web app's exposure (bind address, upload cap).

The pickles here carry a real payload (`os.system("touch MARKER")` through `__reduce__`); every test asserts the
marker file is never created, i.e. the payload never ran.
"""

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import deltavlm_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE_INPUTS = REPO_ROOT.parent / "shared" / "fixtures" / "original_tiny" / "original_checkpoint"
PACKAGE_DIRS = ("modeling_deltavlm", "processing", "train", "eval", "benchmarks")


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def package_sources() -> list[Path]:
    files = [REPO_ROOT / "deltavlm_cli.py"]
    for folder in PACKAGE_DIRS:
        files += sorted((REPO_ROOT / folder).rglob("*.py"))
    return files


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def keyword(call: ast.Call, name: str):
    return next((k.value for k in call.keywords if k.arg == name), None)


def cli(capsys, *args):
    status = deltavlm_cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


# ---------------------------------------------------------------------------------------------
# grep-style checks over the package's own code


def test_every_torch_load_is_weights_only_and_nothing_else_unpickles():
    offences = []
    for path in package_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call, name in calls(tree):
            where = f"{path.relative_to(REPO_ROOT)}:{call.lineno} {name}"
            if name == "torch.load":
                value = keyword(call, "weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offences.append(f"{where} without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load", "cloudpickle.load", "pickle.Unpickler"):
                offences.append(where)
            elif name in ("np.load", "numpy.load"):
                value = keyword(call, "allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    offences.append(f"{where} with allow_pickle")
            elif name in ("eval", "exec"):
                offences.append(where)
    assert not offences, offences
    assert any("torch.load" in path.read_text() for path in package_sources())  # the check did look at something


def test_trust_remote_code_is_never_turned_on_by_the_package():
    """No call in library or CLI code passes trust_remote_code (the README documents the user-facing
    `from_pretrained(folder, trust_remote_code=True)` for machines without the package; that is the user's call,
    and the model card text that says so is a string, not a call). No command has a flag for it either."""
    offences = []
    for path in package_sources():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for call, name in calls(tree):
            value = keyword(call, "trust_remote_code")
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                offences.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno} {name}(trust_remote_code={ast.unparse(value)})")
            if name.endswith("add_argument") and any(
                isinstance(arg, ast.Constant) and "remote" in str(arg.value) for arg in call.args
            ):
                offences.append(f"{path.relative_to(REPO_ROOT)}:{call.lineno} a command-line flag for remote code")
    assert not offences, offences


# ---------------------------------------------------------------------------------------------
# the converter


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "PAYLOAD_RAN"
    yield path
    assert not path.exists(), "a pickle payload was executed"


def _convert_args(out, **overrides):
    inputs = {
        "--checkpoint": FIXTURE_INPUTS / "checkpoint_best.pth",
        "--vision": FIXTURE_INPUTS / "eva_vit_g.pth",
        "--llm": FIXTURE_INPUTS / "vicuna",
        "--qformer-tokenizer": FIXTURE_INPUTS / "bert-base-uncased",
        "--out": out,
        **overrides,
    }
    return ["convert", *[str(x) for pair in inputs.items() for x in pair]]


@pytest.mark.parametrize("layout", ["zip", "legacy"])
@pytest.mark.parametrize("flag", ["--checkpoint", "--vision"])
def test_converter_refuses_a_pth_carrying_a_payload(layout, flag, shared_dir, tmp_path, marker, capsys):
    evil = tmp_path / "checkpoint_best.pth"
    content = {"model": {"query_tokens": torch.zeros(1, 4, 32), "llm_proj.weight": Payload(marker)}}
    torch.save(content, evil, _use_new_zipfile_serialization=(layout == "zip"))
    assert not marker.exists()
    out = tmp_path / "converted"
    status, stdout, err = cli(capsys, *_convert_args(out, **{flag: evil}))
    assert status == 1 and stdout == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltavlm convert: error:"), err
    assert str(evil) in lines[0] and "refused" in lines[0] and "posix.system" in lines[0]
    assert "weights_only` set to `False` will likely succeed" not in err  # torch's advice to unpickle is not relayed
    assert not out.exists()


def test_converter_refuses_a_plain_pickle_too(tmp_path, marker, shared_dir):
    import pickle

    from modeling_deltavlm.convert_original_checkpoint import ConversionError, load_original_checkpoint

    evil = tmp_path / "checkpoint_best.pth"
    evil.write_bytes(pickle.dumps({"model": Payload(marker)}))
    with pytest.raises(ConversionError, match="checkpoint_best.pth"):
        load_original_checkpoint(evil)


# ---------------------------------------------------------------------------------------------
# model folders


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


def pickled_weights_folder(model_dir: Path, folder: Path, state_dict: dict) -> Path:
    """The model folder with model.safetensors replaced by a pytorch_model.bin holding `state_dict`."""
    shutil.copytree(model_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save(state_dict, folder / "pytorch_model.bin")
    return folder


def test_pickled_weights_folder_with_a_payload_is_refused(model_dir, tmp_path, marker, capsys):
    """transformers 5 reads pytorch_model.bin with torch.load(weights_only=True): the payload is refused, and every
    command says so in one line instead of relaying torch's advice to retry with weights_only=False."""
    from transformers import AutoModelForImageTextToText

    import modeling_deltavlm  # noqa: F401

    from eval.predict import UNSAFE_WEIGHTS

    folder = pickled_weights_folder(model_dir, tmp_path / "evil_model", {"query_tokens": Payload(marker)})
    with pytest.raises(Exception, match="Weights only load failed"):
        AutoModelForImageTextToText.from_pretrained(folder)

    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(image)
    status, _, err = cli(capsys, "predict", "--model", folder, "--before", image, "--after", image)
    assert status == 2 and err.strip() == f"deltavlm predict: error: cannot load model {folder}: {UNSAFE_WEIGHTS}"

    data = tmp_path / "changechat_test_binary.json"
    data.write_text(json.dumps([{"id": "1", "image": ["x.png", "x.png"], "conversations": [
        {"from": "human", "value": "changed?"}, {"from": "gpt", "value": "no"}]}]))
    status, _, err = cli(capsys, "eval", "--model", folder, "--data", data, "--image-root", tmp_path,
                         "--out", tmp_path / "out", "--no-meteor")
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert status == 2 and len(errors) == 1 and "refused" in errors[0] and "Traceback" not in err


def test_pickled_weights_folder_of_plain_tensors_loads_weights_only(model_dir, tmp_path):
    """A folder with only pytorch_model.bin is not refused outright: transformers 5 loads plain tensors through
    torch.load(weights_only=True), which cannot run code. (Documented in ROBUSTNESS.md.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    import modeling_deltavlm  # noqa: F401

    state_dict = load_file(model_dir / "model.safetensors")
    folder = pickled_weights_folder(model_dir, tmp_path / "bin_model", state_dict)
    loaded = AutoModelForImageTextToText.from_pretrained(folder)
    assert torch.equal(loaded.query_tokens.detach(), state_dict["query_tokens"])


# ---------------------------------------------------------------------------------------------
# data files


def test_a_data_file_cannot_reach_outside_its_image_root(tmp_path):
    """`..`, absolute paths and symlinks out of the root are refused (the path is resolved before the check)."""
    from processing.changechat_data import load_changechat

    root = tmp_path / "images"
    (root / "A").mkdir(parents=True)
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"")
    os.symlink(secret, root / "A" / "link.png")
    for path in ("../secret.png", str(secret), "A/link.png", "A/../../secret.png"):
        data = tmp_path / "changechat_test_binary.json"
        data.write_text(json.dumps([{"id": "1", "image": [path, "A/x.png"], "conversations": [
            {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}]))
        with pytest.raises(ValueError, match="escapes the image root"):
            load_changechat(data, root)


# ---------------------------------------------------------------------------------------------
# the web app


def test_serve_defaults_are_local_and_capped():
    pytest.importorskip("gradio")
    from eval.serve import build_parser

    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and args.max_upload_mb == 20.0


@pytest.mark.parametrize("extra, host", [([], "127.0.0.1"), (["--host", "0.0.0.0", "--max-upload-mb", "2"], "0.0.0.0")])
def test_serve_launch_arguments(extra, host, model_dir, monkeypatch, capsys):
    """What `deltavlm serve` hands to Gradio's launch(), captured without starting a server or a browser."""
    pytest.importorskip("gradio")
    import eval.serve

    launched = {}

    class FakeApp:
        def queue(self):
            return self

        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(eval.serve, "build_app", lambda analyst: FakeApp())
    monkeypatch.setattr(eval.serve, "load_model", lambda model, device=None: (None, None))
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "True")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "0")
    assert eval.serve.main(["--model", str(model_dir), *extra]) == 0
    upload_mb = 2 if extra else 20
    assert launched["server_name"] == host and launched["share"] is False
    assert launched["max_file_size"] == upload_mb * 2**20 and launched["allowed_paths"] is None
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
    err = capsys.readouterr().err
    assert ("reachable from other machines" in err) == (host != "127.0.0.1")


def test_serve_refuses_an_upload_over_the_cap_before_reading_it(tmp_path):
    pytest.importorskip("gradio")
    from eval.generation import GenerationSettings
    from eval.serve import PairAnalyst

    analyst = PairAnalyst(model=None, processor=None, settings=GenerationSettings(), max_upload_mb=0.001)
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * 4096)  # ~4 KB, over a 1 KB cap; never decoded
    images, overlay, state, status = analyst.load_pair(str(big), str(big))
    assert images is None and state is None and status.startswith("Error:") and "big.png is larger than" in status
