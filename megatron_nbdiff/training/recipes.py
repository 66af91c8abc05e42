"""Adaptation recipes as behaviour (docs/method.md, "Recipes").

A recipe is an object resolved once from its :class:`~megatron_nbdiff.config.RecipeConfig`. It
tells the rest of the stack everything that differs between recipes:

* ``layout`` (the attention layout), ``needs_mask_token``;
* ``block_size(step)`` (its curriculum) and ``stream_length(seq_len, block_size)`` (what the
  pipeline schedule sends between stages);
* ``forward_and_loss(tokens, sample_index, model, ctx)``, in the shape of Megatron-LM's
  ``forward_step``: noise the micro-batch, run the model, and return the model output with a
  function from that output to :class:`~megatron_nbdiff.training.losses.LossParts`;
* ``metadata_block_size(step, seq_len)``, the block size a checkpoint records for decoding.

Loss masks (``data.loss_mask``) reach a recipe as ``ctx.loss_mask`` (None: every token carries
loss): the noise never masks a token with mask 0 and both losses count only targets with mask 1,
divided by ``ctx.normaliser`` (the step's mean count per micro-batch). ``recipe.complementary``
(dual-stream recipes) adds a second noisy view masking exactly the eligible tokens the first one
left clean, run in one ``[x_t ; x_t' ; x_0]`` forward (docs/method.md, "Instruction tuning").

=============  =====================  ========  ======================  ============  ==========
recipe         attention layout       lambda    block size              t             weight
=============  =====================  ========  ======================  ============  ==========
nbdiff         dual_context_causal    0.5       curriculum 1 -> 32      per block     1
transplant     dual_context_causal    0         fixed 32                per block     1
block_causal   dual_block_causal      0.5       curriculum 1 -> 32      per block     1
diffullama     single_annealed        -         whole sequence          per sequence  1/t
ar             causal                 -         1                       -             -
=============  =====================  ========  ======================  ============  ==========

Adding a recipe is one class in one file: subclass :class:`Recipe` (or :class:`DualStreamRecipe`),
decorate it with :func:`register_recipe`, and name it in the config's ``recipe.name``.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Callable, ClassVar, Optional

import torch

from ..attention.masks import COMPLEMENTARY_OF
from ..config import RecipeConfig
from ..errors import ConfigError
from ..noise import NoiseOutput, mask_tokens
from .curriculum import BlockCurriculum
from .losses import LossParts, ar_loss, complementary_stream_loss, dual_stream_loss, single_stream_loss

LossFn = Callable[[object], LossParts]


@dataclasses.dataclass(frozen=True)
class StepContext:
    """Per-call state of one training (or evaluation) step, passed to the recipe."""

    step: int
    """The optimizer step; keys the noise and the annealing."""
    block_size: int
    """The block size of this step (the recipe's ``block_size(step)``)."""
    seed: int
    """The run's seed (noise, annealing hash)."""
    mask_token_id: Optional[int]
    """The mask token, or None for recipes that need none."""
    doc_ids: Optional[torch.Tensor]
    """Document ids ``[mbs, L]`` of the micro-batch, or None (no packing restriction)."""
    loss_kwargs: dict
    """Vocabulary arguments of the losses (``tp_group``, ``vocab_size``)."""
    validate_noise: bool = True
    """Range checks in the noise kernel (off on CUDA: they synchronise the host)."""
    loss_mask: Optional[torch.Tensor] = None
    """Per-token loss mask ``[mbs, L]`` (1: the token is a loss target and may be noised), or
    None: every token carries loss."""
    normaliser: Optional[float] = None
    """The losses' divisor: the mean loss-token count per micro-batch over the whole step (all
    micro-batches, all data-parallel ranks), or None: this micro-batch's own count."""

    def token_loss_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """The loss mask of ``tokens`` (ones without one)."""
        return torch.ones_like(tokens) if self.loss_mask is None else self.loss_mask.to(tokens.device)

    @property
    def loss_args(self) -> dict:
        """Keyword arguments of the loss functions: the vocabulary's and the normaliser."""
        return dict(self.loss_kwargs, normaliser=self.normaliser)


class Recipe(abc.ABC):
    """Base class: a recipe's defaults and behaviour. Subclasses set the class attributes and
    implement :meth:`forward_and_loss`."""

    name: ClassVar[str]
    layout: ClassVar[str]
    needs_mask_token: ClassVar[bool] = True
    default_ar_weight: ClassVar[float] = 0.0
    default_weight_mode: ClassVar[str] = "one"
    default_t_mode: ClassVar[str] = "per_block"
    block_start: ClassVar[Optional[int]] = None
    """The curriculum's B_0, or None for a fixed block size of ``block_max``."""
    supports_complementary: ClassVar[bool] = False
    """Whether ``recipe.complementary`` applies (dual-stream recipes)."""

    def __init__(self, cfg: RecipeConfig):
        if cfg.complementary and not self.supports_complementary:
            raise ConfigError(f"recipe.complementary needs a dual-stream recipe (nbdiff, transplant, block_causal); "
                              f"recipe {self.name!r} has none")
        self.cfg = cfg
        self.ar_weight = self.default_ar_weight if cfg.ar_weight is None else float(cfg.ar_weight)
        self.weight_mode = cfg.weight_mode or self.default_weight_mode
        self.t_mode = cfg.t_mode or self.default_t_mode
        self.curriculum = self._curriculum()

    def _curriculum(self) -> BlockCurriculum:
        c = self.cfg
        if c.block_size is not None:
            return BlockCurriculum(start=c.block_size, maximum=c.block_size, interval=0)
        start = c.block_max if self.block_start is None else self.block_start
        if start >= c.block_max:
            return BlockCurriculum(start=start, maximum=start, interval=0)
        return BlockCurriculum(start=start, factor=c.block_factor, maximum=c.block_max,
                               interval=c.block_interval, offset=c.block_offset)

    @property
    def dual(self) -> bool:
        """Whether the model runs ``[x_t ; x_0]`` (every block size must divide ``seq_len``)."""
        return self.layout.startswith("dual_")

    def block_size(self, step: int) -> int:
        return self.curriculum.block_size(step)

    def stream_length(self, seq_len: int, block_size: int) -> int:
        """Length of the sequence the model runs at this block size."""
        return seq_len

    def streams(self, block_size: int) -> tuple[str, ...]:
        """The streams of the sequence the model runs at this block size, in order, each
        ``seq_len`` long: ``noisy`` (``x_t``), ``complement`` (``x_t'``) or ``clean`` (``x_0``)."""
        return ("noisy",)

    def metadata_block_size(self, step: int, seq_len: int) -> int:
        """The block size a checkpoint after ``step`` steps records for decoding."""
        return self.block_size(max(step - 1, 0))

    def check(self, seq_len: int, steps: int) -> None:  # noqa: B027 - a hook: most recipes accept any run
        """Refuse a run this recipe cannot do (ConfigError naming the field); the base accepts all."""

    def noise(self, tokens: torch.Tensor, sample_index: torch.Tensor, loss_mask: torch.Tensor,
              ctx: StepContext, block_size: Optional[int]):
        """The masking noise of a micro-batch, keyed by (seed, step, sample index, position)."""
        return mask_tokens(
            tokens, block_size=block_size, mask_token_id=ctx.mask_token_id, seed=ctx.seed,
            step=ctx.step, sample_index=sample_index.to(tokens.device), loss_mask=loss_mask,
            t_mode=self.t_mode, t_sampling=self.cfg.t_sampling, eps=self.cfg.eps,
            weight_mode=self.weight_mode, validate=ctx.validate_noise,
        )

    @abc.abstractmethod
    def forward_and_loss(self, tokens: torch.Tensor, sample_index: torch.Tensor, model,
                         ctx: StepContext) -> tuple[object, LossFn]:
        """Noise the micro-batch ``tokens [mbs, L]`` (global sample indices ``sample_index``), run
        ``model`` and return its output with the function from that output to the loss parts."""


_REGISTRY: dict[str, type[Recipe]] = {}


def register_recipe(cls: type[Recipe]) -> type[Recipe]:
    """Class decorator: make ``cls`` available as ``recipe.name: <cls.name>``."""
    _REGISTRY[cls.name] = cls
    return cls


def recipe_names() -> list[str]:
    return list(_REGISTRY)


def resolve_recipe(cfg: RecipeConfig) -> Recipe:
    """The recipe object of a config (ConfigError for an unknown name)."""
    cls = _REGISTRY.get(cfg.name)
    if cls is None:
        raise ConfigError(f"unknown recipe {cfg.name!r}; expected one of {', '.join(_REGISTRY)}")
    return cls(cfg)


@register_recipe
class ARRecipe(Recipe):
    """Plain next-token training on the clean stream."""

    name = "ar"
    layout = "causal"
    needs_mask_token = False
    default_ar_weight = 1.0
    block_start = 1

    def _curriculum(self) -> BlockCurriculum:
        return BlockCurriculum(start=1, maximum=1, interval=0)

    def metadata_block_size(self, step: int, seq_len: int) -> int:
        return 1

    def streams(self, block_size: int) -> tuple[str, ...]:
        return ("clean",)

    def forward_and_loss(self, tokens, sample_index, model, ctx):
        loss_mask = ctx.token_loss_mask(tokens)
        out = model(tokens, layout="causal", doc_ids=ctx.doc_ids)
        return out, lambda o: ar_loss(o.clean, tokens, loss_mask, positions=o.positions, **ctx.loss_args)


def complementary_noise(noise: NoiseOutput, tokens: torch.Tensor, loss_mask: torch.Tensor, block_size: int,
                        mask_token_id: int, weight_mode: str) -> NoiseOutput:
    """The second view of complementary masks: inside each block it masks exactly the eligible
    tokens (loss mask 1, not the block's first token) that ``noise`` left clean, so every eligible
    token is masked in exactly one view. Its noise level is ``1 - t`` (float32) and its weight 1,
    or ``1 / (1 - t)`` with ``weight_mode="inv_t"``, on its masked tokens; 0 elsewhere."""
    position = torch.arange(tokens.shape[1], device=tokens.device)
    eligible = (loss_mask != 0) & (position % block_size != 0)
    is_masked = eligible & ~noise.is_masked
    t = 1.0 - noise.t
    if weight_mode == "inv_t":
        weight = torch.where(is_masked, 1.0 / t.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))
    else:
        weight = is_masked.to(torch.float32)
    noisy_ids = torch.where(is_masked, torch.full_like(tokens, mask_token_id), tokens)
    return NoiseOutput(noisy_ids, is_masked, t, weight)


