"""HF <-> megatron checkpoint conversion: logits equal HF at TP=1/TP=2/PP=2 for Llama, Qwen2
(QKV bias), Qwen3 (q/k norm) and Mistral, tied and untied; exact round trips; the mask token;
resharding a checkpoint written at TP=2; and bad input refused with a clear message and no output.
Tiny random models (hidden 64, 2 layers, vocab 150), fp32, on CPU."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from megatron_nbdiff.checkpoint import (
    CheckpointMetadataError,
    ConversionError,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    load_model,
    read_metadata,
)
from megatron_nbdiff.checkpoint.metadata import FORMAT_VERSION
from megatron_nbdiff.cli import run_main

from _convert_workers import assert_same_hf_tensors, hf_logits, input_ids, make_hf_checkpoint, run_layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ["llama", "qwen2", "qwen3", "mistral"]
VOCAB = 150
# family -> tokenizer size (None: no tokenizer files); mistral's tokenizer knows fewer tokens than
# the embedding has rows (Qwen-style padding rows)
TOKENIZERS = {"llama": VOCAB, "qwen2": None, "qwen3": VOCAB, "mistral": 140}
ATOL = 1e-4


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def hf(work):
    """family -> (hf dir, HF model). Llama is saved sharded (index + several files)."""
    out = {}
    for i, fam in enumerate(FAMILIES):
        d = str(work / f"hf_{fam}")
        shard = "40KB" if fam == "llama" else None
        model = make_hf_checkpoint(d, fam, vocab=VOCAB, tokenizer_tokens=TOKENIZERS[fam], seed=i,
                                   max_shard_size=shard)
        out[fam] = (d, model)
    assert os.path.isfile(os.path.join(out["llama"][0], "model.safetensors.index.json"))
    return out


@pytest.fixture(scope="module")
def converted(hf, work):
    """family -> megatron dir, converted without a mask token for target TP=2 PP=2."""
    out = {}
    for fam in FAMILIES:
        d = str(work / f"mg_{fam}")
        convert_hf_to_megatron(hf[fam][0], d, tp=2, pp=2, mask_token="none", progress=False)
        out[fam] = d
    return out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, layout="causal").clean


def _assert_no_leftovers(path):
    parent = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.abspath(path))
    assert not os.path.exists(path)
    assert not [n for n in os.listdir(parent) if n.startswith(base + ".tmp-")]


# --- the parameter map ------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_param_map_matches_megatron_sharded_state_dict(family):
    """Every parameter of the model has exactly one entry, with megatron's checkpoint key and the
    shape the map computes; the map covers no more and no less than the model."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_nbdiff.checkpoint.families import FAMILIES as F
    from megatron_nbdiff.checkpoint.mapping import megatron_shape, param_maps
    from megatron_nbdiff.config import ModelConfig
    from megatron_nbdiff.models import NBDiffModel

    fam = F[family]
    mc = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
                     num_query_groups=2, ffn_hidden_size=96, kv_channels=24, max_seq_len=64,
                     qk_layernorm=fam.qk_norm, add_qkv_bias=fam.qkv_bias,
                     tie_embeddings=family in ("qwen2", "mistral"))
    model = NBDiffModel(mc, mc.transformer_config())
    sd = model.sharded_state_dict()
    params = dict(model.gpt.named_parameters())
    covered = set()
    for pm in param_maps(fam, mc):
        for layer in (range(mc.num_layers) if pm.per_layer else [None]):
            name = pm.megatron_name(layer)
            covered.add(name)
            entry = sd[name]
            assert entry.key == pm.sharded_key, name
            assert isinstance(entry, (ShardedTensor, ShardedTensorFactory))
            shape = megatron_shape(pm, mc, mc.padded_vocab_size(1))
            assert tuple(params[name].shape) == shape, name
    assert covered == set(params)


