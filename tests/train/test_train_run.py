"""End-to-end `deltavlm train` runs on CPU with the tiny model and a small ChangeChat-format data set built from
the six real LEVIR-CC sample pairs: loss goes down, only the trainable set changes, checkpoints hold only
trainable weights, resume is exact, 2-process DDP matches 1 process, LoRA trains / reloads / merges.

Measured numbers are printed (run with `-s` to see them)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_ROOT = REPO_ROOT.parent / "shared" / "data" / "levir_cc" / "sample"


# --- helpers: a tiny model folder, a ChangeChat-format data set over the sample pairs, configs ---


def write_changechat(path: Path, sample_pairs) -> Path:
    """Instruction records (binary, count, a two-round dialogue) for each sample pair, paths relative to the
    sample image root, as ChangeChat files reference LEVIR-CC images."""
    root = SAMPLE_ROOT / "images"
    captions = {image["filename"]: image["sentences"][0]["raw"].strip()
                for image in json.loads((SAMPLE_ROOT / "captions.json").read_text())["images"]}
    binary = "<image> <image> Please judge whether these two images have changed. Please answer yes or no."
    records = []
    for i, (before, after) in enumerate(sample_pairs):
        pair = [str(Path(before).relative_to(root)), str(Path(after).relative_to(root))]
        records.append({"id": f"binary_{i}", "image": pair,
                        "conversations": [{"from": "human", "value": binary}, {"from": "gpt", "value": "Yes."}]})
        records.append({"id": f"count_{i}", "image": pair, "conversations": [
            {"from": "human", "value": "<image> <image> Please determine how many roads and buildings have changed?"},
            {"from": "gpt", "value": f"{i % 3} roads and {i + 2} buildings have changed."}]})
        records.append({"id": f"dialogue_{i}", "image": pair, "conversations": [
            {"from": "human", "value": binary}, {"from": "gpt", "value": "Yes."},
            {"from": "human", "value": "Based on the above analysis, please describe the changes of these two images in detail."},
            {"from": "gpt", "value": captions[Path(before).name]}]})
    path.write_text(json.dumps(records))
    return path


def build_workspace(tmp: Path, tiny_config, processor, sample_pairs) -> dict:
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    # A random LLM at the usual init (std 0.02) barely reads the query positions (its attention outputs are tiny),
    # so no trainable weight can move its loss; std 0.2 makes it depend on its soft prompt like a pretrained one.
    text_config = tiny_config().text_config.to_dict() | {"initializer_range": 0.2}
    qformer_config = tiny_config().qformer_config.to_dict()
    folders = {}
    for name, overrides in {
        "model": {},
        "model_no_dropout": {"difference_dropout": 0.0, "qformer_config": qformer_config | {
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}},
    }.items():
        torch.manual_seed(0)
        config = tiny_config(text_config=text_config, **overrides)
        DeltaVLMForConditionalGeneration(config).save_pretrained(tmp / name)
        processor.save_pretrained(tmp / name)
        folders[name] = tmp / name
    workspace = {**folders, "train_file": write_changechat(tmp / "changechat_train.json", sample_pairs),
                 "processor": processor}

    def batch():
        from train.collator import TrainCollator

        return TrainCollator(processor)(training_samples(workspace).select(range(8)).to_list())

    workspace["batch"] = batch
    return workspace


def training_samples(workspace):
    from train.args import DataArguments
    from train.data import load_train_records, records_to_samples

    return records_to_samples(load_train_records(data_arguments(workspace, DataArguments)))


def data_arguments(workspace, cls):
    return cls(train_files=[str(workspace["train_file"])], image_root=str(SAMPLE_ROOT / "images"),
               levircc_captions=str(SAMPLE_ROOT / "captions.json"), val_split="test")


def write_config(path, workspace, output_dir, training=None, data=None, model=None, model_folder=None) -> Path:
    config = {
        "model": {"model_name_or_path": str(model_folder or workspace["model"]), **(model or {})},
        "data": {"train_files": [str(workspace["train_file"])], "image_root": str(SAMPLE_ROOT / "images"),
                 "levircc_captions": str(SAMPLE_ROOT / "captions.json"), "val_split": "test", **(data or {})},
        "eval": {"eval_max_new_tokens": 5},
        "training": {"output_dir": str(output_dir), "use_cpu": True, "seed": 0, "per_device_train_batch_size": 4,
                     "per_device_eval_batch_size": 2, "logging_steps": 1, "save_strategy": "steps",
                     "dataloader_num_workers": 0, "disable_tqdm": True, **(training or {})},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def load_folder(folder):
    from transformers import AutoModelForImageTextToText

    import modeling_deltavlm  # noqa: F401

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def mean_loss(model, workspace) -> float:
    from train.collator import TrainCollator

    samples = training_samples(workspace).to_list()
    collator = TrainCollator(workspace["processor"])
    losses = [model(**collator(samples[i : i + 8])).loss.item() for i in range(0, len(samples), 8)]
    return sum(losses) / len(losses)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny model is latency-bound: two threads on two shared cores run ~10x slower than one.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_dir, make_tiny_config, tiny_processor, sample_pairs):
    return build_workspace(tmp_path_factory.mktemp("train"), make_tiny_config, tiny_processor, sample_pairs)


def run_main(config_path, *overrides):
    from train.run_train import main

    assert main(["--config", str(config_path), *map(str, overrides)]) == 0


def checkpoint_weights(folder) -> dict:
    return safetensors.torch.load_file(Path(folder) / "model.safetensors")


# --- 1 + 5: training lowers the loss, touches only the trainable set; checkpoint contents ---


def test_training_lowers_loss_and_changes_only_trainable_weights(workspace, tmp_path):
    output_dir = tmp_path / "run"
    config = write_config(
        tmp_path / "config.yaml", workspace, output_dir,
        training={"max_steps": 30, "learning_rate": 3e-3, "save_steps": 30, "eval_strategy": "steps", "eval_steps": 30,
                  "activation_checkpointing": True},
    )
    initial = load_folder(workspace["model"])
    loss_before = mean_loss(initial, workspace)
    run_main(config)
    final = load_folder(output_dir / "final")
    loss_after = mean_loss(final, workspace)
    print(f"\nmean training loss over all samples: before {loss_before:.4f}, after 30 steps {loss_after:.4f}")
    assert loss_after < loss_before - 0.3

    trainable = set(initial.set_trainable_as_paper() and [n for n, p in initial.named_parameters() if p.requires_grad])
    before, after = dict(initial.named_parameters()), dict(final.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    frozen_changed = sorted(changed - trainable)
    assert not frozen_changed, f"frozen weights changed: {frozen_changed[:5]}"
    # the key third of the trainable ViT blocks' qkv bias is held at zero, so compare per tensor only where it can move
    untouched = sorted(trainable - changed)
    assert len(untouched) <= 0.05 * len(trainable), f"trainable weights that never moved: {untouched[:5]}"
    log = json.loads((output_dir / "checkpoint-30" / "trainer_state.json").read_text())["log_history"]
    assert any("eval_bleu_4" in entry for entry in log), "generation-based validation did not run"

    # 5: the checkpoint holds exactly the trainable weights: no language model, no frozen ViT block
    weights = checkpoint_weights(output_dir / "checkpoint-30")
    assert set(weights) == trainable
    assert not any(key.startswith("language_model.") for key in weights)
    num_layers = initial.config.vision_config.num_hidden_layers
    frozen_blocks = [f"vision_model.encoder.layers.{i}." for i in range(num_layers - 2)]
    assert not any(key.startswith(tuple(frozen_blocks)) for key in weights)
    assert not any(key.startswith("vision_model.embeddings.") for key in weights)
    checkpoint_bytes = (output_dir / "checkpoint-30" / "model.safetensors").stat().st_size
    full_bytes = (output_dir / "final" / "model.safetensors").stat().st_size
    print(f"checkpoint weights {checkpoint_bytes / 1e6:.2f} MB vs complete export {full_bytes / 1e6:.2f} MB "
          f"(tiny model: the Q-Former's 30523-row word embedding dominates both)")
    assert not (output_dir / "checkpoint-30" / "config.json").exists()  # a checkpoint is not a loadable model


def test_full_size_checkpoint_is_about_1gb():
    """At the paper's size the trainable set is ~253M parameters: ~1.0 GB in fp32 (computed on the meta device)."""
    from modeling_deltavlm import DeltaVLMConfig, DeltaVLMForConditionalGeneration

    with torch.device("meta"):
        model = DeltaVLMForConditionalGeneration(DeltaVLMConfig())
    model.set_trainable_as_paper()
    trainable_bytes = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    total_bytes = sum(p.numel() * 4 for p in model.parameters())
    print(f"\nfull size: checkpoint {trainable_bytes / 1e9:.3f} GB of {total_bytes / 1e9:.1f} GB (fp32)")
    assert 0.9e9 < trainable_bytes < 1.1e9


