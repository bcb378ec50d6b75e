"""`deltavlm train --config CONFIG.yaml [--key value ...] [--resume [CHECKPOINT]]`

Fine-tunes DeltaVLM on ChangeChat-105k / LEVIR-CC with the HF Trainer. One process or many: launch the same
command with `torchrun --nproc_per_node N` or `accelerate launch` (DDP, DeepSpeed, FSDP; see train/configs/).

Order of work: parse and check the config, load and check the data (missing images, unanswered questions),
then load the model, train, export. Every configuration or data error surfaces before the model is loaded.
"""

import json
import logging
import os
import sys

import torch
from transformers import EarlyStoppingCallback, set_seed

from .args import SECTIONS, parse_args
from .collator import EpochCallback, TrainCollator
from .data import (
    add_cell_questions,
    caption_prompt,
    load_train_records,
    load_val_records,
    parse_task_weights,
    records_to_samples,
    swap_closing_round_images,
    task_mix,
    weigh_tasks,
)
from .export import export_model
from .model import (
    DTYPES,
    apply_lora,
    cast_for_mixed_precision,
    freeze_as_paper,
    freeze_encoder,
    load_model_and_processor,
)
from .trainer import DeltaVLMTrainer

logger = logging.getLogger("deltavlm.train")


def main(argv=None, callbacks=()) -> int:
    """`callbacks`: extra TrainerCallbacks (the demo records a learning curve with one)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print(usage())
        return 0
    model_args, data_args, eval_args, export_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_training_args(training_args)
    check_value_ranges(model_args, data_args, eval_args, training_args)
    check_best_model_metric(training_args, eval_args)
    data_args.task_weights = parse_task_weights(data_args.task_weights)  # a typo'd task name fails before any loading
    if not 0.0 <= data_args.dialogue_image_swap <= 1.0:
        raise ValueError(f"data.dialogue_image_swap must lie in [0, 1], got {data_args.dialogue_image_swap}")
    if data_args.localization_cell_questions < 0:
        raise ValueError(f"data.localization_cell_questions must be >= 0, got {data_args.localization_cell_questions}")
    training_args.resume_from_checkpoint = complete_checkpoint(training_args.resume_from_checkpoint,
                                                               training_args.output_dir)
    if export_args.reference_language_model and (model_args.lora or model_args.qlora) and export_args.merge_lora:
        raise ValueError("export.reference_language_model cannot be used with merged LoRA adapters (the LLM changes)")

    # data first: a bad annotation file or a missing image must not wait for a 7B model to load
    train_records = load_train_records(data_args)
    train_samples = records_to_samples(train_records, data_args.template, data_args.captions_per_pair)
    train_samples = swap_closing_round_images(train_samples, data_args.dialogue_image_swap, seed=training_args.seed)
    train_samples = add_cell_questions(train_samples, data_args.localization_cell_questions, data_args.template,
                                       seed=training_args.seed)
    train_samples = weigh_tasks(train_samples, data_args.task_weights, seed=training_args.seed)
    val_records = load_val_records(data_args)
    logger.info("%d training samples from %d records; %s validation pairs", len(train_samples), len(train_records),
                len(val_records) if val_records is not None else "no")
    logger.info("training mix: %s", task_mix(train_samples))
    if val_records is None and training_args.eval_strategy != "no":
        raise ValueError(f"training.eval_strategy={training_args.eval_strategy.value!r} needs a validation split (data.val_split)")

    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args)
    freeze_as_paper(model)
    if model_args.lora or model_args.qlora:
        model = apply_lora(model, model_args)
    encoder_learning_rate = model_args.encoder_learning_rate
    if encoder_learning_rate == 0:
        # frozen rather than stepped at rate 0: no gradients through the ViT and Q-Former are computed at all
        freeze_encoder(model)
        encoder_learning_rate = None
    if not (training_args.deepspeed or training_args.fsdp):  # DeepSpeed / FSDP manage their own precision
        cast_for_mixed_precision(model, mixed_precision_dtype(training_args))

    collator = TrainCollator(processor, augment=data_args.augment, seed=training_args.seed)
    callbacks = [EpochCallback(collator), *callbacks]
    if eval_args.early_stopping_patience is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=eval_args.early_stopping_patience))
    trainer = DeltaVLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_samples,
        eval_dataset=val_records,
        data_collator=collator,
        callbacks=callbacks,
        processor=processor,
        length_window_steps=data_args.length_window_steps,
        sample_order=data_args.sample_order,
        caption_prompt=caption_prompt(data_args.template),
        generation_config={
            "num_beams": eval_args.eval_num_beams,
            "max_new_tokens": eval_args.eval_max_new_tokens,
            "repetition_penalty": eval_args.eval_repetition_penalty,
        },
        meteor=eval_args.eval_meteor,
        encoder_learning_rate=encoder_learning_rate,
        frozen_dropout=model_args.frozen_dropout,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    if not export_args.skip_export:
        export_dir = export_args.export_dir or os.path.join(training_args.output_dir, "final")
        state_dict = None
        if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:  # collective: every process takes part
            state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        processor.prompt_format = data_args.template  # inference then asks in the format the model learned
        if training_args.should_save:
            path = export_model(trainer.model, processor, export_dir, dtype=export_dtype(export_args, training_args),
                                merge_lora=export_args.merge_lora, state_dict=state_dict,
                                reference_language_model=export_args.reference_language_model)
            logger.info("exported the trained model to %s", path)
    return 0


def usage() -> str:
    from transformers import HfArgumentParser

    groups = [cls for name, cls in SECTIONS.items() if name != "training"]
    text = HfArgumentParser(groups).format_help()
    text = text[text.index("options:"):]  # argparse's usage line would list every option twice
    return text + "\ntraining: every transformers.TrainingArguments field (--output_dir, --learning_rate, ...)\n"


def check_training_args(training_args) -> None:
    if training_args.output_dir is None:
        raise ValueError("training.output_dir is required")
    if training_args.remove_unused_columns:
        raise ValueError("training.remove_unused_columns must be false: the collator reads image paths and prompts")
    if training_args.fp16 and training_args.bf16:
        raise ValueError("choose one of training.fp16 and training.bf16")


def check_value_ranges(model_args, data_args, eval_args, training_args) -> None:
    """Values no run can use, named before any data or model is loaded (each would fail later, or silently do
    nothing: a validation of 0 pairs logs no metrics)."""
    at_least_one = {
        "data.length_window_steps": data_args.length_window_steps,
        "data.val_max_samples": data_args.val_max_samples,
        "eval.eval_num_beams": eval_args.eval_num_beams,
        "eval.eval_max_new_tokens": eval_args.eval_max_new_tokens,
        "training.per_device_train_batch_size": training_args.per_device_train_batch_size,
        "training.per_device_eval_batch_size": training_args.per_device_eval_batch_size,
        "training.gradient_accumulation_steps": training_args.gradient_accumulation_steps,
    }
    for name, value in at_least_one.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    if model_args.encoder_learning_rate is not None and model_args.encoder_learning_rate < 0:
        raise ValueError(f"model.encoder_learning_rate must be >= 0, got {model_args.encoder_learning_rate}")
    if training_args.learning_rate < 0:
        raise ValueError(f"training.learning_rate must be >= 0, got {training_args.learning_rate}")


# What the validation reports (DeltaVLMTrainer.evaluate: generated captions scored), as eval_<name>.
VALIDATION_METRICS = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider", "meteor")


def check_best_model_metric(training_args, eval_args) -> None:
    """Keeping the best checkpoint and early stopping compare `metric_for_best_model` across evaluations. The
    validation generates captions and scores them; it computes no loss, so transformers' default ("loss") or a
    misspelt name would fail at the first evaluation, after the model has loaded and trained: checked here."""
    patience = eval_args.early_stopping_patience
    if patience is not None and patience < 1:
        raise ValueError(f"eval.early_stopping_patience must be at least 1, got {patience}")
    if not training_args.load_best_model_at_end and patience is None:
        return
    if patience is not None and not training_args.load_best_model_at_end:
        raise ValueError("eval.early_stopping_patience needs training.load_best_model_at_end: true")
    available = [name for name in VALIDATION_METRICS if name != "meteor" or eval_args.eval_meteor]
    metric = training_args.metric_for_best_model
    name = (metric or "loss").removeprefix("eval_")
    if name not in available:
        hint = " (meteor needs eval.eval_meteor: true)" if name == "meteor" else ""
        raise ValueError(
            f"training.metric_for_best_model={metric!r} is not a validation score{hint}: the validation scores generated "
            f"captions and reports {', '.join(available)}; e.g. metric_for_best_model: cider"
        )


def complete_checkpoint(resume, output_dir):
    """`--resume` alone: the last complete checkpoint in output_dir; `--resume PATH`: PATH, which must be complete.

    The Trainer writes a checkpoint folder in place (weights, optimizer, RNG, then trainer_state.json), so a run
    killed while saving leaves a folder without a readable trainer_state.json. Left to the Trainer, `--resume` would
    pick that folder and fail deep inside it (a torn model.safetensors, or no trainer_state.json), leaving the user
    to find and delete it; it is skipped here instead, with a warning.
    """
    if resume in (None, False):
        return None

    def is_complete(folder) -> bool:
        try:
            with open(os.path.join(folder, "trainer_state.json"), encoding="utf-8") as handle:
                json.load(handle)
        except (OSError, ValueError):
            return False
        return True

    if resume is not True:
        if not is_complete(resume):
            raise ValueError(f"checkpoint {resume} is incomplete (no readable trainer_state.json): "
                             "it was cut short while saving; resume from an earlier one")
        return resume
    numbered = []
    for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
        if name.startswith("checkpoint-") and name.removeprefix("checkpoint-").isdigit():
            numbered.append((int(name.removeprefix("checkpoint-")), os.path.join(output_dir, name)))
    for _, folder in sorted(numbered, reverse=True):
        if is_complete(folder):
            return folder
        logger.warning("skipping %s: incomplete (the run was stopped while saving it)", folder)
    raise ValueError(f"--resume: no complete checkpoint in {output_dir}; run without --resume to start over")


def mixed_precision_dtype(training_args) -> torch.dtype | None:
    if training_args.bf16:
        return torch.bfloat16
    if training_args.fp16:
        return torch.float16
    return None


def export_dtype(export_args, training_args) -> torch.dtype:
    if export_args.export_dtype != "auto":
        return DTYPES[export_args.export_dtype]
    return mixed_precision_dtype(training_args) or torch.float32


if __name__ == "__main__":  # torchrun --nproc_per_node N -m train.run_train --config ...
    sys.exit(main())
