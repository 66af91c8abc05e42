"""Reading slices of the tensors of a ``torch_dist`` checkpoint straight from its shard files.

torch's distributed-checkpoint reader loads every stored chunk with ``torch.load`` (a copy out of
the file, a second into a fresh tensor, unpickling the chunk's ``data.pkl``) and then copies it
into the destination: three passes over the bytes. Each chunk is a ``torch.save`` archive (an
uncompressed zip) at a known ``(file, offset, length)`` of the checkpoint's index, and its tensor
bytes are the archive's ``data/0`` record, row-major with the chunk's shape and dtype from the
index (torch's writer stores a chunk as a tensor of its own, cloned when it was a view). So
:class:`TensorFileReader` reads ``data/0``'s place from the zip directory with :mod:`zipfile`
and ``preadv``\\ s the wanted bytes into the destination: one pass, and nothing unpickled.

Where a requested region and a chunk are both contiguous runs of bytes (whole trailing rows,
the common case), the bytes land in the destination directly; otherwise (a column-split TP
chunk, a cast to another dtype) the chunk's rows go through a buffer. An archive that is not
plain (compressed, a storage larger than the chunk, a stream transform) is read through torch's
reader instead, for that request.
"""
from __future__ import annotations

import os
import struct
import zipfile
from typing import Optional

import torch

from .errors import ConversionError
from .fsutil import pread_full

_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # the zip local file header (30 bytes)


class _Window:
    """A read-only, seekable file view of ``[offset, offset + length)`` of ``fd`` (for zipfile)."""

    def __init__(self, fd: int, offset: int, length: int):
        self.fd, self.base, self.length, self.pos = fd, offset, length, 0

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else self.length + pos
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        data = os.pread(self.fd, max(0, n), self.base + self.pos)
        self.pos += len(data)
        return data

    def seekable(self) -> bool:
        return True


def _contiguous(shape: tuple[int, ...], start: tuple[int, ...], size: tuple[int, ...]) -> Optional[int]:
    """The element offset of box ``start``/``size`` in a row-major tensor of ``shape`` when the
    box is one contiguous run of elements, else None."""
    k = next((i for i in range(len(shape)) if size[i] != 1), len(shape))
    if any(size[i] != shape[i] for i in range(k + 1, len(shape))):
        return None
    offset, stride = 0, 1
    for i in reversed(range(len(shape))):
        offset += start[i] * stride
        stride *= shape[i]
    return offset


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


class TensorFileReader:
    """Reads regions of the global tensors of the ``torch_dist`` checkpoint in ``path`` (module
    docstring). ``index``: its already-read torch ``Metadata``."""

    def __init__(self, path: str, index=None):
        from .torch_dist import read_index

        self.path = path
        self.index = index if index is not None else read_index(path)
        self.tensors = {k: v for k, v in self.index.state_dict_metadata.items() if hasattr(v, "chunks")}
        self._fds: dict[str, int] = {}
        self._data: dict[tuple, Optional[int]] = {}  # (key, chunk offsets) -> byte offset of its data

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "TensorFileReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _fd(self, rel: str) -> int:
        if rel not in self._fds:
            self._fds[rel] = os.open(os.path.join(self.path, rel), os.O_RDONLY)
        return self._fds[rel]

    def _data_offset(self, key: str, chunk, dtype: torch.dtype) -> Optional[tuple[int, int]]:
        """(fd, absolute offset of the chunk's tensor bytes), or None when its archive is not a
        plain one (module docstring)."""
        from torch.distributed.checkpoint.metadata import MetadataIndex

        cache_key = (key, tuple(chunk.offsets))
        if cache_key not in self._data:
            info = self.index.storage_data[MetadataIndex(key, chunk.offsets)]
            fd = self._fd(info.relative_path)
            found = None
            if not info.transform_descriptors:
                window = _Window(fd, info.offset, info.length)
                try:
                    with zipfile.ZipFile(window) as archive:
                        records = [z for z in archive.infolist() if z.filename.endswith("/data/0")]
                except (zipfile.BadZipFile, OSError, ValueError) as exc:
                    raise ConversionError(f"{os.path.join(self.path, info.relative_path)}: the chunk "
                                          f"of {key} at {list(chunk.offsets)} is not readable ({exc})") from None
                nbytes = torch.Size(chunk.sizes).numel() * dtype.itemsize
                if (len(records) == 1 and records[0].compress_type == zipfile.ZIP_STORED
                        and records[0].file_size == nbytes):
                    window.seek(records[0].header_offset)
                    head = _LOCAL_HEADER.unpack(window.read(_LOCAL_HEADER.size))
                    if head[0] == b"PK\x03\x04":
                        found = info.offset + records[0].header_offset + 30 + head[9] + head[10]
            self._data[cache_key] = None if found is None else (fd, found)
        return self._data[cache_key]

    def read(self, key: str, dest: torch.Tensor, offsets: tuple[int, ...]) -> None:
        """Fill ``dest`` with ``stored[key][offsets : offsets + dest.shape]``."""
        md = self.tensors[key]
        dtype = md.properties.dtype
        covered = 0
        for chunk in md.chunks:
            lo = [max(o, c) for o, c in zip(offsets, chunk.offsets)]
            hi = [min(o + n, c + m) for o, n, c, m in zip(offsets, dest.shape, chunk.offsets, chunk.sizes)]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            size = tuple(b - a for a, b in zip(lo, hi))
            covered += torch.Size(size).numel()
            in_chunk = tuple(a - c for a, c in zip(lo, chunk.offsets))
            in_dest = tuple(a - o for a, o in zip(lo, offsets))
            region = dest[tuple(slice(s, s + n) for s, n in zip(in_dest, size))]
            where = self._data_offset(key, chunk, dtype)
            if where is None:
                self._read_with_torch(key, region, tuple(lo))
                continue
            fd, base = where
            start = _contiguous(tuple(chunk.sizes), in_chunk, size)
            if start is not None and dest.dtype == dtype and region.is_contiguous():
                self._pread(fd, base + start * dtype.itemsize, _bytes_of(region))
                continue
            # the smallest contiguous run of the chunk that holds the region, through a buffer
            k = next((i for i in range(len(size)) if size[i] != 1), len(size) - 1)
            run_shape = tuple(1 if i < k else size[i] if i == k else chunk.sizes[i] for i in range(len(size)))
            run_start = tuple(in_chunk[i] if i <= k else 0 for i in range(len(size)))
            buf = torch.empty(run_shape, dtype=dtype)
            self._pread(fd, base + _contiguous(tuple(chunk.sizes), run_start, run_shape) * dtype.itemsize,
                        _bytes_of(buf))
            region.copy_(buf[tuple(slice(None) if i <= k else slice(in_chunk[i], in_chunk[i] + size[i])
                                   for i in range(len(size)))])
        if covered != dest.numel():
            raise ConversionError(
                f"the checkpoint in {self.path} does not store all of {key}[{list(offsets)} + "
                f"{list(dest.shape)}] ({covered} of {dest.numel()} elements)"
            )

    def _pread(self, fd: int, offset: int, buf: memoryview) -> None:
        pread_full(fd, offset, buf, f"a shard file of {self.path}")

    def _read_with_torch(self, key: str, region: torch.Tensor, offsets: tuple[int, ...]) -> None:
        from .megatron_to_hf import read_slices

        tmp = region if region.is_contiguous() else torch.empty(region.shape, dtype=region.dtype)
        read_slices(self.path, {key: (tmp, offsets)})
        if tmp is not region:
            region.copy_(tmp)
