"""RoPE frequencies for the scaled variants HF checkpoints use (``linear``, ``llama3``, ``yarn``).

:func:`inverse_frequencies` gives the ``[head_dim / 2]`` fp32 inverse frequencies and
:func:`attention_factor` the factor by which the cos and sin tables are multiplied (YaRN's
"mscale"; 1 for the others), both computed with the same float32 operations, in the same order,
as transformers' ``modeling_rope_utils`` so that the tables agree bit for bit. The parameters are
:attr:`~megatron_nbdiff.config.ModelConfig.rope_scaling` (checked there).

megatron-core's own ``RotaryEmbedding(rope_scaling=True)`` fixes Llama 3's low/high frequency
factors and original context length at 1/4/8192; the model (``models/model.py``) instead replaces
the rotary module's ``inv_freq`` with these frequencies, and lowers the attention factor ``a``
into the softmax scale (``a**2 / sqrt(head_dim)``): transformers multiplies both the query's and
the key's cos/sin by ``a``, which scales every attention score by ``a**2``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..config import check_rope_scaling


def _default_inverse_frequencies(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    context = p["original_max_position_embeddings"]
    low_freq_wavelen = context / low
    high_freq_wavelen = context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn(dim: int, base: float, p: dict) -> torch.Tensor:
    """YaRN: interpolated (divided by ``factor``) below the ``beta_slow`` rotation count over the
    original context, extrapolated (unchanged) above ``beta_fast``, a linear ramp between."""
    factor = p["factor"]
    context = p["original_max_position_embeddings"]
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1
    truncate = p.get("truncate", True)

    def correction_dim(rotations):
        return (dim * math.log(context / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp.to(dtype=torch.float)
    return interpolation * (1 - keep) + extrapolation * keep


def inverse_frequencies(head_dim: int, base: float, rope_scaling: Optional[dict]) -> torch.Tensor:
    """fp32 inverse frequencies ``[head_dim // 2]`` of RoPE with ``base`` and ``rope_scaling``
    (None: plain RoPE), on the CPU."""
    dim = int(head_dim)
    if rope_scaling is None:
        return _default_inverse_frequencies(dim, base)
    p = check_rope_scaling(rope_scaling)
    kind = p["rope_type"]
    if kind == "linear":
        return _default_inverse_frequencies(dim, base) / p["factor"]
    if kind == "llama3":
        return _llama3(_default_inverse_frequencies(dim, base), p)
    return _yarn(dim, base, p)


def attention_factor(rope_scaling: Optional[dict]) -> float:
    """The factor on cos and sin: YaRN's ``attention_factor`` if given, else from ``factor`` and
    ``mscale``/``mscale_all_dim`` (``0.1 * m * ln(factor) + 1``, a ratio of two when both are
    set); 1.0 for every other type."""
    if rope_scaling is None:
        return 1.0
    p = check_rope_scaling(rope_scaling)
    if p["rope_type"] != "yarn":
        return 1.0
    if p.get("attention_factor") is not None:
        return p["attention_factor"]
    factor = p["factor"]

    def mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = p.get("mscale"), p.get("mscale_all_dim")
    if m and m_all:
        return float(mscale(factor, m) / mscale(factor, m_all))
    return mscale(factor)


def softmax_scale(head_dim: int, rope_scaling: Optional[dict]) -> Optional[float]:
    """The attention softmax scale that folds in :func:`attention_factor` (None when it is 1, so
    the attention keeps its default ``1 / sqrt(head_dim)``)."""
    a = attention_factor(rope_scaling)
    if a == 1.0:
        return None
    return a * a / math.sqrt(head_dim)
