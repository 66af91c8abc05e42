"""Decoding: block diffusion with KV cache and parallel commits, full-sequence decoding with
infilling, and plain AR decoding, over HF exports and the project's Megatron checkpoints.

    from megatron_nbdiff.inference import generate
    results = generate("exported_dir", ["Once upon a time"], mode="block", threshold=0.9)
    results[0]["text"], results[0]["stats"]["tokens_per_forward"]
"""
from .api import generate, load_runner, read_prompt_file
from .decode import CONFIDENCES, MODES, DecodeOptions, block_decode, full_decode
from .runner import DecodingError, ModelRunner, RunnerInfo, attention_mask

__all__ = [
    "CONFIDENCES",
    "MODES",
    "DecodeOptions",
    "DecodingError",
    "ModelRunner",
    "RunnerInfo",
    "attention_mask",
    "block_decode",
    "full_decode",
    "generate",
    "load_runner",
    "read_prompt_file",
]
