"""No code path unpickles a file the user did not create in this run.

For each place megatron-core, torch or transformers would unpickle (``common.pt`` of a
distributed checkpoint, its ``.metadata`` index, the non-tensor items inside its shards, the
``data_cache/*.npy`` indices of megatron's ``GPTDataset``, an HF ``pytorch_model.bin``) a file is
planted whose unpickling creates a marker file, the side effect a malicious checkpoint would
have. Each test first shows that the planted file is live (the unrestricted reader creates the
marker), then that the real code path refuses it with a clear error and the marker does not
appear. ``compat.install_safe_loading`` is what makes the difference (``compat.py``)."""
import contextlib
import io
import json
import os
import pickle
import shutil

import numpy
import pytest
import torch

from megatron_nbdiff import compat
from megatron_nbdiff.checkpoint import convert_hf_to_megatron, load_model
from megatron_nbdiff.checkpoint.cli import megatron_to_hf_main
from megatron_nbdiff.cli import run_main
from megatron_nbdiff.errors import CheckpointError, DataError, NBDiffError
from megatron_nbdiff.inference import DecodingError, generate, load_runner
from megatron_nbdiff.inference.cli import main as generate_main

from _convert_workers import make_hf_checkpoint

VOCAB = 150


class PlantFile:
    """Unpickling this opens ``path`` for writing: it creates the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    compat.install_safe_loading()
    d = tmp_path_factory.mktemp("untrusted")
    hf = str(d / "hf")
    model = make_hf_checkpoint(hf, "llama", vocab=VOCAB, tokenizer_tokens=VOCAB)
    mg = str(d / "mg")
    convert_hf_to_megatron(hf, mg, mask_token="none", progress=False)
    yield dict(hf=hf, mg=mg, model=model)
    from megatron_nbdiff.parallel import destroy_parallel

    destroy_parallel()


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "side_effect_happened"
    yield path
    assert not path.exists(), "a planted pickle ran"


def _one_error(capsys, rc, code, *needles):
    cap = capsys.readouterr()
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert rc == code and len(errors) == 1 and "Traceback" not in cap.err, cap.err
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_common_pt_is_loaded_weights_only(ckpts, tmp_path, marker, monkeypatch, capsys):
    from megatron.core.dist_checkpointing.strategies import common as mcommon

    ckpt = shutil.copytree(ckpts["mg"], tmp_path / "mg")
    common = ckpt / "model" / "common.pt"
    torch.save({"planted": PlantFile(marker)}, common)
    # the environment asks torch for unrestricted loads wherever a caller does not choose
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with monkeypatch.context() as m:  # control: megatron's own loader runs it
        m.setattr(mcommon, "torch", torch)
        mcommon.TorchCommonLoadStrategy().load_common(ckpt / "model")
        assert marker.exists()
        marker.unlink()
    with pytest.raises(NBDiffError, match=r"common.pt: refused to unpickle: it names \S*open"):
        load_model(str(ckpt))
    rc = run_main(generate_main, ["--model", str(ckpt), "--prompt-file", _prompts(tmp_path)])
    _one_error(capsys, rc, 2, "common.pt: refused to unpickle", "could run code")


def _prompts(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt_ids": [3, 4]}) + "\n")
    return str(path)


def test_distcp_index_is_read_by_a_restricted_unpickler(ckpts, tmp_path, marker, monkeypatch, capsys):
    from torch.distributed.checkpoint import FileSystemReader, filesystem

    ckpt = shutil.copytree(ckpts["mg"], tmp_path / "mg")
    index = ckpt / "model" / ".metadata"
    index.write_bytes(pickle.dumps(PlantFile(marker)))
    with monkeypatch.context() as m:  # control: torch's reader runs it
        m.setattr(filesystem, "pickle", pickle)
        with contextlib.suppress(Exception):  # what breaks after the payload ran does not matter
            FileSystemReader(str(ckpt / "model")).read_metadata()
        assert marker.exists()
        marker.unlink()
    with pytest.raises(NBDiffError, match=r"\.metadata: refused to unpickle: it names \S*open"):
        load_model(str(ckpt))
    rc = run_main(megatron_to_hf_main, ["--megatron-dir", str(ckpt), "--out-dir", str(tmp_path / "out")])
    _one_error(capsys, rc, 2, ".metadata: refused to unpickle")
    assert not (tmp_path / "out").exists()


def test_metadata_allowlist():
    allowed = compat.metadata_global_allowed
    for module, name in [("torch.distributed.checkpoint.metadata", "Metadata"),
                         ("torch.distributed.checkpoint.metadata", "TensorStorageMetadata"),
                         ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
                         ("torch.distributed.checkpoint.planner", "WriteItemType"),
                         ("torch", "Size"), ("torch", "bfloat16"), ("torch.serialization", "_get_layout")]:
        assert allowed(module, name), (module, name)
    for module, name in [("builtins", "eval"), ("builtins", "open"), ("io", "open"), ("os", "system"),
                         ("torch", "load"), ("torch", "tensor"), ("subprocess", "Popen"),
                         ("torch.distributed.checkpoint.filesystem", "FileSystemReader"),
                         ("torch.distributed.checkpoint.metadata", "Enum")]:
        assert not allowed(module, name), (module, name)


def test_non_tensor_items_of_a_torch_dist_checkpoint_load_weights_only(tmp_path, marker, monkeypatch):
    """torch's load planner (megatron's inherits it) unpickles every non-tensor item of a shard
    with ``weights_only=False``; here it is weights-only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import default_planner

    compat.install_safe_loading()
    path = str(tmp_path / "dcp")
    dcp.save({"weight": torch.ones(3), "extra": PlantFile(marker)},
             storage_writer=dcp.FileSystemWriter(path), no_dist=True)
    assert not marker.exists()
    with monkeypatch.context() as m:  # control: torch's planner runs it
        m.setattr(default_planner, "torch", torch)
        dcp.load({"weight": torch.zeros(3), "extra": None}, storage_reader=dcp.FileSystemReader(path),
                 no_dist=True)
        assert marker.exists()
        marker.unlink()
    from megatron_nbdiff.checkpoint._runtime import checkpoint_failures, find_in

    state = {"weight": torch.zeros(3), "extra": None}
    with pytest.raises(checkpoint_failures()) as info:
        dcp.load(state, storage_reader=dcp.FileSystemReader(path), no_dist=True)
    refused = find_in(info.value, lambda e: isinstance(e, CheckpointError))
    assert refused is not None and "refused to unpickle: it names" in str(refused), info.value


