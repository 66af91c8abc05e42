"""The smallest shim that lets megatron-core 0.16.1 run on CPU with gloo.

megatron-core assumes a CUDA device in a few places that matter for forward, backward and its
parallel pieces:

1. ``torch.cuda.current_device()`` as a ``device=`` argument (rotary embeddings, pipeline p2p
   shape exchange, buffers). On a CPU-only build it raises. Shim: return ``"cpu"``.
2. ``torch.cuda.synchronize()`` in the pipeline p2p code. Shim: no-op.
3. The pipeline schedules create tensors with the literal ``device="cuda"``. Shim: a
   :class:`torch.overrides.TorchFunctionMode` that rewrites CUDA ``device`` arguments to CPU,
   entered only around the schedule call (:func:`cpu_device_mode`).
4. The (non-distributed) optimizer's gradient clipping asserts ``torch.cuda.FloatTensor``
   gradients. Shim: the same clipping (scale every fp32 gradient by ``max_norm / (norm + 1e-6)``
   when below 1) without the device assert. megatron's distributed optimizer requires CUDA
   parameters outright; on CPU the training loop uses the non-distributed one.
5. Sequence-parallel embedding dropout forks megatron's CUDA RNG tracker, which cannot seed
   without CUDA. Shim: :func:`seed_model_parallel_rng` registers the same named states (same
   seeds as ``model_parallel_cuda_manual_seed``) in a tracker that forks the CPU generator.
6. With tied embeddings at PP>1, megatron-core's ``setup_embeddings_and_output_layer`` calls
   ``weight.data.cuda()`` before all-reducing the stages' copies. Shim: ``Tensor.cuda`` returns
   the tensor itself (on a CPU-only build it could only raise).
7. Activation recomputation (``tensor_parallel.checkpoint``, ``CheckpointWithoutOutput``) saves and
   restores the CPU generator, the CUDA generator and megatron's RNG tracker around the replayed
   forward; reading the CUDA generator raises without CUDA. Shim: the same save and restore
   without the CUDA generator (``_get_all_rng_states`` / ``_set_all_rng_states`` of
   ``megatron.core.tensor_parallel.random``).

The CPU shims are inactive when CUDA is present: :func:`install` installs no shim and
:func:`cpu_device_mode` is a null context.

Mixture-of-experts layers need two more: 8 is keyed on Transformer Engine rather than on CUDA,
9 is a CPU shim like 1-7 (inactive when CUDA is present):

8. megatron-core 0.16.1's ``moe/moe_utils.py`` imports ``te_general_gemm`` inside a
   ``try: import transformer_engine`` block, and its router's gating linear
   (``RouterGatingLinearFunction``) tests ``te_general_gemm is not None`` unguarded: without TE
   the name is undefined and every MoE forward raises ``NameError``. Shim
   (:func:`install_moe_without_te`): define the name as None in that module when TE did not
   import, so the router takes its own torch path (``torch.mm`` in the router dtype). Where TE
   imports (the GPU stack) the name exists and nothing is changed; a CUDA host without TE has the
   same bug, so this one is not limited to CPU.

9. The ``alltoall`` token dispatcher (``MoEAlltoAllTokenDispatcher``, ``train.moe_dispatcher``)
   creates a CUDA side stream in its constructor and, at one point of every dispatch, copies its
   split sizes (tokens sent to and received from each EP rank, ``input_splits``,
   ``output_splits``, ``output_splits_tp``) to the host on that stream as numpy arrays, then
   waits for an event (``_maybe_dtoh_and_synchronize``). Without CUDA the constructor raises.
   Shim (:func:`install_alltoall_without_cuda`, a CPU shim): the class's stream slot holds a
   placeholder, so no stream is created, and the copy point only turns the (already host) split
   tensors into numpy arrays, the types the dispatcher's collectives receive on a GPU; there is
   nothing to wait for. The dispatch itself (permutation, ``all_to_all_single``, chunk sorting)
   is megatron's, and gloo has the all-to-all.

megatron-core's MoE otherwise runs on CPU as it is: the router's ``gating`` moves its weight to
``torch.cuda.current_device()`` (shim 1 makes that the CPU), the ``allgather`` token dispatcher
and ``SequentialMLP`` experts use plain torch ops and collectives that gloo has.

Safe loading (:func:`install_safe_loading`, active with and without CUDA; :func:`install` calls
it, and so do the checkpoint loader, the converters and the tools). No code path may unpickle a
file the user did not create in this run, because unpickling can run any code the file names.
megatron-core and torch unpickle in four places when they read a checkpoint or a data cache; each
is given a restricted reader by replacing one module-level name *as seen by that module only*
(the rest of the process keeps the real ``torch``, ``numpy`` and ``pickle``):

a. ``megatron.core.dist_checkpointing.strategies.common`` loads ``common.pt`` (and sharded
   objects' ``.pt`` files) with ``torch.load`` without ``weights_only``: forced to
   ``weights_only=True`` (tensors, containers, plain data and the classes megatron-core
   registers as safe).
b. ``torch.distributed.checkpoint.default_planner`` loads every non-tensor item of a
   ``torch_dist`` checkpoint with ``torch.load(..., weights_only=False)``: forced to ``True``.
c. ``torch.distributed.checkpoint.filesystem`` reads the checkpoint's ``.metadata`` with
   ``pickle.load``: replaced by an unpickler that only builds torch's checkpoint-metadata
   dataclasses and enums, ``torch.Size``, dtypes, layouts and paths.
d. megatron-core's ``GPTDataset``, ``BlendedDataset`` and ``MaskedWordPieceDataset`` load their
   ``data_cache/*.npy`` indices with ``numpy.load(..., allow_pickle=True)``: forced to
   ``allow_pickle=False`` (the indices are integer arrays).

A refused file raises :class:`~megatron_nbdiff.errors.CheckpointError` (a, b, c) or
:class:`~megatron_nbdiff.errors.DataError` (d) naming the file and what it asked to run.

Writer processes (:func:`no_orphan_writers`, called before every training checkpoint save):
megatron-core's ``torch_dist`` writer processes can no longer outlive a killed trainer.
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import importlib
import os
import pickle
import re

import torch
from torch.overrides import TorchFunctionMode

from .errors import CheckpointError, DataError

_installed = False
_safe_loading = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


def _cpu_current_device() -> str:
    return "cpu"


def _no_sync(*args, **kwargs) -> None:
    return None


def install() -> bool:
    """Install safe loading (always) and, when there is no CUDA, the CPU shims. Idempotent.
    Returns whether the CPU shims are active."""
    global _installed
    install_safe_loading()
    install_moe_without_te()
    if cuda_present():
        return False
    if not _installed:
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _no_sync
        from megatron.core.optimizer import optimizer as moptimizer

        moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
        torch.Tensor.cuda = _tensor_stays_on_cpu
        from megatron.core.tensor_parallel import random as mrandom

        mrandom._get_all_rng_states = _rng_states_without_cuda
        mrandom._set_all_rng_states = _set_rng_states_without_cuda
        install_alltoall_without_cuda()
        _installed = True
    return True


def _rng_states_without_cuda():
    """Shim 7: megatron's ``(cpu state, cuda state, tracker states)`` with no CUDA state."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return torch.get_rng_state(), None, get_cuda_rng_tracker().get_states()


