"""The training loop on megatron-core parts.

One loop from a single CPU process (tests) to many GPUs (torchrun / Slurm): megatron-core's
``DistributedDataParallel``, its optimizer (distributed with CUDA; the plain one on CPU, where the
distributed one cannot run) with gradient clipping, its pipeline schedules
(``get_forward_backward_func``), its LR scheduler and ``dist_checkpointing``.

Data order and noise are pure functions of the step: the ``j``-th sequence of step ``s`` is
sample ``g = s * global_batch_size + j`` of the dataset, and its noise is keyed by
(seed, s, g). Resuming therefore needs no data-loader or RNG state, and any data-, tensor- or
pipeline-parallel layout sees the same samples with the same noise.

Checkpoints: ``<save_dir>/checkpoints/step_NNNNNNN`` holds a megatron distributed checkpoint of
the model and optimizer plus ``trainer_state.json`` (step, scheduler, recipe, curriculum); it is
written under a temporary name and renamed when complete, then ``latest`` is updated atomically;
older checkpoints beyond ``keep`` are removed only after that.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .. import compat
from ..config import ModelConfig, RunConfig
from ..fileio import atomic_write
from .losses import ar_loss, dual_stream_loss, single_stream_loss

EXIT_OK = 0
EXIT_SIGNAL = 75  # "temporary failure": the run saved and wants to be requeued
EXIT_NAN = 3


class TrainingError(RuntimeError):
    """A problem with the run's inputs, reported before any work starts when possible."""


# ----------------------------------------------------------------------------------- data --


class _TokenizerInfo:
    """What megatron's GPTDataset needs of a tokenizer: the end-of-document id and vocab size."""

    def __init__(self, eod: int, vocab_size: int):
        self.eod = eod
        self.vocab_size = vocab_size
        # megatron hashes this into the dataset's cache key
        self.unique_identifiers = {"class": "nbdiff-tokenizer", "eod": eod, "vocab_size": vocab_size}


def _check_prefix(prefix: str) -> None:
    """Validate an indexed dataset's files (header, counts, sizes) with clear messages, before
    megatron-core opens them (its reader fails with bare assertions)."""
    import struct

    import numpy as np
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            raise TrainingError(f"data prefix {prefix!r}: missing {path}")
    with open(idx, "rb") as f:
        head = f.read(34)
        if len(head) < 34 or head[:9] != _INDEX_HEADER:
            raise TrainingError(f"data prefix {prefix!r}: unreadable indexed dataset ({idx} has no megatron index header)")
        version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:34])
        if version != 1:
            raise TrainingError(f"data prefix {prefix!r}: unreadable indexed dataset (index version {version}, expected 1)")
        try:
            itemsize = DType.size(DType.dtype_from_code(code))
        except Exception:  # noqa: BLE001 - megatron raises ValueError/KeyError for bad codes
            raise TrainingError(f"data prefix {prefix!r}: unreadable indexed dataset (dtype code {code})") from None
        lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    need = 34 + n_seq * 4 + n_seq * 8 + n_doc * 8
    if len(lengths) != n_seq or os.path.getsize(idx) < need:
        raise TrainingError(f"data prefix {prefix!r}: unreadable indexed dataset ({idx} is truncated)")
    expected = int(lengths.astype(np.int64).sum()) * itemsize
    if os.path.getsize(bin_) != expected:
        raise TrainingError(
            f"data prefix {prefix!r}: unreadable indexed dataset ({bin_} has {os.path.getsize(bin_)} "
            f"bytes, the index expects {expected})"
        )


def build_datasets(cfg: RunConfig, eod: int, vocab_size: int, cache_dir: str):
    """Train and validation GPTDatasets through megatron-core's blended dataset builder."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    if not cfg.data.train:
        raise TrainingError("data.train is empty: give at least one indexed-dataset prefix")
    blend = get_blend_from_list([str(x) for x in cfg.data.train])
    for prefix in blend[0]:
        _check_prefix(prefix)
    t = cfg.train
    n_eval = t.eval_iters * t.global_batch_size * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    ds_cfg = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=t.seq_len,
        blend=blend,
        split=cfg.data.split,
        path_to_cache=cache_dir,
        tokenizer=_TokenizerInfo(eod, vocab_size),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, [t.steps * t.global_batch_size, n_eval, 0], lambda: True, ds_cfg
    ).build()
    if train is None or len(train) == 0:
        raise TrainingError(f"data.train {cfg.data.train}: no training samples of length {t.seq_len}")
    return train, valid


def doc_ids_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document id of every position: the number of end-of-document tokens strictly before it."""
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=1) - is_eod


