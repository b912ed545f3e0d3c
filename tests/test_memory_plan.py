"""The memory plan: its arithmetic against the tensors the code really allocates, how it scales with
the keys that matter, the script's last line, and a job refused before any weight is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
import yaml

from hywia_lightning.core.estimation import Estimator
from hywia_lightning.core.structures import target_layers
from hywia_lightning.core.unit_groups import prunable_linears
from hywia_lightning.input_errors import InputError
from hywia_lightning.job_config import read_job
from hywia_lightning.memory_plan.job import job_settings
from hywia_lightning.memory_plan.stages import (
    EstimationSettings, JobSettings, ReconstructionSettings, RecoverySettings, accumulator_bytes, estimation_peak,
    gram_bytes, plan_memory, recovery_peak,
)
from hywia_lightning.models.shapes import ModelShape, resolve_shape
from hywia_lightning.reconstruction.layer_stream import LayerStream
from hywia_lightning.reconstruction.least_squares import dense_grams

from .conftest import REPO, tiny_config, tiny_llama
from .test_configs import config_command

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
NEEDS = frozenset({"gradients", "squared_gradients", "input_moments"})


def tiny_shape(**overrides) -> ModelShape:
    return ModelShape.from_config(tiny_config(**overrides).to_dict())


def part(stage, name: str) -> int:
    return next(p.bytes for p in stage.parts if p.name == name)


def estimation_job(shape: ModelShape, **changes) -> JobSettings:
    settings = EstimationSettings(needs=NEEDS, layers=tuple(range(1, shape.num_hidden_layers)))
    return JobSettings(estimation=replace(settings, **changes))


@pytest.mark.parametrize("tied", [False, True])
def test_parameters_are_the_models(tied):
    model = tiny_llama(tie_word_embeddings=tied)
    assert tiny_shape(tie_word_embeddings=tied).parameters() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_accumulators_are_the_bytes_estimation_allocates(dtype):
    model, shape = tiny_llama(), tiny_shape()
    linears = prunable_linears(target_layers(model, 1, None), "query_heads")
    estimator = Estimator(model, linears, NEEDS, 2, getattr(torch, dtype))
    estimator.accumulate(torch.randint(0, 300, (2, 16)))
    held = sum(sums.nbytes for sums in (estimator.grad_sum, estimator.sq_grad_sum, estimator.input_sum, estimator.input_sq_sum))
    assert accumulator_bytes(shape, estimation_job(shape, accumulate_dtype=dtype).estimation) == held


def test_sharded_accumulators_divide_g_and_g2_but_not_the_weights():
    """Per rank: ⌈numel / N⌉ of every g/g² (tests/test_sharded_estimation.py measures it on 2 ranks);
    the weights stay whole, and scoring gathers one layer's statistics."""
    shape = resolve_shape("meta-llama/Llama-2-7b-hf")[0]
    g_only = estimation_job(shape, needs=frozenset({"gradients", "squared_gradients"}))
    assert accumulator_bytes(shape, g_only.estimation, 8) * 8 == accumulator_bytes(shape, g_only.estimation)
    one, eight = (plan_memory(shape, replace(g_only, devices=n, estimation_shards=n)) for n in (1, 8))
    for stage in ("estimation", "scoring"):
        a, b = (next(s for s in plan.stages if s.stage == stage) for plan in (one, eight))
        assert part(a, "weights") == part(b, "weights") and part(b, "accumulators") * 8 == part(a, "accumulators")
    scoring = next(s for s in eight.stages if s.stage == "scoring")
    assert part(scoring, "one layer's statistics gathered") < part(scoring, "accumulators")


def test_bfloat16_halves_the_accumulators_and_needs_decide_them():
    shape = resolve_shape("meta-llama/Llama-2-7b-hf")[0]
    f32 = accumulator_bytes(shape, estimation_job(shape).estimation)
    bf16 = accumulator_bytes(shape, estimation_job(shape, accumulate_dtype="bfloat16").estimation)
    assert bf16 * 2 == f32
    only_g = accumulator_bytes(shape, estimation_job(shape, needs=frozenset({"gradients"})).estimation)
    assert abs(only_g / f32 - 0.5) < 1e-3  # g alone: half of g and g²
    forward_only = plan_memory(shape, estimation_job(shape, needs=frozenset({"input_moments"})))
    assert "activations" in [p.name for p in forward_only.stages[0].parts]
    assert part(forward_only.stages[0], "accumulators") < 1e-3 * f32  # input moments are O(width)


def test_activations_grow_with_the_estimation_batch():
    shape = resolve_shape("meta-llama/Llama-2-7b-hf")[0]
    one = estimation_peak(shape, estimation_job(shape, batch_size=1))
    four = estimation_peak(shape, estimation_job(shape, batch_size=4))
    assert part(four, "activations") == 4 * part(one, "activations")
    assert part(four, "logits") == 4 * part(one, "logits")
    assert part(four, "accumulators") == part(one, "accumulators")


