"""Preprocessing throughput: the pipeline (``nbdiff-preprocess``) at 1 and 2 workers against the
tokenizer's own batch-encode rate on the same text at the same thread count, the ceiling of any
preprocessor.

    python benchmarks/preprocess.py                    # ~30 MB of generated text
    python benchmarks/preprocess.py --mb 5 --repeats 3 --workers 1 2 4 --out results.json

Text: JSONL documents (``{"text": ...}``) of pseudo-words, Zipf-distributed over a vocabulary of
``--words`` random lower-case strings, 40 to 400 words each, until ``--mb`` MB; written by the
script (seed 0) into a temporary folder (``--workdir`` to keep it). Tokenizer: a byte-level BPE of
``--vocab`` entries (:mod:`megatron_nbdiff.data.make_tokenizer`) trained on the first MB.

- pipeline(N): wall time of :func:`megatron_nbdiff.data.preprocess.preprocess` with ``workers=N``,
  from the call to the published dataset (tokenizer load, pool start, reading, JSON parsing,
  tokenising, writing, fsync), as tokens/s (the end-of-document tokens it appends not counted);
- ceiling(N): in a fresh process with ``RAYON_NUM_THREADS=N`` (and ``TOKENIZERS_PARALLELISM`` off
  for N = 1), the Rust tokenizer's ``encode_batch_fast`` over all the document texts, already in
  memory, in batches of about 1 MB (the pipeline's chunk; one batch of all 30 MB measured slower),
  without special tokens, each batch's token ids read (as the pipeline reads them) and its
  encodings dropped before the next batch, as tokens/s; the tokenizer is loaded afresh (untimed)
  before every run, so that its word cache starts empty as in the pipeline.

Each figure is the median of ``--repeats`` runs, the pipeline and ceiling runs interleaved.
Printed: both rates, the speed-up
pipeline(N) / pipeline(1) (target at N = 2: at least 1.7) and pipeline(N) / ceiling(N) (target:
at least 0.8), and the load average before and after (wall-time rates are only meaningful on an
otherwise idle machine). Also the same rates per CPU second (user + system time of all threads
and worker processes), which another job on the machine disturbs much less: their ratio is the
pipeline's overhead over the bare tokenizer.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time


def _parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mb", type=float, default=30.0, help="size of the generated corpus in MB (default 30)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts (default: 1 2)")
    p.add_argument("--repeats", type=int, default=3, help="runs per figure, the median is reported (default 3)")
    p.add_argument("--vocab", type=int, default=8000, help="BPE vocabulary size (default 8000)")
    p.add_argument("--words", type=int, default=20000, help="distinct pseudo-words in the text (default 20000)")
    p.add_argument("--workdir", default=None, help="keep the corpus, tokenizer and outputs here")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--ceiling", type=int, default=None, help=argparse.SUPPRESS)  # internal: one ceiling process
    p.add_argument("--corpus", default=None, help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def write_corpus(path: str, mb: float, words: int) -> int:
    """Generated JSONL of about ``mb`` MB; returns the number of documents."""
    rng = random.Random(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 10))) for _ in range(words)]
    weights = [1.0 / (i + 1) for i in range(words)]
    size, docs = 0, 0
    with open(path, "w") as f:
        while size < mb * 1e6:
            text = " ".join(rng.choices(vocab, weights, k=rng.randint(40, 400))) + "."
            line = json.dumps({"text": text}) + "\n"
            f.write(line)
            size += len(line)
            docs += 1
    return docs


def _texts(path: str) -> list[str]:
    with open(path) as f:
        return [json.loads(line)["text"] for line in f]


def _cpu_seconds(children: bool = False) -> float:
    """CPU time (user + system) of this process, all its threads; with ``children``, plus that of
    its finished child processes."""
    import resource

    who = [resource.RUSAGE_SELF] + ([resource.RUSAGE_CHILDREN] if children else [])
    return sum(resource.getrusage(w).ru_utime + resource.getrusage(w).ru_stime for w in who)


def ceiling_process(args) -> None:
    """The body of one ceiling measurement (run in a fresh process, so that the thread count
    set in its environment holds): prints ``{"seconds": [...], "tokens": n}``."""
    from transformers import AutoTokenizer

    from megatron_nbdiff.data.preprocess import CHUNK_BYTES

    texts = _texts(args.corpus)
    batches, batch, size = [], [], 0  # the pipeline's unit of work: one batch call per ~1 MB
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= CHUNK_BYTES:
            batches.append(batch)
            batch, size = [], 0
    batches.append(batch)
    seconds, cpu, tokens = [], [], 0
    for _ in range(args.repeats):
        # a freshly loaded tokenizer every time, as every pipeline run loads one: the Rust BPE's
        # word cache starts empty (a warm cache made later repeats up to 1.4x faster)
        backend = AutoTokenizer.from_pretrained(args.tokenizer).backend_tokenizer
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        # every batch's encodings are dropped before the next (as the pipeline does): keeping
        # 30 MB worth of Encoding objects alive made this 1.4x slower than the pipeline itself
        tokens = 0
        for b in batches:
            tokens += sum(len(e.ids) for e in encode(b, add_special_tokens=False))
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
    print(json.dumps({"seconds": seconds, "cpu": cpu, "tokens": tokens}))


def ceiling(threads: int, corpus: str, tokenizer: str, repeats: int) -> tuple[float, float]:
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads), RAYON_RS_NUM_CPUS=str(threads),
               TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--ceiling", str(threads), "--corpus", corpus,
                           "--tokenizer", tokenizer, "--repeats", str(repeats)],
                          env=env, capture_output=True, text=True, check=True)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return (result["tokens"] / statistics.median(result["seconds"]),
            result["tokens"] / statistics.median(result["cpu"]))


def pipeline(workers: int, corpus: str, tokenizer: str, out_prefix: str, repeats: int) -> tuple[float, float, dict]:
    """(tokens/s of wall time, tokens per CPU second of the process and its workers, counts); the
    workers are joined when preprocess returns, so their CPU time is counted."""
    from megatron_nbdiff.data.preprocess import preprocess

    seconds, cpu, stats = [], [], {}
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds(children=True)
        stats = preprocess(corpus, tokenizer, out_prefix, quiet=True, force=True, workers=workers)
        seconds.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds(children=True) - start_cpu)
    tokens = stats["tokens"] - stats["documents"]
    return tokens / statistics.median(seconds), tokens / statistics.median(cpu), stats


def main(argv=None) -> int:
    args = _parse(argv)
    if args.ceiling is not None:
        ceiling_process(args)
        return 0
    from megatron_nbdiff.cli import quiet_expected_warnings
    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.data.preprocess import preprocess

    quiet_expected_warnings()
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_preprocess-")
    os.makedirs(workdir, exist_ok=True)
    try:
        corpus = os.path.join(workdir, "corpus.jsonl")
        t0 = time.perf_counter()
        docs = write_corpus(corpus, args.mb, args.words)
        sample, size = [], 0
        for text in _texts(corpus):
            sample.append(text)
            size += len(text)
            if size > 1e6:
                break
        tokenizer = train_bpe_tokenizer(sample, args.vocab, os.path.join(workdir, "tok"))
        print(f"corpus: {os.path.getsize(corpus) / 1e6:.1f} MB, {docs:,} documents; BPE vocabulary {args.vocab:,} "
              f"({time.perf_counter() - t0:.1f} s to generate)")
        warm = os.path.join(workdir, "warm.jsonl")  # imports (torch, megatron) before anything is timed
        with open(warm, "w") as f:
            f.write(json.dumps({"text": sample[0]}) + "\n")
        preprocess(warm, tokenizer, os.path.join(workdir, "warm"), quiet=True, force=True)
        load_before = os.getloadavg()
        rows = []
        for n in args.workers:
            # interleaved (pipeline, ceiling, pipeline, ...) so that a slow spell of the machine
            # falls on both figures, not on whichever ran during it
            runs = []
            for _ in range(args.repeats):
                runs.append(pipeline(n, corpus, tokenizer, os.path.join(workdir, "out"), 1)
                            + ceiling(n, corpus, tokenizer, 1))
            rate, rate_cpu, stats, top, top_cpu = (statistics.median(r[0] for r in runs),
                                                   statistics.median(r[1] for r in runs), runs[-1][2],
                                                   statistics.median(r[3] for r in runs),
                                                   statistics.median(r[4] for r in runs))
            rows.append(dict(workers=n, pipeline_tokens_per_s=rate, ceiling_tokens_per_s=top,
                             pipeline_tokens_per_cpu_s=rate_cpu, ceiling_tokens_per_cpu_s=top_cpu,
                             tokens=stats["tokens"] - stats["documents"]))
            print(f"  workers={n}: pipeline {rate:,.0f} tokens/s, tokenizer batch encode {top:,.0f} tokens/s, "
                  f"pipeline/ceiling {rate / top:.2f}", flush=True)
        load_after = os.getloadavg()
        base = rows[0]["pipeline_tokens_per_s"]
        print(f"\n{'workers':>7} {'pipeline tok/s':>15} {'ceiling tok/s':>14} {'vs ceiling':>10} "
              f"{'vs ' + str(rows[0]['workers']) + ' worker':>12} {'pipeline tok/cpu-s':>18} "
              f"{'ceiling tok/cpu-s':>17} {'vs ceiling':>10}")
        for r in rows:
            r["speedup"] = r["pipeline_tokens_per_s"] / base
            r["fraction_of_ceiling"] = r["pipeline_tokens_per_s"] / r["ceiling_tokens_per_s"]
            r["cpu_fraction_of_ceiling"] = r["pipeline_tokens_per_cpu_s"] / r["ceiling_tokens_per_cpu_s"]
            print(f"{r['workers']:>7} {r['pipeline_tokens_per_s']:>15,.0f} {r['ceiling_tokens_per_s']:>14,.0f} "
                  f"{r['fraction_of_ceiling']:>10.2f} {r['speedup']:>11.2f}x {r['pipeline_tokens_per_cpu_s']:>18,.0f} "
                  f"{r['ceiling_tokens_per_cpu_s']:>17,.0f} {r['cpu_fraction_of_ceiling']:>10.2f}")
        print(f"\nload average (1 min) before {load_before[0]:.2f}, after {load_after[0]:.2f} on "
              f"{os.cpu_count()} CPUs; medians of {args.repeats} runs")
        if args.out:
            from megatron_nbdiff.fileio import atomic_write

            atomic_write(args.out, json.dumps(dict(
                date=datetime.date.today().isoformat(), machine=platform.platform(), cpus=os.cpu_count(),
                corpus_mb=os.path.getsize(corpus) / 1e6, documents=docs, vocab=args.vocab, repeats=args.repeats,
                load_before=load_before, load_after=load_after, rows=rows), indent=2) + "\n")
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
