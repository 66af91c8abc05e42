"""Megatron-LM checkpoints in (``tools/convert_megatron_lm.py``): a GPT written at TP=2 by
megatron-core's ``GPTModel`` the way Megatron-LM saves it (tests/_megatron_lm_workers.py), with
Transformer Engine names (untied embeddings) and with local-spec names (tied), converts; the
converted model's logits equal the source model's (fp32, < 1e-4), and so do the logits of its HF
export loaded by transformers as ``LlamaForCausalLM``. Bad inputs (architectures the model cannot
represent, unknown tensors, missing or disagreeing arguments, a pickle that is not the
arguments) are one ``error:`` line, exit 2, nothing written."""
import argparse
import datetime
import json
import os
import shutil

import pytest
import torch

from megatron_nbdiff.checkpoint import convert_megatron_to_hf, load_model, read_metadata
from megatron_nbdiff.checkpoint.cli import megatron_lm_main
from megatron_nbdiff.cli import run_main

from _convert_workers import tiny_tokenizer
from _gloo import run_world
from _megatron_lm_workers import SEQ, VOCAB

ATOL = 1e-4
IDS = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))

pytestmark = pytest.mark.usefixtures("one_process_group")  # tests/conftest.py


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(root with te/, local/, extra/ Megatron-LM save dirs and tok/, variant -> logits)."""
    root = tmp_path_factory.mktemp("megatron_lm")
    tiny_tokenizer(str(root / "tok"), VOCAB)
    results = run_world("_megatron_lm_workers", "write_checkpoints", str(root / "world"), world=2,
                        init=False, root=str(root), ids=IDS)
    assert torch.equal(results[0]["te"], results[1]["te"])
    return root, results[0]


def _convert(root, variant, out, *extra):
    return run_main(megatron_lm_main, ["--load", str(root / variant), "--tokenizer", str(root / "tok"),
                                       "--out-dir", str(out), "--no-progress", *extra])


def _logits(model, ids):
    with torch.no_grad():
        return model(ids, layout="causal").clean


@pytest.mark.parametrize("variant", ["te", "local", "local-in-pieces"])
def test_converted_logits_equal_the_source(variant, source, tmp_path, capsys, monkeypatch):
    """``local-in-pieces`` writes every tensor in pieces of 3 rows (across q/k/v groups, gate/up,
    the mask row and the padding)."""
    root, logits = source
    if variant.endswith("-in-pieces"):
        from megatron_nbdiff.checkpoint import streaming_save

        monkeypatch.setattr(streaming_save, "CHUNK_BYTES", 3 * 64 * 4)
        variant = variant[: -len("-in-pieces")]
    out = tmp_path / "mg"
    assert _convert(root, variant, out) == 0
    assert "converted Megatron-LM" in capsys.readouterr().out
    meta = read_metadata(str(out))
    assert (meta.family, meta.source["iteration"], meta.source["source_tp"]) == ("llama", "7", 2)
    assert meta.vocab["real"] == VOCAB + 1 and meta.mask_token["id"] == VOCAB
    assert meta.get_model_config().tie_embeddings == (variant == "local")
    model = load_model(str(out)).eval()
    ref = logits[variant][..., :VOCAB]
    assert (_logits(model, IDS)[..., :VOCAB] - ref).abs().max().item() < ATOL
    # the export loads in transformers as the original class and gives the same logits
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    convert_megatron_to_hf(str(out), str(hf_dir), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), attn_implementation="sdpa").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        hf_logits = hf(IDS).logits
    assert (hf_logits[..., :VOCAB] - ref).abs().max().item() < ATOL


def test_an_iteration_directory_converts_too(source, tmp_path, capsys):
    root, _ = source
    out = tmp_path / "mg"
    assert run_main(megatron_lm_main, ["--load", str(root / "local" / "iter_0000007"), "--tokenizer",
                                       str(root / "tok"), "--out-dir", str(out), "--no-progress",
                                       "--tp", "1", "--mask-token", "none"]) == 0
    meta = read_metadata(str(out))
    assert meta.source["iteration"] == "7" and meta.parallel["target_tp"] == 1 and meta.mask_token is None


# --- bad input --------------------------------------------------------------------------------


def _yaml(tmp_path, **fields):
    p = tmp_path / "args.yaml"
    p.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in fields.items()))
    return ["--args-yaml", str(p)]


def _copy_with_common(root, tmp_path, common):
    """A copy of the ``te`` checkpoint whose common.pt is replaced by ``common``."""
    dst = tmp_path / "src"
    shutil.copytree(root / "te", dst)
    torch.save(common, dst / "iter_0000007" / "common.pt")
    return "src"


CASES = {
    # id: (variant or setup(root, tmp) -> variant relative to its root, extra args, needles)
    "learned-positions": ("te", lambda t: _yaml(t, position_embedding_type="learned_absolute"),
                          ["position_embedding_type is 'learned_absolute'", "only 'rope'"]),
    "layernorm": ("te", lambda t: _yaml(t, normalization="LayerNorm"), ["normalization is 'LayerNorm'"]),
    "not-gated": ("te", lambda t: _yaml(t, swiglu=False), ["swiglu is not set"]),
    "gelu": ("te", lambda t: _yaml(t, openai_gelu=True), ["openai_gelu is set"]),
    "biases": ("te", lambda t: _yaml(t, add_bias_linear=True), ["add_bias_linear is set"]),
    "experts": ("te", lambda t: _yaml(t, num_experts=8), ["num_experts is 8"]),
    "shape-disagrees": ("te", lambda t: _yaml(t, ffn_hidden_size=128),
                        ["decoder.layers.mlp.linear_fc1.weight is stored as [2, 192, 64]",
                         "the arguments imply [2, 256, 64]"]),
    "tied-mismatch": ("te", lambda t: _yaml(t, untie_embeddings_and_output_weights=False),
                      ["stores output_layer.weight", "tied"]),
    "missing-argument": ("te", lambda t: _yaml(t, num_layers=None), ["lack 'num_layers'", "--args-yaml"]),
    "unknown-name": ("extra", lambda t: [], ["unknown tensor 'decoder.layers.mlp.router.weight'"]),
    "no-arguments": (lambda r, t: _copy_with_common(r, t, {"iteration": 7}), lambda t: [],
                     ["holds no arguments", "--args-yaml"]),
    "pickled-object": (lambda r, t: _copy_with_common(r, t, {"args": argparse.Namespace(
        num_layers=2, when=datetime.datetime(2026, 1, 1))}), lambda t: [],
        ["refused to unpickle datetime.datetime", "--args-yaml"]),
    "bad-yaml": ("te", lambda t: (t / "a.yaml").write_text("[1, 2") and ["--args-yaml", str(t / "a.yaml")],
                 ["not valid YAML"]),
    "not-a-checkpoint": ("tok", lambda t: [], ["is not a Megatron-LM checkpoint"]),
    "tp-does-not-divide": ("te", lambda t: ["--tp", "3"], ["--tp 3 does not divide the 4 attention heads"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, source, tmp_path, capsys):
    root, _ = source
    variant, extra, needles = CASES[case]
    base = root
    if callable(variant):
        variant, base = variant(root, tmp_path), tmp_path
    out = tmp_path / "out"
    rc = run_main(megatron_lm_main, ["--load", str(base / variant), "--tokenizer", str(root / "tok"),
                                     "--out-dir", str(out), "--no-progress", *extra(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    assert not out.exists() or not os.listdir(out)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
