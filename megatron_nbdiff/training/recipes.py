"""Named adaptation recipes (METHOD.md sections 1 and 2).

=============  =====================  ========  ======================  ============  ==========
recipe         attention layout       lambda    block size              t             weight
=============  =====================  ========  ======================  ============  ==========
nbdiff         dual_context_causal    0.5       curriculum 1 -> 32      per block     1
transplant     dual_context_causal    0         fixed 32                per block     1
block_causal   dual_block_causal      0.5       curriculum 1 -> 32      per block     1
diffullama     single_annealed        -         whole sequence          per sequence  1/t
ar             causal                 -         -                       -             -
=============  =====================  ========  ======================  ============  ==========

``block_causal`` is NBDiff with the BD3-LM clean-stream mask (METHOD.md Table 1's ablation).
Every default can be overridden in the config's ``recipe`` section.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from .curriculum import BlockCurriculum

RECIPE_NAMES = ("nbdiff", "transplant", "block_causal", "diffullama", "ar")

_DEFAULTS = {
    "nbdiff": dict(layout="dual_context_causal", ar_weight=0.5, block_start=1, weight_mode="one",
                   t_mode="per_block"),
    "transplant": dict(layout="dual_context_causal", ar_weight=0.0, block_start=32,
                       weight_mode="one", t_mode="per_block"),
    "block_causal": dict(layout="dual_block_causal", ar_weight=0.5, block_start=1,
                         weight_mode="one", t_mode="per_block"),
    "diffullama": dict(layout="single_annealed", ar_weight=0.0, block_start=1, weight_mode="inv_t",
                       t_mode="per_sequence"),
    "ar": dict(layout="causal", ar_weight=1.0, block_start=1, weight_mode="one", t_mode="per_block"),
}


@dataclasses.dataclass
class RecipeConfig:
    """Which recipe, and any departures from its defaults (None = the recipe's default)."""

    name: str = "nbdiff"
    """One of nbdiff, transplant, block_causal, diffullama, ar."""
    ar_weight: Optional[float] = None
    """lambda, the weight of the clean-stream AR loss (dual recipes)."""
    block_size: Optional[int] = None
    """Fixed block size; None means the recipe's curriculum (nbdiff, block_causal) or 32."""
    block_max: int = 32
    """Curriculum target B_max."""
    block_factor: int = 2
    """Curriculum growth factor r."""
    block_interval: int = 500
    """Curriculum steps per growth D."""
    block_offset: int = 0
    """Curriculum start step s_0."""
    anneal_steps: int = 1000
    """DiffuLLaMA attention-mask annealing length K (0: bidirectional from the start)."""
    weight_mode: Optional[str] = None
    """Diffusion loss weight per masked token: 'one' or 'inv_t'."""
    t_mode: Optional[str] = None
    """'per_block' or 'per_sequence'."""
    t_sampling: str = "uniform"
    """'uniform', 'antithetic' or 'stratified'."""
    eps: float = 1e-3
    """Lower end of t ~ U(eps, 1)."""
    mask_token_id: Optional[int] = None
    """Mask token id; None takes it from the checkpoint's nbdiff.json."""
    pack_documents: bool = True
    """Restrict attention to document boundaries inside packed sequences."""

    def __post_init__(self):
        if self.name not in RECIPE_NAMES:
            raise ValueError(f"unknown recipe {self.name!r}; expected one of {', '.join(RECIPE_NAMES)}")
        if self.weight_mode not in (None, "one", "inv_t"):
            raise ValueError(f"recipe.weight_mode must be 'one' or 'inv_t', found {self.weight_mode!r}")
        if self.t_mode not in (None, "per_block", "per_sequence"):
            raise ValueError(f"recipe.t_mode must be 'per_block' or 'per_sequence', found {self.t_mode!r}")
        if self.t_sampling not in ("uniform", "antithetic", "stratified"):
            raise ValueError(f"recipe.t_sampling must be uniform, antithetic or stratified, found {self.t_sampling!r}")
        if not 0.0 < self.eps < 1.0:
            raise ValueError(f"recipe.eps must be in (0, 1), found {self.eps}")
        if self.ar_weight is not None and self.ar_weight < 0:
            raise ValueError(f"recipe.ar_weight must be >= 0, found {self.ar_weight}")
        if self.anneal_steps < 0:
            raise ValueError(f"recipe.anneal_steps must be >= 0, found {self.anneal_steps}")
        self.curriculum()  # validates the block-size fields

    def _default(self, key):
        return _DEFAULTS[self.name][key]

    @property
    def layout(self) -> str:
        return self._default("layout")

    @property
    def dual(self) -> bool:
        return self.layout.startswith("dual_")

    @property
    def lam(self) -> float:
        return self._default("ar_weight") if self.ar_weight is None else float(self.ar_weight)

    @property
    def weight(self) -> str:
        return self.weight_mode or self._default("weight_mode")

    @property
    def t(self) -> str:
        return self.t_mode or self._default("t_mode")

    def curriculum(self) -> BlockCurriculum:
        if self.block_size is not None:
            return BlockCurriculum(start=self.block_size, maximum=max(self.block_size, 1), interval=0)
        start = self._default("block_start")
        if start == self.block_max or self.name in ("diffullama", "ar"):
            return BlockCurriculum(start=start, maximum=max(start, 1), interval=0)
        return BlockCurriculum(
            start=start, factor=self.block_factor, maximum=self.block_max,
            interval=self.block_interval, offset=self.block_offset,
        )