def _set_rng_states_without_cuda(cpu_rng_state, cuda_rng_state, tracker_states) -> None:
    """Shim 7: restore what :func:`_rng_states_without_cuda` saved."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    torch.set_rng_state(cpu_rng_state)
    get_cuda_rng_tracker().set_states(tracker_states)


def install_moe_without_te() -> bool:
    """Shim 8: ``te_general_gemm = None`` in megatron's ``moe_utils`` when Transformer Engine did
    not import there (the name is then undefined and the router raises ``NameError``).
    Idempotent; returns whether the name had to be defined."""
    from megatron.core.transformer.moe import moe_utils

    if getattr(moe_utils, "HAVE_TE", True) or hasattr(moe_utils, "te_general_gemm"):
        return False
    moe_utils.te_general_gemm = None
    return True


_NO_DTOH_STREAM = object()
"""Shim 9: what the alltoall dispatcher's CUDA side-stream slot holds without CUDA."""


def install_alltoall_without_cuda() -> None:
    """Shim 9: megatron's ``alltoall`` token dispatcher without a CUDA side stream. A CPU shim:
    :func:`install` calls it only when CUDA is absent. Idempotent."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _NO_DTOH_STREAM
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _alltoall_splits_to_host


def _alltoall_splits_to_host(self, point, tokens_per_expert=None):
    """Shim 9: ``MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize`` on the host. At the
    dispatcher's copy point its split sizes become numpy arrays, as megatron's copy makes them;
    the other values it copies (token counts) stay host tensors, as megatron's copy leaves a host
    tensor. No stream, no event. Dispatchers that pad to capacity copy nothing (as megatron)."""
    if not self.drop_and_pad and point == self.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(self, name)
            if torch.is_tensor(value):
                setattr(self, name, value.numpy())
    return tokens_per_expert


def _tensor_stays_on_cpu(self, *args, **kwargs):
    """Shim 6: ``Tensor.cuda`` without CUDA keeps the tensor where it is."""
    return self


def _clip_grad_by_total_norm_fp32_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Shim 4: megatron's clip-by-total-norm without its CUDA tensor-type assert."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr).detach() for p in parameters if getattr(p, attr, None) is not None]
    for g in grads:
        if g.dtype != torch.float32:
            raise TypeError(f"gradient clipping expects fp32 gradients, found {g.dtype}")
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, int) and not isinstance(device, bool)


class _CpuRNGStatesTracker:
    """megatron's RNG tracker interface over the CPU generator (shim 5)."""

    def __init__(self):
        self.states_ = {}

    def is_initialized(self) -> bool:
        return bool(self.states_)

    def reset(self) -> None:
        self.states_ = {}

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states) -> None:
        self.states_ = dict(states)

    def add(self, name: str, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.states_[name] = g.get_state()

    @contextlib.contextmanager
    def fork(self, name: str = "model-parallel-rng"):
        if name not in self.states_:
            raise RuntimeError(f"RNG state {name!r} was not added; call seed_model_parallel_rng first")
        saved = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(saved)


def seed_model_parallel_rng(seed: int, tp_rank: int) -> None:
    """Register megatron's named RNG states (CUDA: its own function; CPU: shim 5)."""
    from megatron.core.tensor_parallel import random as mrandom

    if cuda_present():
        mrandom.model_parallel_cuda_manual_seed(seed)
        return
    tracker = _CpuRNGStatesTracker()
    tracker.add(mrandom._DATA_PARALLEL_RNG_TRACKER_NAME, seed)
    tracker.add(mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + tp_rank)
    tracker.add(mrandom._EXPERT_PARALLEL_RNG_TRACKER_NAME, seed + 2718 + 100 * tp_rank + 1)
    mrandom._CUDA_RNG_STATE_TRACKER = tracker
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


class _CudaToCpu(TorchFunctionMode):
    """Rewrites ``device=<cuda>`` keyword arguments of torch calls to ``"cpu"``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        return func(*args, **kwargs)


def cpu_device_mode():
    """Context for megatron-core code that names ``device="cuda"`` literally (pipeline schedules).

    A null context when CUDA is present.
    """
    if cuda_present():
        return contextlib.nullcontext()
    install()
    return _CudaToCpu()


# -- safe loading of untrusted files ----------------------------------------------------------

class _Shadow:
    """A module as one other module sees it: the same attributes, some functions replaced."""

    def __init__(self, module, **replacements):
        self.__dict__["_module"] = module
        self.__dict__.update(replacements)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _source_name(f, default: str) -> str:
    name = getattr(f, "name", None) if not isinstance(f, (str, bytes)) else f
    return str(name) if name else default


def _refused_global(exc: BaseException) -> str:
    """What a refused pickle asked for, from the unpickler's message (``builtins.open``)."""
    m = re.search(r"GLOBAL (\S+) was not an allowed global", str(exc)) or \
        re.search(r"global (\S+) is not allowed", str(exc))
    return f"it names {m.group(1)}, " if m else ""


def _torch_load_weights_only(f, *args, **kwargs):
    """``torch.load`` that only rebuilds tensors and plain data (a and b above)."""
    kwargs["weights_only"] = True
    kwargs.pop("pickle_module", None)
    try:
        return torch.load(f, *args, **kwargs)
    except pickle.UnpicklingError as exc:
        what = _source_name(f, "an object stored in the checkpoint")
        raise CheckpointError(
            f"{what}: refused to unpickle: {_refused_global(exc)}which is neither a tensor nor plain "
            "data and could run code; load only checkpoints written by megatron_nbdiff / megatron-core"
        ) from None


def _numpy_load_no_pickle(file, mmap_mode=None, allow_pickle=False, *args, **kwargs):
    """``numpy.load`` with ``allow_pickle=False`` whatever the caller asked (d above)."""
    import numpy

    try:
        return numpy.load(file, mmap_mode, False, *args, **kwargs)
    except ValueError as exc:
        text = str(exc)
        if "pickle" in text or "Python objects" in text:
            raise DataError(
                f"{file}: refused to load: it holds pickled Python objects, which could run code "
                "(megatron's dataset cache holds integer arrays only); delete the data cache folder "
                "and it is rebuilt"
            ) from None
        raise


_METADATA_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
    "megatron.core.dist_checkpointing.strategies.torch",
)
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"),
                     # torch's own writer records the checkpoint id as a path
                     ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                     ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


