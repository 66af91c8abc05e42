"""Training: recipes (as objects), losses, the block-size curriculum and a small loop with its
components (validation, step, model and optimizer, checkpointing, metrics)."""
from .curriculum import BlockCurriculum
from .losses import LossParts, ar_loss, dual_stream_loss, single_stream_loss, token_cross_entropy
from .recipes import Recipe, StepContext, register_recipe, resolve_recipe

__all__ = [
    "BlockCurriculum",
    "LossParts",
    "Recipe",
    "StepContext",
    "ar_loss",
    "dual_stream_loss",
    "register_recipe",
    "resolve_recipe",
    "single_stream_loss",
    "token_cross_entropy",
]