# ------------------------------------------------------------------------------- trainer --


@dataclasses.dataclass
class StepMetrics:
    step: int
    loss: float
    diffusion: float
    ar: float
    block_size: int
    lr: float
    grad_norm: float
    tokens_per_s: float
    mfu: Optional[float]
    seconds: float
    skipped: bool = False


class Trainer:
    """Builds everything from a :class:`RunConfig` and runs it (see module docstring)."""

    def __init__(self, cfg: RunConfig, *, stop_after: Optional[int] = None, quiet: bool = False):
        self.cfg = cfg
        self.stop_after = stop_after  # for tests: leave the loop after this many steps (no save)
        self.quiet = quiet
        self._signal = None
        self.metrics_path = None

    # -- set-up -------------------------------------------------------------------------------
    def _log(self, msg: str) -> None:
        if not self.quiet and self.rank == 0:
            print(msg, flush=True)

    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from ..parallel import initialize_parallel

        cfg, t = self.cfg, self.cfg.train
        recipe = cfg.recipe
        self.save_dir = cfg.checkpoint.save_dir
        self.ckpt_root = os.path.join(self.save_dir, "checkpoints")
        meta = self.init_meta = self._read_init_metadata()
        mc = cfg.model if cfg.model is not None else (meta and meta.get_model_config())
        if cfg.model is not None and meta is not None and cfg.model.to_dict() != meta.get_model_config().to_dict():
            raise TrainingError(
                f"the model section differs from the architecture of {cfg.checkpoint.init_from}; "
                "leave 'model' out when starting from a checkpoint"
            )
        if mc is None:
            raise TrainingError("no model: give a 'model' section or checkpoint.init_from")
        if t.seq_len > mc.max_seq_len:
            raise TrainingError(f"train.seq_len {t.seq_len} exceeds model.max_seq_len {mc.max_seq_len}")
        self.model_config = mc
        self.curriculum = recipe.curriculum()
        for s, b in self.curriculum.changes(t.steps):
            if recipe.dual and t.seq_len % b != 0:
                raise TrainingError(
                    f"train.seq_len {t.seq_len} is not divisible by block size {b} (reached at step {s})"
                )
        self.mask_token_id = recipe.mask_token_id
        if self.mask_token_id is None and meta is not None and meta.mask_token is not None:
            self.mask_token_id = int(meta.mask_token["id"])
        if recipe.name != "ar" and self.mask_token_id is None:
            raise TrainingError(
                f"recipe {recipe.name!r} needs a mask token: set recipe.mask_token_id or start from a "
                "checkpoint whose nbdiff.json names one"
            )
        if self.mask_token_id is not None and not 0 <= self.mask_token_id < mc.vocab_size:
            raise TrainingError(
                f"mask token id {self.mask_token_id} is outside the vocabulary (size {mc.vocab_size})"
            )
        tok = self._data_tokenizer()
        if tok.eod_id is None:
            raise TrainingError(f"tokenizer {tok.path} has no end-of-document (eos) token")
        if tok.vocab_size > mc.vocab_size:
            raise TrainingError(
                f"tokenizer {tok.path} has {tok.vocab_size} tokens but the model's vocabulary has "
                f"{mc.vocab_size} rows"
            )
        self.eod_id = int(tok.eod_id)
        # parallel state
        initialize_parallel(t.tp, t.pp, seed=t.seed)
        self.rank = dist.get_rank()
        self.dp = ps.get_data_parallel_world_size()
        self.dp_rank = ps.get_data_parallel_rank()
        if t.global_batch_size % (t.micro_batch_size * self.dp) != 0:
            raise TrainingError(
                f"train.global_batch_size {t.global_batch_size} is not divisible by micro_batch_size "
                f"{t.micro_batch_size} x data-parallel size {self.dp}"
            )
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.first_stage = ps.is_pipeline_first_stage()
        self.last_stage = ps.is_pipeline_last_stage()
        self.tp = t.tp
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        dtype = t.dtype if t.dtype != "auto" else ("bf16" if self.cuda else "fp32")
        self.dtype = dtype
        # data (built before the model: bad data fails fast)
        cache = cfg.data.cache_dir or os.path.join(self.save_dir, "data_cache")
        os.makedirs(cache, exist_ok=True)
        if self.rank == 0:
            self.train_ds, self.valid_ds = build_datasets(cfg, self.eod_id, mc.vocab_size, cache)
        dist.barrier()
        if self.rank != 0:
            self.train_ds, self.valid_ds = build_datasets(cfg, self.eod_id, mc.vocab_size, cache)
        self._build_model_and_optimizer()
        self.start_step = self._resume_or_init()

    def _read_init_metadata(self):
        src = self.cfg.checkpoint.init_from
        if src is None:
            return None
        from ..checkpoint.errors import ConversionError
        from ..checkpoint.metadata import read_metadata

        try:
            return read_metadata(src, kind="megatron")
        except ConversionError as exc:
            raise TrainingError(f"checkpoint.init_from: {exc}") from None

    def _data_tokenizer(self):
        """The tokenizer the data was made with: data.tokenizer, else the init checkpoint's."""
        from ..data.tokenizer import Tokenizer, TokenizerError

        if self.cfg.data.tokenizer is not None:
            return Tokenizer(self.cfg.data.tokenizer)
        if self.cfg.checkpoint.init_from:
            try:
                return Tokenizer(self.cfg.checkpoint.init_from)
            except TokenizerError:
                pass
        raise TrainingError(
            "cannot tell the end-of-document token: set data.tokenizer (the tokenizer used by "
            "tools/preprocess_data.py)"
        )

    def _build_model_and_optimizer(self) -> None:
        from megatron.core.distributed import (
            DistributedDataParallel,
            DistributedDataParallelConfig,
            finalize_model_grads,
        )
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        from ..models import NBDiffModel

        t = self.cfg.train
        mc = self.model_config
        tc = mc.transformer_config(
            tp=t.tp, pp=t.pp, dtype=self.dtype, sequence_parallel=t.sequence_parallel
        )
        tc.finalize_model_grads_func = finalize_model_grads
        torch.manual_seed(t.seed)
        model = NBDiffModel(
            mc, tc, pre_process=self.first_stage, post_process=self.last_stage, parallel_output=True
        )
        if self.cuda:
            model.cuda(torch.cuda.current_device())
        if self.dtype == "bf16":
            from megatron.core.transformer.module import Float16Module

            model = Float16Module(tc, model)
        use_dist_opt = self.cuda
        ddp_cfg = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_dist_opt,
            overlap_grad_reduce=False, average_in_collective=True,
        )
        self.model = DistributedDataParallel(tc, ddp_cfg, model)
        self.inner = model.module if hasattr(model, "module") and self.dtype == "bf16" else model
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
            adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2, adam_eps=t.adam_eps,
            clip_grad=t.clip_grad, bf16=self.dtype == "bf16", params_dtype=tc.params_dtype,
            use_distributed_optimizer=use_dist_opt,
        )
        with compat.cpu_device_mode():
            self.optimizer = get_megatron_optimizer(opt_cfg, [self.model])
        decay_style = {"cosine": "cosine", "wsd": "WSD", "constant": "constant"}[t.lr_schedule]
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=t.lr, min_lr=t.min_lr,
            lr_warmup_steps=t.warmup_steps, lr_decay_steps=max(t.steps, t.warmup_steps + 1),
            lr_decay_style=decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
            wd_incr_steps=t.steps, wd_incr_style="constant",
            wsd_decay_steps=t.wsd_decay_steps if decay_style == "WSD" else None,
            lr_wsd_decay_style="cosine" if decay_style == "WSD" else None,
        )
        n_local = sum(p.numel() for p in self.model.parameters())
        totals = torch.tensor([n_local], dtype=torch.float64, device=self.device)  # nccl needs device tensors
        # parameters over the model-parallel group (TP shards and PP stages)
        from megatron.core import parallel_state as ps

        dist.all_reduce(totals, group=ps.get_model_parallel_group())
        self.num_params = int(totals.item())

    # -- checkpoints ----------------------------------------------------------------------------
    def _latest(self) -> Optional[str]:
        pointer = os.path.join(self.ckpt_root, "latest")
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        path = os.path.join(self.ckpt_root, name)
        if not os.path.isfile(os.path.join(path, "trainer_state.json")):
            raise TrainingError(f"{pointer} names {name}, which is not a complete checkpoint")
        return path

    def _sharded_state(self, loading: bool = False, optimizer_format: Optional[str] = None) -> dict:
        """Model and optimizer state for dist_checkpointing. The distributed optimizer's state is
        laid out as ``optimizer_format`` (megatron-core's ``distrib_optim_sharding_type``):
        ``dp_reshardable`` (fast, resumable at another DP size) or ``fully_reshardable``
        (gathered on save, resumable at any TP/PP/DP); the plain optimizer ignores it."""
        model_sd = self.inner.sharded_state_dict()
        metadata = {
            "distrib_optim_sharding_type": optimizer_format or self.cfg.checkpoint.optimizer_format,
            "chained_optim_avoid_prefix": True,
        }
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=metadata)}

    def _materialise_optimizer_state(self) -> None:
        """Give a fresh distributed optimizer its Adam state before a checkpoint is loaded into it.

        Without Apex or Transformer Engine, megatron-core's DistributedOptimizer reads the torch
        Adam ``step`` of every parameter when it builds its state dict, and a fresh optimizer has
        none. One Adam step on zero gradients of the fp32 main parameters creates the state
        tensors; the load then overwrites all of them (and the main parameters).
        """
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            if not isinstance(opt, DistributedOptimizer) or len(opt.optimizer.state) > 0:
                continue
            inner = opt.optimizer
            for group in inner.param_groups:
                for p in group["params"]:
                    p.grad = torch.zeros_like(p)
            inner.step()
            inner.zero_grad(set_to_none=True)

    def _resume_or_init(self) -> int:
        from megatron.core import dist_checkpointing

        if self.rank == 0 and os.path.isdir(self.ckpt_root):
            # an interrupted save leaves only a .tmp directory: never a checkpoint, so drop it
            for name in os.listdir(self.ckpt_root):
                if name.endswith(".tmp"):
                    shutil.rmtree(os.path.join(self.ckpt_root, name), ignore_errors=True)
        latest = self._latest()
        if latest is not None:
            with open(os.path.join(latest, "trainer_state.json")) as f:
                state = json.load(f)
            if state["recipe"] != dataclasses.asdict(self.cfg.recipe):
                raise TrainingError(
                    f"{latest} was written by a different recipe config; resume with the same "
                    "recipe section or use a new checkpoint.save_dir"
                )
            if int(state["step"]) == 0:
                # no optimizer step yet: Adam has no moments to restore (and asking the optimizer
                # for a loading state dict would create empty ones)
                wanted = {"model": self.inner.sharded_state_dict()}
            else:
                self._materialise_optimizer_state()
                wanted = self._sharded_state(loading=True, optimizer_format=state.get("optimizer_format"))
            with compat.cpu_device_mode():
                loaded = dist_checkpointing.load(wanted, latest)
            self.inner.gpt.load_state_dict(loaded["model"])
            if "optimizer" in loaded:
                self.optimizer.load_state_dict(loaded["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self._log(f"resumed from {latest} at step {state['step']}")
            return int(state["step"])
        if self.cfg.checkpoint.init_from:
            from ..checkpoint.loader import load_weights

            load_weights(self.inner, self.cfg.checkpoint.init_from, self.init_meta)
            self._log(f"initialised from {self.cfg.checkpoint.init_from}")
        return 0

    def save(self, step: int) -> str:
        from megatron.core import dist_checkpointing

        # nothing to save of the optimizer before its first step
        state = {"model": self.inner.sharded_state_dict()} if step == 0 else self._sharded_state()
        name = f"step_{step:07d}"
        final = os.path.join(self.ckpt_root, name)
        tmp = final + ".tmp"
        if self.rank == 0:
            os.makedirs(self.ckpt_root, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        dist.barrier()
        with compat.cpu_device_mode():
            dist_checkpointing.save(state, tmp)
        dist.barrier()
        if self.rank == 0:
            record = dict(
                step=step, scheduler=self.scheduler.state_dict(),
                recipe=dataclasses.asdict(self.cfg.recipe), block_size=self.curriculum.block_size(step),
                model=self.model_config.to_dict(), mask_token_id=self.mask_token_id,
                eod_token_id=self.eod_id, config=self.cfg.to_dict(),
                optimizer_format=self.cfg.checkpoint.optimizer_format,
            )
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump(record, f, indent=1)
            self._write_checkpoint_metadata(tmp, step)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            atomic_write(os.path.join(self.ckpt_root, "latest"), name)
            kept = sorted(d for d in os.listdir(self.ckpt_root) if d.startswith("step_") and not d.endswith(".tmp"))
            for old in kept[: -self.cfg.checkpoint.keep]:
                shutil.rmtree(os.path.join(self.ckpt_root, old), ignore_errors=True)
        dist.barrier()
        self._log(f"saved {final}")
        return final

    def _write_checkpoint_metadata(self, directory: str, step: int) -> None:
        """``nbdiff.json`` for a checkpoint of a run that started from a converted or adapted
        checkpoint: the source's metadata with this run's recipe, block size, layout and step, and
        the weights in the checkpoint directory itself. Such checkpoints load with
        ``checkpoint.load_model`` and export with ``tools/convert_megatron_to_hf.py``. Runs from
        random weights have no architecture family to record and write none."""
        meta = self.init_meta
        if meta is None:
            return
        from ..checkpoint.metadata import write_metadata

        src = self.cfg.checkpoint.init_from
        block = self.curriculum.block_size(max(step - 1, 0))
        adapted = meta.updated(
            recipe=self.cfg.recipe.name, step=step, attention_layout=self.cfg.recipe.layout,
            block_size=block if self.cfg.recipe.dual else (1 if self.cfg.recipe.name == "ar" else self.cfg.train.seq_len),
            weights={"format": "torch_dist", "path": ".", "key_prefix": ""},
            dtype=self.dtype,
            source=dict(meta.source, adapted_from=os.path.abspath(src)),
        )
        write_metadata(directory, adapted)
        tokenizer_files = (meta.tokenizer or {}).get("files", [])
        for name in tokenizer_files:
            path = os.path.join(src, name)
            if os.path.isfile(path):
                shutil.copy(path, os.path.join(directory, name))

    # -- one step -----------------------------------------------------------------------------
    def _micro_batches(self, step: int, dataset, base: int) -> list:
        """This rank's micro-batches of global step ``step``: (tokens, sample_index) pairs."""
        t = self.cfg.train
        out = []
        for m in range(self.num_micro):
            first = base + m * t.micro_batch_size * self.dp + self.dp_rank * t.micro_batch_size
            idx = torch.arange(first, first + t.micro_batch_size, dtype=torch.int64)
            tokens = torch.stack([dataset[int(i) % len(dataset)]["tokens"] for i in idx])
            out.append((tokens, idx))
        return out

    def _forward_step_func(self, step: int, block_size: int):
        from ..noise import mask_tokens

        recipe = self.cfg.recipe
        # the loss sees the real vocabulary only: padding rows (which grow with TP) are excluded
        vp = dict(vocab_parallel=self.tp > 1, vocab_size=self.model_config.vocab_size)

        def forward_step(data_iterator: Iterator, model):
            tokens, sample_index = next(data_iterator)
            tokens = tokens.to(self.device)
            loss_mask = torch.ones_like(tokens)
            doc_ids = doc_ids_from_eod(tokens, self.eod_id) if recipe.pack_documents else None
            if recipe.name == "ar":
                out = model(tokens, layout="causal", doc_ids=doc_ids)
                loss_fn = lambda o: ar_loss(o.clean, tokens, loss_mask, **vp)  # noqa: E731
            elif recipe.dual and block_size == 1:
                # no masked positions at block size 1: skip the noisy stream, pure AR step
                out = model(tokens, layout="causal", doc_ids=doc_ids)
                loss_fn = lambda o: dual_stream_loss(  # noqa: E731
                    None, o.clean, tokens, None, None, loss_mask, recipe.lam, **vp)
            else:
                noise = mask_tokens(
                    tokens, block_size=block_size if recipe.dual else None,
                    mask_token_id=self.mask_token_id, seed=self.cfg.train.seed, step=step,
                    sample_index=sample_index.to(self.device), loss_mask=loss_mask,
                    t_mode=recipe.t, t_sampling=recipe.t_sampling, eps=recipe.eps,
                    weight_mode=recipe.weight,
                    validate=not self.cuda,  # the range checks would sync the host on CUDA
                )
                if recipe.dual:
                    out = model(tokens, noise.noisy_ids, layout=recipe.layout, block_size=block_size,
                                doc_ids=doc_ids)
                    loss_fn = lambda o: dual_stream_loss(  # noqa: E731
                        o.noisy, o.clean, tokens, noise.weight, noise.is_masked, loss_mask,
                        recipe.lam, **vp)
                else:
                    out = model(noisy_ids=noise.noisy_ids, layout=recipe.layout, doc_ids=doc_ids,
                                anneal_step=step, anneal_steps=recipe.anneal_steps,
                                anneal_seed=self.cfg.train.seed)
                    loss_fn = lambda o: single_stream_loss(  # noqa: E731
                        o.noisy, tokens, noise.weight, noise.is_masked, loss_mask, **vp)
            if out.hidden is not None:  # not the last pipeline stage
                return out.hidden, lambda x: (x.sum() * 0.0, {})
            parts = loss_fn(out)
            packed = torch.stack([parts.loss, parts.diffusion, parts.ar]).float()

            def loss_func(x):
                return x[0], {"parts": x.detach().clone()}

            return packed, loss_func

        return forward_step

    def _seq_length(self, block_size: int) -> int:
        L = self.cfg.train.seq_len
        dual = self.cfg.recipe.dual and block_size > 1  # block size 1 runs the clean stream only
        return 2 * L if dual else L

    def _run_batches(self, step: int, block_size: int, batches: list, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        with compat.cpu_device_mode():
            return get_forward_backward_func()(
                forward_step_func=self._forward_step_func(step, block_size),
                data_iterator=iter(batches), model=[self.model], num_microbatches=len(batches),
                seq_length=self._seq_length(block_size),
                micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only,
            )

    def _reduce_parts(self, results: list) -> torch.Tensor:
        """Mean (loss, diffusion, ar) over micro-batches and data-parallel ranks, on every rank."""
        from megatron.core import parallel_state as ps

        if self.last_stage and results:
            parts = torch.stack([r["parts"] for r in results]).mean(0).to(torch.float64).cpu()
        else:
            parts = torch.zeros(3, dtype=torch.float64)
        parts = parts.to(self.device)
        dist.all_reduce(parts, group=ps.get_data_parallel_group())
        parts /= self.dp
        # from the last pipeline stage to all stages
        dist.all_reduce(parts, group=ps.get_pipeline_model_parallel_group())
        return parts.cpu()

    def train_step(self, step: int) -> StepMetrics:
        t = self.cfg.train
        block_size = self.curriculum.block_size(step)
        start = time.time()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        batches = self._micro_batches(step, self.train_ds, step * t.global_batch_size)
        results = self._run_batches(step, block_size, batches, forward_only=False)
        parts = self._reduce_parts(results)
        finite = bool(torch.isfinite(parts).all())
        skipped = False
        grad_norm = float("nan")
        if not finite:
            if t.nan_policy == "stop":
                raise FloatingPointError(
                    f"loss is {parts[0].item()} at step {step} (block size {block_size}); stopping "
                    "(set train.nan_policy=skip to drop such steps)"
                )
            skipped = True
        else:
            with compat.cpu_device_mode():
                ok, grad_norm, _ = self.optimizer.step()
            grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
            skipped = not ok
        self.scheduler.step(1)
        seconds = time.time() - start
        tokens = t.global_batch_size * t.seq_len * (2 if self._seq_length(block_size) > t.seq_len else 1)
        tps = tokens / seconds
        mfu = self._mfu(tps, self._seq_length(block_size))
        lr = self.optimizer.param_groups[0]["lr"]
        return StepMetrics(step, float(parts[0]), float(parts[1]), float(parts[2]), block_size, lr,
                           grad_norm, tps, mfu, seconds, skipped)

    def _mfu(self, tokens_per_s: float, seq: int) -> Optional[float]:
        peak = self.cfg.train.peak_tflops
        if peak is None and self.cuda:
            peak = 989.0
        if peak is None:
            return None
        mc = self.model_config
        # 6 N per token for the matmuls, plus attention scores (12 * layers * hidden * seq / 2,
        # causal-like density), training = forward + backward
        flops_per_token = 6 * self.num_params + 6 * mc.num_layers * mc.num_attention_heads * mc.kv_channels * seq
        world = dist.get_world_size()
        return tokens_per_s * flops_per_token / (peak * 1e12 * world)

    def evaluate(self, step: int) -> Optional[dict]:
        if self.valid_ds is None or len(self.valid_ds) == 0:
            return None
        t = self.cfg.train
        block_size = self.curriculum.block_size(step)
        totals = torch.zeros(3, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for i in range(t.eval_iters):
                base = (step // max(t.eval_interval, 1)) * t.eval_iters * t.global_batch_size + i * t.global_batch_size
                batches = self._micro_batches(step, self.valid_ds, base)
                totals += self._reduce_parts(self._run_batches(step, block_size, batches, forward_only=True))
        self.model.train()
        totals /= t.eval_iters
        return dict(step=step, eval_loss=float(totals[0]), eval_diffusion=float(totals[1]),
                    eval_ar=float(totals[2]), block_size=block_size)

    # -- the loop -----------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        self._signal = signum

    def _write_metrics(self, record: dict) -> None:
        if self.rank != 0:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(key, value, record["step"])

    def run(self) -> int:
        """Train to ``train.steps``; returns the process exit code."""
        t = self.cfg.train
        self.setup()
        os.makedirs(self.save_dir, exist_ok=True)
        self.metrics_path = os.path.join(self.save_dir, "metrics.jsonl")
        self.tb = None
        if self.rank == 0:
            self.cfg.save(os.path.join(self.save_dir, "config.yaml"))
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(self.save_dir, "tensorboard"))
            except ImportError:
                self.tb = None
        old_handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        self._log(
            f"recipe {self.cfg.recipe.name} ({self.cfg.recipe.layout}), {self.num_params / 1e6:.2f}M "
            f"parameters, tp={t.tp} pp={t.pp} dp={self.dp}, {self.dtype}, steps {self.start_step}..{t.steps}"
        )
        from tqdm import tqdm

        bar = tqdm(range(self.start_step, t.steps), initial=self.start_step, total=t.steps,
                   disable=self.quiet or self.rank != 0, desc="train", dynamic_ncols=True)
        step = self.start_step
        try:
            for step in bar:
                if self.stop_after is not None and step - self.start_step >= self.stop_after:
                    return EXIT_OK
                m = self.train_step(step)
                record = dataclasses.asdict(m)
                if step % t.log_interval == 0 or step == t.steps - 1:
                    self._write_metrics(record)
                    bar.set_postfix(loss=f"{m.loss:.4f}", B=m.block_size, tok_s=f"{m.tokens_per_s:,.0f}")
                if t.eval_interval and (step + 1) % t.eval_interval == 0:
                    ev = self.evaluate(step)
                    if ev is not None:
                        self._write_metrics(ev)
                done = step + 1
                stop = self._stop_requested()
                if stop or (self.cfg.checkpoint.save_interval and done % self.cfg.checkpoint.save_interval == 0):
                    self.save(done)
                if stop:
                    self._log(f"signal received: saved at step {done}, exiting with {EXIT_SIGNAL} for requeue")
                    return EXIT_SIGNAL
            self.save(t.steps)
            if self.rank == 0:
                from .plots import plot_run

                plot_run(self.metrics_path, self.save_dir, self.curriculum, t.steps)
            return EXIT_OK
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.close()

    def _stop_requested(self) -> bool:
        """Whether any rank got SIGTERM/SIGUSR1 (all ranks agree, so all save together)."""
        flag = torch.tensor([1.0 if self._signal is not None else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)
