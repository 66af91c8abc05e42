"""Run validation: everything about a run config that can be checked before any work starts,
shared by the trainer and the Slurm launcher (which validates exactly as the job will).

:func:`validate_run` reads the init checkpoint's metadata, the data tokenizer and the indexed
datasets' headers and token ids; it writes nothing (the token scan is remembered only when a
cache folder is given) and raises an :class:`~megatron_nbdiff.errors.NBDiffError` naming the
field or file at the first problem.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

from ..config import ModelConfig, RunConfig
from ..errors import CheckpointError, ConfigError, TrainingError
from ..parallel import check_parallel_sizes
from .recipes import Recipe, resolve_recipe

RESUMABLE_CHANGES = (
    # length and cadence
    "train.steps", "train.log_interval", "train.eval_interval", "train.eval_iters", "train.peak_tflops",
    "checkpoint.save_interval", "checkpoint.keep",
    # layout: checkpoints reshard to any TP/PP/DP, micro-batching only changes the summation order
    "train.tp", "train.pp", "train.vpp", "train.cp", "train.ep", "train.sequence_parallel", "train.micro_batch_size",
    "model.attention_backend", "checkpoint.optimizer_format",
    # the MoE token dispatcher moves the same tokens to the same experts (tests/test_moe_training.py)
    "train.moe_dispatcher",
    # recomputation replays the same forward (tests/test_recompute.py)
    "train.recompute", "train.recompute_modules", "train.recompute_method", "train.recompute_num_layers",
    # places: a run folder, a cache or a tokenizer that moved
    "checkpoint.save_dir", "checkpoint.init_from", "data.cache_dir", "data.tokenizer",
)
"""Fields a resumed run may change; any other difference from the checkpoint's run config (the
learning rate, the recipe, the data, the architecture, ...) is refused."""

MODEL_TRAINING_FIELDS = ("attention_backend", "moe_aux_loss_coeff", "moe_z_loss_coeff")
"""``model`` fields a run may set differently from its init checkpoint's nbdiff.json: they leave
the weights alone (the attention kernel; the router losses' coefficients, training settings that
a converted checkpoint records as 0)."""


@dataclasses.dataclass
class RunPlan:
    """What validation resolved: the pieces the trainer builds from."""

    model: ModelConfig
    recipe: Recipe
    mask_token_id: Optional[int]
    eod_id: int
    tokenizer_vocab: int
    init_meta: object  # checkpoint.metadata.NBDiffMetadata or None


def _init_metadata(cfg: RunConfig):
    src = cfg.checkpoint.init_from
    if src is None:
        return None
    from ..checkpoint.metadata import read_metadata

    if not os.path.isdir(src):
        raise CheckpointError(f"checkpoint.init_from: {src} is not a directory")
    return read_metadata(src, kind="megatron")


def _data_tokenizer(cfg: RunConfig):
    """The tokenizer the data was made with: data.tokenizer, else the init checkpoint's."""
    from ..data.tokenizer import Tokenizer, TokenizerError

    if cfg.data.tokenizer is not None:
        return Tokenizer(cfg.data.tokenizer)
    if cfg.checkpoint.init_from:
        try:
            return Tokenizer(cfg.checkpoint.init_from)
        except TokenizerError:
            pass
    raise ConfigError("cannot tell the end-of-document token: set data.tokenizer (the tokenizer used by "
                      "tools/preprocess_data.py)")


def resolve_model(cfg: RunConfig, meta) -> Optional[ModelConfig]:
    """The architecture: the config's model section, else the init checkpoint's (``meta``, its
    nbdiff.json); None when neither is known. A model section that differs from the checkpoint
    outside :data:`MODEL_TRAINING_FIELDS` is refused, naming the fields that differ."""
    if cfg.model is None:
        return meta.get_model_config() if meta is not None else None
    if meta is not None:
        ours, theirs = cfg.model.to_dict(), meta.get_model_config().to_dict()
        diff = ", ".join(f"{k}: {ours.get(k)!r} here, {theirs.get(k)!r} in the checkpoint"
                         for k in sorted(set(ours) | set(theirs))  # a dense dict has no MoE fields
                         if ours.get(k) != theirs.get(k) and k not in MODEL_TRAINING_FIELDS)
        if diff:
            raise ConfigError(f"the model section differs from the architecture of {cfg.checkpoint.init_from} "
                              f"({diff}); leave 'model' out when starting from a checkpoint")
    return cfg.model


