"""The memory plan of a parsed job: its settings read from the CLI's config, nothing instantiated.

Why: the plan must come before any weight is loaded, so it reads the parsed config (the namespace
LightningCLI builds before instantiating classes, or :mod:`hywia_lightning.job_config`'s): the keys
of each stage, the trainer's devices and the model's shape (:mod:`hywia_lightning.models.shapes`,
offline). Also the memory of the devices the job will run on, for the fit check. The project's
classes are told apart by their class paths (:data:`PROJECT_CLASSES`), not imported: importing the
callbacks imports Lightning (seconds).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from jsonargparse import Namespace
from jsonargparse.typing import import_object

from ..models.shapes import ModelShape, resolve_shape
from .stages import (
    DistillationSettings, EstimationSettings, EvaluationSettings, JobSettings, MemoryPlan, ReconstructionSettings,
    RecoverySettings, plan_memory,
)

#: the variable that sets the memory of one device (GiB) the plan is checked against
DEVICE_GIB_VARIABLE = "HYWIA_DEVICE_GIB"
#: ``0`` skips the check before loading (the plan is still printed by scripts/memory_plan.py)
CHECK_VARIABLE = "HYWIA_MEMORY_CHECK"


@dataclass
class JobPlan:
    plan: MemoryPlan
    shape_source: str          # where the model's shape was read
    model: str


def _get(namespace: Any, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if not isinstance(namespace, (Namespace, dict)) or namespace.get(key) is None:
            return default
        namespace = namespace.get(key)
    return namespace


def _class(spec: Any) -> type | None:
    path = _get(spec, "class_path")
    try:
        return import_object(path) if path else None
    except (ImportError, AttributeError):
        return None


#: the classes a plan asks about (by the class paths configs give them and the ones the CLI's parser
#: writes), each with the kinds of :data:`KINDS` it is; tests/test_memory_plan.py checks it against the classes
PROJECT_CLASSES: dict[str, frozenset[str]] = {
    **dict.fromkeys(("callbacks.StructuredPruning", "callbacks.pruning.StructuredPruning", "callbacks.HybridPruning",
                     "callbacks.hybrid_pruning.HybridPruning"), frozenset({"StructuredPruning"})),
    **dict.fromkeys(("callbacks.LeastSquaresReconstruction", "callbacks.reconstruction.LeastSquaresReconstruction"),
                    frozenset({"LeastSquaresReconstruction"})),
    **dict.fromkeys(("callbacks.PerplexityEvaluation", "callbacks.perplexity.PerplexityEvaluation"),
                    frozenset({"PerplexityEvaluation"})),
    **dict.fromkeys(("hywia_lightning.LoRARecovery", "hywia_lightning.recovery.lora_recovery.LoRARecovery"),
                    frozenset({"LoRARecovery"})),
    **dict.fromkeys(("hywia_lightning.CausalLM", "hywia_lightning.models.causal_lm.CausalLM", "callbacks.Export",
                     "callbacks.export.Export", "callbacks.Report", "callbacks.report.Report",
                     "callbacks.ZeroShotEvaluation", "callbacks.zeroshot.ZeroShotEvaluation"), frozenset()),
}
KINDS = {"StructuredPruning": "callbacks.StructuredPruning", "LeastSquaresReconstruction": "callbacks.LeastSquaresReconstruction",
         "PerplexityEvaluation": "callbacks.PerplexityEvaluation", "LoRARecovery": "hywia_lightning.LoRARecovery"}
#: packages that hold none of the project's classes: their class paths are no stage and need no import
_FOREIGN = ("lightning", "pytorch_lightning", "torch")


def _is(spec: Any, kind: str) -> bool:
    """Whether ``spec``'s class is (a subclass of) the project's ``kind``: by :data:`PROJECT_CLASSES`,
    else imported (a user's class)."""
    path = _get(spec, "class_path")
    if not path or path.split(".")[0] in _FOREIGN:
        return False
    if path in PROJECT_CLASSES:
        return kind in PROJECT_CLASSES[path]
    cls = _class(spec)
    return cls is not None and issubclass(cls, import_object(KINDS[kind]))


def declared_needs(spec: Any) -> tuple[frozenset[str], bool]:
    """The statistics a granularity (a registered name or a ``class_path``) declares, and whether it
    trains a fusion (HyWIA ``learned``), from the class attributes: nothing is instantiated."""
    from ..core.granularities import GRANULARITIES, Granularity
    from ..fusion.hywia import HyWIA
    from ..fusion.modes import FUSION_MODES, FusionMode

    if isinstance(spec, str):
        cls = GRANULARITIES.get(spec)
        return (cls.needs if cls else frozenset()), False
    cls = _class(spec)
    if cls is None or not issubclass(cls, Granularity):
        return frozenset(), False
    if issubclass(cls, HyWIA):
        import inspect

        defaults = inspect.signature(HyWIA.__init__).parameters
        schemes = _get(spec, "init_args", "schemes", default=defaults["schemes"].default)
        mode = _get(spec, "init_args", "mode", default=defaults["mode"].default)
        mode_class = FUSION_MODES.get(mode) if isinstance(mode, str) else _class(mode)
        if mode_class is None or not issubclass(mode_class, FusionMode):
            return frozenset().union(*(declared_needs(s)[0] for s in schemes)), False
        return frozenset().union(*(declared_needs(s)[0] for s in schemes), mode_class.needs), mode_class.trains
    return cls.needs, False


def _stage(config: Namespace, group: str, kind: str) -> Namespace | None:
    """A stage's ``init_args``: its named group, or a callback of that kind in ``trainer.callbacks``."""
    named = _get(config, group)
    if named is not None:  # a stage group's class_path may be omitted for the stage's own class
        return _get(named, "init_args", default=Namespace()) if not named.get("class_path") or _is(named, kind) else None
    for spec in _get(config, "trainer", "callbacks", default=[]) or []:
        if isinstance(spec, Namespace) and _is(spec, kind):
            return _get(spec, "init_args", default=Namespace())
    return None


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _devices(value: Any, accelerator: str) -> int:
    if isinstance(value, (list, tuple)):
        return len(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, str) and "," in value:
        return len([v for v in value.split(",") if v.strip()])
    return max(visible_gpus(), 1) if accelerator == "gpu" else 1  # "auto" / -1


def _accelerator(value: Any) -> str:
    name = str(value or "auto").lower()
    if name in ("gpu", "cuda"):
        return "gpu"
    if name == "auto":
        return "gpu" if visible_gpus() else "cpu"
    return "cpu"


def job_settings(config: Namespace) -> tuple[JobSettings, str, str | None]:
    """The job's memory-relevant keys, the model's name and its ``cache_dir``."""
    model = _get(config, "model", "init_args", default=Namespace())
    trainer = _get(config, "trainer", default=Namespace())
    accelerator = _accelerator(trainer.get("accelerator"))
    dtype = model.get("dtype") or "float32"
    precision = str(trainer.get("precision") or "")
    if precision in ("bf16-true", "bf16"):
        dtype = "bfloat16"
    elif precision in ("16-true", "16"):
        dtype = "float16"
    data = _get(config, "data", "init_args", default=Namespace())
    pruning = _stage(config, "pruning", "StructuredPruning")
    estimation = reconstruction = distillation = None
    target_ratio = 0.0
    if pruning is not None:
        calibration = pruning.get("calibration") or data
        calibration = _get(calibration, "init_args", default=calibration)
        spec = pruning.get("fusion") if pruning.get("fusion") is not None else pruning.get("granularity", "element1")
        spec = "hywia" if spec is None else spec
        if isinstance(spec, Namespace) and "class_path" not in spec:  # HybridPruning's fusion given as plain keys
            spec = Namespace(class_path="hywia_lightning.HyWIA", init_args=spec)
        if spec == "hywia":
            spec = Namespace(class_path="hywia_lightning.HyWIA", init_args=Namespace())
        needs, learned = declared_needs(spec)
        target_ratio = float(pruning.get("target_ratio") or 0.0)
        estimation = EstimationSettings(
            needs=needs, layers=(), attention_unit=pruning.get("attention_unit") or "query_heads",
            accumulate_dtype=pruning.get("accumulate_dtype") or "float32",
            batch_size=int(pruning.get("estimation_batch_size") or 1),
            num_windows=int(_get(calibration, "num_windows", default=32)), seq_len=int(_get(calibration, "seq_len", default=128)),
            learned_fusion=learned,
            fusion_kl=learned and _get(spec, "init_args", "mode", "init_args", "objective", default="lm") == "kl",
        )
        distill, search = pruning.get("distillation"), pruning.get("width_search")
        if distill is not None:
            distillation = DistillationSettings(
                int(_get(distill, "windows", default=32)), int(_get(distill, "top_k", default=64)),
                estimation.seq_len, int(_get(distill, "batch_size", default=8)), search is not None,
                int(_get(search, "search_windows", default=8)), int(_get(search, "batch_size", default=8)))
        refit = _stage(config, "reconstruction", "LeastSquaresReconstruction")
        if refit is not None:
            refit_data = _get(refit.get("calibration"), "init_args", default=refit.get("calibration")) or calibration
            by_kl, chooses = refit.get("choose_by") == "kl", isinstance(refit.get("damping"), list)
            folds = int(refit.get("folds") or 4) if chooses and not by_kl else 1
            kl_windows = int(refit.get("kl_windows") or 8) if by_kl else 0
            reconstruction = ReconstructionSettings(refit.get("mode") or "independent",
                                                    int(_get(refit_data, "seq_len", default=128)),
                                                    int(_get(refit_data, "num_windows", default=32)),
                                                    int(refit.get("batch_size") or 1),
                                                    folds, kl_windows)
    ppl = _stage(config, "perplexity", "PerplexityEvaluation")
    perplexity = EvaluationSettings(int(ppl.get("batch_size") or 8), int(ppl.get("seq_len") or 128)) if ppl is not None else None
    recovery = None
    trains = trainer.get("max_steps") != 0 and trainer.get("limit_train_batches") != 0
    if _is(_get(config, "model"), "LoRARecovery") and trains:
        strategy = trainer.get("strategy")
        strategy_name = str(_get(strategy, "class_path", default=strategy) or "")
        fsdp = "fsdp" in strategy_name.lower()
        checkpointing = bool(model.get("gradient_checkpointing")) or (
            fsdp and _get(strategy, "init_args", "activation_checkpointing", default=True) is not False)
        distils = model.get("loss", "kl") != "lm"  # LoRARecovery's default loss is the KL
        layers = model.get("hidden_layers")  # null: every layer
        hidden = distils and float(model.get("hidden_weight") or 0) > 0
        recovery = RecoverySettings(
            r=int(model.get("r") or 8), target_modules=tuple(model.get("target_modules") or RecoverySettings.target_modules),
            dropout=float(model.get("dropout") or 0.0), batch_size=int(_get(data, "batch_size", default=8)),
            seq_len=int(_get(data, "seq_len", default=256)), activation_checkpointing=checkpointing, fsdp=fsdp,
            teacher=distils or model.get("teacher") is not None, kl=distils,
            hidden_layers=(None if layers is None else len(layers)) if hidden else 0,
        )
    devices, num_nodes = _devices(trainer.get("devices"), accelerator), int(trainer.get("num_nodes") or 1)
    shards = devices * num_nodes if pruning is not None and pruning.get("shard_accumulators") is not False else 1
    job = JobSettings(dtype=dtype, devices=devices, num_nodes=num_nodes, accelerator=accelerator,
                      target_ratio=target_ratio, estimation=estimation, reconstruction=reconstruction,
                      distillation=distillation, perplexity=perplexity, recovery=recovery, estimation_shards=shards,
                      shard_weights=bool(pruning is not None and pruning.get("shard_weights")))
    return job, str(model.get("model_name_or_path") or ""), model.get("cache_dir")


def _with_layers(job: JobSettings, shape: ModelShape, config: Namespace) -> JobSettings:
    from dataclasses import replace

    from ..core.structures import layer_range

    if job.estimation is None:
        return job
    pruning = _stage(config, "pruning", "StructuredPruning")
    layers = tuple(layer_range(shape.num_hidden_layers, int(pruning.get("layer_start") or 0), pruning.get("layer_end")))
    return replace(job, estimation=replace(job.estimation, layers=layers))


def job_plan(config: Namespace) -> JobPlan | None:
    """The plan of a parsed job; ``None`` when its model's shape is not known offline."""
    job, model, cache_dir = job_settings(config)
    resolved = resolve_shape(model, cache_dir) if model else None
    if resolved is None:
        return None
    shape, source = resolved
    stages = (job.estimation, job.reconstruction, job.perplexity, job.recovery)
    longest = max((getattr(s, "seq_len", 0) for s in stages if s is not None), default=0)
    if shape.max_position_embeddings and longest > shape.max_position_embeddings:
        return None  # windows over the model's context: that stage's own check refuses them, naming its key
    return JobPlan(plan_memory(shape, _with_layers(job, shape, config)), source, model)


def device_bytes(job: JobSettings) -> tuple[float | None, str]:
    """The memory one rank may use: ``$HYWIA_DEVICE_GIB``, else the smallest visible GPU's, else the
    machine's RAM shared by the processes of one node; ``None`` for a GPU job where none is visible."""
    if os.environ.get(DEVICE_GIB_VARIABLE):
        return float(os.environ[DEVICE_GIB_VARIABLE]) * 2**30, f"${DEVICE_GIB_VARIABLE}"
    if job.accelerator == "gpu":
        if not visible_gpus():
            return None, "no visible GPU"
        import torch

        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(visible_gpus()))
        return float(smallest), f"the smallest of {visible_gpus()} visible GPUs"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / job.devices, f"the machine's RAM / {job.devices} process(es)"


