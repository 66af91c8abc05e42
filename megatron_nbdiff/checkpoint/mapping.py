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

Mixture-of-experts models (``mc.num_experts`` set) add, in their MoE layers, the router
(``mlp.router.weight``, ``[num_experts, hidden]``, HF ``<moe_block>.gate.weight``) and per expert
``e`` an ``fc1`` of ``[gate ; up]`` and an ``fc2`` (down), HF ``<moe_block>.experts.<e>.<proj>``.
megatron-core (``SequentialMLP.sharded_state_dict``) stores all experts of a layer in one tensor
with a leading expert axis (``mlp.experts.experts.linear_fc1.weight``, global
``[..., num_experts, 2 * moe_ffn, hidden]``), expert ``e`` at index ``e`` whatever the
expert-parallel layout that wrote it (EP ranks hold contiguous blocks of experts), so EP changes
nothing in the checkpoint. A MoE layer's pre-MLP norm is ``pre_mlp_layernorm.weight``
(``models/spec.py``). Where every layer is a MoE layer, the layers are stacked as above; where
some layers keep a dense MLP, megatron-core stores each layer under its own keys
(``decoder.layers.<i>.``, no layer axis; its "non-homogeneous" layout), which
:attr:`ParamMap.sharded_key` then spells with ``{i}``. Each map says which layers have it
(:attr:`ParamMap.layers`).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional

import torch

from ..config import ModelConfig
from .errors import ConversionError
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
    expert: Optional[int] = None
    """The expert of an expert weight (its index on the stored tensor's expert axis)."""
    layers: str = "all"
    """Which layers have it: ``all``, ``dense`` (the layers with a dense MLP) or ``moe``."""

    @property
    def per_layer(self) -> bool:
        return LAYER in self.megatron

    @property
    def stacked(self) -> bool:
        """Stored with a leading layer axis (not one key per layer)."""
        return self.per_layer and LAYER not in self.sharded_key

    def megatron_name(self, layer: Optional[int] = None) -> str:
        return self.megatron.replace(LAYER, str(layer)) if self.per_layer else self.megatron

    def hf_names(self, layer: Optional[int] = None) -> tuple[str, ...]:
        return tuple(n.replace(LAYER, str(layer)) for n in self.hf) if self.per_layer else self.hf

    def sharded_name(self, layer: Optional[int] = None) -> str:
        """The checkpoint key at ``layer``."""
        return self.sharded_key.replace(LAYER, str(layer)) if self.per_layer else self.sharded_key

    def in_layer(self, mc: ModelConfig, layer: int) -> bool:
        """Whether layer ``layer`` of ``mc`` has this parameter."""
        return self.layers == "all" or (self.layers == "moe") == mc.is_moe_layer(layer)

    def lead_shape(self, mc: ModelConfig) -> tuple[int, ...]:
        """The stored tensor's leading axes before the parameter's own: layers, then experts."""
        return (mc.num_layers,) * self.stacked + (mc.num_experts,) * (self.expert is not None)

    def lead_offsets(self, layer: Optional[int]) -> tuple[int, ...]:
        """This parameter's index on those leading axes."""
        return (layer,) * self.stacked + (self.expert,) * (self.expert is not None)


