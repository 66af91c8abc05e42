"""The model wrapper: megatron-core ``GPTModel`` with block-diffusion attention and two streams.

:class:`NBDiffModel` takes clean ids (and noisy ids for dual layouts), a layout and a block size.
For dual layouts it builds ``[x_t ; x_0]`` (``2L`` tokens) with position ids ``0..L-1`` for both
halves, runs the GPT model with the layout's mask spec as an argument of every core attention
(megatron's ``packed_seq_params``, see ``attention/layout_params.py``: activation recomputation
replays it in the backward pass), and returns the
noisy-stream and clean-stream logits separately. Complementary layouts (training with
complementary masks, docs/method.md "Instruction tuning") also take ``complement_ids`` and run
``[x_t ; x_t' ; x_0]`` (``3L``, positions ``0..L-1`` three times); the second view's logits come
back as ``complement``. Single-stream diffusion (``single_annealed``,
``bidirectional``) reads ``noisy_ids`` and fills ``noisy``; plain causal (AR) reads ``clean_ids``
and fills ``clean``. Shift convention everywhere: the logit at position ``i`` predicts token
``i + 1``.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Optional

import torch
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule

from ..attention.context_parallel import check_split, local_positions
from ..attention.core_attention import BlockDiffusionAttention
from ..attention.layout_params import layout_params
from ..attention.masks import BLOCK_LAYOUTS, COMPLEMENTARY_LAYOUTS, DUAL_LAYOUTS, MaskSpec, check_layout
from ..config import ModelConfig
from .rope import inverse_frequencies
from .spec import get_nbdiff_block_spec


def unwrap_model(model):
    """The :class:`NBDiffModel` inside megatron's DDP and Float16Module wrappers (or torch's)."""
    while not isinstance(model, NBDiffModel) and hasattr(model, "module"):
        model = model.module
    return model


class PositionRopeGPTModel(GPTModel):
    """``GPTModel`` whose rotary embedding follows ``position_ids`` instead of ``0..S-1``.

    megatron-core computes RoPE for positions ``0..S-1`` whatever ``position_ids`` say; the dual
    stream needs ``0..L-1`` twice. Identical rows share one ``[S, 1, 1, dim]`` table (training);
    rows that differ (a left-padded decoding batch) get ``[S, b, 1, dim]``, which megatron's
    unfused rotary application broadcasts over heads.
    """

    def _preprocess(self, input_ids, position_ids, *args, **kwargs):
        out = super()._preprocess(input_ids, position_ids, *args, **kwargs)
        rotary = out[1]
        if position_ids is None or rotary is None:
            return out
        # [max_len, 1, 1, dim] table, indexed by this batch's positions -> [S, 1, 1, dim]
        table = self.rotary_pos_emb(self.max_sequence_length)
        pos = position_ids.to(table.device)
        if pos.shape[0] == 1 or bool((pos == pos[:1]).all()):
            rotary = table.index_select(0, pos[0])
        else:  # rows at different positions (left-padded decoding batches): [S, b, 1, dim]
            rotary = table[:, 0, 0][pos.t()].unsqueeze(2)
        return (out[0], rotary) + tuple(out[2:])


@dataclasses.dataclass
class StreamLogits:
    """Logits per stream, ``[b, L, V]`` each (``V`` is the vocab partition under
    ``parallel_output``; the real vocabulary otherwise). On a pipeline stage without the output
    layer, ``hidden`` holds the stage's output ``[S, b, h]`` instead."""

    noisy: Optional[torch.Tensor] = None
    clean: Optional[torch.Tensor] = None
    hidden: Optional[torch.Tensor] = None
    complement: Optional[torch.Tensor] = None
    """The second noisy view's logits (complementary layouts only)."""
    positions: Optional[torch.Tensor] = None
    """Under context parallelism, the positions ``[L/cp]`` of every stream this rank computed
    (the logits hold those positions, in this order); None: all ``L`` positions in order."""


