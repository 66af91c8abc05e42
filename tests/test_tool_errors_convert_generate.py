"""Bad input to the two converters and the decoding tool, table-driven: each case asserts the exit
status, exactly one ``error:`` line naming the problem (file, tensor, option; expected vs found),
no traceback, and no output left behind (no output directory, no temporary sibling). The cases
run in-process through ``megatron_nbdiff.cli.run_main`` (what the console scripts run); one
subprocess per tool proves the console path itself. Also: ``--force`` replaces only an earlier
conversion and does so atomically, ``--allow-nonfinite`` converts NaN/Inf with warnings and
notes, and a full disk (a patched writer raising ENOSPC; in the subprocess a real file-size
limit on megatron's writer processes) exits 1 with nothing left. Tiny random Llama (hidden 64, 2
layers, vocab 150), CPU."""
import errno
import json
import os
import resource
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf, read_metadata
from megatron_nbdiff.checkpoint.cli import hf_to_megatron_main, megatron_to_hf_main
from megatron_nbdiff.cli import run_main
from megatron_nbdiff.inference.cli import main as generate_main

from _convert_workers import make_hf_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = 150
NAN_TENSOR = "model.layers.0.mlp.down_proj.weight"
BIG_TENSOR = "model.embed_tokens.weight"  # holds 1e6: finite in fp32, infinite in fp16


def _edit_safetensors(directory, edits):
    from safetensors.torch import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    for name, (index, value) in edits.items():
        tensors[name][index] = value
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """An HF Llama with a tokenizer, its conversion (mask token appended) and export; the same HF
    model with a NaN and a 1e6 weight, and that one converted with --allow-nonfinite; the HF model
    saved as pytorch_model.bin only."""
    d = tmp_path_factory.mktemp("tools")
    hf = str(d / "hf")
    model = make_hf_checkpoint(hf, "llama", vocab=VOCAB, tokenizer_tokens=VOCAB)
    mg, exp = str(d / "mg"), str(d / "exp")
    convert_hf_to_megatron(hf, mg, mask_token="append", progress=False)
    convert_megatron_to_hf(mg, exp, progress=False)
    bad_hf = str(d / "hf_nonfinite")
    shutil.copytree(hf, bad_hf)
    _edit_safetensors(bad_hf, {NAN_TENSOR: ((0, 0), float("nan")), BIG_TENSOR: ((0, 0), 1e6)})
    bad_mg = str(d / "mg_nonfinite")
    with pytest.warns(UserWarning, match="holds 1 NaN"):
        convert_hf_to_megatron(bad_hf, bad_mg, mask_token="append", progress=False, allow_nonfinite=True)
    pickled = str(d / "hf_bin")  # the same model with its weights as a pickle only
    shutil.copytree(hf, pickled, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(model.state_dict(), os.path.join(pickled, "pytorch_model.bin"))
    yield dict(dir=str(d), hf=hf, mg=mg, exp=exp, bad_hf=bad_hf, bad_mg=bad_mg, pickled=pickled)
    from megatron_nbdiff.parallel import destroy_parallel

    destroy_parallel()


def refused(capsys, main, argv, code, *needles):
    """Run ``main`` through run_main; assert the exit status, one ``error:`` line (the last line
    of stderr) holding every needle, no traceback. Returns (error line, stdout)."""
    rc = run_main(main, argv)
    cap = capsys.readouterr()
    errors = [line for line in cap.err.splitlines() if line.startswith("error:")]
    assert rc == code, cap.err
    assert len(errors) == 1 and cap.err.rstrip().endswith(errors[0]), cap.err
    assert "Traceback" not in cap.err + cap.out
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0], cap.out


def assert_nothing_left(out):
    parent, base = os.path.split(os.path.abspath(out))
    assert not os.path.lexists(out), os.listdir(out)
    assert not [n for n in os.listdir(parent) if n.startswith(base + ".")]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _truncate(path, by):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - by)


def _foreign(tmp_path):
    d = tmp_path / "foreign"
    d.mkdir()
    (d / "notes.txt").write_text("keep me")
    return str(d)


