"""Calibration data: seeded, fixed-length token windows from a text source."""

from __future__ import annotations

import torch
from jsonargparse.typing import PositiveInt
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedTokenizerBase

from .text_sources import check_source, read_text, token_ids


def token_windows(token_ids: Tensor, num_windows: int, seq_len: int, seed: int, source: str = "text") -> Tensor:
    """``num_windows`` distinct non-overlapping windows of ``seq_len`` tokens, chosen by ``seed``."""
    available = token_ids.numel() // seq_len
    if available < num_windows:
        raise ValueError(
            f"{source} is too short: {token_ids.numel()} tokens give {available} windows of {seq_len}, "
            f"but num_windows={num_windows}; lower num_windows or seq_len, or use a longer text"
        )
    chunks = token_ids[: available * seq_len].reshape(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    return chunks[order[:num_windows]].clone()


class CalibrationData(LightningDataModule):
    """Token windows of a text source for importance estimation, fusion training and reconstruction.

    ``source``: a local ``.txt``/``.jsonl`` file, a built-in corpus (``builtin:python-docs/train``)
    or ``hub:<dataset id>[:<config>]`` where a network exists. The windows need a tokenizer, which
    the pipeline attaches from the model being pruned (:meth:`attach_tokenizer`); they are built on
    first use. As a job's top-level ``data`` it is the calibration set of the pipeline's callbacks.
    """

    def __init__(
        self,
        source: str,
        num_windows: PositiveInt,
        seq_len: PositiveInt,
        seed: int = 0,
        batch_size: PositiveInt = 1,
        text_field: str = "text",
        split: str = "train",
    ) -> None:
        super().__init__()
        self.source, self.num_windows, self.seq_len, self.seed = source, num_windows, seq_len, seed
        self.batch_size, self.text_field, self.split = batch_size, text_field, split
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self._windows: Tensor | None = None
        self.key = "calibration.source"  # how errors name the source (the stage that uses it says, in check)

    def check(self, key: str = "calibration.source") -> None:
        """Fail fast on a source that cannot be read; ``key`` names it in this and later errors."""
        self.key = key
        check_source(self.source, key)

    def attach_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if tokenizer is not self.tokenizer:
            self.tokenizer, self._windows = tokenizer, None

    def setup(self, stage: str) -> None:
        """As the job's ``data`` (``validate``/``test`` with no pruning stage to attach it): take the
        tokenizer of the job's model when none is attached."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.tokenizer is None and getattr(module, "tokenizer", None) is not None:
            self.attach_tokenizer(module.tokenizer)

    def windows(self) -> Tensor:
        """``[num_windows, seq_len]`` token ids (tokenized once, then cached)."""
        if self._windows is None:
            if self.tokenizer is None:
                raise RuntimeError("CalibrationData needs a tokenizer: call attach_tokenizer(tokenizer) first")
            text = read_text(self.source, self.key, self.text_field, self.split)
            ids = token_ids(self.tokenizer, text)
            self._windows = token_windows(ids, self.num_windows, self.seq_len, self.seed, f"{self.key}={self.source!r}")
        return self._windows

    def describe(self) -> dict:
        return {"source": self.source, "num_windows": self.num_windows, "seq_len": self.seq_len, "seed": self.seed}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.windows()), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """The same windows, so ``validate`` measures the model's language-model loss on them
        (``limit_val_batches`` bounds how many batches)."""
        return self.train_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.train_dataloader()
