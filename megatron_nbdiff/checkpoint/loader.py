"""Build the project's model from a converted or adapted checkpoint at the current layout."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

from .errors import CheckpointMetadataError, ConversionError
from .metadata import CheckpointMetadata, read_metadata


def weights_dir(directory: str, meta: CheckpointMetadata) -> str:
    path = os.path.join(directory, meta.weights.get("path", "model"))
    if not os.path.isfile(os.path.join(path, "metadata.json")):
        raise CheckpointMetadataError(
            f"{directory}: nbdiff.json points at weights in {path}, which is not a megatron-core "
            "distributed checkpoint (no metadata.json)"
        )
    return path


def load_model(
    directory: str,
    *,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    ep: Optional[int] = None,
    dtype: Optional[str] = None,
    parallel_output: bool = False,
    use_te: bool = False,
    strict: bool = True,
    **config_overrides: Any,
):
    """An :class:`~megatron_nbdiff.models.NBDiffModel` holding the weights of ``directory``.

    The model is built for the current parallel layout (this rank's TP shard, pipeline stage and,
    for a mixture-of-experts model, its experts) and filled through ``dist_checkpointing.load`` of
    its own sharded state dict, so a checkpoint written at any TP/PP/EP loads at any other.
    Without an initialised model-parallel state it initialises one at ``tp``/``pp``/``ep``
    (default 1/1/1; a single process or a torchrun launch); with one, ``tp``/``pp``/``ep`` (if
    given) must match it. ``ep`` (expert parallelism) must divide the experts of a MoE
    checkpoint and is 1 for a dense one; both are checked before anything is built. ``dtype``
    defaults to the stored dtype.
    ``config_overrides`` replace :class:`ModelConfig` fields that do not change the weights
    (``attention_backend``, ``max_seq_len``).

    The metadata is available as ``model.checkpoint_metadata``.
    """
    import torch
    from megatron.core import parallel_state

    from .. import compat
    from ..models import NBDiffModel
    from ..parallel import initialize_parallel
    from ._runtime import private_init_method, quiet_megatron_logs

    compat.install_safe_loading()
    meta = read_metadata(directory, kind="megatron")
    weights_dir(directory, meta)  # no weights: refuse before building anything
    allowed = {"attention_backend", "max_seq_len"}
    bad = sorted(set(config_overrides) - allowed)
    if bad:
        raise ConversionError(f"load_model cannot override {bad}; only {sorted(allowed)}")
    mc = dataclasses.replace(meta.get_model_config(), **config_overrides)
    if ep is not None:
        _check_experts(mc, ep, directory)
    if not parallel_state.model_parallel_is_initialized():
        init_method = None
        if not torch.distributed.is_initialized() and "WORLD_SIZE" not in os.environ:
            init_method = private_init_method()  # one process, no port to collide on
        initialize_parallel(tp or 1, pp or 1, init_method=init_method, ep=ep or 1)
    cur_tp = parallel_state.get_tensor_model_parallel_world_size()
    cur_pp = parallel_state.get_pipeline_model_parallel_world_size()
    cur_ep = parallel_state.get_expert_model_parallel_world_size() if mc.is_moe else 1
    if (tp is not None and tp != cur_tp) or (pp is not None and pp != cur_pp) or (ep is not None and ep != cur_ep):
        raise ConversionError(
            f"asked for TP={tp} PP={pp} EP={ep} but the initialised layout is TP={cur_tp} PP={cur_pp} EP={cur_ep}"
        )
    _check_experts(mc, cur_ep, directory)
    if mc.num_attention_heads % cur_tp or mc.num_query_groups % cur_tp:
        raise ConversionError(
            f"TP={cur_tp} does not divide {mc.num_attention_heads} heads / {mc.num_query_groups} "
            "query groups of this checkpoint"
        )
    if mc.num_layers % cur_pp:
        raise ConversionError(f"PP={cur_pp} does not divide the {mc.num_layers} layers")
    quiet_megatron_logs()
    stage = parallel_state.get_pipeline_model_parallel_rank()
    tc = mc.transformer_config(tp=cur_tp, pp=cur_pp, ep=cur_ep, dtype=dtype or meta.dtype,
                               perform_initialization=False)
    with torch.no_grad():
        model = NBDiffModel(
            mc, tc, pre_process=stage == 0, post_process=stage == cur_pp - 1,
            parallel_output=parallel_output, use_te=use_te,
        )
    load_weights(model, directory, meta, strict=strict)
    model.checkpoint_metadata = meta
    return model


def _check_experts(mc, ep: int, directory: str) -> None:
    """Refuse an expert-parallel size the checkpoint's architecture cannot take."""
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConversionError(f"expert parallel size must be a positive integer, found {ep!r}")
    if ep > 1 and not mc.is_moe:
        raise ConversionError(f"EP={ep}: {directory} holds a dense model; expert parallelism needs a "
                              "mixture-of-experts one")
    if mc.is_moe and mc.num_experts % ep:
        raise ConversionError(f"EP={ep} does not divide the {mc.num_experts} experts of {directory}")


def load_weights(model, directory: str, meta: Optional[CheckpointMetadata] = None,
                 strict: bool = True) -> None:
    """Fill an already built :class:`NBDiffModel` (this rank's shard and stage, any layout) with
    the weights of checkpoint ``directory`` through ``dist_checkpointing.load``.

    The checkpoint is checked first (every shard present and long enough,
    :func:`~megatron_nbdiff.checkpoint.torch_dist.check_torch_dist`) and read with megatron's and
    torch's unpickling restricted (:func:`megatron_nbdiff.compat.install_safe_loading`); a bad
    checkpoint raises :class:`ConversionError` naming the file."""
    import torch
    from megatron.core import dist_checkpointing

    from .. import compat
    from ..errors import NBDiffError
    from ._runtime import checkpoint_failures, describe_failure, find_in
    from .torch_dist import check_torch_dist

    if isinstance(model, torch.nn.ModuleList):  # the chunks of an interleaved pipeline stage
        for chunk in model:
            load_weights(chunk, directory, meta, strict)
        return
    compat.install_safe_loading()
    meta = meta or read_metadata(directory, kind="megatron")
    path = weights_dir(directory, meta)
    check_torch_dist(path)
    prefix = meta.weights.get("key_prefix", "")
    try:
        with compat.cpu_device_mode():
            state = dist_checkpointing.load(model.sharded_state_dict(prefix=prefix), path)
    except NBDiffError:
        raise
    except checkpoint_failures() as e:  # megatron/torch raise many kinds for a bad checkpoint
        refused = find_in(e, lambda x: isinstance(x, NBDiffError))  # a refused item, wrapped by torch
        if refused is not None:
            raise ConversionError(str(refused)) from None
        raise ConversionError(f"cannot load the weights in {path}: {describe_failure(e)}") from None
    # a training checkpoint also holds the optimizer; its non-sharded part comes back with the
    # common state of any load and is not a model weight
    state.pop("optimizer", None)
    if prefix:
        state = {k[len(prefix):]: v for k, v in state.items()}
    model.gpt.load_state_dict(state, strict=strict)
