"""Alpaca-format instruction data: reading with precise errors, the prompt template, response-only labels.

A record has ``instruction`` and ``output`` (strings) and an optional ``input``. It is rendered
with the Alpaca template (the one LLM-Pruner's recovery uses) and only the response tokens are
scored, unless ``train_on_inputs``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from ..core.lm_loss import IGNORE_INDEX
from .text_sources import json_lines

REQUIRED_FIELDS = ("instruction", "output")
INSTRUCTION_SUFFIXES = (".json", ".jsonl")

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict) -> str:
    """The prompt part of a record (everything before the response)."""
    template = PROMPT_WITH_INPUT if record.get("input") else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def read_instructions(source: str, key: str) -> list[dict]:
    """The records of a local ``.json`` (a list) / ``.jsonl`` file or of ``hub:<id>[:<config>]``,
    each checked for the Alpaca fields."""
    if source.startswith("hub:"):
        import datasets

        name, _, config = source[len("hub:"):].partition(":")
        rows = datasets.load_dataset(name, config or None, split="train")
        return [_checked(dict(row), f"{key}={source!r} row {i}") for i, row in enumerate(rows)]
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{key}={source!r}: no such file; expected a .json or .jsonl file or hub:<dataset id>")
    if path.suffix not in INSTRUCTION_SUFFIXES:
        raise ValueError(f"{key}={source!r}: unsupported file type {path.suffix!r}; allowed: {', '.join(INSTRUCTION_SUFFIXES)}")
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{key}: {path}:{error.lineno} is not valid JSON ({error.msg})") from None
        if not isinstance(rows, list):
            raise ValueError(f"{key}: {path} must hold a JSON list of records (or use .jsonl, one record a line)")
        return [_checked(row, f"{key}: {path} record {i}") for i, row in enumerate(rows)]
    return [_checked(row, f"{key}: {path}:{number}") for number, row in json_lines(path, key)]


def _checked(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where} is a {type(row).__name__}, not a record with fields {', '.join(REQUIRED_FIELDS)}")
    missing = [field for field in REQUIRED_FIELDS if not isinstance(row.get(field), str)]
    if missing:
        raise ValueError(
            f"{where} lacks the Alpaca field(s) {', '.join(missing)} (found: {', '.join(sorted(row)) or 'none'}); "
            f"every record needs string fields {', '.join(REQUIRED_FIELDS)} and may have 'input'"
        )
    return row


def tokenize_instruction(
    tokenizer: PreTrainedTokenizerBase, record: dict, cutoff_len: int, train_on_inputs: bool = False
) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``labels`` of one record: BOS (if the tokenizer has one) + prompt + response
    + EOS, cut at ``cutoff_len`` tokens; prompt tokens are labelled ``IGNORE_INDEX`` unless ``train_on_inputs``."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = bos + tokenizer(alpaca_prompt(record), add_special_tokens=False)["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt + response)[:cutoff_len]
    labels = list(ids) if train_on_inputs else ([IGNORE_INDEX] * len(prompt) + response)[:cutoff_len]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}
