"""Uniform widths export as the family's own config (no remote code); anything else says why not."""

import json

import pytest
import torch
from torch import nn
from transformers import Qwen2Config, Qwen2ForCausalLM

from hywia_lightning.core.plan import LayerPlan, PruningPlan
from hywia_lightning.core.slicing import apply_plan, record_layer_widths
from hywia_lightning.export.huggingface import export_kind, export_pretrained

from .conftest import tiny_llama
from .pipeline import logits_in_fresh_process

IDS = torch.randint(0, 300, (2, 10), generator=torch.Generator().manual_seed(4))


def uniform_plan(layers: int) -> PruningPlan:
    return PruningPlan("query_heads", {i: LayerPlan([0, 3], [0, 1], list(range(0, 96, 2))) for i in range(layers)})


def add_output_biases(model) -> None:
    torch.manual_seed(2)
    for layer in model.model.layers:
        layer.self_attn.o_proj.bias = nn.Parameter(torch.randn(64) * 0.1)
        layer.mlp.down_proj.bias = nn.Parameter(torch.randn(64) * 0.1)
    record_layer_widths(model)


def test_uniform_widths_with_output_biases_load_stock_in_a_fresh_process(tmp_path, tiny_tokenizer):
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=3)
    apply_plan(model, uniform_plan(3))
    add_output_biases(model)
    kind = export_kind(model)
    assert (kind.kind, kind.architecture, kind.bias_flags) == ("stock", "LlamaForCausalLM", ("attention_bias", "mlp_bias"))
    assert "zero biases added for mlp.gate_proj, mlp.up_proj, self_attn.k_proj" in kind.reason
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["intermediate_size"], config["head_dim"]) == (2, 2, 48, 16)
    assert config["attention_bias"] is config["mlp_bias"] is True
    assert not any(key.startswith("layer_") for key in config) and not (tmp_path / "export" / "modeling_pruned.py").exists()
    assert not hasattr(model.config, "attention_bias") or model.config.attention_bias is False  # the model itself is unchanged
    assert model.config.layer_intermediate_size == [48] * 3
    logits, class_name = logits_in_fresh_process(tmp_path / "export", IDS, tmp_path, remote_code=False)
    assert class_name == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(logits, model(IDS).logits, atol=1e-5, rtol=0)


def test_per_layer_widths_stay_custom_and_say_why(tiny_tokenizer, tmp_path):
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=3)
    apply_plan(model, PruningPlan("query_heads", {1: LayerPlan([0, 3], [0, 1], list(range(50)))}))
    kind = export_kind(model)
    assert (kind.kind, kind.architecture) == ("custom", "PrunedLlamaForCausalLM")
    assert kind.reason == "per-layer widths differ (query heads 2..4, MLP channels 50..96), which no stock config expresses"
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_pruned.PrunedLlamaForCausalLM"


@pytest.mark.parametrize("with_bias", [False, True])
def test_a_family_without_an_output_bias_flag_is_stock_only_without_the_bias(with_bias):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
    apply_plan(model, uniform_plan(2))
    if with_bias:
        add_output_biases(model)
    kind = export_kind(model)
    if with_bias:
        assert kind.kind == "custom" and kind.reason.startswith("mlp.down_proj, self_attn.o_proj carry a bias that the stock qwen2")
    else:
        assert (kind.kind, kind.architecture, kind.bias_flags) == ("stock", "Qwen2ForCausalLM", ())
