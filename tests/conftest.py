"""Shared test fixtures: tiny DeltaVLM configs, the tiny processor, and `../shared` (read-only data beside the
checkout: the authors' tiny fixture, LEVIR-CC captions and six real pairs)."""

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
FIXTURE = SHARED / "fixtures" / "original_tiny"
SAMPLE_IMAGES = SHARED / "data" / "levir_cc" / "sample" / "images"


def tiny_config(**overrides):
    """A DeltaVLM config at tiny dimensions (the fixture's widths, fewer ViT blocks), vocabularies matching
    the fixture tokenizers: LLM 500 pieces + [PAD] = 501 rows, image token 501; Q-Former 30523."""
    from modeling_deltavlm import DeltaVLMConfig

    kwargs = dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=139, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=14,
            initializer_range=0.02,
        ),
        qformer_config=dict(
            vocab_size=30523, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=37
        ),
        text_config=dict(
            model_type="llama", vocab_size=501, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
            pad_token_id=500, bos_token_id=2, eos_token_id=2,
        ),
        num_query_tokens=4,
        image_token_id=501,
    )
    kwargs.update(overrides)
    return DeltaVLMConfig(**kwargs)


def build_tiny_processor(image_size: int = 28):
    """The fixture's tokenizers set up as the authors do: [PAD] appended to the LLaMA vocabulary,
    bos = eos = unk = '</s>'; '[DEC]' as the BERT tokenizer's bos."""
    from transformers import AutoTokenizer

    from processing import DeltaVLMImageProcessor, DeltaVLMProcessor

    checkpoint = FIXTURE / "original_checkpoint"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint / "vicuna")
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    tokenizer.add_special_tokens({"bos_token": "</s>", "eos_token": "</s>", "unk_token": "</s>"})
    qformer_tokenizer = AutoTokenizer.from_pretrained(checkpoint / "bert-base-uncased")
    qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    image_processor = DeltaVLMImageProcessor(size={"height": image_size, "width": image_size})
    return DeltaVLMProcessor(image_processor, tokenizer, qformer_tokenizer, num_query_tokens=4)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found beside the checkout ({SHARED})")
    return SHARED


@pytest.fixture(scope="session")
def sample_pairs(shared_dir):
    """The six real LEVIR-CC pairs as (before_path, after_path), sorted by name."""
    pairs = []
    for before in sorted(SAMPLE_IMAGES.glob("*/A/*.png")):
        pairs.append((str(before), str(before.parent.parent / "B" / before.name)))
    return pairs


@pytest.fixture(scope="session")
def tiny_processor(shared_dir):
    return build_tiny_processor()


@pytest.fixture(scope="session")
def make_tiny_config():
    return tiny_config


@pytest.fixture(scope="module")
def tiny_model():
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    torch.manual_seed(0)
    return DeltaVLMForConditionalGeneration(tiny_config()).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_processor):
    """A tiny random DeltaVLM and the tiny processor saved as one model folder (read-only for tests)."""
    from modeling_deltavlm import DeltaVLMForConditionalGeneration

    folder = tmp_path_factory.mktemp("tiny_deltavlm")
    torch.manual_seed(0)
    DeltaVLMForConditionalGeneration(tiny_config()).save_pretrained(folder)
    tiny_processor.save_pretrained(folder)
    return folder
