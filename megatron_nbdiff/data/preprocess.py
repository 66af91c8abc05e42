"""Tokenise a JSONL or text corpus into a megatron-core indexed dataset (``PREFIX.bin`` +
``PREFIX.idx``).

    nbdiff-preprocess --input corpus.jsonl --tokenizer TOKENIZER_DIR_OR_MODEL \\
        --output-prefix data/corpus [--json-key text] [--no-eod] [--force]

JSONL (``.jsonl`` / ``.json``): one object per line, the text under ``--json-key``. Any other
file: one document per blank-line-separated paragraph. Each document is followed by the
tokenizer's end-of-document token unless ``--no-eod``. The corpus must be UTF-8; the first line
that is not is reported by number.

An existing dataset (``PREFIX.bin`` or ``PREFIX.idx``) is not overwritten without ``--force``, and
``--force`` only replaces files that are a dataset pair (regular files; an ``.idx`` with a
megatron index header).

Writing order, so that an interrupted or killed run never leaves a ``.bin`` and an ``.idx`` of two
different runs side by side:

1. both files are written to ``PREFIX.tmp-PID.bin`` / ``PREFIX.tmp-PID.idx`` and flushed to disk;
2. an old ``PREFIX.idx`` is deleted (from here the old pair is incomplete, and readers refuse a
   prefix without its ``.idx``);
3. the new ``.bin`` is renamed to ``PREFIX.bin``;
4. the new ``.idx`` is renamed to ``PREFIX.idx`` last: the index is the commit mark.

A kill between 2 and 4 leaves a ``PREFIX.bin`` without ``PREFIX.idx`` (``--force`` replaces it);
readers also compare the ``.bin`` size with the lengths the ``.idx`` records
(:func:`megatron_nbdiff.data.datasets.check_prefix`). Temporaries that a killed run left behind
(their PID is no longer running) are removed when the next run on the same prefix starts.
"""
from __future__ import annotations

import json
import os
import re
import sys
import time
from argparse import RawDescriptionHelpFormatter
from typing import Iterator, Optional, Sequence

from ..cli import ArgumentParser, entry, run_main
from ..errors import DataError

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's .idx magic (indexed_dataset._INDEX_HEADER)


# -- reading ------------------------------------------------------------------------------------
def _lines(path: str) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line of ``path``, decoded as UTF-8 one line at a time so
    that an undecodable byte is reported with its line; newlines are normalised to ``\\n``."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path} line {n}: not valid UTF-8") from None
            yield n, line.replace("\r\n", "\n").replace("\r", "\n")


def iter_documents(path: str, json_key: str = "text") -> Iterator[str]:
    """The documents of a corpus: the ``json_key`` strings of a JSONL file, else the
    blank-line-separated paragraphs of a text file."""
    if path.endswith((".jsonl", ".json")):
        for n, line in _lines(path):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or json_key not in obj:
                raise DataError(f"{path}:{n}: no key {json_key!r} in the JSON object")
            if not isinstance(obj[json_key], str):
                raise DataError(f"{path}:{n}: {json_key!r} must be a string, found {type(obj[json_key]).__name__}")
            yield obj[json_key]
        return
    paragraph: list[str] = []
    for _, line in _lines(path):
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield "".join(paragraph)
            paragraph = []
    if paragraph:
        yield "".join(paragraph)


# -- the output files ---------------------------------------------------------------------------
def temporary_prefix(output_prefix: str, pid: Optional[int] = None) -> str:
    """Where a run with process id ``pid`` writes its dataset before publishing it."""
    return f"{output_prefix}.tmp-{os.getpid() if pid is None else pid}"


def _pid_running(pid: int) -> bool:
    if pid < 1:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(output_prefix: str) -> list[str]:
    """Delete the ``PREFIX.tmp-PID.bin`` / ``.idx`` files of runs whose PID is no longer running
    (a killed earlier run); return what was deleted. Those of a running process are kept."""
    directory, name = os.path.split(os.path.abspath(output_prefix))
    pattern = re.compile(re.escape(name) + r"\.tmp-(\d+)\.(bin|idx)")
    removed = []
    if not os.path.isdir(directory):
        return removed
    for entry_name in sorted(os.listdir(directory)):
        m = pattern.fullmatch(entry_name)
        path = os.path.join(directory, entry_name)
        if m and not _pid_running(int(m.group(1))) and os.path.isfile(path):
            os.remove(path)
            removed.append(path)
    return removed


