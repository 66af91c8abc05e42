"""The two-stream model wrapper on one process: train/inference consistency, B=1 == AR, errors."""
import pytest
import torch

from megatron_nbdiff.config import ModelConfig
from megatron_nbdiff.models import NBDiffModel

VOCAB, MASK = 97, 96


pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py


def tiny_config(**overrides):
    cfg = dict(
        vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_query_groups=2, ffn_hidden_size=96, max_seq_len=64,
    )
    cfg.update(overrides)
    return ModelConfig(**cfg)


def build(**overrides):
    torch.manual_seed(0)
    mc = tiny_config(**overrides)
    model = NBDiffModel(mc, mc.transformer_config())
    model.eval()
    return model


def noisy_copy(x, B, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = x.clone()
    masked = torch.rand(x.shape, generator=g) < 0.5
    masked[:, ::B] = False  # the first token of every block stays clean
    n[masked] = MASK
    return n


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_parallel_dual_stream_equals_sequential_block_inference(backend):
    """Noisy logits of block b == a separate forward over [clean blocks < b, causal] + [noisy
    block b, bidirectional]; clean logits == a plain causal forward."""
    model = build(attention_backend=backend)
    B, L = 4, 24
    x = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(1))
    n = noisy_copy(x, B)
    with torch.no_grad():
        out = model(x, n, layout="dual_context_causal", block_size=B)
        ar = model(x, layout="causal").clean
        for b in range(L // B):
            seq = torch.cat([x[:, : b * B], n[:, b * B:(b + 1) * B]], dim=1)
            ref = model(noisy_ids=seq, layout="prefix_block", block_size=B).noisy
            torch.testing.assert_close(
                out.noisy[:, b * B:(b + 1) * B], ref[:, b * B:], atol=1e-5, rtol=1e-5
            )
    torch.testing.assert_close(out.clean, ar, atol=1e-5, rtol=1e-5)


def test_block_causal_clean_stream_differs_from_causal():
    model = build()
    x = torch.randint(0, MASK, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bc = model(x, x, layout="dual_block_causal", block_size=4).clean
        ar = model(x, layout="causal").clean
        first_block = model(noisy_ids=x[:, :4], layout="bidirectional").noisy
    # block-causal clean stream: the first block is a bidirectional forward over itself
    torch.testing.assert_close(bc[:, :4], first_block, atol=1e-5, rtol=1e-5)
    assert (bc - ar).abs().max() > 1e-3


@pytest.mark.parametrize("tie", [False, True])
def test_block_size_one_is_autoregressive(tie):
    model = build(tie_embeddings=tie)
    x = torch.randint(0, MASK, (3, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dual = model(x, x.clone(), layout="dual_context_causal", block_size=1)
        ar = model(x, layout="causal").clean
    torch.testing.assert_close(dual.clean, ar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dual.noisy, ar, atol=1e-5, rtol=1e-5)
    assert ar.shape == (3, 20, VOCAB)


def test_packed_documents_are_isolated():
    """With document ids, a packed document's logits equal those of the document alone (RoPE is
    relative, so the shifted positions change nothing beyond rounding)."""
    model = build()
    L, cut = 24, 10
    x = torch.randint(0, MASK, (1, L), generator=torch.Generator().manual_seed(4))
    docs = torch.zeros(1, L, dtype=torch.long)
    docs[:, cut:] = 1
    with torch.no_grad():
        packed = model(x, layout="causal", doc_ids=docs).clean
        second = model(x[:, cut:], layout="causal").clean
        first = model(x[:, :cut], layout="causal").clean
        # dual layout with documents: the clean stream also splits
        dual = model(x[:, :20], x[:, :20], layout="dual_context_causal", block_size=4,
                     doc_ids=docs[:, :20]).clean
    torch.testing.assert_close(packed[:, :cut], first, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[:, cut:], second, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(dual, packed[:, :20], atol=1e-4, rtol=1e-4)


def test_single_stream_layouts():
    model = build()
    x = torch.randint(0, MASK, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        bi = model(noisy_ids=x, layout="bidirectional").noisy
        ann_end = model(noisy_ids=x, layout="single_annealed", anneal_step=10, anneal_steps=10).noisy
        ann_start = model(noisy_ids=x, layout="single_annealed", anneal_step=0, anneal_steps=10).noisy
        ar = model(x, layout="causal").clean
    torch.testing.assert_close(ann_end, bi)
    torch.testing.assert_close(ann_start, ar, atol=1e-5, rtol=1e-5)
    assert (bi - ar).abs().max() > 1e-3


def test_backward_runs_and_reaches_all_parameters():
    model = build()
    model.train()
    x = torch.randint(0, MASK, (2, 16))
    out = model(x, noisy_copy(x, 4), layout="dual_context_causal", block_size=4)
    (out.noisy.float().logsumexp(-1).mean() + out.clean.float().logsumexp(-1).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_flex_on_cpu_refuses_backward_clearly():
    model = build(attention_backend="flex")
    model.train()
    x = torch.randint(0, MASK, (1, 8))
    with pytest.raises(RuntimeError, match="no backward pass on CPU"):
        model(x, x, layout="dual_context_causal", block_size=4)


def test_bad_inputs_give_clear_errors():
    model = build()
    x = torch.randint(0, MASK, (2, 10))
    with pytest.raises(ValueError, match="sequence length 10 is not divisible by block size 4"):
        model(x, x, layout="dual_context_causal", block_size=4)
    with pytest.raises(ValueError, match="unknown attention layout 'sideways'"):
        model(x, x, layout="sideways", block_size=2)
    with pytest.raises(ValueError, match="needs both clean_ids and noisy_ids"):
        model(x, layout="dual_context_causal", block_size=2)
    with pytest.raises(ValueError, match="same shape"):
        model(x, x[:, :8], layout="dual_context_causal", block_size=2)
    with pytest.raises(TypeError, match="integer token ids"):
        model(x.float(), layout="causal")
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len 64"):
        model(torch.zeros(1, 80, dtype=torch.long), layout="causal")
    with pytest.raises(ValueError, match=r"doc_ids must have shape \(2, 10\)"):
        model(x, layout="causal", doc_ids=torch.zeros(2, 9, dtype=torch.long))


def test_bad_parallel_layouts_give_clear_errors():
    mc = tiny_config()
    with pytest.raises(ValueError, match="tensor parallel size 3 does not divide num_attention_heads=4"):
        mc.transformer_config(tp=3)
    with pytest.raises(ValueError, match="tensor parallel size 4 does not divide num_query_groups=2"):
        mc.transformer_config(tp=4)
    with pytest.raises(ValueError, match="pipeline parallel size 3 does not divide num_layers=2"):
        mc.transformer_config(pp=3)
    with pytest.raises(ValueError, match="attention_backend"):
        tiny_config(attention_backend="magic")
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        ModelConfig.from_dict(dict(tiny_config().to_dict(), hiden_size=3))
