"""`deltavlm train` configuration: YAML sections + command-line overrides, unknown keys named, and the shipped
configs (paper schedule, LoRA, Accelerate DDP/FSDP, DeepSpeed ZeRO-2/3) checked with the libraries' own parsers."""

import json
import os
from pathlib import Path
from unittest import mock

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "train" / "configs"


def parse(*argv):
    from train.args import parse_args

    return parse_args(list(argv))


def test_yaml_sections_and_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {model_name_or_path: m, lora: true, lora_target_modules: [q_proj]}\n"
        "data: {train_files: [a.json], levircc_train_split: null, augment: crop}\n"
        "training: {output_dir: out, learning_rate: 1e-5, max_steps: 3, use_cpu: true, lr_scheduler_kwargs: {num_cycles: 0.5}}\n"
    )
    model, data, evaluation, export, training = parse(
        "--config", str(config), "--max_steps", "7", "--train_files", "b.json", "c.json", "--lora_r=4", "--merge_lora",
        "false", "--resume",
    )
    assert (model.model_name_or_path, model.lora, model.lora_r, model.lora_target_modules) == ("m", True, 4, ["q_proj"])
    assert data.train_files == ["b.json", "c.json"] and data.levircc_train_split is None and data.augment == "crop"
    assert training.learning_rate == 1e-5  # YAML 1.1 reads "1e-5" as a string: converted with the field's type
    assert training.max_steps == 7 and training.output_dir == "out" and training.resume_from_checkpoint is True
    assert training.lr_scheduler_kwargs == {"num_cycles": 0.5}
    assert export.merge_lora is False and evaluation.eval_num_beams == 1
    # the project's defaults for TrainingArguments
    assert training.remove_unused_columns is False and training.label_names == ["labels"]
    assert training.ddp_find_unused_parameters is True


def test_unknown_config_key_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("training: {output_dir: out, lerning_rate: 0.1}\n")
    with pytest.raises(ValueError, match=r"training\.lerning_rate is not a field of TrainingArguments"):
        parse("--config", str(config))
    config.write_text("optimizer: {lr: 0.1}\n")
    with pytest.raises(ValueError, match=r"unknown section 'optimizer'"):
        parse("--config", str(config))


def test_unknown_override_is_named():
    with pytest.raises(ValueError, match=r"unknown option --lerning_rate"):
        parse("--output_dir", "out", "--lerning_rate", "0.1")
    with pytest.raises(ValueError, match=r"--max_steps: invalid literal"):
        parse("--output_dir", "out", "--max_steps", "many")


def test_a_value_outside_a_fields_choices_is_named(tmp_path):
    """Literal and Enum fields take only their choices, from the YAML as from the command line."""
    config = tmp_path / "c.yaml"
    config.write_text("data: {captions_per_pair: second, sample_order: stratified}\ntraining: {output_dir: out}\n")
    with pytest.raises(ValueError, match=r"captions_per_pair: 'second' is not one of \['all', 'first'\]"):
        parse("--config", str(config))
    with pytest.raises(ValueError, match=r"lr_scheduler_type: 'triangle' is not one of"):
        parse("--config", str(config), "--captions_per_pair", "all", "--lr_scheduler_type", "triangle")
    _, data, _, _, training = parse("--config", str(config), "--captions_per_pair", "all")
    assert data.sample_order == "stratified" and data.captions_per_pair == "all"


def test_yaml_scalars_for_list_fields_and_wrong_number_types(tmp_path):
    """`train_files: a.json` is the list [a.json], not five characters; numbers of the wrong kind are named."""
    config = tmp_path / "c.yaml"
    config.write_text("model: {model_name_or_path: m, lora_target_modules: q_proj}\n"
                      "data: {train_files: a.json}\ntraining: {output_dir: out, max_steps: 4.0}\n")
    model, data, _, _, training = parse("--config", str(config))
    assert model.lora_target_modules == ["q_proj"] and data.train_files == ["a.json"] and training.max_steps == 4
    for entry, message in (("max_steps: 2.5", "max_steps: expected a whole number"),
                           ("learning_rate: [1, 2]", "learning_rate: expected a number"),
                           ("max_steps: true", "max_steps: expected a number")):
        config.write_text(f"training: {{output_dir: out, {entry}}}\n")
        with pytest.raises(ValueError, match=message):
            parse("--config", str(config))
    config.write_text("data: {train_files: {a: 1}}\ntraining: {output_dir: out}\n")
    with pytest.raises(ValueError, match="train_files: expected a list of values"):
        parse("--config", str(config))


