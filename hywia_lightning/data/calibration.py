"""Calibration data: seeded, fixed-length token windows from a text source, the model itself, or a mix."""

from __future__ import annotations

import torch
from jsonargparse.typing import PositiveInt
from lightning import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..distributed.collective import Collective
from .generation_cache import cached_generation, generation_key
from .self_generation import GENERATED, Generation, sample_windows
from .text_sources import check_source, read_text, token_ids


def token_windows(token_ids: Tensor, num_windows: int, seq_len: int, seed: int, source: str = "text",
                  held_out_after: int | None = None) -> Tensor:
    """``num_windows`` distinct non-overlapping windows of ``seq_len`` tokens, the first of the
    seed's order; with ``held_out_after`` the last ones instead, disjoint from the first
    ``held_out_after`` (so held-out windows stay the same whatever the calibration's count)."""
    available = token_ids.numel() // seq_len
    needed = num_windows + (held_out_after or 0)
    if available < needed:
        counts = f"{held_out_after} + {num_windows} held out" if held_out_after is not None else f"num_windows={num_windows}"
        raise ValueError(
            f"{source} is too short: {token_ids.numel()} tokens give {available} windows of {seq_len}, "
            f"but {counts} are needed; lower the window counts or seq_len, or use a longer text"
        )
    chunks = token_ids[: available * seq_len].reshape(available, seq_len)
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))
    chosen = order[available - num_windows :] if held_out_after is not None else order[:num_windows]
    return chunks[chosen].clone()


HELD_OUT_SEED = 1_000_003  # added to the seed of generated held-out windows: other samples than the calibration's


