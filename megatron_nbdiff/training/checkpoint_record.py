"""What a training checkpoint records beside its weights: ``trainer_state.json`` (step, scheduler,
recipe, the whole run config) and, for runs started from a converted or adapted checkpoint,
``nbdiff.json`` and the tokenizer files, so that the checkpoint loads with
``checkpoint.load_model``, decodes and exports like a converted one."""
from __future__ import annotations

import dataclasses
import os
import shutil


def checkpoint_record(trainer, step: int) -> dict:
    """The contents of ``trainer_state.json`` for a checkpoint after ``step`` steps."""
    return dict(
        step=step, scheduler=trainer.scheduler.state_dict(),
        recipe=dataclasses.asdict(trainer.cfg.recipe), block_size=trainer.recipe.block_size(step),
        model=trainer.model_config.to_dict(), mask_token_id=trainer.plan.mask_token_id,
        eod_token_id=trainer.plan.eod_id, config=trainer.cfg.to_dict(),
        optimizer_format=trainer.cfg.checkpoint.optimizer_format,
    )


def write_checkpoint_metadata(trainer, directory: str, step: int) -> None:
    """``nbdiff.json`` (the init checkpoint's metadata with this run's recipe, block size, layout,
    step and weights) and the tokenizer files. Runs from random weights have no architecture
    family to record and write none."""
    meta = trainer.plan.init_meta
    if meta is None:
        return
    from ..checkpoint.metadata import write_metadata

    src = trainer.cfg.checkpoint.init_from
    recipe = trainer.recipe
    adapted = meta.updated(
        recipe=recipe.name, step=step, attention_layout=recipe.layout,
        block_size=recipe.metadata_block_size(step, trainer.cfg.train.seq_len),
        weights={"format": "torch_dist", "path": ".", "key_prefix": ""},
        dtype=trainer.dtype,
        source=dict(meta.source, adapted_from=os.path.abspath(src)),
    )
    write_metadata(directory, adapted)
    for name in (meta.tokenizer or {}).get("files", []):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copy(path, os.path.join(directory, name))
