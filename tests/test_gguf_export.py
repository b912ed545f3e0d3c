"""GGUF export: per-layer metadata arrays, tensor shapes, rotary order and tokenizer, read back with
gguf's own reader (llama.cpp itself runs in scripts/check_gguf.py, not here)."""

import json
import subprocess
import sys

import gguf
import numpy as np
import pytest
import torch
from torch import nn

from hywia_lightning.core.plan import LayerPlan, PruningPlan
from hywia_lightning.core.slicing import apply_plan, record_layer_widths
from hywia_lightning.export.gguf import export_gguf
from hywia_lightning.export.huggingface import export_pretrained, written_files

from .conftest import REPO, tiny_llama
from .pipeline import prune_job, run_fit


def odd_widths_model():
    """Five layers, every shape llama.cpp's deci treats specially: 0 heads without a bias (layer 0,
    which llama.cpp needs to have a head), fewer heads and channels with output biases (1), 0 heads
    with an o_proj bias (2), 0 MLP channels after attention (3), an empty layer (4)."""
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=5)
    apply_plan(model, PruningPlan("query_heads", {
        0: LayerPlan(heads=[], kv_heads=[], channels=None),
        1: LayerPlan(heads=[0, 2], kv_heads=[0, 1], channels=list(range(0, 96, 3))),
        2: LayerPlan(heads=[], kv_heads=[], channels=None),
        3: LayerPlan(heads=None, kv_heads=None, channels=[]),
        4: LayerPlan(heads=[], kv_heads=[], channels=[]),
    }))
    torch.manual_seed(1)
    for i, (o_bias, down_bias) in {1: (True, True), 2: (True, False)}.items():
        layer = model.model.layers[i]
        if o_bias:
            layer.self_attn.o_proj.bias = nn.Parameter(torch.randn(64))
        if down_bias:
            layer.mlp.down_proj.bias = nn.Parameter(torch.randn(64))
    record_layer_widths(model)
    return model


def read(path):
    reader = gguf.GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    return fields, {t.name: t for t in reader.tensors}


@pytest.fixture(scope="module")
def odd_export(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("odd") / "export"
    model = odd_widths_model()
    export_pretrained(model, tiny_tokenizer, folder)
    return model, folder


def test_per_layer_widths_become_deci_arrays_with_zero_units_where_a_bias_or_output_would_be_lost(odd_export, tmp_path):
    model, folder = odd_export
    fields, tensors = read(export_gguf(folder, tmp_path / "m.gguf"))
    assert fields["general.architecture"] == "deci"
    assert fields["deci.attention.head_count"] == [1, 2, 1, 4, 0]
    assert fields["deci.attention.head_count_kv"] == [1, 2, 1, 2, 0]
    assert fields["deci.feed_forward_length"] == [96, 32, 96, 1, 0]
    assert (fields["deci.attention.key_length"], fields["deci.rope.dimension_count"], fields["deci.block_count"]) == (16, 16, 5)
    shapes = {name: t.shape.tolist() for name, t in tensors.items()}  # GGUF order: input dimension first
    assert shapes["blk.1.attn_q.weight"] == [64, 32] and shapes["blk.1.attn_k.weight"] == [64, 32]
    assert shapes["blk.1.attn_output.weight"] == [32, 64] and shapes["blk.1.ffn_down.weight"] == [32, 64]
    assert shapes["blk.1.attn_output.bias"] == [64] and shapes["blk.1.ffn_down.bias"] == [64]
    assert shapes["blk.2.attn_q.weight"] == [64, 16] and "blk.2.ffn_down.bias" not in shapes
    assert not tensors["blk.2.attn_output.weight"].data.any()  # the zero head: only its bias remains
    np.testing.assert_allclose(tensors["blk.2.attn_output.bias"].data, model.model.layers[2].self_attn.o_proj.bias.detach())
    assert shapes["blk.3.ffn_gate.weight"] == [64, 1] and not tensors["blk.3.ffn_down.weight"].data.any()
    assert not any(name.startswith("blk.4.") for name in shapes)  # nothing left of layer 4
    assert "output.weight" in shapes and tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F16


def test_rotary_rows_are_reordered_to_adjacent_pairs(odd_export, tmp_path):
    model, folder = odd_export
    _, tensors = read(export_gguf(folder, tmp_path / "m.gguf", dtype="float32"))
    q = model.model.layers[1].self_attn.q_proj.weight.detach()  # 2 heads of 16 rows
    written = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data)).reshape(32, 64)
    for head in range(2):
        rows = q[head * 16:(head + 1) * 16]
        torch.testing.assert_close(written[head * 16:(head + 1) * 16:2], rows[:8])   # pair (i, i + 8) of
        torch.testing.assert_close(written[head * 16 + 1:(head + 1) * 16:2], rows[8:])  # rotate_half, adjacent