def _indexed_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=numpy.int32)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        doc = torch.randint(1, 100, (int(torch.randint(5, 30, (1,), generator=g)),), generator=g)
        builder.add_document(doc.numpy(), [len(doc)])
    builder.finalize(prefix + ".idx")


class _Tokenizer:
    eod = 0
    vocab_size = 100
    unique_identifiers = {"class": "test-tokenizer"}


def _gpt_dataset(prefix, cache):
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    cfg = GPTDatasetConfig(random_seed=1, sequence_length=16, blend=([prefix], None), split="100,0,0",
                           path_to_cache=cache, tokenizer=_Tokenizer(), reset_position_ids=False,
                           reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [30, 0, 0], lambda: True, cfg).build()
    return train[0]["tokens"]


def test_gpt_dataset_cache_loads_without_pickle(tmp_path, marker, monkeypatch):
    """megatron's GPTDataset loads its cached indices with ``allow_pickle=True``: a pickle planted
    as a cache file would run when training starts. Here it is refused with a DataError naming it;
    genuine caches still load."""
    from megatron.core.datasets import gpt_dataset

    compat.install_safe_loading()
    prefix, cache = str(tmp_path / "corpus"), str(tmp_path / "data_cache")
    _indexed_dataset(prefix)
    first = _gpt_dataset(prefix, cache)  # builds and writes the cache
    assert torch.equal(torch.as_tensor(_gpt_dataset(prefix, cache)), torch.as_tensor(first))  # reads it
    planted = [os.path.join(cache, n) for n in os.listdir(cache) if n.endswith("shuffle_index.npy")]
    assert planted
    for path in planted:
        with open(path, "wb") as f:
            pickle.dump(PlantFile(marker), f)
    with monkeypatch.context() as m:  # control: megatron's own loader runs it
        m.setattr(gpt_dataset, "numpy", numpy)
        with contextlib.suppress(Exception):  # what breaks after the payload ran does not matter
            _gpt_dataset(prefix, cache)
        assert marker.exists()
        marker.unlink()
    with pytest.raises(DataError, match=r"shuffle_index.npy: refused to load: it holds pickled"):
        _gpt_dataset(prefix, cache)


