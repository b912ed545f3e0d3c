"""Every shipped config parses and instantiates (with a tiny model standing in for the real one)."""

from pathlib import Path

import pytest
import yaml

from callbacks import StructuredPruning
from hywia_lightning.cli import HywiaCLI

from .conftest import REPO

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"prune_smollm2.yaml", "prune_llama.yaml", "bench/dense.yaml", "bench/element1_50.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_starts_with_its_command_and_instantiates(path: Path, tiny_model_dir):
    first_line = path.read_text().splitlines()[0]
    assert first_line == f"# python main.py fit --config {path.relative_to(REPO).as_posix()}"
    cli = HywiaCLI(
        args=["--config", str(path), "--model.init_args.model_name_or_path", str(tiny_model_dir)], run=False
    )
    assert cli.model.model.config.num_hidden_layers == 4
    expected = [c["class_path"] for c in yaml.safe_load(path.read_text())["trainer"]["callbacks"]]
    built = [f"callbacks.{type(c).__name__}" for c in cli.trainer.callbacks if type(c).__module__.startswith("callbacks.")]
    assert built == expected
    assert sum(isinstance(c, StructuredPruning) for c in cli.trainer.callbacks) <= 1


def test_benchmark_configs_are_the_generators_output():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bench_configs", REPO / "scripts" / "make_bench_configs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generated = generator.configs()
    shipped = {p.name: p.read_text() for p in (REPO / "configs" / "bench").glob("*.yaml")}
    assert shipped == generated, "run: python scripts/make_bench_configs.py"
