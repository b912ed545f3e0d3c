"""LoRA recovery: training after pruning, merged and adapter exports, DDP, kill-and-resume, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from .pipeline import logits_in_fresh_process, recovery_job, run_fit, run_main


@pytest.fixture(scope="module")
def recovered(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    cli = run_fit(recovery_job(tiny_model_dir, root, max_steps=4), root)
    return cli, root


def test_recovery_trains_only_adapters_and_reports_curves(recovered):
    cli, root = recovered
    report = json.loads((root / "export" / "report.json").read_text())
    recovery = report["recovery"]
    assert recovery["steps"] == 4 and len(recovery["loss_curve"]) == 4
    assert [step for step, _ in recovery["val_loss"]] == [2, 4]
    assert report["seconds"]["recovery"] > 0
    assert report["pruning"]["params_after"] < report["pruning"]["params_before"]
    # the checkpoint holds the pruned base weights (unchanged by training) and the adapters
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    lora_b = [v for k, v in state.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "the adapters did not train"


def test_merged_export_equals_base_plus_saved_adapter(recovered, tmp_path):
    """The exported model is the pruned base with the exported peft adapter merged in, and it loads
    with plain transformers in a fresh process with the in-memory model's logits."""
    cli, root = recovered
    export = root / "export"
    state = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    prefix = "model.base_model.model."
    base_state = {k[len(prefix):].replace(".base_layer", ""): v for k, v in state.items()
                  if k.startswith(prefix) and "lora_" not in k}
    base = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(export, trust_remote_code=True),
                                            trust_remote_code=True)
    base.load_state_dict(base_state, strict=False)  # lm_head may be tied
    merged = PeftModel.from_pretrained(base, export / "adapter").merge_and_unload()
    exported = load_file(export / "model.safetensors")
    for name, weight in merged.state_dict().items():
        if name in exported:
            torch.testing.assert_close(exported[name], weight, atol=1e-6, rtol=1e-6)

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    fresh, _ = logits_in_fresh_process(export, ids, tmp_path)
    with torch.no_grad():
        in_memory = cli.model.model.eval()(ids).logits
    torch.testing.assert_close(fresh, in_memory, atol=1e-4, rtol=1e-4)


def test_killed_run_resumes_to_the_uninterrupted_result(recovered, tiny_model_dir, tmp_path):
    """Killed abruptly during step 3 (checkpoint of step 2 on disk), resumed with --ckpt_path: the
    plan comes from the checkpoint (no estimation) and the final adapters equal the uninterrupted run's."""
    _, uninterrupted = recovered
    config = recovery_job(tiny_model_dir, tmp_path, max_steps=4)
    crashing = json.loads(json.dumps(config))
    crashing["trainer"]["callbacks"].append({"class_path": "tests.crash.CrashAtStep", "init_args": {"step": 3}})
    crashed = run_main(crashing, tmp_path)
    assert crashed.returncode == 13, crashed.stderr[-2000:]
    assert not (tmp_path / "export").exists()

    resumed = run_main(config, tmp_path, "--ckpt_path", str(tmp_path / "checkpoints" / "epoch=0-step=2.ckpt"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "estimation skipped" in resumed.stderr
    adapter = lambda root: load_file(root / "export" / "adapter" / "adapter_model.safetensors")
    done, expected = adapter(tmp_path), adapter(uninterrupted)
    assert done.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(done[name], expected[name], atol=1e-6, rtol=1e-6)
    curve = lambda root: torch.tensor(json.loads((root / "export" / "report.json").read_text())["recovery"]["loss_curve"])
    torch.testing.assert_close(curve(tmp_path), curve(uninterrupted), atol=1e-5, rtol=0)


def test_two_processes_recover_like_one(tiny_model_dir, tmp_path):
    """DDP on 2 CPU processes, one example each per step, against 1 process with the same global
    batch of 2, distilling (the teacher replicated on each rank): same plan, the same loss curve
    (the mean over ranks), and merged weights equal within 1e-4 (the order of float sums differs)."""
    def job(root):
        config = recovery_job(tiny_model_dir, root, max_steps=3)
        config["model"]["init_args"]["dropout"] = 0.0  # dropout masks are drawn per process
        return config

    single = tmp_path / "single"
    run_fit(job(single), single)
    config = job(tmp_path / "ddp")
    config["trainer"].update(strategy="ddp", devices=2)
    result = run_main(config, tmp_path / "ddp")
    assert result.returncode == 0, result.stderr[-3000:]

    plan = lambda root: json.loads((root / "export" / "pruning_plan.json").read_text())
    assert plan(tmp_path / "ddp") == plan(single)
    report = json.loads((tmp_path / "ddp" / "export" / "report.json").read_text())
    assert report["recovery"]["world_size"] == 2 and report["recovery"]["steps"] == 3
    curve = lambda root: torch.tensor(json.loads((root / "export" / "report.json").read_text())["recovery"]["loss_curve"])
    assert report["recovery"]["loss"]["kind"] == "kl"
    torch.testing.assert_close(curve(tmp_path / "ddp"), curve(single), atol=1e-5, rtol=1e-4)
    weights = lambda root: load_file(root / "export" / "model.safetensors")
    ddp, one = weights(tmp_path / "ddp"), weights(single)
    assert ddp.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], atol=1e-4, rtol=1e-4)


# -- bad input: every error comes before pruning or training starts ----------------------------
def test_unknown_lora_target_module_is_refused(tiny_model_dir, tmp_path):
    config = recovery_job(tiny_model_dir, tmp_path)
    config["model"]["init_args"]["target_modules"] = ["q_proj", "query_key_value"]
    with pytest.raises(ValueError, match=r"query_key_value is not a Linear module of this model; allowed: .*q_proj"):
        run_fit(config, tmp_path)


def test_batch_size_must_divide_across_processes(tiny_model_dir, tmp_path):
    config = recovery_job(tiny_model_dir, tmp_path, batch_size=3)
    config["trainer"].update(strategy="ddp", devices=2)
    result = run_main(config, tmp_path)
    assert result.returncode != 0
    assert "data.batch_size=3 (the global batch) does not divide across 2 processes" in result.stderr
    assert "pruned" not in result.stderr and not (tmp_path / "checkpoints").exists()


def test_instruction_file_without_alpaca_fields_names_file_and_line(tiny_model_dir, tmp_path):
    data = tmp_path / "alpaca.jsonl"
    data.write_text('{"instruction": "Say hi.", "input": "", "output": "Hi."}\n{"prompt": "Say hi.", "output": "Hi."}\n')
    config = recovery_job(tiny_model_dir, tmp_path, source=str(data), format="alpaca")
    with pytest.raises(ValueError, match=rf"{data}:2 lacks the Alpaca field\(s\) instruction"):
        run_fit(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_fsdp_on_cpu_is_refused_before_any_work(tiny_model_dir, tmp_path):
    config = recovery_job(tiny_model_dir, tmp_path)
    config["trainer"]["strategy"] = {"class_path": "hywia_lightning.distributed.strategies.DecoderLayerFSDP"}
    with pytest.raises(ValueError, match="requires a GPU accelerator"):
        run_fit(config, tmp_path)


def test_a_recovery_job_that_cannot_train_is_refused_before_pruning(tiny_model_dir, tmp_path):
    config = recovery_job(tiny_model_dir, tmp_path, max_steps=0)
    with pytest.raises(ValueError, match=r"trainer.max_steps=0 .* allow no step; use hywia_lightning.CausalLM"):
        run_fit(config, tmp_path)
    assert not (tmp_path / "export").exists()


