"""Worker functions for tests/test_context_parallel.py (run on gloo CP groups by _gloo.run_world)."""
from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = [
    dict(layout="dual_context_causal", block_size=4),
    dict(layout="dual_block_causal", block_size=4),
    dict(layout="complementary_context_causal", block_size=2),
    dict(layout="causal"),
    dict(layout="bidirectional"),
    dict(layout="single_annealed", anneal_step=3, anneal_steps=8, anneal_seed=5),
]


def attention_vs_reference(rank, L=16, b=2, hq=4, hkv=2, d=8):
    """For every layout, with and without document ids: this rank's output rows and the
    gradients of its q, k, v (loss: a fixed random projection of the output) from
    cp_attention, against one process's block_diffusion_attention over all positions."""
    from megatron_nbdiff.attention.context_parallel import cp_attention, local_positions
    from megatron_nbdiff.attention.core_attention import block_diffusion_attention
    from megatron_nbdiff.attention.masks import MaskSpec

    group, cp = dist.group.WORLD, dist.get_world_size()
    results = {}
    for case in LAYOUTS:
        for docs in (False, True):
            spec = MaskSpec(seq_len=L, **case)
            S = spec.total_len
            g = torch.Generator().manual_seed(11)
            q = torch.randn(b, hq, S, d, generator=g)
            k = torch.randn(b, hkv, S, d, generator=g)
            v = torch.randn(b, hkv, S, d, generator=g)
            w = torch.randn(b, hq, S, d, generator=g)
            doc_ids = (torch.arange(L) >= 6).long() + (torch.arange(L) >= 11).long() if docs else None
            doc_ids = doc_ids.expand(b, -1).contiguous() if docs else None
            ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
            ref = block_diffusion_attention(*ref_in, spec, doc_ids, "dense")
            (ref * w).sum().backward()
            pos = local_positions(L, cp, rank)
            idx = torch.cat([s * L + pos for s in range(spec.streams)])
            loc_in = [t[:, :, idx].clone().requires_grad_() for t in (q, k, v)]
            out = cp_attention(*loc_in, spec, group, doc_ids, "dense")
            (out * w[:, :, idx]).sum().backward()
            name = f"{case['layout']}{'+docs' if docs else ''}"
            results[name] = dict(
                out=(out - ref[:, :, idx]).abs().max().item(),
                **{f"grad_{n}": (t.grad - r.grad[:, :, idx]).abs().max().item()
                   for n, t, r in zip("qkv", loc_in, ref_in)},
                grad_scale=max(r.grad.abs().max().item() for r in ref_in))
            if docs and case["layout"] in ("dual_context_causal", "causal"):
                with torch.no_grad():
                    flex = cp_attention(*[t.detach() for t in loc_in], spec, group, doc_ids, "flex")
                results[name]["flex_out"] = (flex - ref[:, :, idx]).abs().max().item()
    return results


MODEL_LAYOUTS = [("dual_context_causal", True), ("dual_block_causal", False), ("complementary_context_causal", True),
                 ("causal", True), ("single_annealed", False)]


def model_vs_reference(rank, world, port, L=16, B=4):
    """A tiny NBDiffModel at CP=2 (megatron's parallel state with context_parallel_size=2)
    against the same weights at CP=1 in the same process: this rank's logits at its positions,
    and the weight gradients summed over the CP ranks against the CP=1 gradients (loss: a fixed
    random projection of every stream's logits)."""
    from megatron.core import parallel_state

    from megatron_nbdiff import compat
    from megatron_nbdiff.config import ModelConfig
    from megatron_nbdiff.models import NBDiffModel

    compat.install()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    parallel_state.initialize_model_parallel(1, 1, context_parallel_size=world)
    vocab, mask = 53, 52
    mc = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=48, max_seq_len=L)
    torch.manual_seed(0)
    model = NBDiffModel(mc, mc.transformer_config(context_parallel_size=world))
    reference = NBDiffModel(mc, mc.transformer_config())
    reference.load_state_dict(model.state_dict())
    assert model.cp_group is not None and reference.cp_group is None
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, mask, (2, L), generator=g)
    noisy = torch.where(torch.rand(x.shape, generator=g) < 0.5, torch.full_like(x, mask), x)
    other = torch.where(noisy == mask, x, torch.full_like(x, mask))
    doc_ids = (torch.arange(L) >= 7).long().expand(2, -1).contiguous()
    results = {}
    for layout, docs in MODEL_LAYOUTS:
        kw = dict(layout=layout, doc_ids=doc_ids if docs else None)
        if layout.startswith(("dual", "complementary")):
            args = (x, noisy)
            kw["block_size"] = B
            if layout.startswith("complementary"):
                kw["complement_ids"] = other
        elif layout == "causal":
            args = (x,)
        else:
            args, kw = (), dict(kw, noisy_ids=noisy, anneal_step=2, anneal_steps=5)
        streams = [s for s in ("noisy", "complement", "clean")]
        w = {s: torch.randn(2, L, vocab, generator=torch.Generator().manual_seed(9 + i)) for i, s in enumerate(streams)}
        for m in (model, reference):
            m.zero_grad(set_to_none=True)
        out = model(*args, **kw)
        ref = reference(*args, **kw)
        pos = out.positions
        loss = sum((getattr(out, s) * w[s][:, pos]).sum() for s in streams if getattr(out, s) is not None)
        ref_loss = sum((getattr(ref, s) * w[s]).sum() for s in streams if getattr(ref, s) is not None)
        loss.backward()
        ref_loss.backward()
        logit_err = max((getattr(out, s) - getattr(ref, s)[:, pos]).abs().max().item()
                        for s in streams if getattr(out, s) is not None)
        grad_err, scale = 0.0, 0.0
        for p, r in zip(model.parameters(), reference.parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            grad_err = max(grad_err, (grad - r.grad).abs().max().item())
            scale = max(scale, r.grad.abs().max().item())
        results[layout] = dict(logits=logit_err, grads=grad_err, grad_scale=scale, positions=pos.tolist())
    return results
