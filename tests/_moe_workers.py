"""Helpers for the mixture-of-experts conversion tests: tiny random HF Qwen3-MoE and Mixtral
checkpoints (built with transformers from a config, no downloads) and the two-process gloo worker
that loads converted MoE checkpoints at TP=2, EP=2 or PP=2 (spawned; importable by module name)."""
from __future__ import annotations

import torch

from _convert_workers import _pp_logits, _save_from_layout
from _gloo import run_world

VOCAB = 100
EXPERTS = 6
MOE_SETUPS = {
    # family: (config class, model class, config fields)
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=EXPERTS, num_experts_per_tok=2,
                       norm_topk_prob=True, mlp_only_layers=[0], decoder_sparse_step=1, head_dim=16,
                       use_sliding_window=False)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=24, num_local_experts=EXPERTS, num_experts_per_tok=2, sliding_window=None)),
}


def make_moe_checkpoint(directory: str, family: str, *, seed: int = 0, **fields):
    """Save a tiny random fp32 ``family`` model (hidden 32, 2 layers, 6 experts, top-2; ``fields``
    override config fields) with weights drawn large enough that a mapping mistake or a different
    routing changes the logits visibly. Returns the HF model (eval, sdpa)."""
    import transformers

    cfg_name, model_name, extra = MOE_SETUPS[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=False,
        **dict(extra, **fields),
    )
    from _convert_workers import random_hf_model

    model = random_hf_model(model_name, cfg, seed)
    model.save_pretrained(directory)
    return model


def run_layout(out_dir: str, jobs: list[dict], tp: int = 1, pp: int = 1, ep: int = 1) -> list:
    """:func:`layout` on two gloo processes at one parallel layout."""
    return run_world("_moe_workers", "layout", out_dir, world=2, init=False, jobs=jobs, tp=tp, pp=pp, ep=ep)


def layout(rank, world, port, jobs, tp, pp, ep):
    """For each job ``{"name", "ckpt", "ids": [ids of rank 0, ids of rank 1], "save": dir or
    None}``: load the converted checkpoint at TP/PP/EP, return this rank's logits (the last
    pipeline stage's; None on the first) and, with ``save``, save the model from this layout as a
    checkpoint written there."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_nbdiff.checkpoint import load_model
    from megatron_nbdiff.parallel import destroy_parallel, initialize_parallel

    out = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        initialize_parallel(tp, pp, ep=ep)
        stage = parallel_state.get_pipeline_model_parallel_rank()
        for job in jobs:
            model = load_model(job["ckpt"]).eval()
            ids = job["ids"][rank]
            if pp > 1:
                logits = _pp_logits(model, ids, stage)
            else:
                with torch.no_grad():
                    logits = model(ids, layout="causal").clean
            experts = [m for m in model.modules() if type(m).__name__ == "SequentialMLP"]
            out[job["name"]] = {"logits": logits, "stage": stage,
                                "local_experts": [len(m.local_experts) for m in experts]}
            if job.get("save"):
                _save_from_layout(model, job["ckpt"], job["save"], rank, written_tp=tp, written_pp=pp,
                                  written_ep=ep)
            del model
    finally:
        destroy_parallel()
    return out


def train_records(rank, runs, steps=3):
    """For each run config dict of ``runs`` in turn (its ``train.ep``, ``train.moe_dispatcher``...
    as given), the trainer on this gloo world for ``steps`` steps (resuming from the run folder's
    checkpoint, if any). Returns per run rank 0's metrics.jsonl training records (every rank's,
    identical on all ranks by construction, from the file rank 0 wrote), the experts this rank
    holds per MoE layer, the class of their token dispatcher and the parameter count."""
    import json
    import os

    import torch.distributed as dist

    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    out = []
    for data in runs:
        trainer = Trainer(RunConfig.from_dict(data), quiet=True, stop_after=steps)
        trainer.run()
        moe = [m for m in trainer.inner.modules() if type(m).__name__ == "MoELayer"]
        dist.barrier()
        with open(os.path.join(data["checkpoint"]["save_dir"], "metrics.jsonl")) as f:
            records = [r for r in map(json.loads, f) if "eval_loss" not in r]
        out.append({"records": records, "local_experts": [len(m.experts.local_experts) for m in moe],
                    "dispatchers": sorted({type(m.token_dispatcher).__name__ for m in moe}),
                    "num_params": trainer.num_params})
    return out


def decode(rank, world, port, ckpt, prompts, ep, max_new_tokens):
    """The Megatron runner of ``ckpt`` at EP=``ep`` on this gloo world (through
    ``load_runner``, the entry point users call): greedy block-size-1
    decoding of each prompt (every rank decodes the same prompts); returns the generated ids, the
    number of experts this rank holds per MoE layer and the class of their token dispatcher."""
    import torch.distributed as dist

    from megatron_nbdiff.inference import generate, load_runner
    from megatron_nbdiff.parallel import destroy_parallel, initialize_parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        initialize_parallel(1, 1, ep=ep)
        runner = load_runner(ckpt, ep=ep)
        moe = [m for m in runner.model.modules() if type(m).__name__ == "MoELayer"]
        local = [len(m.experts.local_experts) for m in moe]
        dispatchers = sorted({type(m.token_dispatcher).__name__ for m in moe})
        out = [generate(runner, [p], block_size=1, max_new_tokens=max_new_tokens, stop_at_eos=False)[0]["token_ids"]
               for p in prompts]
    finally:
        destroy_parallel()
    return {"tokens": out, "local_experts": local, "dispatchers": dispatchers}
