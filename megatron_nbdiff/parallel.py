"""Process-group set-up for one process (tests, quick runs) or many (torchrun, Slurm)."""
from __future__ import annotations

import os
from typing import Optional

import torch
import torch.distributed as dist

from . import compat
from .errors import ConfigError


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_parallel_sizes(model, tp: int = 1, pp: int = 1, cp: int = 1, ep: int = 1,
                         world_size: Optional[int] = None) -> None:
    """The one check of a parallel layout against a model (a ModelConfig) and a world size:
    TP divides the attention heads and the query groups, PP divides the layers, EP (expert
    parallelism) divides the experts of a MoE model (and is 1 for a dense one), and TP x PP x CP
    divides the world (the rest is data parallelism); EP must divide the data-parallel size
    (megatron's expert groups are carved from it). Raises ConfigError naming the sizes."""
    for name, value in (("tensor", tp), ("pipeline", pp), ("context", cp), ("expert", ep)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} parallel size must be a positive int, found {value!r}")
    experts = getattr(model, "num_experts", None)  # a ModelConfig; None: a dense model
    if ep > 1 and experts is None:
        raise ConfigError(f"expert parallel size {ep} needs a mixture-of-experts model; this one is dense")
    if experts is not None and experts % ep != 0:
        raise ConfigError(f"expert parallel size {ep} does not divide num_experts={experts}")
    if model.num_attention_heads % tp != 0:
        raise ConfigError(f"tensor parallel size {tp} does not divide num_attention_heads={model.num_attention_heads}")
    if model.num_query_groups % tp != 0:
        raise ConfigError(f"tensor parallel size {tp} does not divide num_query_groups={model.num_query_groups}")
    if model.num_layers % pp != 0:
        raise ConfigError(f"pipeline parallel size {pp} does not divide num_layers={model.num_layers}")
    if world_size is not None:
        if world_size % (tp * pp * cp) != 0:
            raise ConfigError(
                f"world size {world_size} is not divisible by tensor {tp} x pipeline {pp} x context {cp} parallel"
            )
        dp = world_size // (tp * pp * cp)
        if dp % ep != 0:
            raise ConfigError(f"expert parallel size {ep} does not divide the data-parallel size {dp}")


def initialize_parallel(
    tp: int = 1,
    pp: int = 1,
    *,
    init_method: Optional[str] = None,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    seed: int = 1234,
    ep: int = 1,
    cp: int = 1,
    vpp: int = 1,
) -> None:
    """Initialise torch.distributed (NCCL with CUDA, gloo without) and megatron's model-parallel
    groups, with ``ep``-way expert parallelism (megatron-core carves the expert-parallel groups
    out of the data-parallel ranks: ``tp x pp x ep`` must divide the world; expert tensor
    parallelism equals ``tp``), and ``cp``-way context parallelism (every CP rank of a data-parallel
    rank reads the same samples and holds its share of their positions:
    ``megatron_nbdiff/attention/context_parallel.py``; ``tp x cp x pp`` must divide the world).
    ``vpp`` virtual pipeline stages per pipeline rank (the interleaved schedule).
    Without ``init_method`` and outside torchrun it starts a one-process group."""
    from megatron.core import parallel_state

    compat.install()
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    if rank is None:
        rank = int(os.environ.get("RANK", "0"))
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if not isinstance(cp, int) or isinstance(cp, bool) or cp < 1:
        raise ConfigError(f"context parallel size must be a positive int, found {cp!r}")
    if world_size % (tp * pp * cp) != 0:
        raise ConfigError(
            f"world size {world_size} is not divisible by tensor parallel {tp} x pipeline parallel {pp}"
            + (f" x context parallel {cp}" if cp > 1 else "")
        )
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConfigError(f"expert parallel size must be a positive int, found {ep!r}")
    if (world_size // (tp * pp)) % ep != 0:  # megatron carves expert groups out of the DP x CP ranks
        raise ConfigError(
            f"expert parallel size {ep} does not divide world size {world_size} / (tensor parallel {tp} x "
            f"pipeline parallel {pp}) = {world_size // (tp * pp)}"
        )
    if not dist.is_initialized():
        if init_method is None and "MASTER_ADDR" not in os.environ:
            if world_size != 1:
                raise ConfigError(
                    "WORLD_SIZE > 1 but no MASTER_ADDR: launch with torchrun (or set the env:// variables)"
                )
            # a lone process: any free local port (the environment is left alone, so that
            # processes this one starts do not inherit the address)
            init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank % torch.cuda.device_count())))
        dist.init_process_group(
            backend, init_method=init_method or "env://", rank=rank, world_size=world_size
        )
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep,
        context_parallel_size=cp, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
    )
    compat.seed_model_parallel_rng(seed, parallel_state.get_tensor_model_parallel_rank())


def all_ranks_agree(ok: bool, device, group=None) -> bool:
    """True on every rank when ``ok`` is True on every rank of ``group`` (default: the world)."""
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag, group=group)
    return flag.item() == 0


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
