"""Fault injection for training: kills at the dangerous instructions of a checkpoint save, a full
disk, Ctrl-C, orphaned writer processes, wrong config types, stale data caches, token ids outside
the vocabulary, resumes with a changed config, and silent successes. Each test failed before its
fix (see the closing notes of the reliability issue)."""
import errno
import functools
import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
import yaml

from megatron_nbdiff.config import RunConfig
from megatron_nbdiff.errors import ConfigError, DataError

from _fixtures import losses, make_config, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "tools", "train.py")


def write_config(tmp_path, data) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def tagged_env(**extra):
    tag = uuid.uuid4().hex
    env = dict(os.environ, NBDIFF_TEST_TAG=tag, **extra)
    return env, tag


def processes_tagged(tag: str) -> list:
    import psutil

    found = []
    for p in psutil.process_iter(["pid"]):
        try:
            if p.environ().get("NBDIFF_TEST_TAG") == tag:
                found.append(p)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            pass
    return found


# -- kills during a save ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """Losses of an uninterrupted 3-step run."""
    d = tmp_path_factory.mktemp("reference")
    assert run(make_config(corpus, d, train=dict(steps=3)))[0] == 0
    return losses(d)


@pytest.mark.parametrize("point", ["after_shards", "before_rename", "before_marker", "before_latest",
                                   "before_rotate", "mid_rotate"])
def test_a_kill_at_any_point_of_a_save_leaves_a_resumable_run(corpus, tmp_path, reference, point):
    """SIGKILL at each dangerous instruction of a save (the first save for the early points, the
    first rotation, at step 3, for the rotation points); then a restart finishes the run with the
    losses of an uninterrupted run, every step logged once, and no writer process left behind."""
    data = make_config(corpus, tmp_path, train=dict(steps=3), checkpoint=dict(save_interval=1, keep=1))
    env, tag = tagged_env(NBDIFF_FAULT_KILL_AT=point)
    log = tmp_path / "killed.log"
    with open(log, "w") as out:  # a file, not a pipe: an orphan holding a pipe would hang the test
        r = subprocess.run([sys.executable, TRAIN, "--config", write_config(tmp_path, data), "--quiet"],
                           env=env, stdout=out, stderr=subprocess.STDOUT, timeout=300)
    assert r.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    time.sleep(1.0)
    assert processes_tagged(tag) == [], "checkpoint writer processes outlived the killed trainer"
    ckpts = tmp_path / "checkpoints"
    assert any(name.startswith("step_") for name in os.listdir(ckpts))
    code, trainer = run(data)
    assert code == 0
    # killed in the save of step 1 (before its marker: step 1 is lost, or after it: kept), or in
    # the first rotation (step 2's save, after its marker)
    assert trainer.start_step == {"after_shards": 0, "before_rename": 0, "before_marker": 0,
                                  "before_latest": 1, "before_rotate": 1, "mid_rotate": 2}[point]
    got = losses(tmp_path)
    assert sorted(got) == [0, 1, 2]
    with open(tmp_path / "metrics.jsonl") as f:
        assert len(f.readlines()) == 3  # no step twice
    for s in range(3):
        assert got[s]["loss"] == reference[s]["loss"], (point, s)
    names = sorted(os.listdir(ckpts))
    assert names == ["FORMAT", "latest", "step_0000003"], names
    assert (ckpts / "step_0000003" / "COMPLETE").is_file()


def test_restarting_a_finished_run_does_not_rewrite_its_checkpoint(corpus, tmp_path):
    """The final step used to be saved twice (and a restart re-saved it), deleting the checkpoint
    that ``latest`` named before its copy was complete. A complete step is never written again."""
    data = make_config(corpus, tmp_path, train=dict(steps=2), checkpoint=dict(save_interval=1))
    assert run(data)[0] == 0
    final = tmp_path / "checkpoints" / "step_0000002"
    stamp = (final / "COMPLETE").stat().st_mtime_ns
    code, trainer = run(data)
    assert code == 0 and trainer.start_step == 2
    assert (final / "COMPLETE").stat().st_mtime_ns == stamp


