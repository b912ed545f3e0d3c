"""Recovery by distillation: the KL to the unpruned teacher as LoRA's loss, on the dense model's own
samples; the teacher out of the optimizer and the checkpoints; the loss kinds; bad input."""

from __future__ import annotations

import json

import pytest
import torch

from hywia_lightning.core.distillation import hidden_state_error, kl_per_position, kl_to_logits, top_k_targets
from hywia_lightning.data.recovery_data import RECOVERY_SEED, RecoveryData
from hywia_lightning.data.self_generation import Generation, sample_windows

from .conftest import tiny_llama
from .pipeline import recovery_job, run_fit

# every step trains on the same 2 sampled windows: the KL on them must fall (a random tiny model has
# nothing that generalizes to other windows)
GENERATED = {"source": "generated", "generated_windows": 12, "val_size": 4, "max_examples": 2}


def distillation_job(model_dir, root, loss: str = "kl", max_steps: int = 6, **model) -> dict:
    config = recovery_job(model_dir, root, max_steps=max_steps, **GENERATED, cache_dir=str(root / "cache"))
    config["model"]["init_args"].update(loss=loss, dropout=0.0, **model)
    config["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.003
    config["trainer"].update(num_sanity_val_steps=-1,  # validation before the first step: where the KL starts
                             check_val_every_n_epoch=None)  # every 2 steps, across the 1-batch epochs
    return config


def test_the_training_kl_is_the_stored_kl_at_the_whole_vocabulary():
    """One definition: the KL to a teacher running beside the student equals the KL to its stored
    targets when they keep every token, and it is 0 against itself; a temperature scales by its square."""
    student, teacher = torch.randn(2, 5, 40), torch.randn(2, 5, 40)
    torch.testing.assert_close(kl_to_logits(student, teacher), kl_per_position(student, top_k_targets(teacher, 40)),
                               atol=1e-5, rtol=1e-5)
    assert kl_to_logits(teacher, teacher).abs().max() < 1e-6
    hot = kl_to_logits(student * 2, teacher * 2, temperature=2.0)  # the same distributions at T=2, times 4
    torch.testing.assert_close(hot, 4 * kl_to_logits(student, teacher), atol=1e-5, rtol=1e-5)


def test_generated_recovery_text_is_not_the_calibration_text_and_mixes_with_a_corpus(tiny_tokenizer, tmp_path):
    model = tiny_llama()
    data = RecoveryData(["generated", "builtin:python-docs/train"], format="text", seq_len=16, val_size=4,
                        generated_windows=8, cache_dir=str(tmp_path))
    data.build(tiny_tokenizer, model)
    sampled = {tuple(e["input_ids"].tolist()) for e in data.train_set + data.val_set if e["input_ids"].numel() == 16}
    own = sample_windows(model, tiny_tokenizer, 8, 16, RECOVERY_SEED, Generation())
    calibration = sample_windows(model, tiny_tokenizer, 8, 16, 0, Generation())
    assert {tuple(w.tolist()) for w in own} <= sampled  # the 8 samples are in the pooled set ...
    assert not {tuple(w.tolist()) for w in calibration} & sampled  # ... and none of calibration's (seed 0)
    assert len(data.train_set) + len(data.val_set) > 8 + 100  # ... beside the corpus' windows
    assert data.describe()["generation"]["windows"] == 8
    with pytest.raises(ValueError, match="generation=.* has no 'generated'"):
        RecoveryData("builtin:python-docs/train", format="text", generation=Generation())


@pytest.fixture(scope="module")
def distilled(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("distilled")
    run_fit(distillation_job(tiny_model_dir, root), root)
    return root


def test_distillation_lowers_the_kl_and_reports_its_curves(distilled):
    recovery = json.loads((distilled / "export" / "report.json").read_text())["recovery"]
    assert recovery["loss"] == {"kind": "kl", "temperature": 1.0, "kl_weight": 0.5, "teacher": recovery["loss"]["teacher"]}
    assert recovery["data"]["source"] == "generated" and recovery["data"]["train_examples"] == 2
    assert recovery["optimizer"] == {"class": "AdamW", "lr": 0.003}
    assert [s for s, _ in recovery["kl_curve"]] == [s for s, _ in recovery["loss_curve"]] == list(range(6))
    assert recovery["loss_curve"] == recovery["kl_curve"]  # the loss is the KL ...
    assert len(recovery["lm_curve"]) == 6  # ... and the language-model loss is drawn beside it
    kl = [value for _, value in recovery["kl_curve"]]
    assert kl[-1] < 0.7 * kl[0] and kl[0] > 0  # the pruned model moved toward the dense one
    assert [s for s, _ in recovery["val_kl"]] == [0, 2, 4, 6] and recovery["val_kl_before"] > 0
    markdown = (distilled / "export" / "report.md").read_text()
    assert "| validation KL |" in markdown and "| training LM loss |" in markdown and "Loss: kind kl" in markdown


def test_the_teacher_is_frozen_and_out_of_the_checkpoint(distilled):
    state = torch.load(distilled / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and not [k for k in state if k.startswith("teacher.")]
    assert [k for k in state if "lora_B" in k]


@pytest.mark.parametrize("loss", ["lm", "mix"])
def test_the_loss_is_the_one_named(loss, tiny_model_dir, tmp_path):
    run_fit(distillation_job(tiny_model_dir, tmp_path, loss=loss, max_steps=2, kl_weight=0.25,
                             teacher=str(tiny_model_dir)), tmp_path)
    recovery = json.loads((tmp_path / "export" / "report.json").read_text())["recovery"]
    total = torch.tensor([v for _, v in recovery["loss_curve"]])
    lm = torch.tensor([v for _, v in recovery["lm_curve"]])
    if loss == "lm":  # a named teacher is only measured against, at validation
        torch.testing.assert_close(total, lm)
        assert "kl_curve" not in recovery and [s for s, _ in recovery["val_kl"]] == [0, 2]
    else:
        kl = torch.tensor([v for _, v in recovery["kl_curve"]])
        torch.testing.assert_close(total, 0.25 * kl + 0.75 * lm, atol=1e-5, rtol=1e-5)


def test_the_hidden_state_term_is_scale_free_and_zero_at_the_teacher():
    teacher, student = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert hidden_state_error(teacher, teacher).abs().max() == 0
    torch.testing.assert_close(hidden_state_error(3 * student, 3 * teacher), hidden_state_error(student, teacher))
    massive = teacher.clone()
    massive[:, 0] *= 100  # a position with massive activations weighs what the others weigh
    torch.testing.assert_close(hidden_state_error(massive + student - teacher, massive)[:, 1:],
                               hidden_state_error(student, teacher)[:, 1:])


def test_the_hidden_state_term_is_added_to_the_kl_with_its_weight(tiny_model_dir, tmp_path):
    run_fit(distillation_job(tiny_model_dir, tmp_path, max_steps=4, hidden_weight=2.0, hidden_layers=[1, 3]), tmp_path)
    recovery = json.loads((tmp_path / "export" / "report.json").read_text())["recovery"]
    assert recovery["loss"]["hidden_weight"] == 2.0 and recovery["loss"]["hidden_layers"] == [1, 3]
    total, kl, hidden = (torch.tensor([v for _, v in recovery[f"{name}_curve"]]) for name in ("loss", "kl", "hidden"))
    torch.testing.assert_close(total, kl + 2.0 * hidden, atol=1e-5, rtol=1e-5)
    assert hidden[-1] < hidden[0] and hidden[0] > 0  # the student's layers moved toward the teacher's
    assert "| training hidden-state term |" in (tmp_path / "export" / "report.md").read_text()


@pytest.mark.parametrize("settings, message", [
    ({"loss": "lm", "hidden_weight": 1.0}, r"hidden_weight=1.0 distils hidden states .* use loss: kl or mix"),
    ({"hidden_weight": 1.0, "hidden_layers": [0, 4]}, r"hidden_layers=\[0, 4\] must be distinct decoder layer indices in \[0, 4\)"),
    ({"hidden_weight": -1.0}, r"hidden_weight=-1.0 must be >= 0"),
])
def test_bad_hidden_state_settings_name_their_key(settings, message, tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=message):
        run_fit(distillation_job(tiny_model_dir, tmp_path, **settings), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_loss_settings_name_their_key(tiny_model_dir, tmp_path):
    config = distillation_job(tiny_model_dir, tmp_path, kl_weight=1.5)
    with pytest.raises(ValueError, match=r"model.init_args.kl_weight=1.5 must be in \[0, 1\]"):
        run_fit(config, tmp_path)
    config = distillation_job(tiny_model_dir, tmp_path, loss="kld")
    with pytest.raises((ValueError, SystemExit)):
        run_fit(config, tmp_path)


def test_a_pruned_export_is_not_its_own_teacher(distilled, tmp_path):
    """Recovering an export with the KL needs the dense model named: refused before any work."""
    config = distillation_job(distilled / "export", tmp_path)
    config.pop("pruning"), config.pop("reconstruction")
    with pytest.raises(ValueError, match=r"is a pruned export .* set model.init_args.teacher"):
        run_fit(config, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
