import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from hywia_lightning.core.structures import SUPPORTED_MODEL_TYPES, discover_structures

from .conftest import tiny_llama


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_discovers_heads_groups_and_channels(kv_heads):
    structures = discover_structures(tiny_llama(num_key_value_heads=kv_heads))
    assert len(structures) == 4
    attn = structures[0].attention
    assert (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.group_size) == (4, kv_heads, 16, 4 // kv_heads)
    assert structures[2].mlp.num_channels == 96


def test_unsupported_architecture_is_refused_with_the_supported_list():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported") as error:
        discover_structures(model)
    for model_type in SUPPORTED_MODEL_TYPES:
        assert model_type in str(error.value)
