"""Process-group and dist-checkpointing plumbing shared by the converters and the loader."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

from .errors import ConversionError


@contextlib.contextmanager
def one_torch_thread():
    """torch's intra-op parallelism off for the duration (restored after). The converters stream:
    one thread reads and checks while another writes, so both cores are already busy, and an
    intra-op parallel region (the NaN/Inf check's ``aminmax``) waits at its barrier for a thread
    the writer has pushed off its core. Measured on a 3.15 GB export (2 cores): the check took
    2.3-2.6 s with torch's 2 threads and 0.2-0.3 s with one (it runs at 16-40 GB/s alone)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def single_process_group():
    """A world-size-1 gloo group with TP=PP=1 for the duration (the converters run on one process,
    on CPU, also on a CUDA host). Reuses an existing world-size-1 group; refuses a larger one."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from ..parallel import destroy_parallel, initialize_parallel

    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise ConversionError("the converters run on one process; found a larger process group")
        sizes = None
        if parallel_state.model_parallel_is_initialized():
            sizes = (parallel_state.get_tensor_model_parallel_world_size(),
                     parallel_state.get_pipeline_model_parallel_world_size())
        if sizes != (1, 1):
            initialize_parallel(1, 1)
        yield
        return
    dist.init_process_group("gloo", init_method=private_init_method(), rank=0, world_size=1)
    try:
        initialize_parallel(1, 1)
        yield
    finally:
        destroy_parallel()


def private_init_method() -> str:
    """A ``file://`` rendezvous in a fresh temporary directory (removed at exit): a one-process
    group that cannot collide with another job's TCP port."""
    d = tempfile.mkdtemp(prefix="nbdiff-pg-")
    atexit.register(shutil.rmtree, d, True)
    return f"file://{os.path.join(d, 'store')}"


def quiet_megatron_logs() -> None:
    """megatron-core logs every checkpoint step at INFO/WARNING; the tools show tqdm instead."""
    import logging
    import warnings

    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    # a writer process logs its failure before the save raises it; the tools report the exception
    logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module=r"megatron\.")  # megatron-core, not megatron_nbdiff
    warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, message=".*TypedStorage.*")


def checkpoint_failures() -> tuple:
    """What a torch_dist read or write can fail with: any ``Exception`` and torch's
    ``CheckpointException``, which is a ``BaseException``."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def find_in(exc: BaseException, match):
    """The first exception in ``exc``, its causes and contexts, and the per-rank failures a
    ``CheckpointException`` carries, for which ``match(e)`` holds (None when there is none)."""
    seen, stack = set(), [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if match(e):
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict):
            stack += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
    return None


def os_error_in(exc: BaseException):
    """The first ``OSError`` with an errno inside ``exc`` (:func:`find_in`), or None."""
    return find_in(exc, lambda e: isinstance(e, OSError) and e.errno is not None)


def raise_write_failure(exc: BaseException, path: str) -> None:
    """Turn a failed ``dist_checkpointing.save`` into an ``OSError``: the one inside it (a full
    disk reported through megatron's writer processes), or, for torch's ``CheckpointException``
    (a writer failed; torch's zip writer reports a short write as a ``RuntimeError``), an
    ``EIO`` naming the writer's failure. Returns for any other exception (a bug: re-raise it)."""
    import errno

    from torch.distributed.checkpoint.api import CheckpointException

    err = os_error_in(exc)
    if err is not None:
        raise OSError(err.errno, f"cannot write the checkpoint: {err.strerror}", err.filename or path) from None
    if isinstance(exc, CheckpointException):
        raise OSError(errno.EIO, f"cannot write the checkpoint ({describe_failure(exc)})", path) from None


def describe_failure(exc: BaseException) -> str:
    """One line for a failed torch_dist read: the first rank's exception inside a
    ``CheckpointException`` (whose own text is a traceback), or the first line of ``exc``."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        first = next(iter(failures.values()))
        exc = first[0] if isinstance(first, tuple) else first
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
