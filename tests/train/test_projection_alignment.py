"""Aligning the language projection with the answers' tokens (train.projection_alignment), through its public
functions on a tiny model and a small synthetic data set."""

import pytest
import torch

from processing.changechat_data import load_records
from train.data import records_to_samples
from train.projection_alignment import align_projection, alignment_examples, answer_token_targets, bag_of_tokens_loss
from train.synthetic import write_dataset
from train.vision_warmup import FrozenVisionCache, pair_facts, warm_up_vision


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic_alignment")
    write_dataset(folder, 24, seed=3)
    records = load_records(folder / "annotations" / "changechat_train.json", folder / "images")
    return folder, records_to_samples(records, captions_per_pair="first")


def test_examples_are_single_round_samples_drawn_by_seed(samples):
    _, rows = samples
    examples = alignment_examples(rows, limit=20, seed=1)
    assert len(examples) == 20 and all(row["task"] != "dialogue" for row in examples)
    assert [row["index"] for row in examples] == [row["index"] for row in alignment_examples(rows, 20, seed=1)]
    assert [row["index"] for row in examples] != [row["index"] for row in alignment_examples(rows, 20, seed=2)]
    assert len(alignment_examples(rows, limit=10_000)) == sum(task != "dialogue" for task in rows["task"])
    with pytest.raises(ValueError, match="single-round"):
        alignment_examples(rows.filter(lambda row: row["task"] == "dialogue"), limit=5)


def test_answer_token_targets_mark_each_answers_tokens(tiny_processor):
    tokenizer = tiny_processor.tokenizer
    answers = ["yes", "no roads have changed", "yes"]
    vocabulary, targets = answer_token_targets(tokenizer, answers)
    assert vocabulary == sorted(vocabulary) and targets.shape == (3, len(vocabulary))
    for row, answer in enumerate(answers):
        ids = set(tokenizer(answer, add_special_tokens=False)["input_ids"])
        assert {vocabulary[k] for k in targets[row].nonzero().flatten().tolist()} == ids
    assert torch.equal(targets[0], targets[2])
    with pytest.raises(ValueError, match="no tokens"):
        answer_token_targets(tokenizer, [""])


def test_bag_of_tokens_loss_is_low_when_the_queries_are_the_answers_tokens():
    torch.manual_seed(0)
    candidates = torch.randn(6, 16)
    targets = torch.tensor([[1.0, 0, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0]])
    matching = torch.stack([candidates[[0, 2]], candidates[[4, 4]]]) * 3.0  # (B=2, Q=2, H): scale plays no part
    other = torch.stack([candidates[[1, 3]], candidates[[5, 1]]])
    low = bag_of_tokens_loss(matching, candidates, targets, temperature=0.1)
    assert low < bag_of_tokens_loss(other, candidates, targets, temperature=0.1) - 1.0
    # first pair: two tokens, one query each, so the mixture gives each about 1/2; second: both queries on its one
    # token, about 1
    assert low.item() == pytest.approx(0.5 * -torch.tensor(0.5).log().item(), abs=0.05)


def test_alignment_trains_the_projection_alone_and_gives_it_the_tokens_scale(samples, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    _, rows = samples
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config())
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    requires = {name: p.requires_grad for name, p in model.named_parameters()}
    examples = alignment_examples(rows, limit=32, seed=0)
    result = align_projection(model, tiny_processor, examples, steps=60, batch_size=16, learning_rate=1e-2,
                              log=lambda _: None)
    assert result["loss_end"] < result["loss_start"] and result["examples"] == 32
    changed = {name for name, value in model.state_dict().items() if not torch.equal(before[name], value)}
    assert changed == {"language_projection.weight", "language_projection.bias"}
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires and model.training

    # the projected queries now have the candidate tokens' mean norm
    vocabulary, _ = answer_token_targets(tiny_processor.tokenizer, [row["answer"] for row in examples])
    wanted = model.get_input_embeddings().weight[vocabulary].norm(dim=-1).mean().item()
    model.eval()
    with torch.no_grad():
        inputs = tiny_processor(images=[(row["image_before"], row["image_after"]) for row in examples[:8]],
                                text=[row["prompt"] for row in examples[:8]])
        projected = model.get_image_features(
            pixel_values=inputs["pixel_values"], qformer_input_ids=inputs["qformer_input_ids"],
            qformer_attention_mask=inputs["qformer_attention_mask"],
        ).pooler_output
    assert result["norm_after"] == pytest.approx(wanted, rel=1e-2)
    assert projected.norm(dim=-1).mean().item() == pytest.approx(wanted, rel=0.25)


def test_alignment_reuses_the_warm_ups_vision_cache(samples, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    folder, rows = samples
    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config())
    cache = FrozenVisionCache(model, tiny_processor.image_processor)
    facts = pair_facts(folder / "annotations" / "changechat_train.json", folder / "images")
    warm_up_vision(model, tiny_processor.image_processor, folder, steps=4, batch_size=8, log=lambda _: None,
                   processor=tiny_processor, facts=facts, vision_cache=cache)
    cached = len(cache.embeds)
    assert cached > 0  # the Q-Former phase filled it
    with pytest.raises(ValueError, match="start empty"):
        warm_up_vision(model, tiny_processor.image_processor, folder, steps=2, batch_size=4, log=lambda _: None,
                       processor=tiny_processor, facts=facts, vision_cache=cache)
    examples = alignment_examples(rows, limit=16, seed=0)
    pairs = {(row["image_before"], row["image_after"]) for row in examples}
    uncached = pairs - set(cache.embeds)
    through_vit = []
    get_pair_embeds = model.get_pair_embeds

    def counting(pixel_values, **kwargs):
        through_vit.append(pixel_values.shape[0])
        return get_pair_embeds(pixel_values, **kwargs)

    model.get_pair_embeds = counting
    align_projection(model, tiny_processor, examples, steps=2, batch_size=8, vision_cache=cache, log=lambda _: None)
    # only the pairs the warm-up did not draw go through the ViT
    assert sum(through_vit) == len(uncached) < len(pairs)


def test_alignment_arguments_are_checked(samples, tiny_model, tiny_processor):
    _, rows = samples
    examples = alignment_examples(rows, limit=4)
    for bad in ({"steps": 0}, {"batch_size": 0}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match="align_projection"):
            align_projection(tiny_model, tiny_processor, examples, log=lambda _: None, **bad)
    with pytest.raises(ValueError, match="no examples"):
        align_projection(tiny_model, tiny_processor, [], log=lambda _: None)
