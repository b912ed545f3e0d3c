"""Reports of real runs on a tiny Llama: report.json and report.md agree with the logged metrics,
the dense baseline is measured before pruning and cached, ``validate``/``test`` evaluate and
report, plots are written, linked and logged, long stages log their progress."""

from __future__ import annotations

import copy
import csv
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from callbacks import STAGES
from hywia_lightning.cli import HywiaCLI
from hywia_lightning.data.text_sources import read_text
from hywia_lightning.evaluation.perplexity import chunk_tokens, perplexity
from hywia_lightning.progress import Progress, use_bar
from hywia_lightning.report.markdown import render_markdown
from hywia_lightning.report.plots import write_plots

from .conftest import tiny_llama
from .pipeline import prune_job, run_fit
from .test_zeroshot import GOOD, HAND_WRITTEN, write_items


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A baseline cache of this test's own (the bundled model's cache is not touched: no test here loads it)."""
    monkeypatch.setenv("HYWIA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def zeroshot_data(tmp_path) -> Path:
    data = write_items(tmp_path / "zeroshot", "piqa", [GOOD, {**GOOD, "id": "p1", "label": 1}, {**GOOD, "id": "p2"}])
    return write_items(data, "arc_easy", [HAND_WRITTEN["arc_easy"][0], HAND_WRITTEN["arc_challenge"][0]])


def with_evaluations(job: dict, root: Path, zeroshot_data: Path, logger: str = "CSVLogger") -> dict:
    job = copy.deepcopy(job)
    job["zeroshot"] = {"tasks": ["piqa", "arc_easy"], "data_dir": str(zeroshot_data), "limit": 2, "batch_size": 4}
    job["trainer"]["logger"] = {"class_path": f"lightning.pytorch.loggers.{logger}",
                                "init_args": {"save_dir": str(root / "logs"), "name": "run", "version": 0}}
    return job


def logged(root: Path) -> dict[str, float]:
    """Every metric of the run's CSV log (the last value of each)."""
    values = {}
    with (root / "logs" / "run" / "version_0" / "metrics.csv").open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None) and k != "step"})
    return values


def dense_tiny_perplexity(model_dir: Path) -> float:
    from hywia_lightning.models.loading import load_causal_lm

    model, tokenizer = load_causal_lm(str(model_dir))
    ids = torch.tensor(tokenizer(read_text("builtin:python-docs/test", "test", split="test"), add_special_tokens=False)["input_ids"])
    return perplexity(model, chunk_tokens(ids, 32, 4))


# a fit: report, metrics, baseline ------------------------------------------------------------------

