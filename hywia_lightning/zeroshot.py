"""Zero-shot accuracy through the real lm-eval library, offline, on local JSON-lines data.

The paper reports seven multiple-choice tasks. Each is read from ``<data_dir>/<task>.jsonl``, one
item a line in one normalized form ``{"id", "context", "choices": [...], "label": int}`` (raw text,
no prompt applied), and scored by lm-eval 0.4 with that task's **own** standard config: its task
YAML is loaded from the installed ``lm_eval/tasks`` and only the data source is replaced. Each
normalized item is turned back into the fields that YAML reads (``goal``/``sol1``/``sol2`` for
PIQA, ``question``/``choices``/``answerKey`` for ARC, ...), so the prompts, target delimiter and
scoring are lm-eval's, not a copy of them that could drift. Nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import string
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

from .checks import require_positive
from .progress import Progress

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
    """Fail on an empty list, an unknown or a repeated task name."""
    if isinstance(tasks, str) or not tasks:
        raise ValueError(f"{key}={tasks!r} must be a non-empty list; allowed: {', '.join(ZEROSHOT_TASKS)}")
    for name in tasks:
        if name not in TASKS:
            raise ValueError(f"{key}: task {name!r} is unknown; allowed: {', '.join(ZEROSHOT_TASKS)}")
    repeated = sorted({name for name in tasks if list(tasks).count(name) > 1})
    if repeated:
        raise ValueError(f"{key}: {', '.join(repeated)} listed more than once")
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


def check_zeroshot(tasks: list[str], data_dir: str | Path, key: str = "data_dir") -> dict[str, list[dict]]:
    """Everything that can fail before model work: the task names and every line of their files."""
    check_tasks(tasks)
    return {task: read_items(data_dir, task, key) for task in tasks}


def standard_config(task: str) -> dict[str, Any]:
    """lm-eval's own config of ``task`` (its installed YAML, ``!function`` entries resolved)."""
    import lm_eval
    from lm_eval.tasks._yaml_loader import load_yaml

    return load_yaml(Path(lm_eval.__file__).parent / "tasks" / TASKS[task].yaml, resolve_func=True)


def _local_dataset(docs: list[dict], **_metadata):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def local_task(task: str, items: list[dict], source: str = "local"):
    """An lm-eval ``ConfigurableTask``: lm-eval's standard config of ``task`` on ``items``."""
    from lm_eval.api.task import ConfigurableTask

    spec = TASKS[task]
    config = standard_config(task)
    for structural in ("tag", "group", "task_list"):
        config.pop(structural, None)
    config.update(
        dataset_path=None, dataset_name=None, dataset_kwargs=None,
        custom_dataset=partial(_local_dataset, [spec.to_doc(item) for item in items]),
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
    items = check_zeroshot(tasks, data_dir)
    return {task: local_task(task, items[task], str(task_file(data_dir, task))) for task in tasks}


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


def evaluate_zeroshot(
    model, tokenizer, tasks: list[str], data_dir: str | Path, limit: int | None = None, batch_size: int = 8,
) -> dict[str, dict[str, float]]:
    """Zero-shot ``acc`` / ``acc_norm`` of an in-memory Hugging Face model on the first ``limit``
    items of each task (``None``: all): ``{task: {"acc", "acc_norm", "items"}}``. WinoGrande has
    no ``acc_norm`` (``None``; see :data:`TASKS`)."""
    require_positive(limit=limit, batch_size=batch_size)
    task_objects = local_tasks(tasks, data_dir)  # every input error is raised here, before the model runs

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    was_training = model.training
    lm = _progress_lm()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    try:
        results = simple_evaluate(
            model=lm, tasks=list(task_objects.values()), task_manager=TaskManager(include_defaults=False),
            limit=limit, bootstrap_iters=0, log_samples=False,
            # scoring is deterministic; leave the caller's random state alone
            random_seed=None, numpy_random_seed=None, torch_random_seed=None, fewshot_random_seed=None,
        )
    finally:
        model.train(was_training)
    scores = {}
    for task in tasks:
        metrics = results["results"][task]
        scores[task] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": float(metrics["acc_norm,none"]) if "acc_norm,none" in metrics else None,
            "items": int(results["n-samples"][task]["effective"]),
        }
        log.info("zero-shot %s (%d items): %s", task, scores[task]["items"], scores[task])
    return scores

