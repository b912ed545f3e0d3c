"""Every shipped config parses and instantiates (with a tiny model standing in for the real one)."""

from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch.strategies import Strategy

from callbacks import STAGES, StructuredPruning
from hywia_lightning.cli import HywiaCLI

from .conftest import REPO
from .test_zeroshot import HAND_WRITTEN, write_items

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs():
    names = {p.relative_to(REPO / "configs").as_posix() for p in CONFIGS}
    assert {"prune_smollm2.yaml", "prune_llama.yaml", "bench/dense.yaml", "bench/element1_50.yaml"} <= names


# configs that need GPUs instantiate here on the CPU; their strategy is checked on its own
CPU_OVERRIDES = ["--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.num_nodes", "1",
                 "--trainer.precision", "32", "--trainer.strategy", "auto"]


def config_command(path: Path) -> tuple[str, list[str]]:
    """The subcommand and the ``--config`` files of a config's first line (a config may be an overlay
    on another, as ``--config base.yaml --config overlay.yaml``)."""
    words = path.read_text().splitlines()[0].split()
    assert words[:4] == ["#", "python", "main.py", words[3]] and words[3] in ("fit", "validate", "test"), words
    configs = [words[i + 1] for i, word in enumerate(words) if word == "--config"]
    assert configs and configs[-1] == path.relative_to(REPO).as_posix(), "the first line must run this config"
    return words[3], configs


def local_zeroshot_data(tasks: list[str], folder: Path) -> Path:
    """One hand-written item per task: zero-shot data is read before the model is built, and a
    checkout may have no ../shared/data beside it."""
    for task in tasks:
        write_items(folder, task, [HAND_WRITTEN[task][0]])
    return folder


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_config_starts_with_its_command_and_instantiates(path: Path, tiny_model_dir, tmp_path):
    _, configs = config_command(path)
    merged: dict = {}
    for config in configs:
        for key, value in yaml.safe_load((REPO / config).read_text()).items():
            merged[key] = {**merged.get(key, {}), **value} if isinstance(value, dict) else value
    on_gpu = merged["trainer"].get("accelerator") in ("gpu", "cuda")
    args = [arg for config in configs for arg in ("--config", str(REPO / config))]
    args += ["--model.init_args.model_name_or_path", str(tiny_model_dir)] + (CPU_OVERRIDES if on_gpu else [])
    if on_gpu and (merged.get("pruning") or {}).get("init_args", {}).get("shard_weights"):
        args += ["--pruning.init_args.shard_weights", "false"]  # it needs the config's several processes
    if merged.get("zeroshot") and not (REPO / merged["zeroshot"]["data_dir"]).is_dir():
        args += ["--zeroshot.data_dir", str(local_zeroshot_data(merged["zeroshot"]["tasks"], tmp_path / "zeroshot"))]
    cli = HywiaCLI(args=args, run=False, stages=STAGES)
    assert cli.model.model.config.num_hidden_layers == 4
    expected = [c["class_path"] for c in merged["trainer"].get("callbacks", []) if c["class_path"].startswith("callbacks.")]
    expected += [merged[key].get("class_path", f"callbacks.{stage.__name__}")
                 for key, stage in STAGES.items() if merged.get(key) is not None]
    built = [f"callbacks.{type(c).__name__}" for c in cli.trainer.callbacks if type(c).__module__.startswith("callbacks.")]
    assert built == expected
    assert sum(isinstance(c, StructuredPruning) for c in cli.trainer.callbacks) <= 1
    if on_gpu:
        strategy = merged["trainer"]["strategy"]
        parser = ArgumentParser()
        parser.add_argument("--strategy", type=Strategy)
        built_strategy = parser.instantiate_classes(parser.parse_object({"strategy": strategy})).strategy
        assert type(built_strategy).__name__ == strategy["class_path"].rsplit(".", 1)[-1]


def test_fsdp_recovery_config_shards_decoder_layers_with_lora():
    """The FSDP config builds its strategy on the CPU: one unit per decoder layer (found from the
    model, a peft-wrapped one too), activation checkpointing, original parameters kept apart."""
    from peft import LoraConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from hywia_lightning.distributed.strategies import DecoderLayerFSDP, decoder_layer_classes
    from hywia_lightning.recovery.lora import add_lora

    from .conftest import tiny_llama

    strategy_config = yaml.safe_load((REPO / "configs" / "recover_llama_fsdp.yaml").read_text())["trainer"]["strategy"]
    strategy = DecoderLayerFSDP(**strategy_config["init_args"])
    assert strategy.kwargs["use_orig_params"] is True and strategy.checkpoint_layers
    assert strategy._state_dict_type == "sharded"
    model = add_lora(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "down_proj"]))
    assert decoder_layer_classes(model) == {LlamaDecoderLayer}
    dtypes = {p.dtype for p in model.parameters()}
    assert dtypes == {torch.float32}, "adapters must share the base weights' dtype in one FSDP unit"


def test_benchmark_configs_are_the_generators_output():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_bench_configs", REPO / "scripts" / "make_bench_configs.py")
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    generated = generator.configs()
    shipped = {p.name: p.read_text() for p in (REPO / "configs" / "bench").glob("*.yaml")}
    assert shipped == generated, "run: python scripts/make_bench_configs.py"
