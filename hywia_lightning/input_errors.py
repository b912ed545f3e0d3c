"""Bad input as one short paragraph: the YAML key, the value given, what is allowed, a hint.

jsonargparse reports a refused value as a nested union-validation report (several KB when a class
sits inside a callback inside a list); the sentence that matters is its innermost error. This module
reads such a report into an :class:`InputError` (key path, problem, hint), and :func:`main` prints
that paragraph instead of the report or the traceback, with exit code 2. ``HYWIA_TRACEBACK=1``
shows everything as before.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

TRACEBACK_VARIABLE = "HYWIA_TRACEBACK"
INPUT_ERROR_EXIT_CODE = 2
_MARK = "_hywia_input_error"  # set on an exception raised by a stage's check of the run's input

_ARGUMENT = r"(?:[A-Z]\w*\.)?(\w+)\s*[=:]"  # how our messages start: "target_ratio=1.5 ...", "Export.dirname: ..."
_UNION = "Does not validate against any of the Union subtypes"
_NONE = "Expected a <class 'NoneType'>"


@dataclass
class InputError(ValueError):
    """A refused input: where it is (``key``, a YAML path such as ``pruning.init_args.target_ratio``),
    what is wrong with it (``problem``) and what to do (``hint``)."""

    key: str | None
    problem: str
    hint: str = ""

    def __str__(self) -> str:
        lines = [f"error: {self.key}: {self.problem}" if self.key else f"error: {self.problem}"]
        if self.hint:
            lines.append(f"hint: {self.hint}")
        lines.append(f"(exit code {INPUT_ERROR_EXIT_CODE}; the full report: {TRACEBACK_VARIABLE}=1)")
        return "\n".join(lines)


def mark_input_error(error: BaseException, config_key: str | None = None) -> BaseException:
    """Mark ``error`` (raised by a check of the run's input, before heavy work) as the user's to fix;
    ``config_key`` (e.g. ``pruning.init_args``) is where the YAML holds the arguments of whoever
    refused: the key of a message that starts with ``name=value`` is found from it. An
    :class:`InputError` already names its key."""
    if isinstance(error, InputError):
        return error
    name = re.match(_ARGUMENT, str(error))
    key = f"{config_key}.{name.group(1)}" if config_key and name and config_key not in str(error) else None
    setattr(error, _MARK, InputError(key, str(error).strip()))
    return error


def marked(error: BaseException) -> InputError | None:
    return getattr(error, _MARK, None)


def show_tracebacks() -> bool:
    return os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")


def main(run: Callable[[], Any]) -> None:
    """Run the CLI; a refused input ends in its paragraph and exit code 2, anything else as usual."""
    try:
        run()
    except InputError as error:
        if show_tracebacks():
            raise
        _exit_with(str(error))
    except Exception as error:
        if marked(error) is None or show_tracebacks():
            raise
        _exit_with(str(marked(error)))


def _exit_with(paragraph: str) -> None:
    sys.stdout.flush()
    sys.stderr.write("\n" + paragraph + "\n")
    sys.stderr.flush()
    raise SystemExit(INPUT_ERROR_EXIT_CODE)


# -- reading jsonargparse's reports ---------------------------------------------------------------

@dataclass
class _Found:
    keys: list[str]          # the key path, "init_args" included where a class was chosen
    leaf: str                # the innermost error
    given: str | None        # the innermost "Given value: ..." text
    class_path: str | None   # the class whose arguments the last key belongs to


def is_union_report(message: str) -> bool:
    return _UNION in message or "Problem with given class_path" in message


def from_parse_error(message: str, top_level_keys: list[str]) -> InputError:
    """An :class:`InputError` for the message of a parse error (``parser.error(message)``)."""
    unrecognized = re.match(r"unrecognized arguments: (\S+)", message.strip())
    if unrecognized:
        option = unrecognized.group(1)
        name = option.lstrip("-").split("=", 1)[0]
        head = name.split(".", 1)[0]
        hint = did_you_mean(head, top_level_keys, spell=lambda close: repr("--" + name.replace(head, close, 1))) or (
            f"keys at the top: {', '.join(top_level_keys)}")
        return InputError(name, f"{option} is not an option of this command", hint)
    found = _read(message.splitlines())
    return _explain(found)


def from_instantiation_error(message: str, config: Any) -> InputError:
    """An :class:`InputError` for a class that refused its arguments while being built; ``config``
    (the parsed namespace) locates the class by the value jsonargparse reports."""
    found = _read(message.splitlines())
    path = _locate(config, found.given) if found.given else None
    if path is not None:
        found.keys = path.split(".") + found.keys
        node = _node(config, path)
        name = re.match(_ARGUMENT, found.leaf)
        init_args = vars(node).get("init_args") if _is_namespace(node) else None
        if name and init_args is not None and name.group(1) in vars(init_args):
            found.keys += ["init_args", name.group(1)]
    return _explain(found)


def _read(lines: list[str]) -> _Found:
    """The innermost error of a (possibly nested) union report, and the key path down to it."""
    lines = _dedent([line for line in lines if line.strip()])
    if not lines:
        return _Found([], "", None, None)
    header = re.fullmatch(r'Parser key "([^"]+)":', lines[0].strip())
    if header:
        inner = _read(lines[1:])
        return _Found(header.group(1).split(".") + inner.keys, inner.leaf, inner.given, inner.class_path)
    if any(_UNION in line for line in lines[:2]):
        given = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("Given value:")), None)
        errors = lines.index("Errors:") if "Errors:" in lines else None
        block = [] if errors is None else _block(lines[errors + 1:])
        chosen = next((item for item in _items(block) if not item[0].startswith(_NONE)), None)
        if chosen is None:
            return _Found([], " ".join(lines), given, None)
        inner = _read_item(chosen)
        return _Found(inner.keys, inner.leaf, inner.given or given, inner.class_path)
    if lines[0].startswith("- "):  # several alternatives at the top (a value that is neither a path nor a class)
        alternatives = _items(lines)
        chosen = next((item for item in alternatives if any(_UNION in line for line in item)), alternatives[0])
        return _read_item(chosen)
    return _Found([], " ".join(line.strip() for line in lines), None, None)


def _read_item(item: list[str]) -> _Found:
    first = item[0][2:].strip()
    problem = re.fullmatch(r"Problem with given class_path '([^']+)':", first)
    if problem:
        inner = _read([line[2:] for line in item[1:]])
        option = re.fullmatch(r"Option '([^']+)' is not accepted", inner.leaf)
        if option:
            return _Found(["init_args", option.group(1)], inner.leaf, inner.given, problem.group(1))
        if re.search(r"has no attribute|No module named", inner.leaf) and not inner.keys:
            return _Found(["class_path"], inner.leaf, inner.given, problem.group(1))
        keys = ["init_args"] + inner.keys if inner.keys else []
        return _Found(keys, inner.leaf, inner.given, inner.class_path or problem.group(1))
    return _read([first] + [line[2:] for line in item[1:]])


def _explain(found: _Found) -> InputError:
    key = ".".join(found.keys) or None
    leaf, hint = found.leaf, ""
    literal = re.fullmatch(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)", leaf)
    restriction = re.fullmatch(r"Not of type (\w+): (?:(.*) )?does not conform to restriction (.*)", leaf)
    option = re.fullmatch(r"Option '([^']+)' is not accepted", leaf)
    if literal:
        allowed = ", ".join(a.strip().strip("'\"") for a in literal.group(1).split(","))
        leaf = f"{literal.group(2)!r} is not allowed; allowed: {allowed}"
    elif restriction:
        value = f"{restriction.group(2)} is" if restriction.group(2) else "the value given is"
        leaf = f"{value} not a {restriction.group(1)} (allowed: {restriction.group(3).replace('v', 'a value ', 1)})"
    elif option and found.class_path:
        names = [name for name in _arguments(found.class_path) if name != option.group(1)]
        leaf = f"{found.class_path} takes no argument {option.group(1)!r}"
        hint = did_you_mean(option.group(1), names) or f"its arguments: {', '.join(names)}"
    elif found.keys[-1:] == ["class_path"] and found.class_path:
        close = _close_class(found.class_path)
        leaf = f"{found.class_path!r} cannot be imported ({leaf})"
        hint = f"did you mean {close!r}?" if close else "give a class's full import path, e.g. callbacks.HybridPruning"
    if key and not hint:
        hint = f"change {key} in the YAML, or on the command line --{key.replace('.init_args', '')} VALUE"
    return InputError(key, leaf, hint)


def did_you_mean(name: str, names: Iterable[str], n: int = 1, spell: Callable[[str], str] = repr) -> str:
    """``did you mean 'x'?`` with the ``n`` closest of ``names`` (each written by ``spell``), or ``""``."""
    close = difflib.get_close_matches(name, list(names), n=n)
    return f"did you mean {', '.join(map(spell, close))}?" if close else ""


def _arguments(class_path: str) -> list[str]:
    """The keyword arguments a class accepts (following ``**kwargs`` up its bases)."""
    try:
        cls = _import(class_path)
    except Exception:
        return []
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        names += [p.name for p in parameters if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def _close_class(class_path: str) -> str | None:
    module_name, _, name = class_path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except Exception:
        return None
    close = difflib.get_close_matches(name, [n for n in dir(module) if not n.startswith("_")], n=1)
    return f"{module_name}.{close[0]}" if close else None


def _import(class_path: str):
    module_name, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), name)


def _locate(config: Any, given: str, path: str = "") -> str | None:
    """The key path of the node of ``config`` whose repr is ``given`` (the innermost match)."""
    if _is_namespace(config) or isinstance(config, dict):
        children = [(f"{path}.{k}" if path else str(k), v) for k, v in (vars(config) if _is_namespace(config) else config).items()]
    elif isinstance(config, list):
        children = [(f"{path}[{i}]", v) for i, v in enumerate(config)]
    else:
        children = []
    for child_path, child in children:
        inner = _locate(child, given, child_path)
        if inner is not None:
            return inner
    return path if path and repr(config) == given else None


def _node(config: Any, path: str) -> Any:
    node = config
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        node = node[int(part[1:-1])] if part.startswith("[") else (vars(node) if _is_namespace(node) else node)[part]
    return node


def _is_namespace(value: Any) -> bool:
    return type(value).__name__ == "Namespace"


def _dedent(lines: list[str]) -> list[str]:
    indent = min((len(line) - len(line.lstrip()) for line in lines), default=0)
    return [line[indent:] for line in lines]


def _block(lines: list[str]) -> list[str]:
    """The indented lines that follow a ``Errors:`` header."""
    block = []
    for line in lines:
        if not line.startswith(" "):
            break
        block.append(line)
    return _dedent(block)


def _items(lines: list[str]) -> list[list[str]]:
    """``- item`` entries of a list, each with its continuation lines."""
    items: list[list[str]] = []
    for line in lines:
        if line.startswith("- "):
            items.append([line])
        elif items:
            items[-1].append(line)
    return items
