"""The vision warm-up (Nano's first training stage): the pairs' facts it reads from the instruction records, and
one short run on a tiny model through its public function."""

import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from processing.conversation import GRID_CELLS
from train.synthetic import touched_cells, write_dataset
from train.vision_warmup import (
    BUILDING, COUNT_CLASSES, ROAD, PositionProbe, change_pairs, count_class_weights, dihedral, fact_targets, pair_change_loss, pair_facts,
    patch_cells, patch_targets, warm_up_vision,
)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic_warmup")
    write_dataset(folder, 30, seed=5)
    return folder


def _train_facts(folder):
    return pair_facts(folder / "annotations" / "changechat_train.json", folder / "images")


def test_facts_agree_with_the_change_masks(synthetic):
    facts = _train_facts(synthetic)
    pairs = change_pairs(synthetic)
    assert len(facts) == len(pairs)  # every training pair has its records
    changed_seen = set()
    for before, _, mask_path in pairs:
        pair = facts[os.path.realpath(before)]
        mask = np.asarray(Image.open(mask_path))
        assert pair["changed"] == float(mask.any())
        changed_seen.add(pair["changed"])
        assert (pair["roads"] + pair["buildings"] > 0) == bool(mask.any())
        road_cells = [GRID_CELLS[k] for k in range(9) if pair["cells"][k]]
        building_cells = [GRID_CELLS[k] for k in range(9) if pair["cells"][9 + k]]
        assert road_cells == touched_cells(mask == ROAD)
        assert building_cells == touched_cells(mask == BUILDING)
    assert changed_seen == {0.0, 1.0}


def test_missing_facts_are_masked_not_guessed():
    targets = fact_targets([{"changed": 1.0, "roads": 9, "buildings": 0, "cells": [0.0] * 18}, {}])
    assert targets["roads"].tolist() == [COUNT_CLASSES - 1, -100]  # 9 stays 9 ("nine or more"); absent: ignored
    assert targets["changed"][0] == 1.0 and torch.isnan(targets["changed"][1])
    assert torch.isnan(targets["cells"][1]).all()


def test_warm_up_trains_vision_csrm_and_qformer_but_not_the_llm(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=4, batch_size=4, log_every=1,
                             log=lambda _: None, processor=tiny_processor, facts=_train_facts(synthetic),
                             learning_rate=1e-3, vision_learning_rate=3e-3)
    # default split: the first half trains the vision side on the masks, the second the Q-Former on the facts
    assert [(entry["step"], entry["phase"]) for entry in history] == [
        (0, "vision"), (1, "vision"), (2, "qformer"), (3, "qformer")
    ]
    # each entry says its batch and its step's rate: each phase's own peak, one warm-up step in, then the cosine
    assert [entry["batch_size"] for entry in history] == [4] * 4
    assert [entry["learning_rate"] for entry in history] == pytest.approx([3e-3, 3e-3 * 0.5, 1e-3, 1e-3 * 0.5])
    assert all("patch_f1" in entry for entry in history[:2]) and all("change_accuracy" in entry for entry in history[2:])
    assert all(p.requires_grad for p in model.vision_model.parameters())  # the freeze of phase two is undone
    after = model.state_dict()

    def moved(prefix):
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))

    assert moved("vision_model.") and moved("difference_module.") and moved("query_tokens")
    assert moved("qformer.encoder.layer.0.crossattention.") and moved("qformer.encoder.layer.0.attention.")
    assert not moved("language_model.") and not moved("language_projection.")


def test_warm_up_without_facts_leaves_the_qformer_alone(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    model = DeltaVLMForConditionalGeneration(tiny_config())
    qformer = {name: value.clone() for name, value in model.qformer.state_dict().items()}
    warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4, log=lambda _: None)
    assert all(torch.equal(qformer[k], v) for k, v in model.qformer.state_dict().items())


def test_warm_up_errors_name_what_is_missing(synthetic, tiny_processor, tmp_path):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    model = DeltaVLMForConditionalGeneration(tiny_config())
    facts = _train_facts(synthetic)
    with pytest.raises(ValueError, match="processor"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, facts=facts)
    with pytest.raises(ValueError, match="none of the labelled pairs"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, processor=tiny_processor,
                       facts={"/elsewhere/a.png": {"changed": 1.0}})
    with pytest.raises(FileNotFoundError, match="change masks"):
        warm_up_vision(model, tiny_processor.image_processor, tmp_path, steps=1)


