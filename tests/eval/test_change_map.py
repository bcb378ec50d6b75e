"""Change maps: the scores are the difference module's, the grid lands on the right part of the image, and the
mass-in-mask figure on the two LEVIR-CC pairs with change masks (a plumbing check with an untrained tiny model:
its figure is near the mask's area fraction, i.e. chance)."""

import numpy as np
import pytest
import torch
from PIL import Image

from eval.change_map import change_map, heat_map, mass_in_mask, overlay, pair_embeds_with_scores

QUADRANTS = [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.fixture(scope="module")
def pixel_values_of(tiny_processor):
    def encode(before, after):
        return tiny_processor.image_processor([(Image.fromarray(before), Image.fromarray(after))])["pixel_values"]

    return encode


def random_image(seed, size=56):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_scores_are_the_difference_modules(tiny_model, pixel_values_of):
    pixel_values = pixel_values_of(random_image(0), random_image(1))
    vision = tiny_model.get_pair_embeds(pixel_values)
    before, after = vision.before_embeds, vision.after_embeds  # X_A, X_B: (1, S, D)
    num_tokens = before.shape[1]
    z_before, z_after = vision.pair_embeds[:, :num_tokens], vision.pair_embeds[:, num_tokens:]

    pair_embeds, difference = pair_embeds_with_scores(tiny_model, pixel_values, "difference")
    assert torch.equal(pair_embeds, vision.pair_embeds)
    expected = (z_after - z_before).norm(dim=-1)[:, 1:].reshape(1, 2, 2)
    torch.testing.assert_close(difference, expected)

    # gate: |S_B| = |sigmoid(gate1(D) + gate2(X_B)) * tanh(context1(D) + context2(X_B))| (CSRM, eval mode)
    module = tiny_model.difference_module
    change = after - before
    gated = torch.sigmoid(module.gate1(change) + module.gate2(after)) * torch.tanh(module.context1(change) + module.context2(after))
    _, gate = pair_embeds_with_scores(tiny_model, pixel_values, "gate")
    torch.testing.assert_close(gate, gated.norm(dim=-1)[:, 1:].reshape(1, 2, 2))
    assert not module.context3._forward_pre_hooks  # the hook is gone after the call


def test_unchanged_pair_gives_an_empty_map(tiny_model, pixel_values_of):
    image = random_image(2)
    _, scores = pair_embeds_with_scores(tiny_model, pixel_values_of(image, image), "difference")
    assert scores.abs().max() < 1e-5
    assert heat_map(scores[0], (56, 56)).max() == 0


@pytest.mark.parametrize("quadrant", QUADRANTS)
def test_the_changed_quadrant_is_hottest(tiny_model, tiny_processor, quadrant):
    """B = A with one quadrant replaced: even untrained, |Z_B - Z_A| peaks on that quadrant's patch (the ViT's
    residual stream keeps each token mostly its own patch), so grid rows/columns map to the image correctly."""
    row, col = quadrant
    before = random_image(3)
    after = before.copy()
    after[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = random_image(4, 28)
    mask = np.zeros((56, 56), dtype=np.uint8)
    mask[row * 28 : (row + 1) * 28, col * 28 : (col + 1) * 28] = 255

    pair_embeds, heat = change_map(tiny_model, tiny_processor, Image.fromarray(before), Image.fromarray(after))
    assert heat.shape == (56, 56) and 0 <= heat.min() and heat.max() == pytest.approx(1.0)
    assert pair_embeds.shape[0] == 1
    assert np.unravel_index(heat.argmax(), heat.shape)[0] // 28 == row
    assert np.unravel_index(heat.argmax(), heat.shape)[1] // 28 == col
    assert mass_in_mask(heat, mask) > 0.5  # a quarter of the area holds most of the heat


def test_gate_map_needs_the_difference_module(make_tiny_config, pixel_values_of):
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    model = DeltaVLMForConditionalGeneration(make_tiny_config(use_difference_module=False)).eval()
    pixel_values = pixel_values_of(random_image(0), random_image(1))
    with pytest.raises(ValueError, match="needs the difference module"):
        pair_embeds_with_scores(model, pixel_values, "gate")
    _, scores = pair_embeds_with_scores(model, pixel_values, "difference")  # plain |X_B - X_A| then
    assert scores.shape == (1, 2, 2)


def test_mass_in_mask():
    mask = np.zeros((40, 40), dtype=np.uint8)
    mask[:10] = 1
    assert mass_in_mask(np.ones((40, 40)), mask) == pytest.approx(0.25)  # uniform: the area fraction
    heat = np.zeros((40, 40))
    heat[2:8, 5:30] = 0.7
    assert mass_in_mask(heat, mask) == pytest.approx(1.0)
    assert mass_in_mask(np.zeros((40, 40)), mask) == 0.0
    # a mask of another size is resized (nearest) onto the map
    big_mask = np.kron(mask, np.ones((4, 4), dtype=np.uint8))
    assert mass_in_mask(np.ones((40, 40)), big_mask) == pytest.approx(0.25)


def test_overlay_keeps_the_image_where_there_is_no_change():
    image = Image.fromarray(random_image(5, 32))
    heat = np.zeros((32, 32), dtype=np.float32)
    heat[:, 16:] = 1.0
    drawn = np.asarray(overlay(image, heat))
    assert np.array_equal(drawn[:, :16], np.asarray(image)[:, :16])
    assert (drawn[:, 16:, 0] >= np.asarray(image)[:, 16:, 0]).all()  # red pushed up where the heat is
    with pytest.raises(ValueError, match="does not match"):
        overlay(image, heat[:10])


def test_mass_in_mask_on_levir_cc_pairs(tiny_model, tiny_processor, shared_dir):
    """Plumbing on real data: the two LEVIR-CC training pairs that come with change masks. With an untrained
    tiny model (a 2x2 patch grid) the figure is chance level, not a result; it is printed for the record."""
    folder = shared_dir / "data" / "levir_cc" / "sample" / "images" / "train"
    names = sorted(path.name for path in (folder / "label").glob("*.png"))
    assert len(names) == 2
    for name in names:
        before = Image.open(folder / "A" / name).convert("RGB")
        after = Image.open(folder / "B" / name).convert("RGB")
        mask = np.asarray(Image.open(folder / "label" / name))
        _, heat = change_map(tiny_model, tiny_processor, before, after)
        assert heat.shape == mask.shape
        fraction = mass_in_mask(heat, mask)
        assert 0.0 <= fraction <= 1.0
        print(f"{name}: {fraction:.3f} of the change map's mass in the mask (mask area {np.mean(mask > 0):.3f})")


def test_heat_map_ignores_float_noise_but_not_a_real_spread():
    noise = torch.full((4, 4), 1e-7)
    noise[0, 0] = 2e-7
    assert heat_map(noise, (8, 8)).max() == 0  # identical images, batched: ~1e-7 apart on some CPUs
    baseline = torch.full((4, 4), 50.0)
    baseline[1, 2] = 50.0 + 1e-4  # within float noise of a score of 50
    assert heat_map(baseline, (8, 8)).max() == 0
    real = torch.zeros((4, 4))
    real[3, 3] = 0.02
    assert heat_map(real, (8, 8)).max() == pytest.approx(1.0)