def test_hf_pickle_weights_need_allow_pickle(ckpts, tmp_path, marker, capsys):
    """An HF directory whose weights are only a pickle is refused before anything reads it, with
    the file and the flag named; with allow_pickle a genuine one loads (weights-only) and decodes
    like the safetensors original."""
    evil = shutil.copytree(ckpts["hf"], tmp_path / "evil", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save({"planted": PlantFile(marker)}, evil / "pytorch_model.bin")
    with pytest.raises(DecodingError, match=r"pytorch_model.bin is a pickle.*allow_pickle"):
        load_runner(str(evil))
    rc = run_main(generate_main, ["--model", str(evil), "--prompt", "w3", "--mode", "ar"])
    _one_error(capsys, rc, 2, "pytorch_model.bin is a pickle", "--allow-pickle")
    good = shutil.copytree(ckpts["hf"], tmp_path / "good", ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(ckpts["model"].state_dict(), good / "pytorch_model.bin")
    with pytest.raises(DecodingError, match="--allow-pickle"):
        load_runner(str(good))
    prompt = [[3, 4, 5]]
    got = generate(str(good), prompt, mode="ar", max_new_tokens=5, stop_at_eos=False, allow_pickle=True)
    ref = generate(ckpts["hf"], prompt, mode="ar", max_new_tokens=5, stop_at_eos=False)
    assert got[0]["token_ids"] == ref[0]["token_ids"]
    # even with the flag, a pickle that names code is refused by the weights-only load
    with pytest.raises(DecodingError):
        load_runner(str(evil), allow_pickle=True)


def test_safe_loading_is_installed_by_compat_install_with_and_without_cuda(monkeypatch):
    """compat.install (called by initialize_parallel) installs safe loading even where CUDA is
    present and the CPU shims are not."""
    from megatron.core.dist_checkpointing.strategies import common as mcommon

    monkeypatch.setattr(compat, "_safe_loading", False)
    monkeypatch.setattr(mcommon, "torch", torch)
    monkeypatch.setattr(compat, "cuda_present", lambda: True)
    assert compat.install() is False
    assert mcommon.torch is not torch and mcommon.torch.load is compat._torch_load_weights_only
    assert mcommon.torch.Tensor is torch.Tensor


def test_numpy_load_refuses_pickled_arrays(tmp_path):
    """The patched loader refuses object arrays (pickled) and plain pickles, loads integer arrays."""
    from megatron.core.datasets import gpt_dataset

    compat.install_safe_loading()
    ok = tmp_path / "ok.npy"
    numpy.save(ok, numpy.arange(5, dtype=numpy.int64), allow_pickle=True)
    assert gpt_dataset.numpy.load(str(ok), allow_pickle=True, mmap_mode="r").tolist() == [0, 1, 2, 3, 4]
    objects = tmp_path / "objects.npy"
    numpy.save(objects, numpy.array([{"a": 1}], dtype=object), allow_pickle=True)
    for mmap in (None, "r"):
        with pytest.raises(DataError, match="objects.npy: refused to load"):
            gpt_dataset.numpy.load(str(objects), allow_pickle=True, mmap_mode=mmap)
    buf = io.BytesIO()
    numpy.save(buf, numpy.arange(3))
    assert gpt_dataset.numpy.load(io.BytesIO(buf.getvalue())).tolist() == [0, 1, 2]