# --- logits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_megatron_logits_equal_hf(family, hf, converted):
    meta = read_metadata(converted[family])
    assert meta.family == family and meta.parallel["target_tp"] == 2 and meta.parallel["target_pp"] == 2
    assert meta.vocab["padded"] == 256 and meta.block_size == 1 and meta.attention_layout == "causal"
    model = load_model(converted[family]).eval()
    ids = input_ids(VOCAB)
    got = _logits(model, ids)
    ref = hf_logits(hf[family][1], ids)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < ATOL


def test_two_process_tp2_pp2_and_reshard(hf, converted, work, tmp_path):
    """Converted checkpoints load at TP=2 and at PP=2 in two gloo processes with the HF logits; a
    checkpoint *written* at TP=2 loads at PP=2 (there) and at TP=1 (here) with the same logits and
    exports to HF; a checkpoint written at PP=2 loads at TP=1."""
    ids = input_ids(VOCAB, seed=1)
    jobs = []
    for fam in FAMILIES:
        job = {"name": fam, "ckpt": converted[fam], "ids": ids}
        if fam in ("llama", "qwen2"):  # one untied, one tied
            job["save_tp2"] = str(work / f"tp2_written_{fam}")
        if fam == "qwen3":
            job["save_pp2"] = str(work / f"pp2_written_{fam}")
        jobs.append(job)
    results = run_layouts(str(tmp_path), jobs)
    last = next(r for r in results if r[FAMILIES[0]]["stage"] == 1)
    for fam in FAMILIES:
        ref = hf_logits(hf[fam][1], ids)
        for r in results:
            assert (r[fam]["tp2"] - ref).abs().max().item() < ATOL, (fam, "tp2")
        assert (last[fam]["pp2"] - ref).abs().max().item() < ATOL, (fam, "pp2")
        if "pp2_from_tp2" in last[fam]:
            torch.testing.assert_close(last[fam]["pp2_from_tp2"], last[fam]["pp2"], atol=1e-5, rtol=0)
    for fam in ("llama", "qwen2"):
        path = str(work / f"tp2_written_{fam}")
        assert read_metadata(path).parallel["written_tp"] == 2
        model = load_model(path).eval()
        torch.testing.assert_close(_logits(model, ids), results[0][fam]["tp2"], atol=1e-5, rtol=0)
        out = str(tmp_path / f"hf_from_tp2_{fam}")
        convert_megatron_to_hf(path, out, progress=False)
        assert_same_hf_tensors(hf[fam][0], out)
    model = load_model(str(work / "pp2_written_qwen3")).eval()
    assert (_logits(model, ids) - hf_logits(hf["qwen3"][1], ids)).abs().max().item() < ATOL


# --- round trips and the mask token -----------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_exact(family, hf, converted, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "hf_out")
    result = convert_megatron_to_hf(converted[family], out, max_shard_size="60KB", progress=False)
    assert result.metadata.kind == "hf"
    assert_same_hf_tensors(hf[family][0], out)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    config = json.load(open(os.path.join(out, "config.json")))
    original = json.load(open(os.path.join(hf[family][0], "config.json")))
    assert config["vocab_size"] == VOCAB and config["architectures"] == original["architectures"]
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert type(model).__name__ == original["architectures"][0]
    ids = input_ids(VOCAB, seed=2)
    assert torch.equal(hf_logits(model, ids), hf_logits(hf[family][1], ids))
    assert read_metadata(out, kind="hf").family == family
    if TOKENIZERS[family]:
        assert os.path.isfile(os.path.join(out, "tokenizer.json"))


