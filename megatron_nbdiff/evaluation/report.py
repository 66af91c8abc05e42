"""The evaluation report: held-out losses, lm-eval task accuracy and decoding speed of one model,
as one JSON report and a PNG plot (``nbdiff-eval``, ``tools/eval.py``).

    nbdiff-eval --model DIR --out report.json [--plot report.png] \\
        [--data PREFIX_OR_JSONL] [--block-sizes 1,4,32] \\
        [--tasks nbdiff_toy ...] [--thresholds 0.5,0.7,0.9,1.0] [--prompts FILE] [--limit N]

``--model``: an exported HF folder, a Megatron checkpoint or a training run folder.

Held-out losses (``--data``: an indexed-dataset prefix or a JSONL file of texts): the AR loss and,
per block size, the block-diffusion losses and the NLL bound of
:mod:`megatron_nbdiff.evaluation.metrics` (definitions there and in docs/method.md, "Losses"),
seeded by ``--seed``, on windows of ``--seq-length`` tokens (default 256, or the model's
``max_seq_len`` when that is shorter; a longer value is refused). Without ``--data`` the losses
are skipped, and the tool says so on stderr and in the report's notes.

Tasks (``--tasks``: lm-eval task or group names, or YAML paths; the shipped toy tasks are
``nbdiff_toy_copy``, ``nbdiff_toy_arith``, ``nbdiff_toy_text`` and the tag ``nbdiff_toy``): run
through the ``nbdiff`` lm-eval model (:mod:`megatron_nbdiff.evaluation.lm_eval_adapter`). In block
mode every task runs at the first threshold, and the generative ones again at each further
threshold, with the tokens per forward pass their generation reached. Skipped with a note when
lm-eval is not installed (``pip install -r requirements-eval.txt``).

Decoding speed: tokens per forward pass and tokens/s at each threshold and for AR decoding, on the
prompts of ``--prompts`` (JSONL lines with ``prompt`` or ``prompt_ids``, or a text file with one
prompt per line), else on the first tokens of the held-out windows, else on the shipped copy
task's questions (docs/method.md, "Decoding").

The plot: task accuracy against tokens per forward pass when generative tasks ran, else tokens per
forward pass against the threshold; and tokens/s against the threshold. Report and plot are
written atomically. Bad input raises :class:`EvaluationError`; through
:func:`megatron_nbdiff.cli.run_main` that is one ``error:`` line and exit status 2.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import sys
import warnings
from argparse import RawDescriptionHelpFormatter
from typing import Optional, Sequence

from ..cli import ArgumentParser, entry, run_main
from . import TASKS_DIR
from .common import EvaluationError, atomic_write_bytes, runner_max_length

DEFAULT_SEQ_LENGTH = 256


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="nbdiff-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="exported HF dir, Megatron checkpoint or run folder")
    p.add_argument("--out", required=True, help="the JSON report to write")
    p.add_argument("--plot", default=None, help="a PNG plot to write")
    g = p.add_argument_group("held-out losses")
    g.add_argument("--data", default=None, help="indexed-dataset prefix (PREFIX.bin/.idx) or JSONL file")
    g.add_argument("--json-key", default="text", help="text field of a JSONL --data file")
    g.add_argument("--seq-length", type=int, default=None,
                   help=f"window length in tokens (default {DEFAULT_SEQ_LENGTH}, or the model's "
                        "max_seq_len if shorter)")
    g.add_argument("--max-sequences", type=int, default=64, help="windows evaluated (default 64)")
    g.add_argument("--block-sizes", default="1,4,32", help="comma-separated block sizes")
    g.add_argument("--seed", type=int, default=0, help="noise seed of the diffusion losses")
    g.add_argument("--single-stream", action="store_true",
                   help="also report the single-stream (DiffuLLaMA) loss; automatic for single-stream models")
    g = p.add_argument_group("tasks (lm-eval)")
    g.add_argument("--tasks", nargs="+", default=None, help="task / group / tag names or YAML paths")
    g.add_argument("--include-path", action="append", default=[], help="extra folder of task YAML files")
    g.add_argument("--limit", type=int, default=None, help="examples per task (and prompts for the speed test)")
    g.add_argument("--num-fewshot", type=int, default=None)
    g.add_argument("--model-args", default="",
                   help="extra nbdiff model arguments, e.g. loglikelihood=diffusion,mc_samples=8")
    g = p.add_argument_group("decoding")
    g.add_argument("--mode", choices=["block", "full", "ar"], default="block")
    g.add_argument("--decode-block-size", type=int, default=None, help="default: the trained block size")
    g.add_argument("--thresholds", default="0.5,0.7,0.9,1.0", help="comma-separated, each in (0, 1]")
    g.add_argument("--prompts", default=None, help="JSONL (prompt / prompt_ids) or text file, one prompt a line")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens per prompt in the speed test")
    g.add_argument("--no-speed", action="store_true", help="skip the decoding speed test")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--device", default=None, help="HF models: torch device (default: where they load)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def note(notes: list, text: str) -> None:
    """Record ``text`` in the report's notes and say it on stderr now."""
    notes.append(text)
    print(f"note: {text}", file=sys.stderr, flush=True)


