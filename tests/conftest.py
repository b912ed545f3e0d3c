"""Shared fixtures: tiny random Llamas with a tiny trained tokenizer, and the shared data paths."""

from __future__ import annotations

import os
from pathlib import Path

# nothing may need the hub, as in CI (.ci/run): lm-eval's registry tasks read only local folders.
# Set before datasets and huggingface_hub are imported, which read these once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hywia_lightning.data.text_sources import read_text

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
WIKITEXT_VALID = SHARED_DATA / "wikitext-2" / "valid.txt"


def tiny_config(num_key_value_heads: int = 2, **overrides) -> LlamaConfig:
    values = dict(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=num_key_value_heads, head_dim=16, max_position_embeddings=256, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def tiny_llama(num_key_value_heads: int = 2, seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(num_key_value_heads, **overrides)).eval()


def train_tiny_tokenizer(*extra_special: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE with 300 tokens (``<eos>`` and ``extra_special`` among them), trained in a
    blink on the built-in corpus."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<eos>", *extra_special], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator([read_text("builtin:python-docs/train", "test")[:200_000]], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>", pad_token="<eos>",
                                   additional_special_tokens=list(extra_special))


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny GQA Llama saved as a Hugging Face folder (4 heads in 2 KV groups, 4 layers)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama(num_key_value_heads=2).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def wikitext_valid() -> Path:
    if not WIKITEXT_VALID.is_file():
        pytest.skip(f"shared data not found at {WIKITEXT_VALID}")
    return WIKITEXT_VALID


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    """The environment of a job in a subprocess: the dense baselines of the tiny model stay in the test."""
    return {"HYWIA_CACHE": str(tmp_path / "cache")}