def test_both_directions_stream_on_one_torch_thread(hf, tmp_path, monkeypatch):
    """While tensors stream, torch's intra-op parallelism is off (its parallel NaN/Inf check
    otherwise waits at a barrier for the core the writer thread holds, BENCHMARKS.md), and the
    caller's thread count is back afterwards, also after a failure."""
    from megatron_nbdiff.checkpoint.finite import FiniteCheck

    family = FAMILIES[0]
    seen = []
    real = FiniteCheck.check

    def check(self, tensor, name, source_dtype=None):
        seen.append(torch.get_num_threads())
        return real(self, tensor, name, source_dtype)

    monkeypatch.setattr(FiniteCheck, "check", check)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mg = str(tmp_path / "mg")
        convert_hf_to_megatron(hf[family][0], mg, mask_token="none", progress=False)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        convert_megatron_to_hf(mg, str(tmp_path / "out"), progress=False)
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2

        def fails(self, tensor, name, source_dtype=None):
            raise RuntimeError("planted")

        monkeypatch.setattr(FiniteCheck, "check", fails)
        with pytest.raises(RuntimeError, match="planted"):
            convert_megatron_to_hf(mg, str(tmp_path / "out2"), progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _stored(directory):
    """Every global tensor of a converted checkpoint, and how many chunks each is stored in."""
    from megatron_nbdiff.checkpoint.megatron_to_hf import read_slices
    from megatron_nbdiff.checkpoint.torch_dist import read_index

    path = os.path.join(directory, "model")
    md = {k: v for k, v in read_index(path).state_dict_metadata.items() if hasattr(v, "chunks")}
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in md.items()}
    read_slices(path, {k: (t, (0,) * t.dim()) for k, t in out.items()})
    return out, {k: len(v.chunks) for k, v in md.items()}


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_pieces_of_a_few_rows_give_the_same_checkpoint(family, hf, tmp_path, monkeypatch):
    """Tensors written in pieces of 3 rows (crossing the q/k/v groups, the gate/up boundary, the
    mask token's row and the vocabulary padding) hold exactly what whole tensors hold, and load
    at TP=1 with the HF logits."""
    from megatron_nbdiff.checkpoint import streaming_save

    whole, pieces = str(tmp_path / "whole"), str(tmp_path / "pieces")
    convert_hf_to_megatron(hf[family][0], whole, mask_token="append", progress=False)
    monkeypatch.setattr(streaming_save, "CHUNK_BYTES", 3 * 64 * 4)
    convert_hf_to_megatron(hf[family][0], pieces, mask_token="append", progress=False)
    a, chunks_a = _stored(whole)
    b, chunks_b = _stored(pieces)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert chunks_b["embedding.word_embeddings.weight"] > 50 and chunks_a["embedding.word_embeddings.weight"] == 1
    model = load_model(pieces).eval()
    ids = input_ids(VOCAB, seed=3)
    assert (_logits(model, ids)[..., :VOCAB] - hf_logits(hf[family][1], ids)).abs().max().item() < ATOL


def test_bf16_round_trip_is_exact(tmp_path):
    """A bf16 checkpoint stays bf16 bit for bit; loaded in fp32 it gives the HF fp32 logits of
    the same (bf16-valued) weights."""
    src = str(tmp_path / "hf")
    ref = make_hf_checkpoint(src, "qwen3", vocab=VOCAB, dtype=torch.bfloat16, seed=5)
    mg, out = str(tmp_path / "mg"), str(tmp_path / "out")
    result = convert_hf_to_megatron(src, mg, mask_token="none", progress=False)
    assert result.dtype == "bf16" and read_metadata(mg).dtype == "bf16"
    convert_megatron_to_hf(mg, out, progress=False)
    assert_same_hf_tensors(src, out)
    model = load_model(mg, dtype="fp32").eval()
    ids = input_ids(VOCAB, seed=4)
    assert (_logits(model, ids) - hf_logits(ref, ids)).abs().max().item() < ATOL


