"""The training loop on one process: every recipe learns, resume is exact, B=1 is AR, signals
save a loadable checkpoint, bad inputs fail before any work."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from megatron_nbdiff.config import RunConfig

from _fixtures import losses, make_config, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")


@pytest.mark.parametrize("recipe,extra", [
    ("ar", {}),
    ("nbdiff", {}),
    ("transplant", {"block_size": 8}),
    ("block_causal", {}),
    ("diffullama", {"anneal_steps": 10}),
])
def test_each_recipe_lowers_the_loss(corpus, tmp_path, recipe, extra):
    # fixed block size for the dual recipes: with the curriculum the loss rises when B grows
    fixed = {"block_size": 4} if recipe in ("nbdiff", "block_causal") else {}
    data = make_config(corpus, tmp_path, recipe=dict(name=recipe, **fixed, **extra),
                       train=dict(steps=30, lr=5e-3))
    code, _ = run(data)
    assert code == 0
    rec = losses(tmp_path)
    first = sum(rec[s]["loss"] for s in range(3)) / 3
    last = sum(rec[s]["loss"] for s in range(27, 30)) / 3
    assert last < 0.8 * first, (recipe, first, last)
    assert os.path.isfile(tmp_path / "loss.png") and os.path.isfile(tmp_path / "block_size.png")


def test_resume_is_exact(corpus, tmp_path):
    full = make_config(corpus, tmp_path / "full", checkpoint=dict(save_dir=str(tmp_path / "full")))
    assert run(full)[0] == 0
    part = make_config(corpus, tmp_path / "part", checkpoint=dict(save_dir=str(tmp_path / "part"), save_interval=10))
    code, _ = run(part, stop_after=12)  # "killed" after step 11: its last checkpoint is step 10
    assert code == 0
    stale = tmp_path / "part" / "checkpoints" / "step_0000011.tmp"  # an interrupted save
    stale.mkdir()
    code, trainer = run(part)  # resumes at 10
    assert code == 0 and trainer.start_step == 10
    assert not stale.exists()
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == list(range(20))
    for step in range(20):
        assert a[step]["loss"] == b[step]["loss"], step
        assert a[step]["block_size"] == b[step]["block_size"]
    # the curriculum reached 1, 2, 4, 8 at the configured steps
    assert [a[s]["block_size"] for s in (0, 4, 8, 12, 19)] == [1, 2, 4, 8, 8]


@pytest.mark.parametrize("recompute", [dict(recompute="selective"),
                                       dict(recompute="full", recompute_method="uniform", recompute_num_layers=1)])
def test_recompute_trains_exactly_as_without(corpus, tmp_path, recompute):
    """train.recompute replays the block-diffusion layout in backward: the same losses and
    gradient norms step for step as without recompute (tests/test_recompute.py has the gradients
    layer by layer)."""
    steps = dict(steps=6, warmup_steps=1)
    plain = make_config(corpus, tmp_path / "plain", train=steps, recipe=dict(block_interval=2))
    replay = make_config(corpus, tmp_path / "replay", train=dict(steps, **recompute), recipe=dict(block_interval=2))
    assert run(plain)[0] == 0 and run(replay)[0] == 0
    a, b = losses(tmp_path / "plain"), losses(tmp_path / "replay")
    assert sorted(a) == sorted(b) == list(range(6))
    assert [a[s]["block_size"] for s in range(6)] == [1, 1, 2, 2, 4, 4]
    for s in range(6):
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-6, abs=0), s
        assert a[s]["grad_norm"] == pytest.approx(b[s]["grad_norm"], rel=1e-5), s


def test_block_size_one_step_equals_ar_step(corpus, tmp_path):
    from megatron.core import dist_checkpointing  # noqa: F401

    nb = make_config(corpus, tmp_path / "nb", recipe=dict(block_size=1, ar_weight=1.0),
                     train=dict(steps=3), checkpoint=dict(save_dir=str(tmp_path / "nb")))
    ar = make_config(corpus, tmp_path / "ar", recipe=dict(name="ar"), train=dict(steps=3),
                     checkpoint=dict(save_dir=str(tmp_path / "ar")))
    _, t_nb = run(nb)
    _, t_ar = run(ar)
    for s in range(3):
        assert losses(tmp_path / "nb")[s]["loss"] == losses(tmp_path / "ar")[s]["loss"]
    for (n1, p1), (n2, p2) in zip(t_nb.inner.named_parameters(), t_ar.inner.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    # with the default lambda = 0.5 the step-0 loss is half the AR loss
    half = make_config(corpus, tmp_path / "half", recipe=dict(block_size=1), train=dict(steps=1),
                       checkpoint=dict(save_dir=str(tmp_path / "half")))
    run(half)
    assert abs(losses(tmp_path / "half")[0]["loss"] - 0.5 * losses(tmp_path / "ar")[0]["loss"]) < 1e-6


def test_sigterm_saves_a_loadable_checkpoint(corpus, tmp_path):
    import yaml

    data = make_config(corpus, tmp_path, train=dict(steps=100000))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", str(cfg_path), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-2000:]
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    state = json.loads((tmp_path / "checkpoints" / latest / "trainer_state.json").read_text())
    assert state["step"] >= 3
    # loadable: a new run resumes from it
    data["train"]["steps"] = state["step"] + 1
    code, trainer = run(data)
    assert code == 0 and trainer.start_step == state["step"]


@pytest.mark.parametrize("change,message", [
    (dict(data=dict(train=["/nonexistent/prefix"])), "missing /nonexistent/prefix.bin"),
    (dict(recipe=dict(name="magic")), "unknown recipe 'magic'"),
    (dict(train=dict(stepz=3)), "unknown key(s) in 'train': stepz"),
    (dict(recipe=dict(mask_token_id=500)), "mask token id 500 is outside the vocabulary"),
    (dict(model=dict(vocab_size=100)), "has 260 tokens but the model's vocabulary has 100 rows"),
    (dict(train=dict(seq_len=30)), "seq_len 30 is not divisible by block size 4"),
])
def test_bad_inputs_fail_before_work(corpus, tmp_path, change, message):
    from megatron_nbdiff.training.trainer import TrainingError

    data = make_config(corpus, tmp_path)
    for section, values in change.items():
        data[section].update(values)
    with pytest.raises((TrainingError, ValueError)) as info:
        run(data)
    assert message in str(info.value)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_corrupt_data_prefix_and_cli_errors(corpus, tmp_path):
    import yaml

    bad = tmp_path / "bad"
    (tmp_path / "bad.bin").write_bytes(b"\x00" * 10)
    (tmp_path / "bad.idx").write_bytes(b"not an index")
    data = make_config(corpus, tmp_path / "run", data=dict(train=[str(bad)]))
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(data))
    r = subprocess.run([sys.executable, TRAIN, "--config", str(cfg_path), "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "unreadable indexed dataset" in r.stderr and "Traceback" not in r.stderr
    # a truncated .bin beside a good index
    import shutil

    from megatron_nbdiff.data.datasets import check_prefix as _check_prefix
    from megatron_nbdiff.errors import DataError as TrainingError

    shutil.copy(corpus / "data" / "c.idx", tmp_path / "trunc.idx")
    (tmp_path / "trunc.bin").write_bytes((corpus / "data" / "c.bin").read_bytes()[:-7])
    with pytest.raises(TrainingError, match="trunc.bin has .* bytes, the index expects"):
        _check_prefix(str(tmp_path / "trunc"))
    r = subprocess.run([sys.executable, TRAIN, "--config", str(cfg_path), "train.nosuch=1", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "unknown key(s) in 'train': nosuch" in r.stderr


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)])
def test_two_process_first_steps_match_one_process(corpus, tmp_path, tp, pp):
    """DP=2 (tp=pp=1 on two processes), TP=2 and PP=2 give the one-process losses. Both start from
    one step-0 checkpoint (random initialisation draws differ between pipeline layouts), which the
    two-process run reshards on load."""
    import shutil

    from megatron_nbdiff.training.trainer import Trainer

    from _dist_workers import run_two_process

    one = make_config(corpus, tmp_path / "one", recipe=dict(block_size=4),
                      checkpoint=dict(save_dir=str(tmp_path / "one")))
    init = Trainer(RunConfig.from_dict(one), quiet=True)
    init.setup()
    init.save(0)
    two = make_config(corpus, tmp_path / "two", recipe=dict(block_size=4),
                      checkpoint=dict(save_dir=str(tmp_path / "two")))
    shutil.copytree(tmp_path / "one" / "checkpoints", tmp_path / "two" / "checkpoints")
    run(one, stop_after=2)
    ref = [losses(tmp_path / "one")[s]["loss"] for s in range(2)]
    results = run_two_process("train_first_losses", str(tmp_path / "out"), data=two, tp=tp, pp=pp)
    got = results[0]
    assert len(got) == 2
    for a, b in zip(got, ref):
        assert abs(a - b) < 1e-5 * max(1.0, abs(b)), (got, ref)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss_is_handled_as_configured(corpus, tmp_path, policy):
    """An absurd learning rate blows the weights up after the first step; the loss becomes
    non-finite and the run stops with a message or skips the step, as configured."""
    data = make_config(corpus, tmp_path, recipe=dict(name="ar"),
                       train=dict(steps=4, lr=1e30, min_lr=1e30, warmup_steps=0, clip_grad=0.0,
                                  nan_policy=policy))
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"loss is (nan|inf) at step \d"):
            run(data)
    else:
        code, _ = run(data)
        assert code == 0
        rec = losses(tmp_path)
        assert any(r["skipped"] for r in rec.values())
        assert all(r["skipped"] for r in rec.values() if not math.isfinite(r["loss"]))


def test_adapting_a_converted_hf_checkpoint_end_to_end(corpus, tmp_path):
    """HF Llama -> converted checkpoint -> (ar step-0 loss == HF loss) -> nbdiff steps -> the
    adapted checkpoint carries nbdiff.json and exports to a loadable HF model."""
    import shutil

    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from megatron_nbdiff.checkpoint import read_metadata
    from megatron_nbdiff.checkpoint.hf_to_megatron import convert_hf_to_megatron
    from megatron_nbdiff.checkpoint.megatron_to_hf import convert_megatron_to_hf

    from _convert_workers import make_hf_checkpoint

    hf_dir = tmp_path / "hf"
    from megatron_nbdiff.data import Tokenizer

    hf = make_hf_checkpoint(str(hf_dir), "llama", vocab=Tokenizer(str(corpus / "tok")).vocab_size)
    for name in os.listdir(corpus / "tok"):
        shutil.copy(corpus / "tok" / name, hf_dir / name)
    ckpt = tmp_path / "converted"
    convert_hf_to_megatron(str(hf_dir), str(ckpt), mask_token="none", progress=False)

    # no document masking here: the HF forward below attends across packed documents too
    base = make_config(corpus, tmp_path / "ar", recipe=dict(name="ar", pack_documents=False), train=dict(steps=1),
                       checkpoint=dict(save_dir=str(tmp_path / "ar"), init_from=str(ckpt)))
    base.pop("model")
    code, trainer = run(base)
    assert code == 0
    x = torch.stack([trainer.train_ds[i]["tokens"] for i in range(4)])
    with torch.no_grad():
        logits = hf(x).logits
    hf_loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()
    assert abs(losses(tmp_path / "ar")[0]["loss"] - hf_loss) < 1e-5

    adapt = make_config(corpus, tmp_path / "nb", recipe=dict(name="nbdiff", block_size=4),
                        train=dict(steps=3),
                        checkpoint=dict(save_dir=str(tmp_path / "nb"), init_from=str(ckpt)))
    adapt.pop("model")
    assert run(adapt)[0] == 0
    step_dir = tmp_path / "nb" / "checkpoints" / "step_0000003"
    meta = read_metadata(str(step_dir))
    assert (meta.recipe, meta.step, meta.block_size, meta.attention_layout) == (
        "nbdiff", 3, 4, "dual_context_causal")
    out = tmp_path / "exported"
    convert_megatron_to_hf(str(step_dir), str(out), progress=False)
    exported = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="sdpa").eval()
    assert read_metadata(str(out)).recipe == "nbdiff"
    changed = [n for n, p in exported.named_parameters()
               if not torch.equal(p, dict(hf.named_parameters())[n])]
    assert changed  # the adaptation steps moved the weights


def test_blended_datasets(corpus, tmp_path):
    """A weighted blend of two prefixes builds through megatron-core's blended dataset builder."""
    import shutil

    from megatron_nbdiff.data.datasets import build_datasets
    from megatron_nbdiff.parallel import initialize_parallel

    initialize_parallel(1, 1)  # megatron's dataset builder asks for the rank
    for suffix in (".bin", ".idx"):
        shutil.copy(corpus / "data" / f"c{suffix}", tmp_path / f"d{suffix}")
    data = make_config(corpus, tmp_path / "run",
                       data=dict(train=["0.3", str(corpus / "data" / "c"), "0.7", str(tmp_path / "d")]))
    cfg = RunConfig.from_dict(data)
    train, _ = build_datasets(cfg, eod=1, vocab_size=cfg.model.vocab_size, cache_dir=str(tmp_path / "cache"))
    assert type(train).__name__ == "BlendedDataset"
    assert len(train) >= cfg.train.steps * cfg.train.global_batch_size
    assert train[0]["tokens"].shape == (cfg.train.seq_len,)


def test_resume_allows_the_listed_model_fields_only(corpus, tmp_path):
    """model.attention_backend is in RESUMABLE_CHANGES: a checkpoint written with the flex kernel
    resumes with the dense one; a changed width is another architecture."""
    import dataclasses

    from megatron_nbdiff.errors import ConfigError
    from megatron_nbdiff.training.validation import check_resume

    cfg = RunConfig.from_dict(make_config(corpus, tmp_path / "r"))
    record = dict(config=cfg.to_dict(), model=dataclasses.replace(cfg.model, attention_backend="flex").to_dict())
    check_resume(record, cfg, cfg.model, "ckpt")
    wider = dict(record, model=dict(record["model"], hidden_size=128))
    with pytest.raises(ConfigError, match=r"ckpt holds another architecture \(hidden_size differ\)"):
        check_resume(wider, cfg, cfg.model, "ckpt")