def test_report_matches_the_logged_metrics_and_the_dense_baseline_is_cached(tiny_model_dir, tmp_path, cache, zeroshot_data):
    job = with_evaluations(prune_job(tiny_model_dir, tmp_path / "first"), tmp_path / "first", zeroshot_data)
    run_fit(job, tmp_path / "first")
    export = tmp_path / "first" / "export"
    report = json.loads((export / "report.json").read_text())
    metrics = logged(tmp_path / "first")

    # the report's numbers are the logged ones
    assert metrics["perplexity"] == pytest.approx(report["perplexity"]["value"], rel=1e-6)
    assert metrics["dense/perplexity"] == pytest.approx(report["baseline"]["perplexity"]["results"]["value"], rel=1e-6)
    for task in ("piqa", "arc_easy"):
        for name in ("acc", "acc_norm"):
            assert metrics[f"zeroshot/{task}/{name}"] == pytest.approx(report["zeroshot"][task][name])
            assert metrics[f"dense/zeroshot/{task}/{name}"] == pytest.approx(report["baseline"]["zeroshot"]["results"][task][name])
    assert metrics["pruning/params_after"] == report["pruning"]["params_after"] == report["model"]["params"]
    assert metrics["seconds/estimation"] == pytest.approx(report["seconds"]["estimation"])

    # the dense numbers are the unpruned model's, measured before slicing, and now cached
    dense = report["baseline"]["perplexity"]
    assert dense["results"]["value"] == pytest.approx(dense_tiny_perplexity(tiny_model_dir), rel=1e-5)
    assert dense["results"]["value"] != pytest.approx(report["perplexity"]["value"])
    assert dense["cached"] is False and Path(dense["cache_file"]).parent == cache / "baselines"
    assert report["baseline"]["zeroshot"]["cached"] is False
    assert {"baseline_perplexity", "baseline_zeroshot"} <= set(report["seconds"])

    # report.md says the same, and links the plots written next to it
    markdown = (export / "report.md").read_text()
    assert f"| {report['perplexity']['value']:,.2f} |" in markdown and f"| {dense['results']['value']:,.2f} |" in markdown
    piqa = report["zeroshot"]["piqa"]
    assert f"| piqa acc % ↑ (n=2) | {100 * report['baseline']['zeroshot']['results']['piqa']['acc']:.1f} | {100 * piqa['acc']:.1f} |" in markdown
    assert f"{report['pruning']['params_after']:,}" in markdown
    assert report["model"]["plots"] == ["layer_widths.png", "importance.png"]
    for name in report["model"]["plots"]:
        assert f"]({name})" in markdown
        assert (export / name).read_bytes()[:4] == b"\x89PNG" and (export / name).stat().st_size < 100_000
    groups = report["importance"]["groups"]
    assert set(groups) == {f"layers.{i}.{k}" for i in (1, 2) for k in ("mlp", "self_attn")}
    assert all(len(q["element1"]) == 7 and q["element1"] == sorted(q["element1"]) for q in groups.values())

    # the second run takes both baselines from the cache: not measured again
    stamps = {p: p.stat().st_mtime_ns for p in (cache / "baselines").iterdir()}
    assert len(stamps) == 2
    run_fit(with_evaluations(prune_job(tiny_model_dir, tmp_path / "second"), tmp_path / "second", zeroshot_data),
            tmp_path / "second")
    second = json.loads((tmp_path / "second" / "export" / "report.json").read_text())
    assert second["baseline"]["perplexity"]["cached"] is True and second["baseline"]["zeroshot"]["cached"] is True
    assert not {"baseline_perplexity", "baseline_zeroshot"} & set(second["seconds"])
    assert {p: p.stat().st_mtime_ns for p in (cache / "baselines").iterdir()} == stamps
    assert second["baseline"]["perplexity"]["results"] == report["baseline"]["perplexity"]["results"]
    assert "from the cache" in (tmp_path / "second" / "export" / "report.md").read_text()


def test_baseline_off(tiny_model_dir, tmp_path, cache):
    job = prune_job(tiny_model_dir, tmp_path)
    job["perplexity"]["baseline"] = False
    run_fit(job, tmp_path)
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert "baseline" not in report and not (cache / "baselines").exists()
    assert "| perplexity ↓" in (tmp_path / "export" / "report.md").read_text()


# validate / test -----------------------------------------------------------------------------------

def evaluation_job(model: Path | str, root: Path, zeroshot_data: Path, limit_batches: int) -> dict:
    return {
        "seed_everything": 0,
        "model": {"class_path": "hywia_lightning.CausalLM", "init_args": {"model_name_or_path": str(model)}},
        "data": {"class_path": "hywia_lightning.CalibrationData", "init_args": {
            "source": "builtin:python-docs/test", "split": "test", "num_windows": 4, "seq_len": 32, "batch_size": 2}},
        "trainer": {
            "accelerator": "cpu", "devices": 1, "limit_val_batches": limit_batches, "limit_test_batches": limit_batches,
            "enable_progress_bar": False, "default_root_dir": str(root),
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(root / "logs"), "name": "run", "version": 0}},
        },
        "perplexity": {"source": "builtin:python-docs/test", "seq_len": 32, "num_chunks": 4},
        "zeroshot": {"tasks": ["piqa"], "data_dir": str(zeroshot_data), "limit": 2, "batch_size": 4},
        "report": {"dirname": "report"},
    }


def run(command: str, config: dict, workdir: Path) -> HywiaCLI:
    path = workdir / "job.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(copy.deepcopy(config)))
    return HywiaCLI(args=[command, "--config", str(path)], stages=STAGES)


@pytest.mark.parametrize("command,limit_batches", [
    ("validate", 2),  # Lightning's loop runs: the evaluations follow it in on_validation_end
    ("test", 0),      # no batches, Lightning skips the loop: the evaluations run in teardown
])
def test_validate_and_test_evaluate_and_report(command, limit_batches, tiny_model_dir, tmp_path, cache, zeroshot_data):
    run(command, evaluation_job(tiny_model_dir, tmp_path, zeroshot_data, limit_batches), tmp_path)
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    metrics = logged(tmp_path)
    assert report["model"]["stage"] == command
    assert metrics["perplexity"] == pytest.approx(report["perplexity"]["value"], rel=1e-6)
    assert metrics["zeroshot/piqa/acc"] == pytest.approx(report["zeroshot"]["piqa"]["acc"]) == 0.5
    assert report["perplexity"]["value"] == pytest.approx(dense_tiny_perplexity(tiny_model_dir), rel=1e-5)
    # an unchanged dense model is its own baseline, and fills the cache for the runs that prune it
    dense = report["baseline"]["perplexity"]
    assert dense["same_model"] is True and dense["results"]["value"] == report["perplexity"]["value"]
    assert Path(dense["cache_file"]).is_file()
    split = "val" if command == "validate" else "test"
    if limit_batches:
        assert metrics[f"{split}_loss"] == pytest.approx(report[f"{split}_language_model"]["loss"], rel=1e-6)
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert f"evaluated by `{command}`" in markdown and "| piqa acc % ↑ (n=2) | 50.0 | 50.0 | +0.0 |" in markdown