# --- tools/convert_hf_to_megatron.py ----------------------------------------------------------

def _hf_garbage(c, t, m):
    d = _copy(c["hf"], str(t / "garbage"))
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(b"\xff" * 4096)  # a header length far beyond the file
    return [d]


def _hf_bad_header_json(c, t, m):
    d = _copy(c["hf"], str(t / "badjson"))
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(struct.pack("<Q", 16) + b"{not json at all")
    assert os.path.getsize(path) == size
    return [d]


def _hf_truncated(c, t, m):
    d = _copy(c["hf"], str(t / "trunc"))
    _truncate(os.path.join(d, "model.safetensors"), 1000)
    return [d]


def _hf_bad_index(c, t, m):
    d = _copy(c["hf"], str(t / "badindex"))
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": ["model.safetensors"]}, f)
    return [d]


def _hf_bin_only(c, t, m):
    return [c["pickled"]]


def _hf_no_space(c, t, monkeypatch):
    from megatron_nbdiff.checkpoint import fsutil

    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    return [c["hf"]]


class _FillsUp:
    """A writable stream that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, stream, room: int, path: str):
        self.stream, self.room, self.path = stream, room, path

    def write(self, data) -> int:
        n = memoryview(data).nbytes
        if n > self.room:
            self.stream.write(bytes(memoryview(data).cast("B")[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        self.room -= n
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def _hf_full_disk_while_writing(c, t, monkeypatch):
    """The disk fills up 1000 bytes into the first weights file torch's checkpoint writer opens."""
    import contextlib

    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    @contextlib.contextmanager
    def fills_up(self, path, mode):
        with real(self, path, mode) as stream:
            yield _FillsUp(stream, 1000, str(path)) if str(path).endswith(".distcp") else stream

    monkeypatch.setattr(FileSystem, "create_stream", fills_up)
    return [c["hf"]]