def split_count(total: int, parts: int) -> list[int]:
    """``total`` windows shared by ``parts`` sources as evenly as possible (the first ones get the remainder)."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def source_list(source: str | list[str], generation: Generation | None) -> list[str]:
    """One source, or a list of them to mix; refused: no source, a source named twice, and
    ``generation`` settings with no ``generated`` source to use them."""
    sources = [source] if isinstance(source, str) else list(source)
    if not sources:
        raise ValueError(f"source={source!r}: give one source, or a list of sources to mix")
    if len(set(sources)) != len(sources):
        raise ValueError(f"source={source!r} names a source twice; list each source of a mix once")
    if generation is not None and GENERATED not in sources:
        raise ValueError(f"generation={generation} is set, but source={source!r} has no {GENERATED!r} to use it")
    return sources


class CalibrationData(LightningDataModule):
    """Token windows of a text source for importance estimation, fusion training and reconstruction.

    ``source``: a local ``.txt``/``.jsonl`` file, a built-in corpus (``builtin:python-docs/train``),
    ``hub:<dataset id>[:<config>]`` where a network exists, or ``generated``: text the dense model
    samples itself before pruning (:mod:`hywia_lightning.data.self_generation`, settings in
    ``generation``, cached in ``cache_dir``). A list of sources is a mix: the windows are shared
    evenly among them, in the list's order.

    The windows need the tokenizer of the model being pruned, and ``generated`` the dense model
    itself: the pipeline attaches both (:meth:`attach`) and builds the windows in its preflight,
    before any stage modifies the model. As a job's top-level ``data`` it is the calibration set of
    the pipeline's callbacks.
    """

    def __init__(
        self,
        source: str | list[str],
        num_windows: PositiveInt,
        seq_len: PositiveInt,
        seed: int = 0,
        batch_size: PositiveInt = 1,
        text_field: str = "text",
        split: str = "train",
        generation: Generation | None = None,
        cache_dir: str | None = None,
    ) -> None:
        """
        Args:
            source: one source, or a list of sources mixed evenly (see the class docstring).
            num_windows, seq_len: how many windows of how many tokens.
            seed: which windows are cut from a text, and the sampling of ``generated``.
            batch_size: windows per batch of the dataloaders.
            text_field, split: the field of ``.jsonl`` records and the split of hub datasets.
            generation: sampling settings of ``generated`` (``None``: :class:`Generation`'s defaults).
            cache_dir: where ``generated`` windows are cached (``None``: ``$HYWIA_CACHE`` or
                ``~/.cache/hywia_lightning``, next to the converted bundled model).
        """
        super().__init__()
        sources = source_list(source, generation)
        if len(sources) > num_windows:
            raise ValueError(f"source={source!r}: give one source, or a list of 1..num_windows={num_windows} sources to mix")
        self.source, self.sources = source, sources
        self.num_windows, self.seq_len, self.seed = num_windows, seq_len, seed
        self.batch_size, self.text_field, self.split = batch_size, text_field, split
        self.generation = generation or Generation()
        self.cache_dir = cache_dir
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.model: PreTrainedModel | None = None
        self.collective: Collective | None = None
        self.generated: dict | None = None  # how the generated windows were obtained (cache file, seconds)
        self._windows: Tensor | None = None
        self._held_out: dict[int, Tensor] = {}
        self.key = "calibration.source"  # how errors name the source (the stage that uses it says, in check)

    @property
    def needs_model(self) -> bool:
        return GENERATED in self.sources

    def check(self, key: str = "calibration.source") -> None:
        """Fail fast on a source that cannot be read; ``key`` names it in this and later errors."""
        self.key = key
        for source in self.sources:
            if source == GENERATED:
                continue
            try:
                check_source(source, key)
            except (FileNotFoundError, ValueError) as error:
                raise type(error)(f"{error}; for calibration also {GENERATED!r} (text the dense model samples itself)") from None

    def attach(self, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None,
               collective: Collective | None = None) -> None:
        """What building the windows needs: the tokenizer of the model being pruned; for
        ``generated`` the dense model, before any stage changes it; under several processes the
        ranks' ``collective``: with ``generated`` rank 0 builds the windows (samples them, or reads
        the cache) and broadcasts them, so every rank has the same windows and only one writes the
        cache (a text source is cut identically on every rank)."""
        if tokenizer is not self.tokenizer or (self.needs_model and model is not self.model):
            self._windows, self._held_out = None, {}
        self.tokenizer, self.model, self.collective = tokenizer, model, collective

    def setup(self, stage: str) -> None:
        """As the job's ``data`` (``validate``/``test`` with no pruning stage to attach it): take the
        tokenizer and model of the job's module when none is attached."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if self.tokenizer is None and getattr(module, "tokenizer", None) is not None:
            self.attach(module.tokenizer, getattr(module, "model", None))

    def windows(self) -> Tensor:
        """``[num_windows, seq_len]`` token ids (built once, then kept)."""
        if self._windows is None:
            self._windows = self._shared(self._build)
        return self._windows

    def held_out_windows(self, count: int) -> Tensor:
        """``[count, seq_len]`` further windows of the same sources, disjoint from :meth:`windows`:
        from a text the last ``count`` windows of the seed's order (the same whatever
        ``num_windows``), from ``generated`` other samples (seed + ``HELD_OUT_SEED``). What a choice
        is judged on without the text it was fitted to."""
        if count not in self._held_out:
            self._held_out[count] = self._shared(lambda: self._build(count, held_out=True))
        return self._held_out[count]

    def _shared(self, build):
        """``build()``, on every rank alike: with ``generated`` rank 0 builds (samples, or reads the
        cache) and broadcasts (a text source is cut identically on every rank)."""
        if self.tokenizer is None:
            raise RuntimeError("CalibrationData needs a tokenizer: call attach(tokenizer, model) first")
        collective = self.collective
        if collective is None or collective.world_size == 1 or not self.needs_model:
            return build()
        self._dense_model()  # refused on every rank alike, before any rank waits for rank 0
        built, generated = collective.broadcast((build(), self.generated) if collective.rank == 0 else None)
        self.generated = self.generated or generated
        return built

    def _build(self, count: int | None = None, held_out: bool = False) -> Tensor:
        count = self.num_windows if count is None else count
        parts = [self._source_windows(source, n, f"{self.key}={source!r}", calibration if held_out else None)
                 for source, n, calibration in zip(self.sources, split_count(count, len(self.sources)),
                                                   split_count(self.num_windows, len(self.sources)))]
        return torch.cat(parts)

    def _source_windows(self, source: str, count: int, name: str, held_out_after: int | None = None) -> Tensor:
        if source == GENERATED:
            return self._generated(count, self.seed + (HELD_OUT_SEED if held_out_after is not None else 0))
        ids = token_ids(self.tokenizer, read_text(source, self.key, self.text_field, self.split))
        return token_windows(ids, count, self.seq_len, self.seed, name, held_out_after)

    def _dense_model(self) -> PreTrainedModel:
        model = self.model
        if model is None:
            raise RuntimeError(f"{self.key}={GENERATED!r} samples from the dense model: call attach(tokenizer, model) first")
        if getattr(model.config, "layer_intermediate_size", None) is not None:
            raise RuntimeError(
                f"{self.key}={GENERATED!r} samples from the dense model, but this model is already pruned "
                "(its config has per-layer widths): build the windows before pruning, use a text, "
                "or (in a recovery job) name the dense model in model.init_args.teacher"
            )
        return model

    def _generated(self, count: int, seed: int) -> Tensor:
        model = self._dense_model()
        key = generation_key(model.name_or_path, count, self.seq_len, seed, self.generation)
        windows, generated = cached_generation(
            key, lambda: sample_windows(model, self.tokenizer, count, self.seq_len, seed, self.generation), self.cache_dir)
        if seed == self.seed:
            self.generated = generated  # the report describes the calibration windows' sampling
        return windows

    def describe(self) -> dict:
        described = {"source": self.source, "num_windows": self.num_windows, "seq_len": self.seq_len, "seed": self.seed}
        if self.needs_model:
            described["generation"] = {**self.generation.describe(), **(self.generated or {})}
        return described

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.windows()), batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """The same windows, so ``validate`` measures the model's language-model loss on them
        (``limit_val_batches`` bounds how many batches)."""
        return self.train_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.train_dataloader()