def test_checkpoints_of_an_earlier_version_are_adopted_not_removed(corpus, tmp_path, reference):
    """Checkpoints written before the COMPLETE marker existed (no FORMAT file in checkpoints/) are
    trusted as that version trusted them, instead of being removed as unmarked leftovers."""
    data = make_config(corpus, tmp_path, train=dict(steps=2), checkpoint=dict(save_interval=1, keep=2))
    assert run(data)[0] == 0
    ckpts = tmp_path / "checkpoints"
    for name in ("FORMAT", "step_0000001/COMPLETE", "step_0000002/COMPLETE"):
        (ckpts / name).unlink()  # the layout an earlier version left
    (ckpts / "step_0000003.tmp").mkdir()  # and an interrupted save of it
    data["train"]["steps"] = 3
    code, trainer = run(data)
    assert code == 0 and trainer.start_step == 2
    assert sorted(os.listdir(ckpts)) == ["FORMAT", "latest", "step_0000002", "step_0000003"]
    assert losses(tmp_path)[2]["loss"] == reference[2]["loss"]


def test_resume_falls_back_to_the_newest_checkpoint_that_loads(corpus, tmp_path):
    data = make_config(corpus, tmp_path, train=dict(steps=2), checkpoint=dict(save_interval=1, keep=2))
    assert run(data)[0] == 0
    newest = tmp_path / "checkpoints" / "step_0000002"
    for name in os.listdir(newest):  # truncate every shard of the newest checkpoint
        if name.endswith(".distcp"):
            (newest / name).write_bytes(b"\0" * 16)
    data["train"]["steps"] = 3
    with pytest.warns(UserWarning, match="could not be loaded"):
        code, trainer = run(data)
    assert code == 0 and trainer.start_step == 1
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["FORMAT", "latest", "step_0000002", "step_0000003"]
    # a marker-less checkpoint named by latest is not trusted, and when nothing else loads (step 2
    # is still corrupt) the run stops instead of starting from scratch over its checkpoints
    (tmp_path / "checkpoints" / "step_0000003" / "COMPLETE").unlink()
    data["train"]["steps"] = 4
    from megatron_nbdiff.errors import CheckpointError

    with pytest.raises(CheckpointError, match="no checkpoint could be loaded .tried step_0000002"):
        run(data)
    assert (tmp_path / "checkpoints" / "step_0000002").is_dir()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, capsys):
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_nbdiff.cli import run_main
    from megatron_nbdiff.training.cli import main

    data = make_config(corpus, tmp_path, train=dict(steps=2), checkpoint=dict(save_interval=1))
    real = filesystem_async._write_item

    @functools.wraps(real)  # megatron inspects its signature
    def full_disk(*args, **kwargs):  # runs in megatron's forked writer process
        if os.path.isdir(tmp_path / "checkpoints" / "step_0000001"):  # the second save
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(filesystem_async, "_write_item", full_disk)
    code = run_main(main, ["--config", write_config(tmp_path, data), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0] and "step_0000002" in lines[0]
    assert "Traceback" not in err
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["FORMAT", "latest", "step_0000001"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_0000001"


def test_ctrl_c_saves_and_exits_75(corpus, tmp_path):
    data = make_config(corpus, tmp_path, train=dict(steps=100000))
    proc = subprocess.Popen([sys.executable, TRAIN, "--config", write_config(tmp_path, data), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err
    latest = (tmp_path / "checkpoints" / "latest").read_text().strip()
    assert (tmp_path / "checkpoints" / latest / "COMPLETE").is_file()


# -- config types ------------------------------------------------------------------------------


def test_config_values_are_type_checked_with_coercion(corpus, tmp_path):
    data = make_config(corpus, tmp_path)
    data["train"].update(lr="3e-4", steps="20", sequence_parallel="false")
    cfg = RunConfig.from_dict(data)
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 20 and cfg.train.sequence_parallel is False
    for section, key, value, expected in [
        ("train", "steps", "abc", "train.steps: expected int, found 'abc'"),
        ("train", "lr", [1], "train.lr: expected float, found [1]"),
        ("train", "steps", 2.5, "train.steps: expected int, found 2.5"),
        ("train", "nan_policy", "ignore", "train.nan_policy: expected one of 'stop' | 'skip'"),
        ("recipe", "ar_weight", "half", "recipe.ar_weight: expected float or null"),
        ("model", "hidden_size", "wide", "model.hidden_size: expected int"),
        ("checkpoint", "keep", True, "checkpoint.keep: expected int, found True"),
        ("data", "split", {"a": 1}, "data.split: expected str"),
        ("recipe", "pack_documents", "maybe", "recipe.pack_documents: expected bool"),
    ]:
        bad = make_config(corpus, tmp_path)
        bad[section][key] = value
        with pytest.raises(ConfigError) as info:
            RunConfig.from_dict(bad, source="run.yaml")
        assert expected in str(info.value) and str(info.value).startswith("run.yaml: "), str(info.value)
    # YAML reads 3e-4 as a string: the file and an override both give a float
    path = write_config(tmp_path, dict(make_config(corpus, tmp_path), train=dict(lr="3e-4")))
    (tmp_path / "y.yaml").write_text(open(path).read().replace("'3e-4'", "3e-4"))
    assert RunConfig.load(str(tmp_path / "y.yaml"), ["train.warmup_steps=1e1"]).train.warmup_steps == 10


# -- data --------------------------------------------------------------------------------------


def write_dataset(prefix: str, docs: list, dtype=np.uint16) -> None:
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for doc in docs:
        b.add_document(torch.tensor(doc), [len(doc)])
    b.finalize(prefix + ".idx")


@pytest.mark.parametrize("bad_id,message", [
    (5000, "token id 5000 is outside the model's vocabulary"),
    (3, "the data contains the mask token id 3"),
])
def test_token_ids_are_checked_against_the_vocabulary_before_the_run_folder(corpus, tmp_path, bad_id, message):
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(10, 200, 40)) for _ in range(50)]
    docs[17][5] = bad_id
    write_dataset(str(tmp_path / "d" / "bad"), docs)
    data = make_config(corpus, tmp_path / "run", data=dict(train=[str(tmp_path / "d" / "bad")]))
    with pytest.raises(DataError, match=message):
        run(data)
    assert not (tmp_path / "run").exists()


def test_a_retokenised_dataset_gets_fresh_indices(corpus, tmp_path):
    """The sample-index cache is keyed by the data's fingerprint: a dataset rewritten in place
    (here smaller) is not read through the old indices."""
    from megatron_nbdiff.data.datasets import build_datasets
    from megatron_nbdiff.parallel import initialize_parallel

    initialize_parallel(1, 1)
    prefix = str(tmp_path / "d" / "c")
    rng = np.random.default_rng(0)
    write_dataset(prefix, [list(rng.integers(10, 200, 60)) for _ in range(80)])
    cfg = RunConfig.from_dict(make_config(corpus, tmp_path / "run", data=dict(train=[prefix]),
                                          train=dict(steps=5)))
    cache = str(tmp_path / "cache")
    first, _ = build_datasets(cfg, eod=1, vocab_size=260, cache_dir=cache)
    n_first = len(os.listdir(cache))
    write_dataset(prefix, [list(rng.integers(10, 200, 33)) for _ in range(40)])
    second, _ = build_datasets(cfg, eod=1, vocab_size=260, cache_dir=cache)
    assert len(os.listdir(cache)) > n_first  # new index files beside the old ones
    for i in range(len(second)):  # every sample reads inside the new data
        assert second[i]["tokens"].shape == (32,)
    assert int(second[0]["tokens"].max()) < 200


# -- resume ------------------------------------------------------------------------------------


def test_resume_refuses_a_changed_config_but_allows_the_documented_fields(corpus, tmp_path):
    data = make_config(corpus, tmp_path, train=dict(steps=2))
    assert run(data)[0] == 0
    config_before = (tmp_path / "config.yaml").read_text()
    changed = make_config(corpus, tmp_path, train=dict(steps=3, lr=1e-2))
    with pytest.raises(ConfigError, match=r"train.lr: 0.003 -> 0.01"):
        run(changed)
    assert (tmp_path / "config.yaml").read_text() == config_before  # not rewritten to claim 1e-2
    arch = make_config(corpus, tmp_path, train=dict(steps=3))
    arch["model"]["hidden_size"] = 32
    with pytest.raises(ConfigError, match="another architecture"):
        run(arch)
    ok = make_config(corpus, tmp_path, train=dict(steps=3, log_interval=2), checkpoint=dict(keep=3))
    code, trainer = run(ok)
    assert code == 0 and trainer.start_step == 2


def test_a_field_added_after_the_checkpoint_counts_as_its_default():
    """A checkpoint written before ``data.loss_mask`` / ``recipe.complementary`` existed resumes
    when the new run keeps their defaults, and is refused when it turns one on."""
    from megatron_nbdiff.config import ModelConfig, RunConfig
    from megatron_nbdiff.training.validation import check_resume

    model = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4)
    cfg = RunConfig()
    saved = cfg.to_dict()
    del saved["data"]["loss_mask"], saved["recipe"]["complementary"]
    record = {"config": saved, "model": model.to_dict()}
    check_resume(record, cfg, model, "old checkpoint")
    cfg.data.loss_mask = True
    with pytest.raises(ConfigError, match=r"data.loss_mask: False -> True"):
        check_resume(record, cfg, model, "old checkpoint")


# -- silent successes ------------------------------------------------------------------------


def test_every_step_skipped_is_not_a_success(corpus, tmp_path, monkeypatch, capsys):
    """nan_policy=skip with a non-finite loss at every step used to exit 0."""
    from megatron_nbdiff.cli import run_main
    from megatron_nbdiff.training import recipes as recipes_module
    from megatron_nbdiff.training.cli import main

    real = recipes_module.ar_loss

    def nan_loss(*args, **kwargs):
        parts = real(*args, **kwargs)
        parts.loss = parts.loss * float("nan")
        return parts

    monkeypatch.setattr(recipes_module, "ar_loss", nan_loss)
    data = make_config(corpus, tmp_path, recipe=dict(name="ar"), train=dict(steps=2, nan_policy="skip"))
    code = run_main(main, ["--config", write_config(tmp_path, data), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "every step of this run (2) had a non-finite loss" in err, err
    assert all(r["skipped"] for r in losses(tmp_path).values())


def test_a_torn_metrics_line_does_not_fail_a_finished_run(corpus, tmp_path):
    data = make_config(corpus, tmp_path, train=dict(steps=2), checkpoint=dict(save_interval=1))
    assert run(data)[0] == 0
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 1.')  # a kill in the middle of a write
    data["train"]["steps"] = 3
    code, trainer = run(data)
    assert code == 0
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


def test_a_save_dir_that_is_a_file_and_missing_validation_data_are_reported(corpus, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    data = make_config(corpus, tmp_path / "file")
    with pytest.raises(ConfigError, match="checkpoint.save_dir .*file exists and is not a directory"):
        run(data)
    # evaluation asked for, but the split leaves no validation documents: said, not skipped silently
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    data = make_config(corpus, tmp_path / "run", data=dict(split="100,0,0"), train=dict(steps=1, eval_interval=1))
    with pytest.warns(UserWarning, match="no validation samples in data.split '100,0,0': evaluation is off"):
        assert Trainer(RunConfig.from_dict(data), quiet=True).run() == 0