def test_append_mask_token(hf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, ref_model = hf["llama"]
    mg, out = str(tmp_path / "mg"), str(tmp_path / "out")
    convert_hf_to_megatron(src, mg, tp=2, mask_token="append", progress=False)
    meta = read_metadata(mg)
    assert meta.mask_token == {"id": VOCAB, "token": "<|mask|>", "method": "append",
                               "init": f"mean of embedding and output rows [0, {VOCAB})"}
    assert meta.vocab["real"] == VOCAB + 1 and meta.vocab["hf"] == VOCAB
    ids = input_ids(VOCAB, seed=3)
    got = _logits(load_model(mg).eval(), ids)
    assert got.shape[-1] == VOCAB + 1
    assert (got[..., :VOCAB] - hf_logits(ref_model, ids)).abs().max().item() < ATOL
    convert_megatron_to_hf(mg, out, progress=False)
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    assert model.config.vocab_size == VOCAB + 1
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] == VOCAB + 1 and head.shape[0] == VOCAB + 1
    torch.testing.assert_close(emb[VOCAB], emb[:VOCAB].mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(head[VOCAB], head[:VOCAB].mean(0), atol=1e-6, rtol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == VOCAB + 1 and tok.mask_token == "<|mask|>" and tok.mask_token_id == VOCAB
    assert tok("w3 <|mask|> w5")["input_ids"] == [3, VOCAB, 5]
    assert torch.equal(hf_logits(model, ids), got)


def test_append_into_unused_row_and_without_tokenizer(hf, tmp_path):
    # mistral's tokenizer knows 140 of 150 rows: the mask token takes row 140, no row is added
    mg = str(tmp_path / "mistral")
    convert_hf_to_megatron(hf["mistral"][0], mg, mask_token="append", progress=False)
    meta = read_metadata(mg)
    assert meta.mask_token["id"] == 140 and meta.vocab["real"] == VOCAB
    assert any("first unused row 140" in n for n in meta.notes)
    # qwen2 has no tokenizer files: a row is appended, the token has no string, and that is noted
    mg = str(tmp_path / "qwen2")
    convert_hf_to_megatron(hf["qwen2"][0], mg, mask_token="append", progress=False)
    meta = read_metadata(mg)
    assert meta.mask_token["id"] == VOCAB and meta.mask_token["token"] is None
    assert meta.vocab["real"] == VOCAB + 1 and meta.tokenizer["files"] == []
    assert meta.tokenizer["note"] and any("no tokenizer" in n for n in meta.notes)


def test_mask_token_by_id_and_by_token(hf, tmp_path):
    src = hf["mistral"][0]
    mg = str(tmp_path / "by_id")
    convert_hf_to_megatron(src, mg, mask_token="145", progress=False)
    assert read_metadata(mg).mask_token["id"] == 145 and read_metadata(mg).vocab["real"] == VOCAB
    mg = str(tmp_path / "by_token")
    convert_hf_to_megatron(src, mg, mask_token="w7", progress=False)
    assert read_metadata(mg).mask_token == {"id": 7, "token": "w7", "method": "token",
                                            "init": "existing rows kept"}


# --- bad input --------------------------------------------------------------------------------


def _refused(capsys, argv, *needles, tool="convert_hf_to_megatron"):
    rc = run_main(_tool(tool).main, argv)
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_bad_input_is_refused_without_output(hf, tmp_path, capsys):
    llama = hf["llama"][0]
    out = str(tmp_path / "out")
    args = ["--out-dir", out, "--no-progress"]

    bad = _copy(hf["qwen3"][0], str(tmp_path / "gpt2"))
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    _refused(capsys, ["--hf-dir", bad] + args, "unknown architecture", "gpt2")

    bad = _copy(llama, str(tmp_path / "missing_shard"))
    index = json.load(open(os.path.join(bad, "model.safetensors.index.json")))
    victim = sorted(set(index["weight_map"].values()))[1]
    os.remove(os.path.join(bad, victim))
    _refused(capsys, ["--hf-dir", bad] + args, "missing shard", victim)

    bad = _copy(hf["qwen3"][0], str(tmp_path / "truncated"))
    path = os.path.join(bad, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 1000)
    _refused(capsys, ["--hf-dir", bad] + args, "truncated")

    bad = _copy(hf["qwen3"][0], str(tmp_path / "shape"))
    cfg = json.load(open(os.path.join(bad, "config.json")))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(os.path.join(bad, "config.json"), "w"))
    _refused(capsys, ["--hf-dir", bad] + args, "shape mismatch", "mlp", "[96, 64]", "[128, 64]")

    _refused(capsys, ["--hf-dir", llama, "--tp", "3"] + args, "--tp 3", "4 attention heads")
    _refused(capsys, ["--hf-dir", llama, "--tp", "4"] + args, "--tp 4", "2 query groups")
    _refused(capsys, ["--hf-dir", llama, "--pp", "3"] + args, "--pp 3", "2 layers")
    _refused(capsys, ["--hf-dir", llama, "--mask-token", "5"] + args, "already used", "'w5'")
    _refused(capsys, ["--hf-dir", llama, "--mask-token", "nope"] + args, "not in the tokenizer")
    _assert_no_leftovers(out)

    # a directory of other files is never replaced, not even with --force
    os.makedirs(out)
    open(os.path.join(out, "keep.txt"), "w").close()
    for force in ([], ["--force"]):
        _refused(capsys, ["--hf-dir", llama] + force + args, "not a checkpoint", "--force")
        assert os.listdir(out) == ["keep.txt"]
    # an earlier conversion is refused without --force and replaced with it
    open(os.path.join(out, "nbdiff.json"), "w").close()
    _refused(capsys, ["--hf-dir", llama] + args, "not empty", "--force")
    assert sorted(os.listdir(out)) == ["keep.txt", "nbdiff.json"]
    assert run_main(_tool("convert_hf_to_megatron").main,
                    ["--hf-dir", llama, "--force", "--mask-token", "none"] + args) == 0
    assert "converted" in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["generation_config.json", "model", "nbdiff.json", "tokenizer.json",
                                       "tokenizer_config.json"]
    _refused(capsys, ["--megatron-dir", llama, "--out-dir", str(tmp_path / "x")], "no nbdiff.json",
             tool="convert_megatron_to_hf")


def test_crash_leaves_no_complete_looking_output(hf, tmp_path, monkeypatch):
    from megatron_nbdiff.checkpoint import hf_to_megatron

    real, calls = hf_to_megatron._fill, []

    def boom(*args, **kwargs):  # the third tensor fails while the weights file is half written
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("simulated crash while writing")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_to_megatron, "_fill", boom)
    out = str(tmp_path / "out")
    with pytest.raises(RuntimeError, match="simulated"):
        convert_hf_to_megatron(hf["qwen3"][0], out, progress=False)
    _assert_no_leftovers(out)


