"""Tokenise a JSONL, text or chat corpus into a megatron-core indexed dataset (``PREFIX.bin`` +
``PREFIX.idx``; chat corpora also ``PREFIX.loss_mask.bin`` + ``.idx``).

    nbdiff-preprocess --input corpus.jsonl --tokenizer TOKENIZER_DIR_OR_MODEL \\
        --output-prefix data/corpus [--json-key text] [--format auto|jsonl|text|chat]
        [--max-tokens N] [--workers N] [--no-eod] [--force]

Formats (``--format``, default ``auto``: ``jsonl`` for ``.jsonl`` / ``.json`` files, else
``text``): ``jsonl``, one object per line, the text under ``--json-key``; ``text``, one document
per blank-line-separated paragraph; ``chat``, one conversation per JSONL line (``messages`` or
``prompt``/``response``) rendered through the tokenizer's chat template, with a loss mask
(:mod:`megatron_nbdiff.data.chat` documents the input, the on-disk format, how assistant spans
are found, and ``--max-tokens``). Each document is followed by the tokenizer's end-of-document
token unless ``--no-eod``. The corpus must be UTF-8; the first line that is not is reported by
number.

``--workers N`` tokenises N chunks at a time: the corpus is read in order and cut into chunks of
about 1 MB, the chunks are tokenised in parallel and written in their original order, so the
output is byte-identical for any N. With a fast Hugging Face tokenizer and the ``jsonl`` or
``text`` format the workers are N threads of this process (:func:`worker_kind`): the Rust encoder
releases the GIL, and the threads share the tokenizer and its word cache (each of N processes would
fill a cache of its own; threads measured 1.2x faster than processes at N = 2, BENCHMARKS.md).
Chat rendering (Jinja, Python), sentencepiece and Python tokenizers hold the GIL, so for them the
workers are N forked processes, each single-threaded.

An existing dataset (``PREFIX.bin``, ``PREFIX.idx`` or a ``PREFIX.loss_mask`` pair) is not
overwritten without ``--force``, and ``--force`` only replaces files that are dataset pairs
(regular files; an ``.idx`` with a megatron index header).

Writing order, so that an interrupted or killed run never leaves files of two different runs side
by side under one prefix:

1. every file is written to ``PREFIX.tmp-PID.bin`` / ``.idx`` (and ``PREFIX.tmp-PID.loss_mask.bin``
   / ``.idx``) and flushed to disk;
2. an old ``PREFIX.idx`` is deleted (from here the old dataset is incomplete, and readers refuse a
   prefix without its ``.idx``), then an old loss mask (which a run without one must not leave
   behind);
3. the new loss-mask pair and the new ``.bin`` are renamed into place;
4. the new ``.idx`` is renamed to ``PREFIX.idx`` last: the index is the commit mark.

A kill between 2 and 4 leaves files without ``PREFIX.idx`` (``--force`` replaces them); readers
also compare the ``.bin`` size with the lengths the ``.idx`` records
(:func:`megatron_nbdiff.data.datasets.check_prefix`). Temporaries that a killed run left behind
(their PID is no longer running) are removed when the next run on the same prefix starts.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import sys
import time
from argparse import RawDescriptionHelpFormatter
from collections import deque
from typing import Iterator, Optional, Sequence

import numpy as np

from ..cli import ArgumentParser, entry, run_main
from ..errors import DataError
from .chat import LOSS_MASK_SUFFIX, loss_mask_prefix

INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core's .idx magic (indexed_dataset._INDEX_HEADER)
FORMATS = ("auto", "jsonl", "text", "chat")
CHUNK_BYTES = 1 << 20  # input bytes per unit of work handed to a worker


# -- reading ------------------------------------------------------------------------------------
def _raw_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of every line of ``path``; decoded later, one line at a time
    (:func:`_decode`), so that an undecodable byte is reported with its line."""
    with open(path, "rb") as f:
        yield from enumerate(f, 1)