def check_layout(cfg: RunConfig, mc: Optional[ModelConfig] = None, world_size: Optional[int] = None) -> None:
    """The parallel layout of ``cfg`` against the model ``mc`` (None: the config's model section or
    the init checkpoint's architecture, read from its nbdiff.json) and, when given, the world size.
    Cheap and collective-free: the trainer calls it before it sets up the process groups, so a
    layout the model cannot take (``train.ep`` on a dense model or not dividing the experts) is
    refused as such rather than as a world-size mismatch."""
    t = cfg.train
    mc = mc or resolve_model(cfg, _init_metadata(cfg))
    if mc is None:
        return  # validate_run names the missing model
    try:
        check_parallel_sizes(mc, tp=t.tp, pp=t.pp, cp=t.cp, ep=t.ep, world_size=world_size)
    except ConfigError as exc:  # name the run config's fields
        raise ConfigError(f"train.tp/pp/cp/ep = {t.tp}/{t.pp}/{t.cp}/{t.ep}: {exc}") from None
    if t.vpp > 1 and (t.pp < 2 or mc.num_layers % (t.pp * t.vpp) != 0):
        raise ConfigError(f"train.vpp {t.vpp} needs train.pp > 1 and train.pp x train.vpp dividing num_layers="
                          f"{mc.num_layers} (train.pp is {t.pp})")
    if mc.is_moe and t.tp > 1 and not t.sequence_parallel:
        raise ConfigError(f"train.tp {t.tp} with a mixture-of-experts model needs train.sequence_parallel: true "
                          "(megatron's MoE layer refuses tensor parallelism without it in training)")
    if t.cp > 1:  # no block may straddle two CP ranks (attention/context_parallel.py)
        from ..attention.context_parallel import check_split
        from ..attention.masks import BLOCK_LAYOUTS

        recipe = resolve_recipe(cfg.recipe)
        try:
            check_split(t.seq_len, t.cp, recipe.curriculum.maximum if recipe.layout in BLOCK_LAYOUTS else 1)
        except ValueError as exc:
            raise ConfigError(f"train.cp {t.cp}: {exc}") from None


