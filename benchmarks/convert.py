"""Conversion speed and memory on a synthetic multi-GB Llama-shaped checkpoint, against a plain
copy of the same bytes measured in the same run.

Writes random bf16 weights of a Llama-shaped model shard by shard with ``safetensors`` (no
transformers model is ever built). Each run then times, as subprocesses:

- a plain copy of the HF checkpoint's files (read, write, fsync: what any conversion must at
  least do), then ``tools/convert_hf_to_megatron.py`` on them;
- a plain copy of the converted checkpoint's files, then ``tools/convert_megatron_to_hf.py``.

A second baseline, the "late copy", is the same copy in a process that first imports the
libraries the converters load, and is timed from the end of those imports: it starts writing about
as long after :func:`warm` as a converter starts streaming. On this VM that delay alone changes
the speed of writing (see :func:`warm`), so "x late copy (streaming)" compares the converters with
a copy under the conditions they meet; the plain copy, "x copy", is the figure on an ordinary
machine, where the two baselines agree.

Resident memory is polled with psutil (the process, and PSS summed over its process tree).
Reports medians over ``--runs``: wall time, peak RSS / checkpoint size (target <= 0.3) and the
conversion's throughput over the copy's (target >= 0.5), three ways: over the streaming phase
the tool's summary reports (reading, converting and writing the tensors: what grows with the
checkpoint), over the tool's own total (adds the checks, the layout, the tokenizer and the
imports they trigger) and over the whole process (adds about 4-8 s of interpreter start and
imports on 2 cores). For a 140 GB checkpoint the constants vanish and the first ratio is the one
that matters.

    python benchmarks/convert.py --workdir /tmp/nbdiff-bench --runs 3 [--keep]

Before each copy and each conversion, :func:`warm` gives every command the same start: the page
cache written back and dropped (as root), the source and the Python environment read once, and
memory for the output touched once by a scratch file of the same size (on this VM, writing into
memory the guest has not used lately is 8x slower than into memory it has). The workdir is
deleted at the end unless ``--keep``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time

import psutil
import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_config(args) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": args.vocab, "hidden_size": args.hidden, "intermediate_size": args.ffn,
        "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads, "head_dim": args.hidden // args.heads,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False,
        "mlp_bias": False, "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }


def tensor_specs(cfg: dict):
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    d = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    yield "model.embed_tokens.weight", (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "self_attn.q_proj.weight", (q, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, q)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "mlp.gate_proj.weight", (f, h)
        yield p + "mlp.up_proj.weight", (f, h)
        yield p + "mlp.down_proj.weight", (h, f)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def write_synthetic(directory: str, cfg: dict, shard_bytes: int) -> int:
    """Random bf16 weights, one shard at a time (never more than one shard in memory)."""
    os.makedirs(directory)
    g = torch.Generator().manual_seed(0)
    shards, current, size = [], {}, 0
    weight_map = {}

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, os.path.join(directory, name), metadata={"format": "pt"})
            shards.append(name)
            for k in current:
                weight_map[k] = name
            current, size = {}, 0

    total = 0
    for name, shape in tensor_specs(cfg):
        t = torch.empty(shape, dtype=torch.bfloat16)
        if len(shape) == 1:
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=g)
        nbytes = t.numel() * 2
        if size and size + nbytes > shard_bytes:
            flush()
        current[name] = t
        size += nbytes
        total += nbytes
    flush()
    n = len(shards)
    renamed = {}
    for i, old in enumerate(shards):
        new = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.rename(os.path.join(directory, old), os.path.join(directory, new))
        renamed[old] = new
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total},
                   "weight_map": {k: renamed[v] for k, v in weight_map.items()}}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return sum(os.path.getsize(os.path.join(directory, s)) for s in renamed.values())


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _pss(pid: int) -> int:
    """Proportional set size (shared pages split between the processes sharing them)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], poll_s: float = 0.05) -> dict:
    """Run ``cmd``; peak RSS of the process itself, and peak PSS summed over the process tree
    (megatron's checkpoint writer forks helpers that share the parent's pages; PSS counts each
    physical page once), sampled every ``poll_s``; plus ru_maxrss."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ps = psutil.Process(proc.pid)
    peak_main = peak_tree = 0
    while proc.poll() is None:
        try:
            main = ps.memory_info().rss
            tree = _pss(proc.pid) + sum(_pss(c.pid) for c in ps.children(recursive=True))
            peak_main, peak_tree = max(peak_main, main), max(peak_tree, tree)
        except psutil.Error:
            pass
        time.sleep(poll_s)
    out, err = proc.communicate()
    seconds = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"seconds": seconds, "peak_rss": peak_main, "peak_tree_pss": peak_tree,
            "ru_maxrss": maxrss if maxrss > before * 1024 else None,
            "summary": out.strip().splitlines()[-1] if out.strip() else ""}


COPY_SCRIPT = """
import os, shutil, sys, time
src, dst, late = sys.argv[1], sys.argv[2], sys.argv[3] == "late"
if late:  # start copying as late as a tool starts streaming: after the libraries it loads
    import safetensors.torch, torch, torch.distributed.checkpoint, transformers  # noqa
    import megatron.core.dist_checkpointing  # noqa