def _decode(raw: bytes, path: str, n: int) -> str:
    """Line ``n`` as text; newlines are normalised to ``\\n``."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} line {n}: not valid UTF-8") from None
    return line.replace("\r\n", "\n").replace("\r", "\n")


def _json_record(raw: bytes, path: str, n: int):
    """The parsed object of JSONL line ``n`` (None for a blank line)."""
    line = _decode(raw, path, n)
    if not line.strip():
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{n}: not valid JSON ({exc.msg})") from None


def _json_text(obj, json_key: str, path: str, n: int) -> str:
    if not isinstance(obj, dict) or json_key not in obj:
        raise DataError(f"{path}:{n}: no key {json_key!r} in the JSON object")
    if not isinstance(obj[json_key], str):
        raise DataError(f"{path}:{n}: {json_key!r} must be a string, found {type(obj[json_key]).__name__}")
    return obj[json_key]


def _paragraphs(path: str) -> Iterator[tuple[int, str]]:
    """``(input bytes consumed, paragraph)`` of a text corpus; blank lines count with the
    paragraph they end."""
    paragraph: list[str] = []
    size = 0
    for n, raw in _raw_lines(path):
        line = _decode(raw, path, n)
        size += len(raw)
        if line.strip():
            paragraph.append(line)
        elif paragraph:
            yield size, "".join(paragraph)
            paragraph, size = [], 0
    if paragraph:
        yield size, "".join(paragraph)


def resolve_format(fmt: str, path: str) -> str:
    """``auto`` becomes ``jsonl`` for ``.jsonl`` / ``.json`` files and ``text`` otherwise."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "auto":
        return "jsonl" if path.endswith((".jsonl", ".json")) else "text"
    return fmt


def iter_chunks(path: str, fmt: str, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, list]]:
    """The corpus in order, cut into units of work of about ``chunk_bytes`` input bytes:
    ``(bytes, items)`` with items ``(line number, raw line)`` for the JSON formats (parsed by the
    workers) and ``(None, paragraph)`` for ``text``."""
    chunk: list = []
    size = 0
    if fmt == "text":
        items = ((nbytes, (None, p)) for nbytes, p in _paragraphs(path))
    else:
        items = ((len(raw), (n, raw)) for n, raw in _raw_lines(path))
    for nbytes, item in items:
        chunk.append(item)
        size += nbytes
        if size >= chunk_bytes:
            yield size, chunk
            chunk, size = [], 0
    if chunk:
        yield size, chunk


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
    """Delete the ``PREFIX.tmp-PID.bin`` / ``.idx`` (and ``.loss_mask.bin`` / ``.idx``) files of
    runs whose PID is no longer running (a killed earlier run); return what was deleted. Those of
    a running process are kept."""
    directory, name = os.path.split(os.path.abspath(output_prefix))
    pattern = re.compile(re.escape(name) + r"\.tmp-(\d+)(" + re.escape(LOSS_MASK_SUFFIX) + r")?\.(bin|idx)")
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


def _dataset_files(output_prefix: str) -> list[str]:
    """The files a dataset at ``output_prefix`` consists of, in publishing order reversed."""
    return [p + s for p in (output_prefix, loss_mask_prefix(output_prefix)) for s in (".bin", ".idx")]


def check_output(output_prefix: str, force: bool) -> None:
    """Refuse to overwrite an existing dataset without ``force``, and anything that is not a
    dataset pair even with it."""
    existing = [path for path in _dataset_files(output_prefix) if os.path.lexists(path)]
    if not existing:
        return
    if not force:
        verb = "already exists" if len(existing) == 1 else "already exist"
        names = existing[0] if len(existing) == 1 else ", ".join(existing[:-1]) + " and " + existing[-1]
        raise DataError(f"{names} {verb}: pass --force to replace the dataset")
    for path in existing:
        if os.path.islink(path) or not os.path.isfile(path):
            raise DataError(f"{path} is not a regular file: --force only replaces a dataset pair")
    for idx in existing:
        if idx.endswith(".idx"):
            with open(idx, "rb") as f:
                if f.read(len(INDEX_HEADER)) != INDEX_HEADER:
                    raise DataError(f"{idx} is not an indexed-dataset index (no megatron header): "
                                    "--force only replaces a dataset pair")


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def publish(tmp_prefix: str, output_prefix: str, loss_mask: bool = False) -> None:
    """Move a complete temporary dataset (with its loss mask when ``loss_mask``) into place in
    the order the module docstring gives."""
    pairs = [(tmp_prefix, output_prefix)]
    if loss_mask:
        pairs.insert(0, (loss_mask_prefix(tmp_prefix), loss_mask_prefix(output_prefix)))
    for src, _ in pairs:
        for suffix in (".bin", ".idx"):
            _fsync(src + suffix)
    if os.path.exists(output_prefix + ".idx"):
        os.remove(output_prefix + ".idx")
    old_mask = loss_mask_prefix(output_prefix)
    for suffix in (".idx", ".bin"):
        if os.path.exists(old_mask + suffix):
            os.remove(old_mask + suffix)
    for src, dst in pairs:
        os.replace(src + ".bin", dst + ".bin")
        os.replace(src + ".idx", dst + ".idx")


