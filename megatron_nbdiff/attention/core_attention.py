"""Block-diffusion core attention for megatron-core transformer layers.

:class:`BlockDiffusionAttention` satisfies megatron-core's ``CoreAttention`` contract (the
``core_attention`` submodule of ``SelfAttention``): inputs ``query [sq, b, np, hn]``,
``key``/``value [sk, b, ng, hn]`` (``np``/``ng``: attention heads / query groups of this tensor
parallel rank), output ``[sq, b, np * hn]``. It has no parameters, so checkpoints keep
megatron-core's layout, and works under tensor parallelism (heads split), pipeline parallelism and
sequence parallelism (queries arrive whole after the sequence all-gather of ``linear_qkv``).

The mask is not a dense tensor handed down the layer stack. Each forward's :class:`MaskSpec`
(layout, stream length, block size, annealing step) arrives as megatron's ``packed_seq_params``
argument (a :class:`~megatron_nbdiff.attention.layout_params.LayoutParams`, so megatron's
activation recomputation replays it in the backward pass); megatron's ``attention_mask`` argument
carries only the optional per-sample document ids ``[b, L]`` (an integer tensor, so recomputation
can save it). Without ``LayoutParams`` the module's own ``mask_spec`` applies (set by
``NBDiffModel.attention_context``), else causal. Both backends derive their masks from
:func:`masks.allowed`:

``dense``  SDPA with the boolean mask from the predicate: the CPU reference.
``flex``   FlexAttention with cached BlockMasks; dual and complementary layouts run as two calls
           (noisy queries over ``[noisy ; clean]`` or ``[noisy ; noisy' ; clean]`` keys through a
           sparse block mask, clean queries causal over clean keys), so nothing ``O(L^2)`` is
           materialised. The GPU default.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch.nn.attention.flex_attention import flex_attention

from ..parallel import check_parallel_sizes
from .context_parallel import cp_attention
from .flex import block_mask_for, clean_part_is_causal, noisy_len
from .layout_params import LayoutParams
from .masks import BLOCK_LAYOUTS, MaskSpec, dense_allowed_from_spec

BACKENDS = ("dense", "flex")

_compiled_flex = None
# How FlexAttention is compiled on CUDA: ``kernel_options`` go to every call (for example
# ``{"USE_TMA": True}`` or block sizes ``fwd_BLOCK_M``...), ``mode`` to ``torch.compile``
# (``"max-autotune-no-cudagraphs"`` autotunes the kernel's tile configs). Set with
# :func:`configure_flex`; benchmarks/attention.py --sweep measures the choices.
_flex_settings: dict = {"kernel_options": None, "mode": None}


def configure_flex(kernel_options: Optional[dict] = None, mode: Optional[str] = None) -> None:
    """Choose FlexAttention's kernel options and compile mode (drops the compiled function)."""
    global _compiled_flex
    _flex_settings["kernel_options"] = dict(kernel_options) if kernel_options else None
    _flex_settings["mode"] = mode
    _compiled_flex = None
    torch._dynamo.reset()  # compiled frames of the previous settings must not be reused


def _flex(q, k, v, block_mask, scale):
    """Compiled FlexAttention on CUDA; the eager (reference) implementation on CPU."""
    global _compiled_flex
    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        raise RuntimeError(
            "the flex attention backend has no backward pass on CPU (torch FlexAttention limit); "
            "train on CPU with attention_backend='dense', or run flex forward-only (torch.no_grad)"
        )
    if q.is_cuda:
        if _compiled_flex is None:
            # one compiled kernel per (shape, layout, block size, mask part): the curriculum and
            # eval shapes alone can pass dynamo's default limit of 8
            if torch._dynamo.config.recompile_limit < 64:
                torch._dynamo.config.recompile_limit = 64
            _compiled_flex = torch.compile(flex_attention, dynamic=False, mode=_flex_settings["mode"])
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True,
                              kernel_options=_flex_settings["kernel_options"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=True)