# --- 3: resume is exact ---


def test_resume_continues_bit_for_bit(workspace, tmp_path):
    """Run 14 steps saving at 7, then start a new run from checkpoint-7 (what an interrupted run leaves behind) and
    compare step 14. Dropout and the paired augmentation draw random numbers, so this also checks the RNG state is
    restored; the task weights thin binary samples at random, so also that the resumed run trains on the same mix.
    43 samples, count doubled (+6), binary thinned (-~3): ~46 samples / batch 4 = ~12 steps an epoch, so the
    resumed part crosses an epoch."""
    common = {"max_steps": 14, "save_steps": 7, "learning_rate": 1e-3}
    data = {"augment": "geometric", "task_weights": {"count": 2, "binary": 0.5}}
    straight = tmp_path / "straight"
    run_main(write_config(tmp_path / "a.yaml", workspace, straight, training=common, data=data,
                          model_folder=workspace["model"]))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    os.symlink(straight / "checkpoint-7", resumed / "checkpoint-7")
    run_main(write_config(tmp_path / "b.yaml", workspace, resumed, training=common, data=data,
                          model_folder=workspace["model"]), "--resume")
    expected, actual = checkpoint_weights(straight / "checkpoint-14"), checkpoint_weights(resumed / "checkpoint-14")
    max_diff = max((expected[k] - actual[k]).abs().max().item() for k in expected)
    print(f"\nresume from step 7 vs uninterrupted, step 14: max |diff| = {max_diff}")
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
    # the Trainer trained on the weighted set: its epoch length is the weighted sample count's
    from train.data import weigh_tasks

    num_samples = len(weigh_tasks(training_samples(workspace), data["task_weights"], seed=0))
    assert num_samples != len(training_samples(workspace))
    state = json.loads((resumed / "checkpoint-14" / "trainer_state.json").read_text())
    assert state["epoch"] == pytest.approx(14 / -(-num_samples // 4))


def test_the_export_records_the_training_template(workspace, tmp_path):
    from eval.generation import model_prompt_format

    output_dir = tmp_path / "plain"
    run_main(write_config(tmp_path / "plain.yaml", workspace, output_dir, training={"max_steps": 1},
                          data={"template": "plain"}))
    assert model_prompt_format(str(output_dir / "final")) == "plain"


# --- 4: LoRA ---


def test_lora_trains_saves_reloads_and_merges(workspace, tmp_path):
    from train.export import load_lora_adapter

    output_dir = tmp_path / "lora"
    config = write_config(
        tmp_path / "lora.yaml", workspace, output_dir,
        training={"max_steps": 6, "save_steps": 6, "learning_rate": 3e-3, "activation_checkpointing": True,
                  "eval_strategy": "steps", "eval_steps": 6},
        model={"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": ["q_proj", "v_proj"]},
    )
    run_main(config)
    state = json.loads((output_dir / "checkpoint-6" / "trainer_state.json").read_text())
    assert any("eval_bleu_4" in entry for entry in state["log_history"])  # generation through the PeftModel
    weights = checkpoint_weights(output_dir / "checkpoint-6")
    lora_keys = [k for k in weights if "lora_" in k]
    assert lora_keys and all(".language_model." in k for k in lora_keys)
    assert any("query_tokens" in k for k in weights) and any(".qformer." in k for k in weights)
    assert not any(".language_model." in k and "lora_" not in k for k in weights), "frozen LLM weights in checkpoint"
    assert any(weights[k].abs().max() > 0 for k in lora_keys if "lora_B" in k), "LoRA B never moved from zero"

    adapter = output_dir / "final" / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    reloaded = load_lora_adapter(load_folder(workspace["model"]), str(adapter)).eval()
    merged = load_folder(output_dir / "final")
    assert not any("lora" in name for name, _ in merged.named_parameters())
    batch = workspace["batch"]()
    with torch.no_grad():
        logits_adapter = reloaded(**batch).logits
        logits_merged = merged(**batch).logits
        logits_base = load_folder(workspace["model"])(**batch).logits
    diff = (logits_adapter - logits_merged).abs().max().item()
    print(f"\nLoRA: adapter-reloaded vs merged export, max |logit diff| = {diff:.2e}; "
          f"vs untrained base {(logits_adapter - logits_base).abs().max().item():.2e}")
    assert diff < 1e-4
    assert (logits_adapter - logits_base).abs().max().item() > 1e-3


def lora_model_as_trained(workspace):
    """The tiny model under LoRA as `deltavlm train` sets it up, adapters and the non-LLM trainables moved off
    their initial values as training would move them."""
    from types import SimpleNamespace

    from train.model import apply_lora, freeze_as_paper

    model = load_folder(workspace["model"])
    freeze_as_paper(model)
    lora = SimpleNamespace(qlora=False, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj", "v_proj"])
    torch.manual_seed(0)  # peft draws lora_A from the global generator: the same model on every call
    peft_model = apply_lora(model, lora)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return peft_model.eval()


def test_lora_adapter_folder_loads_whole_through_the_standard_paths(workspace, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from train.export import export_model

    peft_model = lora_model_as_trained(workspace)
    adapter = export_model(peft_model, workspace["processor"], str(tmp_path / "final"), merge_lora=False)
    batch = workspace["batch"]()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        # transformers' PEFT integration: the base model named in adapter_config.json, then the adapter file
        auto = AutoModelForImageTextToText.from_pretrained(adapter, dtype=torch.float32).eval()
        assert torch.allclose(auto(**batch).logits, expected, atol=1e-5)
        # peft's own path
        via_peft = PeftModel.from_pretrained(load_folder(workspace["model"]), adapter).eval()
        assert torch.allclose(via_peft(**batch).logits, expected, atol=1e-5)
    trained = peft_model.get_base_model()
    for name in ("query_tokens", "language_projection.weight", "qformer.encoder.layer.0.attention.attention.query.weight"):
        assert torch.equal(dict(auto.named_parameters())[name], dict(trained.named_parameters())[name]), name


def test_gathered_state_dict_of_a_lora_model_exports_as_the_merged_model(workspace, tmp_path):
    """DeepSpeed ZeRO-3 / FSDP + LoRA + merge_lora: `deltavlm train` passes the PeftModel's gathered state dict
    (`accelerator.get_state_dict`) while each process's live parameters are empty partitions. Simulated on CPU."""
    from transformers import AutoModelForImageTextToText

    from train.export import export_model

    gathered = {name: value.clone() for name, value in lora_model_as_trained(workspace).state_dict().items()}
    sharded = lora_model_as_trained(workspace)
    for param in sharded.parameters():  # what ZeRO-3 leaves outside a gather
        param.data = torch.empty(0, dtype=param.dtype)
    export_model(sharded, workspace["processor"], str(tmp_path / "gathered"), state_dict=gathered)
    export_model(lora_model_as_trained(workspace), workspace["processor"], str(tmp_path / "plain"))

    for file in ("model.safetensors", "adapter/adapter_model.safetensors"):
        plain = safetensors.torch.load_file(tmp_path / "plain" / file)
        exported = safetensors.torch.load_file(tmp_path / "gathered" / file)
        assert sorted(exported) == sorted(plain), file
        for name in plain:
            assert torch.allclose(exported[name], plain[name], atol=1e-6), f"{file}: {name}"
    _, info = AutoModelForImageTextToText.from_pretrained(tmp_path / "gathered", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    reference = lora_model_as_trained(workspace)
    batch = workspace["batch"]()
    with torch.no_grad():
        assert torch.allclose(load_folder(tmp_path / "gathered")(**batch).logits, reference(**batch).logits, atol=1e-4)


def test_persistent_dataloader_workers_see_each_epoch(workspace, tmp_path, monkeypatch):
    """paper.yaml keeps its workers for the whole run; their copies of the collator must still learn the epoch,
    or the augmentation repeats epoch 0's draws in every epoch."""
    import train.run_train
    from train.collator import TrainCollator

    log = tmp_path / "collated.txt"

    class RecordingCollator(TrainCollator):
        def __call__(self, samples):
            with open(log, "a") as handle:  # written from the worker processes
                handle.write(f"{os.getpid()} {self.epoch}\n")
            return super().__call__(samples)

    monkeypatch.setattr(train.run_train, "TrainCollator", RecordingCollator)
    config = write_config(
        tmp_path / "workers.yaml", workspace, tmp_path / "out",
        training={"num_train_epochs": 2, "per_device_train_batch_size": 8, "save_strategy": "no",
                  "dataloader_num_workers": 2, "dataloader_persistent_workers": True},
        data={"augment": "crop", "val_split": None},
    )
    run_main(config, "--skip_export", "true")
    calls = [line.split() for line in log.read_text().splitlines()]
    assert all(int(pid) != os.getpid() for pid, _ in calls)  # the batches were made in the workers
    epochs = [int(epoch) for _, epoch in calls]
    steps_per_epoch = -(-len(training_samples(workspace)) // 8)  # the last batch may be short
    assert epochs == [0] * steps_per_epoch + [1] * steps_per_epoch


def test_encoder_learning_rate_zero_freezes_the_encoder_side_only(workspace, tmp_path):
    """`encoder_learning_rate: 0` (with LoRA, as the Nano demo trains after its warm-up): ViT, CSRM, Q-Former and
    queries keep their weights; the projection and the adapters train."""
    output_dir = tmp_path / "encoder_lr"
    config = write_config(
        tmp_path / "encoder_lr.yaml", workspace, output_dir,
        training={"max_steps": 3, "save_strategy": "no", "learning_rate": 3e-3, "weight_decay": 0.1},
        model={"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": ["q_proj"],
               "encoder_learning_rate": 0.0},
        data={"val_split": None},
    )
    run_main(config)
    initial, final = load_folder(workspace["model"]), load_folder(output_dir / "final")
    before, after = dict(initial.named_parameters()), dict(final.named_parameters())
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    encoder = [n for n in changed if n.startswith(("vision_model.", "difference_module.", "qformer.", "query_tokens"))]
    assert not encoder, f"encoder weights moved at learning rate 0: {encoder[:5]}"
    assert any(n.startswith("language_projection.") for n in changed)
    assert any(n.startswith("language_model.") and n.endswith("q_proj.weight") for n in changed)  # merged LoRA


def test_modules_that_do_not_train_run_without_dropout(workspace, tmp_path):
    """During training, a module none of whose weights train runs in eval mode (its dropout off), unless
    `model.frozen_dropout` keeps it on; what trains stays in training mode."""
    from transformers import TrainerCallback

    from train.run_train import main

    class RecordModes(TrainerCallback):
        def __init__(self):
            self.modes = {}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            for name, module in model.named_modules():
                for part in ("difference_module", "qformer", "language_projection"):
                    if name.split(".")[-1] == part:
                        module.register_forward_hook(
                            lambda module, inputs, output, part=part: self.modes.setdefault(part, set()).add(module.training))

    def modes_of(name, **model_args):
        config = write_config(tmp_path / f"{name}.yaml", workspace, tmp_path / name,
                              training={"max_steps": 1, "save_strategy": "no"}, data={"val_split": None},
                              model=model_args)
        recorder = RecordModes()
        assert main(["--config", str(config), "--skip_export", "true"], callbacks=[recorder]) == 0
        return recorder.modes

    lora = {"lora": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "lora_target_modules": ["q_proj"]}
    frozen = modes_of("frozen", encoder_learning_rate=0.0, **lora)
    assert frozen == {"difference_module": {False}, "qformer": {False}, "language_projection": {True}}
    kept = modes_of("kept", encoder_learning_rate=0.0, frozen_dropout=True, **lora)
    assert kept == {"difference_module": {True}, "qformer": {True}, "language_projection": {True}}
    paper = modes_of("paper")  # the paper's trainable set: CSRM and Q-Former train
    assert paper == {"difference_module": {True}, "qformer": {True}, "language_projection": {True}}


def test_encoder_learning_rate_groups(workspace):
    from transformers import TrainingArguments

    from train.trainer import DeltaVLMTrainer

    model = load_folder(workspace["model"])
    model.set_trainable_as_paper()
    args = TrainingArguments(output_dir="unused", learning_rate=1e-3, weight_decay=0.05, use_cpu=True, report_to="none")
    optimizer = DeltaVLMTrainer(model=model, args=args, encoder_learning_rate=1e-5).create_optimizer()
    by_id = {id(p): n for n, p in model.named_parameters()}
    groups = {(g["lr"], g["weight_decay"]): {by_id[id(p)] for p in g["params"]} for g in optimizer.param_groups}
    assert set(groups) == {(1e-3, 0.05), (1e-3, 0.0), (1e-5, 0.05), (1e-5, 0.0)}
    assert {n.split(".")[0] for key in [(1e-5, 0.05), (1e-5, 0.0)] for n in groups[key]} == {
        "vision_model", "difference_module", "qformer", "query_tokens"}
    assert {n.split(".")[0] for key in [(1e-3, 0.05), (1e-3, 0.0)] for n in groups[key]} == {"language_projection"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set().union(*groups.values()) == trainable
    with pytest.raises(ValueError, match="encoder_learning_rate"):
        DeltaVLMTrainer(model=model, args=args, encoder_learning_rate=-1.0)


def test_group_by_length_batches_samples_of_similar_length_in_short_windows(workspace):
    """`train_sampling_strategy: group_by_length` reads the samples' `length` column (characters of prompt and
    answer) and sorts within windows of LENGTH_WINDOW_BATCHES batches: every sample once an epoch, consecutive batches
    of similar length, and no run-long curriculum from long to short as the Trainer's 50-batch windows give."""
    from transformers import TrainingArguments

    from train.trainer import LENGTH_WINDOW_BATCHES, DeltaVLMTrainer, WindowedLengthGroupedSampler

    samples = training_samples(workspace)
    assert samples["length"] == [len(p) + len(a) for p, a in zip(samples["prompt"], samples["answer"])]
    lengths = list(range(1, 101)) * 2  # 200 samples, batches of 4
    sampler = WindowedLengthGroupedSampler(4, lengths=lengths)
    torch.manual_seed(0)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    window = 4 * LENGTH_WINDOW_BATCHES
    for start in range(0, 200, window):
        chunk = [lengths[i] for i in order[start : start + window]]
        # sorted long to short, but for the first place: the Trainer's function swaps the longest sample of all to
        # the very front (an out-of-memory error shows at once)
        assert chunk[1:] == sorted(chunk[1:], reverse=True)
    assert lengths[order[0]] == max(lengths)
    padding = sum(max(lengths[i] for i in order[b : b + 4]) * 4 - sum(lengths[i] for i in order[b : b + 4])
                  for b in range(0, 200, 4))
    assert padding < 0.3 * sum(lengths)  # random batches of 4 pad ~58% of it here, windows of 4 batches ~18%
    first_windows = [lengths[i] for i in order[:window]], [lengths[i] for i in order[window : 2 * window]]
    assert min(first_windows[0]) < max(first_windows[1])  # the next window starts long again

    model = load_folder(workspace["model"])
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             train_sampling_strategy="group_by_length")
    trainer = DeltaVLMTrainer(model=model, args=args, train_dataset=samples)
    assert isinstance(trainer._get_train_sampler(), WindowedLengthGroupedSampler)
    plain = DeltaVLMTrainer(model=model, args=TrainingArguments(output_dir="unused", use_cpu=True, report_to="none"),
                            train_dataset=samples)
    assert not isinstance(plain._get_train_sampler(), WindowedLengthGroupedSampler)


def test_a_one_step_window_sorts_each_steps_mix_into_micro_batches(workspace):
    """`length_window_steps: 1` with gradient accumulation: every optimizer step draws a random mix (not a run of
    one length, i.e. one task), and only its own samples are sorted, long ones into the first micro-batch."""
    from transformers import TrainingArguments

    from train.trainer import DeltaVLMTrainer, WindowedLengthGroupedSampler

    samples = training_samples(workspace)
    model = load_folder(workspace["model"])
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", per_device_train_batch_size=2,
                             gradient_accumulation_steps=2, train_sampling_strategy="group_by_length")
    sampler = DeltaVLMTrainer(model=model, args=args, train_dataset=samples, length_window_steps=1)._get_train_sampler()
    assert isinstance(sampler, WindowedLengthGroupedSampler) and sampler.window == 1 and sampler.batch_size == 4

    lengths = list(range(1, 101)) * 2
    sampler = WindowedLengthGroupedSampler(4, lengths=lengths, window=1)
    torch.manual_seed(0)
    order = list(sampler)
    assert sorted(order) == list(range(200))
    steps = [[lengths[i] for i in order[start : start + 4]] for start in range(0, 200, 4)]
    assert all(step[1:] == sorted(step[1:], reverse=True) for step in steps)  # the first: the swapped-in longest
    # each step spans the lengths as a random draw of 4 does, not a narrow band as a long window's batches do
    assert sum(max(step) - min(step) for step in steps) / len(steps) > 30
    with pytest.raises(ValueError, match="length_window_steps must be >= 1"):
        DeltaVLMTrainer(model=model, args=args, length_window_steps=0)



def test_stratified_sample_order_from_the_config(workspace, tmp_path):
    """`data.sample_order: stratified` (the demo's language stage): the run's batches come from
    `StratifiedLengthGroupedSampler` over the samples' (task, answer), a step's samples sorted by length into its
    micro-batches; the default stays the random permutation; an unknown order is refused by name."""
    from transformers import TrainerCallback, TrainingArguments

    from train.run_train import main
    from train.sample_order import StratifiedLengthGroupedSampler
    from train.trainer import DeltaVLMTrainer

    class RecordSampler(TrainerCallback):
        samplers = []

        def on_train_begin(self, args, state, control, train_dataloader=None, **kwargs):
            self.samplers.append(train_dataloader.batch_sampler.sampler)

    training = {"max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2,
                "train_sampling_strategy": "group_by_length", "save_strategy": "no"}
    config = write_config(tmp_path / "stratified.yaml", workspace, tmp_path / "stratified", training=training,
                          data={"sample_order": "stratified", "length_window_steps": 1})
    assert main(["--config", str(config)], callbacks=[RecordSampler()]) == 0
    sampler = RecordSampler.samplers[-1]
    samples = training_samples(workspace)
    assert isinstance(sampler, StratifiedLengthGroupedSampler) and sampler.window_size == 4
    assert sampler.keys == list(zip(samples["task"], samples["answer"]))
    assert (tmp_path / "stratified" / "final" / "config.json").is_file()

    model = load_folder(workspace["model"])
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to="none", per_device_train_batch_size=2)
    assert not isinstance(DeltaVLMTrainer(model=model, args=args, train_dataset=samples)._get_train_sampler(),
                          StratifiedLengthGroupedSampler)
    plain = DeltaVLMTrainer(model=model, args=args, train_dataset=samples, sample_order="stratified")
    assert plain._get_train_sampler().window_size is None  # no length grouping asked: the order alone
    with pytest.raises(ValueError, match="needs the training samples' columns \\['task'\\]"):
        DeltaVLMTrainer(model=model, args=args, train_dataset=samples.remove_columns("task"),
                        sample_order="stratified")._get_train_sampler()
    with pytest.raises(ValueError, match="sample_order must be one of"):
        DeltaVLMTrainer(model=model, args=args, sample_order="balanced")
    with pytest.raises(ValueError, match="sample_order: 'balanced' is not one of \\['random', 'stratified'\\]"):
        main(["--config", str(config), "--sample_order", "balanced"])  # before any data or model is loaded


# --- 2: two processes (DDP, gloo on CPU) ---


def test_two_process_run_matches_one_process(workspace, tmp_path):
    """Same global batch (1 x 4 vs 2 x 2), dropout off, 4 steps. The Trainer averages the loss over the tokens of the
    whole global batch (average_tokens_across_devices), so both runs take the same steps up to float rounding."""
    # plain SGD: the update is linear in the gradient, so the weights compare the gradients themselves (Adam's first
    # steps are ~lr * sign(gradient), which turns rounding noise in near-zero gradients into full-size updates)
    training = {"max_steps": 4, "save_steps": 4, "optim": "sgd", "learning_rate": 0.5, "eval_strategy": "steps",
                "eval_steps": 4}
    single = tmp_path / "single"
    run_main(write_config(tmp_path / "one.yaml", workspace, single, training={**training, "per_device_train_batch_size": 4},
                          model_folder=workspace["model_no_dropout"]))
    double = tmp_path / "double"
    config = write_config(tmp_path / "two.yaml", workspace, double, training={**training, "per_device_train_batch_size": 2},
                          model_folder=workspace["model_no_dropout"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO_ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
               "-m", "train.run_train", "--config", str(config)]
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    # same checkpoint format; the RNG state is saved per process (rng_state_0.pth, rng_state_1.pth)
    files_single, files_double = set(os.listdir(single / "checkpoint-4")), set(os.listdir(double / "checkpoint-4"))
    assert files_double - {"rng_state_0.pth", "rng_state_1.pth"} == files_single - {"rng_state.pth"}
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= files_double
    one, two = checkpoint_weights(single / "checkpoint-4"), checkpoint_weights(double / "checkpoint-4")
    assert set(one) == set(two)
    max_diff = max((one[k] - two[k]).abs().max().item() for k in one)
    initial = load_folder(workspace["model_no_dropout"]).state_dict()
    max_update = max((one[k] - initial[k]).abs().max().item() for k in one)
    losses = [[e["loss"] for e in json.loads((run / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for run in (single, double)]
    print(f"\n1 vs 2 processes after 4 steps: max |weight diff| {max_diff:.2e} (largest update {max_update:.2e}); "
          f"losses {losses[0]} vs {losses[1]}")
    assert max_diff < 1e-5
    assert max_update > 1e-3
    assert (double / "final" / "model.safetensors").is_file()


def test_length_sorted_micro_batches_take_the_steps_of_one_batch(workspace, tmp_path):
    """The demo's steps: a step's samples sorted by length into micro-batches (`length_window_steps: 1`, gradient
    accumulation). The Trainer scales the loss by the step's token count, not per micro-batch, so 2 x 2 takes the
    same steps as one batch of 4 up to float rounding (SGD: the weights compare the gradients; dropout off)."""
    training = {"max_steps": 2, "save_steps": 2, "optim": "sgd", "learning_rate": 0.5,
                "train_sampling_strategy": "group_by_length"}
    runs = {}
    for name, batch, accumulation in (("one", 4, 1), ("micro", 2, 2)):
        config = write_config(tmp_path / f"{name}.yaml", workspace, tmp_path / name, data={"length_window_steps": 1},
                              training={**training, "per_device_train_batch_size": batch,
                                        "gradient_accumulation_steps": accumulation},
                              model_folder=workspace["model_no_dropout"])
        run_main(config)
        runs[name] = checkpoint_weights(tmp_path / name / "checkpoint-2")
    initial = load_folder(workspace["model_no_dropout"]).state_dict()
    max_diff = max((runs["one"][k] - runs["micro"][k]).abs().max().item() for k in runs["one"])
    max_update = max((runs["one"][k] - initial[k]).abs().max().item() for k in runs["one"])
    assert max_diff < 1e-5 and max_update > 1e-3


# --- set-up pieces: InstructBLIP init, optimizer grouping, mixed precision, referenced-LLM export ---


def test_init_from_instructblip_loads_shared_weights(workspace, tmp_path, tiny_processor, make_tiny_config):
    from transformers import BlipImageProcessor, InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor

    from train.args import ModelArguments
    from train.model import load_model_and_processor

    tiny = make_tiny_config()
    config = InstructBlipConfig(vision_config=tiny.vision_config.to_dict(), qformer_config=tiny.qformer_config.to_dict(),
                                text_config=tiny.text_config.to_dict(), num_query_tokens=4,
                                image_token_index=tiny_processor.image_token_id)
    torch.manual_seed(1)
    instructblip = InstructBlipForConditionalGeneration(config)
    instructblip.save_pretrained(tmp_path / "instructblip")
    InstructBlipProcessor(BlipImageProcessor(size={"height": 28, "width": 28}), tiny_processor.tokenizer,
                          tiny_processor.qformer_tokenizer, num_query_tokens=4).save_pretrained(tmp_path / "instructblip")

    model, processor = load_model_and_processor(
        ModelArguments(model_name_or_path=str(tmp_path / "instructblip"), init_from_instructblip=True))
    source = instructblip.state_dict()
    loaded = model.state_dict()
    shared = [k for k in loaded if not k.startswith("difference_module.")]
    assert all(torch.equal(loaded[k], source[k]) for k in shared if k in source)
    assert {k for k in shared if k not in source} <= {"language_model.lm_head.weight"}  # tied in the tiny config
    assert any(k.startswith("difference_module.") for k in loaded)
    assert processor.image_token_id == model.config.image_token_id
    assert processor(images=[workspace_pair()], text=["q"], answers=["a"])["pixel_values"].shape[-1] == 28


def workspace_pair():
    before = next(iter(sorted((SAMPLE_ROOT / "images").glob("*/A/*.png"))))
    return str(before), str(before.parent.parent / "B" / before.name)


def test_weight_decay_only_on_matrices(workspace):
    from transformers import TrainingArguments

    from train.trainer import DeltaVLMTrainer

    model = load_folder(workspace["model"])
    model.set_trainable_as_paper()
    trainer = DeltaVLMTrainer(model=model, args=TrainingArguments(output_dir="unused", use_cpu=True, weight_decay=0.05,
                                                                   report_to="none"))
    optimizer = trainer.create_optimizer()
    by_id = {id(p): (name, p) for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for param in group["params"]:
            name, _ = by_id[id(param)]
            assert group["weight_decay"] == (0.05 if param.ndim >= 2 else 0.0), name
    grouped = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}
    assert any(by_id[i][0] == "query_tokens" for g in optimizer.param_groups if g["weight_decay"] for i in map(id, g["params"]))


def test_mixed_precision_cast_keeps_trainable_fp32(workspace):
    from train.model import cast_for_mixed_precision

    model = load_folder(workspace["model"])
    model.set_trainable_as_paper()
    cast_for_mixed_precision(model, torch.bfloat16)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.bfloat16), name
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**workspace["batch"]()).loss
    loss.backward()
    assert model.query_tokens.grad is not None and model.query_tokens.grad.dtype == torch.float32


def test_a_bf16_model_trains_without_mixed_precision(workspace):
    """A folder exported in bf16 (the shipped configs' export_dtype), trained on without bf16/fp16: all fp32."""
    from train.model import cast_for_mixed_precision

    model = load_folder(workspace["model"]).to(torch.bfloat16)
    model.set_trainable_as_paper()
    cast_for_mixed_precision(model, None)
    assert {param.dtype for param in model.parameters()} == {torch.float32}
    model.train()
    model(**workspace["batch"]()).loss.backward()
    assert model.query_tokens.grad is not None


def test_export_can_reference_the_base_language_model(workspace, tmp_path):
    from train.export import export_model

    model = load_folder(workspace["model"])
    model.language_model.save_pretrained(tmp_path / "llm")
    model.set_trainable_as_paper()
    with torch.no_grad():
        model.query_tokens.add_(1.0)  # stands in for training
    export_model(model, workspace["processor"], str(tmp_path / "full"))
    export_model(model, workspace["processor"], str(tmp_path / "referenced"), reference_language_model=str(tmp_path / "llm"))
    full_bytes = (tmp_path / "full" / "model.safetensors").stat().st_size
    referenced_bytes = (tmp_path / "referenced" / "model.safetensors").stat().st_size
    assert referenced_bytes < full_bytes
    full, referenced = load_folder(tmp_path / "full"), load_folder(tmp_path / "referenced")
    batch = workspace["batch"]()
    with torch.no_grad():
        assert torch.equal(full(**batch).logits, referenced(**batch).logits)


def test_export_interrupted_by_a_full_disk_leaves_no_folder_that_looks_complete(workspace, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    from train.export import export_model

    model = load_folder(workspace["model"])
    target = tmp_path / "exported"
    export_model(model, workspace["processor"], str(target))  # an earlier, complete export
    (target / "notes.txt").write_text("the user's own file")
    with torch.no_grad():
        model.query_tokens.add_(1.0)

    def disk_full(self, save_directory, *args, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")  # save_pretrained writes the config first
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_model(model, workspace["processor"], str(target))
    monkeypatch.undo()
    # the earlier export is still whole (nothing was moved in), the staging folder is gone, other files stay
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
    assert (target / "notes.txt").read_text() == "the user's own file"
    earlier = load_folder(target)
    assert not torch.equal(earlier.query_tokens, model.query_tokens)

    export_model(model, workspace["processor"], str(target))  # the rerun replaces it
    assert torch.equal(load_folder(target).query_tokens, model.query_tokens)
    assert (target / "notes.txt").is_file() and not (tmp_path / ".exported.partial").exists()


def test_staged_model_folder_moves_config_last_and_drops_a_stale_one(tmp_path, monkeypatch):
    from train.export import staged_model_folder

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text('{"old": true}')
    (target / "sub").mkdir()
    (target / "sub" / "stale.bin").write_text("x")
    moved = []
    real_replace = os.replace

    def record(source, destination):
        moved.append(Path(destination).name)
        assert not (target / "config.json").exists() or Path(destination).name == "config.json"
        real_replace(source, destination)

    import train.export as export_module
    monkeypatch.setattr(export_module.os, "replace", record)
    with staged_model_folder(target) as staging:
        (staging / "config.json").write_text('{"new": true}')
        (staging / "model.safetensors").write_text("w")
        (staging / "sub").mkdir()
        (staging / "sub" / "fresh.bin").write_text("y")
    monkeypatch.undo()
    assert moved[-1] == "config.json" and set(moved) == {"config.json", "model.safetensors", "sub"}
    assert json.loads((target / "config.json").read_text()) == {"new": True}
    assert [p.name for p in (target / "sub").iterdir()] == ["fresh.bin"]  # a folder is replaced whole
    with pytest.raises(RuntimeError):
        with staged_model_folder(target) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert json.loads((target / "config.json").read_text()) == {"new": True}
    assert not (tmp_path / ".model.partial").exists()


def test_best_checkpoint_by_validation_bleu_is_exported(workspace, tmp_path):
    output_dir = tmp_path / "best"
    run_main(write_config(
        tmp_path / "best.yaml", workspace, output_dir,
        training={"max_steps": 4, "learning_rate": 3e-3, "eval_strategy": "steps", "eval_steps": 2, "save_steps": 2,
                  "load_best_model_at_end": True, "metric_for_best_model": "bleu_4", "greater_is_better": True},
    ))
    state = json.loads((output_dir / "checkpoint-4" / "trainer_state.json").read_text())
    scores = [entry["eval_bleu_4"] for entry in state["log_history"] if "eval_bleu_4" in entry]
    print(f"\nvalidation BLEU-4 at steps 2, 4: {scores}; best: {state['best_model_checkpoint'].rsplit('/', 1)[-1]}")
    assert len(scores) == 2 and state["best_metric"] == max(scores)
    best = checkpoint_weights(state["best_model_checkpoint"])
    exported = load_folder(output_dir / "final").state_dict()
    assert all(torch.equal(best[name], exported[name]) for name in best)


@pytest.mark.parametrize("training, evaluation, message", [
    ({"load_best_model_at_end": True}, {}, r"metric_for_best_model='loss' is not a validation score"),
    ({"load_best_model_at_end": True, "metric_for_best_model": "bleu4"}, {}, r"'bleu4' is not a validation score"),
    ({"load_best_model_at_end": True, "metric_for_best_model": "meteor"}, {}, r"meteor needs eval.eval_meteor"),
    ({}, {"early_stopping_patience": 2}, r"early_stopping_patience needs training.load_best_model_at_end"),
])
def test_best_model_metric_is_checked_before_loading(workspace, tmp_path, monkeypatch, training, evaluation, message):
    """The validation scores generated captions and computes no loss: a metric it never reports fails at once,
    not at the first evaluation after training."""
    import train.run_train

    monkeypatch.setattr(train.run_train, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    config = write_config(tmp_path / "c.yaml", workspace, tmp_path / "out",
                          training={"max_steps": 2, "eval_strategy": "steps", "eval_steps": 1, "save_steps": 1, **training})
    if evaluation:
        data = yaml.safe_load(config.read_text())
        data.setdefault("eval", {}).update(evaluation)
        config.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        train.run_train.main(["--config", str(config)])


@pytest.mark.parametrize("section, entry, message", [
    ("data", {"length_window_steps": 0}, "data.length_window_steps must be at least 1"),
    ("data", {"val_max_samples": 0}, "data.val_max_samples must be at least 1"),
    ("eval", {"eval_num_beams": 0}, "eval.eval_num_beams must be at least 1"),
    ("training", {"per_device_train_batch_size": 0}, "training.per_device_train_batch_size must be at least 1"),
    ("model", {"encoder_learning_rate": -1e-4}, "model.encoder_learning_rate must be >= 0"),
])
def test_values_no_run_can_use_are_named_before_loading(workspace, tmp_path, monkeypatch, section, entry, message):
    import train.run_train

    monkeypatch.setattr(train.run_train, "load_model_and_processor", lambda *a, **k: pytest.fail("model loaded"))
    config = write_config(tmp_path / "c.yaml", workspace, tmp_path / "out", training={"max_steps": 1})
    data = yaml.safe_load(config.read_text())
    data.setdefault(section, {}).update(entry)
    config.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match=message):
        train.run_train.main(["--config", str(config)])
