"""Streaming safetensors reading and writing, without memory maps and without whole-file copies.

The format is an 8-byte little-endian header length, a JSON header (``name -> {dtype, shape,
data_offsets}`` plus an optional ``__metadata__``) and the tensor bytes. Reading parses every
header first, so a missing or truncated shard is reported before anything is converted, then
reads rows of one tensor straight into a destination tensor with ``os.preadv`` (no mmap: pages of
the source file never count towards the converter's resident memory). Writing lays out a shard's
header from known shapes and then writes each tensor's bytes as the tensor is produced, so an
exporter holds one layer, not one shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from typing import Iterable, Optional

import torch

from .errors import ConversionError
from .fsutil import pread_full

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
_MAX_HEADER = 100 * 1024 * 1024
_CONVERT_CHUNK_BYTES = 64 * 1024 * 1024


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def pickle_weight_files(directory: str) -> list[str]:
    """Weight files in ``directory`` stored as pickles (``pytorch_model.bin`` and the like),
    sorted; loading one can run code."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(n for n in names if n.endswith(PICKLE_WEIGHT_SUFFIXES) and n != "training_args.bin"
                  and os.path.isfile(os.path.join(directory, n)))


def safetensors_files(directory: str) -> list[str]:
    """The ``*.safetensors`` files in ``directory``, sorted."""
    try:
        return sorted(n for n in os.listdir(directory) if n.endswith(".safetensors"))
    except OSError:
        return []


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    path: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    """Absolute byte offset of the data in the file."""
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _tensor_bytes(view: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy)."""
    if not view.is_contiguous() or view.device.type != "cpu":
        raise ValueError("tensor must be a contiguous CPU tensor")
    return memoryview(view.view(-1).view(torch.uint8).numpy())


def read_header(path: str) -> tuple[dict, int]:
    """(header dict, data start offset) of one safetensors file, validated against its size."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path} is truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ConversionError(f"{path} is truncated or not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    except ValueError as e:
        raise ConversionError(f"{path} has a corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a corrupt safetensors header")
    start = 8 + n
    end_max = start
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            b, e = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
            dtype = info["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ConversionError(f"{path}: malformed header entry for {name!r}") from None
        end_max = max(end_max, start + e)
        if dtype in ST_DTYPES:
            itemsize = torch.empty((), dtype=ST_DTYPES[dtype]).element_size()
            numel = 1
            for s in shape:
                numel *= s
            if e - b != numel * itemsize:
                raise ConversionError(
                    f"{path}: tensor {name!r} declares shape {list(shape)} {dtype} but holds {e - b} bytes"
                )
    if end_max > size:
        raise ConversionError(
            f"{path} is truncated: its header needs {end_max} bytes, the file has {size}"
        )
    return header, start


class SafetensorsCheckpoint:
    """All tensors of an HF checkpoint directory (one ``model.safetensors`` or a sharded index).

    Opening validates every shard's header; reading is lazy and per tensor.
    """

    def __init__(self, hf_dir: str):
        self.dir = hf_dir
        index = os.path.join(hf_dir, INDEX_NAME)
        single = os.path.join(hf_dir, SINGLE_NAME)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConversionError(f"cannot read {index}: {e!r}") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(v, str) and v and os.path.basename(v) == v for v in weight_map.values()):
                raise ConversionError(
                    f"{index}: weight_map must map tensor names to shard file names in {hf_dir}"
                )
            files = sorted(set(weight_map.values()))
        elif os.path.isfile(single):
            weight_map, files = None, [SINGLE_NAME]
        else:
            pickled = pickle_weight_files(hf_dir)
            if pickled:
                raise ConversionError(
                    f"{hf_dir} holds its weights as {pickled[0]}, a pickle that can run code when "
                    "loaded; only safetensors checkpoints are converted (re-save it where you trust "
                    "it with save_pretrained(..., safe_serialization=True))"
                )
            raise ConversionError(
                f"{hf_dir} has neither {SINGLE_NAME} nor {INDEX_NAME} (only safetensors checkpoints "
                "are converted)"
            )
        missing = [f for f in files if not os.path.isfile(os.path.join(hf_dir, f))]
        if missing:
            raise ConversionError(f"missing shard(s) listed in {INDEX_NAME}: {', '.join(missing)}")
        self.entries: dict[str, TensorEntry] = {}
        self.total_bytes = 0
        for fname in files:
            path = os.path.join(hf_dir, fname)
            header, start = read_header(path)
            self.total_bytes += os.path.getsize(path)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if weight_map is not None and weight_map.get(name) != fname:
                    continue  # the index is authoritative about where a tensor lives
                if info["dtype"] not in ST_DTYPES:
                    raise ConversionError(
                        f"{path}: tensor {name!r} has dtype {info['dtype']}; only F32/F16/BF16 "
                        "checkpoints are converted (quantized checkpoints are not)"
                    )
                b, e = info["data_offsets"]
                self.entries[name] = TensorEntry(
                    name, path, ST_DTYPES[info["dtype"]], tuple(info["shape"]), start + b, start + e
                )
        if weight_map is not None:
            absent = sorted(n for n, f in weight_map.items() if n not in self.entries)
            if absent:
                raise ConversionError(
                    f"{INDEX_NAME} maps {absent[0]!r} (and {len(absent) - 1} more) to shards that do "
                    "not contain it" if len(absent) > 1 else
                    f"{INDEX_NAME} maps {absent[0]!r} to a shard that does not contain it"
                )
        self._fds: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise ConversionError(f"tensor {name!r} is missing from the checkpoint in {self.dir}")
        return self.entries[name]

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pread_into(self, path: str, offset: int, buf: memoryview) -> None:
        pread_full(self._fd(path), offset, buf, path)

    def read_rows_into(self, name: str, dest: torch.Tensor, start: int = 0,
                       stop: Optional[int] = None) -> None:
        """Copy rows ``[start, stop)`` (first dimension) of tensor ``name`` into ``dest``.

        ``dest`` must be contiguous with the rows' shape; its dtype may differ (converted in
        bounded chunks).
        """
        e = self.entry(name)
        rows = e.shape[0] if e.shape else 1
        stop = rows if stop is None else stop
        row_numel = e.numel // rows if rows else 0
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        count = (stop - start) * row_numel
        if dest.numel() != count:
            raise ValueError(f"{name}: destination holds {dest.numel()} elements, rows need {count}")
        offset = e.begin + start * row_numel * itemsize
        if dest.dtype == e.dtype:
            self._pread_into(e.path, offset, _tensor_bytes(dest))
            return
        flat = dest.view(-1)
        step = max(1, _CONVERT_CHUNK_BYTES // itemsize)
        tmp = torch.empty(min(step, count), dtype=e.dtype)
        for lo in range(0, count, step):
            hi = min(count, lo + step)
            part = tmp[: hi - lo]
            self._pread_into(e.path, offset + lo * itemsize, _tensor_bytes(part))
            flat[lo:hi].copy_(part)

    def read(self, name: str, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        e = self.entry(name)
        out = torch.empty(e.shape, dtype=dtype or e.dtype)
        self.read_rows_into(name, out)
        return out


class ShardWriter:
    """Writes one safetensors file whose tensors (names, dtypes, shapes) are known up front.

    The header goes first; :meth:`write` then streams each tensor's bytes, or pieces of its rows,
    in any order (seeking to their place). :meth:`close` checks that every declared tensor was
    written whole.
    """

    def __init__(self, path: str, specs: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Optional[dict[str, str]] = None):
        self.path = path
        header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
        self.slots: dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]] = {}
        offset = 0
        for name, dtype, shape in specs:
            numel = 1
            for s in shape:
                numel *= s
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            self.slots[name] = (offset, nbytes, dtype, tuple(shape))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.data_start = 8 + len(raw)
        self.nbytes = self.data_start + offset
        self.f = open(path, "wb")
        with self._naming_path():
            self.f.write(struct.pack("<Q", len(raw)))
            self.f.write(raw)
        self.written: dict[str, int] = {}
        """Bytes written per tensor (pieces of rows may come in any order, never twice)."""

    @contextlib.contextmanager
    def _naming_path(self):
        """OSErrors of writes (a full disk) name the shard file."""
        try:
            yield
        except OSError as e:
            if e.filename is not None or e.errno is None:
                raise
            raise OSError(e.errno, e.strerror, self.path) from None

    def write(self, name: str, tensor: torch.Tensor, row0: int = 0) -> bool:
        """Write ``tensor`` as rows ``row0 ..`` of tensor ``name`` (all of it by default); returns
        whether every byte of ``name`` has now been written."""
        offset, nbytes, dtype, shape = self.slots[name]
        rows = tensor.shape[0] if tensor.dim() else 1
        whole = row0 == 0 and tuple(tensor.shape) == shape
        if tensor.dtype != dtype or not (whole or (len(shape) > 0 and tuple(tensor.shape[1:]) == shape[1:]
                                                  and 0 <= row0 and row0 + rows <= shape[0])):
            raise ValueError(
                f"{name}: expected {shape} {dtype} (or rows of it), got {tuple(tensor.shape)} {tensor.dtype} "
                f"at row {row0}"
            )
        data = _tensor_bytes(tensor.contiguous())
        row_bytes = nbytes // shape[0] if shape and shape[0] else nbytes
        with self._naming_path():
            self.f.seek(self.data_start + offset + row0 * row_bytes)
            self.f.write(data)
        self.written[name] = self.written.get(name, 0) + len(data)
        return self.written[name] >= nbytes

    def close(self) -> None:
        missing = {n for n, slot in self.slots.items() if self.written.get(n, 0) < slot[1]}
        with self._naming_path():
            self.f.truncate(self.nbytes)
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        if missing:
            raise RuntimeError(f"{self.path}: tensors never written: {sorted(missing)}")