#: what to change, the YAML key and the setting, tried in this order when a job does not fit
REMEDIES = (
    ("pruning.init_args.shard_accumulators", "true", lambda job: _replace(job, estimation_shards=job.world_size)),
    ("pruning.init_args.shard_weights", "true", lambda job: _replace(job, shard_weights=job.shard_weights or job.world_size > 1)),
    ("pruning.init_args.accumulate_dtype", "bfloat16", lambda job: _replace_estimation(job, accumulate_dtype="bfloat16")),
    ("model.init_args.dtype", "bfloat16", lambda job: _replace(job, dtype="bfloat16")),
    ("pruning.init_args.estimation_batch_size", "1", lambda job: _replace_estimation(job, batch_size=1)),
)


def _replace(job: JobSettings, **changes) -> JobSettings:
    from dataclasses import replace

    return replace(job, **changes)


def _replace_estimation(job: JobSettings, **changes) -> JobSettings:
    from dataclasses import replace

    return job if job.estimation is None else replace(job, estimation=replace(job.estimation, **changes))


def remedies(plan: MemoryPlan) -> list[tuple[str, str, float]]:
    """``(key, value, peak GiB)`` of each remedy that lowers the peak, applied one after the other."""
    found, job, peak = [], plan.job, plan.peak_gib
    for key, value, change in REMEDIES:
        changed = change(job)
        if changed == job:
            continue
        lower = plan_memory(plan.shape, changed).peak_gib
        if lower < peak - 1e-3:
            found.append((key, value, lower))
            job, peak = changed, lower
    return found


