"""What a plan is made of: the cluster, the workload (recipe, sequence, batch) and one parallel
layout, and the enumeration of every layout the constraints allow.

Constraints (docs/plans.md): TP is a power of two within one node and divides the heads and the
query groups; PP divides the layers; VPP (> 1 only with PP > 1) divides the layers of a stage and
needs a micro-batch count that is a multiple of PP (megatron's interleaved schedule); CP splits
every stream into ``2 * cp`` chunks (megatron's load-balanced split), and for dual-stream recipes
a chunk must be a multiple of the block size (32) so that no block straddles ranks; TP x PP x CP
divides the GPUs, the rest is DP, and the global batch is a multiple of DP x micro-batch.

Mixture-of-experts models add EP, enumerated for them only: it divides the experts and the
data-parallel size, the trainer's rule (``parallel.check_parallel_sizes``; megatron-core itself
needs only ``TP x EP x PP`` to divide the world, EP dividing DP x CP); the expert-tensor-parallel
size is TP, megatron's default, which the trainer keeps. Dense models have EP 1.

Each MoE layout carries its token dispatcher (``train.moe_dispatcher``). At EP 1 it is
``allgather``, what ``auto`` runs there: the all-to-all would only add a TP gather of ``k`` copies
of each token. At EP > 1 :func:`dispatchers` offers ``alltoall`` (what ``auto`` runs) and
``allgather``, and the planner keeps the one its estimate finds faster (:mod:`.planner`): the
all-to-all sends each token's ``k`` copies to the EP ranks holding their experts, the all-gather
sends every token to every rank of the TP x EP group, so which moves less depends on ``k``
against ``ep`` and on where the group crosses nodes.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

from ..config import ModelConfig, TrainConfig, resolve_moe_dispatcher
from ..errors import ConfigError

RECOMPUTE = ("none", "selective", "full")
# what a planned ``selective`` recomputes: the run config's train.recompute_modules (megatron's
# ``mlp`` covers dense layers only; MoE layers are megatron's ``moe`` module)
SELECTIVE_MODULES = ("core_attn", "mlp")
MOE_SELECTIVE_MODULES = ("core_attn", "mlp", "moe")


def selective_modules(mc: ModelConfig) -> tuple[str, ...]:
    """``train.recompute_modules`` of a planned ``selective`` for model ``mc``."""
    return MOE_SELECTIVE_MODULES if mc.is_moe else SELECTIVE_MODULES

# recipe -> (attention layout, streams through the layers)
RECIPES = {
    "nbdiff": ("dual_context_causal", 2),
    "transplant": ("dual_context_causal", 2),
    "block_causal": ("dual_block_causal", 2),
    "diffullama": ("single_annealed", 1),
    "ar": ("causal", 1),
}

BLOCK_SIZE = 32
"""The largest block of the NBDiff curriculum: CP chunks of dual-stream recipes are multiples."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU (H100 SXM: 989)."""
    mfu: float = 0.40
    """Fraction of the peak the GPUs reach while computing (recomputation included)."""
    intra_node_gbs: float = 350.0
    """NCCL bus bandwidth inside a node, GB/s per GPU (NVLink 4 on 8xH100: about 350-370)."""
    inter_node_gbs: float = 40.0
    """NCCL bus bandwidth between nodes, GB/s per GPU (one 400 Gb/s NIC per GPU: about 40-45)."""
    reserve_gib: float = 5.0
    """Memory no estimate covers: CUDA context, NCCL buffers, allocator fragmentation."""

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class Workload:
    recipe: str
    seq_len: int
    """Stream length L."""
    global_batch: int
    """Sequences per optimizer step."""

    @property
    def layout(self) -> str:
        return RECIPES[self.recipe][0]

    @property
    def streams(self) -> int:
        return RECIPES[self.recipe][1]

    @property
    def dual(self) -> bool:
        return self.streams == 2


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    vpp: int
    cp: int
    dp: int
    mbs: int
    recompute: str
    ep: int = 1
    """Expert-parallel size (mixture-of-experts models; carved out of the DP ranks)."""
    dispatcher: str = "allgather"
    """megatron's MoE token dispatcher, ``train.moe_dispatcher`` (:func:`dispatchers`); without
    MoE layers it moves nothing."""

    def microbatches(self, work: Workload) -> int:
        return work.global_batch // (self.dp * self.mbs)

    def unsupported(self) -> list[str]:
        """The ``train.*`` fields this layout needs that the trainer's TrainConfig lacks today."""
        have = {f.name for f in dataclasses.fields(TrainConfig)}
        need = []
        if self.cp > 1 and "cp" not in have:
            need.append("cp")
        if self.vpp > 1 and "vpp" not in have:
            need.append("vpp")
        if self.recompute != "none" and "recompute" not in have:
            need.append("recompute")
        if self.ep > 1 and "ep" not in have:
            need.append("ep")
        return need

    def label(self) -> str:
        return (f"tp{self.tp} pp{self.pp}" + (f" vpp{self.vpp}" if self.vpp > 1 else "")
                + f" cp{self.cp}" + (f" ep{self.ep} {self.dispatcher}" if self.ep > 1 else "")
                + f" dp{self.dp} mbs{self.mbs} rc={self.recompute}")