class DualStreamRecipe(Recipe):
    """``[x_t ; x_0]`` training: diffusion loss on the noisy stream plus ``ar_weight`` times the
    AR loss on the clean stream. At block size 1 the noisy stream has no masked position, so the
    step runs the clean stream alone (exactly an AR step scaled by ``ar_weight``). With
    ``recipe.complementary`` the model runs ``[x_t ; x_t' ; x_0]`` (the layout's complementary
    form), ``x_t'`` masking the eligible tokens ``x_t`` kept (:func:`complementary_noise`), and the
    diffusion loss sums both views over the one normaliser."""

    layout = "dual_context_causal"
    default_ar_weight = 0.5
    supports_complementary = True

    def check(self, seq_len: int, steps: int) -> None:
        for s, b in self.curriculum.changes(steps):
            if seq_len % b != 0:
                raise ConfigError(f"train.seq_len {seq_len} is not divisible by block size {b} (reached at step {s})")

    def stream_length(self, seq_len: int, block_size: int) -> int:
        return len(self.streams(block_size)) * seq_len

    def streams(self, block_size: int) -> tuple[str, ...]:
        if block_size == 1:
            return ("clean",)
        return ("noisy", "complement", "clean") if self.cfg.complementary else ("noisy", "clean")

    def forward_and_loss(self, tokens, sample_index, model, ctx):
        loss_mask = ctx.token_loss_mask(tokens)
        if ctx.block_size == 1:
            out = model(tokens, layout="causal", doc_ids=ctx.doc_ids)
            return out, lambda o: dual_stream_loss(None, o.clean, tokens, None, None, loss_mask,
                                                   self.ar_weight, positions=o.positions, **ctx.loss_args)
        noise = self.noise(tokens, sample_index, loss_mask, ctx, block_size=ctx.block_size)
        if self.cfg.complementary:
            other = complementary_noise(noise, tokens, loss_mask, ctx.block_size, ctx.mask_token_id,
                                        self.weight_mode)
            out = model(tokens, noise.noisy_ids, complement_ids=other.noisy_ids, layout=COMPLEMENTARY_OF[self.layout],
                        block_size=ctx.block_size, doc_ids=ctx.doc_ids)
            return out, lambda o: complementary_stream_loss(
                [(o.noisy, noise.weight, noise.is_masked), (o.complement, other.weight, other.is_masked)],
                o.clean, tokens, loss_mask, self.ar_weight, positions=o.positions, **ctx.loss_args)
        out = model(tokens, noise.noisy_ids, layout=self.layout, block_size=ctx.block_size, doc_ids=ctx.doc_ids)
        return out, lambda o: dual_stream_loss(o.noisy, o.clean, tokens, noise.weight, noise.is_masked,
                                               loss_mask, self.ar_weight, positions=o.positions, **ctx.loss_args)


