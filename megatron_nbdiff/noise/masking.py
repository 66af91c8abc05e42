"""``mask_tokens``: argument checking and backend dispatch of the masking-noise kernel.

The definitions of the noise are in the package docstring (megatron_nbdiff/noise/__init__.py).
"""

from __future__ import annotations

import numbers
import operator
from typing import Callable, NamedTuple

import torch

from megatron_nbdiff.noise import _extensions
from megatron_nbdiff.noise.reference import T_MODES, T_SAMPLINGS, WEIGHT_MODES, noise_reference

__all__ = ["NoiseOutput", "mask_tokens", "available_backends", "BACKENDS"]

BACKENDS: tuple[str, ...] = ("auto", "cpp", "cuda", "torch")

MAX_SAMPLE_INDEX = 1 << 56  # exclusive bound on global sample indices (counter layout)
MAX_STEP = 1 << 32  # exclusive bound on the training step (counter word c3)
MAX_SEED = 1 << 64  # exclusive bound on the seed (the 64-bit Philox key)
MAX_STRATA = 1 << 16
MIN_EPS32 = 1e-30  # keeps t, 1/t and every intermediate a normal float32 (no FTZ effects)

_INT32_MAX = (1 << 31) - 1

_Kernel = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


class NoiseOutput(NamedTuple):
    """The result of :func:`mask_tokens`; every field has the shape of ``tokens``."""

    noisy_ids: torch.Tensor
    """``x_t``: the tokens with masked positions replaced by the mask id (tokens' dtype)."""
    is_masked: torch.Tensor
    """bool: True where the token was replaced."""
    t: torch.Tensor
    """float32: the noise level of the token's block (or sequence)."""
    weight: torch.Tensor
    """float32: the diffusion-loss weight, 1 or 1/t on masked tokens, 0 elsewhere."""


def available_backends() -> list[str]:
    """The explicit backends usable in this process: "torch" always, plus "cpp" and "cuda" when
    their compiled kernels import (and, for "cuda", a CUDA device is present)."""
    found = ["torch"]
    if _extensions.load_extension(_extensions.CPU_EXTENSION) is not None:
        found.append("cpp")
    if torch.cuda.is_available() and _extensions.load_extension(_extensions.CUDA_EXTENSION) is not None:
        found.append("cuda")
    return found


def _as_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, found {type(value).__name__} ({value!r})")
    return operator.index(value)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        expected = ", ".join(repr(c) for c in choices)
        raise ValueError(f"unknown {name} {value!r}: expected one of {expected}")
    return value  # type: ignore[return-value]


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value < high:
        raise ValueError(f"{name} must be in [{low}, {high}), found {value}")


def _check_device(name: str, tensor: torch.Tensor, tokens: torch.Tensor) -> None:
    if tensor.device != tokens.device:
        raise ValueError(
            f"{name} is on {tensor.device} but tokens are on {tokens.device}: "
            "all tensors must be on the same device"
        )


