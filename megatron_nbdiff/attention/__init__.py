"""Block-diffusion attention: layout predicates, dense and FlexAttention masks, core attention."""
from .masks import (
    DUAL_LAYOUTS,
    LAYOUTS,
    MaskSpec,
    allowed,
    check_layout,
    dense_allowed,
    dense_allowed_from_spec,
    is_dual,
    megatron_mask,
)

__all__ = [
    "DUAL_LAYOUTS",
    "LAYOUTS",
    "MaskSpec",
    "allowed",
    "check_layout",
    "dense_allowed",
    "dense_allowed_from_spec",
    "is_dual",
    "megatron_mask",
]
