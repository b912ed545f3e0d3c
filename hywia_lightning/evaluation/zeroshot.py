"""Zero-shot scores through the real lm-eval library: its own tasks by name, and the paper's seven
from local JSON-lines data, offline.

A task is read from ``<data_dir>/<task>.jsonl`` when that file exists and the task is one of the
seven the paper reports (:data:`TASKS`): one item a line in one normalized form
``{"id", "context", "choices": [...], "label": int}`` (raw text, no prompt applied), scored by lm-eval
0.4 with that task's **own** standard config: its task YAML is loaded from the installed
``lm_eval/tasks`` and only the data source is replaced. Each normalized item is turned back into the
fields that YAML reads (``goal``/``sol1``/``sol2`` for PIQA, ``question``/``choices``/``answerKey``
for ARC, ...), so the prompts, target delimiter and scoring are lm-eval's, not a copy of them that
could drift. Any other name of lm-eval's registry (``mmlu``, ``lambada_openai``, ...) runs as lm-eval
builds it, its data from a local datasets folder, the datasets cache or the hub
(:mod:`~hywia_lightning.evaluation.lm_eval_registry`); the same items score the same either way.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from ..checks import require_positive
from ..input_errors import InputError
from ..progress import Progress
from .baseline import file_fingerprint
from .lm_eval_registry import build_registry_task, describe_loads, leaf_tasks, task_manager, unknown_name

log = logging.getLogger(__name__)

ZEROSHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
FIELDS = ("id", "context", "choices", "label")


def _boolq(item: dict) -> dict:
    """BoolQ: ``context`` is the question (without the ``?`` the prompt adds), the extra field
    ``passage`` the passage; ``label`` 0 = no, 1 = yes. The answers are lm-eval's fixed
    ``["no", "yes"]``, so the item's ``choices`` only fix the label range."""
    return {"passage": item["passage"], "question": item["context"], "label": item["label"]}


def _piqa(item: dict) -> dict:
    """PIQA: ``context`` is the goal, ``choices`` the two solutions."""
    return {"goal": item["context"], "sol1": item["choices"][0], "sol2": item["choices"][1], "label": item["label"]}


def _hellaswag(item: dict) -> dict:
    """HellaSwag: lm-eval builds its query from ``activity_label + ": " + ctx_a + " " +
    ctx_b.capitalize()`` and cleans it and the endings with ``preprocess``. The normalized
    ``context`` holds that joined raw query (the activity label included) and ``choices`` the raw
    endings; lm-eval's own ``preprocess`` is applied to both here, in place of its
    ``process_docs``, which needs the split fields."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    return {
        "query": preprocess(item["context"]), "choices": [preprocess(ending) for ending in item["choices"]],
        "gold": item["label"], "label": str(item["label"]),
    }


def _winogrande(item: dict) -> dict:
    """WinoGrande: ``context`` is the sentence with its blank ``_``, ``choices`` the two options.
    lm-eval scores it by partial evaluation: each option fills the blank in its own context and
    both are scored on the same continuation (the text after the blank)."""
    return {
        "sentence": item["context"], "option1": item["choices"][0], "option2": item["choices"][1],
        "answer": str(item["label"] + 1),
    }


def _lettered(question_field: str, item: dict) -> dict:
    """ARC and OpenBookQA: ``context`` is the question (stem), ``choices`` the answer texts,
    lettered A, B, ... as in the hub datasets."""
    letters = list(string.ascii_uppercase[: len(item["choices"])])
    return {
        question_field: item["context"], "choices": {"text": item["choices"], "label": letters},
        "answerKey": letters[item["label"]],
    }


@dataclass(frozen=True)
class TaskSpec:
    """How one task's normalized items meet lm-eval's standard config of it."""

    yaml: str  # lm-eval's standard task config, relative to lm_eval/tasks
    to_doc: Callable[[dict], dict]  # a normalized item -> the document that config reads
    num_choices: int | None = None  # exactly this many choices, or any number from 2
    extra_fields: tuple[str, ...] = ()
    blank: bool = False  # the context must hold the blank "_" (WinoGrande)
    replace_process_docs: bool = False  # to_doc already does what the config's process_docs does
    metrics: tuple[str, ...] = ("acc", "acc_norm")


TASKS: dict[str, TaskSpec] = {
    "boolq": TaskSpec("super_glue/boolq/default.yaml", _boolq, num_choices=2, extra_fields=("passage",)),
    "piqa": TaskSpec("piqa/piqa.yaml", _piqa, num_choices=2),
    "hellaswag": TaskSpec("hellaswag/hellaswag.yaml", _hellaswag, replace_process_docs=True),
    # acc_norm divides by the length of each choice; WinoGrande's "choices" are the two filled-in
    # contexts, so lm-eval reports acc only, and so does this.
    "winogrande": TaskSpec("winogrande/default.yaml", _winogrande, num_choices=2, blank=True, metrics=("acc",)),
    "arc_easy": TaskSpec("arc/arc_easy.yaml", partial(_lettered, "question")),
    "arc_challenge": TaskSpec("arc/arc_challenge.yaml", partial(_lettered, "question")),
    "openbookqa": TaskSpec("openbookqa/openbookqa.yaml", partial(_lettered, "question_stem")),
}
assert tuple(TASKS) == ZEROSHOT_TASKS


def check_tasks(tasks: list[str], key: str = "tasks") -> list[str]:
    """Refuse an empty list, a repeated name, and a name neither local nor lm-eval's (naming the
    closest); lm-eval's registry is indexed only for a name that is not one of :data:`TASKS`."""
    if isinstance(tasks, str) or not tasks:
        raise InputError(key, f"{tasks!r} must be a non-empty list of task names",
                         f"e.g. [{', '.join(ZEROSHOT_TASKS[:3])}], or any of lm-eval's tasks and groups (mmlu, ...)")
    repeated = sorted({name for name in tasks if list(tasks).count(name) > 1})
    if repeated:
        raise InputError(key, f"{', '.join(repeated)} listed more than once", "list each task once")
    for name in tasks:
        if name not in TASKS and name not in task_manager().task_index:
            raise unknown_name(name, key, ZEROSHOT_TASKS)
    return list(tasks)