def _float32_eps(eps: object) -> tuple[float, float]:
    """float32(eps) and float32(1 - float32(eps)), each rounded once in float32."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, found {type(eps).__name__} ({eps!r})")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"eps must be in (0, 1), found {eps!r}")
    eps32 = torch.tensor(float(eps), dtype=torch.float32)
    scale32 = torch.tensor(1.0, dtype=torch.float32) - eps32
    if not MIN_EPS32 <= eps32.item() < 1.0:
        raise ValueError(
            f"eps must be in (0, 1) and, rounded to float32, in [{MIN_EPS32}, 1); "
            f"found {eps!r} (float32: {eps32.item()!r})"
        )
    return eps32.item(), scale32.item()


def _sample_index_tensor(sample_index: object, tokens: torch.Tensor, validate: bool) -> torch.Tensor:
    rows = tokens.shape[0]
    if isinstance(sample_index, torch.Tensor):
        if sample_index.dtype == torch.bool or sample_index.dtype.is_floating_point or sample_index.dtype.is_complex:
            raise TypeError(f"sample_index must be an integer tensor, found dtype {sample_index.dtype}")
        if tuple(sample_index.shape) != (rows,):
            raise ValueError(
                f"sample_index must have shape [batch] = ({rows},), found {tuple(sample_index.shape)}"
            )
        _check_device("sample_index", sample_index, tokens)
        index = sample_index.to(torch.int64).contiguous()
        if validate and rows > 0:
            low, high = int(index.min()), int(index.max())
            if low < 0 or high >= MAX_SAMPLE_INDEX:
                raise ValueError(
                    f"sample_index values must be in [0, 2^56), found min {low}, max {high}"
                )
        return index
    start = _as_int("sample_index", sample_index)
    if start < 0 or start + rows > MAX_SAMPLE_INDEX:
        raise ValueError(
            f"sample_index (the first row's global index) must give indices in [0, 2^56), found {start}"
        )
    return torch.arange(start, start + rows, dtype=torch.int64, device=tokens.device)


def _loss_mask_tensor(loss_mask: object, tokens: torch.Tensor) -> torch.Tensor | None:
    if loss_mask is None:
        return None
    if not isinstance(loss_mask, torch.Tensor):
        raise TypeError(f"loss_mask must be a torch.Tensor or None, found {type(loss_mask).__name__}")
    if loss_mask.dtype.is_floating_point or loss_mask.dtype.is_complex:
        raise TypeError(f"loss_mask must be a bool or integer tensor, found dtype {loss_mask.dtype}")
    if loss_mask.shape != tokens.shape:
        raise ValueError(
            f"loss_mask must have the shape of tokens {tuple(tokens.shape)}, found {tuple(loss_mask.shape)}"
        )
    _check_device("loss_mask", loss_mask, tokens)
    mask = loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0
    return mask.contiguous()


def _select_kernel(backend: str, device: torch.device) -> _Kernel:
    """The implementation for ``backend`` on ``device``; may warn once (see _extensions)."""
    if backend == "torch":
        return noise_reference
    if backend == "cpp":
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' needs CPU tensors, but tokens are on {device}")
        name = _extensions.CPU_EXTENSION
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, but tokens are on {device}")
        name = _extensions.CUDA_EXTENSION
    elif device.type == "cuda":
        name = _extensions.CUDA_EXTENSION
    elif device.type == "cpu":
        name = _extensions.CPU_EXTENSION
    else:  # other devices have no compiled kernel: the reference is their implementation
        return noise_reference
    ext = _extensions.load_extension(name)
    if ext is not None:
        return ext.mask_tokens
    if backend != "auto":
        raise RuntimeError(
            f"backend={backend!r} was requested but the compiled kernel {name} is not available "
            f"({_extensions.load_failure(name)}); build it with `pip install --no-build-isolation -e .` "
            "or use backend='auto' or 'torch'"
        )
    _extensions.warn_fallback(name)
    return noise_reference


def mask_tokens(
    tokens: torch.Tensor,
    *,
    block_size: int | None,
    mask_token_id: int,
    seed: int,
    step: int,
    sample_index: torch.Tensor | int,
    loss_mask: torch.Tensor | None = None,
    t_mode: str = "per_block",
    t_sampling: str = "uniform",
    eps: float = 1e-3,
    keep_block_first: bool = True,
    backend: str = "auto",
    vocab_size: int | None = None,
    weight_mode: str = "one",
    strata: int = 8,
    validate: bool = True,
) -> NoiseOutput:
    """Mask ``tokens`` for diffusion training: a pure function of (seed, step, global sample
    index, position), identical bits on every backend.

    Args:
        tokens: [batch, L] int32 or int64 token ids (non-negative).
        block_size: B, must divide L. With ``t_mode="per_sequence"`` it only decides which
            tokens are block-first (kept when ``keep_block_first``); None means B = L there.
        mask_token_id: the id written at masked positions, in [0, vocab_size).
        seed: 64-bit seed in [0, 2^64): the Philox key.
        step: training step in [0, 2^32).
        sample_index: global sample index of each row, an integer tensor [batch] on the tokens'
            device, or a python int: the index of row 0, rows consecutive from there.
        loss_mask: optional [batch, L] bool or integer tensor; tokens where it is 0 (prompt,
            padding) are never masked and get weight 0.
        t_mode: "per_block" (one t per block, NBDiff) or "per_sequence" (one t per row,
            DiffuLLaMA).
        t_sampling: "uniform", "antithetic" (rows g and g^1 mirror each other) or "stratified"
            (groups of ``strata`` consecutive global samples cover the strata of [0, 1)).
        eps: lower end of t ~ U(eps, 1), in (0, 1).
        keep_block_first: never mask the first token of a block.
        backend: "auto" (CUDA kernel for CUDA tensors, C++ kernel for CPU tensors, the torch
            reference with one warning when the compiled kernel is missing), "cpp", "cuda" or
            "torch".
        vocab_size: when given, ``mask_token_id`` and (with ``validate``) the tokens must be
            below it.
        weight_mode: "one" (weight 1 on masked tokens) or "inv_t" (1/t, the ELBO weight).
        strata: G, the stratified group size, in [1, 65536].
        validate: check token values (non-negative, below ``vocab_size``) and the range of a
            ``sample_index`` tensor. These checks read the tensors and, on CUDA, synchronise
            with the host; a training loop whose inputs are known to be valid may turn them off.

    Returns:
        ``NoiseOutput(noisy_ids, is_masked, t, weight)``, each shaped like ``tokens``.

    Raises:
        TypeError: wrong types or dtypes (float tokens, float loss_mask, non-int arguments).
        ValueError: bad shapes, values or combinations, with the argument named and the
            expected and found values.
        RuntimeError: an explicitly requested compiled backend is not built.
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, found {type(tokens).__name__}")
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be an int32 or int64 tensor, found dtype {tokens.dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape [batch, length], found shape {tuple(tokens.shape)}")
    rows, length = tokens.shape
    _check_choice("t_mode", t_mode, tuple(T_MODES))
    _check_choice("t_sampling", t_sampling, tuple(T_SAMPLINGS))
    _check_choice("weight_mode", weight_mode, tuple(WEIGHT_MODES))
    _check_choice("backend", backend, BACKENDS)
    if not isinstance(keep_block_first, bool):
        raise TypeError(f"keep_block_first must be a bool, found {type(keep_block_first).__name__}")

    if block_size is None:
        if t_mode != "per_sequence":
            raise ValueError("block_size=None (meaning the whole row) needs t_mode='per_sequence'")
        block_size = max(length, 1)
    block_size = _as_int("block_size", block_size)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, found {block_size}")
    if length % block_size != 0:
        raise ValueError(
            f"block_size {block_size} does not divide the sequence length {length} (tokens.shape[1])"
        )

    mask_token_id = _as_int("mask_token_id", mask_token_id)
    if mask_token_id < 0:
        raise ValueError(f"mask_token_id must be >= 0, found {mask_token_id}")
    if vocab_size is not None:
        vocab_size = _as_int("vocab_size", vocab_size)
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, found {vocab_size}")
        if mask_token_id >= vocab_size:
            raise ValueError(
                f"mask_token_id {mask_token_id} is outside the vocabulary: expected "
                f"0 <= mask_token_id < vocab_size = {vocab_size}"
            )
    if tokens.dtype == torch.int32 and mask_token_id > _INT32_MAX:
        raise ValueError(f"mask_token_id {mask_token_id} does not fit the int32 tokens (max {_INT32_MAX})")

    seed = _as_int("seed", seed)
    _check_range("seed", seed, 0, MAX_SEED)
    step = _as_int("step", step)
    _check_range("step", step, 0, MAX_STEP)
    strata = _as_int("strata", strata)
    if not 1 <= strata <= MAX_STRATA:
        raise ValueError(f"strata must be in [1, {MAX_STRATA}], found {strata}")
    eps32, scale32 = _float32_eps(eps)

    index = _sample_index_tensor(sample_index, tokens, validate)
    mask = _loss_mask_tensor(loss_mask, tokens)
    kernel = _select_kernel(backend, tokens.device)

    if validate and tokens.numel() > 0:
        low = int(tokens.min())
        if low < 0:
            raise ValueError(f"tokens must be non-negative ids, found min id {low}")
        if vocab_size is not None:
            high = int(tokens.max())
            if high >= vocab_size:
                raise ValueError(f"tokens must be < vocab_size = {vocab_size}, found max id {high}")

    noisy_ids, is_masked, t, weight = kernel(
        tokens.contiguous(),
        mask,
        index,
        block_size,
        mask_token_id,
        seed,
        step,
        eps32,
        scale32,
        T_MODES[t_mode],
        T_SAMPLINGS[t_sampling],
        strata,
        WEIGHT_MODES[weight_mode],
        keep_block_first,
    )
    return NoiseOutput(noisy_ids, is_masked, t, weight)
