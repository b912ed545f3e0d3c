"""Bad input fails fast, before any forward pass, naming the key and what is allowed."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from callbacks import Export, StructuredPruning
from hywia_lightning import CalibrationData
from hywia_lightning.input_errors import InputError

from .pipeline import prune_job, run_fit


@pytest.fixture(autouse=True)
def no_forward_pass(monkeypatch):
    """Any forward pass of a Llama during these tests is a failure: errors must come first."""
    def forbidden(*args, **kwargs):
        raise AssertionError("a forward pass ran before the bad input was reported")

    monkeypatch.setattr(LlamaForCausalLM, "forward", forbidden)


def calibration():
    return CalibrationData("builtin:python-docs/train", 4, 32)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_the_open_unit_interval(ratio):
    with pytest.raises(ValueError, match=rf"target_ratio={ratio} must be in \(0, 1\)"):
        StructuredPruning(ratio, calibration())


def test_unknown_granularity_and_attention_unit():
    with pytest.raises(ValueError, match="granularity='taylor' is unknown; allowed: random, magnitude"):
        StructuredPruning(0.2, calibration(), granularity="taylor")
    with pytest.raises(ValueError, match="attention_unit='heads' is unknown; allowed: query_heads, kv_groups, none"):
        StructuredPruning(0.2, calibration(), attention_unit="heads")


@pytest.mark.parametrize("section,key", [
    ("data", "num_windows"), ("perplexity", "num_chunks"), ("perplexity", "batch_size"), ("pruning", "round_to"),
    ("pruning", "estimation_batch_size"), ("pruning", "heads_to_keep"),
])
def test_counts_below_one_are_refused_by_the_cli_with_their_key(section, key, tiny_model_dir, tmp_path):
    """Counts are typed (jsonargparse's PositiveInt): LightningCLI refuses 0 while parsing, naming the key."""
    job = prune_job(tiny_model_dir, tmp_path)
    init_args = job[section].get("init_args", job[section])
    init_args[key] = 0
    with pytest.raises(InputError) as error:
        run_fit(job, tmp_path)
    assert error.value.key == f"{section}.init_args.{key}"
    assert "not a PositiveInt (allowed: a value >0)" in str(error.value)


def test_dirname_outside_the_run_folder_is_refused_naming_the_key(tmp_path):
    from types import SimpleNamespace

    trainer = SimpleNamespace(default_root_dir=str(tmp_path / "run"))
    for dirname, reason in (("/abs", "outside the run folder"), ("..", "contains '..'"), (".", "the run folder itself"),
                            ("", "is empty")):
        with pytest.raises(ValueError, match=rf"Export.dirname={dirname!r} .*{reason}.*allowed: a folder name relative"):
            Export(dirname).export_dir(trainer)
    assert Export(str(tmp_path / "run" / "out")).export_dir(trainer) == tmp_path / "run" / "out"


@pytest.mark.parametrize("start,end", [(0, 10), (3, 2), (-9, None)])
def test_layer_range_outside_the_model(start, end, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=rf"layer_start={start}, layer_end={end} select no valid range .* 4 layers"):
        run_fit(prune_job(tiny_model_dir, tmp_path, layer_start=start, layer_end=end), tmp_path)


def test_head_target_gqa_cannot_meet(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"heads_to_keep=3 cannot be met .* allowed: \[2, 4\]"):
        run_fit(prune_job(tiny_model_dir, tmp_path, heads_to_keep=3), tmp_path)


def test_missing_data_file(tiny_model_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="data.source=.*nope.txt.*no such file"):
        run_fit(prune_job(tiny_model_dir, tmp_path, data={"source": str(tmp_path / "nope.txt")}), tmp_path)


def test_too_short_data_file(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here\n")
    with pytest.raises(ValueError, match=r"short.txt.* is too short: .* num_windows=4"):
        run_fit(prune_job(tiny_model_dir, tmp_path, data={"source": str(short)}), tmp_path)


def test_malformed_jsonl_names_file_and_line(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 has no field 'text'"):
        run_fit(prune_job(tiny_model_dir, tmp_path, data={"source": str(bad)}), tmp_path)


def test_unsupported_architecture(tmp_path, tiny_tokenizer):
    model_dir = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(model_dir)
    tiny_tokenizer.save_pretrained(model_dir)
    with pytest.raises(ValueError, match="model_type='gpt2' is not supported.*llama, mistral, qwen2, qwen3"):
        run_fit(prune_job(model_dir, tmp_path / "run"), tmp_path)


def test_export_that_would_overwrite_the_input_model(tmp_path, tiny_model_dir):
    import shutil

    model_dir = tmp_path / "export"
    shutil.copytree(tiny_model_dir, model_dir)
    with pytest.raises(ValueError, match="overwriting the input model model_name_or_path=.*choose another trainer.default_root_dir"):
        run_fit(prune_job(model_dir, tmp_path), tmp_path)
    assert (model_dir / "config.json").is_file()


def test_a_misspelled_fusion_scheme_names_its_key_and_the_close_name_before_the_model_loads(tiny_model_dir, tmp_path,
                                                                                             monkeypatch):
    from hywia_lightning.models import causal_lm

    def not_yet(*args, **kwargs):
        raise AssertionError("the model loaded before the misspelled scheme was reported")

    monkeypatch.setattr(causal_lm, "load_causal_lm", not_yet)
    job = prune_job(tiny_model_dir, tmp_path)
    job["pruning"] = {"class_path": "callbacks.HybridPruning", "init_args": {
        "target_ratio": 0.1, "fusion": {"schemes": ["wanda", "fluctuaton"], "mode": "heuristic"}}}
    with pytest.raises(InputError) as refused:
        run_fit(job, tmp_path)
    assert refused.value.key == "pruning.init_args.fusion.schemes[1]"
    assert refused.value.problem.startswith("'fluctuaton' is unknown; allowed: random, magnitude")
    assert refused.value.hint == "did you mean 'fluctuation'?"