def check_output(output_prefix: str, force: bool) -> None:
    """Refuse to overwrite an existing dataset without ``force``, and anything that is not a
    dataset pair even with it."""
    existing = [output_prefix + s for s in (".bin", ".idx") if os.path.lexists(output_prefix + s)]
    if not existing:
        return
    if not force:
        verb = "already exists" if len(existing) == 1 else "already exist"
        raise DataError(f"{' and '.join(existing)} {verb}: pass --force to replace the dataset")
    for path in existing:
        if os.path.islink(path) or not os.path.isfile(path):
            raise DataError(f"{path} is not a regular file: --force only replaces a dataset pair")
    idx = output_prefix + ".idx"
    if idx in existing:
        with open(idx, "rb") as f:
            if f.read(len(INDEX_HEADER)) != INDEX_HEADER:
                raise DataError(f"{idx} is not an indexed-dataset index (no megatron header): "
                                "--force only replaces a dataset pair")


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(tmp_prefix: str, output_prefix: str) -> None:
    """Move a complete temporary pair into place in the order the module docstring gives."""
    for suffix in (".bin", ".idx"):
        _fsync(tmp_prefix + suffix)
    if os.path.exists(output_prefix + ".idx"):
        os.remove(output_prefix + ".idx")
    os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
    os.replace(tmp_prefix + ".idx", output_prefix + ".idx")


# -- the work -----------------------------------------------------------------------------------
def preprocess(input_path: str, tokenizer_path: str, output_prefix: str, json_key: str = "text",
               append_eod: bool = True, quiet: bool = False, force: bool = False) -> dict:
    """Tokenise ``input_path`` into ``output_prefix.bin/.idx``; returns counts (documents,
    tokens, seconds, dtype, vocab_size). Raises :class:`DataError` (a
    :class:`~megatron_nbdiff.errors.NBDiffError`) for bad input, before writing anything."""
    if not os.path.exists(input_path):
        raise DataError(f"input file not found: {input_path}")
    if os.path.isdir(input_path):
        raise DataError(f"--input {input_path} is a folder, expected a JSONL or text file")
    check_output(output_prefix, force)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--output-prefix {output_prefix}: {out_dir} is not a folder")
    remove_stale_temporaries(output_prefix)

    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    if append_eod and tok.eod_id is None:
        raise DataError(f"{tokenizer_path}: the tokenizer has no end-of-document (eos) token; pass --no-eod")

    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = temporary_prefix(output_prefix)
    builder = IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype)
    docs = tokens = 0
    start = time.time()
    try:
        bar = tqdm(iter_documents(input_path, json_key), unit="doc", disable=quiet, desc="tokenising")
        for text in bar:
            ids = tok.encode(text)
            if append_eod:
                ids.append(tok.eod_id)
            if not ids:
                continue
            builder.add_document(torch.tensor(ids, dtype=torch.int64), [len(ids)])
            docs += 1
            tokens += len(ids)
            if docs % 1000 == 0:
                bar.set_postfix(tok_per_s=f"{tokens / max(time.time() - start, 1e-9):,.0f}")
        if docs == 0:
            raise DataError(f"{input_path}: no documents found")
        builder.finalize(tmp_prefix + ".idx")
        publish(tmp_prefix, output_prefix)
    finally:
        builder.data_file.close()
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    return dict(documents=docs, tokens=tokens, seconds=time.time() - start, dtype=np.dtype(dtype).name,
                vocab_size=tok.vocab_size)


# -- command line -------------------------------------------------------------------------------
def parser() -> ArgumentParser:
    p = ArgumentParser(prog="nbdiff-preprocess", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL (one object per line) or plain text, UTF-8")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or sentencepiece .model")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text", help="text field of a JSONL corpus (default: text)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--force", action="store_true", help="replace an existing PREFIX.bin/.idx dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nbdiff-preprocess``: run it through :func:`megatron_nbdiff.cli.run_main`, which turns the
    :class:`DataError` raised for bad input into one ``error:`` line and exit status 2."""
    args = parser().parse_args(argv)
    s = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, not args.no_eod,
                   args.quiet, args.force)
    print(f"wrote {args.output_prefix}.bin/.idx: {s['documents']:,} documents, {s['tokens']:,} tokens "
          f"({s['dtype']}), {s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s")
    return 0


console_main = entry(main)

if __name__ == "__main__":
    sys.exit(run_main(main))
