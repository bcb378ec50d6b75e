"""`DeltaVLMTrainer`: the HF Trainer with six DeltaVLM-specific changes.

1. Weight decay on every trainable tensor with >= 2 dimensions and on nothing else (the authors' grouping:
   query tokens, Linear and embedding weights decay; biases and norms do not), instead of the Trainer's
   name-pattern grouping. With `encoder_learning_rate`, the encoder side (ViT, CSRM, Q-Former, query tokens)
   gets its own learning rate in separate parameter groups; the scheduler scales every group alike.
2. Checkpoints hold only the trainable weights (`model.safetensors`, keyed by parameter name: ~1 GB for the
   7B model instead of ~30 GB), next to the Trainer's own optimizer / scheduler / RNG / state files, so
   `resume_from_checkpoint` and `load_best_model_at_end` work unchanged. The same format serves LoRA runs
   (adapters + the non-LLM trainable set). No config.json is written there on purpose: a checkpoint is not a
   loadable model; the final export is (`train.export`). Under DeepSpeed and FSDP the Trainer also writes the
   engine's own state for resuming, which does include frozen weights (ZeRO model states, FSDP full state dict).
3. `evaluate()` generates captions for the validation pairs with the processor's prompt-only, left-padded
   layout and scores them (BLEU-1..4, ROUGE-L, CIDEr, optionally METEOR) with the coco-caption scorers.
   Seq2SeqTrainer's `predict_with_generate` is not used: it feeds the teacher-forced ids to `generate`.
4. Under DDP each process generates for its share of the validation pairs; the texts are gathered and every
   process computes the same scores (the best-checkpoint decision needs them everywhere).
5. `train_sampling_strategy: group_by_length` sorts by the samples' `length` column within windows of
   `length_window_steps` optimizer steps (default `LENGTH_WINDOW_BATCHES`), not the Trainer's 50: a window is
   sorted from long to short, so with 50 a short run would see one task after another (localization and dialogue
   answers first, yes/no last). The ChangeChat mix's rows run from ~11 to ~100 tokens: random batches of 8 are
   ~41% padding (the 16 query tokens counted), windows of 4 batches ~15%. But a window of several steps makes each
   step nearly one task (the lengths sort by task), and a short run then answers with whatever its last steps of
   a task said: on the 10-minute demo's Nano (EPYC, 2026-11-27) 54 such steps at batch 8 said "yes" to 38 of 40
   test pairs and "there is no difference" to every caption, where 40 steps of random batches beat every trivial
   baseline. `length_window_steps: 1` with gradient accumulation keeps each step a random mix and sorts only
   that step's samples, short ones into one micro-batch and long ones into the next: 3.6 s against 4.35 for the
   forward and backward of a random batch of 8 as 2 x 4. With `sample_order: stratified` the permutation is
   `train.sample_order.stratified_order` instead of a random one: every window of steps holds the tasks, and each
   task's answers, in the data's proportions (short runs; see that module).
6. Modules none of whose weights train stay in eval mode during training (`frozen_dropout=False`, the default):
   their dropout would only add noise to the features that the trained layers read.
"""

import logging
import math
import os

import safetensors.torch
import torch
from accelerate.utils import gather_object
from transformers import Trainer
from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

from .collator import GenerationCollator
from .model import ENCODER_PARAMETER, frozen_subtrees, trainable_parameter_names
from .sample_order import EpochSeededOrder, StratifiedLengthGroupedSampler

logger = logging.getLogger(__name__)

TRAINABLE_WEIGHTS_NAME = "model.safetensors"  # the Trainer looks for this name when resuming / loading the best
LENGTH_WINDOW_BATCHES = 4
SAMPLE_ORDERS = ("random", "stratified")
STRATA_COLUMNS = ("task", "answer")


class WindowedLengthGroupedSampler(EpochSeededOrder, LengthGroupedSampler):
    """The Trainer's length-grouped sampler with windows of `window` batches (its own uses up to 50): a random
    permutation, cut into windows of `window * batch_size` samples, each sorted by length, so consecutive batches
    hold samples of similar length. The permutation comes from (`seed`, epoch): `EpochSeededOrder`."""

    def __init__(self, batch_size: int, lengths: list[int], window: int = LENGTH_WINDOW_BATCHES, seed: int = 0):
        super().__init__(batch_size, lengths=lengths)
        self.window, self.seed = window, seed

    def __iter__(self):
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=self.window,
                                               generator=self.epoch_generator()))


