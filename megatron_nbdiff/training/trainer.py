"""The training loop: validate, load, step, evaluate, save, with each policy in its component
(docs/architecture.md, "The training loop and its components"): ``validation`` (every check
before any work), ``data.datasets`` (samples, micro-batches, document ids), ``recipes`` (layout,
noise, block size, forward and loss), ``step`` (the pipeline schedule, loss reduction),
``model_and_optimizer``, ``checkpointing`` (the run folder, saves that survive a kill, resume
with fallbacks), ``metrics`` (metrics.jsonl, TensorBoard, progress, plots) and ``moe_metrics``.

Data order and noise are pure functions of the step (the ``j``-th sequence of step ``s`` is
sample ``s * global_batch_size + j``, its noise keyed by (seed, s, sample)), so resuming needs no
data-loader or RNG state and any parallel layout sees the same samples with the same noise.
Exit codes (:mod:`megatron_nbdiff.cli`): 0 done, 75 saved after SIGTERM/SIGUSR1/SIGINT (requeue),
3 NaN/Inf loss, 2 bad input, 1 an OS error such as a full disk.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from ..cli import EXIT_INTERRUPTED, EXIT_OK, EXIT_REQUEUE
from ..config import RunConfig
from ..errors import TrainingError  # noqa: F401  (re-exported: the trainer's error type)
from ..parallel import all_ranks_agree
from .checkpointing import Checkpointer, RunFolder
from .metrics import MetricsLogger, StepMetrics, step_tokens, throughput
from .model_and_optimizer import build_model_and_optimizer, mfu, optimizer_step, peak_flops_per_token
from .moe_metrics import MoEMetrics
from .step import StepSettings, reduce_parts, run_micro_batches
from .validation import check_layout, check_resume, validate_job

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Trainer:
    """Builds everything from a :class:`RunConfig` and runs it (see the module docstring)."""

    def __init__(self, cfg: RunConfig, *, stop_after: Optional[int] = None, quiet: bool = False):
        self.cfg = cfg
        self.stop_after = stop_after  # tests: leave the loop after this many steps, without saving
        self.quiet = quiet
        self._signal = None
        self.folder = RunFolder(cfg.checkpoint.save_dir)

    def _log(self, msg: str) -> None:
        if not self.quiet and self.rank == 0:
            print(msg, flush=True)

    # -- set-up ------------------------------------------------------------------------------
    def setup(self) -> None:
        from megatron.core import parallel_state as ps

        from .. import compat
        from ..data.datasets import build_datasets
        from ..parallel import initialize_parallel

        cfg, t = self.cfg, self.cfg.train
        compat.install_safe_loading()
        check_layout(cfg)  # a layout the model cannot take, before the process groups
        initialize_parallel(t.tp, t.pp, seed=t.seed, cp=t.cp, ep=t.ep, vpp=t.vpp)
        self.rank = dist.get_rank()
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        cache = cfg.data.cache_dir or self.folder.data_cache
        self.plan = validate_job(cfg, cache, self.device)  # before anything is written
        self.recipe, self.model_config = self.plan.recipe, self.plan.model
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.num_micro = t.global_batch_size // (t.micro_batch_size * self.dp)
        self.last_stage = ps.is_pipeline_last_stage()
        self.dtype = t.dtype if t.dtype != "auto" else ("bf16" if self.cuda else "fp32")
        created = not os.path.isdir(self.folder.root)
        try:
            vocab = self.model_config.vocab_size
            if self.rank == 0:  # rank 0 builds megatron's index cache, the others read it
                os.makedirs(cache, exist_ok=True)
                self.train_ds, self.valid_ds = build_datasets(cfg, self.plan.eod_id, vocab, cache)
            dist.barrier()
            if self.rank != 0:
                self.train_ds, self.valid_ds = build_datasets(cfg, self.plan.eod_id, vocab, cache)
        except BaseException:
            if created and self.rank == 0:  # no run folder left by a run that never started
                shutil.rmtree(self.folder.root, ignore_errors=True)
            raise
        self.mo = build_model_and_optimizer(
            self.model_config, t, self.dtype, ps.is_pipeline_first_stage(), self.last_stage,
            ps.get_model_parallel_group(), self.device)
        self.model, self.inner, self.optimizer, self.scheduler, self.num_params = (
            self.mo.model, self.mo.inner, self.mo.optimizer, self.mo.scheduler, self.mo.num_params)
        self.moe = MoEMetrics.attach(self.inner, self.model_config, t, self.device)
        self.settings = StepSettings(
            recipe=self.recipe, seed=t.seed, mask_token_id=self.plan.mask_token_id, eod_id=self.plan.eod_id,
            seq_len=t.seq_len, micro_batch_size=t.micro_batch_size, device=self.device,
            loss_kwargs=dict(tp_group=ps.get_tensor_model_parallel_group() if t.tp > 1 else None,
                             vocab_size=self.model_config.vocab_size),
            validate_noise=not self.cuda, cp=t.cp)
        self.checkpointer = Checkpointer(self.folder, cfg.checkpoint.keep, self.rank, dist.barrier, self._log)
        self.start_step = self._resume_or_init()

    def _resume_or_init(self) -> int:
        self.checkpointer.prepare()

        def load(path: str, record: dict) -> None:
            check_resume(record, self.cfg, self.model_config, path)
            self.mo.load_checkpoint(path, record)

        record = self.checkpointer.load_first(load, lambda ok: all_ranks_agree(ok, self.device))
        if record is not None:
            self._log(f"resumed from step {record['step']}")
            return int(record["step"])
        if self.cfg.checkpoint.init_from:
            from ..checkpoint.loader import load_weights

            load_weights(self.inner, self.cfg.checkpoint.init_from, self.plan.init_meta)
            self._log(f"initialised from {self.cfg.checkpoint.init_from}")
        return 0

    def save(self, step: int) -> str:
        from .checkpoint_record import checkpoint_record, write_checkpoint_metadata

        return self.checkpointer.save(
            step, lambda: self.mo.sharded_state(self.cfg.checkpoint.optimizer_format, with_optimizer=step > 0),
            checkpoint_record(self, step), lambda d: write_checkpoint_metadata(self, d, step))

    # -- one step ----------------------------------------------------------------------------
    def _batches(self, dataset, base: int) -> list:
        from ..data.datasets import micro_batches

        return micro_batches(dataset, base, self.num_micro, self.cfg.train.micro_batch_size, self.dp, self.dp_rank)

    def _parts(self, step: int, block_size: int, batches: list, forward_only: bool) -> torch.Tensor:
        from megatron.core import parallel_state as ps

        results = run_micro_batches(self.settings, self.model, step, block_size, batches, forward_only)
        return reduce_parts(results, self.last_stage, ps.get_data_parallel_group(with_context_parallel=True),
                            ps.get_pipeline_model_parallel_group(), self.dp, self.device)

    def train_step(self, step: int) -> StepMetrics:
        t = self.cfg.train
        block_size = self.recipe.block_size(step)
        start = time.time()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        parts = self._parts(step, block_size, self._batches(self.train_ds, step * t.global_batch_size), False)
        skipped, grad_norm = True, float("nan")
        if not bool(torch.isfinite(parts).all()):
            if t.nan_policy == "stop":
                raise FloatingPointError(f"loss is {parts[0].item()} at step {step} (block size {block_size}); "
                                         "stopping (set train.nan_policy=skip to drop such steps)")
        else:
            ok, grad_norm = optimizer_step(self.optimizer)
            skipped = not ok
        self.scheduler.step(1)
        seconds = time.time() - start
        seq = self.recipe.stream_length(t.seq_len, block_size)
        tps = throughput(step_tokens(t.global_batch_size, seq), seconds)
        util = mfu(tps, peak_flops_per_token(self.num_params, self.model_config, seq), t.peak_tflops,
                   dist.get_world_size())
        return StepMetrics(step, float(parts[0]), float(parts[1]), float(parts[2]), block_size,
                           self.optimizer.param_groups[0]["lr"], grad_norm, tps, util, seconds, skipped,
                           self.moe.collect(self.num_micro, self.recipe.streams(block_size)))

    def evaluate(self, step: int) -> Optional[dict]:
        if self.valid_ds is None or len(self.valid_ds) == 0:
            return None
        t = self.cfg.train
        block_size = self.recipe.block_size(step)
        totals = torch.zeros(3, dtype=torch.float64)
        self.model.eval()
        with torch.no_grad():
            for i in range(t.eval_iters):
                base = (step // max(t.eval_interval, 1)) * t.eval_iters * t.global_batch_size + i * t.global_batch_size
                totals += self._parts(step, block_size, self._batches(self.valid_ds, base), True)
        self.model.train()
        totals /= t.eval_iters
        return dict(step=step, eval_loss=float(totals[0]), eval_diffusion=float(totals[1]),
                    eval_ar=float(totals[2]), block_size=block_size)

    # -- the loop ----------------------------------------------------------------------------
    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self._signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        self._signal = signum

    def _stop_requested(self) -> bool:
        """Whether any rank got a stop signal (all ranks agree, so all save together)."""
        return not all_ranks_agree(self._signal is None, self.device)

    def run(self) -> int:
        """Train to ``train.steps``; returns the process exit code."""
        t = self.cfg.train
        old_handlers = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        try:
            self.setup()
            if self.rank == 0:
                self.cfg.save(self.folder.config)
            if t.eval_interval and (self.valid_ds is None or len(self.valid_ds) == 0) and self.rank == 0:
                warnings.warn(f"no validation samples in data.split {self.cfg.data.split!r}: evaluation is off")
            self._log(f"recipe {self.recipe.name} ({self.recipe.layout}), {self.num_params / 1e6:.2f}M parameters, "
                      f"tp={t.tp} pp={t.pp} cp={t.cp} ep={t.ep} dp={self.dp}, {self.dtype}, "
                      f"steps {self.start_step}..{t.steps}")
            self.metrics = MetricsLogger(self.folder, self.rank, self.quiet, self.start_step, t.steps)
            return self._loop()
        finally:
            for s, h in old_handlers.items():
                signal.signal(s, h)
            if getattr(self, "metrics", None) is not None:
                self.metrics.close()

    def _loop(self) -> int:
        t, ck = self.cfg.train, self.cfg.checkpoint
        ran = skipped = 0
        for step in range(self.start_step, t.steps):
            if self.stop_after is not None and step - self.start_step >= self.stop_after:
                return EXIT_OK
            if step == self.start_step and self._stop_requested():  # a signal during set-up
                return self._stop(step)
            m = self.train_step(step)
            ran, skipped = ran + 1, skipped + m.skipped
            self.metrics.step(m.record(), step % t.log_interval == 0 or step == t.steps - 1)
            if t.eval_interval and (step + 1) % t.eval_interval == 0:
                ev = self.evaluate(step)
                if ev is not None:
                    self.metrics.write(ev)
            stop = self._stop_requested()
            if stop or (ck.save_interval and (step + 1) % ck.save_interval == 0):
                self.save(step + 1)
            if stop:
                return self._stop(step + 1, saved=True)
        if ran and skipped == ran:
            raise FloatingPointError(f"every step of this run ({ran}) had a non-finite loss and was skipped")
        self.save(t.steps)
        self.metrics.plot(self.recipe.curriculum, t.steps)
        return EXIT_OK

    def _stop(self, step: int, saved: bool = False) -> int:
        if not saved and step > self.start_step:
            self.save(step)
            saved = True
        name = signal.Signals(self._signal).name if self._signal else "a signal"
        if saved:
            self._log(f"{name} received: saved at step {step}, exiting with {EXIT_REQUEUE} for requeue")
            return EXIT_REQUEUE
        self._log(f"{name} received before any step: nothing to save")
        return EXIT_INTERRUPTED if self._signal == signal.SIGINT else EXIT_REQUEUE
