"""Mixture-of-experts models in and out: tiny random HF Qwen3-MoE (6 experts, top-2, renormalised,
layer 0 dense through ``mlp_only_layers``) and Mixtral (6 experts, top-2) models, fp32 on CPU.

HF logits equal the converted megatron model's at TP=1 (in process) and at TP=2, EP=2 and PP=2
(two gloo processes); HF -> megatron -> HF is bit-exact, also from a checkpoint saved at EP=2; the
router picks HF's experts with HF's weights (renormalised or not); the parameter map covers
exactly megatron's sharded state dict in both of megatron's layer layouts; and bad input (EP not
dividing the experts, routing the router cannot reproduce) is refused with one error and no
output."""
import json
import os
import shutil

import pytest
import torch

from megatron_nbdiff.checkpoint import (
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    load_model,
    read_metadata,
)
from megatron_nbdiff.config import ModelConfig
from megatron_nbdiff.errors import ConfigError

from _convert_workers import assert_same_hf_tensors
from _moe_workers import EXPERTS, VOCAB, make_moe_checkpoint, run_layout

FAMILIES = ["qwen3_moe", "mixtral"]
ATOL = 1e-4
SEQ = 16

pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py


def _ids(seed: int, b: int = 2):
    return torch.randint(0, VOCAB, (b, SEQ), generator=torch.Generator().manual_seed(seed))


def _hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, layout="causal").clean


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("moe")


@pytest.fixture(scope="module")
def hf(work):
    """family -> (hf dir, HF model)."""
    return {fam: (str(work / f"hf_{fam}"), make_moe_checkpoint(str(work / f"hf_{fam}"), fam, seed=i))
            for i, fam in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def converted(hf, work):
    """family -> megatron dir, converted without a mask token for target TP=2 PP=2 EP=2."""
    out = {}
    for fam in FAMILIES:
        out[fam] = str(work / f"mg_{fam}")
        convert_hf_to_megatron(hf[fam][0], out[fam], tp=2, pp=2, ep=2, mask_token="none", progress=False)
    return out


def _assert_no_leftovers(path):
    parent, base = os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path))
    assert not os.path.exists(path)
    assert not [n for n in os.listdir(parent) if n.startswith(base + ".tmp-")]


# --- config and parameter map ------------------------------------------------------------------


def test_converted_model_config_and_layers(hf, converted):
    """The MoE fields come from config.json (Qwen3-MoE's dense layer 0 from mlp_only_layers), the
    aux-loss coefficient stays 0 with a note, and the built model has megatron's MoE layer (a
    TopKRouter and SequentialMLP experts) exactly where HF has a sparse block."""
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.moe.router import TopKRouter

    for fam, dense in (("qwen3_moe", [0]), ("mixtral", [])):
        meta = read_metadata(converted[fam])
        mc = meta.get_model_config()
        assert (mc.num_experts, mc.moe_topk, mc.moe_norm_topk_prob, mc.moe_dense_layers) == (EXPERTS, 2, True, dense)
        assert mc.moe_ffn_hidden_size == 24 and mc.moe_aux_loss_coeff == 0 and mc.moe_z_loss_coeff == 0
        assert meta.parallel["target_ep"] == 2
        assert any("router_aux_loss_coef" in n for n in meta.notes)
        model = load_model(converted[fam])
        hf_layers = hf[fam][1].model.layers
        for i, layer in enumerate(model.gpt.decoder.layers):
            sparse = type(hf_layers[i].mlp).__name__.endswith("SparseMoeBlock")
            assert isinstance(layer.mlp, MoELayer) == sparse == (i not in dense), (fam, i)
            if sparse:
                assert isinstance(layer.mlp.router, TopKRouter) and isinstance(layer.mlp.experts, SequentialMLP)
                assert len(layer.mlp.experts.local_experts) == EXPERTS