# -- the work -----------------------------------------------------------------------------------
def encode_texts(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts`` without special tokens, the same as ``tok.encode`` of each: one
    batch call of the Rust tokenizer behind a fast Hugging Face tokenizer (without offsets;
    single-threaded inside a worker), of the Python tokenizer otherwise, or sentencepiece's list
    encoding."""
    hf = tok.hf
    if hf is None:
        return [list(ids) for ids in tok.sentencepiece.encode(texts)]
    if getattr(hf, "is_fast", False):
        backend = hf.backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]
    return hf(texts, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False)["input_ids"]


class _Work:
    """Tokenises one chunk of the corpus (:func:`iter_chunks`) into flat arrays: run in this
    process (by its main thread or a worker thread), or in a worker forked from it (which
    inherits it)."""

    def __init__(self, fmt: str, tok, path: str, json_key: str, eod_id: Optional[int], dtype, chat,
                 max_tokens: Optional[int]):
        self.fmt, self.tok, self.path, self.json_key = fmt, tok, path, json_key
        self.eod_id, self.dtype, self.chat, self.max_tokens = eod_id, dtype, chat, max_tokens

    def __call__(self, chunk: tuple[int, list]) -> dict:
        nbytes, items = chunk
        masks = None
        cut = dropped = 0
        if self.fmt == "chat":
            from .chat import conversation_from_record

            conversations = []
            for n, raw in items:
                obj = _json_record(raw, self.path, n)
                if obj is not None:
                    where = f"{self.path} line {n}"
                    conversations.append((conversation_from_record(obj, where), where))
            docs, masks, cut, dropped = self.chat.encode(conversations, self.max_tokens, self.eod_id)
        else:
            if self.fmt == "jsonl":
                texts = []
                for n, raw in items:
                    obj = _json_record(raw, self.path, n)
                    if obj is not None:
                        texts.append(_json_text(obj, self.json_key, self.path, n))
            else:
                texts = [p for _, p in items]
            docs = encode_texts(self.tok, texts) if texts else []
            if self.eod_id is not None:
                for ids in docs:
                    ids.append(self.eod_id)
            docs = [ids for ids in docs if ids]
        lengths = np.fromiter((len(ids) for ids in docs), dtype=np.int64, count=len(docs))
        flat = np.fromiter(itertools.chain.from_iterable(docs), dtype=self.dtype, count=int(lengths.sum()))
        mask = np.concatenate(masks) if masks else (np.zeros(0, np.uint8) if self.fmt == "chat" else None)
        return dict(bytes=nbytes, lengths=lengths, tokens=flat, mask=mask, cut=cut, dropped=dropped)


_WORK: Optional[_Work] = None  # set in the parent before the pool forks; the workers inherit it


def worker_kind(fmt: str, tok) -> str:
    """``threads`` when the whole of a chunk's tokenising runs in a fast HF tokenizer's Rust
    encoder (formats ``jsonl`` and ``text``), which releases the GIL; ``processes`` otherwise."""
    hf = tok.hf
    return "threads" if fmt != "chat" and hf is not None and getattr(hf, "is_fast", False) else "processes"


def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle


def _ready() -> int:
    return os.getpid()


def _run_chunk(chunk):
    return _WORK(chunk)


def _ordered(chunks: Iterator, pool, workers: int) -> Iterator[dict]:
    """The results of ``chunks`` in input order; with a pool at most ``2 * workers`` chunks are
    in flight, so memory does not grow with the corpus."""
    if pool is None:
        for chunk in chunks:
            yield _WORK(chunk)
        return
    from concurrent.futures.process import BrokenProcessPool  # processes only; threads cannot die alone

    pending: deque = deque()
    try:
        for chunk in chunks:
            pending.append(pool.submit(_run_chunk, chunk))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise OSError("a --workers process died while tokenising (killed, e.g. for lack of memory?); "
                      "nothing was written") from None


def _append(builder, values: np.ndarray, lengths: np.ndarray) -> None:
    """Add one single-sequence document per entry of ``lengths`` (``values`` concatenated), the
    same as ``IndexedDatasetBuilder.add_document`` once per document, in one write."""
    builder.data_file.write(np.ascontiguousarray(values, dtype=builder.dtype).tobytes(order="C"))
    before = len(builder.sequence_lengths)
    builder.sequence_lengths.extend(lengths.tolist())
    builder.document_indices.extend(range(before + 1, before + len(lengths) + 1))


def _file_size(path: str) -> Optional[int]:
    return os.path.getsize(path) if os.path.isfile(path) else None


def preprocess(input_path: str, tokenizer_path: str, output_prefix: str, json_key: str = "text",
               append_eod: bool = True, quiet: bool = False, force: bool = False, fmt: str = "auto",
               workers: int = 1, max_tokens: Optional[int] = None, chunk_bytes: int = CHUNK_BYTES) -> dict:
    """Tokenise ``input_path`` into ``output_prefix.bin/.idx`` (and, for ``fmt="chat"``,
    ``output_prefix.loss_mask.bin/.idx``) with ``workers`` processes; returns counts (documents,
    tokens, loss_tokens, cut, dropped, bytes, seconds, dtype, vocab_size). Raises
    :class:`DataError` (a :class:`~megatron_nbdiff.errors.NBDiffError`) for bad input; nothing is
    left under ``output_prefix`` then."""
    global _WORK
    if not isinstance(workers, int) or workers < 1:
        raise DataError(f"--workers {workers}: expected a positive number of processes")
    if not os.path.exists(input_path):
        raise DataError(f"input file not found: {input_path}")
    if os.path.isdir(input_path):
        raise DataError(f"--input {input_path} is a folder, expected a JSONL or text file")
    fmt = resolve_format(fmt, input_path)
    if max_tokens is not None:
        if fmt != "chat":
            raise DataError(f"--max-tokens applies to --format chat only (the format here is {fmt})")
        if max_tokens < 2:
            raise DataError(f"--max-tokens {max_tokens}: expected at least 2")
    check_output(output_prefix, force)
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DataError(f"--output-prefix {output_prefix}: {out_dir} is not a folder")
    remove_stale_temporaries(output_prefix)

    from .tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_path)
    if append_eod and tok.eod_id is None:
        raise DataError(f"{tokenizer_path}: the tokenizer has no end-of-document (eos) token; pass --no-eod")
    chat = None
    if fmt == "chat":
        from .chat import ChatEncoder

        chat = ChatEncoder(tok.hf, tokenizer_path)
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = temporary_prefix(output_prefix)
    tmp_mask = loss_mask_prefix(tmp_prefix)
    # one thread per process: --workers is the parallelism (inherited by the forked workers)
    parallelism = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORK = _Work(fmt, tok, input_path, json_key, tok.eod_id if append_eod else None, dtype, chat, max_tokens)
    pool = None
    builders = []
    docs = tokens = loss_tokens = cut = dropped = nbytes = 0
    start = time.time()
    try:
        if workers > 1 and worker_kind(fmt, tok) == "threads":
            from concurrent.futures import ThreadPoolExecutor

            pool = ThreadPoolExecutor(workers, thread_name_prefix="nbdiff-preprocess")
        elif workers > 1:  # forked (all at once, on the first task) before tqdm starts its thread
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                       initializer=_init_worker)
            pool.submit(_ready).result()
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
        from tqdm import tqdm

        builders.append(IndexedDatasetBuilder(tmp_prefix + ".bin", dtype=dtype))
        if chat is not None:
            builders.append(IndexedDatasetBuilder(tmp_mask + ".bin", dtype=np.uint8))
        bar = tqdm(total=_file_size(input_path), unit="B", unit_scale=True, unit_divisor=1000,
                   disable=quiet, desc="tokenising")
        for result in _ordered(iter_chunks(input_path, fmt, chunk_bytes), pool, workers):
            _append(builders[0], result["tokens"], result["lengths"])
            if chat is not None:
                _append(builders[1], result["mask"], result["lengths"])
                loss_tokens += int(np.count_nonzero(result["mask"]))
            docs += len(result["lengths"])
            tokens += int(result["lengths"].sum())
            cut += result["cut"]
            dropped += result["dropped"]
            nbytes += result["bytes"]
            bar.update(result["bytes"])
            elapsed = max(time.time() - start, 1e-9)
            bar.set_postfix(docs=f"{docs:,}", docs_per_s=f"{docs / elapsed:,.0f}",
                            tok_per_s=f"{tokens / elapsed:,.0f}", refresh=False)
        bar.close()
        if docs == 0:
            raise DataError(f"{input_path}: no documents found" if not dropped else
                            f"{input_path}: all {dropped:,} conversations are longer than --max-tokens {max_tokens} "
                            "even when cut after their first assistant turn")
        builders[0].finalize(tmp_prefix + ".idx")
        if chat is not None:
            builders[1].finalize(tmp_mask + ".idx")
        publish(tmp_prefix, output_prefix, loss_mask=chat is not None)
    finally:
        _WORK = None
        if parallelism is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = parallelism
        if pool is not None:  # the chunks being tokenised finish (a second at most), the rest are cancelled
            pool.shutdown(wait=True, cancel_futures=True)
        for builder in builders:
            builder.data_file.close()
        for path in (tmp_prefix, tmp_mask):
            for suffix in (".bin", ".idx"):
                if os.path.exists(path + suffix):
                    os.remove(path + suffix)
    if cut or dropped:
        print(f"warning: --max-tokens {max_tokens}: {cut:,} conversations cut after the last assistant turn "
              f"that fits, {dropped:,} dropped (not even the first assistant turn fits)", file=sys.stderr)
    return dict(documents=docs, tokens=tokens, loss_tokens=loss_tokens if chat is not None else None,
                cut=cut, dropped=dropped, bytes=nbytes, seconds=time.time() - start,
                dtype=np.dtype(dtype).name, vocab_size=tok.vocab_size, format=fmt, workers=workers,
                worker_kind=worker_kind(fmt, tok) if workers > 1 else None)


# -- command line -------------------------------------------------------------------------------
def _positive(text: str) -> int:
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, found {value}")
    return value


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="nbdiff-preprocess", description=__doc__.split("\n\n")[0],
                                epilog=__doc__, formatter_class=RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL (one object per line) or plain text, UTF-8")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or sentencepiece .model")
    p.add_argument("--output-prefix", required=True,
                   help="writes PREFIX.bin and PREFIX.idx (and PREFIX.loss_mask.bin/.idx for --format chat)")
    p.add_argument("--format", default="auto", choices=FORMATS,
                   help="auto (by extension: .jsonl/.json -> jsonl, else text), jsonl, text, or chat "
                        "(messages or prompt/response JSONL, rendered with the tokenizer's chat template)")
    p.add_argument("--json-key", default="text", help="text field of a JSONL corpus (default: text)")
    p.add_argument("--max-tokens", type=_positive, default=None,
                   help="chat: cut a longer conversation after the last assistant turn that fits (EOD "
                        "included), drop it if none fits")
    p.add_argument("--workers", type=_positive, default=1,
                   help="chunks tokenised at a time, by threads (fast HF tokenizer, jsonl/text) or processes "
                        "(default: 1)")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--force", action="store_true", help="replace an existing dataset")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nbdiff-preprocess``: run it through :func:`megatron_nbdiff.cli.run_main`, which turns the
    :class:`DataError` raised for bad input into one ``error:`` line and exit status 2."""
    args = parser().parse_args(argv)
    s = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key, not args.no_eod,
                   args.quiet, args.force, fmt=args.format, workers=args.workers, max_tokens=args.max_tokens)
    written = f"{args.output_prefix}.bin/.idx"
    if s["loss_tokens"] is not None:
        written += f" and {args.output_prefix}{LOSS_MASK_SUFFIX}.bin/.idx"
    masked = "" if s["loss_tokens"] is None else f", {s['loss_tokens']:,} with loss mask 1"
    print(f"wrote {written}: {s['documents']:,} documents, {s['tokens']:,} tokens ({s['dtype']}){masked}, "
          f"{s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s")
    return 0


console_main = entry(main)

if __name__ == "__main__":
    sys.exit(run_main(main))
