#!/usr/bin/env python
"""Tokenise a JSONL or text corpus into a megatron-core indexed dataset (``P.bin`` + ``P.idx``).

    python tools/preprocess_data.py --input corpus.jsonl --tokenizer TOKENIZER_DIR_OR_MODEL \\
        --output-prefix data/corpus [--json-key text] [--no-eod]

JSONL: one object per line, the text under ``--json-key``. Text files (any other suffix): one
document per blank-line-separated paragraph. Each document is followed by the tokenizer's
end-of-document token unless ``--no-eod``. Both files are written to temporary names and renamed
when complete, so an interrupted run leaves no dataset that looks whole.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PreprocessError(ValueError):
    pass


def iter_documents(path: str, json_key: str) -> Iterator[str]:
    if path.endswith(".jsonl") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PreprocessError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
                if not isinstance(obj, dict) or json_key not in obj:
                    raise PreprocessError(f"{path}:{lineno}: no key {json_key!r} in the JSON object")
                if not isinstance(obj[json_key], str):
                    raise PreprocessError(
                        f"{path}:{lineno}: {json_key!r} must be a string, found {type(obj[json_key]).__name__}"
                    )
                yield obj[json_key]
    else:
        with open(path, encoding="utf-8") as f:
            paragraph: list[str] = []
            for line in f:
                if line.strip():
                    paragraph.append(line)
                elif paragraph:
                    yield "".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "".join(paragraph)


def preprocess(input_path: str, tokenizer_path: str, output_prefix: str, json_key: str = "text",
               append_eod: bool = True, quiet: bool = False) -> dict:
    import numpy as np
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tqdm import tqdm

    from megatron_nbdiff.data.tokenizer import Tokenizer

    if not os.path.isfile(input_path):
        raise PreprocessError(f"input file not found: {input_path}")
    tok = Tokenizer(tokenizer_path)
    if append_eod and tok.eod_id is None:
        raise PreprocessError(
            f"{tokenizer_path}: the tokenizer has no end-of-document (eos) token; pass --no-eod"
        )
    dtype = np.uint16 if tok.vocab_size < 65500 else np.int32
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp_prefix = f"{output_prefix}.tmp-{os.getpid()}"
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
            raise PreprocessError(f"{input_path}: no documents found")
        builder.finalize(tmp_prefix + ".idx")
        os.replace(tmp_prefix + ".bin", output_prefix + ".bin")
        os.replace(tmp_prefix + ".idx", output_prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp_prefix + suffix):
                os.remove(tmp_prefix + suffix)
    elapsed = time.time() - start
    return dict(documents=docs, tokens=tokens, seconds=elapsed, dtype=np.dtype(dtype).name,
                vocab_size=tok.vocab_size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="JSONL (one object per line) or plain text")
    p.add_argument("--tokenizer", required=True, help="HF tokenizer directory or sentencepiece .model")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default="text")
    p.add_argument("--no-eod", action="store_true", help="do not append the end-of-document token")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    from megatron_nbdiff.data.tokenizer import TokenizerError

    try:
        s = preprocess(args.input, args.tokenizer, args.output_prefix, args.json_key,
                       not args.no_eod, args.quiet)
    except (PreprocessError, TokenizerError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output_prefix}.bin/.idx: {s['documents']:,} documents, {s['tokens']:,} tokens "
          f"({s['dtype']}), {s['tokens'] / max(s['seconds'], 1e-9):,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