def test_fsdp_recovery_shards_over_devices_and_nodes_and_ddp_does_not():
    shape = resolve_shape("meta-llama/Llama-2-70b-hf")[0]
    fsdp = RecoverySettings(batch_size=64, fsdp=True, activation_checkpointing=True)
    one, eight, sixteen = (recovery_peak(shape, JobSettings(dtype="bfloat16", devices=d, num_nodes=n, recovery=fsdp))
                           for d, n in ((1, 1), (8, 1), (8, 2)))
    assert part(one, "weights") == 8 * part(eight, "weights") == 16 * part(sixteen, "weights")
    assert sixteen.bytes < eight.bytes < one.bytes
    ddp = replace(fsdp, fsdp=False)
    assert part(recovery_peak(shape, JobSettings(dtype="bfloat16", devices=8, recovery=ddp)), "weights") == part(one, "weights")


def test_a_distilling_recovery_counts_the_teacher_sharded_like_the_student(tmp_path):
    """The teacher's dense weights (FSDP: 1/N of them, DDP: whole) and the KL's vocabulary-sized
    tensors; loss: lm has neither, unless a teacher is named (it measures the validation KL)."""
    shape = resolve_shape("meta-llama/Llama-2-7b-hf")[0]
    kl = RecoverySettings(batch_size=64, fsdp=True, teacher=True, kl=True)
    one, sixteen = (recovery_peak(shape, JobSettings(dtype="bfloat16", devices=d, recovery=kl)) for d in (1, 16))
    assert part(one, "teacher weights (dense)") == 16 * part(sixteen, "teacher weights (dense)") == 2 * shape.parameters()
    assert part(one, "KL: teacher logits, distributions and their gradients") > 0
    lm = recovery_peak(shape, JobSettings(dtype="bfloat16", recovery=replace(kl, teacher=False, kl=False)))
    assert not [p for p in lm.parts if "teacher" in p.name] and lm.bytes < one.bytes
    config = yaml.safe_load((REPO / "configs" / "recover_smollm2.yaml").read_text())
    for loss, teacher, expected in (("kl", None, (True, True)), ("lm", None, (False, False)),
                                    ("lm", "bundled:SmolLM2-135M-Instruct", (True, False))):
        config["model"]["init_args"].update(loss=loss, teacher=teacher)
        path = tmp_path / f"{loss}-{teacher is None}.yaml"
        path.write_text(yaml.safe_dump(config))
        job = job_settings(read_job(["--config", str(path)]))[0]
        assert (job.recovery.teacher, job.recovery.kl) == expected, (loss, teacher)


def test_the_hidden_state_term_counts_the_layers_it_compares(tmp_path):
    """``hidden_weight > 0``: the teacher's hidden states and a float32 difference per compared layer,
    read from YAML (``hidden_layers``, or every layer); nothing with no weight."""
    shape = resolve_shape("meta-llama/Llama-2-7b-hf")[0]
    counted = {}
    for name, keys in {"none": {}, "two": {"hidden_weight": 0.5, "hidden_layers": [3, 7]},
                       "every": {"hidden_weight": 0.5}}.items():
        config = yaml.safe_load((REPO / "configs" / "recover_smollm2.yaml").read_text())
        config["model"]["init_args"].update(loss="kl", **keys)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        counted[name] = job_settings(read_job(["--config", str(path)]))[0].recovery.hidden_layers
    assert counted == {"none": 0, "two": 2, "every": None}
    settings = RecoverySettings(batch_size=4, seq_len=256, teacher=True, kl=True)
    term = "hidden-state term: teacher hidden states, differences"
    parts = {n: part(recovery_peak(shape, JobSettings(dtype="bfloat16", recovery=replace(settings, hidden_layers=n))), term)
             for n in (2, None)}
    tokens, d, layers = 4 * 256, shape.hidden_size, shape.num_hidden_layers
    assert parts == {2: tokens * d * ((layers + 1) * 2 + 2 * 4), None: tokens * d * ((layers + 1) * 2 + layers * 4)}
    assert not [p for p in recovery_peak(shape, JobSettings(dtype="bfloat16", recovery=settings)).parts if p.name == term]


