"""Runner for the project's Megatron model (:class:`~megatron_nbdiff.models.NBDiffModel`) at any
tensor-parallel size, pipeline size 1, and for a mixture-of-experts model any expert-parallel
size (every rank routes the same tokens; megatron's ``allgather`` dispatcher hands each rank's
experts their tokens and sums the experts' outputs back, so every rank gets every logit).

The KV cache lives in the block-diffusion core attentions (:class:`~megatron_nbdiff.attention.
core_attention.KVInference`): every layer keeps the post-RoPE keys and values of its own heads
(its TP shard), and each call hands all layers one boolean mask. Under TP every rank must make
the same calls with the same ids; logits are gathered over the vocabulary, so greedy choices and
seeded sampling agree across ranks.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .runner import DecodingError, ModelRunner, RunnerInfo


class MegatronRunner(ModelRunner):
    """Decodes an ``NBDiffModel`` (see :mod:`megatron_nbdiff.inference.runner`)."""

    def __init__(self, model, info: RunnerInfo, tokenizer=None, use_cache: bool = True):
        from ..attention.core_attention import KVInference
        from ..models import unwrap_model

        inner = unwrap_model(model)
        if not (inner.pre_process and inner.post_process):
            raise DecodingError("the Megatron runner needs the whole model on one pipeline stage (PP=1)")
        if inner.parallel_output:
            raise DecodingError("load the model with parallel_output=False for decoding (gathered logits)")
        device = next(inner.parameters()).device
        super().__init__(info, device, use_cache=use_cache, tokenizer=tokenizer)
        self.model = inner.eval()
        self.state = KVInference()

    @classmethod
    def from_checkpoint(cls, directory: str, *, tp: Optional[int] = None, dtype: Optional[str] = None,
                        use_cache: bool = True, ep: Optional[int] = None) -> "MegatronRunner":
        """The runner of the checkpoint in ``directory`` at ``tp`` / ``ep`` (None: the initialised
        layout, else 1); an ``ep`` the model cannot take is refused before anything is built."""
        from ..checkpoint.loader import load_model
        from ..errors import NBDiffError

        if not os.path.isdir(directory):
            raise DecodingError(f"model directory not found: {directory}")
        try:
            model = load_model(directory, tp=tp, pp=1, ep=ep, dtype=dtype, parallel_output=False)
        except NBDiffError as exc:  # a missing, corrupt or untrusted checkpoint, a bad layout
            raise DecodingError(str(exc)) from None
        if torch.cuda.is_available():
            model = model.cuda()
        meta = model.checkpoint_metadata
        tokenizer = None
        if meta.tokenizer.get("files"):
            from ..data.tokenizer import Tokenizer

            tokenizer = Tokenizer(directory)
        eos = []
        for cand in ((meta.hf_config or {}).get("eos_token_id"), tokenizer.eod_id if tokenizer else None):
            for x in cand if isinstance(cand, list) else [cand]:
                if x is not None and int(x) not in eos:
                    eos.append(int(x))
        info = RunnerInfo(
            vocab_size=int(meta.vocab["real"]),
            mask_token_id=int(meta.mask_token["id"]) if meta.mask_token else None,
            eos_token_ids=tuple(eos),
            block_size=int(meta.block_size),
            layout=meta.attention_layout,
            has_metadata=True,
            source=directory,
            max_length=int(meta.model_config.get("max_seq_len") or 0) or None,
        )
        return cls(model, info, tokenizer=tokenizer, use_cache=use_cache)

    def _reset_cache(self) -> None:
        self.state.store = {}

    @torch.no_grad()
    def _forward(self, ids, position_ids, mask, past, cached, append):
        state = self.state
        if not cached:
            saved, state.store = state.store, {}
        state.mask = mask
        state.append = append if cached else False
        try:
            with self.model.attention_context(inference=state):
                out = self.model.gpt(ids, position_ids, None)
        finally:
            if not cached:
                state.store = saved
        return out[..., : self.info.vocab_size].float()
