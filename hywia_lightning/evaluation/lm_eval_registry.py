"""lm-eval's own tasks by name (its registry: tasks, groups such as ``mmlu``, tags), with their data
from a local datasets folder when one is given, else from the datasets cache or the hub.

The registry is lm-eval's ``TaskManager``; indexing its ~15,000 YAML files takes seconds, so it is
built once per process and only when a name is not one of the local JSON-lines tasks.

A datasets folder mirrors the hub: the dataset a task config names as ``dataset_path`` (and
``dataset_name``) is read from ``<datasets_dir>/<dataset_path>/<dataset_name>/`` when that folder
exists, else from ``<datasets_dir>/<dataset_path>/`` with ``dataset_name`` as its config; each is a
folder ``datasets.load_dataset`` reads offline: a snapshot of the hub repository
(``huggingface-cli download --repo-type dataset baber/piqa --local-dir <datasets_dir>/baber/piqa``)
or files named by split with the raw fields the task's config reads, every split the config names:
``train.jsonl``, ``validation.jsonl``, ``test.jsonl``, any other split (MMLU's ``dev``) as
``data/<split>-00000-of-00001.jsonl``. lm-eval itself builds the task (its prompts, metrics,
``process_docs``); only the place its ``datasets.load_dataset`` call reads is changed, so a group
is covered like a single task. (A task whose Python code imports ``load_dataset`` by name, rather
than calling ``datasets.load_dataset``, is not redirected and reads the cache or the hub.)
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..input_errors import InputError, did_you_mean


@functools.cache
def task_manager():
    """lm-eval's registry of its installed tasks, built on first use."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def unknown_name(name: str, key: str, local: tuple[str, ...]) -> InputError:
    """The refusal of a name that is neither lm-eval's nor local, with the closest of both."""
    import lm_eval

    close = did_you_mean(name, dict.fromkeys([*local, *task_manager().all_tasks]), n=5)
    return InputError(key, f"task {name!r} is neither one of lm-eval {getattr(lm_eval, '__version__', '')}'s "
                           f"{len(task_manager().all_tasks)} tasks, groups and tags nor a local task ({', '.join(local)})",
                      (close + " " if close else "") + "all of lm-eval's names: lm-eval ls tasks")