def test_a_fusion_trained_against_the_kl_counts_the_teacher_logits(tmp_path):
    """``mode: Learned`` with ``objective: kl`` runs the unmasked model beside the masked one: the
    fusion training stage holds the KL's vocabulary-sized tensors (as a distilling recovery does)."""
    shape = ModelShape.from_config(tiny_config().to_dict())
    config = yaml.safe_load((REPO / "configs" / "bench" / "hywia_default_learned_20.yaml").read_text())
    plans = {}
    for objective in ("lm", "kl"):
        config["pruning"]["init_args"]["fusion"]["mode"]["init_args"]["objective"] = objective
        path = tmp_path / f"{objective}.yaml"
        path.write_text(yaml.safe_dump(config))
        job = job_settings(read_job(["--config", str(path)]))[0]
        assert job.estimation.learned_fusion and job.estimation.fusion_kl == (objective == "kl")
        job = replace(job, estimation=replace(job.estimation, layers=tuple(range(1, shape.num_hidden_layers))))
        plans[objective] = {s.stage: s for s in plan_memory(shape, job).stages}["fusion training"]
    added = part(plans["kl"], "KL: teacher logits, distributions and their gradients")
    assert added == 128 * shape.vocab_size * (4 + 7 * 4) and plans["kl"].bytes - plans["lm"].bytes == added


def test_shard_weights_divides_the_dense_weights_and_adds_the_slicing_stage():
    """Estimation, scoring and the independent refit hold 1/N of the weights plus what FSDP2 gathers;
    slicing shards the pruned model again (1/N of it per rank, as tests/test_sharded_estimation.py
    measures on 2 ranks), and the refits wait for it sharded too; the export gathers one tensor."""
    shape = resolve_shape("meta-llama/Llama-2-70b-hf")[0]
    job = replace(estimation_job(shape), dtype="bfloat16", devices=8, target_ratio=0.2,
                  reconstruction=ReconstructionSettings())
    whole, sharded = ({s.stage: s for s in plan_memory(shape, replace(job, shard_weights=on)).stages}
                      for on in (False, True))
    assert "slicing" not in whole and list(sharded)[:4] == ["estimation", "scoring", "reconstruction", "slicing"]
    for stage in ("estimation", "scoring", "reconstruction"):
        assert part(sharded[stage], "weights") == -(-part(whole[stage], "weights") // 8)
        assert sharded[stage].bytes < whole[stage].bytes
    assert part(sharded["estimation"], "decoder layers gathered (2)") == 2 * 2 * shape.layer_parameters(0)
    assert part(sharded["slicing"], "pruned weights") == -(-int(shape.parameters() * 0.8 * 2) // 8)
    assert part(sharded["slicing"], "refit weights until slicing") == -(
        -part(whole["reconstruction"], "refit weights until slicing") // 8)
    assert list(sharded)[-1] == "export" and "export" not in whole
    assert part(sharded["export"], "pruned weights") == part(sharded["slicing"], "pruned weights")
    assert replace(job, shard_weights=True, devices=1).weight_shards == 1  # one process: nothing to shard over


def test_gram_matrices_are_the_bytes_reconstruction_allocates():
    """One layer's at a time: the largest layer's o_proj and down_proj X Xᵀ and Σ X."""
    model, shape = tiny_llama(), tiny_shape(layer_intermediate_size=[96, 96, 128, 96])
    model.model.layers[2].mlp = type(model.model.layers[2].mlp)(tiny_config(intermediate_size=128))
    layers = target_layers(model, 1, None)
    stream, held = LayerStream(model, torch.randint(0, 300, (1, 8)), 1, 3), []
    for s in layers:
        grams, sums = dense_grams({"o": s.attention.o_proj, "down": s.mlp.down_proj}, stream.advance)
        held.append(sum(t.numel() * t.element_size() for d in (grams, sums) for t in d.values()))
    job = replace(estimation_job(shape), reconstruction=ReconstructionSettings())
    assert gram_bytes(shape, job.estimation) == max(held) > min(held)


def test_shapes_resolve_offline():
    for name in ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
                 "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B", "mistralai/Mistral-7B-v0.1",
                 "Qwen/Qwen2.5-7B", "bundled:SmolLM2-135M-Instruct"):
        assert resolve_shape(name) is not None, name
    billions = {name: resolve_shape(name)[0].parameters() / 1e9 for name in
                ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-70b-hf", "meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-7B")}
    assert abs(billions["meta-llama/Llama-2-7b-hf"] - 6.74) < 0.01 and abs(billions["meta-llama/Llama-2-70b-hf"] - 68.98) < 0.05
    assert abs(billions["meta-llama/Meta-Llama-3-8B"] - 8.03) < 0.01 and abs(billions["Qwen/Qwen2.5-7B"] - 7.62) < 0.01
    assert resolve_shape("bundled:SmolLM2-135M-Instruct")[0].parameters() == 134_515_008
    assert resolve_shape("someone/unknown-model") is None


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "memory_plan.py"), *args], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)