def test_readers_refuse_metadata_they_do_not_understand(converted, tmp_path):
    src = converted["qwen2"]

    def variant(name, edit):
        d = str(tmp_path / name)
        os.makedirs(d)
        os.symlink(os.path.join(src, "model"), os.path.join(d, "model"))
        data = json.load(open(os.path.join(src, "nbdiff.json")))
        edit(data)
        if data is not None:
            json.dump(data, open(os.path.join(d, "nbdiff.json"), "w"))
        return d

    with pytest.raises(CheckpointMetadataError, match="no nbdiff.json"):
        load_model(str(tmp_path))
    d = variant("v99", lambda m: m.update(format_version=FORMAT_VERSION + 98))
    with pytest.raises(CheckpointMetadataError, match="format_version 99 is not understood"):
        load_model(d)
    d = variant("gpt2", lambda m: m.update(family="gpt2"))
    with pytest.raises(CheckpointMetadataError, match="unknown architecture family 'gpt2'"):
        convert_megatron_to_hf(d, str(tmp_path / "out"))
    d = variant("nofmt", lambda m: m.pop("format"))
    with pytest.raises(CheckpointMetadataError, match="format is None"):
        read_metadata(d)
    d = variant("nomask", lambda m: m.update(mask_token={"id": 999, "method": "append"}))
    with pytest.raises(CheckpointMetadataError, match="mask_token.id 999"):
        read_metadata(d)
    _assert_no_leftovers(str(tmp_path / "out"))


