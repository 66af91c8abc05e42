"""Write a megatron-core ``torch_dist`` checkpoint one tensor at a time.

``dist_checkpointing.save`` takes a state dict of materialised tensors, so a converter that uses
it must hold the whole model in memory before the first byte is written (1.15x the checkpoint at
peak). torch's distributed-checkpoint writer does not need that: the :class:`SavePlanner` it is
given plans the write items from metadata alone, and the writer asks the planner for each item's
data (:meth:`SavePlanner.resolve_data`) only when it writes that item, then drops it. This module
plans from a list of :class:`StoredTensor` (key, global shape, chunk, dtype and a function that
produces the chunk's values) and :class:`StoredObject` (megatron's sharded objects, such as the
linear layers' ``_extra_state``), so at most one tensor is resident at a time.

The layout written is the one megatron-core writes for the same sharded state dict: the same
keys, global shapes and chunks in torch's ``.metadata`` index, megatron's ``metadata.json``
(``torch_dist`` backend) and an empty ``common.pt``; :func:`entries_of` derives the entries from
a model's ``sharded_state_dict()``, so the keys are megatron's by construction. The result loads
with ``dist_checkpointing.load`` at any TP/PP like a checkpoint megatron saved itself.
:func:`save_model` does this for the project's model, in pieces of whole rows of at most
:data:`CHUNK_BYTES` (a 70B model's embedding is 2 GB, one layer's MLP input weight 0.9 GB): both
converters into this project's format (from HF safetensors and from Megatron-LM) write through
it, so their memory does not grow with the model.

Failures come out as they went in: whatever a ``produce`` raised (a refusal such as a NaN
weight, a read error of the source) is re-raised as itself, not as torch's wrapper; a failed
write becomes an ``OSError`` (a full disk names the file).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import os
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class StoredTensor:
    """One chunk of a global tensor of the checkpoint."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    produce: Optional[Callable[[], torch.Tensor]] = None
    """Returns the chunk's values (``shape``, ``dtype``); called once, when the chunk is written."""


@dataclasses.dataclass
class StoredObject:
    """A megatron sharded object: ``torch.save`` bytes of ``[data]`` under its unique key."""

    key: str
    data: bytes


