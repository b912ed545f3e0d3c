"""Training data of the LoRA recovery: Alpaca instructions, plain text or the dense model's own
samples, or a mix of them; seeded, sharded, resumable.

- ``alpaca``: records of a ``.json``/``.jsonl`` file or ``hub:<id>`` (``yahma/alpaca-cleaned`` in
  LLM-Pruner's recipe), language-model loss on the response tokens only, cut at ``seq_len`` tokens.
- ``text``: non-overlapping ``seq_len``-token windows of a text source, loss on every token.
- ``generated``: ``generated_windows`` windows the dense model samples itself, before pruning
  (:mod:`~hywia_lightning.data.self_generation`, cached on disk like generated calibration; other samples
  than the calibration's). General text on a machine with no corpus: what distillation recovers on
  in the offline default, instead of one narrow corpus.

A list of sources is a mix: the examples of every source are pooled, then split and shuffled.

``batch_size`` is the global batch of one forward step: every rank takes ``batch_size / world_size``
examples, drawn by one seeded permutation per epoch that does not depend on the number of ranks,
so a run on N processes sees the same examples per step as a run on one. The position inside an
epoch is saved in checkpoints, so a resumed run continues with the next unseen batch.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning import LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler
from transformers import PreTrainedTokenizerBase

from ..checks import check_context
from ..core.lm_loss import IGNORE_INDEX
from ..distributed.collective import trainer_collective
from ..evaluation.perplexity import chunk_tokens
from ..input_errors import mark_input_error
from .calibration import CalibrationData, source_list
from .instruction_data import read_instructions, tokenize_instruction
from .self_generation import GENERATED, Generation
from .text_sources import check_source, read_text, token_ids

FORMATS = ("alpaca", "text")
RECOVERY_SEED = 2_000_003  # added to the seed of generated recovery windows: other samples than the calibration's


class ResumableSampler(DistributedSampler):
    """This rank's share of a seeded per-epoch permutation; can start an epoch part-way (on resume)."""

    def __init__(self, size: int, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self.start = self.start, 0  # only the resumed epoch starts part-way
        return iter(indices[start:])


class PositionedLoader(DataLoader):
    """The training loader. Its position is restored by :class:`RecoveryData` (saved from the trainer's
    progress counters, which, unlike a count of fetched batches, do not run ahead by Lightning's
    prefetch); the empty state interface tells Lightning the loader resumes mid-epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class RecoveryData(LightningDataModule):
    def __init__(
        self,
        source: str | list[str],
        format: str = "alpaca",
        seq_len: PositiveInt = 256,
        batch_size: PositiveInt = 8,
        val_size: NonNegativeInt = 16,
        max_examples: PositiveInt | None = None,
        seed: int = 0,
        text_field: str = "text",
        train_on_inputs: bool = False,
        generated_windows: PositiveInt = 256,
        generation: Generation | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            source: ``alpaca``: a ``.json``/``.jsonl`` file or ``hub:<id>``; ``text``: a text source
                (local ``.txt``/``.jsonl``, ``builtin:python-docs/train``, ``hub:<id>[:<config>]``);
                ``generated``: the dense model's samples; a list: a mix (pooled).
            format: how the sources other than ``generated`` are read: ``alpaca`` or ``text``.
            seq_len: ``alpaca``: cutoff length of an example; ``text`` and ``generated``: window length.
            batch_size: examples per step over all ranks (must divide by the number of processes).
            val_size: examples held out (seeded) for validation.
            max_examples: train on at most this many examples (``None``: all).
            train_on_inputs: ``alpaca`` only: score the prompt tokens too.
            generated_windows: how many windows ``generated`` samples (sampled once, then cached).
            generation, cache_dir: the sampling settings and the cache folder of ``generated``, as in
                :class:`~hywia_lightning.data.calibration.CalibrationData`.
        """
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"format={format!r} is unknown; allowed: {', '.join(FORMATS)}")
        self.sources = source_list(source, generation)
        self.generated_windows, self.generation, self.cache_dir = generated_windows, generation, cache_dir
        self.generated: dict | None = None  # how the generated windows were obtained (cache file, seconds)
        self.source, self.format, self.seq_len, self.batch_size = source, format, seq_len, batch_size
        self.val_size, self.max_examples, self.seed = val_size, max_examples, seed
        self.text_field, self.train_on_inputs = text_field, train_on_inputs
        self.train_set: list[dict[str, torch.Tensor]] = []
        self.val_set: list[dict[str, torch.Tensor]] = []
        self.pad_id = 0
        self._resume: dict[str, int] = {}

    # -- building -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Read, check and tokenize everything now: before pruning, before any training step."""
        try:
            world = self.trainer.world_size if self.trainer is not None else 1
            self.per_device_batch_size(world)
            if self.train_set:
                return
            self.check()
            module = self.trainer.lightning_module
            check_context(self.seq_len, module.model.config, "data.seq_len")
            self.build(module.tokenizer, self._sampling_model(module) if GENERATED in self.sources else None)
            if len(self.train_set) < self.batch_size:
                raise ValueError(
                    f"data.source={self.source!r} gives {len(self.train_set)} training examples after holding out "
                    f"val_size={self.val_size}, fewer than batch_size={self.batch_size}; use more data or a smaller batch"
                )
        except (ValueError, OSError) as error:  # the job's data, refused before pruning and training
            raise mark_input_error(error, "data.init_args")

    def check(self) -> None:
        """A text source that cannot be read fails here (instruction files are checked as they are read)."""
        if self.format == "text":
            for source in self.sources:
                if source != GENERATED:
                    check_source(source, "data.source")

    @staticmethod
    def _sampling_model(module):
        """The dense model that ``generated`` samples: the module's teacher where it names one (a
        recovery that starts from a pruned export), else its model (still dense: this runs before pruning)."""
        return module.dense_model() if hasattr(module, "dense_model") else module.model

    def per_device_batch_size(self, world_size: int) -> int:
        if self.batch_size % world_size:
            raise ValueError(
                f"data.batch_size={self.batch_size} (the global batch) does not divide across {world_size} processes "
                f"(devices × nodes); use a multiple of {world_size}"
            )
        return self.batch_size // world_size

    def build(self, tokenizer: PreTrainedTokenizerBase, dense_model=None) -> None:
        """Every source's examples, split by one seeded permutation; ``dense_model`` samples ``generated``."""
        examples = [e for source in self.sources for e in self._examples(source, tokenizer, dense_model)]
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(self.seed)).tolist()
        if len(examples) <= self.val_size:
            raise ValueError(f"data.source={self.source!r} has {len(examples)} examples, not more than val_size={self.val_size}")
        self.val_set = [examples[i] for i in order[: self.val_size]]
        self.train_set = [examples[i] for i in order[self.val_size :]][: self.max_examples]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _examples(self, source: str, tokenizer: PreTrainedTokenizerBase, dense_model) -> list[dict[str, torch.Tensor]]:
        if source == GENERATED:
            windows = self._generated(tokenizer, dense_model)
        elif self.format == "alpaca":
            records = read_instructions(source, "data.source")
            return [tokenize_instruction(tokenizer, r, self.seq_len, self.train_on_inputs) for r in records]
        else:
            windows = chunk_tokens(token_ids(tokenizer, read_text(source, "data.source", self.text_field)), self.seq_len,
                                   num_chunks=None)
        return [{"input_ids": w, "labels": w} for w in windows]

    def _generated(self, tokenizer: PreTrainedTokenizerBase, dense_model) -> list[torch.Tensor]:
        """Sampled by calibration's code and cache (rank 0 samples, every rank gets its windows)."""
        if dense_model is None:
            raise ValueError(f"data.source={GENERATED!r} samples from the dense model: pass it to build()")
        sampler = CalibrationData(GENERATED, self.generated_windows, self.seq_len, self.seed + RECOVERY_SEED,
                                  generation=self.generation, cache_dir=self.cache_dir)
        sampler.key = "data.source"
        sampler.attach(tokenizer, dense_model, trainer_collective(self.trainer) if self.trainer is not None else None)
        windows = sampler.windows()
        self.generated = {**sampler.describe()["generation"], "windows": self.generated_windows}
        return list(windows)

    def describe(self) -> dict:
        described = {
            "source": self.source, "format": self.format, "seq_len": self.seq_len, "batch_size": self.batch_size,
            "train_examples": len(self.train_set), "val_examples": len(self.val_set), "seed": self.seed,
        }
        if self.generated is not None:
            described["generation"] = self.generated
        return described

    # -- loaders --------------------------------------------------------------------------------
    def collate(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Right-pad to the longest example; padding is masked and not scored."""
        length = max(e["input_ids"].numel() for e in examples)
        batch = {
            "input_ids": torch.full((len(examples), length), self.pad_id, dtype=torch.long),
            "labels": torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long),
            "attention_mask": torch.zeros((len(examples), length), dtype=torch.long),
        }
        for row, e in enumerate(examples):
            n = e["input_ids"].numel()
            batch["input_ids"][row, :n], batch["labels"][row, :n], batch["attention_mask"][row, :n] = e["input_ids"], e["labels"], 1
        return batch

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        sampler = ResumableSampler(len(self.train_set), trainer.world_size, trainer.global_rank, self.seed)
        per_device = self.per_device_batch_size(trainer.world_size)
        if self._resume.get("epoch") == trainer.current_epoch and 0 < self._resume["batches"] < len(sampler) // per_device:
            sampler.start = self._resume["batches"] * per_device
        self._resume = {}
        return PositionedLoader(self.train_set, batch_size=per_device, sampler=sampler, collate_fn=self.collate, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.per_device_batch_size(self.trainer.world_size), collate_fn=self.collate)

    # -- resume ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Where in the epoch training is, read from the trainer's own progress counters."""
        if self.trainer is None:
            return {}
        progress = self.trainer.fit_loop.epoch_loop.batch_progress.current
        return {"epoch": self.trainer.current_epoch, "batches": progress.processed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resume = dict(state_dict)