def test_held_out_scores_are_logged_without_changing_the_training(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    validation = pair_facts(synthetic / "annotations" / "changechat_val.json", synthetic / "images")
    runs = []
    for validation_facts in (None, validation):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4, log_every=1,
                                 log=lambda _: None, processor=tiny_processor, facts=_train_facts(synthetic),
                                 validation_facts=validation_facts, validation_pairs=3)
        runs.append((model, history))
    (plain, plain_history), (scored, scored_history) = runs
    assert scored.training  # scoring switches to eval mode and back
    # the query probe's scores appear once it trains (the Q-Former phase), the patch probe's throughout
    vision_scores = {"val_patch_f1", "val_patch_cell_f1", "val_position_accuracy", "val_patch_f1_roads",
                     "val_patch_f1_buildings", "val_patch_cell_f1_roads", "val_patch_cell_f1_buildings"}
    query_scores = {"val_change_accuracy", "val_cell_f1", "val_road_count_mae", "val_building_count_mae",
                    "val_cell_f1_roads", "val_cell_f1_buildings", "val_road_count_mae_zero",
                    "val_building_count_mae_zero", "val_roads_said", "val_roads_changed"}
    assert [set(entry) & (vision_scores | query_scores) for entry in scored_history] == [
        vision_scores, vision_scores | query_scores
    ]
    for entry in scored_history:
        assert all(0.0 <= value <= 1.0 for key, value in entry.items()
                   if key.startswith("val_") and "mae" not in key and not key.startswith("val_roads_"))
        assert all(0.0 <= value <= COUNT_CLASSES - 1 for key, value in entry.items() if "_mae" in key)
    queries = scored_history[1]
    assert 0 <= queries["val_roads_said"] <= 3 and 0 <= queries["val_roads_changed"] <= 3  # of the 3 held-out pairs
    # always-zero's error is the mean true count; the categories' F1 bracket the pooled one
    validation_counts = [validation[os.path.realpath(before)]["roads"]
                         for before, _, _ in change_pairs(synthetic, "val")[:3]]
    assert queries["val_road_count_mae_zero"] == round(sum(validation_counts) / 3, 3)
    assert queries["val_roads_changed"] == sum(count > 0 for count in validation_counts)
    for name in ("val_patch_f1", "val_patch_cell_f1", "val_cell_f1"):
        low, high = sorted([queries[f"{name}_roads"], queries[f"{name}_buildings"]])
        assert low - 1e-3 <= queries[name] <= high + 1e-3
    assert not any(key.startswith("val_") for entry in plain_history for key in entry)
    # held-out scoring runs under no_grad in eval mode and draws no random numbers: the same weights come out
    scored_state = scored.state_dict()
    assert all(torch.equal(value, scored_state[key]) for key, value in plain.state_dict().items())


