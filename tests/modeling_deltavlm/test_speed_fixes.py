"""Speed/memory changes keep outputs identical (issue 8)."""

import torch

from modeling_deltavlm import DeltaVLMForConditionalGeneration
from modeling_deltavlm.modeling_deltavlm import chunked_lm_loss

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


def test_training_loss_on_labelled_positions_in_chunks_is_identical(make_tiny_config, tiny_processor, sample_pairs):
    """In training mode the LM head runs only on the labelled positions, chunked: same loss, same gradients."""
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(make_tiny_config()).train()
    model.set_trainable_as_paper()
    batch = _training_batch(tiny_processor, sample_pairs)
    width = batch["input_ids"].shape[1]

    fast, fast_grads = _step(model, batch, seed=1)
    full, full_grads = _step(model, batch, seed=1, logits_to_keep=width)  # all T columns: the former path

    assert fast.logits is None and full.logits.shape[1] == width  # no logits held in the chunked path
    torch.testing.assert_close(fast.loss, full.loss, rtol=1e-6, atol=1e-7)
    assert fast_grads.keys() == full_grads.keys() and fast_grads
    for name in full_grads:
        torch.testing.assert_close(fast_grads[name], full_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_lm_loss_matches_one_cross_entropy_at_any_chunk_size():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 50, bias=False)
    hidden = torch.randn(23, 8, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    reference = torch.nn.functional.cross_entropy(head(hidden), targets)
    (expected_grad,) = torch.autograd.grad(reference, hidden)
    for chunk_logits in (50, 7 * 50, 10**6):  # 1 row, 7 rows (last chunk short), everything in one chunk
        loss = chunked_lm_loss(hidden, targets, head, chunk_logits=chunk_logits)
        (grad,) = torch.autograd.grad(loss, hidden)
        torch.testing.assert_close(loss, reference)
        torch.testing.assert_close(grad, expected_grad)
    calls = []
    head.register_forward_hook(lambda *_: calls.append(1))
    for chunk_logits, head_calls in ((10**6, 1), (7 * 50, 2 * 4)):
        # one chunk: the head runs once; 4 chunks (7+7+7+2 rows): each run again in backward
        calls.clear()
        chunked_lm_loss(hidden, targets, head, chunk_logits=chunk_logits).backward()
        assert len(calls) == head_calls, chunk_logits
    summed = chunked_lm_loss(hidden, targets, head, num_items_in_batch=torch.tensor(40), chunk_logits=100)
    torch.testing.assert_close(summed, reference * 23 / 40)
    for items in (None, torch.tensor(5)):
        nothing = chunked_lm_loss(hidden[:0], targets[:0], head, num_items_in_batch=items)
        nothing.backward()  # nothing labelled: a zero that backward accepts
        assert nothing.item() == 0.0


def test_heads_that_transform_logits_keep_the_labelled_columns_path(make_tiny_config, tiny_processor, sample_pairs):
    """A language model that soft-caps its logits must get its own forward: the LM head on the K labelled columns."""
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(make_tiny_config()).train()
    model.config.text_config.final_logit_softcapping = 30.0
    batch = _training_batch(tiny_processor, sample_pairs)
    width = batch["input_ids"].shape[1]
    restricted, _ = _step(model, batch, seed=1)
    full, _ = _step(model, batch, seed=1, logits_to_keep=width)
    columns = (batch["labels"][:, 1:] != -100).any(dim=0).nonzero().squeeze(1)
    assert restricted.logits.shape == (3, len(columns), full.logits.shape[-1]) and len(columns) < width
    torch.testing.assert_close(restricted.logits, full.logits[:, columns], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(restricted.loss, full.loss, rtol=1e-6, atol=1e-7)


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