def test_command_line_tools_end_to_end(hf, tmp_path):
    """The real entry points as subprocesses: exit codes, one-line summaries, error lines."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    mg, out = str(tmp_path / "mg"), str(tmp_path / "out")
    run = lambda *a: subprocess.run([sys.executable, *a], capture_output=True, text=True, env=env, cwd=ROOT)  # noqa: E731
    p = run("tools/convert_hf_to_megatron.py", "--hf-dir", hf["qwen2"][0], "--out-dir", mg, "--tp", "2",
            "--dtype", "bf16")
    assert p.returncode == 0, p.stderr
    summary = p.stdout.strip().splitlines()[-1]
    assert summary.startswith("converted") and "bf16" in summary and "TP=2 PP=1" in summary
    p = run("tools/convert_megatron_to_hf.py", "--megatron-dir", mg, "--out-dir", out)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].startswith("exported")
    assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == VOCAB + 1
    p = run("tools/convert_megatron_to_hf.py", "--megatron-dir", mg, "--out-dir", out)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr


# --- HF configs -------------------------------------------------------------------------------


def _config_dir(tmp_path, name, **fields):
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 100,
            "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    base.update(fields)
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({k: v for k, v in base.items() if v is not None}))
    return str(d)


def test_hf_config_parsing(tmp_path):
    from megatron_nbdiff.checkpoint import parse_hf_config

    # transformers-4 style: top-level rope_theta and torch_dtype
    info = parse_hf_config(_config_dir(tmp_path, "v4", rope_theta=500000.0, torch_dtype="bfloat16"))
    mc = info.model_config
    assert info.family.name == "llama" and info.dtype == "bf16"
    assert (mc.rope_base, mc.num_query_groups, mc.kv_channels, mc.norm_eps) == (500000.0, 2, 16, 1e-5)
    qwen2 = parse_hf_config(_config_dir(
        tmp_path, "q2", model_type="qwen2", architectures=["Qwen2ForCausalLM"],
        use_sliding_window=True, sliding_window=32, max_window_layers=0))
    assert qwen2.model_config.add_qkv_bias and "sliding attention window of 32" in qwen2.notes[0]
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64}
    info = parse_hf_config(_config_dir(tmp_path, "llama3", rope_scaling=llama3, rope_theta=10000.0))
    assert info.model_config.rope_scaling == llama3 and info.model_config.rope_base == 10000.0
    refusals = [
        ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "rope_theta": 10000.0},
         "RoPE scaling 'dynamic'"),
        ({"attention_bias": True}, "attention_bias=true"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"architectures": ["LlamaForSequenceClassification"]}, "only LlamaForCausalLM"),
    ]
    for i, (fields, message) in enumerate(refusals):
        with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
            parse_hf_config(_config_dir(tmp_path, f"bad{i}", **fields))
    with pytest.raises(ConversionError, match="no config.json"):
        parse_hf_config(str(tmp_path))


def test_adapted_checkpoint_layout_with_optimizer_state_exports(hf, converted, tmp_path):
    """A training-style checkpoint (model and optimizer state in one distributed checkpoint, in
    the directory itself, nbdiff.json updated with recipe/step/block size) loads and exports."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    src = converted["llama"]
    model = load_model(src).eval()
    sd = model.sharded_state_dict()
    extra = ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.decoder.final_layernorm.weight",
                                            torch.randn(64), replica_id=0)
    ckpt = tmp_path / "step_0000010"
    ckpt.mkdir()
    dist_checkpointing.save({"model": sd, "optimizer": {"exp_avg": extra}}, str(ckpt))
    meta = read_metadata(src).updated(
        weights={"format": "torch_dist", "path": ".", "key_prefix": ""}, recipe="nbdiff", step=10,
        block_size=4, attention_layout="dual_context_causal", extra={"run": "test"})
    from megatron_nbdiff.checkpoint import write_metadata

    write_metadata(str(ckpt), meta)
    ids = input_ids(VOCAB, seed=6)
    torch.testing.assert_close(_logits(load_model(str(ckpt)).eval(), ids), _logits(model, ids),
                               atol=0, rtol=0)
    out = str(tmp_path / "out")
    convert_megatron_to_hf(str(ckpt), out, progress=False)
    assert_same_hf_tensors(hf["llama"][0], out)
    exported = read_metadata(out, kind="hf")
    assert (exported.recipe, exported.step, exported.block_size) == ("nbdiff", 10, 4)
