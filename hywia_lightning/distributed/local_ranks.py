"""Run a function on N processes of this machine joined by a process group (gloo on CPUs, NCCL on GPUs, one
each), without a Trainer.

Why: the sharded accumulators' evidence (tests/test_sharded_estimation.py,
scripts/benchmark_sharded_estimation.py) runs the library on several ranks of plain
``torch.distributed``, and a rank that fails must not leave the others waiting forever: every
collective times out (``COLLECTIVE_TIMEOUT``), the processes are joined with a deadline and killed
past it, and a rank that fails makes the run fail (its traceback is on stderr).
"""

from __future__ import annotations

import datetime
import multiprocessing
import os
import socket
from typing import Callable

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(target: Callable, rank: int, world_size: int, port: int, backend: str, args: tuple) -> None:
    os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        target(*args)
    finally:
        dist.destroy_process_group()


def run_ranks(target: Callable, world_size: int, *args, timeout: float = 180, backend: str = "gloo") -> None:
    """``target(*args)`` on every rank, one thread each (a module-level function: the ranks are
    spawned processes, which inherit this environment); ``nccl``: rank r on GPU r."""
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    processes = [context.Process(target=_rank_main, args=(target, rank, world_size, port, backend, args), daemon=True)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    try:
        for process in processes:
            process.join(max((deadline - datetime.datetime.now()).total_seconds(), 0))
    finally:
        hung = [p for p in processes if p.is_alive()]
        for process in hung:
            process.kill()
            process.join()
    if hung:
        raise AssertionError(f"{len(hung)} of {world_size} ranks still ran after {timeout} s and were killed")
    failed = {rank: p.exitcode for rank, p in enumerate(processes) if p.exitcode != 0}
    if failed:
        raise AssertionError(f"ranks exited with {failed} (their tracebacks are on stderr)")
