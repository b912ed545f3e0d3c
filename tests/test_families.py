"""Every supported family prunes, exports and reloads without this package, with equal logits."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from hywia_lightning.core.plan import LayerPlan, PruningPlan
from hywia_lightning.core.slicing import apply_plan
from hywia_lightning.export.huggingface import export_pretrained

from .pipeline import logits_in_fresh_process

SHAPE = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=128, tie_word_embeddings=False)
FAMILIES = {
    "mistral": (MistralConfig, MistralForCausalLM, "PrunedMistralForCausalLM"),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, "PrunedQwen2ForCausalLM"),  # q/k/v biases
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, "PrunedQwen3ForCausalLM"),  # per-head q/k norms
}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_prunes_exports_and_reloads(family, tiny_tokenizer, tmp_path):
    config_class, model_class, pruned_class = FAMILIES[family]
    torch.manual_seed(0)
    model = model_class(config_class(**SHAPE)).eval()
    if family == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    apply_plan(model, PruningPlan("query_heads", {1: LayerPlan([1, 2], [0, 1], list(range(0, 96, 2)))}))
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(3))
    logits, class_name = logits_in_fresh_process(tmp_path / "export", ids, tmp_path)
    assert class_name == pruned_class
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=0)
