"""The training loop on one GPU: bf16 (Float16Module), megatron's distributed optimizer and the
FlexAttention backend, the paths that never run on CPU."""
import json
import os

import pytest
import torch

from _fixtures import losses, make_config, run

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("recipe", ["nbdiff", "diffullama", "ar"])
def test_gpu_bf16_flex_training_learns(corpus, tmp_path, recipe):
    extra = {"block_size": 4} if recipe == "nbdiff" else ({"anneal_steps": 10} if recipe == "diffullama" else {})
    data = make_config(corpus, tmp_path, recipe=dict(name=recipe, **extra),
                       model=dict(attention_backend="flex"), train=dict(steps=30, lr=5e-3))
    code, trainer = run(data)
    assert code == 0
    assert trainer.dtype == "bf16"
    assert next(trainer.inner.parameters()).is_cuda
    rec = losses(tmp_path)
    first = sum(rec[s]["loss"] for s in range(3)) / 3
    last = sum(rec[s]["loss"] for s in range(27, 30)) / 3
    assert last < 0.8 * first, (recipe, first, last)
    assert all(rec[s]["mfu"] is not None and rec[s]["mfu"] > 0 for s in rec)


def test_gpu_flex_and_dense_backends_give_the_same_first_loss(corpus, tmp_path):
    first = {}
    for backend in ("flex", "dense"):
        data = make_config(corpus, tmp_path / backend, recipe=dict(name="nbdiff", block_size=4),
                           model=dict(attention_backend=backend), train=dict(steps=1),
                           checkpoint=dict(save_dir=str(tmp_path / backend)))
        assert run(data)[0] == 0
        first[backend] = losses(tmp_path / backend)[0]["loss"]
    assert abs(first["flex"] - first["dense"]) <= 2e-2 * abs(first["dense"]), first


def test_gpu_resume_restores_the_run(corpus, tmp_path):
    """bf16 backward kernels use atomics, so GPU resume is compared within bf16 tolerance."""
    full = make_config(corpus, tmp_path / "full", checkpoint=dict(save_dir=str(tmp_path / "full")))
    assert run(full)[0] == 0
    part = make_config(corpus, tmp_path / "part",
                       checkpoint=dict(save_dir=str(tmp_path / "part"), save_interval=10))
    assert run(part, stop_after=12)[0] == 0
    code, trainer = run(part)
    assert code == 0 and trainer.start_step == 10
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    for step in range(20):
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 3e-2 * abs(a[step]["loss"]), step
        assert a[step]["block_size"] == b[step]["block_size"]
    state = json.loads((tmp_path / "part" / "checkpoints" / "step_0000020" / "trainer_state.json").read_text())
    assert state["step"] == 20
    assert os.path.isfile(tmp_path / "part" / "loss.png")
    torch.cuda.synchronize()
