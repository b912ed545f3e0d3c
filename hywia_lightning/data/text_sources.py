"""Text sources for calibration and evaluation: local files, the built-in corpus, hub datasets.

The built-in corpus is the Python documentation topics that ship with CPython itself
(``pydoc_data.topics``, about 460k characters of English prose and code): it is on every machine,
so the offline default needs no download. The topics, in name order, are cut at the paragraph
boundary nearest 80% of the characters: the first part is ``train`` (calibration), the rest
``test`` (evaluation).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

BUILTIN_SOURCES = ("builtin:python-docs/train", "builtin:python-docs/test")
FILE_SUFFIXES = (".txt", ".jsonl", ".json")


def describe_sources() -> str:
    return (
        f"a local file ({', '.join(FILE_SUFFIXES)}), one of {', '.join(BUILTIN_SOURCES)}, "
        "or a hub dataset 'hub:<id>[:<config>]' (needs a network)"
    )


def check_source(source: str, key: str) -> None:
    """Fail fast, before any model work, on a source that cannot be read."""
    if source.startswith("builtin:"):
        if source not in BUILTIN_SOURCES:
            raise ValueError(f"{key}={source!r} is not a built-in corpus; allowed: {', '.join(BUILTIN_SOURCES)}")
        return
    if source.startswith("hub:"):
        return
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={source!r}: no such file; expected {describe_sources()}")
    if path.suffix not in FILE_SUFFIXES:
        raise ValueError(f"{key}={source!r}: unsupported file type {path.suffix!r}; allowed: {', '.join(FILE_SUFFIXES)}")
    if not os.access(path, os.R_OK):
        raise PermissionError(f"{key}={source!r}: the file is not readable by this user; fix its permissions (chmod u+r)")


def corpus_of(source: str) -> str:
    """The corpus a source belongs to, to tell in-domain evaluation: the splits of the built-in corpus
    are one corpus, a hub dataset is one corpus whatever its split, and the files of one folder are
    taken as splits of one corpus (``wikitext-2/valid.txt`` and ``wikitext-2/test.txt``)."""
    if source.startswith("builtin:"):
        return source.split("/", 1)[0]
    if source.startswith("hub:"):
        return "hub:" + source[len("hub:"):].split(":", 1)[0]
    path = Path(source).expanduser()
    return str(path.resolve().parent) if path.suffix in FILE_SUFFIXES else source


def read_text(source: str, key: str, text_field: str = "text", split: str = "train") -> str:
    """All documents of ``source`` joined by blank lines (lines of a .txt file count as documents,
    as in the usual WikiText-2 evaluation)."""
    check_source(source, key)
    if source.startswith("builtin:"):
        return _python_docs(source.rsplit("/", 1)[1])
    if source.startswith("hub:"):
        return _hub_text(source[len("hub:"):], text_field, split)
    path = Path(source).expanduser()
    if path.suffix == ".txt":
        return "\n\n".join(path.read_text(encoding="utf-8").splitlines())
    return "\n\n".join(_json_records(path, text_field, key))


def json_lines(path: Path, key: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSON-lines file; a bad line fails with its place."""
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{key}: {path}:{number} is not valid JSON ({error.msg})") from None


def token_ids(tokenizer, text: str):
    """The text's token ids as one long tensor, no special tokens (windows and chunks are cut from it)."""
    import torch

    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _json_records(path: Path, text_field: str, key: str) -> list[str]:
    texts = []
    for number, record in json_lines(path, key):
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{key}: {path}:{number} has no field {text_field!r} (set text_field)")
        texts.append(str(record[text_field]))
    return texts


def _python_docs(split: str) -> str:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    cut = text.find("\n\n", int(0.8 * len(text)))
    return text[:cut] if split == "train" else text[cut + 2 :]


def _hub_text(spec: str, text_field: str, split: str, max_chars: int = 20_000_000) -> str:
    import datasets

    name, _, config = spec.partition(":")
    stream = datasets.load_dataset(name, config or None, split=split, streaming=True)
    texts, size = [], 0
    for record in stream:
        texts.append(record[text_field])
        size += len(record[text_field])
        if size >= max_chars:
            break
    return "\n\n".join(texts)
