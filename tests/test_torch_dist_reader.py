"""``TensorFileReader`` (checkpoint/torch_dist_reader.py) reads what torch's reader reads: random
regions of global tensors stored in chunks split along rows, columns and the layer axis (as TP
and PP writers split them), fp32 and bf16, into destinations of the same or another dtype, through
the direct path, the buffered path and the torch fallback. The reference is the global tensor the
checkpoint was written from."""
import pytest
import torch

from megatron_nbdiff.checkpoint.megatron_to_hf import read_slices
from megatron_nbdiff.checkpoint.streaming_save import StoredTensor, save
from megatron_nbdiff.checkpoint.torch_dist_reader import TensorFileReader

# name -> (global shape, dtype, chunk boundaries per dimension)
TENSORS = {
    "rows": ((40, 6), torch.float32, ([0, 7, 21, 40], [0, 6])),
    "cols": ((3, 10, 12), torch.bfloat16, ([0, 1, 2, 3], [0, 10], [0, 5, 12])),  # layer x row-parallel TP
    "grid": ((9, 8), torch.float32, ([0, 4, 9], [0, 3, 8])),
    "whole": ((5,), torch.float32, ([0, 5],)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    tensors, entries = {}, []
    for key, (shape, dtype, cuts) in TENSORS.items():
        full = torch.randn(shape, generator=g).to(dtype)
        tensors[key] = full
        boxes = [[]]
        for c in cuts:
            boxes = [b + [(c[i], c[i + 1])] for b in boxes for i in range(len(c) - 1)]
        for box in boxes:
            part = full[tuple(slice(a, b) for a, b in box)].clone()
            entries.append(StoredTensor(key, shape, tuple(a for a, _ in box), tuple(part.shape), dtype,
                                        produce=lambda part=part: part))
    path = str(tmp_path_factory.mktemp("dcp") / "ckpt")
    save(path, entries, [])
    return path, tensors


def _boxes(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        lo = [int(torch.randint(0, s, (1,), generator=g)) for s in shape]
        hi = [int(torch.randint(a + 1, s + 1, (1,), generator=g)) for a, s in zip(lo, shape)]
        yield tuple(lo), tuple(b - a for a, b in zip(lo, hi))


@pytest.mark.parametrize("key", list(TENSORS))
@pytest.mark.parametrize("cast", [False, True], ids=["same-dtype", "cast"])
def test_random_regions_equal_the_global_tensor(checkpoint, key, cast):
    path, tensors = checkpoint
    full = tensors[key]
    out_dtype = torch.float64 if cast else full.dtype
    with TensorFileReader(path) as reader:
        for offsets, size in _boxes(full.shape, 25, seed=len(key)):
            dest = torch.full(size, float("nan"), dtype=out_dtype)
            reader.read(key, dest, offsets)
            want = full[tuple(slice(o, o + n) for o, n in zip(offsets, size))].to(out_dtype)
            assert torch.equal(dest, want), (key, offsets, size)
            # torch's own reader agrees
            ref = torch.empty(size, dtype=full.dtype)
            read_slices(path, {key: (ref, offsets)})
            assert torch.equal(ref.to(out_dtype), want)
        # every chunk was read from its bytes directly, not through the torch fallback
        assert reader._data and all(v is not None for v in reader._data.values())


def test_the_torch_fallback_reads_the_same(checkpoint, monkeypatch):
    path, tensors = checkpoint
    monkeypatch.setattr(TensorFileReader, "_data_offset", lambda self, key, chunk, dtype: None)
    with TensorFileReader(path) as reader:
        for key, full in tensors.items():
            for offsets, size in _boxes(full.shape, 5, seed=7):
                dest = torch.empty(size, dtype=full.dtype)
                reader.read(key, dest, offsets)
                assert torch.equal(dest, full[tuple(slice(o, o + n) for o, n in zip(offsets, size))])


def test_a_region_outside_the_stored_chunks_is_refused(tmp_path):
    from megatron_nbdiff.checkpoint.errors import ConversionError

    part = torch.ones(4, 3)
    path = str(tmp_path / "ckpt")
    save(path, [StoredTensor("t", (8, 3), (0, 0), (4, 3), torch.float32, produce=lambda: part)], [])
    with TensorFileReader(path) as reader:
        with pytest.raises(ConversionError, match=r"does not store all of t\[\[2, 0\] \+ \[4, 3\]\]"):
            reader.read("t", torch.empty(4, 3), (2, 0))
