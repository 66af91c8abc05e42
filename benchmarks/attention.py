"""Dual-stream context-causal attention: FlexAttention against dense SDPA and causal SDPA.

All variants are measured in one run on the same inputs ``[b, heads, 2L, head_dim]``:

* ``flex split``   the project's flex backend (noisy queries through a sparse BlockMask over
                   ``[noisy ; clean]`` keys, clean queries through causal SDPA);
* ``flex single``  one FlexAttention call over all ``2L`` queries (the naive baseline);
* ``dense sdpa``   SDPA with the boolean ``2L x 2L`` mask (the CPU reference backend);
* ``causal sdpa``  causal SDPA (flash on GPU) over ``2L`` tokens: the speed yardstick.

TFLOP/s count only allowed (q, k) pairs: forward ``4 * pairs * d * heads``, backward 2.5x the
forward (five matmuls against two). Times are medians of ``--repeats`` runs after warm-up.
On CUDA each run is forward + backward; on CPU FlexAttention has no backward, so every variant
runs forward only (and the default size is small).

    python benchmarks/attention.py                    # GPU: L=4096, B=32, 32 heads of 128, bf16
    python benchmarks/attention.py --device cpu       # CPU: small size, forward only
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

from megatron_nbdiff.attention import MaskSpec
from megatron_nbdiff.attention.core_attention import _flex, block_diffusion_attention, configure_flex
from megatron_nbdiff.attention.flex import block_mask_for
from megatron_nbdiff.attention.masks import dense_allowed_from_spec


def allowed_pairs(spec: MaskSpec, device) -> int:
    """Number of allowed (q, k) pairs, counted on the dense mask derived from the predicate."""
    return int(dense_allowed_from_spec(spec, device=device).sum().item())


def timed(fn, repeats: int, backward: bool, device: str) -> tuple[float, int]:
    """Median seconds per call and peak extra memory (bytes) of ``fn``."""
    def once():
        out = fn()
        if backward:
            out.backward(torch.ones_like(out))
        return out

    for _ in range(2):
        once()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            once()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else 0
    return statistics.median(times), peak


# FlexAttention settings tried by --sweep: (label, kernel_options, torch.compile mode)
SWEEP = [
    ("tma", {"USE_TMA": True}, None),
    ("fwd128x64", {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3}, None),
    ("autotune", None, "max-autotune-no-cudagraphs"),
]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-len", type=int, default=None, help="L per stream (GPU 4096, CPU 512)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--heads", type=int, default=None, help="GPU 32, CPU 4")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=None, help="GPU 20, CPU 5")
    p.add_argument("--skip-dense", action="store_true", help="skip the O(L^2)-memory dense variant")
    p.add_argument("--sweep", action="store_true",
                   help="GPU: also time the flex variants under other kernel options / compile modes")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    L = args.seq_len or (4096 if gpu else 512)
    heads = args.heads or (32 if gpu else 4)
    repeats = args.repeats or (20 if gpu else 5)
    dtype = torch.bfloat16 if gpu else torch.float32
    backward = gpu
    spec = MaskSpec("dual_context_causal", L, args.block_size)
    S = 2 * L
    torch.manual_seed(0)
    shape = (args.batch, heads, S, args.head_dim)
    q, k, v = (torch.randn(shape, device=args.device, dtype=dtype, requires_grad=backward) for _ in range(3))
    scale = args.head_dim ** -0.5

    pairs_mask = allowed_pairs(spec, args.device)
    pairs_causal = S * (S + 1) // 2
    block_mask_for(spec, "noisy", device=args.device)  # build (and cache) outside the timing
    single_bm = block_mask_for(spec, "full", device=args.device)

    variants = [
        ("flex split", lambda: block_diffusion_attention(q, k, v, spec, None, "flex", scale), pairs_mask),
        ("flex single", lambda: _flex(q, k, v, single_bm, scale), pairs_mask),
    ]
    if not args.skip_dense:
        variants.append(
            ("dense sdpa", lambda: block_diffusion_attention(q, k, v, spec, None, "dense", scale), pairs_mask)
        )
    variants.append(
        ("causal sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale), pairs_causal)
    )

    flops_per_pair = 4 * args.head_dim * heads * args.batch * (3.5 if backward else 1.0)
    rows = []
    for name, fn, pairs in variants:
        sec, peak = timed(fn, repeats, backward, args.device)
        rows.append((name, sec, pairs * flops_per_pair / sec / 1e12, peak))
    if args.sweep and gpu:
        for label, options, mode in SWEEP:
            try:
                configure_flex(options, mode)
                for name, fn, pairs in variants[:2]:
                    sec, peak = timed(fn, repeats, backward, args.device)
                    rows.append((f"{name} {label}", sec, pairs * flops_per_pair / sec / 1e12, peak))
            except Exception as exc:  # an option this torch does not take: report, go on
                print(f"sweep {label}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        configure_flex()
    ref = next(r for r in rows if r[0] == "causal sdpa")
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"# dual_context_causal attention, {name}, {datetime.date.today()}")
    print(f"# L={L} (2L={S}), B={args.block_size}, batch={args.batch}, {heads} heads x {args.head_dim}, "
          f"{str(dtype).replace('torch.', '')}, {'fwd+bwd' if backward else 'fwd only'}, "
          f"median of {repeats}; allowed pairs {pairs_mask:,} vs causal {pairs_causal:,}")
    print(f"{'variant':<23} {'ms':>9} {'TFLOP/s':>9} {'vs causal':>10} {'peak MiB':>9}")
    for name, sec, tflops, peak in rows:
        print(f"{name:<23} {sec * 1e3:>9.3f} {tflops:>9.2f} {tflops / ref[2]:>9.2f}x {peak / 2**20:>9.1f}")


if __name__ == "__main__":
    main()