def _finite(obj):
    """JSON-safe copy: NaN and infinities become None, tensors and numpy scalars plain numbers."""
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and getattr(obj, "ndim", 0) == 0:  # numpy / torch scalars
        return _finite(obj.item())
    return str(obj)


def read_prompts(path: str, limit, tokenizer) -> list:
    """Prompts from a JSONL file (``prompt`` or ``prompt_ids`` per line) or a text file (one
    prompt per line)."""
    from ..inference import read_prompt_file

    if path.endswith((".jsonl", ".json")):
        rows = [(n, row["prompt_ids"] if "prompt_ids" in row else row["prompt"])
                for n, row in read_prompt_file(path)]
    else:
        if not os.path.isfile(path):
            raise EvaluationError(f"prompt file not found: {path}")
        rows = []
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError:
                    raise EvaluationError(f"{path} line {n}: not valid UTF-8") from None
                if line.strip():
                    rows.append((n, line))
        if not rows:
            raise EvaluationError(f"{path} holds no prompts")
    for n, prompt in rows:
        if isinstance(prompt, str) and tokenizer is None:
            raise EvaluationError(f"{path} line {n}: a text prompt, but the model has no tokenizer: use prompt_ids")
    prompts = [prompt for _, prompt in rows]
    return prompts[:limit] if limit else prompts


