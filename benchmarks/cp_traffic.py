"""Context-parallel traffic per layer: what the block-diffusion attention sends under CP for the
dual layout, against a generic context parallelism that all-gathers the keys and values of the
whole ``[x_t ; x_0]`` sequence.

    python benchmarks/cp_traffic.py                         # CP=2, a Llama-8B-shaped layer
    python benchmarks/cp_traffic.py --cp 4 --seq-len 4096 --query-groups 8 --head-dim 128

Each of ``--cp`` gloo processes (CPU) runs one forward and backward of one layer's core attention
(:func:`megatron_nbdiff.attention.context_parallel.cp_attention`, dense backend, fp32 tensors;
the bytes are then scaled to ``--dtype``) on its share of the positions, with
``torch.distributed``'s collectives wrapped to count the payload each rank puts on the wire in a
ring implementation: an all-gather of a ``n``-byte local part sends ``(cp - 1) n``, a
reduce-scatter of ``cp`` parts of ``n`` bytes sends ``(cp - 1) n``, an all-reduce of ``n`` bytes
``2 (cp - 1) n / cp``. gloo has no reduce-scatter, so the backward pass sums the gathered
gradients with an all-reduce and slices them: both what it sent and what NCCL's reduce-scatter
sends for the same exchange are reported.

- ``dual``: the project's CP: the clean stream's keys and values (``L`` positions) are gathered
  in the forward pass and their gradients reduce-scattered in the backward pass; the noisy
  stream never leaves its rank.
- ``generic``: the same exchange for the keys and values of both streams (``2L`` positions), what
  a CP that treats ``[x_t ; x_0]`` as one sequence must move (megatron's ring attention with
  Transformer Engine sends ``2L`` positions' keys and values around the ring too).

The script also prints the bytes computed from the shapes, and checks that they equal the
counted ones.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512, help="L, tokens per stream (default 512)")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4, help="query heads of this rank (default 4)")
    p.add_argument("--query-groups", type=int, default=2, help="key/value heads of this rank (default 2)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="bytes per value to report")
    p.add_argument("--port", type=int, default=29611)
    return p.parse_args(argv)


class Counter:
    """Wraps the collectives ``cp_attention`` uses; ``sent`` holds fp32 bytes by label."""

    def __init__(self, cp: int):
        self.cp, self.sent, self.label = cp, {}, None
        self.real = (dist.all_gather, dist.all_reduce, dist.reduce_scatter)

    def _add(self, what: str, nbytes: float) -> None:
        key = (self.label, what)
        self.sent[key] = self.sent.get(key, 0.0) + nbytes

    def install(self) -> None:
        all_gather, all_reduce, _ = self.real
        cp = self.cp

        def counting_all_gather(parts, tensor, *args, **kwargs):
            self._add("forward all-gather", (cp - 1) * tensor.numel() * tensor.element_size())
            return all_gather(parts, tensor, *args, **kwargs)

        def counting_all_reduce(tensor, *args, **kwargs):
            n = tensor.numel() * tensor.element_size()
            self._add("backward all-reduce (gloo)", 2 * (cp - 1) * n / cp)
            self._add("backward reduce-scatter (NCCL)", (cp - 1) * n / cp)
            return all_reduce(tensor, *args, **kwargs)

        dist.all_gather, dist.all_reduce = counting_all_gather, counting_all_reduce


def worker(rank: int, args) -> None:
    from megatron_nbdiff.attention.context_parallel import cp_attention, gather_stream, local_positions
    from megatron_nbdiff.attention.masks import MaskSpec

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=rank, world_size=args.cp)
    cp, L = args.cp, args.seq_len
    spec = MaskSpec("dual_context_causal", L, args.block)
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, d = args.batch, args.heads, args.query_groups, args.head_dim
    local = 2 * len(local_positions(L, cp, rank))
    q = torch.randn(b, hq, local, d, generator=g, requires_grad=True)
    k = torch.randn(b, hkv, local, d, generator=g, requires_grad=True)
    v = torch.randn(b, hkv, local, d, generator=g, requires_grad=True)
    counter = Counter(cp)
    counter.install()
    counter.label = "dual"
    cp_attention(q, k, v, spec, dist.group.WORLD).sum().backward()
    counter.label = "generic"  # the same exchange for both streams' keys and values
    for t in (k, v):
        gather_stream(t.detach().clone().requires_grad_(), dist.group.WORLD).sum().backward()
    if rank == 0:
        report(args, counter.sent)
    dist.barrier()
    dist.destroy_process_group()


def report(args, sent: dict) -> None:
    scale = DTYPE_BYTES[args.dtype] / 4  # counted on fp32 tensors
    cp, L, b, g, d = args.cp, args.seq_len, args.batch, args.query_groups, args.head_dim
    kv_stream = 2 * L * b * g * d * DTYPE_BYTES[args.dtype]  # keys and values of one stream of L positions
    expected = {"dual": kv_stream * (cp - 1) / cp, "generic": 2 * kv_stream * (cp - 1) / cp}
    print(f"CP={cp}, L={L} per stream (dual attention over {2 * L}), batch {b}, {g} key/value heads x {d} on this "
          f"rank, {args.dtype}; bytes each rank sends per layer (ring collectives)")
    print(f"{'layout':<8} {'forward all-gather':>20} {'backward (NCCL RS)':>20} {'backward (gloo AR)':>20} "
          f"{'total (NCCL)':>14} {'from shapes':>14}")
    totals = {}
    for label in ("dual", "generic"):
        fwd = sent.get((label, "forward all-gather"), 0.0) * scale
        rs = sent.get((label, "backward reduce-scatter (NCCL)"), 0.0) * scale
        ar = sent.get((label, "backward all-reduce (gloo)"), 0.0) * scale
        totals[label] = fwd + rs
        print(f"{label:<8} {fwd / 2**20:>17.2f} MiB {rs / 2**20:>17.2f} MiB {ar / 2**20:>17.2f} MiB "
              f"{totals[label] / 2**20:>11.2f} MiB {2 * expected[label] / 2**20:>11.2f} MiB")
        assert abs(fwd - expected[label]) <= 1e-6 * expected[label], (label, fwd, expected[label])
        assert abs(rs - expected[label]) <= 1e-6 * expected[label], (label, rs, expected[label])
    print(f"dual / generic: {totals['dual'] / totals['generic']:.2f}")


def main(argv=None) -> int:
    args = _parse(argv)
    if args.cp < 2:
        print("error: --cp must be >= 2", file=sys.stderr)
        return 2
    if args.seq_len % (2 * args.cp * args.block) != 0:
        print(f"error: --seq-len {args.seq_len} must be a multiple of 2 x cp x block = {2 * args.cp * args.block}",
              file=sys.stderr)
        return 2
    mp.spawn(worker, args=(args,), nprocs=args.cp, join=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
