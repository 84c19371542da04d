"""Run a function on N local ranks (forked processes, one process group) and collect what each
returns.

Fork, not spawn: children inherit the imported libraries, so 4 gloo ranks start in well under a
second.
"""

from __future__ import annotations

import gc
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# Extra wall time over `timeout_s` (at most `timeout_s` again), so that a hung collective fails
# inside the rank, naming the collective, before the parent kills everything.
_GRACE_S = 5.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    out_dir: str,
    args: tuple,
    kwargs: dict,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group(
        backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
    )
    result = fn(rank, world_size, *args, **kwargs)
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout_s: float = 120,
    backend: str = "gloo",
    **kwargs: Any,
) -> list[Any]:
    """Run `fn(rank, world_size, *args, **kwargs)` on `world_size` forked ranks; return the results
    by rank.

    A rank's exception is re-raised here with its traceback
    (`torch.multiprocessing.ProcessRaisedException`); ranks still running after `timeout_s` (plus a
    short grace) are killed and `TimeoutError` is raised.
    """
    # Garbage from earlier work in this process (a process group left in a reference cycle by a run
    # of the trainer) must be freed here: freed in a forked child, a gloo group's destructor joins
    # threads that exist only in the parent, and hangs.
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="run_distributed_") as out_dir:
        context = mp.start_processes(
            _worker,
            args=(fn, world_size, _free_port(), backend, timeout_s, out_dir, args, kwargs),
            nprocs=world_size,
            join=False,
            start_method="fork",
        )
        grace = min(_GRACE_S, timeout_s)
        deadline = time.monotonic() + timeout_s + grace
        try:
            while not context.join(timeout=max(0.0, deadline - time.monotonic())):
                if time.monotonic() >= deadline:
                    name = getattr(fn, "__qualname__", repr(fn))
                    raise TimeoutError(
                        f"run_distributed: {name} on {world_size} ranks did not finish within "
                        f"timeout_s={timeout_s} s (+{grace:g} s grace); the ranks were killed."
                    )
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
                process.join()
        results = []
        for rank in range(world_size):
            with open(os.path.join(out_dir, f"rank{rank}.pkl"), "rb") as f:
                results.append(pickle.load(f))
        return results