def task_file(data_dir: str | Path, task: str) -> Path:
    return Path(data_dir).expanduser() / f"{task}.jsonl"


def read_items(data_dir: str | Path, task: str, key: str = "data_dir") -> list[dict]:
    """The validated items of ``<data_dir>/<task>.jsonl``; every problem names the file and line."""
    spec = TASKS[task]
    path = task_file(data_dir, task)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}={str(data_dir)!r}: no file {path} for task {task!r}; expected one JSON object a line "
            f"with fields {', '.join(FIELDS + spec.extra_fields)}"
        )
    items = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                items.append(_check_item(line, spec, f"{path}:{number}"))
    if not items:
        raise ValueError(f"{path} has no items")
    return items


def _check_item(line: str, spec: TaskSpec, where: str) -> dict:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: invalid JSON ({error.msg})") from None
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(item).__name__}")
    for field in FIELDS + spec.extra_fields:
        if field not in item:
            raise ValueError(f"{where}: missing field {field!r} (fields: {', '.join(FIELDS + spec.extra_fields)})")
    for field in ("context",) + spec.extra_fields:
        if not isinstance(item[field], str):
            raise ValueError(f"{where}: field {field!r} must be a string, got {type(item[field]).__name__}")
    choices, label = item["choices"], item["label"]
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices) or len(choices) < 2:
        raise ValueError(f"{where}: field 'choices' must be a list of at least 2 strings, got {choices!r}")
    if spec.num_choices is not None and len(choices) != spec.num_choices:
        raise ValueError(f"{where}: {len(choices)} choices; this task has exactly {spec.num_choices}")
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(f"{where}: field 'label' must be an integer, got {label!r}")
    if not 0 <= label < len(choices):
        raise ValueError(f"{where}: label {label} is out of range for {len(choices)} choices (0..{len(choices) - 1})")
    if spec.blank and "_" not in item["context"]:
        raise ValueError(f"{where}: field 'context' has no blank '_' for the options to fill")
    return item


def standard_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of ``task`` (its installed YAML, ``!function`` entries resolved)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / TASKS[task].yaml, resolve_func=True)