@pytest.mark.parametrize("dense", [[0], []])
def test_param_map_matches_megatron_sharded_state_dict(dense):
    """Every parameter has exactly one map entry with megatron's checkpoint key, leading axes
    (layer, expert) and shape, in megatron's per-layer layout (a dense layer 0) and its stacked one
    (every layer MoE); the maps cover no more and no less than the model."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    from megatron_nbdiff.checkpoint.families import FAMILIES as F
    from megatron_nbdiff.checkpoint.mapping import megatron_shape, param_maps, units
    from megatron_nbdiff.checkpoint.streaming_save import _plain_fc1
    from megatron_nbdiff.models import NBDiffModel

    mc = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=48, kv_channels=16, qk_layernorm=True, num_experts=EXPERTS, moe_topk=2,
                     moe_ffn_hidden_size=24, moe_dense_layers=dense)
    model = NBDiffModel(mc, mc.transformer_config())
    sd = model.sharded_state_dict()
    plain = _plain_fc1(sd)
    params = dict(model.gpt.named_parameters())
    covered = set()
    for layer, unit in units(param_maps(F["qwen3_moe"], mc), mc):
        for pm in unit:
            name = pm.megatron_name(layer)
            assert name not in covered, name
            covered.add(name)
            assert sd[name].key == pm.sharded_name(layer), name
            if pm.expert is not None:
                assert isinstance(sd[name], ShardedTensorFactory) or sd[name].prepend_axis_num >= 1
            shape = megatron_shape(pm, mc, mc.padded_vocab_size(1))
            assert tuple(params[name].shape) == shape, name
            assert tuple(plain[name].global_shape) == pm.lead_shape(mc) + shape, name
            lead = pm.lead_offsets(layer)
            assert tuple(plain[name].global_offset[:len(lead)]) == lead, name
    assert covered == set(params)
    assert any(pm.stacked for pm in param_maps(F["qwen3_moe"], mc)) == (not dense)


def test_model_config_moe_fields_are_validated_and_absent_for_dense_models():
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4)
    dense = ModelConfig(**base)
    assert not dense.is_moe and not any(k.startswith("moe_") or k == "num_experts" for k in dense.to_dict())
    moe = ModelConfig(**base, num_experts=4, moe_topk=2, moe_dense_layers=[1])
    assert moe.moe_ffn_hidden_size == moe.ffn_hidden_size and moe.moe_layer_pattern() == [1, 0]
    assert ModelConfig.from_dict(moe.to_dict()) == moe
    for bad, needle in ((dict(moe_topk=2), "num_experts is null"),
                        (dict(num_experts=4), "moe_topk"),
                        (dict(num_experts=4, moe_topk=5), "moe_topk must be an int in [1, num_experts=4]"),
                        (dict(num_experts=4, moe_topk=1), "moe_topk=1 with moe_norm_topk_prob"),
                        (dict(num_experts=4, moe_topk=2, moe_dense_layers=[2]), "moe_dense_layers"),
                        (dict(num_experts=4, moe_topk=2, moe_dense_layers=[0, 1]), "every layer dense"),
                        (dict(num_experts=4, moe_topk=2, moe_aux_loss_coeff=-1), "moe_aux_loss_coeff")):
        with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            ModelConfig(**base, **bad)


# --- routing and logits ------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [True, False])
def test_router_picks_hf_experts_with_hf_weights(norm):
    """megatron's TopKRouter as transformer_config sets it up, against HF Qwen3-MoE's router on the
    same weight: the same experts per token and the same weights, renormalised (pre-softmax off:
    softmax of the top-k logits) or not (softmax over all experts, then top-k)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
    from megatron.core.transformer.moe.router import TopKRouter
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    mc = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=EXPERTS,
                     moe_topk=3, moe_norm_topk_prob=norm)
    router = TopKRouter(mc.transformer_config(), pg_collection=get_default_pg_collection()).eval()
    ref = Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=32, num_experts=EXPERTS, num_experts_per_tok=3,
                                            norm_topk_prob=norm))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.weight.copy_(torch.randn(EXPERTS, 32, generator=gen))
        ref.weight.copy_(router.weight)
        x = torch.randn(SEQ, 2, 32, generator=gen)
        probs, routing_map = router(x)
        _, weights, experts = ref(x.reshape(-1, 32))
    want_map = torch.zeros(SEQ * 2, EXPERTS, dtype=torch.bool).scatter(1, experts, True)
    want = torch.zeros(SEQ * 2, EXPERTS).scatter(1, experts, weights)
    assert torch.equal(routing_map, want_map)
    torch.testing.assert_close(probs, want, atol=1e-6, rtol=0)
    assert torch.allclose(probs.sum(-1), torch.ones(SEQ * 2)) == norm


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_equal_hf(family, hf, converted):
    model = load_model(converted[family]).eval()
    ids = _ids(0)
    got, ref = _logits(model, ids), _hf_logits(hf[family][1], ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < ATOL


def test_qwen3_moe_without_renormalisation_and_with_a_sparse_step(work, tmp_path):
    """``norm_topk_prob: false`` (megatron's pre-softmax routing) and ``decoder_sparse_step: 2``
    (layer 0 dense, layer 1 MoE) convert with HF's logits."""
    src = str(tmp_path / "hf")
    ref = make_moe_checkpoint(src, "qwen3_moe", seed=3, norm_topk_prob=False, mlp_only_layers=[],
                              decoder_sparse_step=2)
    mg = str(tmp_path / "mg")
    convert_hf_to_megatron(src, mg, mask_token="none", progress=False)
    mc = read_metadata(mg).get_model_config()
    assert mc.moe_dense_layers == [0] and mc.moe_norm_topk_prob is False
    ids = _ids(5)
    assert (_logits(load_model(mg).eval(), ids) - _hf_logits(ref, ids)).abs().max().item() < ATOL


def _seeds(seed, data_parallel):
    """The ids' seed of each of the two ranks: different data on data-parallel ranks (EP=2 carves
    its expert groups out of them), the same on the ranks of one model replica (TP, PP)."""
    return [seed + r if data_parallel else seed for r in range(2)]


def _layout_jobs(hf, converted, seeds, save_dir=None):
    return [{"name": fam, "ckpt": converted[fam], "ids": [_ids(s) for s in seeds],
             "save": None if save_dir is None else str(save_dir / fam)} for fam in FAMILIES]


def _check_layout_logits(hf, results, seeds):
    checked = 0
    for fam in FAMILIES:
        for rank, r in enumerate(results):
            got = r[fam]["logits"]
            if got is None:  # the first pipeline stage has no logits
                continue
            ref = _hf_logits(hf[fam][1], _ids(seeds[rank]))
            assert (got - ref).abs().max().item() < ATOL, (fam, rank)
            checked += 1
    assert checked >= len(FAMILIES)


def test_tp2_logits_equal_hf(hf, converted, tmp_path):
    seeds = _seeds(10, data_parallel=False)
    results = run_layout(str(tmp_path / "run"), _layout_jobs(hf, converted, seeds), tp=2)
    _check_layout_logits(hf, results, seeds)


def test_ep2_logits_equal_hf_and_a_checkpoint_saved_at_ep2_exports_exactly(hf, converted, tmp_path):
    """At EP=2 each rank holds 3 of the 6 experts and routes its own tokens (different on each
    rank) through both ranks' experts; the checkpoint it saves stores every expert at its global
    index, so it exports bit for bit the original HF tensors."""
    saved, seeds = tmp_path / "ep2_written", _seeds(20, data_parallel=True)
    results = run_layout(str(tmp_path / "run"), _layout_jobs(hf, converted, seeds, saved), ep=2)
    _check_layout_logits(hf, results, seeds)
    for fam in FAMILIES:
        assert all(n == EXPERTS // 2 for r in results for n in r[fam]["local_experts"])
        assert read_metadata(str(saved / fam)).parallel["written_ep"] == 2
        out = str(tmp_path / f"hf_from_ep2_{fam}")
        convert_megatron_to_hf(str(saved / fam), out, progress=False)
        assert_same_hf_tensors(hf[fam][0], out)


def test_pp2_logits_equal_hf(hf, converted, tmp_path):
    """Qwen3-MoE's stages hold a dense and a MoE layer, Mixtral's two MoE layers."""
    seeds = _seeds(30, data_parallel=False)
    results = run_layout(str(tmp_path / "run"), _layout_jobs(hf, converted, seeds), pp=2)
    assert sorted(r[FAMILIES[0]]["stage"] for r in results) == [0, 1]
    assert [len(r["qwen3_moe"]["local_experts"]) for r in sorted(results, key=lambda r: r["qwen3_moe"]["stage"])] \
        == [0, 1]
    _check_layout_logits(hf, results, seeds)


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family, hf, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "hf_out")
    convert_megatron_to_hf(converted[family], out, max_shard_size="40KB", progress=False)
    assert_same_hf_tensors(hf[family][0], out)
    original = json.load(open(os.path.join(hf[family][0], "config.json")))
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["architectures"] == original["architectures"]
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert type(model).__name__ == original["architectures"][0]
    ids = _ids(2)
    assert torch.equal(_hf_logits(model, ids), _hf_logits(hf[family][1], ids))
    assert read_metadata(out, kind="hf").family == family


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_export_config_loads_as_the_original_class(family, hf):
    """Without a stored config.json (a model trained from scratch), the exported config is built
    from the model config and describes the same MoE architecture."""
    import transformers

    from megatron_nbdiff.checkpoint.families import FAMILIES as F
    from megatron_nbdiff.checkpoint.families import hf_config_for_export, parse_hf_config

    mc = parse_hf_config(hf[family][0]).model_config
    fresh = hf_config_for_export(F[family], mc, "fp32")
    cfg = getattr(transformers, F[family].architecture.replace("ForCausalLM", "Config")).from_dict(fresh)
    original = hf[family][1].config
    for key in ("num_experts", "num_experts_per_tok", "intermediate_size", "hidden_size"):
        assert getattr(cfg, key) == getattr(original, key), key
    if family == "qwen3_moe":
        assert (cfg.moe_intermediate_size, cfg.norm_topk_prob) == (24, True)
        dense = [i for i in range(2) if i in cfg.mlp_only_layers or (i + 1) % cfg.decoder_sparse_step]
        assert dense == [0]
    with pytest.raises(ConversionError, match="cannot be exported as LlamaForCausalLM"):
        hf_config_for_export(F["llama"], mc, "fp32")


# --- bad input --------------------------------------------------------------------------------


def _edited(src, dst, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))
    return dst