def test_held_out_scoring_needs_facts_and_matching_pairs(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    model = DeltaVLMForConditionalGeneration(tiny_config())
    validation = pair_facts(synthetic / "annotations" / "changechat_val.json", synthetic / "images")
    with pytest.raises(ValueError, match="validation_facts need facts"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, validation_facts=validation)
    with pytest.raises(ValueError, match="images/val"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, processor=tiny_processor,
                       facts=_train_facts(synthetic), validation_facts=_train_facts(synthetic))


def test_the_qformer_phase_reads_a_fixed_vision_side(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config())
    before = {name: value.clone() for name, value in model.state_dict().items()}
    warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4, log=lambda _: None,
                   processor=tiny_processor, facts=_train_facts(synthetic), vision_steps=0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("vision_model.", "difference_module.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("qformer."))
    with pytest.raises(ValueError, match="vision_steps must lie in"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, processor=tiny_processor,
                       facts=_train_facts(synthetic), vision_steps=3)
    with pytest.raises(ValueError, match="without facts"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, vision_steps=1)


def test_cell_positive_weight_scales_only_the_changed_cells():
    from train.vision_warmup import fact_loss

    logits = {"changed": torch.zeros(1), "roads": torch.zeros(1, COUNT_CLASSES),
              "buildings": torch.zeros(1, COUNT_CLASSES), "cells": torch.zeros(1, 18)}
    no_cells = fact_targets([{"changed": 1.0, "roads": 0, "buildings": 0, "cells": [0.0] * 18}])
    two_cells = fact_targets([{"changed": 1.0, "roads": 0, "buildings": 0, "cells": [1.0, 1.0] + [0.0] * 16}])
    assert fact_loss(logits, no_cells, 4.0) == pytest.approx(fact_loss(logits, no_cells, 1.0).item())
    # at logit 0 each cell's term is log 2; a positive weighted by w counts w times: (2*4 + 16) / 18 vs 18 / 18
    gap = fact_loss(logits, two_cells, 4.0) - fact_loss(logits, two_cells, 1.0)
    assert gap.item() == pytest.approx(np.log(2) * (2 * 4 + 16 - 18) / 18, rel=1e-5)


def _trained_position_probe(pair_embeds, grid, steps=150):
    probe = PositionProbe(pair_embeds.shape[-1], grid)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        probe.loss(pair_embeds).backward()
        optimizer.step()
    return probe


def test_position_probe_reads_position_only_where_the_features_carry_it():
    torch.manual_seed(0)
    grid, width, batch = 4, 16, 8
    tokens = 1 + grid * grid  # CLS + patches, per image
    noise = 0.1 * torch.randn(batch, 2 * tokens, width)
    per_position = torch.randn(1, tokens, width).repeat(1, 2, 1)  # the same code at a position in A and B
    located = _trained_position_probe(per_position + noise, grid)
    assert located.accuracy(per_position + noise) > 0.95
    same_everywhere = torch.randn(1, 1, width).expand(1, 2 * tokens, width)  # features that say nothing of where
    lost = _trained_position_probe(same_everywhere + noise, grid)
    assert lost.accuracy(same_everywhere + noise) < 0.3  # chance: 1 / 16 for row and column together
    rows, columns = located(per_position + noise)
    assert rows.shape == columns.shape == (batch, 2, grid * grid, grid)


def test_position_weight_adds_the_position_term_to_the_mask_phase(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    validation = pair_facts(synthetic / "annotations" / "changechat_val.json", synthetic / "images")
    runs = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4, log_every=1,
                                 log=lambda _: None, processor=tiny_processor, facts=_train_facts(synthetic),
                                 validation_facts=validation, validation_pairs=3, position_weight=weight)
        runs[weight] = (model.state_dict(), history)
    (off, off_history), (on, on_history) = runs[0.0], runs[1.0]
    assert not any("val_position_accuracy" in entry for entry in off_history)
    assert all(0.0 <= entry["val_position_accuracy"] <= 1.0 for entry in on_history)
    # the first step's loss gains the position term, and the ViT is trained differently
    assert on_history[0]["loss"] > off_history[0]["loss"]
    assert any(not torch.equal(off[k], on[k]) for k in off if k.startswith("vision_model."))
    with pytest.raises(ValueError, match="position_weight"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                       steps=1, position_weight=-1.0)


def test_pair_change_loss_reads_each_pairs_most_confident_patch():
    quiet = torch.full((1, 9, 2), -6.0)
    one_loud_patch = quiet.clone()
    one_loud_patch[0, 4, 1] = 6.0
    unchanged, changed = torch.zeros(1, 9, 2), torch.zeros(1, 9, 2)
    changed[0, 7, 0] = 1.0  # a road elsewhere: the pair changed, wherever its patches say so
    assert pair_change_loss(quiet, unchanged) < 0.01 and pair_change_loss(one_loud_patch, changed) < 0.01
    assert pair_change_loss(one_loud_patch, unchanged) > 5.0 and pair_change_loss(quiet, changed) > 5.0
    # the gradient reaches the one patch that decides, and no other
    logits = one_loud_patch.clone().requires_grad_(True)
    pair_change_loss(logits, unchanged).backward()
    assert logits.grad.nonzero().tolist() == [[0, 4, 1]]


def test_change_flag_weight_adds_the_pairs_yes_no_to_the_mask_phase(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    runs = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4, log_every=1,
                                 log=lambda _: None, change_flag_weight=weight)
        runs[weight] = (model.state_dict(), history)
    (off, off_history), (on, on_history) = runs[0.0], runs[1.0]
    assert on_history[0]["loss"] > off_history[0]["loss"]  # the first step's loss gains the pair term
    assert all(entry["pair_change_loss"] > 0 for entry in on_history)  # and the log shows it
    assert not any("pair_change_loss" in entry for entry in off_history)
    assert any(not torch.equal(off[k], on[k]) for k in off if k.startswith("vision_model."))
    assert all(torch.equal(off[k], on[k]) for k in off if k.startswith(("qformer.", "language_model.")))
    with pytest.raises(ValueError, match="change_flag_weight"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                       steps=1, change_flag_weight=-1.0)


def test_count_class_weights_are_inverse_frequencies_of_the_classes_present():
    facts = {"a": {"roads": 0, "buildings": 2}, "b": {"roads": 0, "buildings": 2}, "c": {"roads": 0},
             "d": {"roads": 1, "buildings": 40}, "e": {"changed": 1.0}}
    weights = count_class_weights(facts)
    # roads: three 0s, one 1 -> 4 / (2 * 3) and 4 / (2 * 1); buildings: two 2s, one "nine or more"
    assert weights["roads"][:2].tolist() == pytest.approx([2 / 3, 2.0]) and weights["roads"][2:].sum() == 0
    assert weights["buildings"][2] == pytest.approx(3 / 4) and weights["buildings"][COUNT_CLASSES - 1] == pytest.approx(1.5)
    assert weights["buildings"].count_nonzero() == 2
    with pytest.raises(ValueError, match="no pair states a roads count"):
        count_class_weights({"a": {"buildings": 1}})


def test_count_weighting_reweighs_only_the_qformer_phase_counts(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    runs = {}
    for weighting in ("none", "inverse_frequency"):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4,
                                 vision_steps=1, log_every=1, log=lambda _: None, processor=tiny_processor,
                                 facts=_train_facts(synthetic), count_weighting=weighting)
        runs[weighting] = (model.state_dict(), history)
    (plain, plain_history), (weighted, weighted_history) = runs["none"], runs["inverse_frequency"]
    assert plain_history[0]["loss"] == weighted_history[0]["loss"]  # the mask phase is the same
    assert plain_history[1]["loss"] != weighted_history[1]["loss"]  # the fact loss is not
    assert any(not torch.equal(plain[k], weighted[k]) for k in plain if k.startswith("qformer."))
    assert all(torch.equal(plain[k], weighted[k]) for k in plain if k.startswith("vision_model."))
    with pytest.raises(ValueError, match="count_weighting must be 'none' or 'inverse_frequency', got 'balanced'"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                       steps=1, count_weighting="balanced")


def test_patch_positive_weight_weighs_each_categorys_changed_patches_in_the_mask_loss(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    first_losses = {}
    for weights in ((4.0, 4.0), (12.0, 4.0), (4.0, 12.0)):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        # every training pair in the one batch: changed roads and buildings are both among them
        history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, batch_size=64,
                                 log_every=1, log=lambda _: None, patch_positive_weight=weights)
        first_losses[weights] = history[0]["loss"]
    targets = patch_targets([mask for _, _, mask in change_pairs(synthetic)], 2)
    assert targets[..., 0].any() and targets[..., 1].any()
    # a larger weight on a category's positives raises the loss, each category on its own
    assert first_losses[(12.0, 4.0)] > first_losses[(4.0, 4.0)]
    assert first_losses[(4.0, 12.0)] > first_losses[(4.0, 4.0)]
    assert first_losses[(12.0, 4.0)] != first_losses[(4.0, 12.0)]
    for bad in ((4.0,), (4.0, 0.0), (4.0, 4.0, 4.0)):
        with pytest.raises(ValueError, match="patch_positive_weight must be two weights > 0"):
            warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                           steps=1, patch_positive_weight=bad)


def test_vision_ramp_steps_sets_the_mask_phases_linear_ramp(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    rates = {}
    for ramp in (None, 5):
        torch.manual_seed(0)
        history = warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor,
                                 synthetic, steps=10, batch_size=2, learning_rate=1e-3, log_every=1,
                                 log=lambda _: None, vision_ramp_steps=ramp)
        rates[ramp] = [entry["learning_rate"] for entry in history]

    def cosine(step):
        return 0.5 * (1 + math.cos(math.pi * step / 10))

    # default: a tenth of the 10 steps, so the first step is at the top; with 5, the rate climbs for 5 steps
    assert rates[None] == pytest.approx([1e-3 * cosine(step) for step in range(10)])
    assert rates[5] == pytest.approx([1e-3 * min(1.0, (step + 1) / 5) * cosine(step) for step in range(10)])
    with pytest.raises(ValueError, match="vision_ramp_steps must be >= 1, got 0"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                       steps=1, vision_ramp_steps=0)


def test_change_probe_subgrid_lays_each_patchs_sub_patches_out_on_the_fine_grid():
    from train.vision_warmup import ChangeProbe

    grid, k, width = 3, 2, 4
    probe = ChangeProbe(width, subgrid=k)
    with torch.no_grad():  # output o of patch p is 1000 * p + o: feature 0 of A's patch p holds p
        probe.classifier.weight.zero_()
        probe.classifier.weight[:, 0] = 1000.0
        probe.classifier.bias.copy_(torch.arange(2 * k * k, dtype=torch.float))
    before = torch.zeros(1, 1 + grid * grid, width)
    before[0, 1:, 0] = torch.arange(grid * grid, dtype=torch.float)
    logits = probe(torch.cat([before, torch.zeros_like(before)], dim=1))
    assert logits.shape == (1, (grid * k) ** 2, 2)
    fine = logits[0].unflatten(0, (grid * k, grid * k))  # (row, column, category)
    for row in range(grid * k):
        for column in range(grid * k):
            patch = (row // k) * grid + column // k
            sub = (row % k) * k + column % k
            assert fine[row, column].tolist() == [1000.0 * patch + 2 * sub, 1000.0 * patch + 2 * sub + 1]
    assert ChangeProbe(width)(torch.cat([before, before], dim=1)).shape == (1, grid * grid, 2)
    with pytest.raises(ValueError, match="subgrid must be >= 1, got 0"):
        ChangeProbe(width, subgrid=0)


def test_mask_subgrid_trains_and_scores_the_mask_at_the_finer_grid(synthetic, tiny_processor, monkeypatch):
    import train.vision_warmup as vision_warmup
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    config = tiny_config()
    grid = config.vision_config.image_size // config.vision_config.patch_size
    facts = _train_facts(synthetic)
    validation = pair_facts(synthetic / "annotations" / "changechat_val.json", synthetic / "images")
    histories = {}
    for subgrid in (1, 3):
        grids_read = []

        def recording(paths, grid_asked, min_pixels=None):
            grids_read.append(grid_asked)
            return patch_targets(paths, grid_asked, min_pixels)

        monkeypatch.setattr(vision_warmup, "patch_targets", recording)
        torch.manual_seed(0)
        histories[subgrid] = warm_up_vision(
            DeltaVLMForConditionalGeneration(config), tiny_processor.image_processor, synthetic, steps=3,
            batch_size=2, log_every=1, log=lambda _: None, processor=tiny_processor, facts=facts,
            validation_facts=validation, vision_steps=2, validation_pairs=4, mask_subgrid=subgrid)
        # training and held-out scoring both read the mask at k times the patch grid
        assert set(grids_read) == {grid * subgrid}
        assert all("val_patch_cell_f1" in entry for entry in histories[subgrid])
    assert [e["loss"] for e in histories[1]] != [e["loss"] for e in histories[3]]
    with pytest.raises(ValueError, match="mask_subgrid must be >= 1, got 0"):
        warm_up_vision(DeltaVLMForConditionalGeneration(config), tiny_processor.image_processor, synthetic, steps=1,
                       mask_subgrid=0)


def test_patch_targets_cover_the_whole_image_when_the_side_is_no_multiple_of_the_grid(tmp_path):
    mask = np.zeros((256, 256), np.uint8)
    mask[100:140, 250:256] = BUILDING  # the last 6 px column: 256 px on 10 patches are 25.6 px each
    mask[0:20, 0:20] = ROAD
    Image.fromarray(mask).save(tmp_path / "mask.png")
    targets = patch_targets([str(tmp_path / "mask.png")], grid=10)[0].unflatten(0, (10, 10))  # (row, column, 2)
    # rows 102.4-153.6 px hold the building; row 3 ends at 102.4, its 2.4 px of it are under 5% of the patch
    assert targets[..., 1].nonzero().tolist() == [[4, 9], [5, 9]]
    assert targets[..., 0].nonzero().tolist() == [[0, 0]]


def test_cell_query_probe_gives_each_cell_its_own_query():
    from train.vision_warmup import CellQueryProbe, cell_loss

    torch.manual_seed(0)
    probe = CellQueryProbe(8)
    queries = torch.randn(3, 12, 8)  # more queries than cells: the spare ones are not read
    logits = probe(queries)
    assert logits.shape == (3, 18)
    # query i alone decides cell i, for roads (column i) and buildings (column 9 + i)
    moved = queries.clone()
    moved[:, 4] += 1.0
    changed_columns = (probe(moved) != logits).any(dim=0).nonzero().flatten().tolist()
    assert changed_columns == [4, 13]
    moved = queries.clone()
    moved[:, 9:] += 1.0
    assert torch.equal(probe(moved), logits)
    # pairs without cells (NaN) are left out of the loss; none known at all gives zero
    cells = torch.tensor([[1.0] + [0.0] * 17, [float("nan")] * 18, [0.0] * 18])
    assert cell_loss(logits, cells).item() == pytest.approx(cell_loss(logits[[0, 2]], cells[[0, 2]]).item())
    assert cell_loss(logits, torch.full((3, 18), float("nan"))).item() == 0.0


def test_cell_query_weight_trains_the_slot_probe_in_the_qformer_phase(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    validation = pair_facts(synthetic / "annotations" / "changechat_val.json", synthetic / "images")
    runs = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config(num_query_tokens=9))
        history = warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=3, vision_steps=1,
                                 batch_size=4, log_every=1, log=lambda _: None, processor=tiny_processor,
                                 facts=_train_facts(synthetic), validation_facts=validation, validation_pairs=3,
                                 cell_query_weight=weight)
        runs[weight] = (model.state_dict(), history)
    (off, off_history), (on, on_history) = runs[0.0], runs[1.0]
    assert not any("val_slot_cell_f1" in entry for entry in off_history)
    qformer_entries = [entry for entry in on_history if entry["phase"] == "qformer"]
    assert qformer_entries and all(0.0 <= entry["val_slot_cell_f1"] <= 1.0 for entry in qformer_entries)
    assert qformer_entries[0]["loss"] > [e for e in off_history if e["phase"] == "qformer"][0]["loss"]
    assert any(not torch.equal(off[k], on[k]) for k in off if k.startswith("qformer.") or k == "query_tokens")
    with pytest.raises(ValueError, match="cell_query_weight must be >= 0"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                       steps=1, cell_query_weight=-1.0)
    with pytest.raises(ValueError, match="num_query_tokens=4"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config(num_query_tokens=4)),
                       tiny_processor.image_processor, synthetic, steps=1, cell_query_weight=1.0)