class _LocalDataset:
    """A local task's documents as lm-eval's ``custom_dataset`` (its ``test`` split); lm-eval's results
    JSON shows the config's callables as text, so this one shows its file, not every document."""

    def __init__(self, docs: list[dict], source: str) -> None:
        self.docs, self.source = docs, source

    def __call__(self, **_metadata):
        import datasets

        return datasets.DatasetDict({"test": datasets.Dataset.from_list(self.docs)})

    def __repr__(self) -> str:
        return f"<the documents of {self.source}>"


def local_task(task: str, items: list[dict], source: str = "local"):
    """An lm-eval ``ConfigurableTask``: lm-eval's standard config of ``task`` on ``items``."""
    from lm_eval.api.task import ConfigurableTask

    spec = TASKS[task]
    config = standard_config(task)
    for structural in ("tag", "group", "task_list"):
        config.pop(structural, None)
    config.update(
        dataset_path=None, dataset_name=None, dataset_kwargs=None,
        custom_dataset=_LocalDataset([spec.to_doc(item) for item in items], source),
        training_split=None, validation_split=None, test_split="test", fewshot_split=None, num_fewshot=0,
        metric_list=[{"metric": name, "aggregation": "mean", "higher_is_better": True} for name in spec.metrics],
        metadata={**(config.get("metadata") or {}), "source": source},
    )
    if spec.replace_process_docs:
        config["process_docs"] = None
    quiet = _DropMessage("Custom kwargs can be passed")  # lm-eval's hint for hub tasks; not ours
    logging.getLogger("lm_eval.api.task").addFilter(quiet)
    try:
        return ConfigurableTask(config=config)
    finally:
        logging.getLogger("lm_eval.api.task").removeFilter(quiet)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


def local_tasks(tasks: list[str], data_dir: str | Path) -> dict:
    """``{task: ConfigurableTask}`` reading ``<data_dir>/<task>.jsonl`` (validated first)."""
    items = {task: read_items(data_dir, task) for task in tasks}
    return {task: local_task(task, items[task], str(task_file(data_dir, task))) for task in tasks}


@dataclass
class ZeroShotTask:
    """One task of the list, ready for lm-eval: its task objects, the names its scores are reported
    under (a tag's tasks, else its own name), the lm-eval tasks it runs, where its data came from
    (for the report) and what that data's identity is (for the baseline cache)."""

    name: str
    objects: list
    reported: list[str]
    leaves: list[str]
    source: str
    fingerprint: Any


def prepare_tasks(tasks: list[str], data_dir: str | Path | None = None, datasets_dir: str | Path | None = None,
                  setting: Callable[[str], str] = str) -> list[ZeroShotTask]:
    """Each task from ``<data_dir>/<task>.jsonl`` where that file exists (the seven of :data:`TASKS`),
    else lm-eval's registry task with its data from ``datasets_dir``
    (:mod:`~hywia_lightning.evaluation.lm_eval_registry`), the datasets cache or the hub. Every input error is
    raised here, before any model work; ``setting(name)`` is how a message names a setting."""
    check_tasks(tasks, setting("tasks"))
    prepared = []
    for name in tasks:
        path = task_file(data_dir, name) if data_dir is not None else None
        if name in TASKS and path is not None and path.is_file():
            task = local_task(name, read_items(data_dir, name, setting("data_dir")), str(path))
            prepared.append(ZeroShotTask(name, [task], [name], [name], f"local file {path}", file_fingerprint(path)))
            continue
        looked = (f"no file {path}" if path is not None else "no data_dir") if name in TASKS else ""
        built = build_registry_task(name, datasets_dir, setting("datasets_dir"), looked)
        prepared.append(ZeroShotTask(name, built.objects, built.reported, built.leaf_names(),
                                     f"lm-eval's {name}: {describe_loads(built.loads, datasets_dir)}", [load.fingerprint() for load in built.loads]))
    seen: dict[str, str] = {}
    for task in prepared:
        for leaf in task.leaves:
            if leaf in seen:
                raise InputError(setting("tasks"), f"lm-eval's task {leaf!r} is in both {seen[leaf]!r} and {task.name!r}",
                                 "list it once (a group or tag runs all its tasks)")
            seen[leaf] = task.name
    return prepared


