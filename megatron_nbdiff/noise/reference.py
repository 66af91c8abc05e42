"""Pure-torch reference of the masking-noise kernel, bit for bit equal to csrc/.

The 32-bit unsigned arithmetic of Philox-4x32-10 is emulated on int64 tensors: every value is
kept in [0, 2^32), and the 32 x 32 -> 64 bit products are split into 16-bit halves so that no
intermediate leaves the int64 range. The float32 steps (t = eps + scale * u, the comparison
of a token's uniform with t, 1 / t) are done as separate float32 tensor operations in the same
order as the C++ and CUDA kernels, so the roundings agree exactly. See the package docstring
(megatron_nbdiff/noise/__init__.py) for the definitions, and csrc/noise_core.h for the kernels.

This path is readable and runs on any device torch supports; it is slower than the fused
kernels because each step materialises its own temporaries.
"""

from __future__ import annotations

import torch

__all__ = [
    "T_MODES",
    "T_SAMPLINGS",
    "WEIGHT_MODES",
    "STREAM_TOKEN",
    "STREAM_T_UNIFORM",
    "STREAM_T_ANTITHETIC",
    "STREAM_T_STRATIFIED",
    "STREAM_T_STRATA_SHIFT",
    "philox4x32_10",
    "noise_words",
    "t_uniform24",
    "noise_reference",
]

# Codes shared with csrc/noise_core.h.
T_MODES: dict[str, int] = {"per_block": 0, "per_sequence": 1}
T_SAMPLINGS: dict[str, int] = {"uniform": 0, "antithetic": 1, "stratified": 2}
WEIGHT_MODES: dict[str, int] = {"one": 0, "inv_t": 1}

# Philox stream ids: the low 8 bits of counter word c1.
STREAM_TOKEN = 0
STREAM_T_UNIFORM = 1
STREAM_T_ANTITHETIC = 2
STREAM_T_STRATIFIED = 3  # per-sample offset inside the stratum
STREAM_T_STRATA_SHIFT = 4  # per-group rotation of the strata

_M32 = 0xFFFFFFFF
_U24_MAX = 0xFFFFFF
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PHILOX_ROUNDS = 10