def param_maps(family: Family, mc: ModelConfig) -> list[ParamMap]:
    """Every parameter of the model, in HF checkpoint order (embedding, layers, norm, head)."""
    L = "decoder.layers.{i}."
    H = "model.layers.{i}."
    K = "decoder.layers." if mc.stacked_layers else L
    if mc.is_moe and not family.moe_block:
        raise ConversionError(f"the {family.name} family has no mixture-of-experts layers, but the model_config "
                              f"has num_experts={mc.num_experts}")
    dense_mlp = "dense" if mc.is_moe else "all"
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
                         (H + "post_attention_layernorm.weight",), "copy", layers=dense_mlp))
    maps.append(ParamMap(L + "mlp.linear_fc1.weight", K + "mlp.linear_fc1.weight",
                         (H + "mlp.gate_proj.weight", H + "mlp.up_proj.weight"), "fc1", layers=dense_mlp))
    maps.append(ParamMap(L + "mlp.linear_fc2.weight", K + "mlp.linear_fc2.weight",
                         (H + "mlp.down_proj.weight",), "copy", layers=dense_mlp))
    if mc.is_moe:
        B = H + family.moe_block + "."
        gate, up, down = family.expert_proj
        maps.append(ParamMap(L + "pre_mlp_layernorm.weight", K + "pre_mlp_layernorm.weight",
                             (H + "post_attention_layernorm.weight",), "copy", layers="moe"))
        maps.append(ParamMap(L + "mlp.router.weight", K + "mlp.router.weight", (B + "gate.weight",), "copy",
                             layers="moe"))
        for e in range(mc.num_experts):
            X, E = L + f"mlp.experts.local_experts.{e}.", B + f"experts.{e}."
            maps.append(ParamMap(X + "linear_fc1.weight", K + "mlp.experts.experts.linear_fc1.weight",
                                 (E + f"{gate}.weight", E + f"{up}.weight"), "fc1", expert=e, layers="moe"))
            maps.append(ParamMap(X + "linear_fc2.weight", K + "mlp.experts.experts.linear_fc2.weight",
                                 (E + f"{down}.weight",), "copy", expert=e, layers="moe"))
    maps.append(ParamMap("decoder.final_layernorm.weight", "decoder.final_layernorm.weight",
                         ("model.norm.weight",), "copy"))
    if not mc.tie_embeddings:
        maps.append(ParamMap("output_layer.weight", "output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def units(maps: list[ParamMap], mc: ModelConfig) -> list[tuple[Optional[int], list[ParamMap]]]:
    """Conversion units in checkpoint order: ``(None, [embedding])``, ``(i, [layer params])`` for
    each layer (a MoE layer's experts follow as one unit each, so a unit stays small however many
    experts there are), ``(None, [final norm, output layer])``. Converters stream one unit at a
    time."""
    head = [m for m in maps if not m.per_layer and m.megatron.startswith("embedding.")]
    tail = [m for m in maps if not m.per_layer and not m.megatron.startswith("embedding.")]
    out: list[tuple[Optional[int], list[ParamMap]]] = [(None, head)]
    for i in range(mc.num_layers):
        here = [m for m in maps if m.per_layer and m.in_layer(mc, i)]
        out.append((i, [m for m in here if m.expert is None]))
        experts: dict[int, list[ParamMap]] = {}
        for m in here:
            if m.expert is not None:
                experts.setdefault(m.expert, []).append(m)
        out += [(i, experts[e]) for e in sorted(experts)]
    return out + [(None, tail)]


def ffn_width(pm: ParamMap, mc: ModelConfig) -> int:
    """The inner width of the MLP ``pm`` belongs to (an expert's or the dense one)."""
    return mc.moe_ffn_hidden_size if pm.expert is not None else mc.ffn_hidden_size


def hf_shapes(pm: ParamMap, mc: ModelConfig, vocab_rows: int) -> tuple[tuple[int, ...], ...]:
    """Shapes of the HF tensors of ``pm`` (``vocab_rows`` rows for embedding / head)."""
    h, d = mc.hidden_size, mc.kv_channels
    nq, ng, f = mc.num_attention_heads, mc.num_query_groups, ffn_width(pm, mc)
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
    if name.endswith("router.weight"):
        return ((mc.num_experts, h),)
    if "q_layernorm" in name or "k_layernorm" in name:
        return ((d,),)
    return ((h,),)


def hf_tensor_shapes(maps: list[ParamMap], mc: ModelConfig, vocab_rows: int) -> dict[str, tuple[int, ...]]:
    """Every HF tensor of the model and its shape, in checkpoint order."""
    out: dict[str, tuple[int, ...]] = {}
    for layer, unit in units(maps, mc):
        for pm in unit:
            out.update(zip(pm.hf_names(layer), hf_shapes(pm, mc, vocab_rows)))
    return out


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
