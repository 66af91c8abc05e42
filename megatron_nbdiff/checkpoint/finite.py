"""Non-finite weights (NaN, +-Inf) in conversion and export.

A checkpoint with a NaN or an infinite weight converts without complaint and then produces NaN
logits; a cast to a narrower dtype (fp32 -> fp16) can create infinities from finite values. Both
converters therefore check every tensor they write. By default the first non-finite tensor stops
the conversion with an error naming it (nothing is written). With ``--allow-nonfinite`` the
conversion goes on: every affected tensor is reported once as a warning and listed in the
output's ``nbdiff.json`` ``notes``.
"""
from __future__ import annotations

import warnings

import torch

from .errors import ConversionError

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                torch.float64: "fp64"}


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a floating-point tensor holds no NaN or infinity. One pass of ``aminmax`` (NaN
    propagates to both results, an infinity is the minimum or the maximum): about 8x faster on
    CPU than ``isfinite(t).all()``, which also allocates a mask of the tensor's size."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


class FiniteCheck:
    """Checks tensors for NaN/Inf; raises at the first one, or (``allow``) collects them."""

    def __init__(self, allow: bool = False):
        self.allow = allow
        self._found: dict[str, list] = {}  # name -> [nan count, inf count, why]

    def check(self, tensor: torch.Tensor, name: str, source_dtype=None) -> None:
        """Check ``tensor`` (all of tensor ``name``, or a part of it). ``source_dtype``: the dtype
        it was read or cast from, when different (non-finite values may come from the cast)."""
        if not tensor.is_floating_point() or all_finite(tensor):
            return
        nan = int(torch.isnan(tensor).sum())
        inf = int(torch.isinf(tensor).sum())
        why = ""
        if source_dtype is not None and source_dtype != tensor.dtype:
            why = (f" after conversion from {_DTYPE_NAMES.get(source_dtype, source_dtype)} to "
                   f"{_DTYPE_NAMES.get(tensor.dtype, tensor.dtype)} (values beyond its range become "
                   "infinite; choose a wider --dtype)")
        if not self.allow:
            raise ConversionError(
                f"tensor {name!r} holds {nan} NaN and {inf} infinite value(s){why}; "
                "pass --allow-nonfinite to convert it anyway"
            )
        entry = self._found.setdefault(name, [0, 0, why])
        entry[0] += nan
        entry[1] += inf

    def check_cast(self, source: torch.Tensor, cast: torch.Tensor, name: str) -> None:
        """Check ``source`` and its cast ``cast`` (non-finite values the cast made are named as
        such)."""
        self.check(source, name)
        if source.dtype != cast.dtype and all_finite(source):
            self.check(cast, name, source_dtype=source.dtype)

    def notes(self) -> list[str]:
        """One line per non-finite tensor found (empty when none was)."""
        return [f"tensor {name!r} holds {nan} NaN and {inf} infinite value(s){why} "
                "(converted with --allow-nonfinite)" for name, (nan, inf, why) in self._found.items()]

    def warn(self) -> list[str]:
        """Warn once per non-finite tensor found; returns :meth:`notes`."""
        notes = self.notes()
        for note in notes:
            warnings.warn(note, stacklevel=2)
        return notes