def test_script_prints_stages_and_ends_in_json(tiny_model_dir):
    done = run_script("--config", "configs/prune_smollm2.yaml", "--model.init_args.model_name_or_path", str(tiny_model_dir),
                      "--pruning.init_args.layer_start", "0", "--device-gib", "1000")
    assert done.returncode == 0, done.stderr
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["fits"] is True and last["peak_gib"] > 0
    assert set(last["stages"]) == {"estimation", "scoring", "reconstruction", "perplexity"}
    big = run_script("--config", "configs/prune_smollm2.yaml", "--model.init_args.model_name_or_path",
                     "meta-llama/Llama-2-70b-hf", "--device-gib", "80")
    last = json.loads(big.stdout.strip().splitlines()[-1])
    assert big.returncode == 1 and last["fits"] is False and last["peak_gib"] > 130  # 70B float32 weights: 257 GiB


NO_LIGHTNING = r"""
import contextlib, io, sys
sys.path.insert(0, "scripts")
import memory_plan
with contextlib.redirect_stdout(io.StringIO()):
    code = memory_plan.main(["--config", "configs/prune_llama70b_fsdp.yaml", "--device-gib", "80"])
print(code, sorted(m for m in ("lightning", "torchmetrics", "transformers", "scipy") if m in sys.modules))
"""


def test_the_script_imports_no_lightning():
    """What keeps it at a few seconds: Lightning (with torchmetrics, transformers, scipy) is never imported."""
    done = subprocess.run([sys.executable, "-c", NO_LIGHTNING], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.split() == ["0", "[]"], done.stderr[-2000:]  # 0: the 70B config fits 80 GiB


def test_a_job_that_does_not_fit_is_refused_before_loading(tmp_path, tiny_model_dir):
    weightless = tmp_path / "weightless"  # config.json only: loading it would fail with another error
    weightless.mkdir()
    shutil.copy(tiny_model_dir / "config.json", weightless / "config.json")
    command = [sys.executable, "main.py", "fit", "--config", "configs/prune_smollm2.yaml",
               "--model.init_args.model_name_or_path", str(weightless), "--pruning.init_args.layer_start", "0",
               "--trainer.default_root_dir", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=REPO, env={**ENV, "HYWIA_DEVICE_GIB": "0.05"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr
    for key in ("GiB", "pruning.init_args.accumulate_dtype", "model.init_args.dtype",
                "pruning.init_args.estimation_batch_size", "trainer.devices", "trainer.num_nodes", "HYWIA_MEMORY_CHECK=0"):
        assert key in done.stderr, key


def test_the_check_runs_in_the_cli_and_can_be_switched_off(monkeypatch, tiny_model_dir):
    from callbacks import STAGES
    from hywia_lightning.cli import HywiaCLI

    args = ["--config", str(REPO / "configs" / "prune_smollm2.yaml"), "--model.init_args.model_name_or_path",
            str(tiny_model_dir), "--pruning.init_args.layer_start", "0"]
    monkeypatch.setenv("HYWIA_DEVICE_GIB", "0.05")
    with pytest.raises(InputError, match="accumulate_dtype"):
        HywiaCLI(args=args, run=False, stages=STAGES)
    monkeypatch.setenv("HYWIA_MEMORY_CHECK", "0")
    assert HywiaCLI(args=args, run=False, stages=STAGES).model is not None


# every shipped job as its first line runs it (an overlay on top of its base config)
JOBS = [[arg for config in config_command(path)[1] for arg in ("--config", config)]
        for path in sorted((REPO / "configs").glob("*.yaml"))]
JOBS += [["--config", "configs/prune_smollm2.yaml", "--pruning.accumulate_dtype", "bfloat16", "--trainer.devices=2",
          "--pruning.init_args.shard_accumulators", "false", "--reconstruction.mode", "sequential"],
         ["--config", "configs/prune_llama70b_fsdp.yaml", "--trainer.num_nodes", "2", "--pruning.init_args.layer_end", "null"]]


@pytest.mark.parametrize("args", JOBS, ids=lambda args: " ".join(a.removeprefix("configs/") for a in args[1::2]))
def test_the_scripts_reader_plans_the_jobs_as_the_clis_parser_does(args, monkeypatch):
    """scripts/memory_plan.py reads the YAML without the CLI's parser (which imports Lightning): the same plan."""
    from callbacks import STAGES
    from hywia_lightning.cli import parse_job
    from hywia_lightning.job_config import read_job
    from hywia_lightning.memory_plan.job import job_plan

    monkeypatch.chdir(REPO)
    parsed, read = job_plan(parse_job(args, STAGES)), job_plan(read_job(args))
    assert (parsed is None) == (read is None)
    if parsed is not None:
        assert read.plan.job == parsed.plan.job and read.plan.to_dict() == parsed.plan.to_dict()


def test_the_class_table_is_the_classes():
    from jsonargparse.typing import import_object

    from hywia_lightning.memory_plan.job import KINDS, PROJECT_CLASSES

    for path, kinds in PROJECT_CLASSES.items():
        cls = import_object(path)
        assert {kind for kind, base in KINDS.items() if issubclass(cls, import_object(base))} == kinds, path