HF_CASES = {
    # id: (setup -> [hf dir] (+ extra args), extra args, exit status, needles)
    "usage": (None, ["--out-dir", "{out}"], 2, ["required", "--hf-dir"]),
    "not-an-int": (lambda c, t, m: [c["hf"]], ["--tp", "two"], 2, ["--tp", "invalid int value: 'two'"]),
    "tp-zero": (lambda c, t, m: [c["hf"]], ["--tp", "0"], 2, ["--tp must be a positive integer, found 0"]),
    "vocab-multiple-zero": (lambda c, t, m: [c["hf"]], ["--make-vocab-size-divisible-by", "0"], 2,
                            ["--make-vocab-size-divisible-by must be a positive integer, found 0"]),
    "no-input": (lambda c, t, m: [str(t / "nope")], [], 2, ["nope is not a directory"]),
    "garbage-shard": (_hf_garbage, [], 2, ["model.safetensors", "not a safetensors file"]),
    "corrupt-header": (_hf_bad_header_json, [], 2, ["model.safetensors has a corrupt safetensors header"]),
    "truncated-shard": (_hf_truncated, [], 2, ["model.safetensors is truncated", "needs", "the file has"]),
    "bad-index": (_hf_bad_index, [], 2, ["model.safetensors.index.json", "weight_map"]),
    "pickle-only": (_hf_bin_only, [], 2, ["pytorch_model.bin", "pickle", "safetensors"]),
    "nan-weight": (lambda c, t, m: [c["bad_hf"]], [], 2, [repr(NAN_TENSOR), "1 NaN", "--allow-nonfinite"]),
    "fp16-overflow": (lambda c, t, m: [c["bad_hf"]], ["--dtype", "fp16"], 2,
                      [repr(BIG_TENSOR), "from fp32 to fp16", "--allow-nonfinite"]),
    "no-space": (_hf_no_space, [], 1, ["[Errno 28]", "not enough free space", "1000 B are free"]),
    "full-disk-while-writing": (_hf_full_disk_while_writing, [], 1,
                                ["No space left on device", os.path.join("out", "model", "__0_0.distcp")]),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_convert_hf_to_megatron_bad_input(case, ckpts, tmp_path, capsys, monkeypatch):
    setup, extra, code, needles = HF_CASES[case]
    out = str(tmp_path / "out")
    if setup is None:
        argv = [a.format(out=out) for a in extra]
    else:
        argv = ["--hf-dir", setup(ckpts, tmp_path, monkeypatch)[0], "--out-dir", out, "--no-progress"] + extra
    refused(capsys, hf_to_megatron_main, argv, code, *needles)
    assert_nothing_left(out)


# --- output directories: what --force may replace ---------------------------------------------

def test_output_directories_that_are_never_replaced(ckpts, tmp_path, capsys, monkeypatch):
    """The current directory (and its parents), /, the home directory, a parent of the input and
    a folder of other files are refused, with and without --force, before any work."""
    work = tmp_path / "cwd"
    work.mkdir()
    (work / "nbdiff.json").write_text("{}")  # even a folder that looks like ours
    monkeypatch.chdir(work)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    foreign = _foreign(tmp_path)
    for tool, src_flag, src in ((hf_to_megatron_main, "--hf-dir", ckpts["hf"]),
                                (megatron_to_hf_main, "--megatron-dir", ckpts["mg"])):
        cases = [(".", "current directory"), (str(tmp_path), "current directory or one of its parents"),
                 ("/", "root directory"), (str(home), "home directory"),
                 (os.path.dirname(src), "overlaps the input"), (src, "overlaps the input"),
                 (foreign, "not a checkpoint of megatron_nbdiff")]
        for out, needle in cases:
            for force in ([], ["--force"]):
                refused(capsys, tool, [src_flag, src, "--out-dir", out, "--no-progress"] + force, 2, needle)
    assert os.listdir(foreign) == ["notes.txt"] and os.listdir(work) == ["nbdiff.json"]
    assert os.listdir(home) == []


def test_force_replaces_an_earlier_export_atomically(ckpts, tmp_path, capsys, monkeypatch):
    """--force swaps the new output in with one atomic exchange (the old directory is never
    renamed away first), removes temporaries of dead runs, and keeps the old output when the new
    one fails."""
    from megatron_nbdiff.checkpoint import fsutil

    out = str(tmp_path / "out")
    args = ["--megatron-dir", ckpts["mg"], "--out-dir", out, "--no-progress"]
    assert run_main(megatron_to_hf_main, args) == 0
    (tmp_path / "out" / "stale.txt").write_text("from the first export")
    refused(capsys, megatron_to_hf_main, args, 2, "not empty", "--force")
    dead = 2 ** 22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
    leftover = tmp_path / f"out.tmp-{dead}"
    leftover.mkdir()  # what a killed run leaves
    real_rename = os.rename

    def rename(a, b, *rest):
        assert os.path.abspath(a) != out, "the old output was renamed away: not atomic"
        return real_rename(a, b, *rest)

    monkeypatch.setattr(fsutil.os, "rename", rename)
    assert run_main(megatron_to_hf_main, args + ["--force", "--dtype", "bf16"]) == 0
    assert "exported" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "stale.txt")) and not leftover.exists()
    assert read_metadata(out, kind="hf").dtype == "bf16"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.")]
    monkeypatch.setattr(fsutil.os, "rename", real_rename)
    # a replacement that fails after its shards are written leaves the previous output as it was
    before = sorted(os.listdir(out))
    from megatron_nbdiff.checkpoint import megatron_to_hf

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    config_writer = megatron_to_hf.hf_config_for_export
    monkeypatch.setattr(megatron_to_hf, "hf_config_for_export", full_disk)
    refused(capsys, megatron_to_hf_main, args + ["--force"], 1, "No space left")
    assert sorted(os.listdir(out)) == before and read_metadata(out, kind="hf").dtype == "bf16"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.")]
    monkeypatch.setattr(megatron_to_hf, "hf_config_for_export", config_writer)
    # where the filesystem cannot exchange, two renames (the old output aside first) still work
    monkeypatch.setattr(fsutil, "exchange", lambda a, b: False)
    assert run_main(megatron_to_hf_main, args + ["--force"]) == 0
    assert read_metadata(out, kind="hf").dtype == "fp32"
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out.")]