@dataclass
class DatasetLoad:
    """One ``datasets.load_dataset`` call of lm-eval's, and where it was served from."""

    path: str
    name: str | None
    folder: Path | None = None  # in the datasets folder; None: the datasets cache or the hub
    splits: list[str] | None = None  # what it returned; None: it did not return

    def __str__(self) -> str:
        dataset = self.path + (f" ({self.name})" if self.name else "")
        return f"{dataset} from {self.folder}" if self.folder else f"{dataset} from the datasets cache or the hub"

    def fingerprint(self) -> list:
        """What the scores depend on: the folder's files (sizes, times), or the dataset's name."""
        if self.folder is None:
            return [self.path, self.name, "hub"]
        files = sorted(f for f in self.folder.rglob("*") if f.is_file() and ".cache" not in f.parts)
        return [self.path, self.name, [[str(f.relative_to(self.folder)), f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


def describe_loads(loads: list[DatasetLoad], datasets_dir: str | Path | None) -> str:
    """Where a task's data came from, in a line (a group's 57 configs of one dataset in one)."""
    if len(loads) <= 1:
        return str(loads[0]) if loads else "data of the task's own code"
    paths = ", ".join(dict.fromkeys(load.path for load in loads))
    places = dict.fromkeys(str(Path(datasets_dir).expanduser()) if load.folder else "the datasets cache or the hub" for load in loads)
    return f"{len(loads)} datasets ({paths}) from {' and '.join(places)}"


def dataset_folder(datasets_dir: str | Path | None, path: str, name: str | None) -> tuple[Path, str | None] | None:
    """Where ``load_dataset(path, name)`` is read from in ``datasets_dir``: the folder and the config
    name to pass with it, or ``None`` when the folder has no copy."""
    if datasets_dir is None or not isinstance(path, str) or Path(path).is_absolute():
        return None
    root = Path(datasets_dir).expanduser() / path
    if name and (root / name).is_dir():
        return root / name, None
    if root.is_dir():
        return root, name
    return None


@contextmanager
def datasets_from(datasets_dir: str | Path | None) -> Iterator[list[DatasetLoad]]:
    """While lm-eval builds tasks: its ``datasets.load_dataset`` calls read ``datasets_dir``'s copy
    where there is one; yields the list of the calls made, in order."""
    import datasets

    original, loads = datasets.load_dataset, []

    def load_dataset(path, name=None, *args, **kwargs):
        load = DatasetLoad(path, name)
        loads.append(load)
        local = dataset_folder(datasets_dir, path, name)
        if local is None:
            result = original(path, name, *args, **kwargs)
        else:
            load.folder = local[0]
            kwargs.pop("revision", None)  # a hub revision means nothing to a local folder
            result = original(str(local[0]), local[1], *args, **kwargs)
        load.splits = list(result) if isinstance(result, dict) else ["(one split)"]
        return result

    datasets.load_dataset = load_dataset
    try:
        yield loads
    finally:
        datasets.load_dataset = original


@dataclass
class RegistryTask:
    """One name of lm-eval's registry, built: its task objects, the names its scores are reported
    under (a tag's tasks; a task's or a group's own name), the datasets read."""

    name: str
    objects: list
    reported: list[str]
    loads: list[DatasetLoad]

    def leaf_names(self) -> list[str]:
        return [task.task_name for task in leaf_tasks(self.objects)]


def leaf_tasks(objects: list) -> list:
    """The tasks of lm-eval task and group objects, a group's (and its subgroups') all."""
    from lm_eval.api.group import Group

    return [task for obj in objects for task in (obj.get_all_tasks() if isinstance(obj, Group) else [obj])]


def build_registry_task(name: str, datasets_dir: str | Path | None, key: str, looked: str = "") -> RegistryTask:
    """lm-eval's task, group or tag ``name`` with its data; data that cannot be had is refused,
    naming the dataset, where it was looked for, and what to do (``looked``: where the caller looked
    for a local JSON-lines file of the task, for the message; empty: the task has none)."""
    with datasets_from(datasets_dir) as loads:
        try:
            loaded = task_manager().load([name])
        except Exception as error:
            raise _missing_data(name, loads, datasets_dir, key, looked, error) from error
    if name in loaded["groups"]:
        return RegistryTask(name, [loaded["groups"][name]], [name], loads)
    tasks = list(loaded["tasks"].values())
    return RegistryTask(name, tasks, [name] if name in loaded["tasks"] else [t.task_name for t in tasks], loads)


def _missing_data(name: str, loads: list[DatasetLoad], datasets_dir, key: str, looked: str, error: Exception) -> InputError:
    import datasets

    cause = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    if not loads:
        return InputError(key, f"lm-eval could not build task {name!r} ({cause})", "HYWIA_TRACEBACK=1 shows the whole error")
    load = loads[-1]
    dataset = load.path + (f" ({load.name})" if load.name else "")
    if load.splits is not None and not isinstance(error, KeyError):  # read, then something else failed
        return InputError(key, f"lm-eval could not build task {name!r} from {load} ({cause})",
                          "HYWIA_TRACEBACK=1 shows the whole error")
    if load.splits is not None or load.folder is not None:  # there, but not what lm-eval's config reads
        if load.splits is not None:
            cause = f"no split {error} (its splits: {', '.join(load.splits)})"
        where = f"in {load.folder}" if load.folder is not None else "from the datasets cache or the hub"
        return InputError(key, f"task {name!r}: lm-eval's dataset {dataset} {where}: {cause}",
                          "the folder needs every split the task's config names (training_split, validation_split, "
                          "test_split, fewshot_split) with the fields its prompts read, found by file name: "
                          "train.jsonl, validation.jsonl, test.jsonl, any other split as data/<split>-00000-of-00001.jsonl; "
                          "a snapshot of the hub repository has them")
    places = [looked] if looked else []
    if datasets_dir is not None:
        places.append(f"no folder {Path(datasets_dir).expanduser() / load.path}" + (f"[/{load.name}]" if load.name else ""))
    places.append("the datasets cache" + (" (the hub is off: HF_DATASETS_OFFLINE/HF_HUB_OFFLINE)"
                                          if datasets.config.HF_HUB_OFFLINE else " and the hub"))
    folder = (Path(datasets_dir).expanduser() if datasets_dir is not None else Path("DATASETS_DIR")) / load.path
    hint = (f"give datasets_dir a folder with a copy of the dataset in {folder}"
            + (f" (or of its config in {folder / load.name})" if load.name else "")
            + f", e.g. huggingface-cli download --repo-type dataset {load.path} --local-dir {folder}; "
            + (f"or put {name}.jsonl (normalized items) into data_dir; " if looked else "")
            + "or run once with the hub reachable, which fills the datasets cache")
    return InputError(key, f"task {name!r}: lm-eval's dataset {dataset} could not be had; looked in: "
                           f"{'; '.join(places)} ({cause})", hint)


def results_json(results: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's results dict as plain JSON data (its own converter for what JSON lacks), without
    the per-item samples."""
    import json

    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps({k: v for k, v in results.items() if k != "samples"}, default=handle_non_serializable))
