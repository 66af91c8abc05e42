"""The one table of dtype names: the project's short names and torch's dtypes."""
from __future__ import annotations

import torch

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""Short name -> torch dtype (configs, ``nbdiff.json``, command-line ``--dtype``)."""

HF_DTYPE_NAMES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
"""``torch_dtype`` as Hugging Face ``config.json`` writes it -> short name."""
