"""Tokens per second of causal language models, measured side by side.

Why side by side: on a shared machine the load changes from minute to minute, so models are timed
in alternation (one repetition of each, round after round) and compared by the median of their
repetitions; a ratio of two such medians is what a benchmark reports, not an absolute speed.

Only torch is needed (the GPU script loads this file by path on machines without this package).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch import nn

from ..checks import require_positive


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(
    runs: dict[str, Callable[[], None]], repeats: int, warmup: int = 1, device: torch.device | str = "cpu"
) -> dict[str, list[float]]:
    """Wall seconds of every repetition of every run, the runs alternating within each round."""
    require_positive(repeats=repeats)
    device = torch.device(device)
    for _ in range(warmup):
        for run in runs.values():
            run()
    seconds = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def forward_run(model: nn.Module, input_ids: torch.Tensor) -> Callable[[], None]:
    """One forward pass over ``input_ids`` (logits of every position, no cache), without autograd."""
    def run() -> None:
        with torch.inference_mode():
            model(input_ids=input_ids, use_cache=False)
    return run


def generate_run(model: nn.Module, input_ids: torch.Tensor, new_tokens: int) -> Callable[[], None]:
    """Greedy ``generate`` of exactly ``new_tokens`` tokens per sequence with a KV cache."""
    mask = torch.ones_like(input_ids)

    def run() -> None:
        with torch.inference_mode():
            out = model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                do_sample=False, use_cache=True, pad_token_id=0,
            )
        if out.shape[1] != input_ids.shape[1] + new_tokens:
            raise RuntimeError(f"generate made {out.shape[1] - input_ids.shape[1]} tokens, expected {new_tokens}")
    return run


def summarize(seconds: list[float], tokens: int) -> dict[str, float]:
    """Median seconds and tokens per second of one run's repetitions."""
    median = statistics.median(seconds)
    return {"median_seconds": median, "tokens_per_second": tokens / median,
            "seconds": [round(s, 5) for s in seconds], "tokens": tokens}