def refusal(job_plan: JobPlan, limit: float, source: str) -> "InputError":
    """The paragraph of a job that will not fit: the numbers, the stage, the keys that lower them."""
    from ..input_errors import InputError

    plan = job_plan.plan
    peak = plan.peak
    largest = sorted(peak.parts, key=lambda p: -p.bytes)[:3]
    parts = ", ".join(f"{p.name} {p.bytes / 2**30:.1f}" for p in largest)
    problem = (f"the memory plan of {job_plan.model} needs {peak.gib:.1f} GiB per rank at its {peak.stage} stage "
               f"({parts} GiB), more than the {limit / 2**30:.1f} GiB of {source}")
    job = plan.job
    now = {"pruning.init_args.shard_accumulators": (str(job.estimation_shards > 1).lower()
                                                    if job.estimation and job.world_size > 1 else None),
           "pruning.init_args.shard_weights": (str(job.shard_weights).lower()
                                               if job.estimation and job.world_size > 1 else None),
           "pruning.init_args.accumulate_dtype": job.estimation.accumulate_dtype if job.estimation else None,
           "model.init_args.dtype": job.dtype,
           "pruning.init_args.estimation_batch_size": job.estimation.batch_size if job.estimation else None}
    lowered = {key: (value, gib) for key, value, gib in remedies(plan)}
    keys = []
    for key, current in now.items():
        if current is None:
            continue
        change = f", {lowered[key][0]} → {lowered[key][1]:.1f} GiB" if key in lowered else ""
        keys.append(f"{key} (now {current}{change})")
    keys.append(f"trainer.devices / trainer.num_nodes (now {job.devices} × {job.num_nodes}; more ranks shard the g/g² "
                "accumulators of estimation, with pruning.init_args.shard_weights the weights of estimation, scoring "
                "and reconstruction and the pruned model after slicing, and under FSDP LoRA recovery)")
    hint = ("the keys that lower it (each change applied on top of the ones before): " + "; ".join(keys) +
            ". The whole plan: python scripts/memory_plan.py --config CONFIG; "
            f"{CHECK_VARIABLE}=0 skips this check, {DEVICE_GIB_VARIABLE}=N sets one device's GiB")
    key = "pruning.init_args.accumulate_dtype" if peak.stage in ("estimation", "scoring", "fusion training") else (
        "trainer.devices" if peak.stage == "recovery" else "model.init_args.dtype")
    return InputError(key, problem, hint)
