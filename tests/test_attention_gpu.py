"""FlexAttention backend against the dense reference on a CUDA device (bf16, forward and
gradients). Skipped without CUDA; run on the lent GPU machine."""
import pytest
import torch

from megatron_nbdiff.attention import MaskSpec
from megatron_nbdiff.attention.core_attention import block_diffusion_attention

pytestmark = pytest.mark.gpu


def _grads(backend, q, k, v, spec, docs, g):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = block_diffusion_attention(q, k, v, spec, docs, backend, q.shape[-1] ** -0.5)
    out.backward(g)
    return out.detach().float(), [t.grad.float() for t in (q, k, v)]


@pytest.mark.parametrize("layout,L,B", [
    ("dual_context_causal", 512, 32), ("dual_block_causal", 512, 16), ("dual_context_causal", 384, 4),
    ("single_annealed", 512, 1), ("causal", 512, 1), ("bidirectional", 256, 1),
])
@pytest.mark.parametrize("with_docs", [False, True])
def test_flex_matches_dense_bf16_forward_and_grads(layout, L, B, with_docs):
    torch.manual_seed(0)
    dev = "cuda"
    spec = MaskSpec(layout, L, B, anneal_step=3, anneal_steps=8)
    S = spec.total_len
    docs = None
    if with_docs:
        docs = torch.zeros(2, L, dtype=torch.long, device=dev)
        docs[0, L // 3:] = 1
        docs[1, L // 2 + 7:] = 1
    q = torch.randn(2, 8, S, 64, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 2, S, 64, device=dev, dtype=torch.bfloat16)
    v = torch.randn(2, 2, S, 64, device=dev, dtype=torch.bfloat16)
    g = torch.randn(2, 8, S, 64, device=dev, dtype=torch.bfloat16)
    ref_out, ref_grads = _grads("dense", q, k, v, spec, docs, g)
    out, grads = _grads("flex", q, k, v, spec, docs, g)
    torch.testing.assert_close(out, ref_out, atol=2e-2, rtol=2e-2)
    for name, a, b in zip("qkv", grads, ref_grads):
        scale = b.abs().max().item()
        assert (a - b).abs().max().item() <= 3e-2 * max(scale, 1.0), name


def test_annealing_steps_reuse_one_compiled_flex_kernel():
    """DiffuLLaMA's mask changes every step; its step numbers reach the kernel as tensors, so the
    compiled FlexAttention is not rebuilt per step (and never falls back to eager)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    L = 256
    q, k, v = (torch.randn(1, 4, L, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    before = None
    for step in range(1, 13):
        spec = MaskSpec("single_annealed", L, 1, anneal_step=step, anneal_steps=40)
        out = block_diffusion_attention(q, k, v, spec, None, "flex", 0.125)
        ref = block_diffusion_attention(q, k, v, spec, None, "dense", 0.125)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)
        if step == 2:
            before = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == before