# --- tools/convert_megatron_to_hf.py ----------------------------------------------------------

def _mg_copy(c, t):
    return _copy(c["mg"], str(t / "mg"))


def _mg_truncated_json(c, t, m=None):
    d = _mg_copy(c, t)
    _truncate(os.path.join(d, "nbdiff.json"), 100)
    return d


def _mg_missing_shard(c, t, m=None):
    d = _mg_copy(c, t)
    os.remove(os.path.join(d, "model", "__0_0.distcp"))
    return d


def _mg_truncated_shard(c, t, m=None):
    d = _mg_copy(c, t)
    _truncate(os.path.join(d, "model", "__0_0.distcp"), 100)
    return d


def _mg_truncated_index(c, t, m=None):
    d = _mg_copy(c, t)
    _truncate(os.path.join(d, "model", ".metadata"), 2000)
    return d


def _mg_no_megatron_metadata(c, t, m=None):
    d = _mg_copy(c, t)
    os.remove(os.path.join(d, "model", "metadata.json"))
    return d


def _mg_full_disk_while_writing(c, t, monkeypatch):
    from megatron_nbdiff.checkpoint.safetensors_io import ShardWriter

    write = ShardWriter.write

    def full_disk(self, name, tensor, row0=0):
        if self.written:  # the first tensor fits, the second does not
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path)
        return write(self, name, tensor, row0)

    monkeypatch.setattr(ShardWriter, "write", full_disk)
    return c["mg"]


def _mg_no_space(c, t, monkeypatch):
    from megatron_nbdiff.checkpoint import fsutil

    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    return c["mg"]


MG_CASES = {
    "usage": (lambda c, t, m: c["mg"], ["--dtype", "fp8"], 2, ["--dtype", "invalid choice: 'fp8'"]),
    "not-a-checkpoint": (lambda c, t, m: c["hf"], [], 2, ["no nbdiff.json"]),
    "truncated-nbdiff-json": (_mg_truncated_json, [], 2, ["nbdiff.json", "cannot read"]),
    "missing-shard": (_mg_missing_shard, [], 2, ["__0_0.distcp is missing"]),
    "truncated-shard": (_mg_truncated_shard, [], 2, ["__0_0.distcp is truncated", "needs", "the file has"]),
    "truncated-index": (_mg_truncated_index, [], 2, [".metadata", "truncated or corrupt checkpoint metadata"]),
    "no-megatron-metadata": (_mg_no_megatron_metadata, [], 2, ["no metadata.json"]),
    "bad-shard-size": (lambda c, t, m: c["mg"], ["--max-shard-size", "lots"], 2, ["cannot read size 'lots'"]),
    "nan-weight": (lambda c, t, m: c["bad_mg"], [], 2, [repr(NAN_TENSOR), "1 NaN", "--allow-nonfinite"]),
    "fp16-overflow": (lambda c, t, m: c["bad_mg"], ["--dtype", "fp16"], 2,
                      [repr(BIG_TENSOR), "from fp32 to fp16", "--allow-nonfinite"]),
    "no-space": (_mg_no_space, [], 1, ["[Errno 28]", "not enough free space", "10 B are free"]),
    "full-disk-while-writing": (_mg_full_disk_while_writing, [], 1,
                                ["No space left on device", os.path.join("out", "model-00001-of-00001")]),
}


@pytest.mark.parametrize("case", list(MG_CASES))
def test_convert_megatron_to_hf_bad_input(case, ckpts, tmp_path, capsys, monkeypatch):
    setup, extra, code, needles = MG_CASES[case]
    out = str(tmp_path / "out")
    src = setup(ckpts, tmp_path, monkeypatch)
    refused(capsys, megatron_to_hf_main, ["--megatron-dir", src, "--out-dir", out, "--no-progress"] + extra,
            code, *needles)
    assert_nothing_left(out)