def test_an_export_is_compared_with_the_model_it_was_pruned_from(tiny_model_dir, tmp_path, cache, zeroshot_data):
    run_fit(prune_job(tiny_model_dir, tmp_path / "prune"), tmp_path / "prune")
    pruned = json.loads((tmp_path / "prune" / "export" / "report.json").read_text())
    run("validate", evaluation_job(tmp_path / "prune" / "export", tmp_path / "eval", zeroshot_data, 0), tmp_path / "eval")
    report = json.loads((tmp_path / "eval" / "report" / "report.json").read_text())
    # the same chunks give the same perplexity as the pruning run measured in memory
    assert report["perplexity"]["value"] == pytest.approx(pruned["perplexity"]["value"], rel=1e-4)
    dense = report["baseline"]["perplexity"]
    assert dense["model"] == str(tiny_model_dir.resolve())
    assert dense["cached"] is True  # measured by the pruning run, before slicing
    assert dense["results"] == pruned["baseline"]["perplexity"]["results"]
    # the zero-shot baseline was never measured: the dense model is loaded and evaluated, once
    assert report["baseline"]["zeroshot"]["cached"] is False and report["baseline"]["zeroshot"]["model"] == dense["model"]


# plots -------------------------------------------------------------------------------------------

def test_figures_go_to_tensorboard(tiny_model_dir, tmp_path, cache, zeroshot_data):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = prune_job(tiny_model_dir, tmp_path)
    job["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(tmp_path / "tb"), "name": "run", "version": 0}}
    run_fit(job, tmp_path)
    events = EventAccumulator(str(tmp_path / "tb" / "run" / "version_0"))
    events.Reload()
    assert {"report/layer_widths", "report/importance"} <= set(events.Tags()["images"])
    assert {"perplexity", "dense/perplexity", "pruning/fraction_removed"} <= set(events.Tags()["scalars"])


def hywia_sections() -> dict:
    """The sections a HyWIA run with recovery records (the shapes the stages write)."""
    schemes = ["element1", "element2", "vector"]
    return {
        "seconds": {"estimation": 12.5, "recovery": 30.0, "export": 1.0},
        "memory": {"peak_rss_gib": 2.5},
        "pruning": {"granularity": "hywia-learned(element1+element2+vector)", "target_ratio": 0.2, "params_before": 1000,
                    "params_after": 800, "fraction_removed": 0.2, "layers": [1, 3], "attention_unit": "query_heads",
                    "round_to": 1, "calibration": None,
                    "layer_widths": {"num_attention_heads": [4, 2, 4, 4], "num_key_value_heads": [2, 2, 2, 2],
                                     "intermediate_size": [96, 60, 70, 96]}},
        "fusion": {"mode": "learned", "schemes": schemes, "training": None, "seconds": 1.0,
                   "weights": {f"layers.{i}.{k}": [0.5, 0.3, 0.2] for i in (1, 2) for k in ("mlp", "self_attn")}},
        "importance": {"quantiles": [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0], "schemes": schemes,
                       "groups": {f"layers.{i}.{k}": {s: [0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 5.0] for s in schemes}
                                  for i in (1, 2) for k in ("mlp", "self_attn")}},
        "recovery": {"loss_curve": [[0, 4.0], [10, 3.1], [20, 2.9]], "val_loss": [[0, 4.1], [20, 3.0]], "steps": 20},
    }


def test_every_plot_is_drawn_and_every_section_rendered(tmp_path):
    sections = hywia_sections()
    names = write_plots(sections, tmp_path)
    assert names == ["layer_widths.png", "fusion_weights.png", "importance.png", "recovery_loss.png"]
    for name in names:
        assert 1_000 < (tmp_path / name).stat().st_size < 100_000
    sections["model"] = {"model_name_or_path": "tiny", "plots": names}
    markdown = render_markdown(sections)
    assert "| 1–2 | 0.50 / 0.30 / 0.20 | 0.50 / 0.30 / 0.20 |" in markdown  # fusion weights, equal layers merged
    assert "| 1 | 2 | 2 | 60 |" in markdown  # kept widths per layer
    assert "| training loss | 4.0000 (step 0) | 2.9000 (step 20) |" in markdown
    assert "| recovery | 30.0 |" in markdown and "peak rss: 2.50 GiB" in markdown
    assert all(f"]({name})" in markdown for name in names)


# progress ----------------------------------------------------------------------------------------

def test_progress_lines_are_rate_limited(caplog):
    caplog.set_level(logging.INFO, logger="hywia_lightning.progress")
    progress = Progress("estimation", 32, every=3600)
    for _ in range(32):
        progress.update()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("estimation: window 32/32, ") and "done in" in lines[0]
    caplog.clear()
    every = Progress("fusion training", 3, unit="epoch", every=0)
    every.update(note="held-out loss 3.2")
    assert caplog.records[-1].getMessage().startswith("fusion training: epoch 1/3, ")
    assert caplog.records[-1].getMessage().endswith("left, held-out loss 3.2")
    with pytest.raises(ValueError, match=r"every=-1 must be >= 0"):
        Progress("x", 1, every=-1)


def test_in_a_terminal_progress_is_a_bar_and_the_last_line(caplog, capsys, monkeypatch):
    caplog.set_level(logging.INFO, logger="hywia_lightning.progress")
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    assert use_bar()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not use_bar()  # other processes of the node log
    monkeypatch.setenv("HYWIA_PROGRESS", "bar")
    progress = Progress("perplexity", 4, unit="chunk", every=0)
    for _ in range(4):
        progress.update(note="x")
    assert "perplexity" in capsys.readouterr().err  # tqdm drew it
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and lines[0].startswith("perplexity: chunk 4/4, ")
    monkeypatch.setenv("HYWIA_PROGRESS", "log")
    assert not use_bar()
    monkeypatch.setenv("HYWIA_PROGRESS", "bars")
    with pytest.raises(ValueError, match="HYWIA_PROGRESS='bars'"):
        use_bar()


def test_perplexity_reports_progress(caplog, monkeypatch):
    monkeypatch.setenv("HYWIA_PROGRESS", "log")
    caplog.set_level(logging.INFO, logger="hywia_lightning.progress")
    perplexity(tiny_llama(), torch.randint(0, 300, (5, 8)), batch_size=2)
    assert caplog.records[-1].getMessage().startswith("perplexity: chunk 5/5, ")


@pytest.mark.parametrize("calibration, evaluation, warned", [
    ("builtin:python-docs/train", "builtin:python-docs/test", "the same corpus (builtin:python-docs)"),
    ("../shared/data/wikitext-2/valid.txt", "../shared/data/wikitext-2/test.txt", "the same corpus"),
    ("../shared/data/wikitext-2/valid.txt", "../shared/data/wikitext-2/valid.txt", "the same text"),
    (["generated", "builtin:python-docs/train"], "builtin:python-docs/test", "the same corpus"),
    ("generated", "builtin:python-docs/test", None),
    ("builtin:python-docs/train", "../shared/data/wikitext-2/test.txt", None),
])
def test_in_domain_perplexity_is_warned_about(calibration, evaluation, warned):
    from hywia_lightning.report.run_report import evaluation_warnings

    sections = {"pruning": {"calibration": {"source": calibration, "num_windows": 4, "seq_len": 8, "seed": 0}},
                "perplexity": {"source": evaluation, "value": 3.0, "tokens": 64}}
    warnings = evaluation_warnings(sections)
    if warned is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warned in warnings[0] and "flatters" in warnings[0]
        assert "**Warning:** in-domain perplexity" in render_markdown({"warnings": warnings})


def test_a_run_names_its_calibration_source_and_warns_when_it_evaluates_in_domain(tiny_model_dir, tmp_path, cache):
    run_fit(prune_job(tiny_model_dir, tmp_path), tmp_path)  # calibrated on python-docs/train, evaluated on python-docs/test
    report = json.loads((tmp_path / "export" / "report.json").read_text())
    assert report["pruning"]["calibration"]["source"] == "builtin:python-docs/train"
    assert len(report["warnings"]) == 1 and "builtin:python-docs/test" in report["warnings"][0]
    markdown = (tmp_path / "export" / "report.md").read_text()
    assert "from `builtin:python-docs/train`" in markdown and "**Warning:** in-domain perplexity" in markdown
