"""RoPE scaling (``linear``, ``llama3``, ``yarn``): the inverse frequencies and YaRN's attention
factor equal transformers' ``ROPE_INIT_FUNCTIONS`` bit for bit; converted tiny Llama (llama3,
linear) and Qwen2 (yarn) checkpoints give the HF logits at positions well past the original
context (TP=1 here, TP=2 and PP=2 in two gloo processes); the export restores the config's RoPE
section, the weights and the logits exactly; other types (``dynamic``, ``longrope``) are refused
with one error line and no output; ``ModelConfig.rope_scaling`` is validated and old
``nbdiff.json`` files without it still load; the Megatron decoding runner (KV cache) agrees with
the HF runner under YaRN. Tiny random models, fp32, CPU."""
import copy
import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from megatron_nbdiff.checkpoint import (
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    load_model,
    read_metadata,
)
from megatron_nbdiff.checkpoint.cli import hf_to_megatron_main
from megatron_nbdiff.checkpoint.families import get_family, hf_config_for_export
from megatron_nbdiff.cli import run_main
from megatron_nbdiff.config import ModelConfig
from megatron_nbdiff.errors import ConfigError
from megatron_nbdiff.models.rope import attention_factor, inverse_frequencies

from _convert_workers import hf_logits, make_hf_checkpoint, run_layouts

VOCAB = 150
SEQ = 56  # positions up to 55, far past original_max_position_embeddings = 16
ATOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 3.0}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
# name -> (family, rope scaling, tied embeddings): Llama 3.2 1B/3B tie theirs, Qwen2.5 7B-72B
# (the YaRN long-context configs) do not
VARIANTS = {"llama_llama3": ("llama", LLAMA3, True), "llama_linear": ("llama", LINEAR, False),
            "qwen2_yarn": ("qwen2", YARN, False)}


def _ids(seed=0, b=2):
    return torch.randint(0, VOCAB, (b, SEQ), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, layout="causal").clean


pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """variant -> (hf dir, HF model)."""
    work = tmp_path_factory.mktemp("rope_hf")
    out = {}
    for i, (name, (family, rope, tie)) in enumerate(VARIANTS.items()):
        d = str(work / name)
        out[name] = (d, make_hf_checkpoint(d, family, vocab=VOCAB, seed=10 + i, rope=rope, tie=tie))
    return out


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
    """variant -> megatron dir (target TP=2 PP=2 so the gloo test can use it too)."""
    work = tmp_path_factory.mktemp("rope_mg")
    out = {}
    for name in VARIANTS:
        d = str(work / name)
        convert_hf_to_megatron(hf[name][0], d, tp=2, pp=2, mask_token="none", progress=False)
        out[name] = d
    return out


# --- the frequencies --------------------------------------------------------------------------

FREQUENCY_CASES = [
    ("LlamaConfig", LLAMA3),
    ("LlamaConfig", dict(LLAMA3, factor=32, low_freq_factor=2.0, high_freq_factor=3.0,
                         original_max_position_embeddings=40)),
    ("LlamaConfig", LINEAR),
    ("Qwen2Config", YARN),
    ("Qwen2Config", dict(YARN, beta_fast=8, beta_slow=2, truncate=False)),
    ("Qwen2Config", dict(YARN, mscale=0.707, mscale_all_dim=1.0)),
    ("Qwen2Config", dict(YARN, attention_factor=1.25)),
]


@pytest.mark.parametrize("cls,rope", FREQUENCY_CASES)
def test_inverse_frequencies_equal_transformers(cls, rope):
    for head_dim, base in ((16, 5000.0), (64, 500000.0)):
        cfg = getattr(transformers, cls)(
            hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, rope_parameters=dict(rope, rope_theta=base))
        ref, ref_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        got = inverse_frequencies(head_dim, base, rope)
        assert got.dtype == ref.dtype == torch.float32
        assert torch.equal(got, ref), (cls, rope, head_dim)
        assert attention_factor(rope) == ref_factor
        # the scaling really changes the frequencies (the comparison is not plain RoPE's)
        assert not torch.equal(got, inverse_frequencies(head_dim, base, None))
    if rope["rope_type"] == "yarn":
        assert attention_factor(rope) != 1.0


def test_exported_config_without_a_stored_one_gives_the_same_frequencies():
    """A fresh config.json written from a ModelConfig (no stored original) carries the scaling."""
    for family, rope, _ in VARIANTS.values():
        mc = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
                         num_query_groups=2, max_seq_len=64, rope_base=5000.0, rope_scaling=rope)
        fam = get_family(family)
        cfg = fam.config_class().from_dict(hf_config_for_export(fam, mc, "fp32"))
        ref, ref_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
        assert torch.equal(ref, inverse_frequencies(16, 5000.0, rope))
        assert ref_factor == attention_factor(rope)