def test_resume_false_is_no_resume_and_yaml_task_weights_read_as_numbers():
    from train.data import parse_task_weights

    assert parse("--output_dir", "out", "--resume", "false")[4].resume_from_checkpoint is None
    assert parse("--output_dir", "out", "--resume", "true")[4].resume_from_checkpoint is True
    assert parse("--output_dir", "out", "--resume", "runs/x/checkpoint-7")[4].resume_from_checkpoint == "runs/x/checkpoint-7"
    assert parse_task_weights({"binary": "5e-1", "count": 2}) == {"binary": 0.5, "count": 2.0}
    with pytest.raises(ValueError, match=r"task_weights\['binary'\] must be a number"):
        parse_task_weights({"binary": "half"})


def test_cli_rejects_bad_config_before_loading(tmp_path):
    from train.run_train import main

    config = tmp_path / "c.yaml"
    config.write_text("training: {output_dir: out, not_an_argument: 1}\n")
    with pytest.raises(ValueError, match="training.not_an_argument"):
        main(["--config", str(config)])


def test_shipped_training_configs_parse():
    """paper.yaml carries the authors' schedule; bf16 needs a GPU, so it is switched off to parse on CPU."""
    model, data, evaluation, export, training = parse("--config", str(CONFIGS / "paper.yaml"), "--bf16", "false")
    assert (training.learning_rate, training.weight_decay, training.warmup_steps) == (1e-5, 0.05, 1000)
    assert training.lr_scheduler_type.value == "cosine" and training.optim.value == "adamw_torch"
    assert (training.per_device_train_batch_size, training.num_train_epochs) == (12, 50)
    assert training.metric_for_best_model == "bleu_4" and training.load_best_model_at_end and training.greater_is_better
    assert evaluation.early_stopping_patience == 10 and data.template == "deltavlm" and data.augment == "none"
    model, *_ = parse("--config", str(CONFIGS / "lora.yaml"), "--bf16", "false")
    assert model.lora and model.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def _accelerate_env(config_file):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config_file), "train.py"])
    args, _, _ = _validate_launch_command(args)
    return prepare_multi_gpu_env(args)


def test_accelerate_ddp_config():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate_ddp.yaml"))
    assert config.distributed_type.value == "MULTI_GPU" and config.mixed_precision == "bf16"
    env = _accelerate_env(CONFIGS / "accelerate_ddp.yaml")
    assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_accelerate_fsdp_config_wraps_classes_that_exist(make_tiny_config):
    """accelerate launch turns the YAML into FSDP_* variables; the plugin built from them must name layer classes
    the model has, or FSDP fails at wrap time on the GPU box."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    env = _accelerate_env(CONFIGS / "accelerate_fsdp.yaml")
    with mock.patch.dict(os.environ, env):
        plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and "FULL_STATE_DICT" in str(plugin.state_dict_type)
    model_classes = {type(m).__name__ for m in DeltaVLMForConditionalGeneration(make_tiny_config()).modules()}
    assert set(plugin.transformer_cls_names_to_wrap) <= model_classes
    assert {"LlamaDecoderLayer", "InstructBlipEncoderLayer", "InstructBlipQFormerLayer"} <= set(plugin.transformer_cls_names_to_wrap)


@pytest.mark.parametrize("name, stage", [("ds_zero2.json", 2), ("ds_zero3.json", 3)])
def test_deepspeed_configs(name, stage):
    """Parsed and filled by accelerate's DeepSpeedPlugin (what `TrainingArguments(deepspeed=...)` hands over; the
    transformers wrapper itself refuses to load without the deepspeed package). Every "auto" must be fillable from
    the Trainer's arguments, and no optimizer/scheduler section may replace the Trainer's (weight decay grouping)."""
    from accelerate.utils import DeepSpeedPlugin

    config = json.loads((CONFIGS / name).read_text())
    assert "optimizer" not in config and "scheduler" not in config
    plugin = DeepSpeedPlugin(hf_ds_config=str(CONFIGS / name))
    assert plugin.zero_stage == stage
    hidden = 4096
    plugin.deepspeed_config_process(
        must_match=True, train_micro_batch_size_per_gpu=12, gradient_accumulation_steps=1, gradient_clipping=1.0,
        train_batch_size=96, **{"bf16.enabled": True, "fp16.enabled": False,
                                "zero_optimization.reduce_bucket_size": hidden * hidden,
                                "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
                                "zero_optimization.stage3_param_persistence_threshold": 10 * hidden},
    )
    assert "auto" not in json.dumps(plugin.deepspeed_config)
    if stage == 3:  # the final export needs the full 16-bit weights gathered on save
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_config_with_deepspeed_installed():
    deepspeed = pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    for name in ("ds_zero2.json", "ds_zero3.json"):
        zero = json.loads((CONFIGS / name).read_text())["zero_optimization"]
        DeepSpeedZeroConfig(**{k: v for k, v in zero.items() if v != "auto"})
    assert deepspeed.__version__
