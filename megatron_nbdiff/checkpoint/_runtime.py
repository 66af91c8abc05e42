"""Process-group and dist-checkpointing plumbing shared by the converters and the loader."""
from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile

from .errors import ConversionError


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
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", module="torch.distributed.checkpoint")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, message=".*TypedStorage.*")