def check_workload(mc: ModelConfig, work: Workload, cluster: Cluster) -> None:
    """Refuse inputs no layout can satisfy (one line naming the value)."""
    if work.recipe not in RECIPES:
        raise ConfigError(f"unknown recipe {work.recipe!r}; the planner knows {', '.join(RECIPES)}")
    for name, value in (("--seq-len", work.seq_len), ("--global-batch", work.global_batch),
                        ("--nodes", cluster.nodes), ("--gpus-per-node", cluster.gpus_per_node)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, found {value}")
    if cluster.gpu_memory_gib <= cluster.reserve_gib:
        raise ConfigError(f"--gpu-memory-gib {cluster.gpu_memory_gib} leaves nothing after the "
                          f"reserve of {cluster.reserve_gib} GiB (--reserve-gib)")
    if not 0 < cluster.mfu <= 1:
        raise ConfigError(f"--mfu must be in (0, 1], found {cluster.mfu}")
    if work.dual and work.seq_len % BLOCK_SIZE != 0:
        raise ConfigError(f"--seq-len {work.seq_len} is not a multiple of the block size {BLOCK_SIZE} "
                          f"that recipe {work.recipe!r} reaches")


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def cp_allowed(work: Workload, cp: int) -> bool:
    """A stream splits into ``2 * cp`` equal chunks; dual-stream chunks are whole blocks."""
    if work.seq_len % (2 * cp) != 0:
        return cp == 1
    chunk = work.seq_len // (2 * cp)
    return cp == 1 or not work.dual or chunk % BLOCK_SIZE == 0


def expert_parallel_sizes(mc: ModelConfig, dp: int) -> list[int]:
    """The EP sizes of a layout with data-parallel size ``dp``: divisors of the experts that
    divide ``dp`` (1 alone for a dense model)."""
    if not mc.is_moe:
        return [1]
    return [ep for ep in range(1, min(mc.num_experts, dp) + 1) if mc.num_experts % ep == 0 and dp % ep == 0]


def dispatchers(mc: ModelConfig, ep: int) -> tuple[str, ...]:
    """The token dispatchers a layout at EP ``ep`` is planned with, the one ``train.moe_dispatcher:
    auto`` runs first: ``alltoall`` and ``allgather`` for a MoE model at EP > 1, else ``allgather``
    alone (a dense model's layouts move no tokens)."""
    if ep == 1 or not mc.is_moe:
        return ("allgather",)
    auto = resolve_moe_dispatcher("auto", ep)
    return (auto,) + tuple(d for d in ("alltoall", "allgather") if d != auto)


def enumerate_layouts(mc: ModelConfig, work: Workload, cluster: Cluster,
                      max_micro_batch: int = 8, max_vpp: int = 4) -> Iterator[Layout]:
    """Every layout the constraints of the module docstring allow."""
    world = cluster.world
    for tp in _powers_of_two(cluster.gpus_per_node):
        if mc.num_attention_heads % tp or mc.num_query_groups % tp:
            continue
        for pp in range(1, mc.num_layers + 1):
            if mc.num_layers % pp or world % (tp * pp):
                continue
            for cp in _powers_of_two(world // (tp * pp)):
                if world % (tp * pp * cp) or not cp_allowed(work, cp):
                    continue
                dp = world // (tp * pp * cp)
                if work.global_batch % dp:
                    continue
                per_rank = work.global_batch // dp
                for mbs in _powers_of_two(min(max_micro_batch, per_rank)):
                    if per_rank % mbs:
                        continue
                    m = per_rank // mbs
                    for vpp in ([1] if pp == 1 else _powers_of_two(max_vpp)):
                        if (mc.num_layers // pp) % vpp or (vpp > 1 and m % pp):
                            continue
                        for rc in RECOMPUTE:
                            for ep in expert_parallel_sizes(mc, dp):
                                yield Layout(tp, pp, vpp, cp, dp, mbs, rc, ep, dispatchers(mc, ep)[0])
