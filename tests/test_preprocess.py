"""Preprocessing (megatron_nbdiff.data.preprocess, tools/preprocess_data.py): JSONL and text into
megatron-core indexed datasets; no overwrite without --force, the publish order of the pair,
stale temporaries, non-UTF-8 input, Ctrl-C, and bad input as one error line."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.data import Tokenizer
from megatron_nbdiff.data import preprocess as pp
from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
DOCS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat watched",
    "numbers: 12 + 30 = 42",
    "diffusion models denoise blocks of tokens in parallel",
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_bpe_tokenizer(DOCS * 5, 300, str(tmp_path_factory.mktemp("tok")))


def run_tool(*args, subprocess_run=False):
    """The CLI in a subprocess (tools/preprocess_data.py, the real entry point) or its main()
    through run_main in this process."""
    if subprocess_run:
        return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)
    import contextlib
    import io
    import types

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(pp.main, list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def write_corpus(path, docs=DOCS):
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return str(path)


def test_jsonl_round_trip(tmp_path, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "corpus.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prefix = str(tmp_path / "out" / "corpus")
    r = run_tool("--input", str(src), "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet",
                 subprocess_run=True)
    assert r.returncode == 0, r.stderr
    assert "4 documents" in r.stdout
    ds = IndexedDataset(prefix)
    tok = Tokenizer(tokenizer_dir)
    assert len(ds) == len(DOCS)
    for i, doc in enumerate(DOCS):
        ids = ds[i].tolist()
        assert ids[-1] == tok.eod_id
        assert tok.decode(ids[:-1]) == doc
    assert ds[0].dtype == np.uint16
    assert sorted(os.listdir(tmp_path / "out")) == ["corpus.bin", "corpus.idx"]


def test_text_paragraphs_and_no_eod(tmp_path, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    src = tmp_path / "corpus.txt"
    src.write_text("first para\nstill first\n\nsecond para\n")
    prefix = str(tmp_path / "t")
    r = run_tool("--input", str(src), "--tokenizer", tokenizer_dir, "--output-prefix", prefix,
                 "--no-eod", "--quiet")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(prefix)
    tok = Tokenizer(tokenizer_dir)
    assert [tok.decode(ds[i].tolist()) for i in range(len(ds))] == ["first para\nstill first\n", "second para\n"]


@pytest.mark.parametrize("content,message", [
    ('{"text": "ok"}\n{"text": \n', "corpus.jsonl:2: not valid JSON"),
    ('{"body": "x"}\n', "corpus.jsonl:1: no key 'text'"),
    ('{"text": 3}\n', "'text' must be a string"),
])
def test_bad_input_is_reported_and_leaves_nothing(tmp_path, tokenizer_dir, content, message):
    src = tmp_path / "corpus.jsonl"
    src.write_text(content)
    prefix = str(tmp_path / "out" / "c")
    r = run_tool("--input", str(src), "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet")
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr
    assert os.listdir(tmp_path / "out") == []


def test_missing_input_and_tokenizer(tmp_path, tokenizer_dir):
    r = run_tool("--input", str(tmp_path / "nope.jsonl"), "--tokenizer", tokenizer_dir,
                 "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "input file not found" in r.stderr
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "a"}\n')
    r = run_tool("--input", str(src), "--tokenizer", str(tmp_path / "no_tok"), "--output-prefix", str(tmp_path / "x"))
    assert r.returncode == 2 and "tokenizer not found" in r.stderr


def test_sentencepiece_model(tmp_path):
    import sentencepiece as spm
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(DOCS * 20), model_prefix=str(tmp_path / "sp"), vocab_size=40,
        model_type="unigram", eos_id=2, bos_id=1, unk_id=0, pad_id=-1,
    )
    model = str(tmp_path / "sp.model")
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    r = run_tool("--input", str(src), "--tokenizer", model, "--output-prefix", str(tmp_path / "o"), "--quiet")
    assert r.returncode == 0, r.stderr
    tok = Tokenizer(model)
    ds = IndexedDataset(str(tmp_path / "o"))
    assert ds[1].tolist()[-1] == tok.eod_id == 2
    assert tok.decode(ds[1].tolist()[:-1]) == DOCS[1]


def test_split_digits_tokenizer(tmp_path):
    docs = [f"Q: {a}+{b}= A: {a + b}" for a in range(10, 99) for b in range(10, 99, 7)] * 2
    merged = Tokenizer(train_bpe_tokenizer(docs, 400, str(tmp_path / "merged")))
    split = Tokenizer(train_bpe_tokenizer(docs, 400, str(tmp_path / "split"), split_digits=True))
    text = "Q: 23+58= A: 81"
    pieces = [split.decode([i]) for i in split.encode(text)]
    assert split.decode(split.encode(text)) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["2", "3", "5", "8", "8", "1"]
    # without the option BPE learns multi-digit number tokens from the same corpus
    assert any(sum(c.isdigit() for c in merged.decode([i])) > 1 for i in merged.encode(text))


# -- reliability -------------------------------------------------------------------------------------
def dataset_bytes(prefix):
    return {s: open(prefix + s, "rb").read() for s in (".bin", ".idx")}


def test_existing_dataset_needs_force_and_force_replaces_only_a_pair(tmp_path, tokenizer_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(tmp_path / "c")
    first = write_corpus(tmp_path / "a.jsonl", DOCS[:2])
    second = write_corpus(tmp_path / "b.jsonl", DOCS)
    r = run_tool("--input", first, "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet")
    assert r.returncode == 0, r.stderr
    old = dataset_bytes(prefix)
    r = run_tool("--input", second, "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet")
    assert r.returncode == 2 and f"{prefix}.bin and {prefix}.idx already exist: pass --force" in r.stderr
    assert dataset_bytes(prefix) == old
    r = run_tool("--input", second, "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet", "--force")
    assert r.returncode == 0, r.stderr
    assert len(IndexedDataset(prefix)) == len(DOCS)
    # a lone .bin (a publish that was killed) also counts as existing
    os.remove(prefix + ".idx")
    r = run_tool("--input", second, "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet")
    assert r.returncode == 2 and f"{prefix}.bin already exists" in r.stderr
    # --force never replaces what is not a dataset pair
    other = str(tmp_path / "notes")
    with open(other + ".idx", "w") as f:
        f.write("my notes\n")
    r = run_tool("--input", second, "--tokenizer", tokenizer_dir, "--output-prefix", other, "--quiet", "--force")
    assert r.returncode == 2 and "is not an indexed-dataset index" in r.stderr
    assert open(other + ".idx").read() == "my notes\n" and not os.path.exists(other + ".bin")
    os.mkdir(str(tmp_path / "dir") + ".bin")
    r = run_tool("--input", second, "--tokenizer", tokenizer_dir, "--output-prefix", str(tmp_path / "dir"),
                 "--quiet", "--force")
    assert r.returncode == 2 and "is not a regular file" in r.stderr


def test_a_killed_publish_never_pairs_a_new_bin_with_an_old_idx(tmp_path, tokenizer_dir, monkeypatch):
    """The .idx is removed before the new .bin moves in and renamed last: stopped just before the
    last rename, the prefix has the new .bin and no .idx, which readers refuse."""
    from megatron_nbdiff.data.datasets import check_prefix
    from megatron_nbdiff.errors import DataError

    prefix = str(tmp_path / "c")
    assert run_tool("--input", write_corpus(tmp_path / "a.jsonl", DOCS[:1]), "--tokenizer", tokenizer_dir,
                    "--output-prefix", prefix, "--quiet").returncode == 0
    old = dataset_bytes(prefix)
    real_replace = os.replace

    def killed_before_the_index(src, dst):
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(pp.os, "replace", killed_before_the_index)
    r = run_tool("--input", write_corpus(tmp_path / "b.jsonl"), "--tokenizer", tokenizer_dir,
                 "--output-prefix", prefix, "--quiet", "--force")
    monkeypatch.undo()
    assert r.returncode == 130 and r.stderr.strip() == "error: interrupted"
    assert open(prefix + ".bin", "rb").read() != old[".bin"] and not os.path.exists(prefix + ".idx")
    with pytest.raises(DataError, match="missing .*c.idx"):
        check_prefix(prefix)
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b.jsonl", "c.bin"]  # no temporaries left
    # and the reader check catches a .bin and an .idx of different runs
    with open(prefix + ".idx", "wb") as f:
        f.write(old[".idx"])
    with pytest.raises(DataError, match="the index expects"):
        check_prefix(prefix)


def test_temporaries_of_dead_runs_are_removed(tmp_path, tokenizer_dir):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    prefix = tmp_path / "c"
    stale = [f"c.tmp-{dead.pid}.bin", f"c.tmp-{dead.pid}.idx"]
    running = "c.tmp-1.bin"  # pid 1 always runs: another process's work in progress
    unrelated = f"other.tmp-{dead.pid}.bin"
    for name in stale + [running, unrelated]:
        (tmp_path / name).write_bytes(b"x")
    r = run_tool("--input", write_corpus(tmp_path / "a.jsonl"), "--tokenizer", tokenizer_dir,
                 "--output-prefix", str(prefix), "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(["a.jsonl", "c.bin", "c.idx", running, unrelated])


@pytest.mark.parametrize("name,content", [
    ("corpus.jsonl", b'{"text": "fine"}\n{"text": "caf\xe9"}\n'),
    ("corpus.txt", b"fine\n\ncaf\xe9 latin-1\n"),
])
def test_non_utf8_corpus_names_the_line(tmp_path, tokenizer_dir, name, content):
    src = tmp_path / name
    src.write_bytes(content)
    prefix = str(tmp_path / "out" / "c")
    r = run_tool("--input", str(src), "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet")
    line = 2 if name.endswith(".jsonl") else 3
    assert r.returncode == 2 and r.stderr.strip() == f"error: {src} line {line}: not valid UTF-8"
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("workers", [1, 2])
def test_ctrl_c_exits_130_with_one_line(tmp_path, tokenizer_dir, workers):
    """A real SIGINT (to the tool's whole process group, as a terminal sends it) while the tool
    waits for more of its corpus (a FIFO): exit 130, one line, no traceback from the tool or its
    workers, no temporary or partial dataset left."""
    fifo = str(tmp_path / "corpus.jsonl")
    os.mkfifo(fifo)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, TOOL, "--input", fifo, "--tokenizer", tokenizer_dir,
                             "--output-prefix", str(out / "c"), "--quiet", "--workers", str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    fd = None
    try:
        deadline = time.time() + 120
        while fd is None:  # opening the write end succeeds once the tool reads the corpus
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.communicate()
                time.sleep(0.05)
        os.write(fd, (json.dumps({"text": DOCS[0]}) + "\n").encode())
        assert [n for n in os.listdir(out) if ".tmp-" in n]  # the tool is writing its temporaries
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if fd is not None:
            os.close(fd)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert "Traceback" not in stderr and stderr.count("error:") == 1
    assert os.listdir(out) == []


def test_bad_inputs_on_the_command_line(tmp_path, tokenizer_dir):
    """tools/preprocess_data.py as a user runs it: exit 2, exactly one error line naming the
    problem, no traceback, nothing written."""
    good = write_corpus(tmp_path / "good.jsonl")
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    taken = tmp_path / "taken"
    (tmp_path / "taken.bin").write_bytes(b"")
    missing = str(tmp_path / "missing.jsonl")
    for args, message in [
        (["--input", missing, "--tokenizer", tokenizer_dir, "--output-prefix", str(tmp_path / "o1")],
         f"input file not found: {missing}"),
        (["--input", good, "--output-prefix", str(tmp_path / "o4")],
         "the following arguments are required: --tokenizer"),
        (["--input", good, "--tokenizer", tokenizer_dir, "--output-prefix", str(taken)],
         f"{taken}.bin already exists: pass --force"),
        (["--input", good, "--tokenizer", str(tmp_path / "no_tok"), "--output-prefix", str(tmp_path / "o2")],
         "tokenizer not found"),
        (["--input", str(latin), "--tokenizer", tokenizer_dir, "--output-prefix", str(tmp_path / "o3")],
         f"{latin} line 2: not valid UTF-8"),
    ]:
        before = sorted(os.listdir(tmp_path))
        r = run_tool(*args, "--quiet", subprocess_run=True)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert r.returncode == 2, (args, r.stderr)
        assert len(errors) == 1 and message in errors[0], (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert sorted(os.listdir(tmp_path)) == before