def _check_ids(name: str, ids: Optional[torch.Tensor]) -> None:
    if ids is None:
        return
    if not torch.is_tensor(ids) or ids.dim() != 2:
        raise ValueError(f"{name} must be a [batch, L] tensor, found {getattr(ids, 'shape', ids)!r}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, found {ids.dtype}")


class NBDiffModel(MegatronModule):
    """Block-diffusion language model on megatron-core (see module docstring)."""

    def __init__(
        self,
        model_config: ModelConfig,
        transformer_config,
        *,
        pre_process: bool = True,
        post_process: bool = True,
        parallel_output: bool = False,
        use_te: bool = False,
        vp_stage: Optional[int] = None,
    ):
        super().__init__(config=transformer_config)
        self.model_config = model_config
        tp = transformer_config.tensor_model_parallel_size
        self.parallel_output = parallel_output
        self.pre_process = pre_process
        self.post_process = post_process
        spec = get_nbdiff_block_spec(
            transformer_config,
            backend=model_config.attention_backend,
            qk_layernorm=model_config.qk_layernorm,
            use_te=use_te,
            vp_stage=vp_stage,
        )
        self.gpt = PositionRopeGPTModel(
            config=transformer_config,
            transformer_layer_spec=spec,
            vocab_size=model_config.padded_vocab_size(tp),
            max_sequence_length=model_config.max_seq_len,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=parallel_output,
            share_embeddings_and_output_weights=model_config.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=model_config.rope_base,
            vp_stage=vp_stage,
        )
        if model_config.rope_scaling is not None:
            # megatron-core's RotaryEmbedding knows only plain RoPE and Llama 3 with fixed
            # parameters: its table is ``outer(positions, inv_freq)``, so the scaled frequencies
            # (computed as transformers does) replace ``inv_freq`` before the first (cached) call.
            rotary = self.gpt.rotary_pos_emb
            rotary.inv_freq = inverse_frequencies(
                model_config.kv_channels, model_config.rope_base, model_config.rope_scaling
            ).to(device=rotary.inv_freq.device, dtype=rotary.inv_freq.dtype)
        # attributes megatron-core's schedules and gradient finalisation look up on the model
        self.model_type = self.gpt.model_type
        self.share_embeddings_and_output_weights = self.gpt.share_embeddings_and_output_weights
        self._core_attention = [
            m for m in self.gpt.modules() if isinstance(m, BlockDiffusionAttention)
        ]
        # context parallelism: every forward runs this rank's share of each stream's positions
        self.cp_group = None
        if transformer_config.context_parallel_size > 1:
            from megatron.core.process_groups_config import ProcessGroupCollection

            self.cp_group = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["cp"]).cp
        # RoPE follows position_ids (under CP: this rank's global positions), so megatron's own
        # per-CP-rank slicing of the table must stay off
        self.gpt.rotary_pos_emb.cp_group = None

    # megatron-core plumbing: pipeline input, checkpoint layout without a wrapper prefix.
    def set_input_tensor(self, input_tensor) -> None:
        self.gpt.set_input_tensor(input_tensor)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return self.gpt.sharded_state_dict(prefix, sharded_offsets, metadata)

    def shared_embedding_or_output_weight(self):
        return self.gpt.shared_embedding_or_output_weight()

    @contextlib.contextmanager
    def attention_context(self, spec: Optional[MaskSpec] = None, inference=None) -> Iterator[None]:
        """Attention state for calls to ``self.gpt`` inside the block: the decoding state
        ``inference`` (a KV cache and an explicit mask,
        :class:`~megatron_nbdiff.attention.core_attention.KVInference`, used by the decoding runner)
        or a mask ``spec`` for direct calls (``forward`` passes its spec as an argument instead);
        both are reset when the block ends, whatever happens inside it. Not for training with
        activation recomputation, which replays layers after the block has ended."""
        for module in self._core_attention:
            module.mask_spec, module.inference = spec, inference
        try:
            yield
        finally:
            for module in self._core_attention:
                module.mask_spec, module.inference = None, None

    def forward(
        self,
        clean_ids: Optional[torch.Tensor] = None,
        noisy_ids: Optional[torch.Tensor] = None,
        *,
        complement_ids: Optional[torch.Tensor] = None,
        layout: str = "causal",
        block_size: int = 1,
        doc_ids: Optional[torch.Tensor] = None,
        anneal_step: int = 0,
        anneal_steps: int = 0,
        anneal_seed: int = 0,
    ) -> StreamLogits:
        """Run one forward. Ids are ``[b, L]``; ``doc_ids`` (packed documents) ``[b, L]``;
        ``complement_ids`` (the second noisy view) only with a complementary layout."""
        check_layout(layout)
        _check_ids("clean_ids", clean_ids)
        _check_ids("noisy_ids", noisy_ids)
        _check_ids("complement_ids", complement_ids)
        complementary = layout in COMPLEMENTARY_LAYOUTS
        dual = layout in DUAL_LAYOUTS
        if complement_ids is not None and not complementary:
            raise ValueError(f"complement_ids need a complementary layout, not {layout!r}")
        if dual or complementary:
            streams = {"noisy_ids": noisy_ids, "clean_ids": clean_ids}
            if complementary:
                streams = {"noisy_ids": noisy_ids, "complement_ids": complement_ids, "clean_ids": clean_ids}
            if any(x is None for x in streams.values()):
                need = "clean_ids, noisy_ids and complement_ids" if complementary else "both clean_ids and noisy_ids"
                raise ValueError(f"layout {layout!r} needs {need}")
            if len({tuple(x.shape) for x in streams.values()}) > 1:
                raise ValueError(
                    " and ".join(f"{name} {tuple(x.shape)}" for name, x in streams.items())
                    + " must have the same shape"
                )
            ids = torch.cat(list(streams.values()), dim=1)
        elif layout == "causal":
            if clean_ids is None or noisy_ids is not None:
                raise ValueError("layout 'causal' reads clean_ids only")
            ids = clean_ids
        else:
            if noisy_ids is None or clean_ids is not None:
                raise ValueError(f"single-stream layout {layout!r} reads noisy_ids only")
            ids = noisy_ids
        b, L = (clean_ids if clean_ids is not None else noisy_ids).shape
        if L > self.model_config.max_seq_len:
            raise ValueError(
                f"stream length {L} exceeds the model's max_seq_len {self.model_config.max_seq_len}"
            )
        spec = MaskSpec(layout, L, block_size, anneal_step, anneal_steps, anneal_seed)
        if doc_ids is not None and tuple(doc_ids.shape) != (b, L):
            raise ValueError(f"doc_ids must have shape {(b, L)}, found {tuple(doc_ids.shape)}")
        local = None
        if self.cp_group is not None:  # this rank's positions of every stream (context_parallel.py)
            cp = self.cp_group.size()
            check_split(L, cp, block_size if layout in BLOCK_LAYOUTS else 1)
            local = local_positions(L, cp, self.cp_group.rank(), ids.device)
            ids = ids[:, torch.cat([s * L + local for s in range(spec.streams)])]
            positions = local.repeat(spec.streams)
            L = local.numel()
        else:
            positions = torch.arange(L, device=ids.device).repeat(spec.streams)
        position_ids = positions.unsqueeze(0).expand(b, -1)
        out = self.gpt(ids, position_ids, doc_ids, packed_seq_params=layout_params(spec))
        if not self.post_process:
            return StreamLogits(hidden=out)
        # out: [b, S, V_padded or V_partition]
        if not self.parallel_output:
            out = out[..., : self.model_config.vocab_size]
        if complementary:
            return StreamLogits(noisy=out[:, :L], complement=out[:, L:2 * L], clean=out[:, 2 * L:], positions=local)
        if dual:
            return StreamLogits(noisy=out[:, :L], clean=out[:, L:], positions=local)
        if layout == "causal":
            return StreamLogits(clean=out, positions=local)
        return StreamLogits(noisy=out, positions=local)