def default_prompts(sequences, tokenizer, limit) -> tuple[list, str]:
    """Prompts for the speed test when --prompts is not given."""
    n = limit or 8
    if sequences:
        prompts = [s[:max(1, min(32, len(s) // 2))] for s in sequences[:n]]
        return prompts, "the first tokens of the held-out windows"
    if tokenizer is not None:
        rows = []
        with open(os.path.join(TASKS_DIR, "copy.jsonl"), encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    rows.append(f"Repeat the words: {json.loads(line)['words']}\nAnswer:")
        return rows[:n], "the questions of the shipped nbdiff_toy_copy task"
    return [], "no prompts: give --prompts (the model has no tokenizer and no --data was given)"


# -- tasks --------------------------------------------------------------------------------------
def resolve_tasks(specs: list, include_paths: list):
    """A TaskManager that knows every spec (building lm-eval's default index only when needed)."""
    from lm_eval.tasks import TaskManager

    for d in include_paths:
        if not os.path.isdir(d):
            raise EvaluationError(f"--include-path {d} is not a folder")
    names = []
    for spec in specs:
        if os.path.isdir(spec):
            raise EvaluationError(f"task {spec} is a folder: pass it with --include-path and name its tasks")
        if spec.endswith((".yaml", ".yml")):
            if not os.path.isfile(spec):
                raise EvaluationError(f"task file not found: {spec}")
        else:
            names.append(spec)
    paths = [TASKS_DIR] + list(include_paths)
    tm = TaskManager(include_defaults=False, include_path=paths)
    if any(n not in tm.all_tasks for n in names):
        tm = TaskManager(include_defaults=True, include_path=paths)
        missing = [n for n in names if n not in tm.all_tasks]
        if missing:
            raise EvaluationError(f"unknown lm-eval task(s) {missing}; the shipped ones are "
                                  f"{TaskManager(include_defaults=False, include_path=TASKS_DIR).all_tasks}")
    return tm


def primary_metric(task_result: dict):
    """(name, value) of a task's first numeric metric that is not a standard error."""
    for key, value in task_result.items():
        if "," in key and "stderr" not in key and isinstance(value, (int, float)) and not isinstance(value, bool):
            return key, float(value)
    return None, None


def model_args(args) -> dict:
    from lm_eval.utils import simple_parse_args_string

    extra = simple_parse_args_string(args.model_args) if args.model_args else {}
    for key in ("model", "pretrained", "threshold", "mode", "block_size", "batch_size", "device", "dtype"):
        if key in extra:
            raise EvaluationError(f"--model-args {key}=...: use the tool's own option for it")
    return extra


def run_tasks(args, runner, thresholds, tm, progress: bool) -> dict:
    import lm_eval

    from .lm_eval_adapter import NBDiffLM

    extra = model_args(args)
    base = dict(mode=args.mode, block_size=args.decode_block_size, batch_size=args.batch_size, **extra)
    per_threshold = args.mode == "block"
    runs, output_types, generative = [], {}, None
    for k, th in enumerate(thresholds if per_threshold else thresholds[:1]):
        specs = args.tasks if k == 0 else generative
        if not specs:
            break
        lm = NBDiffLM(model=runner, threshold=th, **base)
        res = lm_eval.simple_evaluate(model=lm, tasks=list(specs), task_manager=tm, limit=args.limit,
                                      num_fewshot=args.num_fewshot, log_samples=False,
                                      bootstrap_iters=1000, verbosity=None if progress else "ERROR")
        if res is None:
            raise EvaluationError("lm-eval returned no results")
        if k == 0:
            output_types = {t: c.get("output_type") for t, c in res.get("configs", {}).items()}
            generative = sorted(t for t, o in output_types.items() if o == "generate_until")
        s = lm.decode_stats
        runs.append(dict(
            threshold=th if per_threshold else None,
            tasks=sorted(res["results"]),
            results={t: {m: v for m, v in r.items() if m not in ("name", "alias")} for t, r in res["results"].items()},
            generation=dict(tokens=s["tokens"], forward_passes=s["forward_passes"], seconds=s["seconds"],
                            tokens_per_forward=lm.tokens_per_forward(),
                            tokens_per_s=s["tokens"] / s["seconds"] if s["seconds"] > 0 else None),
        ))
    return dict(specs=list(args.tasks), model_args=dict(base, threshold="per run"), limit=args.limit,
                num_fewshot=args.num_fewshot, output_types=output_types, generative=generative or [],
                lm_eval_version=getattr(lm_eval, "__version__", None), runs=runs)


# -- plot ---------------------------------------------------------------------------------------
def _threshold_panel(ax, block_recs: list, ar_rec: Optional[dict], key: str, ylabel: str, title: str) -> None:
    """``key`` of the block-decoding records against threshold, with the AR record's value as a
    dashed line when there is one (a missing value plots as 0)."""
    ax.plot([r["threshold"] for r in block_recs], [r[key] or 0.0 for r in block_recs], "o-",
            label=f"block decoding (B={block_recs[0]['block_size']})")
    if ar_rec is not None and ar_rec[key]:
        ax.axhline(ar_rec[key], color="gray", ls="--", label="AR decoding")
    ax.set_xlabel("threshold τ")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def make_plot(report: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..fileio import figure_png

    tasks = report.get("tasks") or {}
    runs = tasks.get("runs") or []
    speed = report.get("decoding") or {}
    records = speed.get("records") or []
    block_recs = [r for r in records if r["mode"] != "ar" and r.get("threshold") is not None]
    ar_rec = next((r for r in records if r["mode"] == "ar"), None)
    acc_series = {}
    for t in tasks.get("generative") or []:
        pts = []
        for run in runs:
            if t in run["results"] and run["generation"]["tokens_per_forward"] is not None:
                name, value = primary_metric(run["results"][t])
                if name is not None:
                    pts.append((run["generation"]["tokens_per_forward"], value, run["threshold"], name))
        if pts:
            acc_series[t] = pts
    panels = (1 if acc_series or block_recs else 0) + (1 if block_recs else 0)
    if panels == 0:
        raise ValueError("nothing to plot")
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    axes = axes[0]
    ax = axes[0]
    if acc_series:
        for t, pts in acc_series.items():
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{t} ({pts[0][3].split(',')[0]})")
            seen: dict = {}
            for x, y, th, _ in pts:
                if th is not None:  # stack the labels of coinciding points
                    k = seen[(x, y)] = seen.get((x, y), -1) + 1
                    ax.annotate(f"τ={th:g}", (x, y), textcoords="offset points", xytext=(4, 4 + 10 * k), fontsize=8)
        ax.set_xlabel("tokens per forward pass (task generation)")
        ax.set_ylabel("accuracy")
        ax.set_title("accuracy vs parallelism")
    else:
        _threshold_panel(ax, block_recs, ar_rec, "tokens_per_forward", "tokens per forward pass",
                         "tokens per forward vs threshold")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if panels == 2:
        ax = axes[1]
        _threshold_panel(ax, block_recs, ar_rec, "tokens_per_s", "tokens / s", "decoding throughput")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(os.path.basename(os.path.normpath(report["model"])), fontsize=10)
    fig.tight_layout()
    return figure_png(fig)


# -- main ---------------------------------------------------------------------------------------
def main(argv: Optional[Sequence[str]] = None) -> int:
    """``nbdiff-eval``: parse, check, evaluate, write; run it through
    :func:`megatron_nbdiff.cli.run_main` (bad input: one ``error:`` line, exit 2)."""
    args = parser().parse_args(argv)
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"
    return run(args)


def check_args(args) -> tuple[list, list]:
    """Refuse bad options before the model loads; returns (block sizes, thresholds)."""
    from .metrics import _indexed_prefix, parse_float_list, parse_int_list

    for path, what in ((args.out, "--out"), (args.plot, "--plot")):
        if path is None:
            continue
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise EvaluationError(f"{what}: folder {parent} does not exist")
        if os.path.isdir(path):
            raise EvaluationError(f"{what}: {path} is a folder")
    if args.plot is not None and not args.plot.lower().endswith(".png"):
        raise EvaluationError(f"--plot must name a .png file, found {args.plot}")
    if not args.out.lower().endswith(".json"):
        raise EvaluationError(f"--out must name a .json file, found {args.out}")
    for name in ("max_sequences", "max_new_tokens", "batch_size"):
        if getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.seq_length is not None and args.seq_length < 2:
        raise EvaluationError(f"--seq-length must be >= 2, found {args.seq_length}")
    for name in ("limit", "decode_block_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise EvaluationError(f"--{name.replace('_', '-')} must be >= 1, found {getattr(args, name)}")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise EvaluationError(f"--num-fewshot must be >= 0, found {args.num_fewshot}")
    if args.seed < 0:
        raise EvaluationError(f"--seed must be >= 0, found {args.seed}")
    block_sizes = parse_int_list(args.block_sizes, "--block-sizes")
    thresholds = parse_float_list(args.thresholds, "--thresholds")
    bad = [t for t in thresholds if not 0.0 < t <= 1.0]
    if bad:
        raise EvaluationError(f"--thresholds must lie in (0, 1], found {bad}")
    if args.data is not None and not (os.path.isfile(args.data) or _indexed_prefix(args.data)):
        raise EvaluationError(f"--data not found: {args.data} (a JSONL file or an indexed-dataset prefix "
                              "with PREFIX.bin and PREFIX.idx)")
    if args.prompts is not None and not os.path.isfile(args.prompts):
        raise EvaluationError(f"prompt file not found: {args.prompts}")
    if args.mode == "ar" and args.decode_block_size not in (None, 1):
        raise EvaluationError("--mode ar decodes one token per pass; drop --decode-block-size")
    return block_sizes, thresholds


def resolve_seq_length(requested: Optional[int], runner) -> int:
    """The held-out window length: ``requested``, which must fit the model, or the default cut to
    the model's ``max_seq_len``."""
    limit = runner_max_length(runner)
    if requested is None:
        return DEFAULT_SEQ_LENGTH if limit is None else min(DEFAULT_SEQ_LENGTH, limit)
    if limit is not None and requested > limit:
        raise EvaluationError(f"--seq-length {requested} exceeds the model's max_seq_len {limit} "
                              f"({runner.info.source})")
    return requested


def run(args) -> int:
    from ..inference import load_runner
    from .metrics import decoding_speed, heldout_losses, load_sequences

    block_sizes, thresholds = check_args(args)
    progress = not args.quiet
    notes: list = []
    runner = load_runner(args.model, device=args.device, dtype=args.dtype)
    info = runner.info
    if args.data is not None:
        args.seq_length = resolve_seq_length(args.seq_length, runner)
    report = dict(
        model=os.path.abspath(args.model), created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        runner=dict(dataclasses.asdict(info), kind=type(runner).__name__, device=str(runner.device)),
        settings={k: v for k, v in vars(args).items()},
    )
    try:
        import torch
        import transformers

        report["versions"] = dict(torch=torch.__version__, transformers=transformers.__version__)
    except ImportError:
        pass
    if args.mode != "ar" and not info.has_metadata:
        raise EvaluationError(f"{info.source} has no nbdiff.json: only --mode ar is possible")
    if args.mode != "ar" and info.mask_token_id is None:
        raise EvaluationError(f"{info.source} has no mask token: only --mode ar is possible")

    # the tasks need lm-eval: find out before the long parts
    lm_eval_missing = tm = None
    if args.tasks:
        try:
            import lm_eval  # noqa: F401

            from . import lm_eval_adapter
        except ImportError as exc:
            lm_eval_missing = (f"tasks skipped: lm-eval is not installed ({exc}); "
                               "install it with `pip install -r requirements-eval.txt`")
            note(notes, lm_eval_missing)
        else:
            tm = resolve_tasks(args.tasks, args.include_path)
            # bad --model-args fail now, not after the long parts
            lm_eval_adapter.NBDiffLM(model=runner, mode=args.mode, block_size=args.decode_block_size,
                                     batch_size=args.batch_size, threshold=thresholds[0], **model_args(args))

    sequences = None
    if args.data is not None:
        sequences = load_sequences(args.data, tokenizer=runner.tokenizer, seq_length=args.seq_length,
                                   max_sequences=args.max_sequences, json_key=args.json_key)
        usable = [b for b in block_sizes if b == 1 or info.mask_token_id is not None]
        if len(usable) < len(block_sizes):
            note(notes, f"block sizes {sorted(set(block_sizes) - set(usable))} skipped: the model has no mask token")
        report["heldout"] = dict(
            data=os.path.abspath(args.data), seq_length=args.seq_length,
            **heldout_losses(runner, sequences, usable, seed=args.seed, batch_size=args.batch_size,
                             single_stream=True if args.single_stream else None, progress=progress),
        )
    else:
        report["heldout"] = None
        note(notes, "held-out losses skipped: no validation data (give --data: an indexed-dataset prefix "
                    "or a JSONL file of held-out text)")

    if args.no_speed:
        report["decoding"] = None
        note(notes, "decoding speed skipped: --no-speed")
    else:
        if args.prompts is not None:
            prompts, source = read_prompts(args.prompts, args.limit, runner.tokenizer), os.path.abspath(args.prompts)
        else:
            prompts, source = default_prompts(sequences, runner.tokenizer, args.limit)
        if prompts:
            speed_mode = args.mode if args.mode != "ar" else None
            records = decoding_speed(runner, prompts, thresholds if speed_mode else [],
                                     mode=speed_mode or "block", block_size=args.decode_block_size,
                                     max_new_tokens=args.max_new_tokens, batch_size=1, progress=progress)
            report["decoding"] = dict(prompts_from=source, num_prompts=len(prompts),
                                      max_new_tokens=args.max_new_tokens, batch_size=1, records=records)
        else:
            report["decoding"] = None
            note(notes, f"decoding speed skipped: {source}")

    if args.tasks and lm_eval_missing is None:
        report["tasks"] = run_tasks(args, runner, thresholds, tm, progress)
    else:
        report["tasks"] = None
        if not args.tasks:
            note(notes, "tasks skipped: no --tasks")
    report["notes"] = notes

    report = _finite(report)
    png = None
    if args.plot is not None:
        try:
            png = make_plot(report)
        except ValueError:
            report["notes"].append("no plot: neither generative tasks nor a decoding speed test ran")
    atomic_write_bytes(args.out, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    if args.plot is not None:
        if png is None:
            raise EvaluationError(f"--plot {args.plot}: nothing to plot (no generative task results and no "
                                  "decoding speed test); the report was written")
        atomic_write_bytes(args.plot, png)
    print_summary(report, args)
    return 0


def print_summary(report: dict, args) -> None:
    lines = [f"wrote {args.out}" + (f" and {args.plot}" if args.plot else "")]
    h = report.get("heldout")
    if h:
        lines.append(f"held-out: {h['num_sequences']} windows, {h['num_target_tokens']} targets, "
                     f"AR loss {h['ar']['loss']:.4f}")
        for B, e in h["block"].items():
            lines.append(f"  B={B}: diffusion loss {e['diffusion_loss']:.4f}, NLL bound {e['nll_bound']:.4f}, "
                         f"masked {e['masked_tokens']}")
        if h.get("single_stream"):
            lines.append(f"  single-stream diffusion loss {h['single_stream']['diffusion_loss']:.4f}")
    d = report.get("decoding")
    if d:
        for r in d["records"]:
            tag = "AR" if r["mode"] == "ar" else f"{r['mode']} τ={r['threshold']:g}"
            tps = f"{r['tokens_per_s']:.1f}" if r["tokens_per_s"] else "n/a"
            tpf = f"{r['tokens_per_forward']:.2f}" if r["tokens_per_forward"] else "n/a"
            lines.append(f"decoding {tag}: {tpf} tokens/forward, {tps} tokens/s")
    t = report.get("tasks")
    if t:
        for run in t["runs"]:
            for task, res in run["results"].items():
                name, value = primary_metric(res)
                if name is not None:
                    th = "" if run["threshold"] is None else f" (τ={run['threshold']:g})"
                    lines.append(f"task {task}{th}: {name} = {value:.4f}")
    for n in report.get("notes") or []:
        lines.append(f"note: {n}")
    print("\n".join(lines))


console_main = entry(main)

if __name__ == "__main__":
    sys.exit(run_main(main))