def test_bad_input_is_refused_without_output(hf, tmp_path):
    out = str(tmp_path / "out")
    qwen, mixtral = hf["qwen3_moe"][0], hf["mixtral"][0]
    cases = [
        (qwen, dict(ep=4), "--ep 4 does not divide the 6 experts"),
        (mixtral, dict(ep=0), "--ep must be a positive integer"),
        (_edited(mixtral, str(tmp_path / "jitter"), router_jitter_noise=0.1),
         {}, "router_jitter_noise=0.1 is not supported"),
        (_edited(qwen, str(tmp_path / "shared"), shared_expert_intermediate_size=16),
         {}, "shared_expert_intermediate_size=16 is not supported"),
        (_edited(qwen, str(tmp_path / "capacity"), capacity_factor=1.25), {}, "token dropping"),
        (_edited(qwen, str(tmp_path / "qwen2_moe"), model_type="qwen2_moe", architectures=["Qwen2MoeForCausalLM"]),
         {}, "'qwen2_moe' is not supported: its shared expert"),
        (_edited(qwen, str(tmp_path / "top1"), num_experts_per_tok=1), {}, "num_experts_per_tok=1 with renormalised"),
        (_edited(qwen, str(tmp_path / "all_dense"), mlp_only_layers=[0, 1]), {}, "leave no MoE layer"),
    ]
    for src, kwargs, needle in cases:
        with pytest.raises(ConversionError) as info:
            convert_hf_to_megatron(src, out, mask_token="none", progress=False, **kwargs)
        message = str(info.value)
        assert needle in message and "\n" not in message, message
        _assert_no_leftovers(out)


def test_bad_expert_parallel_sizes_are_refused():
    from megatron_nbdiff.parallel import check_parallel_sizes, initialize_parallel

    moe = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4, num_experts=6,
                      moe_topk=2)
    dense = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4)
    with pytest.raises(ConfigError, match="expert parallel size 4 does not divide num_experts=6"):
        moe.transformer_config(ep=4)
    with pytest.raises(ConfigError, match="needs a mixture-of-experts model"):
        check_parallel_sizes(dense, ep=2)
    with pytest.raises(ConfigError, match="expert parallel size 2 does not divide the data-parallel size 1"):
        check_parallel_sizes(moe, ep=2, world_size=1)
    with pytest.raises(ConfigError, match=r"expert parallel size 2 does not divide world size 1 / \(tensor"):
        initialize_parallel(1, 1, ep=2)  # the one-process world: refused before anything changes
