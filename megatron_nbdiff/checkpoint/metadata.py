"""``nbdiff.json``: what every converted, adapted or exported checkpoint says about itself.

Readers call :func:`read_metadata`, which refuses (with the reason) a file that is missing, not
JSON, of another format, of a format version this code does not know, of an unknown family, or
inconsistent. Writers build a :class:`CheckpointMetadata` and call :func:`write_metadata`; a
training loop that saves an adapted checkpoint copies the converted checkpoint's metadata and
updates ``block_size``, ``attention_layout``, ``recipe`` and ``step`` (:meth:`CheckpointMetadata.
updated`).

Format version 1, for a megatron checkpoint directory (``kind: megatron``)::

    nbdiff.json              this file (written last: a directory without it is incomplete)
    model/                   megatron-core distributed checkpoint, torch_dist (reshardable)
    tokenizer files          tokenizer.json, tokenizer_config.json, ... (when the source had them)

and for an exported HF directory (``kind: hf``): ``config.json``, sharded safetensors with
``model.safetensors.index.json``, tokenizer files and this file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from ..config import ModelConfig
from ..dtypes import TORCH_DTYPES
from ..fileio import atomic_write
from .errors import CheckpointMetadataError
from .families import FAMILIES

FORMAT = "megatron_nbdiff"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
METADATA_NAME = "nbdiff.json"
WEIGHTS_DIR = "model"
SHIFT = "logit i predicts token i+1"
KINDS = ("megatron", "hf")
MASK_METHODS = ("append", "id", "token")
DTYPES = tuple(TORCH_DTYPES)  # the short names nbdiff.json records


@dataclasses.dataclass
class CheckpointMetadata:
    """Contents of ``nbdiff.json`` (field order is the file's key order)."""

    kind: str
    """``megatron`` (distributed checkpoint under ``weights.path``) or ``hf`` (exported)."""
    family: str
    """Architecture family (``checkpoint/families.py``): ``llama``, ``qwen2``, ``qwen3``,
    ``mistral``, ``qwen3_moe`` or ``mixtral``."""
    hf_architecture: str
    """The HF class the weights came from and export to (``LlamaForCausalLM``)."""
    model_config: dict[str, Any]
    """:class:`ModelConfig` as a dict; ``vocab_size`` counts an appended mask token."""
    vocab: dict[str, Any]
    """``real`` (embedding rows that mean something: HF rows plus an appended mask row),
    ``padded`` (rows at the target tensor-parallel size), ``stored`` (rows in the checkpoint),
    ``hf`` (rows of the source HF checkpoint), ``tokenizer`` (tokens the tokenizer knows, or
    null without a tokenizer)."""
    mask_token: Optional[dict[str, Any]]
    """``{"id", "token", "method": append|id|token, "init"}``, or null (converted without one)."""
    dtype: str
    """Parameter dtype of the stored weights (``fp32``, ``bf16``, ``fp16``)."""
    weights: dict[str, Any]
    """``{"format": "torch_dist", "path": "model", "key_prefix": ""}`` or
    ``{"format": "safetensors", "index": "model.safetensors.index.json"}``."""
    parallel: dict[str, Any]
    """``target_tp``/``target_pp`` (the layout asked for) and ``written_tp``/``written_pp`` (the
    layout of the process group that wrote it). torch_dist reshards on load: any layout loads."""
    tokenizer: dict[str, Any]
    """``{"files": [...], "note": ...}``; ``files`` is empty when the source had no tokenizer."""
    block_size: int = 1
    """Diffusion block size the weights were trained for (1: autoregressive)."""
    shift: str = SHIFT
    """Shift convention of the logits."""
    attention_layout: str = "causal"
    """Attention layout of the weights (a layout name from ``attention.masks``)."""
    recipe: str = "none"
    """Adaptation recipe that produced the weights (``none`` for a converted AR model)."""
    step: int = 0
    """Optimizer steps of adaptation."""
    hf_config: Optional[dict[str, Any]] = None
    """The source ``config.json``, used to write the exported one."""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Where the weights came from (path, tool, time)."""
    notes: list[str] = dataclasses.field(default_factory=list)
    """Facts a consumer should know (no tokenizer, sliding window ignored, ...)."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Free-form data of other tools (training run ids, ...); readers ignore it. Any other
    unknown top-level field makes a reader refuse the file."""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        head = {"format": data.pop("format"), "format_version": data.pop("format_version")}
        return {**head, **data}

    def get_model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(dict(self.model_config))

    def updated(self, **changes: Any) -> "CheckpointMetadata":
        """A copy with fields replaced (for adapted checkpoints: block_size, recipe, step, ...)."""
        return dataclasses.replace(self, **changes)


def write_metadata(directory: str, meta: CheckpointMetadata) -> str:
    validate(meta.to_json(), os.path.join(directory, METADATA_NAME))
    path = os.path.join(directory, METADATA_NAME)
    atomic_write(path, json.dumps(meta.to_json(), indent=2) + "\n")
    return path


def _fail(path: str, why: str) -> None:
    raise CheckpointMetadataError(f"cannot use the checkpoint's {path}: {why}")


def validate(data: Any, path: str) -> CheckpointMetadata:
    """Check a parsed ``nbdiff.json`` and build the dataclass; raise with the reason otherwise."""
    if not isinstance(data, dict):
        _fail(path, "it does not hold a JSON object")
    if data.get("format") != FORMAT:
        _fail(path, f"format is {data.get('format')!r}, expected {FORMAT!r}")
    version = data.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        _fail(
            path,
            f"format_version {version!r} is not understood by this code (it reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade megatron_nbdiff",
        )
    fields = {f.name: f for f in dataclasses.fields(CheckpointMetadata)}
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in data]
    if missing:
        _fail(path, f"missing field(s) {', '.join(missing)}")
    unknown = sorted(set(data) - set(fields))
    if unknown:
        _fail(path, f"unknown field(s) {', '.join(unknown)} for format_version {version}")
    if data["kind"] not in KINDS:
        _fail(path, f"kind {data['kind']!r} is not one of {KINDS}")
    if data["family"] not in FAMILIES:
        _fail(path, f"unknown architecture family {data['family']!r} (known: {', '.join(sorted(FAMILIES))})")
    if data["hf_architecture"] != FAMILIES[data["family"]].architecture:
        _fail(path, f"hf_architecture {data['hf_architecture']!r} does not belong to family {data['family']!r}")
    if data["dtype"] not in DTYPES:
        _fail(path, f"dtype {data['dtype']!r} is not one of {DTYPES}")
    if data.get("shift", SHIFT) != SHIFT:
        _fail(path, f"shift convention {data['shift']!r} is not {SHIFT!r}")
    try:
        mc = ModelConfig.from_dict(dict(data["model_config"]))
    except (TypeError, ValueError) as e:
        _fail(path, f"model_config is invalid: {e}")
    vocab = data["vocab"]
    if not isinstance(vocab, dict) or vocab.get("real") != mc.vocab_size:
        _fail(path, f"vocab.real {vocab.get('real') if isinstance(vocab, dict) else vocab!r} "
              f"disagrees with model_config.vocab_size {mc.vocab_size}")
    mask = data["mask_token"]
    if mask is not None:
        if not isinstance(mask, dict) or mask.get("method") not in MASK_METHODS:
            _fail(path, f"mask_token must be null or have a method in {MASK_METHODS}, found {mask!r}")
        mid = mask.get("id")
        if not isinstance(mid, int) or not 0 <= mid < mc.vocab_size:
            _fail(path, f"mask_token.id {mid!r} is not a row of the {mc.vocab_size}-row vocabulary")
    weights = data["weights"]
    expected_format = "torch_dist" if data["kind"] == "megatron" else "safetensors"
    if not isinstance(weights, dict) or weights.get("format") != expected_format:
        _fail(path, f"a {data['kind']} checkpoint must have weights.format {expected_format!r}")
    if not isinstance(data.get("block_size"), int) or data.get("block_size", 1) < 1:
        _fail(path, f"block_size {data.get('block_size')!r} is not a positive int")
    return CheckpointMetadata(**data)


def read_metadata(directory: str, kind: Optional[str] = None) -> CheckpointMetadata:
    """Read and validate ``directory/nbdiff.json``; ``kind`` (if given) must match."""
    path = os.path.join(directory, METADATA_NAME)
    if not os.path.isdir(directory):
        raise CheckpointMetadataError(f"{directory} is not a directory")
    if not os.path.isfile(path):
        raise CheckpointMetadataError(
            f"{directory} has no {METADATA_NAME}: not a checkpoint written by megatron_nbdiff (or "
            "its conversion did not finish)"
        )
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointMetadataError(f"cannot read {path}: {e}") from None
    meta = validate(data, path)
    if kind is not None and meta.kind != kind:
        raise CheckpointMetadataError(
            f"{directory} holds a {meta.kind!r} checkpoint, this reader needs a {kind!r} one"
        )
    return meta
