"""Speed/memory changes keep outputs identical (issue 8)."""

import torch

from modeling_deltavlm import DeltaVLMForConditionalGeneration

PROMPTS = ["q please briefly describe the changes", "q how many buildings", "q where"]
ANSWERS = ["a road was built along the river", "three", "in the top left corner near the river bend"]


def _training_batch(tiny_processor, sample_pairs):
    return tiny_processor(images=sample_pairs[:3], text=PROMPTS, answers=ANSWERS)


def _step(model, batch, seed, **kwargs):
    torch.manual_seed(seed)  # same dropout masks on both sides
    model.zero_grad(set_to_none=True)
    output = model(**batch, **kwargs)
    output.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output, grads


def test_training_loss_on_labelled_columns_only_is_identical(make_tiny_config, tiny_processor, sample_pairs):
    """In training mode the LM head runs only on the columns that predict a label: same loss, same gradients."""
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(make_tiny_config()).train()
    model.set_trainable_as_paper()
    batch = _training_batch(tiny_processor, sample_pairs)
    width = batch["input_ids"].shape[1]

    fast, fast_grads = _step(model, batch, seed=1)
    full, full_grads = _step(model, batch, seed=1, logits_to_keep=width)  # all T columns: the former path

    assert full.logits.shape[1] == width
    columns = (batch["labels"][:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
    assert fast.logits.shape == (3, len(columns), full.logits.shape[-1]) and len(columns) < width
    torch.testing.assert_close(fast.logits, full.logits[:, columns], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert fast_grads.keys() == full_grads.keys() and fast_grads
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_with_num_items_in_batch_is_identical(make_tiny_config, tiny_processor, sample_pairs):
    """The Trainer passes num_items_in_batch (gradient accumulation): the restricted path honours it too."""
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(make_tiny_config(difference_dropout=0.0)).train()
    batch = _training_batch(tiny_processor, sample_pairs)
    items = torch.tensor(50)
    torch.manual_seed(2)
    fast = model(**batch, num_items_in_batch=items).loss
    torch.manual_seed(2)
    full = model(**batch, num_items_in_batch=items, logits_to_keep=batch["input_ids"].shape[1]).loss
    torch.testing.assert_close(fast, full, rtol=1e-6, atol=1e-7)


def test_eval_mode_keeps_all_logits(tiny_model, tiny_processor, sample_pairs):
    batch = _training_batch(tiny_processor, sample_pairs)
    with torch.no_grad():
        output = tiny_model(**batch)
    assert output.logits.shape[:2] == batch["input_ids"].shape
