"""Tiny shared fixtures: a BPE tokenizer and indexed dataset of pseudo-sentences, run configs of a
2-layer model on it, and helpers to run the trainer and read its metrics."""
from __future__ import annotations

import json
import os
import random

WORDS = "the cat dog sat ran on mat park and watched a blue red big small tree house".split()


def make_corpus(d) -> None:
    """Write ``d/tok`` (a 200-merge BPE tokenizer), ``d/c.jsonl`` and ``d/data/c.{bin,idx}``."""
    from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer
    from megatron_nbdiff.data.preprocess import preprocess

    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) for _ in range(300)]
    train_bpe_tokenizer(docs, 200, str(d / "tok"))
    with open(d / "c.jsonl", "w") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}) + "\n")
    preprocess(str(d / "c.jsonl"), str(d / "tok"), str(d / "data" / "c"), quiet=True)


def make_config(corpus, save_dir, **sections) -> dict:
    """A run config (as a dict) of a 2-layer model on the corpus; ``sections`` update it."""
    from megatron_nbdiff.data import Tokenizer

    data = {
        "model": dict(vocab_size=Tokenizer(str(corpus / "tok")).vocab_size, hidden_size=64, num_layers=2,
                      num_attention_heads=4, num_query_groups=2, ffn_hidden_size=128, max_seq_len=64),
        "recipe": dict(name="nbdiff", mask_token_id=3, block_interval=4, block_max=8),
        "data": dict(train=[str(corpus / "data" / "c")], tokenizer=str(corpus / "tok"), split="90,10,0"),
        "train": dict(steps=20, micro_batch_size=2, global_batch_size=4, seq_len=32, lr=3e-3,
                      warmup_steps=2, min_lr=3e-4),
        "checkpoint": dict(save_dir=str(save_dir)),
    }
    for name, values in sections.items():
        data[name].update(values)
    return data


def run(data, **kw):
    """Train a config dict in this process; returns (exit code, trainer)."""
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    trainer = Trainer(RunConfig.from_dict(data), quiet=True, **kw)
    code = trainer.run()
    return code, trainer


def losses(save_dir) -> dict:
    """Training records of a run's metrics.jsonl by step."""
    with open(os.path.join(save_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if "eval_loss" not in r}


def same_start(first: dict, *others: dict) -> None:
    """Save a step-0 checkpoint of run config ``first`` (its random weights) and copy it into the
    run folder of every config in ``others``: runs in other layouts then start from the same
    weights (random initialisation draws differ between layouts)."""
    import shutil

    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.training.trainer import Trainer

    init = Trainer(RunConfig.from_dict(first), quiet=True)
    init.setup()
    init.save(0)
    for data in others:
        shutil.copytree(os.path.join(first["checkpoint"]["save_dir"], "checkpoints"),
                        os.path.join(data["checkpoint"]["save_dir"], "checkpoints"))


def check_steps_then_resume(ref: dict, got: list, other: dict) -> None:
    """``got`` (``(step, loss, grad_norm)`` of steps 0 and 1 in another layout, saving at step 2)
    equals the one-process records ``ref``; the other layout's step-2 checkpoint, resumed in this
    process, continues with ``ref``'s losses at steps 2 and 3."""
    import pytest

    assert [s for s, _, _ in got] == [0, 1]
    for step, loss, grad_norm in got:
        assert loss == pytest.approx(ref[step]["loss"], rel=1e-5), (step, got, ref)
        assert grad_norm == pytest.approx(ref[step]["grad_norm"], rel=1e-4), (step, got, ref)
    code, trainer = run(other)
    assert code == 0 and trainer.start_step == 2
    resumed = losses(other["checkpoint"]["save_dir"])
    for step in (2, 3):
        assert resumed[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
