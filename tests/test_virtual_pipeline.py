"""train.vpp: megatron's interleaved 1F1B schedule over model chunks (PP=2 x VPP=2, four layers
on two gloo processes) trains exactly as one process does, and its checkpoint resumes without
the virtual pipeline."""
import pytest

from megatron_nbdiff.config import RunConfig

from _dist_workers import run_two_process
from _fixtures import check_steps_then_resume, losses, make_config, run, same_start


def test_interleaved_pipeline_equals_one_process_and_checkpoints_cross_layouts(corpus, tmp_path):
    def config(name, **ckpt):
        return make_config(corpus, tmp_path / name, model=dict(num_layers=4), recipe=dict(block_size=4),
                           train=dict(steps=4, warmup_steps=1), checkpoint=dict(save_dir=str(tmp_path / name), **ckpt))

    one, two = config("one"), config("two", save_interval=2)
    same_start(one, two)
    assert run(one)[0] == 0
    got = run_two_process("train_records", str(tmp_path / "out"), data=two, steps=2, pp=2, vpp=2)[1]
    check_steps_then_resume(losses(tmp_path / "one"), got, two)  # then the PP=2 x VPP=2 checkpoint at PP=1


def test_virtual_pipeline_layout_errors(corpus, tmp_path):
    from megatron_nbdiff.errors import ConfigError
    from megatron_nbdiff.training.validation import validate_run

    def check(world, **train):
        cfg = make_config(corpus, tmp_path / "r", model=dict(num_layers=4), train=train)
        validate_run(RunConfig.from_dict(cfg), world_size=world, check_data=False)

    check(2, pp=2, vpp=2)
    with pytest.raises(ConfigError, match="train.vpp 2 needs train.pp > 1"):
        check(1, vpp=2)
    with pytest.raises(ConfigError, match="train.vpp 4 needs .* dividing num_layers=4"):
        check(2, pp=2, vpp=4)
    with pytest.raises(ConfigError, match="the 1 micro-batches of a step .* multiple of train.pp 2"):
        check(2, pp=2, vpp=2, micro_batch_size=4)