def test_vision_learning_rate_sets_the_mask_phase_rate_only(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # rate 0 in the mask phase: the ViT and CSRM stay put, the Q-Former phase still trains at learning_rate
    warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, vision_steps=1, batch_size=4,
                   log=lambda _: None, processor=tiny_processor, facts=_train_facts(synthetic), vision_learning_rate=0.0)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("vision_model.", "difference_module.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("qformer."))


def test_patch_cells_from_the_true_patches_give_the_annotated_cells_almost_always(synthetic):
    """A cell is hit when a patch centred in it is; from the masks' own patches that reading agrees with the
    annotated cells except where a change only grazes a cell (a few mask pixels in a patch centred elsewhere)."""
    pairs = change_pairs(synthetic)
    facts = _train_facts(synthetic)
    cells = patch_cells(patch_targets([mask for _, _, mask in pairs], grid=12).bool())
    assert cells.shape == (len(pairs), 18)
    truth = torch.tensor([facts[os.path.realpath(before)]["cells"] for before, _, _ in pairs]).bool()
    f1 = 2 * (cells & truth).sum() / (cells.sum() + truth.sum())
    assert f1 > 0.85
    # one building patch at the far right of the middle row of a 10x10 grid: centre-right, buildings' half
    hits = torch.zeros(1, 100, 2, dtype=torch.bool)
    hits[0, 5 * 10 + 9, 1] = True
    assert patch_cells(hits)[0].nonzero().flatten().tolist() == [9 + GRID_CELLS.index("center-right")]


def test_dihedral_moves_each_patch_target_with_its_pixels():
    grid, patch = 4, 8
    pixels = torch.rand(5, 1, 3, grid * patch, grid * patch)
    pixels = torch.cat([pixels, 2 * pixels], dim=1)  # B = 2 A: only the same move on both keeps that
    # each patch's target is its mean pixel in A, so the targets can be recomputed after the move
    def means(images):
        return images[:, 0].mean(1).unflatten(1, (grid, patch)).unflatten(3, (grid, patch)).mean((2, 4)).flatten(1)
    targets = torch.stack([means(pixels), -means(pixels)], dim=-1)  # (B, grid*grid, 2)
    seen = set()
    generator = torch.Generator().manual_seed(0)
    for _ in range(40):
        moved, moved_targets = dihedral(pixels, targets, generator)
        assert moved.shape == pixels.shape
        torch.testing.assert_close(moved_targets[..., 0], means(moved))
        torch.testing.assert_close(moved_targets[..., 1], -means(moved))
        torch.testing.assert_close(moved[:, 1], 2 * moved[:, 0])  # A and B moved together
        seen.add(tuple(moved_targets[0, :, 0].argsort().tolist()))
    assert len(seen) == 8  # all eight symmetries of the square turn up


def test_mask_augment_changes_what_the_mask_phase_sees_and_is_seeded(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    states = []
    for augment in (False, True, True):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=2, batch_size=4, log=lambda _: None,
                       mask_augment=augment)
        states.append(model.vision_model.state_dict())
    plain, augmented, again = states
    assert any(not torch.equal(plain[k], augmented[k]) for k in plain)
    assert all(torch.equal(augmented[k], again[k]) for k in augmented)


def test_frozen_vision_cache_gives_the_features_of_the_uncached_path(synthetic, tiny_processor):
    """The Q-Former phase reads the ViT outputs from a cache: the same query outputs, dropout draws included (the
    difference module runs each call in train mode), whether a pair is cached, new, or beyond `max_pairs`."""
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from train.vision_warmup import FrozenVisionCache

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config(difference_dropout=0.5)).train()
    pairs = [(before, after) for before, after, _ in change_pairs(synthetic)[:3]]
    text = [tiny_processor.apply_chat_template([{"role": "user", "content": "is there any change?"}])] * 3
    qformer_ids = tiny_processor(text=text)["qformer_input_ids"]
    pixel_values = tiny_processor(images=pairs, text=text)["pixel_values"]

    def uncached():
        torch.manual_seed(7)
        return model.get_image_features(pixel_values=pixel_values, qformer_input_ids=qformer_ids).query_output

    def cached(cache, batch):
        torch.manual_seed(7)
        return model.get_image_features(pair_embeds=cache.pair_embeds(batch), qformer_input_ids=qformer_ids).query_output

    expected = uncached()
    cache = FrozenVisionCache(model, tiny_processor.image_processor)
    assert torch.equal(cached(cache, pairs), expected) and len(cache.embeds) == 3  # computed, then kept
    assert torch.equal(cached(cache, pairs), expected)  # read back
    small = FrozenVisionCache(model, tiny_processor.image_processor, max_pairs=1)
    assert torch.equal(cached(small, pairs), expected) and len(small.embeds) == 1
    assert torch.equal(cached(small, pairs), expected)  # one read back, two recomputed
    # dropout is live: another seed draws other masks through the cached outputs
    torch.manual_seed(8)
    other = model.get_image_features(pair_embeds=cache.pair_embeds(pairs), qformer_input_ids=qformer_ids).query_output
    assert not torch.equal(other, expected)