# --- logits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_megatron_logits_equal_hf(name, hf, converted):
    family, rope, tie = VARIANTS[name]
    meta = read_metadata(converted[name])
    assert meta.get_model_config().tie_embeddings == tie
    assert meta.model_config["rope_scaling"] == rope
    assert meta.get_model_config().rope_scaling == rope
    model = load_model(converted[name]).eval()
    ids = _ids()
    got, ref = _logits(model, ids), hf_logits(hf[name][1], ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < ATOL
    # the same weights with plain RoPE disagree: the scaling is what is being matched
    plain_cfg = copy.deepcopy(hf[name][1].config)
    plain_cfg.rope_parameters = {"rope_type": "default", "rope_theta": 5000.0}
    plain = type(hf[name][1])(plain_cfg).eval()
    plain.load_state_dict(hf[name][1].state_dict())
    assert (hf_logits(plain, ids) - ref).abs().max().item() > 100 * ATOL


def test_two_process_tp2_pp2(hf, converted, tmp_path):
    """llama3 (tied), linear and yarn checkpoints give the HF logits at TP=2 and at PP=2 (two gloo
    processes; with tied embeddings at PP=2 the last stage holds its own copy of the embedding)."""
    ids = _ids(seed=1)
    names = list(VARIANTS)
    results = run_layouts(str(tmp_path), [{"name": n, "ckpt": converted[n], "ids": ids} for n in names])
    last = next(r for r in results if r[names[0]]["stage"] == 1)
    for n in names:
        ref = hf_logits(hf[n][1], ids)
        for r in results:
            assert (r[n]["tp2"] - ref).abs().max().item() < ATOL, (n, "tp2")
        assert (last[n]["pp2"] - ref).abs().max().item() < ATOL, (n, "pp2")


# --- export -----------------------------------------------------------------------------------


def _tensors(directory):
    out = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.isfile(index)
             else ["model.safetensors"])
    for f in files:
        with safe_open(os.path.join(directory, f), "pt") as st:
            for key in st.keys():
                out[key] = st.get_tensor(key)
    return out


def _rope_section(config):
    return {k: v for k, v in config.items() if "rope" in k}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_round_trip_is_exact(name, hf, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "hf_out")
    convert_megatron_to_hf(converted[name], out, progress=False)
    original = json.load(open(os.path.join(hf[name][0], "config.json")))
    exported = json.load(open(os.path.join(out, "config.json")))
    assert _rope_section(original) and _rope_section(exported) == _rope_section(original)
    ta, tb = _tensors(hf[name][0]), _tensors(out)
    assert set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    ids = _ids(seed=2)
    assert torch.equal(hf_logits(model, ids), hf_logits(hf[name][1], ids))


# --- refusals and validation ------------------------------------------------------------------


def _hf_dir_with_rope(tmp_path, hf, name, rope):
    d = tmp_path / name
    d.mkdir()
    src = hf["llama_linear"][0]
    for f in os.listdir(src):
        if f != "config.json":
            os.link(os.path.join(src, f), d / f)
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["rope_parameters"] = dict(rope, rope_theta=5000.0)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


