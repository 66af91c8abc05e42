"""Benchmark of the fused masking-noise kernel (megatron_nbdiff.noise.mask_tokens).

One run measures, on one device:

1. the fused kernel (CUDA on a GPU, C++ on the CPU) against the unfused pure-torch reference on
   the same device, at ``--rows x --cols`` tokens (default 64 x 8192): median time and ratio;
2. the fused kernel against a copy of an equal number of bytes at ``--bw-rows x --cols``
   tokens (default 1024 x 8192). The kernel reads tokens and the bool loss mask and writes the
   noisy ids, the mask flags, t and the weight; its traffic is those bytes read plus written.
   The baseline copies half that many bytes (a read and a write of each, so the same traffic)
   with ``torch.Tensor.clone``, which, like the kernel, allocates its output; ``copy_`` into a
   preallocated buffer is shown as well. Reported: achieved GB/s and the fraction of the copy's.

Times are medians of ``--repeats`` timed runs after warm-up; CUDA runs are timed with CUDA
events (``--inner`` back-to-back calls per event pair), CPU runs with ``time.perf_counter``.
Identity of the two implementations' outputs is checked before timing.

Usage::

    python benchmarks/noise.py                      # CUDA when available, else CPU
    python benchmarks/noise.py --device cpu --rows 64 --cols 8192 --bw-rows 256 --repeats 9
    python benchmarks/noise.py --device cpu --threads 1 --dtype int32
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from typing import Callable

import torch

from megatron_nbdiff.noise import available_backends, mask_tokens


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=64, help="rows for the fused-vs-reference comparison")
    parser.add_argument("--cols", type=int, default=8192, help="tokens per row (both measurements)")
    parser.add_argument("--bw-rows", type=int, default=1024, help="rows for the bandwidth measurement")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--inner", type=int, default=10, help="calls per CUDA event pair")
    parser.add_argument("--dtype", choices=["int64", "int32"], default="int64", help="token dtype")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--t-sampling", choices=["uniform", "antithetic", "stratified"], default="uniform")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's")
    return parser.parse_args()


def _median_seconds(fn: Callable[[], object], device: str, repeats: int, warmup: int, inner: int) -> float:
    """Median over ``repeats`` of the time of one call of ``fn``."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            fn()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def _inputs(rows: int, cols: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 150_000, (rows, cols), generator=gen, dtype=torch.int64).to(dtype)
    loss_mask = torch.ones(rows, cols, dtype=torch.bool)
    loss_mask[:, : cols // 8] = False  # a prompt without loss
    return tokens.to(device), loss_mask.to(device)


def _kernel_bytes(rows: int, cols: int, itemsize: int) -> int:
    """Bytes read plus written by one call: tokens + loss mask + sample indices in; noisy ids +
    mask flags + t + weight out."""
    per_token = itemsize + 1 + itemsize + 1 + 4 + 4
    return rows * cols * per_token + rows * 8


def main() -> None:
    args = _parse()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    fused = "cuda" if device == "cuda" else "cpp"
    if fused not in available_backends():
        raise SystemExit(f"the {fused} kernel is not built: pip install --no-build-isolation -e .")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    sample_index: dict = {}

    def call(tokens: torch.Tensor, loss_mask: torch.Tensor, backend: str):
        # sample indices already on the device, as the trainer passes them: an int here would
        # add a host-to-device copy to every call and time the wrapper, not the kernel
        if sample_index.get(tokens.shape[0]) is None:
            sample_index[tokens.shape[0]] = torch.arange(tokens.shape[0], device=tokens.device)
        return mask_tokens(
            tokens, block_size=args.block_size, mask_token_id=150_000, seed=1234, step=7,
            sample_index=sample_index[tokens.shape[0]],
            loss_mask=loss_mask, t_sampling=args.t_sampling, backend=backend, validate=False,
        )  # fmt: skip

    def timed(fn: Callable[[], object]) -> float:
        return _median_seconds(fn, device, args.repeats, args.warmup, args.inner)

    rows_out = []  # (what, shape, seconds, bytes, note)

    # 1. Fused kernel vs the unfused torch reference.
    tokens, loss_mask = _inputs(args.rows, args.cols, dtype, device)
    ref_out, fused_out = call(tokens, loss_mask, "torch"), call(tokens, loss_mask, fused)
    assert all(torch.equal(a, b) for a, b in zip(ref_out, fused_out)), "fused kernel differs from the reference"
    nbytes = _kernel_bytes(args.rows, args.cols, itemsize)
    shape = f"{args.rows}x{args.cols}"
    t_ref = timed(lambda: call(tokens, loss_mask, "torch"))
    t_fused = timed(lambda: call(tokens, loss_mask, fused))
    rows_out.append(("torch reference (unfused)", shape, t_ref, nbytes, "1.00x"))
    rows_out.append((f"fused {fused} kernel", shape, t_fused, nbytes, f"{t_ref / t_fused:.2f}x faster"))
    del tokens, loss_mask, ref_out, fused_out

    # 2. Fused kernel vs a copy of the same traffic.
    tokens, loss_mask = _inputs(args.bw_rows, args.cols, dtype, device)
    nbytes = _kernel_bytes(args.bw_rows, args.cols, itemsize)
    shape = f"{args.bw_rows}x{args.cols}"
    src = torch.randint(0, 255, (nbytes // 2,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t_clone = timed(lambda: src.clone())
    t_copy = timed(lambda: dst.copy_(src))
    t_bw = timed(lambda: call(tokens, loss_mask, fused))
    copy_bytes = 2 * (nbytes // 2)
    rows_out.append(("copy, equal bytes (clone)", shape, t_clone, copy_bytes, "1.00 of copy"))
    rows_out.append(("copy_ into preallocated", shape, t_copy, copy_bytes, f"{t_clone / t_copy:.2f} of copy"))
    fraction = (nbytes / t_bw) / (copy_bytes / t_clone)
    rows_out.append((f"fused {fused} kernel", shape, t_bw, nbytes, f"{fraction:.2f} of copy"))

    name = torch.cuda.get_device_name() if device == "cuda" else f"{platform.processor() or platform.machine()} CPU"
    print(
        f"# masking-noise kernel: {name}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"{datetime.date.today().isoformat()}"
    )
    print(
        f"# tokens {args.dtype}, bool loss mask, block {args.block_size}, t_sampling {args.t_sampling}, "
        f"median of {args.repeats} runs ({'CUDA events' if device == 'cuda' else 'perf_counter'})"
    )
    print(f"| {'measurement':<28} | {'tokens':>11} | {'median ms':>10} | {'GB/s':>8} | {'ratio':<16} |")
    print(f"|{'-' * 30}|{'-' * 13}|{'-' * 12}|{'-' * 10}|{'-' * 18}|")
    for what, shape, seconds, moved, note in rows_out:
        print(f"| {what:<28} | {shape:>11} | {seconds * 1e3:>10.3f} | {moved / seconds / 1e9:>8.2f} | {note:<16} |")


if __name__ == "__main__":
    main()
