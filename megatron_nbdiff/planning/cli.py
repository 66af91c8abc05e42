"""``tools/plan.py``: the capacity planner (docs/plans.md).

    python tools/plan.py MODEL --seq-len 32768 --global-batch 256 [--recipe nbdiff] \\
        [--nodes 4 --gpus-per-node 8 --gpu-memory-gib 80] [--mfu 0.4] [--top 12] \\
        [--out-yaml run.yaml] [--out-json plans.json] [--plot memory.png] [--supported-only]

MODEL is a named shape (llama3-8b, llama3-70b, qwen2.5-7b, qwen2.5-32b, qwen2.5-72b,
bench-1.1b; mixture of experts: qwen3-30b-a3b, mixtral-8x7b), a Hugging Face model directory
(config.json) or a converted checkpoint (nbdiff.json). It enumerates TP, PP, VPP, CP, DP, EP
and the token dispatcher (mixture-of-experts models only), micro-batch and recomputation,
estimates per-GPU memory and step time, prints the layouts that fit, best first, and writes the
best as a run config that ``tools/launch_slurm.py`` accepts (fields the trainer lacks today go to
its comment header).
Bad input or nothing that fits: one ``error:`` line and exit 2.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import ArgumentParser, entry
from .layouts import RECIPES, Cluster, Workload


def parser() -> ArgumentParser:
    p = ArgumentParser(prog="plan", description=__doc__.split("\n\n")[0], epilog=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="named shape, HF model directory or converted checkpoint")
    p.add_argument("--seq-len", type=int, required=True, help="stream length L")
    p.add_argument("--global-batch", type=int, required=True, help="sequences per optimizer step")
    p.add_argument("--recipe", default="nbdiff", choices=sorted(RECIPES),
                   help="dual-stream recipes run 2L tokens (default nbdiff)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="default 80 (H100)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak per GPU (H100: 989)")
    p.add_argument("--mfu", type=float, default=0.40,
                   help="utilisation of the peak while computing, recomputation included (default 0.40)")
    p.add_argument("--intra-node-gbs", type=float, default=350.0, help="NCCL bus bandwidth in a node, GB/s")
    p.add_argument("--inter-node-gbs", type=float, default=40.0, help="NCCL bus bandwidth across nodes, GB/s per GPU")
    p.add_argument("--reserve-gib", type=float, default=5.0,
                   help="memory kept for the CUDA context, NCCL and fragmentation (default 5)")
    p.add_argument("--max-micro-batch", type=int, default=8)
    p.add_argument("--supported-only", action="store_true",
                   help="only layouts the trainer runs today (all train.* fields they need exist)")
    p.add_argument("--top", type=int, default=12, help="rows of the table (default 12)")
    p.add_argument("--out-yaml", help="write the best plan as a run config here")
    p.add_argument("--out-json", help="write every fitting plan here")
    p.add_argument("--plot", help="PNG of the memory parts of the --top plans")
    p.add_argument("--data", action="append", default=[], help="data.train prefix for the run config (repeatable)")
    p.add_argument("--tokenizer", help="data.tokenizer for the run config")
    p.add_argument("--init-from", help="checkpoint.init_from for the run config")
    p.add_argument("--save-dir", help="checkpoint.save_dir for the run config")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Plan; run through :func:`megatron_nbdiff.cli.run_main`."""
    from ..errors import ConfigError
    from .parameters import active_parameter_count, rank_parameter_count
    from .planner import best_supported, plan
    from .report import plot_memory, table, why, write_json, write_run_config
    from .shapes import load_model

    args = parser().parse_args(argv)
    if args.top < 1 or args.max_micro_batch < 1:
        raise ConfigError("--top and --max-micro-batch must be >= 1")
    for name in ("peak_tflops", "intra_node_gbs", "inter_node_gbs"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be > 0, found {getattr(args, name)}")
    if args.reserve_gib < 0:
        raise ConfigError(f"--reserve-gib must be >= 0, found {args.reserve_gib}")
    source = load_model(args.model, args.seq_len if args.seq_len > 0 else 1)
    cluster = Cluster(args.nodes, args.gpus_per_node, args.gpu_memory_gib, args.peak_tflops, args.mfu,
                      args.intra_node_gbs, args.inter_node_gbs, args.reserve_gib)
    work = Workload(args.recipe, args.seq_len, args.global_batch)
    plans = plan(source.model, work, cluster, supported_only=args.supported_only,
                 max_micro_batch=args.max_micro_batch)

    mc = source.model
    params = rank_parameter_count(mc)
    active = (f", {active_parameter_count(mc) / 1e9:.2f}B active per token ({mc.moe_topk} of "
              f"{mc.num_experts} experts)" if mc.is_moe else "")
    print(f"model: {source.described}; {params / 1e9:.2f}B parameters{active}")
    print(f"workload: recipe {work.recipe} ({work.streams} stream(s), layout {work.layout}), L={work.seq_len}, "
          f"global batch {work.global_batch} ({work.global_batch * work.seq_len:,} tokens per step)")
    print(f"cluster: {cluster.nodes} x {cluster.gpus_per_node} GPUs, {cluster.gpu_memory_gib:g} GiB each "
          f"({cluster.reserve_gib:g} reserved), peak {cluster.peak_tflops:g} TFLOP/s at MFU {cluster.mfu:g}")
    print(f"{len(plans)} layouts fit; the best {min(args.top, len(plans))} "
          "(GiB: peak stage; 'today': runs on the trainer as it is, else the train.* fields it lacks):")
    print(table(plans, args.top))
    best = plans[0]
    print(f"chosen: {why(best, plans, cluster)}")
    today = best_supported(plans)
    if today is None:
        print("the trainer as it is today: no fitting layout uses only the train.* fields it has")
    elif today is not best:
        print(f"best the trainer runs today (#{plans.index(today) + 1}): {why(today, plans, cluster)}")
    if args.out_yaml:
        write_run_config(args.out_yaml, best, source, work, cluster, data=args.data,
                         tokenizer=args.tokenizer, init_from=args.init_from, save_dir=args.save_dir)
        print(f"wrote {args.out_yaml}")
    if args.out_json:
        write_json(args.out_json, plans, source, work, cluster)
        print(f"wrote {args.out_json}")
    if args.plot:
        plot_memory(args.plot, plans, cluster, args.top,
                    f"{source.name}, {work.recipe}, L={work.seq_len}, {cluster.world} GPUs: best plans")
        print(f"wrote {args.plot}")
    return 0


console_main = entry(main)  # for an ``nbdiff-plan`` console script
