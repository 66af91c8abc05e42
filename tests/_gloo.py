"""The one helper that runs a function on a small gloo world of CPU processes.

``run_world(module, name, out_dir, world=2, init=True, **kwargs)`` spawns ``world`` processes;
each imports ``module`` (a test-helper module importable by name), optionally initialises
torch.distributed and megatron's parallel state on a free local port (TP=PP=1; the worker may
re-initialise its own layout), calls ``module.name(rank, **kwargs)`` (with ``port=`` and
``world=`` too when ``init=False``) and saves the result; the parent returns each rank's result.
A worker's traceback is written beside the results and re-raised by ``torch.multiprocessing``.
Results are loaded with ``weights_only=True``: workers return tensors, lists, dicts and numbers.
"""
from __future__ import annotations

import importlib
import os
import socket
import traceback

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, module, name, out_dir, init, kwargs):
    from megatron_nbdiff.parallel import destroy_parallel, initialize_parallel

    try:
        fn = getattr(importlib.import_module(module), name)
        if init:
            initialize_parallel(1, 1, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
            result = fn(rank, **kwargs)
        else:
            result = fn(rank, world=world, port=port, **kwargs)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except Exception:  # noqa: BLE001 - reported to the parent through a file
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        destroy_parallel()


def run_world(module: str, name: str, out_dir: str, world: int = 2, init: bool = True, **kwargs) -> list:
    """Run ``module.name`` on ``world`` gloo processes; return each rank's result."""
    os.makedirs(out_dir, exist_ok=True)
    mp.spawn(_entry, args=(world, free_port(), module, name, out_dir, init, kwargs), nprocs=world, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world)]
