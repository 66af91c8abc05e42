"""Runner for exported HF checkpoints: a transformers causal LM, 4D attention masks and its
``DynamicCache`` (a denoising pass appends the block's KV, then the cache is cropped back).

Weights are read from safetensors only. A directory whose weights exist only as pickles
(``pytorch_model.bin`` and the like: loading one can run code) is refused unless the caller passes
``allow_pickle=True`` (``--allow-pickle`` on ``tools/generate.py``) for a file it trusts."""
from __future__ import annotations

import os
from typing import Optional

import torch

from ..dtypes import TORCH_DTYPES as _DTYPES
from .runner import DecodingError, ModelRunner, RunnerInfo


def _eos_ids(*candidates) -> tuple:
    out = []
    for c in candidates:
        if c is None:
            continue
        for x in c if isinstance(c, (list, tuple, set)) else [c]:
            if int(x) not in out:
                out.append(int(x))
    return tuple(out)


class HFRunner(ModelRunner):
    """Decodes a transformers causal LM (see :mod:`megatron_nbdiff.inference.runner`)."""

    def __init__(self, model, info: RunnerInfo, tokenizer=None, use_cache: bool = True):
        device = next(model.parameters()).device
        super().__init__(info, device, use_cache=use_cache, tokenizer=tokenizer)
        self.model = model.eval()
        self.cache = None

    @classmethod
    def from_pretrained(cls, directory: str, *, device=None, dtype: Optional[str] = None,
                        use_cache: bool = True, allow_pickle: bool = False) -> "HFRunner":
        from transformers import AutoModelForCausalLM

        from ..checkpoint.errors import CheckpointMetadataError
        from ..checkpoint.metadata import METADATA_NAME, read_metadata
        from ..checkpoint.safetensors_io import pickle_weight_files, safetensors_files

        if not os.path.isdir(directory):
            raise DecodingError(f"model directory not found: {directory}")
        if not os.path.isfile(os.path.join(directory, "config.json")):
            raise DecodingError(f"{directory} has no config.json: not a Hugging Face checkpoint")
        pickled = pickle_weight_files(directory)
        if not safetensors_files(directory) and pickled and not allow_pickle:
            raise DecodingError(
                f"{os.path.join(directory, pickled[0])} is a pickle, which can run code when loaded, "
                "and the directory has no safetensors weights; pass --allow-pickle (allow_pickle=True) "
                "only if you trust the file, or re-save the model with safetensors"
            )
        meta = None
        if os.path.isfile(os.path.join(directory, METADATA_NAME)):
            try:
                meta = read_metadata(directory, kind="hf")
            except CheckpointMetadataError as exc:
                raise DecodingError(str(exc)) from None
        if dtype and dtype not in _DTYPES:
            raise DecodingError(f"dtype must be one of {sorted(_DTYPES)}, found {dtype!r}")
        torch_dtype = _DTYPES[dtype] if dtype else (_DTYPES[meta.dtype] if meta else torch.float32)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=torch_dtype, attn_implementation="sdpa", local_files_only=True,
                use_safetensors=None if allow_pickle else True,
            )
        except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
            raise DecodingError(f"{directory}: cannot load the HF model ({exc})") from None
        if device is not None:
            model = model.to(device)
        tokenizer = None
        if os.path.isfile(os.path.join(directory, "tokenizer_config.json")) or os.path.isfile(
            os.path.join(directory, "tokenizer.json")
        ):
            from ..data.tokenizer import Tokenizer

            tokenizer = Tokenizer(directory)
        cfg = model.config
        vocab = int(meta.vocab["real"]) if meta else int(cfg.vocab_size)
        mask_id = int(meta.mask_token["id"]) if meta and meta.mask_token else None
        info = RunnerInfo(
            vocab_size=vocab,
            mask_token_id=mask_id,
            eos_token_ids=_eos_ids(cfg.eos_token_id, tokenizer.eod_id if tokenizer else None),
            block_size=int(meta.block_size) if meta else None,
            layout=meta.attention_layout if meta else None,
            has_metadata=meta is not None,
            source=directory,
            max_length=getattr(cfg, "max_position_embeddings", None),
        )
        return cls(model, info, tokenizer=tokenizer, use_cache=use_cache)

    def _reset_cache(self) -> None:
        from transformers import DynamicCache

        self.cache = DynamicCache(config=self.model.config) if self.use_cache else None

    @torch.no_grad()
    def _forward(self, ids, position_ids, mask, past, cached, append):
        n = ids.shape[1]
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache if cached else None,
            use_cache=cached,
        )
        if cached and not append:
            self.cache.crop(-n)  # drop the denoised block's KV: the cache holds `past` again
        return out.logits[..., : self.info.vocab_size].float()
