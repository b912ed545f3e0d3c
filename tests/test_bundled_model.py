"""The offline default on the real bundled SmolLM2-135M: conversion, the quick-start job, the export."""

import json

import pytest
import torch
import yaml

from hywia_lightning.core.plan import TOLERANCE
from hywia_lightning.core.structures import discover_structures
from hywia_lightning.models import loading as models

from .conftest import REPO
from .pipeline import logits_in_fresh_process, run_fit

pytestmark = pytest.mark.slow


def test_bundled_model_is_converted_once(monkeypatch):
    first = models.resolve_model_path(models.BUNDLED_MODEL)
    monkeypatch.setattr(models, "bundled_gguf_path", lambda: pytest.fail("converted a second time"))
    assert models.resolve_model_path(models.BUNDLED_MODEL) == first
    config = json.loads((models.Path(first) / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)


def test_unknown_bundled_name():
    with pytest.raises(ValueError, match="the bundled model is 'bundled:SmolLM2-135M-Instruct'"):
        models.resolve_model_path("bundled:llama")


def test_quick_start_config_prunes_20_percent_and_exports_a_loadable_model(tmp_path):
    config = yaml.safe_load((REPO / "configs" / "prune_smollm2.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["data"]["init_args"]["num_windows"] = 32  # the job's shape, not its quality: a quarter of the windows
    cli = run_fit(config, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["pruning"]["params_before"] == 134_515_008
    assert abs(report["pruning"]["fraction_removed"] - 0.2) <= TOLERANCE
    model = cli.model.model
    for s in discover_structures(model):
        assert s.attention.num_kv_heads == 3 and s.attention.num_heads % 3 == 0
        pruned = 4 <= s.layer < 28
        assert (s.mlp.num_channels < 1536) == pruned
    ids = cli.model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    logits, class_name = logits_in_fresh_process(tmp_path / "export", ids, tmp_path)
    assert class_name == "PrunedLlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(logits, model(ids).logits, atol=1e-4, rtol=0)
    assert model.generate(ids, max_new_tokens=5, do_sample=False).shape[1] == ids.shape[1] + 5


def test_stock_config_exports_a_stock_llama_and_a_llama_gguf(tmp_path):
    import gguf

    config = yaml.safe_load((REPO / "configs" / "prune_smollm2_stock.yaml").read_text())
    config["trainer"]["default_root_dir"] = str(tmp_path)
    config["data"]["init_args"]["num_windows"] = 4  # the shapes, not the quality, are under test
    config["perplexity"] = None
    cli = run_fit(config, tmp_path)
    export = tmp_path / "export"
    saved = json.loads((export / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and "auto_map" not in saved
    assert (saved["num_attention_heads"], saved["attention_bias"], saved["mlp_bias"]) == (6, True, True)
    assert json.loads((export / "report.json").read_text())["model"]["export"]["kind"] == "stock"
    ids = cli.model.tokenizer("The capital of France is", return_tensors="pt").input_ids
    logits, class_name = logits_in_fresh_process(export, ids, tmp_path, remote_code=False)
    assert class_name == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(logits, cli.model.model(ids).logits, atol=1e-4, rtol=0)
    fields = gguf.GGUFReader(export / "model.gguf").fields
    assert fields["general.architecture"].contents() == "llama"
    assert fields["llama.feed_forward_length"].contents() == saved["intermediate_size"]


def test_the_bundled_models_conversations_start_in_its_chat_template():
    """``generation.conversation`` on the bundled SmolLM2-Instruct: its default system prompt, then the user's turn."""
    from transformers import AutoTokenizer

    from hywia_lightning.data.self_generation import ConversationScript

    tokenizer = AutoTokenizer.from_pretrained(models.resolve_model_path(models.BUNDLED_MODEL))
    script = ConversationScript.of(tokenizer)
    assert tokenizer.decode(script.start).startswith("<|im_start|>system\n")
    assert tokenizer.decode(script.start).endswith("<|im_end|>\n<|im_start|>user\n")
    assert tokenizer.convert_ids_to_tokens(script.end_of_turn) == "<|im_end|>"
    assert tokenizer.decode(script.to_assistant) == "\n<|im_start|>assistant\n"
