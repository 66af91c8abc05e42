"""The CUDA masking-noise kernel.

On every machine with nvcc: csrc/noise_cuda.cu compiles on its own (no torch headers) with the
flags setup.py uses, and its PTX has no fused multiply-add and no approximate division, the two
ways a GPU build could drift from the C++ and torch bits. On a GPU (tests marked ``gpu``,
skipped without CUDA): the kernel equals the torch reference bit for bit on many shapes and
modes, on the vector path and the scalar path (lengths not a multiple of 4, misaligned
storage).
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import warnings
from pathlib import Path

import pytest
import torch

from megatron_nbdiff.noise import NoiseOutput, available_backends, mask_tokens

CSRC = Path(__file__).resolve().parent.parent / "csrc"
T_MODES = ("per_block", "per_sequence")
T_SAMPLINGS = ("uniform", "antithetic", "stratified")


def _find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


def test_noise_cuda_compiles_with_nvcc_without_torch(tmp_path: Path) -> None:
    nvcc = _find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    obj = tmp_path / "noise_cuda.o"
    cmd = [
        nvcc, "-std=c++17", "-O3", "--use_fast_math", "-arch=sm_90",
        "-c", str(CSRC / "noise_cuda.cu"), "-o", str(obj),
        "--keep", "--keep-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"nvcc failed:\n{done.stdout}\n{done.stderr}"
    assert obj.stat().st_size > 0
    ptx = (tmp_path / "noise_cuda.ptx").read_text()
    assert "noise_kernel" in ptx
    assert "fma." not in ptx, "the CUDA kernel contracts t = eps + scale * u into an FMA"
    assert "div.approx" not in ptx and "div.full" not in ptx, "1 / t must be an IEEE division"
    assert "__local_depot" not in ptx, "per-group arrays are indexed dynamically (local memory)"


# ---------------------------------------------------------------------------------------------
# On a GPU


def _assert_same(a: NoiseOutput, b: NoiseOutput) -> None:
    for name, x, y in zip(NoiseOutput._fields, a, b):
        assert x.dtype == y.dtype and x.shape == y.shape, name
        x, y = x.cpu(), y.cpu()
        assert torch.equal(x, y), f"{name} differs at {int((x != y).sum())} positions"


def _case(rows: int, length: int, dtype: torch.dtype, seed: int, with_mask: bool):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2**31 - 1, (rows, length), generator=gen).to(dtype)
    loss_mask = torch.rand(rows, length, generator=gen) > 0.25 if with_mask else None
    sample_index = torch.randint(0, 2**56 - 1, (rows,), generator=gen)
    return tokens, loss_mask, sample_index


def _cuda(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.cuda()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("t_mode,t_sampling", list(itertools.product(T_MODES, T_SAMPLINGS)))
@pytest.mark.parametrize(
    "rows,length,block_size",
    [(1, 1, 1), (3, 12, 4), (2, 7, 7), (5, 30, 3), (4, 64, 1), (6, 40, 8), (3, 8200, 41), (64, 8192, 32)],
)
def test_cuda_equals_reference(dtype, t_mode, t_sampling, rows, length, block_size) -> None:
    assert "cuda" in available_backends(), "megatron_nbdiff._noise_cuda is not built"
    for with_mask, weight_mode, keep_first in [(False, "one", True), (True, "inv_t", False)]:
        tokens, loss_mask, sample_index = _case(rows, length, dtype, seed=rows * length, with_mask=with_mask)
        kw = dict(
            block_size=block_size, mask_token_id=5, seed=2**64 - 3, step=2**32 - 1, t_mode=t_mode,
            t_sampling=t_sampling, weight_mode=weight_mode, keep_block_first=keep_first, strata=5,
        )  # fmt: skip
        expected = mask_tokens(tokens, loss_mask=loss_mask, sample_index=sample_index, backend="torch", **kw)
        got = mask_tokens(
            tokens.cuda(), loss_mask=_cuda(loss_mask), sample_index=sample_index.cuda(), backend="cuda", **kw
        )
        _assert_same(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("seed", range(40))
def test_cuda_equals_reference_random(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(0, len(options), (1,), generator=gen))]

    block_size = pick([1, 2, 3, 4, 5, 8, 16, 32])
    rows, length = pick([1, 3, 8, 17]), block_size * pick([1, 2, 7, 33, 129])
    tokens, loss_mask, sample_index = _case(rows, length, pick([torch.int32, torch.int64]), seed, pick([True, False]))
    kw = dict(
        block_size=block_size, mask_token_id=pick([0, 7, 2**31 - 1]), seed=seed * 0x9E3779B97F4A7C15 % 2**64,
        step=seed * 977, t_mode=pick(T_MODES), t_sampling=pick(T_SAMPLINGS), eps=pick([1e-3, 0.3, 1e-30]),
        keep_block_first=pick([True, False]), weight_mode=pick(["one", "inv_t"]), strata=pick([1, 2, 8, 13]),
    )  # fmt: skip
    expected = mask_tokens(tokens, loss_mask=loss_mask, sample_index=sample_index, backend="torch", **kw)
    got = mask_tokens(tokens.cuda(), loss_mask=_cuda(loss_mask), sample_index=sample_index.cuda(), backend="cuda", **kw)
    _assert_same(got, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_cuda_misaligned_storage_uses_scalar_path_correctly(dtype, offset) -> None:
    rows, length = 6, 256
    flat = torch.randint(0, 1000, (rows * length + offset,), dtype=dtype)
    tokens = flat.cuda()[offset:].view(rows, length)  # contiguous, storage not 16-byte aligned
    mask_flat = torch.rand(rows * length + offset) > 0.3
    loss_mask = mask_flat.cuda()[offset:].view(rows, length)
    kw = dict(block_size=16, mask_token_id=3, seed=1, step=2, sample_index=100, t_sampling="antithetic")
    expected = mask_tokens(tokens.cpu(), loss_mask=loss_mask.cpu(), backend="torch", **kw)
    _assert_same(mask_tokens(tokens, loss_mask=loss_mask, backend="cuda", **kw), expected)


@pytest.mark.gpu
def test_cuda_auto_backend_layout_invariance_and_torch_on_cuda() -> None:
    tokens = torch.randint(0, 1000, (8, 128)).cuda()
    kw = dict(block_size=8, mask_token_id=3, seed=4, step=5, t_sampling="stratified", strata=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CUDA kernel is built: no fallback warning
        auto = mask_tokens(tokens, sample_index=0, backend="auto", **kw)
    _assert_same(auto, mask_tokens(tokens, sample_index=0, backend="cuda", **kw))
    _assert_same(auto, mask_tokens(tokens, sample_index=0, backend="torch", **kw))  # reference on CUDA
    _assert_same(auto, mask_tokens(tokens.cpu(), sample_index=0, backend="cpp", **kw))
    rank1 = mask_tokens(tokens[4:], sample_index=torch.arange(4, 8, device="cuda"), backend="cuda", **kw)
    for field in NoiseOutput._fields:
        assert torch.equal(getattr(auto, field)[4:], getattr(rank1, field)), field


@pytest.mark.gpu
def test_cuda_mixed_devices_raise() -> None:
    tokens = torch.zeros(2, 8, dtype=torch.int64, device="cuda")
    with pytest.raises(ValueError, match=r"sample_index is on cpu but tokens are on cuda"):
        mask_tokens(tokens, block_size=8, mask_token_id=1, seed=0, step=0, sample_index=torch.arange(2))
    with pytest.raises(ValueError, match=r"loss_mask is on cpu but tokens are on cuda"):
        mask_tokens(
            tokens, block_size=8, mask_token_id=1, seed=0, step=0, sample_index=0,
            loss_mask=torch.ones(2, 8, dtype=torch.bool),
        )  # fmt: skip
    with pytest.raises(ValueError, match=r"backend='cpp' needs CPU tensors, but tokens are on cuda"):
        mask_tokens(tokens, block_size=8, mask_token_id=1, seed=0, step=0, sample_index=0, backend="cpp")