@pytest.mark.parametrize("rope", [
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8,
     "original_max_position_embeddings": 16},
], ids=["dynamic", "longrope"])
def test_unsupported_rope_types_are_refused_without_output(rope, hf, tmp_path, capsys):
    src = _hf_dir_with_rope(tmp_path, hf, "src", rope)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError, match=f"RoPE scaling '{rope['rope_type']}' is not supported"):
        convert_hf_to_megatron(src, out, mask_token="none", progress=False)
    rc = run_main(hf_to_megatron_main, ["--hf-dir", src, "--out-dir", out, "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"RoPE scaling '{rope['rope_type']}'" in err and "Traceback" not in err
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(tmp_path) if n.startswith("out")]


def test_model_config_rope_scaling_is_validated():
    base = dict(vocab_size=10, hidden_size=16, num_layers=1, num_attention_heads=2)
    assert ModelConfig(**base).rope_scaling is None
    for rope in (LLAMA3, LINEAR, YARN, dict(YARN, truncate=False, attention_factor=None)):
        assert ModelConfig(**base, rope_scaling=rope).rope_scaling == rope
    bad = [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_type 'dynamic' is not supported"),
        ({"factor": 2.0}, "rope_type None is not supported"),
        ({"rope_type": "linear"}, "lacks factor"),
        (dict(LLAMA3, low_freq_factor=None), "lacks low_freq_factor"),
        ({"rope_type": "linear", "factor": -1.0}, "factor must be positive"),
        ({"rope_type": "linear", "factor": "2"}, "factor must be a number"),
        ({"rope_type": "linear", "factor": True}, "factor must be a number"),
        (dict(YARN, original_max_position_embeddings=16.5), "must be an int"),
        (dict(YARN, truncate="yes"), "truncate must be true or false"),
        (dict(LINEAR, low_freq_factor=1.0), "unknown key(s) low_freq_factor"),
        (dict(LLAMA3, high_freq_factor=1.0), "must exceed low_freq_factor"),
        ([1, 2], "must be a mapping"),
    ]
    for rope, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            ModelConfig(**base, rope_scaling=rope)


def test_metadata_without_the_field_still_loads(converted, tmp_path):
    """An nbdiff.json written before rope_scaling existed loads with plain RoPE."""
    path = os.path.join(converted["llama_linear"], "nbdiff.json")
    data = json.load(open(path))
    data["model_config"].pop("rope_scaling")
    d = tmp_path / "old"
    d.mkdir()
    (d / "nbdiff.json").write_text(json.dumps(data))
    assert read_metadata(str(d)).get_model_config().rope_scaling is None


def test_tied_llama3_with_a_mask_token_decodes_like_its_export(hf, tmp_path):
    """Llama 3 scaling with tied embeddings and an appended mask token: the tied row stays one row
    (no output layer is stored, in or out), and transformers' greedy decoding of the export (its
    original class) equals the project's block-size-1 decoding of the converted checkpoint, far
    past original_max_position_embeddings."""
    from transformers import AutoModelForCausalLM

    from megatron_nbdiff.checkpoint.torch_dist import read_index
    from megatron_nbdiff.inference import generate, load_runner

    meg, exp = str(tmp_path / "meg"), str(tmp_path / "exp")
    convert_hf_to_megatron(hf["llama_llama3"][0], meg, tp=2, pp=2, mask_token="append", progress=False)
    stored = read_index(os.path.join(meg, "model")).state_dict_metadata
    assert "output_layer.weight" not in stored
    assert stored["embedding.word_embeddings.weight"].size[0] >= VOCAB + 1
    convert_megatron_to_hf(meg, exp, progress=False)
    tensors = _tensors(exp)
    assert "lm_head.weight" not in tensors and tensors["model.embed_tokens.weight"].shape[0] == VOCAB + 1
    model = AutoModelForCausalLM.from_pretrained(exp, attn_implementation="sdpa").eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    ours = load_runner(meg)
    g = torch.Generator().manual_seed(4)
    for n in (12, 20):
        p = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        ref = model.generate(torch.tensor([p]), max_new_tokens=30, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, n:].tolist()
        out = generate(ours, [p], block_size=1, max_new_tokens=30, stop_at_eos=False)[0]
        assert out["token_ids"] == ref


def test_decoding_runners_agree_past_the_original_context(hf, tmp_path):
    """YaRN through decoding: the Megatron runner (KV cache, the same model) gives the HF runner's
    (transformers on the export) prefill/denoise/commit logits and the same generated tokens,
    with prompts and generations running past original_max_position_embeddings."""
    from megatron_nbdiff.inference import generate, load_runner

    meg, exp = str(tmp_path / "meg"), str(tmp_path / "exp")
    convert_hf_to_megatron(hf["qwen2_yarn"][0], meg, mask_token="append", progress=False)
    convert_megatron_to_hf(meg, exp, progress=False)
    mask = read_metadata(meg).mask_token["id"]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, VOCAB, (n,), generator=g).tolist() for n in (18, 22)]
    ours, theirs = load_runner(meg), load_runner(exp)
    for r in (ours, theirs):
        r.prefill(prompts)
    block = torch.tensor([[5, mask, mask, 7]] * 2)
    torch.testing.assert_close(ours.denoise(block), theirs.denoise(block), atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(ours.commit(block), theirs.commit(block), atol=ATOL, rtol=ATOL)
    for kw in (dict(mode="ar"), dict(block_size=4, threshold=0.3)):
        a = generate(ours, prompts, max_new_tokens=24, stop_at_eos=False, **kw)
        b = generate(theirs, prompts, max_new_tokens=24, stop_at_eos=False, **kw)
        assert [x["token_ids"] for x in a] == [x["token_ids"] for x in b], kw