def test_allow_nonfinite_converts_with_warnings_and_notes(ckpts, tmp_path, capsys):
    """The converted checkpoint of the NaN/1e6 model says so in nbdiff.json; its fp16 export with
    --allow-nonfinite warns about the NaN and the overflow and notes both."""
    notes = read_metadata(ckpts["bad_mg"]).notes
    assert any(repr(NAN_TENSOR) in n and "1 NaN" in n for n in notes), notes
    out = str(tmp_path / "out")
    with pytest.warns(UserWarning) as caught:
        assert run_main(megatron_to_hf_main, ["--megatron-dir", ckpts["bad_mg"], "--out-dir", out,
                                              "--dtype", "fp16", "--allow-nonfinite", "--no-progress"]) == 0
    said = " ".join(str(w.message) for w in caught)
    assert repr(NAN_TENSOR) in said and repr(BIG_TENSOR) in said and "from fp32 to fp16" in said
    notes = read_metadata(out, kind="hf").notes
    assert any(repr(BIG_TENSOR) in n and "1 infinite" in n for n in notes), notes


# --- tools/generate.py ------------------------------------------------------------------------

def _prompt_file(t, lines, name="p.jsonl"):
    path = t / name
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode()
                              for line in lines))
    return str(path)


def _run_folder_without_checkpoint(c, t):
    run = t / "run"
    (run / "checkpoints" / "step_0000010").mkdir(parents=True)  # a save that never completed
    (run / "checkpoints" / "latest").write_text("step_0000010")
    return ["--model", str(run), "--prompt", "w3"]


GEN_CASES = {
    "usage": (lambda c, t: ["--model", c["exp"]], 2, ["one of the arguments --prompt --prompt-file is required"]),
    "batch-size-0": (lambda c, t: ["--model", c["exp"], "--prompt-file", _prompt_file(t, [{"prompt": "w3"}]),
                                   "--batch-size", "0"], 2, ["--batch-size must be >= 1, found 0"]),
    "max-new-tokens-0": (lambda c, t: ["--model", c["exp"], "--prompt", "w3", "--max-new-tokens", "0"], 2,
                         ["max_new_tokens must be >= 1, found 0"]),
    "max-new-tokens-negative": (lambda c, t: ["--model", c["exp"], "--prompt", "w3", "--max-new-tokens", "-5"],
                                2, ["max_new_tokens must be >= 1, found -5"]),
    "threshold-0": (lambda c, t: ["--model", c["exp"], "--prompt", "w3", "--threshold", "0"], 2,
                    ["threshold must lie in (0, 1], found 0.0"]),
    "threshold-above-1": (lambda c, t: ["--model", c["exp"], "--prompt", "w3", "--threshold", "1.01"], 2,
                          ["threshold must lie in (0, 1], found 1.01"]),
    "threshold-nan": (lambda c, t: ["--model", c["exp"], "--prompt", "w3", "--threshold", "nan"], 2,
                      ["threshold must lie in (0, 1], found nan"]),
    "no-model": (lambda c, t: ["--model", str(t / "nope"), "--prompt", "w3"], 2, ["model directory not found"]),
    "no-prompt-file": (lambda c, t: ["--model", c["exp"], "--prompt-file", str(t / "nope.jsonl")], 2,
                       ["prompt file not found"]),
    "prompt-too-long": (lambda c, t: ["--model", c["exp"], "--prompt", "w3 " * 60, "--max-new-tokens", "8"], 2,
                        ["prompt 0 has 60 tokens", "needs 68 positions", "maximum length of 64",
                         "shorten the prompt"]),
    "prompt-plus-new-tokens-too-long": (lambda c, t: ["--model", c["exp"], "--prompt", "w3 " * 30], 2,
                                        ["needs 94 positions", "lower max_new_tokens to 34"]),
    "prompt-file-line-too-long": (lambda c, t: ["--model", c["exp"], "--max-new-tokens", "4", "--prompt-file",
                                                _prompt_file(t, [{"prompt": "w3 w4"}, {"prompt": "w5 " * 70}])],
                                  2, ["p.jsonl line 2 has 70 tokens", "maximum length of 64"]),
    "prompt-file-bad-id": (lambda c, t: ["--model", c["exp"], "--prompt-file",
                                         _prompt_file(t, [{"prompt_ids": [3, 999]}])], 2,
                           ["p.jsonl line 1: token ids must lie in [0, 151), found 999"]),
    "prompt-file-not-utf8": (lambda c, t: ["--model", c["exp"], "--prompt-file",
                                           _prompt_file(t, [{"prompt": "w3"}, b'{"prompt": "\xff"}\n'])], 2,
                             ["p.jsonl line 2: not valid UTF-8"]),
    "megatron-missing-shard": (lambda c, t: ["--model", _mg_missing_shard(c, t), "--prompt", "w3"], 2,
                               ["__0_0.distcp is missing"]),
    "truncated-nbdiff-json": (lambda c, t: ["--model", _truncated_export(c, t), "--prompt", "w3"], 2,
                              ["nbdiff.json", "cannot read"]),
    "pickle-only": (lambda c, t: ["--model", c["pickled"], "--prompt", "w3", "--mode", "ar"], 2,
                    ["pytorch_model.bin is a pickle", "--allow-pickle"]),
    "run-folder-without-complete-checkpoint": (lambda c, t: _run_folder_without_checkpoint(c, t), 2,
                                               ["without a complete checkpoint"]),
}


