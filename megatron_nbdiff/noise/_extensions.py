"""Loading of the compiled masking-noise kernels, and the one fallback warning.

``megatron_nbdiff._noise_cpu`` (C++, always built by setup.py) and ``megatron_nbdiff._noise_cuda``
(built where torch has CUDA) are optional at import: when one is missing, ``backend="auto"``
uses the pure-torch reference, which gives the same bits, and says so once per process.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from types import ModuleType

CPU_EXTENSION = "megatron_nbdiff._noise_cpu"
CUDA_EXTENSION = "megatron_nbdiff._noise_cuda"

_warned: set[str] = set()


@functools.cache
def _load(name: str) -> tuple[ModuleType | None, str]:
    """The extension module, or None and the reason it could not be imported."""
    import torch  # noqa: F401  (the extensions link against torch's libraries)

    try:
        return importlib.import_module(name), ""
    except ImportError as exc:
        return None, f"{type(exc).__name__}: {exc}"


def load_extension(name: str) -> ModuleType | None:
    """The compiled module ``name`` (``CPU_EXTENSION`` or ``CUDA_EXTENSION``), or None."""
    return _load(name)[0]


def load_failure(name: str) -> str:
    """Why ``name`` could not be imported ("" when it could)."""
    return _load(name)[1]


def warn_fallback(name: str) -> None:
    """Warn, once per process and extension, that ``name`` is missing and the reference runs."""
    if name in _warned:
        return
    _warned.add(name)
    warnings.warn(
        f"megatron_nbdiff.noise: the compiled masking-noise kernel {name} is not available "
        f"({load_failure(name)}); falling back to the pure-torch reference, which gives "
        "identical results but is slower. Build the kernels with "
        "`pip install --no-build-isolation -e .` (see setup.py), or pass backend='torch' "
        "to choose the reference explicitly.",
        RuntimeWarning,
        stacklevel=4,  # warn_fallback <- _select_kernel <- mask_tokens <- the caller
    )
