"""Losses and the block-size curriculum of the adaptation recipes."""
from .curriculum import BlockCurriculum
from .losses import LossParts, ar_loss, dual_stream_loss, single_stream_loss, token_cross_entropy

__all__ = [
    "BlockCurriculum",
    "LossParts",
    "ar_loss",
    "dual_stream_loss",
    "single_stream_loss",
    "token_cross_entropy",
]