def _truncated_export(c, t):
    d = _copy(c["exp"], str(t / "exp"))
    _truncate(os.path.join(d, "nbdiff.json"), 50)
    return d


@pytest.mark.parametrize("case", list(GEN_CASES))
def test_generate_bad_input(case, ckpts, tmp_path, capsys):
    build, code, needles = GEN_CASES[case]
    _, out = refused(capsys, generate_main, build(ckpts, tmp_path), code, *needles)
    assert out == ""  # nothing decoded, not even the prompts before a bad one


def test_generate_prompt_file_decodes_every_line(ckpts, tmp_path, capsys):
    """The checks do not refuse good input: two prompts, two JSON lines."""
    pf = _prompt_file(tmp_path, [{"prompt": "w3 w4"}, {"prompt_ids": [5, 6, 7]}])
    assert run_main(generate_main, ["--model", ckpts["exp"], "--prompt-file", pf, "--max-new-tokens", "6",
                                    "--batch-size", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r.get("prompt", r.get("prompt_ids")) for r in rows] == ["w3 w4", [5, 6, 7]]
    assert all(len(r["token_ids"]) <= 6 for r in rows)


# --- the console path: one subprocess per tool ------------------------------------------------

def _console(tool, *args, preexec_fn=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", tool), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300, preexec_fn=preexec_fn)


def _one_error_line(p, code, *needles):
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == code, p.stderr
    assert "Traceback" not in p.stderr
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], p.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def test_console_convert_hf_to_megatron_with_a_real_write_failure(ckpts, tmp_path):
    """A file-size limit makes megatron's own checkpoint writer processes fail mid-shard (what a
    full disk does): exit 1, one line, no output and no temporary left."""
    out = str(tmp_path / "out")

    def limit_file_size():  # Python starts with SIGXFSZ ignored: writes past the limit fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    p = _console("convert_hf_to_megatron.py", "--hf-dir", ckpts["hf"], "--out-dir", out, "--no-progress",
                 preexec_fn=limit_file_size)
    _one_error_line(p, 1, "cannot write the checkpoint", out)
    assert_nothing_left(out)


def test_console_convert_megatron_to_hf(ckpts, tmp_path):
    out = str(tmp_path / "out")
    p = _console("convert_megatron_to_hf.py", "--megatron-dir", _mg_truncated_shard(ckpts, tmp_path),
                 "--out-dir", out, "--no-progress")
    _one_error_line(p, 2, "__0_0.distcp is truncated")
    assert_nothing_left(out)


def test_console_generate(ckpts):
    p = _console("generate.py", "--model", ckpts["exp"], "--prompt", "w3 " * 80, "--max-new-tokens", "4")
    _one_error_line(p, 2, "prompt 0 has 80 tokens", "maximum length of 64")
    assert p.stdout == ""
