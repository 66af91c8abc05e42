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

Everything here is inactive when CUDA is present: :func:`install` does nothing and
:func:`cpu_device_mode` is a null context.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

_installed = False


def cuda_present() -> bool:
    return torch.cuda.is_available()


def _cpu_current_device() -> str:
    return "cpu"


def _no_sync(*args, **kwargs) -> None:
    return None


def install() -> bool:
    """Install shims 1 and 2 when there is no CUDA. Idempotent. Returns whether it is active."""
    global _installed
    if cuda_present():
        return False
    if not _installed:
        torch.cuda.current_device = _cpu_current_device
        torch.cuda.synchronize = _no_sync
        from megatron.core.optimizer import optimizer as moptimizer

        moptimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu
        torch.Tensor.cuda = _tensor_stays_on_cpu
        _installed = True
    return True


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