def metadata_global_allowed(module: str, name: str) -> bool:
    """Whether a torch_dist ``.metadata`` pickle may name ``module.name``: torch's (and
    megatron's) checkpoint-metadata dataclasses and enums, ``torch.Size``, dtypes, layouts."""
    if (module, name) in _METADATA_GLOBALS:
        return True
    if module == "torch":
        return isinstance(getattr(torch, name, None), torch.dtype)
    if module in _METADATA_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return (isinstance(obj, type) and obj.__module__ == module
                and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)))
    return False


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if metadata_global_allowed(module, name):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _pickle_load_metadata(file, **kwargs):
    """``pickle.load`` of a torch_dist ``.metadata`` file through :class:`_MetadataUnpickler`."""
    what = _source_name(file, "the checkpoint's .metadata")
    try:
        return _MetadataUnpickler(file).load()
    except pickle.UnpicklingError as exc:
        if "is not allowed" in str(exc):
            raise CheckpointError(
                f"{what}: refused to unpickle: {_refused_global(exc)}which is not checkpoint "
                "metadata and could run code; load only checkpoints written by megatron_nbdiff / "
                "megatron-core"
            ) from None
        raise CheckpointError(f"{what}: truncated or corrupt checkpoint metadata ({exc})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise CheckpointError(
            f"{what}: truncated or corrupt checkpoint metadata ({type(exc).__name__}: {exc})"
        ) from None


