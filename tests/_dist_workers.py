"""Worker bodies for the two-process gloo tests (spawned; importable by module name)."""
from __future__ import annotations

import os

import torch

from _gloo import free_port, run_world  # noqa: F401  (free_port: used by test modules)

VOCAB = 97
MASK = 96


def run_two_process(name: str, out_dir: str, **kwargs) -> list:
    """Run worker ``name`` of this module on two gloo processes; return each rank's result."""
    return run_world("_dist_workers", name, out_dir, world=2, **kwargs)


def tiny(**overrides):
    from megatron_nbdiff.config import ModelConfig

    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=96, max_seq_len=64,
        # the same padded vocabulary (128) at TP=1 and TP=2, so CPU initialisation draws alike
        make_vocab_size_divisible_by=64,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def batch(seed: int, b: int = 2, L: int = 16, B: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, MASK, (b, L), generator=g)
    n = x.clone()
    masked = torch.rand(x.shape, generator=g) < 0.5
    masked[:, ::B] = False
    n[masked] = MASK
    return x, n


def _build(mc, tp, pp, sequence_parallel=False, pre_process=True, post_process=True):
    from megatron_nbdiff.models import NBDiffModel

    torch.manual_seed(1234)
    tc = mc.transformer_config(tp=tp, pp=pp, sequence_parallel=sequence_parallel)
    return NBDiffModel(mc, tc, pre_process=pre_process, post_process=post_process)


def tp_logits(rank, tie=False):
    """Logits (and input-embedding grads) at TP=1, then TP=2 with and without sequence
    parallelism, in the same two processes."""
    from megatron.core import parallel_state

    from megatron_nbdiff.parallel import initialize_parallel

    mc = tiny(tie_embeddings=tie)
    x, n = batch(0)
    results = {}
    for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2_sp", 2, True)):
        initialize_parallel(tp, 1)
        model = _build(mc, tp, 1, sequence_parallel=sp)
        out = model(x, n, layout="dual_context_causal", block_size=4)
        ar = model(x, layout="causal")
        (out.noisy.logsumexp(-1).sum() + out.clean.logsumexp(-1).sum()).backward()
        # the gradient of the (vocab-sharded) embedding, gathered to the full table
        grad = model.gpt.embedding.word_embeddings.weight.grad
        if tp > 1:
            parts = [torch.empty_like(grad) for _ in range(tp)]
            torch.distributed.all_gather(parts, grad, group=parallel_state.get_tensor_model_parallel_group())
            grad = torch.cat(parts, 0)
        results[name] = dict(
            noisy=out.noisy.detach(), clean=out.clean.detach(), ar=ar.clean.detach(), emb_grad=grad
        )
    return results


def _loss_step(layout, block_size):
    def forward_step(data_iterator, model):
        x, n = next(data_iterator)
        if layout == "causal":
            out = model(x, layout="causal")
        else:
            out = model(x, n, layout=layout, block_size=block_size)
        if out.hidden is not None:
            return out.hidden, lambda t: (t.sum(), {})
        logits = torch.cat([s for s in (out.noisy, out.clean) if s is not None], dim=1)
        targets = torch.cat([x for s in (out.noisy, out.clean) if s is not None], dim=1)
        # shift: the logit at i predicts token i + 1
        per_token = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            targets[:, 1:].reshape(-1),
            reduction="none",
        )

        def loss_func(t):
            loss = t.mean()
            return loss, {"loss": loss.detach()}

        return per_token, loss_func

    return forward_step


def pp_loss(rank, layout="dual_context_causal", block_size=4):
    """Loss of two microbatches through megatron's schedule at PP=1, then at PP=2 with the same
    weights (stage-local layer numbering remapped from the PP=1 state dict)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_nbdiff import compat
    from megatron_nbdiff.parallel import initialize_parallel

    mc = tiny()
    micro = [batch(s) for s in (1, 2)]
    L = micro[0][0].shape[1]
    S = 2 * L if layout.startswith("dual") else L
    results = {}

    def run(model):
        with compat.cpu_device_mode():
            losses = get_forward_backward_func()(
                forward_step_func=_loss_step(layout, block_size),
                data_iterator=iter(micro),
                model=[model],
                num_microbatches=len(micro),
                seq_length=S,
                micro_batch_size=micro[0][0].shape[0],
                forward_only=False,
            )
        return [d["loss"] for d in losses]

    initialize_parallel(1, 1)
    full = _build(mc, 1, 1)
    results["pp1"] = run(full)
    full_grad = {k: p.grad.clone() for k, p in full.named_parameters()}
    state = full.state_dict()

    initialize_parallel(1, 2)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    first, last = stage == 0, stage == 1
    model = _build(mc, 1, 2, pre_process=first, post_process=last)
    per_stage = mc.num_layers // 2
    local = {}
    for key, value in state.items():
        if ".layers." in key:
            head, rest = key.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            idx = int(idx) - stage * per_stage
            if 0 <= idx < per_stage:
                local[f"{head}.layers.{idx}.{tail}"] = value
        elif key in model.state_dict():
            local[key] = value
    missing = set(model.state_dict()) - set(local)
    assert not missing, missing
    model.load_state_dict(local)
    results["pp2"] = run(model)
    results["stage"] = stage
    # gradients of this stage's layers match the PP=1 gradients of the same layers
    worst = 0.0
    for key, p in model.named_parameters():
        if ".layers." in key:
            head, rest = key.split(".layers.", 1)
            idx, tail = rest.split(".", 1)
            key = f"{head}.layers.{int(idx) + stage * per_stage}.{tail}"
        worst = max(worst, (p.grad - full_grad[key]).abs().max().item())
    results["grad_max_diff"] = worst
    return results


def train_first_losses(rank, data, tp=1, pp=1, steps=2):
    """Run the trainer for ``steps`` steps at TP/PP on two processes; return the logged losses."""
    import json as _json

    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    data = {k: dict(v) for k, v in data.items()}
    data["train"].update(tp=tp, pp=pp)
    trainer = Trainer(RunConfig.from_dict(data), quiet=True, stop_after=steps)
    trainer.run()
    torch.distributed.barrier()
    with open(os.path.join(data["checkpoint"]["save_dir"], "metrics.jsonl")) as f:
        return [_json.loads(line)["loss"] for line in f]


def tp_decode(rank, meg_dir, prompts, runs):
    """Block decoding through the Megatron runner at TP=2: token ids of each run's options."""
    from megatron_nbdiff.inference import generate, load_runner
    from megatron_nbdiff.parallel import initialize_parallel

    initialize_parallel(2, 1)
    runner = load_runner(meg_dir, tp=2)
    return [[r["token_ids"] for r in generate(runner, prompts, **kw)] for kw in runs]


def train_records(rank, data, steps=2, **layout):
    """The trainer with the ``train`` fields ``layout`` (``pp=2, vpp=2``, ``cp=2``, ``tp=2``...) on
    this gloo world for ``steps`` steps (resuming from the run folder's checkpoint, if any);
    returns the logged (step, loss, grad_norm) records."""
    import json as _json

    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    data = {k: dict(v) for k, v in data.items()}
    data["train"].update(layout)
    Trainer(RunConfig.from_dict(data), quiet=True, stop_after=steps).run()
    torch.distributed.barrier()
    with open(os.path.join(data["checkpoint"]["save_dir"], "metrics.jsonl")) as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in map(_json.loads, f) if "eval_loss" not in r]
