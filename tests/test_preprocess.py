"""tools/preprocess_data.py: JSONL and text into megatron-core indexed datasets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_nbdiff.data import Tokenizer
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
    """The CLI in a subprocess (once, for the real entry point) or its main() in this process."""
    if subprocess_run:
        return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)
    import contextlib
    import importlib.util
    import io
    import types

    spec = importlib.util.spec_from_file_location("preprocess_data", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = module.main(list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


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
