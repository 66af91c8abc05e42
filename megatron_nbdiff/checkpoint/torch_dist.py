"""Checks of a megatron-core ``torch_dist`` checkpoint directory before anything reads it.

The directory holds ``metadata.json`` (megatron's: format and version), ``.metadata`` (torch's
distributed-checkpoint index, a pickle read through the restricted unpickler of
:func:`megatron_nbdiff.compat.install_safe_loading`), ``common.pt`` (megatron's non-sharded
state) and the shard files ``__<rank>_<n>.distcp`` that the index points into with
``(file, offset, length)``. :func:`check_torch_dist` reads the index and verifies that every
shard it names exists and is long enough, so that a missing or truncated shard is one clear
error naming the file instead of a failure deep inside the reader.
"""
from __future__ import annotations

import os

from ..errors import NBDiffError
from .errors import ConversionError

INDEX_NAME = ".metadata"
MEGATRON_METADATA = "metadata.json"
COMMON_NAME = "common.pt"


def read_index(path: str):
    """torch's ``Metadata`` of the checkpoint in ``path`` (restricted unpickling)."""
    from torch.distributed.checkpoint import FileSystemReader

    from .. import compat

    compat.install_safe_loading()
    index = os.path.join(path, INDEX_NAME)
    if not os.path.isfile(index):
        raise ConversionError(
            f"{path} has no {INDEX_NAME}: not a complete megatron-core torch_dist checkpoint"
        )
    try:
        return FileSystemReader(path).read_metadata()
    except NBDiffError as exc:
        raise ConversionError(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - a corrupt index surfaces as many types
        raise ConversionError(f"{index}: cannot read the checkpoint index ({type(exc).__name__}: {exc})") from None


def check_torch_dist(path: str, need_common: bool = True):
    """Check the checkpoint in ``path`` (module docstring); returns its index."""
    if not os.path.isfile(os.path.join(path, MEGATRON_METADATA)):
        raise ConversionError(
            f"{path} has no {MEGATRON_METADATA}: not a megatron-core distributed checkpoint"
        )
    if need_common and not os.path.isfile(os.path.join(path, COMMON_NAME)):
        raise ConversionError(f"{path} has no {COMMON_NAME}: the checkpoint is incomplete")
    md = read_index(path)
    needed: dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        end = int(info.offset) + int(info.length)
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in sorted(needed.items()):
        shard = os.path.join(path, rel)
        if not os.path.isfile(shard):
            raise ConversionError(f"shard {shard} is missing: the checkpoint is incomplete")
        size = os.path.getsize(shard)
        if size < end:
            raise ConversionError(
                f"shard {shard} is truncated: the checkpoint index needs {end} bytes, the file has {size}"
            )
    return md