def validate_run(cfg: RunConfig, world_size: Optional[int] = None, check_data: bool = True,
                 cache_dir: Optional[str] = None, scan_tokens: bool = True) -> RunPlan:
    """Check a run config as a whole; see the module docstring. ``world_size`` (processes of the
    job) adds the parallel-layout and batch checks that need it. ``check_data`` checks the data
    files; ``scan_tokens`` also reads every token id once (the one costly check: a job runs it on
    one rank)."""
    t = cfg.train
    save_dir = cfg.checkpoint.save_dir
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        raise ConfigError(f"checkpoint.save_dir {save_dir} exists and is not a directory")
    meta = _init_metadata(cfg)
    mc = resolve_model(cfg, meta)
    if mc is None:
        raise ConfigError("no model: give a 'model' section or checkpoint.init_from")
    if t.seq_len > mc.max_seq_len:
        raise ConfigError(f"train.seq_len {t.seq_len} exceeds model.max_seq_len {mc.max_seq_len}")
    recipe = resolve_recipe(cfg.recipe)
    recipe.check(t.seq_len, t.steps)
    mask = cfg.recipe.mask_token_id
    if mask is None and meta is not None and meta.mask_token is not None:
        mask = int(meta.mask_token["id"])
    if recipe.needs_mask_token and mask is None:
        raise ConfigError(f"recipe {recipe.name!r} needs a mask token: set recipe.mask_token_id or start from a "
                          "checkpoint whose nbdiff.json names one")
    if mask is not None and not 0 <= mask < mc.vocab_size:
        raise ConfigError(f"mask token id {mask} is outside the vocabulary (size {mc.vocab_size})")
    check_layout(cfg, mc, world_size)
    if world_size is not None:
        dp = world_size // (t.tp * t.pp * t.cp)
        if t.global_batch_size % (t.micro_batch_size * dp) != 0:
            raise ConfigError(f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
                              f"{t.micro_batch_size} x data-parallel size {dp}")
        micro = t.global_batch_size // (t.micro_batch_size * dp)
        if t.vpp > 1 and micro % t.pp != 0:
            raise ConfigError(f"train.vpp {t.vpp}: the interleaved schedule needs the {micro} micro-batches of a step "
                              f"(global_batch_size / (micro_batch_size x data-parallel size {dp})) to be a multiple "
                              f"of train.pp {t.pp}")
    tok = _data_tokenizer(cfg)
    if tok.eod_id is None:
        raise ConfigError(f"tokenizer {tok.path} has no end-of-document (eos) token")
    if tok.vocab_size > mc.vocab_size:
        raise ConfigError(f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary has "
                          f"{mc.vocab_size} rows")
    if check_data:
        from ..data.datasets import check_loss_masks, check_prefix, check_token_ids, data_prefixes

        for prefix in data_prefixes(cfg.data.train):
            check_prefix(prefix)
            if scan_tokens:
                check_token_ids(prefix, mc.vocab_size, mask, tok.vocab_size, cache_dir)
        if scan_tokens:  # the loss masks' values are read like the token ids
            check_loss_masks(cfg.data, cache_dir)
    return RunPlan(mc, recipe, mask, int(tok.eod_id), tok.vocab_size, meta)


def validate_job(cfg: RunConfig, cache_dir: Optional[str], device) -> RunPlan:
    """:func:`validate_run` on every rank of the running job; the one pass over the data's token
    ids runs on rank 0 only (remembered in ``cache_dir`` once it exists), and every rank stops when
    any rank refused the run."""
    import torch.distributed as dist

    from ..errors import NBDiffError
    from ..parallel import all_ranks_agree

    error, plan = None, None
    try:
        plan = validate_run(cfg, world_size=dist.get_world_size(), scan_tokens=dist.get_rank() == 0,
                            cache_dir=cache_dir)
    except NBDiffError as exc:
        error = exc
    if not all_ranks_agree(error is None, device):
        raise error or TrainingError("run validation failed on another rank (see its error)")
    return plan


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and prefix == "":
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_resume(record: dict, cfg: RunConfig, model: ModelConfig, where: str) -> None:
    """Refuse to resume a checkpoint whose run config differs from ``cfg`` outside
    :data:`RESUMABLE_CHANGES` (a changed ``lr`` would otherwise be ignored silently), or whose
    architecture differs from ``model`` (a changed ``init_from``)."""
    saved = record.get("config")
    if record.get("model") is not None:
        now = model.to_dict()
        # fields that are not the architecture (the attention kernel) may change, as listed
        changed = sorted(k for k in set(now) | set(record["model"])
                         if record["model"].get(k) != now.get(k) and f"model.{k}" not in RESUMABLE_CHANGES)
        if changed:
            raise ConfigError(f"{where} holds another architecture ({', '.join(changed[:4])} differ); "
                              "use a new checkpoint.save_dir")
    if not saved:
        raise TrainingError(f"{where}: the checkpoint records no run config; resume it with the version that wrote it")
    # a field the writing version did not have yet counts as its default (a newer version adds
    # fields such as data.loss_mask; their defaults keep the old behaviour)
    old = dict(_flatten(type(cfg)().to_dict()), **_flatten(saved))
    new = _flatten(cfg.to_dict())
    old = {k: v for k, v in old.items() if k in new or k in _flatten(saved)}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in RESUMABLE_CHANGES)
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
        raise ConfigError(
            f"{where} was written with a different run config ({detail}); only "
            f"{', '.join(RESUMABLE_CHANGES)} may change on resume: use a new checkpoint.save_dir"
        )
