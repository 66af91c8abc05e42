"""Activation recomputation (train.recompute): megatron's selective and full recompute replay the
block-diffusion layout in the backward pass, so gradients equal those without recompute, and the
replay really happens (the core attention runs again during backward)."""
import pytest
import torch
import torch.nn.functional as F

from megatron_nbdiff.attention.core_attention import BlockDiffusionAttention
from megatron_nbdiff.config import ModelConfig, TrainConfig
from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.models import NBDiffModel

pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py

VOCAB, MASK, L, B = 61, 60, 16, 4
MODES = {
    "selective": TrainConfig(recompute="selective"),
    "selective+mlp": TrainConfig(recompute="selective", recompute_modules=["core_attn", "mlp"]),
    "full uniform 1": TrainConfig(recompute="full", recompute_method="uniform", recompute_num_layers=1),
    "full uniform 3": TrainConfig(recompute="full", recompute_method="uniform", recompute_num_layers=3),
    "full block 2": TrainConfig(recompute="full", recompute_method="block", recompute_num_layers=2),
}


def run(train: TrainConfig, layout: str):
    """Loss, gradients and core-attention calls of one forward/backward of a 3-layer model
    (the same weights for every ``train``) on packed documents."""
    mc = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=3, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=48, max_seq_len=L)
    torch.manual_seed(0)
    model = NBDiffModel(mc, mc.transformer_config(**train.recompute_overrides(mc.num_layers)))
    model.train()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, MASK, (2, L), generator=g)
    noisy = torch.where(torch.rand(x.shape, generator=g) < 0.5, torch.full_like(x, MASK), x)
    doc_ids = (torch.arange(L) >= 9).long().expand(2, -1).contiguous()  # two documents per row
    calls = {"forward": 0, "backward": 0}
    phase = ["forward"]

    def count(*_):
        calls[phase[0]] += 1

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, BlockDiffusionAttention)]
    if layout == "causal":
        out = model(x, layout="causal", doc_ids=doc_ids)
        loss = F.cross_entropy(out.clean[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    else:
        out = model(x, noisy, layout=layout, block_size=B, doc_ids=doc_ids)
        loss = (F.cross_entropy(out.noisy[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
                + F.cross_entropy(out.clean[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1)))
    phase[0] = "backward"
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, calls, model.config


@pytest.fixture(scope="module")
def reference():
    return {layout: run(TrainConfig(), layout) for layout in ("dual_context_causal", "dual_block_causal", "causal")}


@pytest.mark.parametrize("layout", ["dual_context_causal", "dual_block_causal", "causal"])
@pytest.mark.parametrize("mode", list(MODES))
def test_recompute_gives_the_same_gradients_and_replays_attention(reference, mode, layout):
    ref_loss, ref_grads, ref_calls, _ = reference[layout]
    assert ref_calls == {"forward": 3, "backward": 0}
    loss, grads, calls, tc = run(MODES[mode], layout)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-6, atol=1e-7, msg=name)
    # the layers replayed in backward: all three, except the 'block' method's first two
    replayed = 2 if MODES[mode].recompute_method == "block" and MODES[mode].recompute == "full" else 3
    assert calls == {"forward": 3, "backward": replayed}, calls
    assert tc.recompute_granularity == MODES[mode].recompute


def test_recompute_settings_are_checked():
    with pytest.raises(ConfigError, match="recompute must be one of none, selective, full"):
        TrainConfig(recompute="some")
    with pytest.raises(ConfigError, match="recompute_modules must be a non-empty list"):
        TrainConfig(recompute="selective", recompute_modules=["core_attn", "layernorm"])
    with pytest.raises(ConfigError, match="applies to train.recompute 'selective'"):
        TrainConfig(recompute="full", recompute_modules=["core_attn"])
    with pytest.raises(ConfigError, match="recompute_num_layers must be an int >= 1"):
        TrainConfig(recompute="full", recompute_num_layers=0)
    with pytest.raises(ConfigError, match="exceeds the 2 layers of a pipeline stage"):
        TrainConfig(recompute="full", recompute_method="block", recompute_num_layers=3).recompute_overrides(2)
    assert TrainConfig().recompute_overrides(4) == {}