def install_safe_loading() -> None:
    """Give megatron-core's and torch's checkpoint and data-cache readers restricted loaders
    (module docstring, a-d). Idempotent; active with and without CUDA."""
    global _safe_loading
    if _safe_loading:
        return
    import numpy
    from megatron.core.dist_checkpointing.strategies import common as mcommon
    from torch.distributed.checkpoint import default_planner, filesystem

    safe_torch = _Shadow(torch, load=_torch_load_weights_only)
    mcommon.torch = safe_torch
    default_planner.torch = safe_torch
    filesystem.pickle = _Shadow(pickle, load=_pickle_load_metadata)
    for name in ("gpt_dataset", "blended_dataset", "masked_dataset"):
        try:
            module = importlib.import_module(f"megatron.core.datasets.{name}")
        except ImportError:  # an optional dependency of that dataset is missing: nothing loads it
            continue
        module.numpy = _Shadow(numpy, load=_numpy_load_no_pickle)
    _safe_loading = True


# -- checkpoint writer processes ------------------------------------------------------------
_writers_guarded = False


def no_orphan_writers() -> None:
    """Make megatron's checkpoint writers unable to outlive this process (idempotent).

    megatron-core's ``torch_dist`` save forks one writer process per bucket and collects their
    results through a ``multiprocessing.Manager`` queue, a server process (about 330 MB) that
    lives until the trainer exits normally. A ``kill -9`` of the trainer left both behind, some of
    them deadlocked. Here the result queue is an in-process ``queue.Queue`` (saves are synchronous:
    the collecting function runs in this process), and every child forked from now on asks the
    kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``)."""
    global _writers_guarded
    if _writers_guarded:
        return
    import ctypes
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    results: queue.Queue = queue.Queue()
    filesystem_async._get_write_results_queue = lambda: results
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        libc = None

    def _die_with_parent() -> None:
        if libc is not None:
            libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL

    os.register_at_fork(after_in_child=_die_with_parent)
    _writers_guarded = True
