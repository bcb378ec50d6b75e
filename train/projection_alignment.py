"""Aligning a fresh language projection with the language model's vocabulary, before the instruction tuning.

After the vision warm-up (`train.vision_warmup`) Nano's queries carry each pair's facts, but the projection into
the language model is new: the LLM starts the instruction tuning reading 16 vectors that resemble none of its
tokens. The 10-minute budget gives the language stage ~50 LoRA steps on a 2-core CPU, and there the model still
answers from the priors more than from the queries (docs/nano_experiments.md): every bit of that budget the
language model does not spend discovering what the queries mean goes to the answers.

This stage trains the projection alone, with no language-model compute: the query outputs of a pair under a
question, projected, should lie near the input embeddings of the tokens of that question's answer. Each query's
cosine similarities to the candidate tokens (every token of the training answers) give it a distribution over
them; the queries' mixture should put its mass on the answer's tokens (the mean of -log mixture probability over
the answer's distinct tokens). The soft prompt then reads as words the language model already knows, near
"building", "two" or "top" when those are the answer. A last rescale gives the projected queries the candidate
tokens' mean norm, the scale the language model's first layer expects.

Measured (EPYC, 2026-11-27, one warm-up, 50 LoRA steps at batch 8, two seeds; docs/nano_experiments.md): from the
aligned projection the language stage's training loss was lower at nearly every logged step after the first few
(the last eight logs 0.46-0.93 against 0.52-1.00 at seed 0, 0.33-1.03 against 0.34-1.17 at seed 1). The 40 test
records a task could not rank it: which task stayed at its constant answer changed from run to run either way.
"""

import random
import time

import torch
from torch import nn

from train.vision_warmup import FrozenVisionCache, query_output_in_length_buckets


def alignment_examples(samples, limit: int, seed: int = 0) -> list[dict]:
    """Up to `limit` single-round training samples (`train.data.records_to_samples` rows: image_before,
    image_after, prompt, answer), drawn at random with `seed`. Dialogue rounds are left out: their answers lean on
    the history, not only on the pair."""
    single = [row for row in samples if row["task"] != "dialogue"]
    if not single:
        raise ValueError("projection alignment: no single-round training sample (only dialogues?)")
    return random.Random(seed).sample(single, min(limit, len(single)))


def answer_token_targets(tokenizer, answers: list[str]) -> tuple[list[int], torch.Tensor]:
    """The candidate tokens (every token id in `answers`, sorted) and (N, V) 0/1 targets: which candidates each
    answer holds."""
    ids = [set(tokenizer(answer, add_special_tokens=False)["input_ids"]) for answer in answers]
    vocabulary = sorted(set().union(*ids))
    if not vocabulary:
        raise ValueError("projection alignment: the answers have no tokens")
    column = {token: k for k, token in enumerate(vocabulary)}
    targets = torch.zeros(len(answers), len(vocabulary))
    for row, tokens in enumerate(ids):
        targets[row, [column[token] for token in tokens]] = 1.0
    return vocabulary, targets


def bag_of_tokens_loss(projected: torch.Tensor, candidates: torch.Tensor, targets: torch.Tensor,
                       temperature: float) -> torch.Tensor:
    """projected (B, Q, H) queries, candidates (V, H) token embeddings, targets (B, V) 0/1 -> mean over the batch
    of the mean -log p(token) over each answer's tokens, p the queries' mixture of their softmax over the
    candidates' cosine similarities / temperature."""
    similarity = nn.functional.normalize(projected, dim=-1) @ nn.functional.normalize(candidates, dim=-1).T  # (B, Q, V)
    mixture = (similarity / temperature).softmax(dim=-1).mean(dim=1)  # (B, V)
    log_mixture = mixture.clamp_min(1e-9).log()
    return (-(log_mixture * targets).sum(-1) / targets.sum(-1).clamp_min(1)).mean()


def align_projection(model, processor, examples: list[dict], steps: int = 300, batch_size: int = 64,
                     learning_rate: float = 1e-3, temperature: float = 0.1, seed: int = 0,
                     vision_cache: FrozenVisionCache | None = None, log=print) -> dict:
    """Train `model.language_projection` on `examples` (dicts with image_before, image_after, prompt, answer; see
    `alignment_examples`) so the projected queries lie near their answer's token embeddings; everything else
    stays as it is. The query outputs are computed once, in eval mode (no dropout), then the projection trains on
    them for `steps` steps. `vision_cache` reuses ViT outputs the warm-up already computed. Returns
    {"loss_start", "loss_end", "norm_before", "norm_after", "candidates", "examples", "seconds"}."""
    if steps < 1 or batch_size < 1 or temperature <= 0:
        raise ValueError(f"align_projection: steps and batch_size must be >= 1 and temperature > 0, got "
                         f"steps={steps}, batch_size={batch_size}, temperature={temperature}")
    if not examples:
        raise ValueError("align_projection: no examples")
    started = time.time()
    was_training = model.training
    model.eval()
    cache = vision_cache or FrozenVisionCache(model, processor.image_processor)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            pair_embeds = cache.pair_embeds([(row["image_before"], row["image_after"]) for row in chunk])
            outputs.append(query_output_in_length_buckets(model, processor, pair_embeds, [row["prompt"] for row in chunk]))
    query_outputs = torch.cat(outputs)  # (N, Q, Hq)
    vocabulary, targets = answer_token_targets(processor.tokenizer, [row["answer"] for row in examples])
    candidates = model.get_input_embeddings().weight.detach()[vocabulary]  # (V, H)

    projection = model.language_projection
    trainable = [p.requires_grad for p in projection.parameters()]
    for parameter in projection.parameters():
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(projection.parameters(), lr=learning_rate, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    try:
        with torch.enable_grad():
            for step in range(steps):
                rows = torch.randint(0, len(examples), (min(batch_size, len(examples)),), generator=generator)
                loss = bag_of_tokens_loss(projection(query_outputs[rows]), candidates, targets[rows], temperature)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
        with torch.no_grad():
            # cosine similarity ignores the scale: give the queries the candidate tokens' mean norm
            norm_before = projection(query_outputs).norm(dim=-1).mean()
            wanted = candidates.norm(dim=-1).mean()
            projection.weight.mul_(wanted / norm_before)
            projection.bias.mul_(wanted / norm_before)
    finally:
        for parameter, flag in zip(projection.parameters(), trainable):
            parameter.requires_grad_(flag)
        model.train(was_training)
    window = max(1, min(20, steps // 5))
    result = {
        "loss_start": round(sum(losses[:window]) / window, 4), "loss_end": round(sum(losses[-window:]) / window, 4),
        "norm_before": round(norm_before.item(), 3), "norm_after": round(wanted.item(), 3),
        "candidates": len(vocabulary), "examples": len(examples), "seconds": round(time.time() - started, 1),
    }
    log(f"projection aligned with the answers' tokens: loss {result['loss_start']} -> {result['loss_end']} over "
        f"{steps} steps ({len(examples)} examples, {len(vocabulary)} candidate tokens, {result['seconds']} s)")
    return result


__all__ = ["align_projection", "alignment_examples", "answer_token_targets", "bag_of_tokens_loss"]
