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