start = time.perf_counter()
for d, _, files in os.walk(src):
    os.makedirs(os.path.join(dst, os.path.relpath(d, src)), exist_ok=True)
    for f in files:
        out = os.path.join(dst, os.path.relpath(d, src), f)
        shutil.copyfile(os.path.join(d, f), out)
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
print(f"copied in {time.perf_counter() - start:.3f} s")
"""


def tool_seconds(summary: str, what: str = "total") -> float:
    """A time a tool's summary line reports: ``total`` (``..., 12.3 s (...``, from reading the
    config to the last fsync) or ``streaming`` (``streaming 9.8 s``: reading, converting and
    writing the tensors, what grows with the checkpoint)."""
    pattern = r", ([0-9.]+) s \(" if what == "total" else r"streaming ([0-9.]+) s"
    m = re.search(pattern, summary)
    if m is None:
        raise SystemExit(f"no {what} time in the summary line {summary!r}")
    return float(m.group(1))


def warm(path: str, scratch: str) -> None:
    """The same starting point for every measured command: write back and (where permitted, as
    root) drop the page cache; read every file under ``path`` and of the Python environment once
    (the libraries' code, which a dropped cache would make every process fault in from disk); and
    write, sync and delete a scratch file as large as ``path`` next to the outputs.

    The scratch file is there because of the host: on this VM (a Firecracker guest whose idle
    memory is handed back to the host) the first write into memory the guest has not touched
    lately runs at about 0.35 GB/s, and at 2.9 GB/s once the pages have been used (the same
    1.4 GB safetensors write: 4.1 s, then 0.48 s). Without it, whichever command writes first
    into fresh memory pays for the host's page faults, and the comparison measures the order of
    the commands instead of the code. The warmth does not last: memory freed for more than about
    2 s is handed back to the host (the guest's free-page reporting), and writing into it is slow
    again (64 MB blocks into tmpfs, 2026-12-03: 2.0-2.5 GB/s right after a scratch file was freed,
    1.2 GB/s 2 s later, 0.33-0.45 GB/s 5 s later). A converter starts streaming several seconds
    after this (interpreter, imports, checks), a plain copy at once: hence the late copy."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass
    for root in (path, sysconfig.get_paths()["purelib"]):
        for d, _, files in os.walk(root):
            for f in files:
                try:
                    with open(os.path.join(d, f), "rb") as fh:
                        while fh.read(64 << 20):
                            pass
                except OSError:  # a broken link in the environment
                    pass
    block = bytes(64 << 20)
    with open(scratch, "wb") as f:
        for _ in range(max(1, dir_bytes(path) // len(block))):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    os.remove(scratch)
    os.sync()


def copy_run(src: str, dst: str, late: bool = False) -> dict:
    """A plain copy of ``src`` (read, write, fsync) in a fresh process; ``late``: only after
    importing the libraries the converters load (torch, its DCP, megatron-core, transformers,
    safetensors), so that the copy starts writing as long after :func:`warm` as a converter
    starts streaming (see :func:`warm` on why that matters here)."""
    warm(src, dst + ".scratch")
    result = run_measured([sys.executable, "-c", COPY_SCRIPT, src, dst, "late" if late else "plain"])
    result["copy_seconds"] = float(re.search(r"copied in ([0-9.]+) s", result["summary"]).group(1))
    shutil.rmtree(dst)
    os.sync()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/nbdiff-convert-bench")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--shard-gb", type=float, default=1.0)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--no-export", action="store_true", help="skip the megatron -> HF direction")
    p.add_argument("--keep", action="store_true", help="keep the workdir")
    args = p.parse_args(argv)

    if os.path.exists(args.workdir):
        raise SystemExit(f"{args.workdir} exists; remove it or choose another --workdir")
    cfg = llama_config(args)
    hf_dir = os.path.join(args.workdir, "hf")
    try:
        t = time.time()
        size = write_synthetic(hf_dir, cfg, int(args.shard_gb * 1024 ** 3))
        os.sync()  # no write-back of the synthetic files competing with the measured runs
        print(f"synthetic checkpoint: {size / 1e9:.2f} GB in {len(os.listdir(hf_dir)) - 2} shards "
              f"({time.time() - t:.0f} s to write)", flush=True)
        rows = {"copy of the HF files": [], "late copy of the HF files": [], "hf->megatron": [],
                "copy of the megatron files": [], "late copy of the megatron files": [], "megatron->hf": []}
        for r in range(args.runs):
            mg = os.path.join(args.workdir, f"mg{r}")
            rows["copy of the HF files"].append(copy_run(hf_dir, os.path.join(args.workdir, "copy")))
            rows["late copy of the HF files"].append(copy_run(hf_dir, os.path.join(args.workdir, "copy"), late=True))
            cmd = [sys.executable, "tools/convert_hf_to_megatron.py", "--hf-dir", hf_dir, "--out-dir", mg,
                   "--tp", str(args.tp), "--dtype", "bf16", "--mask-token", "append", "--no-progress"]
            warm(hf_dir, mg + ".scratch")
            rows["hf->megatron"].append(run_measured(cmd))
            print(f"run {r}: {rows['hf->megatron'][-1]}", flush=True)
            os.sync()
            if not args.no_export:
                rows["copy of the megatron files"].append(copy_run(mg, os.path.join(args.workdir, "copy")))
                rows["late copy of the megatron files"].append(copy_run(mg, os.path.join(args.workdir, "copy"),
                                                                        late=True))
                out = os.path.join(args.workdir, f"out{r}")
                cmd = [sys.executable, "tools/convert_megatron_to_hf.py", "--megatron-dir", mg,
                       "--out-dir", out, "--no-progress"]
                warm(mg, out + ".scratch")
                rows["megatron->hf"].append(run_measured(cmd))
                print(f"run {r}: {rows['megatron->hf'][-1]}", flush=True)
                shutil.rmtree(out)
            if r < args.runs - 1:
                shutil.rmtree(mg)
            os.sync()
        mg_size = dir_bytes(os.path.join(args.workdir, f"mg{args.runs - 1}"))
        print()
        print(f"device: {platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
              f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM; "
              f"{datetime.date.today().isoformat()}; median of {args.runs} run(s)")
        print(f"checkpoint: Llama-shaped, hidden {args.hidden}, {args.layers} layers, ffn {args.ffn}, "
              f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, bf16: HF {size / 1e9:.2f} GB, "
              f"megatron torch_dist {mg_size / 1e9:.2f} GB")
        print("| run | wall (s) | tool total or copy (s) | streaming (s) | MB/s (streaming or copy) "
              "| x copy (streaming) | x late copy (streaming) | x copy (tool total) | x copy (wall) "
              "| peak RSS (GB) | peak RSS / size | tree PSS / size |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        copy_rate = {}
        for name, runs in rows.items():
            if not runs:
                continue
            nbytes = size if "HF files" in name or name == "hf->megatron" else mg_size
            sec = statistics.median(x["seconds"] for x in runs)
            rss = statistics.median(x["peak_rss"] for x in runs)
            tree = statistics.median(x["peak_tree_pss"] for x in runs)
            if "copy" in name:
                copy = statistics.median(x["copy_seconds"] for x in runs)
                copy_rate[name] = nbytes / sec if name.startswith("copy") else nbytes / copy
                print(f"| {name} | {sec:.1f} | {copy:.1f} | | {nbytes / 1e6 / copy:.0f} | | | | | "
                      f"{rss / 1e9:.2f} | | |")
                continue
            files = "HF files" if name == "hf->megatron" else "megatron files"
            base, late = copy_rate[f"copy of the {files}"], copy_rate[f"late copy of the {files}"]
            total = statistics.median(tool_seconds(x["summary"]) for x in runs)
            stream = statistics.median(tool_seconds(x["summary"], "streaming") for x in runs)
            print(f"| {name} | {sec:.1f} | {total:.1f} | {stream:.1f} | {nbytes / 1e6 / stream:.0f} | "
                  f"{nbytes / stream / base:.2f} | {nbytes / stream / late:.2f} | {nbytes / total / base:.2f} | "
                  f"{nbytes / sec / base:.2f} | {rss / 1e9:.2f} | {rss / nbytes:.2f} | {tree / nbytes:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
