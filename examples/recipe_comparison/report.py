"""The recipe comparison's outputs, all made from ``report.json``'s per-seed results: the intervals
(``intervals.py``), the paired differences behind the paper's claims, ``comparison.md`` and
``comparison.png``. ``run.py --report-only`` calls :func:`render` on a finished folder."""
from __future__ import annotations

import importlib.util
import json
import os

from megatron_nbdiff.errors import DataError
from megatron_nbdiff.fileio import atomic_write, save_figure

HERE = os.path.dirname(os.path.abspath(__file__))
TASKS = ("addition", "addition (trained pairs)", "copy")
LOSSES = (("ar_loss", "held-out AR loss"), ("nll_bound", "block NLL bound"),
          ("single_stream_loss", "single-stream loss"))

# (row A, row B, what is compared, whether the paper says A is better)
CLAIMS = (
    ("nbdiff", "block_causal", "context-causal vs block-causal clean stream (NBDiff Table 1)", True),
    ("nbdiff (antithetic t)", "nbdiff", "antithetic vs uniform t", False),
    ("nbdiff (stratified t)", "nbdiff", "stratified vs uniform t", False),
)


def _load_intervals():
    """``intervals.py`` beside this file, loaded from its path (examples are not a package)."""
    spec = importlib.util.spec_from_file_location("recipe_comparison_intervals", os.path.join(HERE, "intervals.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


iv = _load_intervals()


def per_problem(result: dict, where: str) -> dict:
    """A decoding result's per-problem lists (``correct``, ``tokens``, ``passes``), checked."""
    missing = [k for k in ("correct", "tokens", "passes") if not isinstance(result.get(k), list)]
    if missing:
        raise DataError(f"{where}: no per-problem {', '.join(missing)} (a report written before intervals); "
                        "rerun the comparison to re-evaluate")
    return result


def summarize(report: dict) -> dict:
    """Every row's means and intervals, and the paired differences of :data:`CLAIMS`."""
    rows = {}
    for label, by_seed in report["results"].items():
        seeds = list(by_seed)
        entry = {"seeds": [int(s) for s in seeds]}
        for key, _ in LOSSES:
            values = [by_seed[s][key] for s in seeds]
            entry[key] = None if any(v is None for v in values) else iv.t_interval(values)
        entry["decoding"] = {}
        for how in by_seed[seeds[0]]["decoding"]:
            entry["decoding"][how] = {}
            for task in TASKS:
                cells = [per_problem(by_seed[s]["decoding"][how][task], f"report.json: results[{label!r}][{s!r}]"
                                     f".decoding[{how!r}][{task!r}]") for s in seeds]
                entry["decoding"][how][task] = dict(
                    accuracy=iv.ratio_interval([c["correct"] for c in cells]),
                    tokens_per_forward=iv.ratio_interval([c["tokens"] for c in cells], [c["passes"] for c in cells]))
        rows[label] = entry
    claims = []
    results = report["results"]
    for a, b, what, paper_says_a_better in CLAIMS:
        if a not in results or b not in results:
            continue
        seeds = [s for s in results[a] if s in results[b]]
        if not seeds:
            continue
        ra, rb = [results[a][s] for s in seeds], [results[b][s] for s in seeds]
        ctx = (a, b, what, seeds, paper_says_a_better)
        for key, _ in LOSSES[:2]:
            claims.append(_claim(*ctx, key, iv.t_interval([x[key] - y[key] for x, y in zip(ra, rb)]),
                                 higher_is_better=False))
        for how in ra[0]["decoding"]:
            if how not in rb[0]["decoding"]:
                continue
            for task in TASKS:
                ca = [per_problem(x["decoding"][how][task], f"report.json: results[{a!r}]") for x in ra]
                cb = [per_problem(y["decoding"][how][task], f"report.json: results[{b!r}]") for y in rb]
                claims.append(_claim(*ctx, "accuracy", iv.paired_ratio_interval(
                    [c["correct"] for c in ca], [c["correct"] for c in cb]), how, task))
                claims.append(_claim(*ctx, "tokens_per_forward", iv.paired_ratio_interval(
                    [c["tokens"] for c in ca], [c["tokens"] for c in cb],
                    [c["passes"] for c in ca], [c["passes"] for c in cb]), how, task))
    return dict(method=iv.METHOD, rows=rows, claims=claims)


def _claim(a, b, what, seeds, paper_says_a_better, metric, difference, decoding=None, task=None,
           higher_is_better=True) -> dict:
    """One paired difference with its verdict fields: ``separates`` (the interval excludes 0),
    ``a_better`` (the direction of the mean; None when it is 0) and ``paper`` (what the paper
    claims, for accuracies of Table 1)."""
    better = difference["mean"] > 0 if higher_is_better else difference["mean"] < 0
    return dict(comparison=what, a=a, b=b, metric=metric, decoding=decoding, task=task,
                seeds=[int(s) for s in seeds], difference=difference, separates=iv.excludes_zero(difference),
                a_better=better if difference["mean"] != 0 else None,
                paper="A better" if paper_says_a_better and metric == "accuracy" else None)


def fmt(entry, digits: int) -> str:
    """``mean [lo, hi]`` (the mean alone without an interval, ``-`` without a value)."""
    if entry is None:
        return "-"
    s = f"{entry['mean']:.{digits}f}"
    if entry["lo"] is not None:
        s += f" [{entry['lo']:.{digits}f}, {entry['hi']:.{digits}f}]"
    return s


def verdict(c: dict) -> str:
    if c["a_better"] is None:
        return "equal means"
    side = "A better" if c["a_better"] else "B better"
    if c["metric"] == "tokens_per_forward":
        side = "A faster" if c["a_better"] else "B faster"
    sep = {True: "separated", False: "not separated", None: "no interval (one seed)"}[c["separates"]]
    s = f"{side}, {sep}"
    if c["paper"]:
        s += "; paper's direction" if c["a_better"] else "; against the paper"
    return s


def table(report: dict) -> str:
    """comparison.md: how the intervals were made, every row with its intervals, and the paired
    differences."""
    summary = report["intervals"]
    B = report["block_size"]
    m = summary["method"]
    lines = [f"# Recipe comparison ({report['size']}, {report['device']})", "",
             f"{report['adapt_tokens_per_recipe']:,} adaptation tokens per recipe; {report['eval_problems_per_task']} "
             f"problems per task; {report['heldout_sequences']} held-out windows. Cells: mean [95% interval].", "",
             f"- accuracy: {m['accuracy']}", f"- tokens per forward: {m['tokens_per_forward']}",
             f"- losses: {m['loss']}", f"- paired differences: {m['paired']}", "",
             f"| model | seeds | held-out AR loss | block NLL bound (B={B}) | single-stream loss | decoding | "
             + " | ".join(f"{t} accuracy | {t} tokens/forward" for t in TASKS) + " |",
             "|---" * (6 + 2 * len(TASKS)) + "|"]
    for label, row in summary["rows"].items():
        for how, tasks in row["decoding"].items():
            lines.append(f"| {label} | {len(row['seeds'])} | " + " | ".join(fmt(row[k], 3) for k, _ in LOSSES)
                         + f" | {how} | " + " | ".join(f"{fmt(tasks[t]['accuracy'], 3)} | "
                                                      f"{fmt(tasks[t]['tokens_per_forward'], 2)}" for t in TASKS)
                         + " |")
    if summary["claims"]:
        lines += ["", "Paired differences A - B (losses: lower is better; accuracy: higher is better)", "",
                  "| comparison | A | B | seeds | metric | decoding | task | A - B [95% interval] | verdict |",
                  "|---" * 9 + "|"]
        for c in summary["claims"]:
            digits = 2 if c["metric"] == "tokens_per_forward" else 3
            lines.append(f"| {c['comparison']} | {c['a']} | {c['b']} | {len(c['seeds'])} | {c['metric']} | "
                         f"{c['decoding'] or '-'} | {c['task'] or '-'} | {fmt(c['difference'], digits)} | "
                         f"{verdict(c)} |")
    return "\n".join(lines)


def plot(path: str, report: dict) -> None:
    """Accuracy against tokens per forward, one line per model, with 95% intervals on both axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["intervals"]["rows"]
    fig, axes = plt.subplots(1, len(TASKS), figsize=(6 * len(TASKS), 4.5))
    for ax, task in zip(axes, TASKS):
        for label, row in rows.items():
            pts = sorted(((d[task]["tokens_per_forward"], d[task]["accuracy"]) for d in row["decoding"].values()),
                         key=lambda p: p[0]["mean"])
            x = [p[0]["mean"] for p in pts]
            y = [p[1]["mean"] for p in pts]

            def err(entries, means):
                if entries[0]["lo"] is None:
                    return None
                return [[m - e["lo"] for m, e in zip(means, entries)], [e["hi"] - m for m, e in zip(means, entries)]]

            ax.errorbar(x, y, xerr=err([p[0] for p in pts], x), yerr=err([p[1] for p in pts], y), fmt="o-",
                        capsize=3, label=label)
        ax.set_xlabel("tokens per forward")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(task)
    axes[0].legend(fontsize=8)
    seeds = len(report["adapt_seeds"])
    fig.suptitle(f"recipe comparison ({report['size']}: {report['adapt_tokens_per_recipe']:,} adaptation tokens per "
                 f"recipe, mean of {seeds} seed{'s' if seeds > 1 else ''}, 95% intervals)")
    fig.tight_layout()
    save_figure(fig, path)


def render(out: str, report: dict) -> str:
    """Recompute the intervals from the per-seed results and write report.json, comparison.md and
    comparison.png under ``out``; returns the table."""
    report["intervals"] = summarize(report)
    text = table(report)
    atomic_write(os.path.join(out, "report.json"), json.dumps(report, indent=1))
    atomic_write(os.path.join(out, "comparison.md"), text + "\n")
    plot(os.path.join(out, "comparison.png"), report)
    return text


def read_report(out: str) -> dict:
    """``out/report.json`` (DataError naming the file when it is missing or not a report)."""
    path = os.path.join(out, "report.json")
    try:
        with open(path) as f:
            report = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: not found; run the comparison into this folder first") from None
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc})") from None
    missing = [k for k in ("results", "block_size", "size", "adapt_seeds") if k not in report]
    if missing or not report.get("results"):
        raise DataError(f"{path}: not a recipe-comparison report (missing {', '.join(missing) or 'results'})")
    return report