def entries_of(sharded_state_dict: dict) -> tuple[dict[str, StoredTensor], list[StoredObject]]:
    """The tensors (keyed by the model's state-dict name, ``produce`` unset) and objects of a
    megatron sharded state dict, as :func:`save` writes them. Only main replicas are kept, as
    megatron's own save does."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, is_main_replica

    tensors: dict[str, StoredTensor] = {}
    objects: list[StoredObject] = []
    for name, value in sharded_state_dict.items():
        if isinstance(value, ShardedTensor):
            if not is_main_replica(value.replica_id):
                continue
            if value.flattened_range is not None:  # only optimizer states are flattened: a bug
                raise RuntimeError(f"{name}: a flattened shard in a model's state dict")
            prepend = value.prepend_axis_num
            shape = (1,) * prepend + tuple(value.local_shape)
            tensors[name] = StoredTensor(value.key, tuple(value.global_shape), tuple(value.global_offset),
                                         shape, value.dtype)
        elif isinstance(value, ShardedObject):
            if not is_main_replica(value.replica_id):
                continue
            buf = io.BytesIO()
            torch.save([value.data], buf)  # megatron stores a list of the objects sharing a key
            objects.append(StoredObject(value.unique_key, buf.getvalue()))
        else:
            raise TypeError(f"{name}: cannot plan a {type(value).__name__}")
    return tensors, objects


class _StreamingPlanner:
    """A torch ``SavePlanner`` over :class:`StoredTensor` / :class:`StoredObject` entries.

    torch's writer (one thread) asks for the tensors in plan order and writes each before asking
    for the next; the planner produces the next one in a helper thread meanwhile (reading the
    source and writing the output overlap; file I/O and torch release the GIL), so two tensors are
    in memory at most. What a ``produce`` raises reaches the writer's thread (and :func:`save`) as
    itself. torch's own multi-threaded writer is not used: an exception in one of its extra
    threads is printed and dropped, and the save then "succeeds" without that thread's items.
    """

    def __init__(self, tensors: list[StoredTensor], objects: list[StoredObject]):
        self.failed: Optional[BaseException] = None
        """What a ``produce`` raised (reading the source, a refused tensor, a bug), if anything."""
        self.by_index = {}
        self.items = []
        from torch.distributed.checkpoint.metadata import (
            ChunkStorageMetadata,
            MetadataIndex,
            TensorProperties,
        )
        from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

        self.order: list[tuple] = []
        for t in tensors:
            index = MetadataIndex(t.key, torch.Size(t.offsets))
            whole = tuple(t.shape) == tuple(t.global_shape)
            self.items.append(WriteItem(
                index=index, type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(t.offsets), sizes=torch.Size(t.shape)),
                    properties=TensorProperties(dtype=t.dtype), size=torch.Size(t.global_shape)),
            ))
            self.by_index[(t.key, tuple(t.offsets))] = t
            self.order.append((t.key, tuple(t.offsets)))
        for o in objects:
            self.items.append(WriteItem(index=MetadataIndex(o.key), type=WriteItemType.BYTE_IO))
            self.by_index[(o.key, None)] = o
        self.position = {key: i for i, key in enumerate(self.order)}
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="nbdiff-produce")
        self.ahead: dict[tuple, concurrent.futures.Future] = {}

    # -- the SavePlanner protocol --------------------------------------------------------------
    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        pass

    def create_local_plan(self):
        from torch.distributed.checkpoint.planner import SavePlan

        return SavePlan(self.items)

    def create_global_plan(self, all_plans):
        from torch.distributed.checkpoint.default_planner import create_default_global_save_plan

        return create_default_global_save_plan(all_plans)

    def finish_plan(self, new_plan):
        return new_plan

    def _produce(self, key: tuple) -> torch.Tensor:
        entry = self.by_index[key]
        value = entry.produce()
        if tuple(value.shape) != tuple(entry.shape) or value.dtype != entry.dtype:
            raise RuntimeError(  # a converter bug, not bad input
                f"{entry.key}: produced {tuple(value.shape)} {value.dtype}, planned "
                f"{tuple(entry.shape)} {entry.dtype}"
            )
        return value.contiguous()

    def resolve_data(self, write_item):
        offsets = write_item.index.offset
        key = (write_item.index.fqn, None if offsets is None else tuple(offsets))
        entry = self.by_index[key]
        if isinstance(entry, StoredObject):
            return io.BytesIO(entry.data)
        try:
            current = self.ahead.pop(key, None)
            i = self.position[key] + 1
            if i < len(self.order) and self.order[i] not in self.ahead:
                self.ahead[self.order[i]] = self.pool.submit(self._produce, self.order[i])
            return current.result() if current is not None else self._produce(key)
        except BaseException as exc:  # torch wraps it; save() re-raises it as itself
            self.failed = exc
            raise

    def close(self) -> None:
        """Stop producing (after a failure the next tensor may still be under way)."""
        for future in self.ahead.values():
            future.cancel()
        self.pool.shutdown(wait=True)
        self.ahead.clear()


@contextlib.contextmanager
def _no_zip_crc32():
    """torch's writer stores every item with ``torch.save``, which computes a CRC-32 of the bytes
    (half of the write's CPU time); ``torch.load`` never checks it. Off for the duration."""
    from torch.utils.serialization import config

    before = config.save.compute_crc32
    config.save.compute_crc32 = False
    try:
        yield
    finally:
        config.save.compute_crc32 = before


def save(path: str, tensors: list[StoredTensor], objects: list[StoredObject]) -> None:
    """Write the entries as a megatron-core ``torch_dist`` checkpoint into the new directory
    ``path`` (module docstring). One writer thread and one producing ahead of it
    (:class:`_StreamingPlanner`), files synced, no zip CRC-32
    (:func:`_no_zip_crc32`); no process group needed."""
    from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from ._runtime import checkpoint_failures, one_torch_thread, raise_write_failure

    missing = [t.key for t in tensors if t.produce is None]
    if missing:
        raise RuntimeError(f"no data source for {missing[:3]}")  # a converter bug
    os.makedirs(path)
    writer = FileSystemWriter(path, single_file_per_rank=True, sync_files=True, thread_count=1)
    planner = _StreamingPlanner(tensors, objects)
    try:
        with _no_zip_crc32(), one_torch_thread():
            dcp_save({}, storage_writer=writer, planner=planner, no_dist=True)
    except checkpoint_failures() as exc:  # torch wraps what failed inside its writer
        if planner.failed is not None:  # producing a tensor failed, not writing it
            raise planner.failed from None
        raise_write_failure(exc, path)
        raise
    finally:
        planner.close()
    torch.save({}, os.path.join(path, "common.pt"))
    save_config(CheckpointingConfig("torch_dist"), path)


def _plain_fc1(sharded_state_dict: dict) -> dict:
    """At TP=1 the GLU fc1 factory (dense MLPs and experts alike) only splits the tensor into two
    views; plan the same global ``[gate ; up]`` tensor as one chunk instead (what megatron reads
    back at any TP). The factory's own two halves give the chunk's leading axes (layer, expert)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    out = {}
    for name, value in sharded_state_dict.items():
        if isinstance(value, ShardedTensorFactory):
            gate, up = value.build()
            lead = gate.prepend_axis_num
            if (gate.key != up.key or gate.global_offset[lead] != 0
                    or gate.global_shape[lead] != value.data.shape[0]):  # megatron changed: a bug guard
                raise RuntimeError(f"{name}: unexpected GLU fc1 factory layout")
            value = ShardedTensor.from_rank_offsets(
                value.key, value.data,
                *((axis, gate.global_offset[axis], gate.global_shape[axis]) for axis in range(lead)),
                replica_id=value.replica_id, prepend_axis_num=lead,
            )
        out[name] = value
    return out


def row_chunks(entry: StoredTensor, row_axis: int, max_bytes: int) -> list[StoredTensor]:
    """``entry`` split along ``row_axis`` into chunks of at most ``max_bytes`` (whole rows; a
    tensor without a dimension after ``row_axis`` stays whole). megatron and torch read any
    chunking back, at any TP."""
    shape = tuple(entry.shape)
    if len(shape) <= row_axis + 1:
        return [entry]
    rows = shape[row_axis]
    row_bytes = torch.Size(shape[row_axis + 1:]).numel() * entry.dtype.itemsize
    step = max(1, max_bytes // max(1, row_bytes))
    if step >= rows:
        return [entry]
    out = []
    for lo in range(0, rows, step):
        n = min(step, rows - lo)
        offsets = list(entry.offsets)
        offsets[row_axis] += lo
        out.append(StoredTensor(entry.key, entry.global_shape, tuple(offsets),
                                shape[:row_axis] + (n,) + shape[row_axis + 1:], entry.dtype))
    return out


CHUNK_BYTES = 32 * 1024 * 1024
"""The largest piece written as one item: with one piece produced ahead and torch.save's copy of
the bytes it writes, conversion holds about 3 x this above the interpreter, whatever the model
(a 70B model's embedding alone is 2 GB)."""


def save_model(mc, maps, tp: int, dtype: torch.dtype, path: str,
               fill: Callable[[object, Optional[int], torch.Tensor, int], None], progress: bool = True,
               chunk_bytes: Optional[int] = None) -> dict:
    """Write the weights of the project's model with config ``mc`` (vocabulary padded for
    ``tp``) into ``path``, a piece at a time. The model is built on the meta device only to take
    megatron's sharded layout (keys, shapes); each tensor is split into pieces of whole rows of at
    most ``chunk_bytes`` (default :data:`CHUNK_BYTES`; :func:`row_chunks`), and
    ``fill(param_map, layer, dest, row0)`` writes rows ``row0 .. row0 + len(dest)`` of one
    parameter (a :class:`~.mapping.ParamMap` of ``maps``, at global ``layer``, of expert
    ``param_map.expert`` for an expert weight; rows along its first dimension) into ``dest`` when
    the writer reaches that piece. Returns the seconds spent filling (``read``) and the rest
    (``write``)."""
    import time

    from tqdm import tqdm

    from ..models import NBDiffModel
    from ._runtime import single_process_group
    from .mapping import units

    # the vocabulary padded for the target TP, so the stored rows are what a run at that TP has;
    # RoPE scaling does not change the layout (and its table cannot be computed on meta)
    build_mc = dataclasses.replace(mc, make_vocab_size_divisible_by=mc.make_vocab_size_divisible_by * tp,
                                   rope_scaling=None)
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    source = {pm.megatron_name(layer): (pm, layer) for layer, unit in units(maps, mc) for pm in unit}
    with single_process_group(), torch.no_grad():
        tc = build_mc.transformer_config(tp=1, pp=1, dtype=dtype_name, perform_initialization=False,
                                         use_cpu_initialization=True)
        with torch.device("meta"):
            model = NBDiffModel(build_mc, tc)
        tensors, objects = entries_of(_plain_fc1(model.gpt.sharded_state_dict()))
        del model
    if set(tensors) != set(source):  # the table and the model disagree: a bug, not bad input
        raise RuntimeError(f"parameter map and model differ: {sorted(set(tensors) ^ set(source))}")
    total = sum(torch.Size(t.shape).numel() * t.dtype.itemsize for t in tensors.values())
    bar = tqdm(total=total, desc="converting", unit="B", unit_scale=True, disable=not progress)
    phases = {"read": 0.0, "write": 0.0}

    def producer(pm, layer, piece: StoredTensor, row0: int, lead: int):
        def produce() -> torch.Tensor:
            t0 = time.time()
            dest = torch.empty(piece.shape[lead:], dtype=piece.dtype)
            fill(pm, layer, dest, row0)
            phases["read"] += time.time() - t0
            bar.update(dest.numel() * dest.element_size())
            return dest.view(piece.shape)
        return produce

    pieces = []
    for name, entry in tensors.items():
        pm, layer = source[name]
        axis = len(pm.lead_shape(mc))  # stacked layers and experts carry leading axes (mapping.py)
        for piece in row_chunks(entry, axis, chunk_bytes or CHUNK_BYTES):
            piece.produce = producer(pm, layer, piece, piece.offsets[axis] - entry.offsets[axis], axis)
            pieces.append(piece)
    t0 = time.time()
    try:
        save(path, pieces, objects)
    finally:
        bar.close()
    phases["write"] = time.time() - t0 - phases["read"]
    return phases