def _mulhilo(m: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of ``m * x`` for a 32-bit constant ``m`` and int64 ``x`` in
    [0, 2^32), without leaving the int64 range."""
    p_low = x * (m & 0xFFFF)  # < 2^48
    p_high = x * (m >> 16)  # < 2^48; m * x = p_low + p_high * 2^16
    low_part = p_low + ((p_high & 0xFFFF) << 16)  # < 2^49
    return (p_high >> 16) + (low_part >> 32), low_part & _M32


def philox4x32_10(
    c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int, k1: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox-4x32-10 on int64 tensors holding 32-bit words (broadcast together); the key is
    two python ints in [0, 2^32). Returns the four output words as int64 tensors."""
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(_PHILOX_ROUNDS):
        hi0, lo0 = _mulhilo(_PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(_PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + _PHILOX_W0) & _M32
        k1 = (k1 + _PHILOX_W1) & _M32
    return c0, c1, c2, c3


def noise_words(
    c0: torch.Tensor, stream: int, idx: torch.Tensor, step: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Philox words for counter (c0, stream | (idx >> 32) << 8, idx & 0xffffffff, step) and key
    (seed & 0xffffffff, seed >> 32). ``idx`` is an int64 tensor in [0, 2^56)."""
    c1 = stream | ((idx >> 32) << 8)
    c2 = idx & _M32
    c3 = torch.full((), step, dtype=torch.int64, device=idx.device)
    return philox4x32_10(c0, c1, c2, c3, seed & _M32, seed >> 32)


def t_uniform24(
    g: torch.Tensor, slot: torch.Tensor, *, seed: int, step: int, t_sampling: int, strata: int
) -> torch.Tensor:
    """The 24-bit uniform integer behind t for samples ``g`` and t slots ``slot`` (broadcast),
    after antithetic or stratified sampling (codes of ``T_SAMPLINGS``)."""
    if t_sampling == T_SAMPLINGS["antithetic"]:
        w0 = noise_words(slot, STREAM_T_ANTITHETIC, g >> 1, step, seed)[0]
        u = w0 >> 8
        return torch.where((g & 1) == 1, _U24_MAX - u, u)
    if t_sampling == T_SAMPLINGS["stratified"]:
        rotation = noise_words(slot, STREAM_T_STRATA_SHIFT, g // strata, step, seed)[0]
        shift = (rotation * strata) >> 32  # in [0, strata)
        stratum = (g % strata + shift) % strata
        offset = noise_words(slot, STREAM_T_STRATIFIED, g, step, seed)[0] >> 8
        return ((stratum << 24) + offset) // strata
    return noise_words(slot, STREAM_T_UNIFORM, g, step, seed)[0] >> 8


def _u24_to_float(x: torch.Tensor, two_pow_m24: torch.Tensor) -> torch.Tensor:
    """x * 2^-24 in float32, exact for 24-bit integers."""
    return torch.mul(x.to(torch.float32), two_pow_m24)


def noise_reference(
    tokens: torch.Tensor,
    loss_mask: torch.Tensor | None,
    sample_index: torch.Tensor,
    block_size: int,
    mask_id: int,
    seed: int,
    step: int,
    eps: float,
    scale: float,
    t_mode: int,
    t_sampling: int,
    strata: int,
    weight_mode: int,
    keep_block_first: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The unfused reference, with the calling convention of the compiled kernels.

    Arguments are already validated: ``tokens`` [batch, L] int32/int64, ``loss_mask`` bool
    [batch, L] or None, ``sample_index`` int64 [batch], ``eps`` and ``scale`` float32 values
    (``scale`` = float32(1 - eps)), the modes as integer codes. Returns
    ``(noisy_ids, is_masked, t, weight)``.
    """
    rows, length = tokens.shape
    device = tokens.device
    if tokens.numel() == 0:
        empty_f = torch.empty(tokens.shape, dtype=torch.float32, device=device)
        return tokens.clone(), torch.zeros(tokens.shape, dtype=torch.bool, device=device), empty_f, empty_f.clone()
    f32 = dict(dtype=torch.float32, device=device)
    two_pow_m24 = torch.tensor(2.0**-24, **f32)
    g = sample_index.to(torch.int64).reshape(rows, 1)  # [rows, 1]

    # t per slot: [rows, L // B] for per_block, [rows, 1] for per_sequence.
    slots = length // block_size if t_mode == T_MODES["per_block"] else 1
    slot = torch.arange(slots, dtype=torch.int64, device=device).reshape(1, slots)
    u24 = t_uniform24(g, slot, seed=seed, step=step, t_sampling=t_sampling, strata=strata)
    t_slot = torch.add(torch.tensor(eps, **f32), torch.mul(torch.tensor(scale, **f32), _u24_to_float(u24, two_pow_m24)))
    pos = torch.arange(length, dtype=torch.int64, device=device)
    if t_mode == T_MODES["per_block"]:
        t = t_slot[:, pos // block_size]  # [rows, L]
    else:
        t = t_slot.expand(rows, length).contiguous()

    # One Philox call per group of four positions; token p uses word p % 4 of group p // 4.
    groups = (length + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).reshape(1, groups)
    words = torch.stack(noise_words(c0, STREAM_TOKEN, g, step, seed), dim=-1)  # [rows, groups, 4]
    r24 = (words.reshape(rows, groups * 4)[:, :length]) >> 8
    uniform = _u24_to_float(r24, two_pow_m24)

    eligible = torch.ones((rows, length), dtype=torch.bool, device=device)
    if loss_mask is not None:
        eligible = eligible & loss_mask
    if keep_block_first:
        eligible = eligible & (pos % block_size != 0).reshape(1, length)
    is_masked = eligible & (uniform < t)

    noisy_ids = torch.where(is_masked, torch.tensor(mask_id, dtype=tokens.dtype, device=device), tokens)
    if weight_mode == WEIGHT_MODES["inv_t"]:
        weight = torch.where(is_masked, torch.div(torch.ones_like(t), t), torch.zeros_like(t))
    else:
        weight = is_masked.to(torch.float32)
    return noisy_ids, is_masked, t, weight
