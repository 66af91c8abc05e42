"""RMSNorm for the local (non-Transformer-Engine) layer spec.

megatron-core's local spec falls back to ``WrappedTorchNorm`` without Apex, which refuses
sequence parallelism. Under sequence parallelism a residual-stream norm sees only this rank's
slice of the sequence, so its weight gradient is partial: megatron's gradient finalisation sums
such gradients over the tensor-parallel group when the parameter carries
``sequence_parallel=True``. This class is torch's RMSNorm plus that marking; norms applied to
queries and keys (after the sequence all-gather) are not marked.
"""
from __future__ import annotations

import torch


class RMSNorm(torch.nn.RMSNorm):
    def __init__(self, config, hidden_size: int, eps: float = 1e-6, for_qk: bool = False, **_):
        super().__init__(hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel and not for_qk)


class QKRMSNorm(RMSNorm):
    """RMSNorm over one head's channels of queries or keys (Qwen3's q/k norm)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **kwargs):
        kwargs.pop("for_qk", None)
        super().__init__(config, hidden_size, eps=eps, for_qk=True)