class DeltaVLMTrainer(Trainer):
    def __init__(self, *args, processor=None, generation_config: dict | None = None, caption_prompt: str | None = None,
                 meteor: bool = False, encoder_learning_rate: float | None = None,
                 length_window_steps: int = LENGTH_WINDOW_BATCHES, sample_order: str = "random",
                 frozen_dropout: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.frozen_dropout = frozen_dropout
        self._frozen_modules = None  # (model, its frozen subtrees), found at the first training step
        if length_window_steps < 1:
            raise ValueError(f"length_window_steps must be >= 1, got {length_window_steps}")
        if sample_order not in SAMPLE_ORDERS:
            raise ValueError(f"sample_order must be one of {SAMPLE_ORDERS}, got {sample_order!r}")
        self.length_window_steps = length_window_steps
        self.sample_order = sample_order
        if encoder_learning_rate is not None and encoder_learning_rate < 0:
            raise ValueError(f"encoder_learning_rate must be >= 0, got {encoder_learning_rate}")
        self.encoder_learning_rate = encoder_learning_rate
        self.processor = processor
        self.generation_kwargs = dict(generation_config or {})
        self.caption_prompt = caption_prompt
        self.meteor = meteor

    # --- 1. optimizer grouping ---

    def get_decay_parameter_names(self, model) -> list[str]:
        return [name for name, param in model.named_parameters() if param.ndim >= 2]

    def create_optimizer(self, model=None):
        if self.optimizer is not None or self.encoder_learning_rate is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        encoder = {id(p) for name, p in opt_model.named_parameters() if ENCODER_PARAMETER.search(name)}
        optimizer = super().create_optimizer(model)
        # split each (decay / no-decay) group in two before any step, so no optimizer state exists yet
        for group in list(optimizer.param_groups):
            encoder_params = [p for p in group["params"] if id(p) in encoder]
            if not encoder_params:
                continue
            group["params"] = [p for p in group["params"] if id(p) not in encoder]
            options = {k: v for k, v in group.items() if k != "params"}
            optimizer.add_param_group({**options, "params": encoder_params, "lr": self.encoder_learning_rate})
        optimizer.param_groups[:] = [group for group in optimizer.param_groups if group["params"]]
        return optimizer

    # --- 5. length-grouped batches ---

    def _get_train_sampler(self, train_dataset=None):
        dataset = self.train_dataset if train_dataset is None else train_dataset
        column = self.args.length_column_name
        grouped = self.args.train_sampling_strategy == "group_by_length"
        step = self.args.train_batch_size * self.args.gradient_accumulation_steps  # samples an optimizer step
        if self.sample_order == "stratified" and dataset is not None:
            needed = (*STRATA_COLUMNS, column) if grouped else STRATA_COLUMNS
            missing = [name for name in needed if name not in getattr(dataset, "column_names", ())]
            if missing:
                raise ValueError(f"sample_order 'stratified' needs the training samples' columns {missing}")
            return StratifiedLengthGroupedSampler(list(zip(*(dataset[name] for name in STRATA_COLUMNS))),
                                                  lengths=list(dataset[column]) if grouped else None,
                                                  window_size=step * self.length_window_steps if grouped else None,
                                                  seed=self._order_seed())
        if (grouped and dataset is not None
                and column in getattr(dataset, "column_names", ())):
            return WindowedLengthGroupedSampler(step, lengths=list(dataset[column]), window=self.length_window_steps,
                                                seed=self._order_seed())
        return super()._get_train_sampler(train_dataset)

    def _order_seed(self) -> int:
        # as the Trainer seeds its own random sampler: data_seed when given, else seed
        return self.args.data_seed if self.args.data_seed is not None else self.args.seed

    # --- 6. frozen modules in eval mode ---

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The Trainer switches the whole model to training mode before each step. A module none of whose weights
        # train (the encoder side in the Nano demo's language stage, the frozen ViT blocks of the paper's set-up)
        # would then apply its dropout too: noise in the features the trained layers read, which no weight of it
        # learns from, and features that differ from the ones inference sees. As LAVIS does for its frozen ViT,
        # such modules run in eval mode unless `frozen_dropout` asks otherwise.
        if model.training and not self.frozen_dropout:
            if self._frozen_modules is None or self._frozen_modules[0] is not model:
                # found once a run: walking the model's modules each micro-batch cost ~4% of a Nano step
                self._frozen_modules = (model, frozen_subtrees(model))
            for module in self._frozen_modules[1]:
                module.eval()
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # --- 2. trainable-only checkpoints ---

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        if not self.args.should_save:  # a gathered DeepSpeed / FSDP state dict is complete on the main process only
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        names = trainable_parameter_names(self.model)
        if state_dict is None:
            state_dict = self.model.state_dict()
        else:  # DeepSpeed / FSDP hand over a gathered state dict whose keys may carry a wrapper prefix
            state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
        missing = [name for name in names if name not in state_dict]
        if missing:
            raise RuntimeError(f"trainable weights missing from the state dict to save: {missing[:5]}")
        os.makedirs(output_dir, exist_ok=True)
        weights = {name: state_dict[name].detach().to("cpu").contiguous() for name in names}
        save_trainable_weights(weights, os.path.join(output_dir, TRAINABLE_WEIGHTS_NAME))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable_weights(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            return super()._load_best_model()
        logger.info("loading the best checkpoint %s (%s)", self.state.best_model_checkpoint, self.state.best_metric)
        load_trainable_weights(self.model, self.state.best_model_checkpoint)

    # --- 3./4. generation-based validation ---

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        records = eval_dataset if eval_dataset is not None else self.eval_dataset
        if records is None or self.caption_prompt is None:
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        predictions = self.generate_captions(records)
        scores = score_captions(predictions, list(records["references"]), meteor=self.meteor)
        metrics = {f"{metric_key_prefix}_{name}": value for name, value in scores.items() if value is not None}
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def generate_captions(self, records) -> list[str]:
        """One caption per record, this process's share generated here, all shares gathered in record order."""
        world, rank = self.args.world_size, self.args.process_index
        per_process = math.ceil(len(records) / world)
        # pad the index list so every process runs the same number of batches (ZeRO-3/FSDP generation is collective)
        indices = [i % len(records) for i in range(per_process * world)][rank * per_process : (rank + 1) * per_process]
        collator = GenerationCollator(self.processor, self.caption_prompt)
        batch_size = self.args.per_device_eval_batch_size
        model = self.model
        was_training = model.training
        model.eval()
        synced_gpus = self.is_fsdp_enabled or (
            self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3
        )
        texts = []
        try:
            for start in range(0, len(indices), batch_size):
                batch = collator([records[i] for i in indices[start : start + batch_size]])
                batch = batch.to(self.args.device)
                with self.accelerator.autocast():
                    output_ids = model.generate(**batch, **self.generation_kwargs, synced_gpus=synced_gpus)
                texts += self.processor.batch_decode(output_ids, prompt_length=batch["input_ids"].shape[1])
        finally:
            model.train(was_training)
        if world > 1:
            texts = gather_object(texts)
        return texts[: len(records)]


def score_captions(predictions: list[str], references: list[list[str]], meteor: bool = False) -> dict:
    """Corpus-level caption scores x100 under DESIGN.md §5's protocol, keyed bleu_1..bleu_4, rouge_l, cider, meteor."""
    from eval.metrics import caption_scores

    scores = caption_scores(predictions, references, meteor=meteor)
    names = {"BLEU-1": "bleu_1", "BLEU-2": "bleu_2", "BLEU-3": "bleu_3", "BLEU-4": "bleu_4",
             "METEOR": "meteor", "ROUGE-L": "rouge_l", "CIDEr": "cider"}
    return {short: scores.get(long) for long, short in names.items()}


def save_trainable_weights(weights: dict[str, torch.Tensor], path: str) -> None:
    safetensors.torch.save_file(weights, path, metadata={"format": "pt", "content": "deltavlm trainable weights only"})


def load_trainable_weights(model, checkpoint_dir: str) -> None:
    """Load a trainable-only checkpoint into `model`; its keys must be exactly the model's trainable parameters."""
    path = os.path.join(checkpoint_dir, TRAINABLE_WEIGHTS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {TRAINABLE_WEIGHTS_NAME} in checkpoint {checkpoint_dir}")
    state_dict = safetensors.torch.load_file(path, device="cpu")
    expected = set(trainable_parameter_names(model))
    unexpected, missing = sorted(set(state_dict) - expected), sorted(expected - set(state_dict))
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {checkpoint_dir} does not match the model's trainable set: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}). "
            "Was it written with the same model / LoRA options?"
        )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state_dict.items():
            parameters[name].copy_(value.to(parameters[name].device, parameters[name].dtype))


__all__ = ["DeltaVLMTrainer", "load_trainable_weights", "save_trainable_weights", "score_captions"]