def _progress_lm():
    """lm-eval's HFLM reporting its scored requests through :class:`~hywia_lightning.progress.Progress`
    (a bar in a terminal, log lines in a batch job) instead of its own tqdm bars."""
    from lm_eval.models.huggingface import HFLM

    class ProgressHFLM(HFLM):
        def loglikelihood(self, requests, disable_tqdm: bool = False):
            progress = Progress("zero-shot", len(requests), unit="request")
            hook = self.cache_hook
            self.cache_hook = _CountingHook(hook, progress)
            try:
                return super().loglikelihood(requests, disable_tqdm=True)
            finally:
                self.cache_hook = hook
                progress.close()

    return ProgressHFLM


class _CountingHook:
    """lm-eval calls its cache hook once per scored request: count it, then pass it on."""

    def __init__(self, hook, progress: Progress) -> None:
        self.hook, self.progress = hook, progress

    def add_partial(self, attr: str, request, result) -> None:
        self.hook.add_partial(attr, request, result)
        self.progress.update()


# stderr: closed-form for means (acc, acc_norm); this many bootstrap resamples for the metrics
# lm-eval bootstraps (f1, mcc, perplexity, ...), a 100th of its CLI's default, which takes minutes
BOOTSTRAP_ITERS = 1000


def run_zeroshot(model, tokenizer, tasks: list[ZeroShotTask], limit: int | None = None, batch_size: int = 8) -> dict:
    """lm-eval's results (``simple_evaluate``'s dict, no samples) of an in-memory Hugging Face model on
    the first ``limit`` items of each task (``None``: all), zero-shot."""
    require_positive(limit=limit, batch_size=batch_size)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    objects = [obj for task in tasks for obj in task.objects]
    for task in leaf_tasks(objects):
        task.set_config(key="num_fewshot", value=0)  # zero-shot, whatever a registry task's config says
    was_training = model.training
    lm = _progress_lm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        return simple_evaluate(
            model=lm, tasks=objects, task_manager=TaskManager(include_defaults=False), limit=limit,
            bootstrap_iters=BOOTSTRAP_ITERS, log_samples=False,
            # scoring is deterministic; leave the caller's random state alone
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
        )
    finally:
        model.train(was_training)


def zeroshot_scores(results: dict, tasks: list[ZeroShotTask]) -> dict[str, dict]:
    """``{task: {metric: value, metric_stderr: value, ..., "items", "source"}}`` from lm-eval's results:
    the metrics each task's config defines (``acc``, ``acc_norm``, ...; a group's aggregate), a
    filter other than ``none`` written ``metric/filter``; a stderr lm-eval could not give is ``None``."""
    scores = {}
    for task in tasks:
        for name in task.reported:
            metrics = {}
            for key, value in results["results"][name].items():
                metric, comma, filter_name = key.partition(",")
                if comma:
                    metrics[metric if filter_name == "none" else f"{metric}/{filter_name}"] = (
                        float(value) if isinstance(value, (int, float)) else None)
            scores[name] = {**metrics, "items": _items(results, name), "source": task.source}
            log.info("zero-shot %s (%d items): %s", name, scores[name]["items"],
                     {k: v for k, v in metrics.items() if not k.endswith("_stderr")})
    return scores


def _items(results: dict, name: str) -> int:
    """The items scored of a task, or of all the tasks of a group."""
    if name in results["n-samples"]:
        return int(results["n-samples"][name]["effective"])
    return sum(_items(results, child) for child in results.get("group_subtasks", {}).get(name, []))


def evaluate_zeroshot(
    model, tokenizer, tasks: list[str], data_dir: str | Path | None = None, limit: int | None = None,
    batch_size: int = 8, datasets_dir: str | Path | None = None,
) -> dict[str, dict]:
    """Zero-shot scores (:func:`zeroshot_scores`) of an in-memory Hugging Face model on the first
    ``limit`` items of each task (see :func:`prepare_tasks` for where each task's data comes from)."""
    require_positive(limit=limit, batch_size=batch_size)
    prepared = prepare_tasks(tasks, data_dir, datasets_dir)  # every input error is raised here, before the model runs
    return zeroshot_scores(run_zeroshot(model, tokenizer, prepared, limit, batch_size), prepared)