def test_uniform_widths_are_plain_llama_with_the_tokenizer(tmp_path, tiny_tokenizer):
    model = tiny_llama(num_key_value_heads=2, num_hidden_layers=2, tie_word_embeddings=True)
    apply_plan(model, PruningPlan("query_heads", {i: LayerPlan([1, 2], [0, 1], list(range(64))) for i in range(2)}))
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    fields, tensors = read(export_gguf(tmp_path / "export", tmp_path / "m.gguf", dtype="q8_0"))
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"], fields["llama.feed_forward_length"]) == (2, 2, 64)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tiny_tokenizer.get_vocab()
    assert len(fields["tokenizer.ggml.tokens"]) == 300 and fields["tokenizer.ggml.tokens"][vocab["<eos>"]] == "<eos>"
    assert fields["tokenizer.ggml.token_type"][vocab["<eos>"]] == gguf.TokenType.CONTROL
    assert fields["tokenizer.ggml.eos_token_id"] == vocab["<eos>"] and fields["tokenizer.ggml.add_bos_token"] is False
    merges = json.loads(tiny_tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    assert fields["tokenizer.ggml.merges"][:3] == [" ".join(pair) for pair in merges[:3]] and len(fields["tokenizer.ggml.merges"]) == len(merges)


def test_the_command_converts_an_export_folder(odd_export, tmp_path):
    _, folder = odd_export
    out = tmp_path / "cli.gguf"
    subprocess.run([sys.executable, str(REPO / "scripts" / "export_gguf.py"), str(folder), str(out), "--dtype", "bfloat16"],
                   check=True, capture_output=True)
    _, tensors = read(out)
    assert tensors["blk.1.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert not list(tmp_path.glob(".*partial"))


def test_the_export_callback_stages_the_gguf_file_with_the_folder_and_reports_the_kind(tiny_model_dir, tmp_path):
    config = prune_job(tiny_model_dir, tmp_path / "run")
    config["export"].update(formats=["hf", "gguf"], gguf_dtype="q8_0")
    run_fit(config, tmp_path)
    folder = tmp_path / "run" / "export"
    assert "model.gguf" in written_files(folder)
    fields, _ = read(folder / "model.gguf")
    assert fields["general.architecture"] == "deci" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert fields["general.name"] == "run"  # the run's folder, not the staging folder's
    report = json.loads((folder / "report.json").read_text())["model"]["export"]
    assert report["kind"] == "custom" and report["reason"].startswith("per-layer widths differ")
    assert report["gguf"] == {"file": "model.gguf", "dtype": "q8_0"}
    assert "custom `PrunedLlamaForCausalLM`" in (folder / "report.md").read_text()


def test_formats_without_hf_are_refused():
    from callbacks import Export

    with pytest.raises(ValueError, match="'hf' is always written"):
        Export(formats=["gguf"])


def test_llama3_rope_scaling_becomes_llamacpp_rope_freqs(tmp_path, tiny_tokenizer):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = tiny_llama(num_hidden_layers=1, rope_parameters=rope)
    export_pretrained(model, tiny_tokenizer, tmp_path / "export")
    fields, tensors = read(export_gguf(tmp_path / "export", tmp_path / "m.gguf"))
    divisors = np.array(tensors["rope_freqs.weight"].data)
    assert divisors.shape == (8,) and divisors[0] == pytest.approx(1.0) and divisors[-1] == pytest.approx(8.0)
    assert fields["llama.rope.freq_base"] == 500000.0


def test_what_cannot_be_written_is_refused_with_the_reason(tiny_tokenizer):
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from hywia_lightning.export.gguf import check_exportable

    config = {"model_type": "llama"}
    check_exportable(config, tiny_tokenizer)
    with pytest.raises(ValueError, match="model_type 'qwen3' has no GGUF export.*q/k norms"):
        check_exportable({"model_type": "qwen3"}, tiny_tokenizer)
    with pytest.raises(ValueError, match="rope type 'yarn' has no GGUF export yet"):
        check_exportable({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, tiny_tokenizer)
    backend = tiny_tokenizer.backend_tokenizer.__class__.from_str(tiny_tokenizer.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ValueError, match="no llama.cpp pre-tokenizer known for .*Whitespace"):
        check_exportable(config, PreTrainedTokenizerFast(tokenizer_object=backend))
