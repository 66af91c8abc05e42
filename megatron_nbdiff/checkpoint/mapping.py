"""The parameter map between Hugging Face decoders and megatron-core's ``GPTModel``.

One table (:func:`param_maps`) names, for every megatron parameter, its state-dict name (local
layer spec, relative to the ``GPTModel``), its key in a megatron-core distributed checkpoint
(TE-compatible: the input norm is stored as ``linear_qkv.layer_norm_weight``), the HF tensors it
comes from and how they combine:

``copy``   one HF tensor, same layout.
``qkv``    ``q_proj``/``k_proj``/``v_proj`` interleaved per query group:
           ``[q heads of group g ; k_g ; v_g]`` for ``g = 0..groups-1``. Tensor parallelism splits
           whole groups, so the global layout does not depend on TP.
``fc1``    ``[gate_proj ; up_proj]``. megatron-core stores the stride-2 TP split of its GLU fc1
           through a factory whose global tensor is exactly ``[gate ; up]`` (all gate rows, then
           all up rows) at every TP, so this global layout is also TP-independent.
``vocab``  embedding / output rows: the HF rows, then the mask-token row when one is appended,
           then zero padding up to the padded vocabulary.

Layer tensors in a distributed checkpoint carry a leading layer axis (global shape
``[num_layers, ...]``); each layer is one chunk at its global layer index, whatever the pipeline
layout that wrote it.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from ..config import ModelConfig
from .families import Family

LAYER = "{i}"


@dataclasses.dataclass(frozen=True)
class ParamMap:
    megatron: str
    """State-dict name under ``GPTModel`` (``{i}`` for the layer index)."""
    sharded_key: str
    """Key of the tensor in the distributed checkpoint."""
    hf: tuple[str, ...]
    """HF tensor names (``{i}`` for the layer index)."""
    kind: str
    """``copy``, ``qkv``, ``fc1`` or ``vocab``."""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    def megatron_name(self, layer: Optional[int] = None) -> str:
        return self.megatron.replace(LAYER, str(layer)) if self.per_layer else self.megatron

    def hf_names(self, layer: Optional[int] = None) -> tuple[str, ...]:
        return tuple(n.replace(LAYER, str(layer)) for n in self.hf) if self.per_layer else self.hf


def param_maps(family: Family, mc: ModelConfig) -> list[ParamMap]:
    """Every parameter of the model, in HF checkpoint order (embedding, layers, norm, head)."""
    L = "decoder.layers.{i}."
    H = "model.layers.{i}."
    K = "decoder.layers."
    maps = [ParamMap("embedding.word_embeddings.weight", "embedding.word_embeddings.weight",
                     ("model.embed_tokens.weight",), "vocab")]
    maps.append(ParamMap(L + "input_layernorm.weight", K + "self_attention.linear_qkv.layer_norm_weight",
                         (H + "input_layernorm.weight",), "copy"))
    maps.append(ParamMap(L + "self_attention.linear_qkv.weight", K + "self_attention.linear_qkv.weight",
                         tuple(H + f"self_attn.{p}_proj.weight" for p in "qkv"), "qkv"))
    if mc.add_qkv_bias:
        maps.append(ParamMap(L + "self_attention.linear_qkv.bias", K + "self_attention.linear_qkv.bias",
                             tuple(H + f"self_attn.{p}_proj.bias" for p in "qkv"), "qkv"))
    if mc.qk_layernorm:
        for p in "qk":
            maps.append(ParamMap(L + f"self_attention.{p}_layernorm.weight",
                                 K + f"self_attention.{p}_layernorm.weight",
                                 (H + f"self_attn.{p}_norm.weight",), "copy"))
    maps.append(ParamMap(L + "self_attention.linear_proj.weight", K + "self_attention.linear_proj.weight",
                         (H + "self_attn.o_proj.weight",), "copy"))
    maps.append(ParamMap(L + "pre_mlp_layernorm.weight", K + "mlp.linear_fc1.layer_norm_weight",
                         (H + "post_attention_layernorm.weight",), "copy"))
    maps.append(ParamMap(L + "mlp.linear_fc1.weight", K + "mlp.linear_fc1.weight",
                         (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "fc1"))
    maps.append(ParamMap(L + "mlp.linear_fc2.weight", K + "mlp.linear_fc2.weight",
                         (H + "mlp.down_proj.weight",), "copy"))
    maps.append(ParamMap("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                         ("model.norm.weight",), "copy"))
    if not mc.tie_embeddings:
        maps.append(ParamMap("output_layer.weight", "output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def units(maps: list[ParamMap], num_layers: int) -> list[tuple[Optional[int], list[ParamMap]]]:
    """Conversion units in checkpoint order: ``(None, [embedding])``, ``(i, [layer params])`` for
    each layer, ``(None, [final norm, output layer])``. Converters stream one unit at a time."""
    head = [m for m in maps if not m.per_layer and m.megatron.startswith("embedding.")]
    tail = [m for m in maps if not m.per_layer and not m.megatron.startswith("embedding.")]
    layer = [m for m in maps if m.per_layer]
    return [(None, head)] + [(i, layer) for i in range(num_layers)] + [(None, tail)]


def hf_shapes(pm: ParamMap, mc: ModelConfig, vocab_rows: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the HF tensors of ``pm`` (``vocab_rows`` rows for embedding / head)."""
    h, d = mc.hidden_size, mc.kv_channels
    nq, ng, f = mc.num_attention_heads, mc.num_query_groups, mc.ffn_hidden_size
    name = pm.megatron
    if pm.kind == "vocab":
        return ((vocab_rows, h),)
    if pm.kind == "qkv":
        if name.endswith("bias"):
            return ((nq * d,), (ng * d,), (ng * d,))
        return ((nq * d, h), (ng * d, h), (ng * d, h))
    if pm.kind == "fc1":
        return ((f, h), (f, h))
    if name.endswith("linear_proj.weight"):
        return ((h, nq * d),)
    if name.endswith("linear_fc2.weight"):
        return ((h, f),)
    if "q_layernorm" in name or "k_layernorm" in name:
        return ((d,),)
    return ((h,),)


def megatron_shape(pm: ParamMap, mc: ModelConfig, vocab_rows: int) -> tuple[int, ...]:
    """Shape of the (TP=1) megatron tensor of ``pm`` for one layer."""
    shapes = hf_shapes(pm, mc, vocab_rows)
    if pm.kind in ("qkv", "fc1"):
        return (sum(s[0] for s in shapes),) + shapes[0][1:]
    return shapes[0]


def qkv_blocks(mc: ModelConfig) -> Iterator[tuple[int, int, int, int]]:
    """``(source, src_row, dst_row, rows)`` row blocks that interleave q/k/v into ``linear_qkv``
    (``source`` 0/1/2 = q/k/v; rows are in units of one head-dim row of the weight)."""
    d = mc.kv_channels
    per_group = mc.num_attention_heads // mc.num_query_groups
    dst = 0
    for g in range(mc.num_query_groups):
        yield 0, g * per_group * d, dst, per_group * d
        dst += per_group * d
        yield 1, g * d, dst, d
        dst += d
        yield 2, g * d, dst, d
        dst += d


def split_fc1(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = t.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()