def test_batch_size_is_checked(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    from tests.conftest import tiny_config

    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        warm_up_vision(DeltaVLMForConditionalGeneration(tiny_config()), tiny_processor.image_processor, synthetic,
                       steps=2, batch_size=0, processor=tiny_processor, facts=_train_facts(synthetic))


def test_length_buckets_keep_similar_lengths_together():
    from train.vision_warmup import length_buckets

    assert length_buckets([12, 51, 16, 13]) == [[0, 3, 2], [1]]
    assert length_buckets([5, 5, 5]) == [[0, 1, 2]]
    assert length_buckets([10, 16, 24, 40], max_ratio=1.5) == [[0], [1, 2], [3]]
    assert length_buckets([]) == []


def test_query_outputs_in_length_buckets_are_the_one_batch_outputs(synthetic, tiny_processor):
    """The Q-Former phase runs short and long instructions apart (less padding): each pair still gets the query
    output one padded batch gives it, in the batch's order."""
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from train.vision_warmup import FACT_PROMPTS, query_output_in_length_buckets

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    model = DeltaVLMForConditionalGeneration(tiny_config()).eval()
    pairs = [(before, after) for before, after, _ in change_pairs(synthetic)[:6]]
    prompts = [tiny_processor.apply_chat_template([{"role": "user", "content": p}]) for p in FACT_PROMPTS]
    text = [prompts[i] for i in (3, 0, 1, 3, 2, 0)]  # the localization prompt is by far the longest
    inputs = tiny_processor(images=pairs, text=text)
    with torch.no_grad():
        one_batch = model.get_image_features(**{k: inputs[k] for k in ("pixel_values", "qformer_input_ids",
                                                                      "qformer_attention_mask")}).query_output
        pair_embeds = model.get_pair_embeds(inputs["pixel_values"]).pair_embeds
        bucketed = query_output_in_length_buckets(model, tiny_processor, pair_embeds, text)
    assert bucketed.shape == one_batch.shape
    torch.testing.assert_close(bucketed, one_batch, atol=1e-5, rtol=1e-4)  # row by row: the order is restored


def test_pair_instructions_are_the_prompts_training_gives_each_pair(synthetic):
    from processing.changechat_data import load_records
    from train.data import records_to_samples
    from train.vision_warmup import pair_instructions

    annotations = synthetic / "annotations" / "changechat_train.json"
    instructions = pair_instructions(annotations, synthetic / "images")
    samples = records_to_samples(load_records(annotations, synthetic / "images"), captions_per_pair="first")
    assert sum(len(texts) for texts in instructions.values()) == len(samples)
    assert set(instructions) == {os.path.realpath(path) for path in samples["image_before"]}
    first = os.path.realpath(samples[0]["image_before"])
    assert instructions[first] == [s["prompt"] for s in samples if os.path.realpath(s["image_before"]) == first]
    # every task's prompts are there, dialogue rounds with their history (longer than any single question)
    tasks = {s["task"] for s in samples if os.path.realpath(s["image_before"]) == first}
    assert {"binary", "count", "localization", "dialogue"} <= tasks


def test_own_instructions_train_the_qformer_under_each_pairs_prompts(synthetic, tiny_processor):
    """With `instructions` the Q-Former phase reads each pair's own prompts (other weights come out than under the
    four fact prompts); with `validation_instructions` the held-out query scores are also given under them."""
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from train.vision_warmup import pair_instructions

    from tests.conftest import tiny_config

    annotations = synthetic / "annotations"
    validation = pair_facts(annotations / "changechat_val.json", synthetic / "images")
    validation_instructions = pair_instructions(annotations / "changechat_val.json", synthetic / "images")
    states, histories = [], []
    for instructions in (None, pair_instructions(annotations / "changechat_train.json", synthetic / "images")):
        torch.manual_seed(0)
        model = DeltaVLMForConditionalGeneration(tiny_config())
        histories.append(warm_up_vision(
            model, tiny_processor.image_processor, synthetic, steps=2, vision_steps=0, batch_size=4, log_every=1,
            log=lambda _: None, processor=tiny_processor, facts=_train_facts(synthetic), instructions=instructions,
            validation_facts=validation, validation_instructions=validation_instructions, validation_pairs=3))
        states.append(model.state_dict())
    assert any(not torch.equal(value, states[1][key]) for key, value in states[0].items() if key.startswith("qformer."))
    own = {"val_change_accuracy_own", "val_cell_f1_own", "val_road_count_mae_own", "val_building_count_mae_own"}
    assert all(own <= set(entry) for history in histories for entry in history)
    with pytest.raises(ValueError, match="validation_instructions need validation_facts"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, processor=tiny_processor,
                       facts=_train_facts(synthetic), validation_instructions=validation_instructions)


def test_patch_targets_by_pixel_count_follow_the_cell_rule(tmp_path):
    """With `min_pixels` a patch is a target from that many changed pixels on, whatever the patch's area; without
    it from 5% of the patch. On 3 patches a side each patch is one cell: a 12-pixel change is listed by the cell
    rule and by the count rule, missed by 5% of an 85-pixel patch; 11 pixels are neither."""
    from train.vision_warmup import BUILDING

    mask = np.zeros((255, 255), dtype=np.uint8)
    mask[10:13, 10:14] = BUILDING  # 12 pixels in the top-left cell
    mask[100:101, 100:111] = BUILDING  # 11 pixels in the centre cell
    path = tmp_path / "mask.png"
    Image.fromarray(mask).save(path)
    assert touched_cells(mask == BUILDING) == ["top-left"]
    by_count = patch_targets([str(path)], 3, min_pixels=12)[0, :, 1]
    by_share = patch_targets([str(path)], 3)[0, :, 1]
    assert by_count.tolist() == [1.0] + [0.0] * 8
    assert not by_share.any()
    cells = patch_cells(patch_targets([str(path)], 3, min_pixels=12).bool())[0]  # roads' nine, then buildings'
    assert cells.tolist() == [False] * 9 + [True] + [False] * 8
    with pytest.raises(ValueError, match="square single-channel"):
        Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(tmp_path / "wide.png")
        patch_targets([str(tmp_path / "wide.png")], 2)


def test_warm_up_refuses_a_patch_target_count_below_one(synthetic, tiny_processor):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from tests.conftest import tiny_config

    model = DeltaVLMForConditionalGeneration(tiny_config())
    with pytest.raises(ValueError, match="patch_target_pixels must be >= 1"):
        warm_up_vision(model, tiny_processor.image_processor, synthetic, steps=1, batch_size=2, log=lambda _: None,
                       patch_target_pixels=0)