@register_recipe
class NBDiffRecipe(DualStreamRecipe):
    """NBDiff: context-causal dual stream, AR loss at lambda 0.5, block size grown 1 -> 32."""

    name = "nbdiff"
    block_start = 1


@register_recipe
class TransplantRecipe(DualStreamRecipe):
    """Plain fine-tuning at the target block size: no AR loss, no curriculum."""

    name = "transplant"
    default_ar_weight = 0.0


@register_recipe
class BlockCausalRecipe(DualStreamRecipe):
    """NBDiff with the BD3-LM clean-stream mask (block-causal clean to clean): the ablation."""

    name = "block_causal"
    layout = "dual_block_causal"
    block_start = 1


@register_recipe
class DiffuLLaMARecipe(Recipe):
    """Full-sequence masked diffusion on one stream with attention-mask annealing: one t per
    sequence, weight 1/t, the annealing step equal to the training step."""

    name = "diffullama"
    layout = "single_annealed"
    default_weight_mode = "inv_t"
    default_t_mode = "per_sequence"

    def _curriculum(self) -> BlockCurriculum:
        return BlockCurriculum(start=1, maximum=1, interval=0)  # no blocks: the whole sequence

    def metadata_block_size(self, step: int, seq_len: int) -> int:
        return seq_len

    def forward_and_loss(self, tokens, sample_index, model, ctx):
        loss_mask = ctx.token_loss_mask(tokens)
        noise = self.noise(tokens, sample_index, loss_mask, ctx, block_size=None)
        out = model(noisy_ids=noise.noisy_ids, layout=self.layout, doc_ids=ctx.doc_ids,
                    anneal_step=ctx.step, anneal_steps=self.cfg.anneal_steps, anneal_seed=ctx.seed)
        return out, lambda o: single_stream_loss(o.noisy, tokens, noise.weight, noise.is_masked, loss_mask,
                                                 positions=o.positions, **ctx.loss_args)