def validate_doc_ids(attention_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if attention_mask is None:
        return None
    if not torch.is_tensor(attention_mask) or attention_mask.dtype in (torch.bool,) or (
        attention_mask.dtype.is_floating_point
    ):
        raise TypeError(
            "BlockDiffusionAttention derives its mask from the layout; the attention_mask argument "
            "must be None or an integer tensor of document ids [batch, L], found "
            f"{getattr(attention_mask, 'dtype', type(attention_mask).__name__)}"
        )
    return attention_mask


def block_diffusion_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    doc_ids: Optional[torch.Tensor] = None,
    backend: str = "dense",
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Attention of ``q [b, hq, S, d]`` over ``k, v [b, hkv, S, d]`` (GQA when ``hkv < hq``) under
    ``spec``'s layout. Returns ``[b, hq, S, d]``."""
    if backend == "dense":
        mask = dense_allowed_from_spec(spec, doc_ids, device=q.device)
        mask = mask[None, None] if mask.dim() == 2 else mask[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    if backend != "flex":
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    if spec.layout == "causal" and doc_ids is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    if spec.layout not in BLOCK_LAYOUTS:
        return _flex(q, k, v, block_mask_for(spec, "full", doc_ids, device=q.device), scale)
    n = noisy_len(spec)  # the noisy view(s): L (dual) or 2L (complementary)
    noisy = _flex(q[:, :, :n], k, v, block_mask_for(spec, "noisy", doc_ids, device=q.device), scale)
    qc, kc, vc = q[:, :, n:], k[:, :, n:], v[:, :, n:]
    if clean_part_is_causal(spec, doc_ids):
        clean = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
    else:
        clean = _flex(qc, kc, vc, block_mask_for(spec, "clean", doc_ids, device=q.device), scale)
    return torch.cat([noisy, clean], dim=2)


class BlockDiffusionAttention(MegatronModule):
    """Core attention with block-diffusion layouts (see module docstring)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type=None,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection: Optional[ProcessGroupCollection] = None,
        backend: str = "dense",
    ):
        super().__init__(config=config)
        if backend not in BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            raise ValueError(
                f"attention dropout {dropout} is not supported by BlockDiffusionAttention; "
                "set attention_dropout=0 (adaptation recipes train without it)"
            )
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise ValueError(f"softmax_type {config.softmax_type!r} is not supported; use 'vanilla'")
        if getattr(config, "window_size", None) is not None:
            raise ValueError("sliding-window attention is not supported with block-diffusion layouts")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        tp = pg_collection.tp.size()
        # context parallelism (context_parallel.py): this rank holds 1/cp of every stream
        self.cp_group = pg_collection.cp if config.context_parallel_size > 1 else None
        check_parallel_sizes(config, tp=tp)  # heads and query groups split evenly over TP
        self.backend = backend
        self.layer_number = layer_number
        self.attention_type = attention_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        self.head_dim = config.kv_channels
        self.softmax_scale = (
            softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(self.head_dim)
        )
        # Per-call state, set and always reset by NBDiffModel.attention_context; None: causal.
        self.mask_spec: Optional[MaskSpec] = None
        # Decoding state (a KV cache and an explicit mask, see KVInference), set the same way.
        self.inference: Optional[KVInference] = None

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("BlockDiffusionAttention takes no attention_bias")
        if packed_seq_params is not None and not isinstance(packed_seq_params, LayoutParams):
            raise ValueError(
                "BlockDiffusionAttention takes no THD packed_seq_params; pass document ids as attention_mask "
                "for packed documents and the layout as LayoutParams"
            )
        sq, b, nh, hn = query.shape
        if self.inference is not None:
            return self._inference_forward(query, key, value)
        if packed_seq_params is not None:  # the layout of this forward, an argument (layout_params.py)
            spec = packed_seq_params.mask_spec
        else:
            spec = self.mask_spec if self.mask_spec is not None else MaskSpec("causal", sq)
        cp = self.cp_group.size() if self.cp_group is not None else 1
        if spec.total_len != sq * cp or key.shape[0] != sq:
            raise ValueError(
                f"attention over {sq} queries and {key.shape[0]} keys does not match layout "
                f"{spec.layout!r} with {spec.total_len} positions" + (f" over {cp} CP ranks" if cp > 1 else "")
            )
        doc_ids = validate_doc_ids(attention_mask)
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        if cp > 1:
            out = cp_attention(q, k, v, spec, self.cp_group, doc_ids, self.backend, self.softmax_scale)
        else:
            out = block_diffusion_attention(q, k, v, spec, doc_ids, self.backend, self.softmax_scale)
        # [b, h, s, d] -> [s, b, h * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)

    def _inference_forward(self, query, key, value) -> torch.Tensor:
        """Decoding: the new positions attend over this layer's cached keys plus their own, under
        the runner's boolean mask ``[b, 1, new, cached + new]``; ``append`` keeps their KV."""
        state = self.inference
        sq, b, nh, hn = query.shape
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        past = state.store.get(self.layer_number)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if state.append:
            state.store[self.layer_number] = (k, v)
        if state.mask.shape[-1] != k.shape[2] or state.mask.shape[-2] != sq:
            raise ValueError(
                f"decoding mask {tuple(state.mask.shape)} does not match {sq} queries over "
                f"{k.shape[2]} keys (layer {self.layer_number})"
            )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=state.mask, scale=self.softmax_scale,
                                             enable_gqa=True)
        return out.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)


class KVInference:
    """Decoding state shared by every core attention of a model: per-layer ``(k, v)`` tensors
    ``[b, groups, positions, head_dim]``, the mask of the current call and whether its KV is kept."""

    def __init__(self):
        self.store: dict = {}
        self.mask: Optional[torch.Tensor] = None
        self.append: bool = False
