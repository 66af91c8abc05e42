"""Megatron-LM GPT checkpoint (``torch_dist``) -> this project's checkpoint + ``nbdiff.json``.

Megatron-LM saves a run under ``--save`` as ``iter_NNNNNNN/`` directories (``release/`` for a
release checkpoint) and names the newest in ``latest_checkpointed_iteration.txt``. With
``--ckpt-format torch_dist`` each directory is a megatron-core distributed checkpoint: the model's
tensors as global tensors under their sharded keys (whatever TP/PP wrote them), the optimizer's
and RNG states beside them, and ``common.pt`` holding the run's arguments (an
``argparse.Namespace``), the iteration and the checkpoint version.

What is read, and how:

- The arguments come from ``common.pt``, unpickled with ``torch.load(weights_only=True)`` and only
  ``argparse.Namespace`` and megatron-core's enums allowed (anything else is refused by name);
  ``--args-yaml`` supplies them where a checkpoint has none and overrides single fields.
- The architecture must be one this project's model is: RoPE (``position_embedding_type rope``,
  full rotary, not interleaved; ``--use-rope-scaling`` is megatron-core's fixed Llama 3 scaling),
  RMSNorm, a gated SiLU MLP (``--swiglu``), no linear biases (a QKV bias alone is Qwen2's), no
  experts. Everything else is refused with the argument that says so.
- Tensor names: Transformer Engine layer specs store the input norms inside the fused linears
  (``self_attention.linear_qkv.layer_norm_weight``, ``mlp.linear_fc1.layer_norm_weight``), the
  local specs as ``input_layernorm.weight`` and ``pre_mlp_layernorm.weight``; both are read. The
  fused QKV (interleaved per query group) and FC1 (``[gate ; up]``) have the same global layout as
  this project's at any TP, so every tensor is copied as it is, the vocabulary rows excepted:
  the tokenizer's rows are kept, the mask token's row appended (``--mask-token``), and the
  padding redone for the target TP. Optimizer, RNG and ``_extra_state`` entries are skipped; any
  other name is refused, as is a stored shape the arguments do not imply.
- Reading and writing stream one tensor at a time (:mod:`.streaming_save`).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import enum
import importlib
import os
import pickle
import time
from typing import Any, Optional

import torch

from ..config import ModelConfig
from ..dtypes import TORCH_DTYPES
from .errors import ConversionError
from .families import get_family
from .finite import FiniteCheck, all_finite
from .fsutil import AtomicOutputDir, check_free_space, check_output_dir
from .hf_to_megatron import ConversionResult, check_layout, mean_of_rows
from .mapping import megatron_shape, param_maps
from .metadata import WEIGHTS_DIR, CheckpointMetadata, write_metadata
from .streaming_save import save_model
from .tokenizer import DEFAULT_MASK_STRING, load_tokenizer, resolve_mask, write_tokenizer
from .torch_dist import COMMON_NAME, check_torch_dist

TRACKER = "latest_checkpointed_iteration.txt"
_DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}
# entries of a Megatron-LM checkpoint that are not model weights
_SKIPPED_PREFIXES = ("optimizer.", "rng_state", "rerun_state_machine_state")
_LOCAL_NAMES = {  # this project's (TE) key -> the local layer spec's key
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.input_layernorm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight",
}


def locate(load: str) -> tuple[str, Optional[str]]:
    """The ``torch_dist`` directory of ``--load`` (a Megatron-LM save directory or one of its
    iteration directories) and the iteration it holds."""
    if not os.path.isdir(load):
        raise ConversionError(f"{load} is not a directory")
    tracker = os.path.join(load, TRACKER)
    if os.path.isfile(tracker):
        with open(tracker) as f:
            text = f.read().strip()
        if text == "release":
            path = os.path.join(load, "release")
        elif text.isdigit():
            path = os.path.join(load, f"iter_{int(text):07d}")
        else:
            raise ConversionError(f"{tracker}: expected an iteration number or 'release', found {text!r}")
        if not os.path.isdir(path):
            raise ConversionError(f"{tracker} names iteration {text}, but {path} does not exist")
        return path, text
    if os.path.isfile(os.path.join(load, "metadata.json")):
        base = os.path.basename(os.path.normpath(load))
        return load, (base[5:].lstrip("0") or "0") if base.startswith("iter_") else base
    if os.path.isdir(os.path.join(load, "mp_rank_00")) or any(
            n.startswith("mp_rank_") for n in os.listdir(load)):
        raise ConversionError(
            f"{load} is a legacy Megatron-LM checkpoint (--ckpt-format torch: pickled mp_rank_* "
            "files, which can run code when loaded); re-save it with --ckpt-format torch_dist"
        )
    raise ConversionError(
        f"{load} is not a Megatron-LM checkpoint: it has neither {TRACKER} nor metadata.json"
    )


def _allowed_global(name: str):
    """``argparse.Namespace`` and megatron-core's enums (``module.Class`` names), else None."""
    if name == "argparse.Namespace":
        return argparse.Namespace
    module, _, cls = name.rpartition(".")
    if not module.startswith("megatron.core."):
        return None
    try:
        obj = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None
    return obj if isinstance(obj, type) and issubclass(obj, enum.Enum) else None


def read_stored_args(path: str) -> Optional[dict[str, Any]]:
    """The run's arguments from ``common.pt`` (None when it stores none)."""
    common = os.path.join(path, COMMON_NAME)
    if not os.path.isfile(common):
        return None
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(common)
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as many types
        raise ConversionError(f"{common}: cannot read it ({type(exc).__name__}: {exc})") from None
    allowed = []
    for name in names:
        obj = _allowed_global(name)
        if obj is None:
            raise ConversionError(
                f"{common}: refused to unpickle {name}, which is neither the arguments' Namespace "
                "nor a megatron-core enum and could run code; give the architecture with --args-yaml"
            )
        allowed.append(obj)
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(common, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ConversionError(f"{common}: cannot read it ({type(exc).__name__}: {exc})") from None
    args = state.get("args") if isinstance(state, dict) else None
    return vars(args) if isinstance(args, argparse.Namespace) else None


def read_args(path: str, args_yaml: Optional[str], notes: list[str]) -> dict[str, Any]:
    """Stored arguments, with the YAML's fields on top."""
    stored = read_stored_args(path)
    override: dict[str, Any] = {}
    if args_yaml is not None:
        import yaml

        try:
            with open(args_yaml) as f:
                override = yaml.safe_load(f) or {}
        except OSError as exc:
            raise ConversionError(f"--args-yaml {args_yaml}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConversionError(f"--args-yaml {args_yaml}: not valid YAML ({exc})") from None
        if not isinstance(override, dict):
            raise ConversionError(f"--args-yaml {args_yaml}: expected a mapping of argument names")
    if stored is None and not override:
        raise ConversionError(
            f"{os.path.join(path, COMMON_NAME)} holds no arguments of the run; give the "
            "architecture with --args-yaml (num_layers, hidden_size, ffn_hidden_size, ...)"
        )
    args = dict(stored or {})
    changed = sorted(k for k, v in override.items() if k in args and args[k] != v)
    if changed:
        notes.append(f"arguments overridden by {args_yaml}: {', '.join(changed)}")
    args.update(override)
    return args


def _need(args: dict, name: str, kind=int):
    value = args.get(name)
    if value is None:
        raise ConversionError(f"the checkpoint's arguments lack {name!r}; give it with --args-yaml")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
        raise ConversionError(f"argument {name!r} must be a positive integer, found {value!r}")
    return value


def _refuse_unless(ok: bool, why: str) -> None:
    if not ok:
        raise ConversionError(f"the checkpoint's model cannot be represented: {why}")


def model_config_from_args(args: dict, vocab_size: int, max_seq_len: Optional[int],
                           make_vocab_size_divisible_by: int) -> tuple[ModelConfig, str]:
    """The project's :class:`ModelConfig` and family name for a Megatron-LM GPT's arguments."""
    pos = args.get("position_embedding_type", "learned_absolute")
    _refuse_unless(pos == "rope", f"position_embedding_type is {pos!r}; only 'rope' is supported")
    _refuse_unless(float(args.get("rotary_percent", 1.0)) == 1.0,
                   f"rotary_percent is {args.get('rotary_percent')}; only full rotary (1.0) is supported")
    _refuse_unless(not args.get("rotary_interleaved", False), "rotary_interleaved is set")
    norm = args.get("normalization", "LayerNorm")
    _refuse_unless(norm == "RMSNorm", f"normalization is {norm!r}; only 'RMSNorm' is supported")
    _refuse_unless(bool(args.get("swiglu", False)),
                   "swiglu is not set: only gated SiLU MLPs (SwiGLU) are supported")
    for name in ("squared_relu", "openai_gelu", "onnx_safe_gelu"):
        _refuse_unless(not args.get(name, False), f"{name} is set: only SiLU-gated MLPs are supported")
    _refuse_unless(not args.get("add_bias_linear", True),
                   "add_bias_linear is set (biases in every linear layer); only a QKV bias is supported")
    _refuse_unless(not args.get("num_experts"), f"num_experts is {args.get('num_experts')}: a mixture "
                   "of experts, not a dense model")
    qkv_bias, qk_norm = bool(args.get("add_qkv_bias", False)), bool(args.get("qk_layernorm", False))
    _refuse_unless(not (qkv_bias and qk_norm), "add_qkv_bias and qk_layernorm are both set")
    heads = _need(args, "num_attention_heads")
    groups = _need(args, "num_query_groups") if args.get("group_query_attention") else heads
    rope_scaling = None
    if args.get("use_rope_scaling"):
        # megatron-core's RotaryEmbedding: Llama 3 scaling with fixed 1 / 4 / 8192
        rope_scaling = {"rope_type": "llama3", "factor": float(args.get("rope_scaling_factor", 8.0)),
                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 8192}
    max_pos = args.get("max_position_embeddings") or args.get("seq_length")
    mc = ModelConfig(
        vocab_size=vocab_size,
        hidden_size=_need(args, "hidden_size"),
        num_layers=_need(args, "num_layers"),
        num_attention_heads=heads,
        num_query_groups=groups,
        ffn_hidden_size=_need(args, "ffn_hidden_size"),
        kv_channels=args.get("kv_channels") or None,
        max_seq_len=max_seq_len or _need({"max_position_embeddings": max_pos}, "max_position_embeddings"),
        rope_base=float(args.get("rotary_base", 10000)),
        rope_scaling=rope_scaling,
        norm_eps=float(args.get("norm_epsilon", 1e-5)),
        qk_layernorm=qk_norm,
        add_qkv_bias=qkv_bias,
        tie_embeddings=not args.get("untie_embeddings_and_output_weights", False),
        make_vocab_size_divisible_by=make_vocab_size_divisible_by,
    )
    return mc, ("qwen2" if qkv_bias else "qwen3" if qk_norm else "llama")


def _source_keys(stored: dict, maps, tie: bool, path: str) -> dict[str, str]:
    """This project's sharded key -> the checkpoint's key, for every parameter; refuses names
    that belong to neither and a tied/untied mismatch."""
    model_keys = {k for k in stored if not k.startswith(_SKIPPED_PREFIXES) and "_extra_state" not in k}
    out = {}
    for pm in maps:
        key = pm.sharded_key
        if key not in stored and _LOCAL_NAMES.get(key) in stored:
            key = _LOCAL_NAMES[key]
        if key not in stored:
            also = f" (nor {_LOCAL_NAMES[key]!r})" if key in _LOCAL_NAMES else ""
            raise ConversionError(f"the checkpoint in {path} has no tensor {key!r}{also}")
        out[pm.sharded_key] = key
    extra = sorted(model_keys - set(out.values()))
    if tie and "output_layer.weight" in extra:
        raise ConversionError(
            f"the checkpoint in {path} stores output_layer.weight, but its arguments say the "
            "embeddings are tied (untie_embeddings_and_output_weights is not set)"
        )
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(
            f"unknown tensor {extra[0]!r}{more} in {path}: not part of a dense GPT with these "
            "arguments (RMSNorm, SwiGLU, RoPE, no biases)"
        )
    return out


def convert_megatron_lm(
    load: str,
    tokenizer_dir: str,
    out_dir: str,
    *,
    tp: Optional[int] = None,
    pp: Optional[int] = None,
    mask_token: str = "append",
    mask_token_string: str = DEFAULT_MASK_STRING,
    args_yaml: Optional[str] = None,
    dtype: Optional[str] = None,
    force: bool = False,
    max_seq_len: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> ConversionResult:
    """Convert the Megatron-LM checkpoint ``load`` (module docstring) into ``out_dir``. Raises
    ConversionError for bad input; nothing is left in ``out_dir`` on failure."""
    from .torch_dist_reader import TensorFileReader

    start = time.time()
    path, iteration = locate(load)
    check_output_dir(out_dir, force, (load,))
    if dtype is not None and dtype not in TORCH_DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(TORCH_DTYPES)}, found {dtype!r}")
    md = check_torch_dist(path, need_common=False)
    stored = {k: v for k, v in md.state_dict_metadata.items() if hasattr(v, "chunks")}
    notes: list[str] = []
    args = read_args(path, args_yaml, notes)
    if not os.path.isdir(tokenizer_dir):
        raise ConversionError(f"--tokenizer {tokenizer_dir} is not a directory")
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer is None:
        raise ConversionError(f"--tokenizer {tokenizer_dir} holds no Hugging Face tokenizer files")
    rows = len(tokenizer)
    mc0, family_name = model_config_from_args(args, rows, max_seq_len, make_vocab_size_divisible_by)
    tp = tp if tp is not None else int(args.get("tensor_model_parallel_size") or 1)
    pp = pp if pp is not None else int(args.get("pipeline_model_parallel_size") or 1)
    check_layout(mc0, tp, pp)
    family = get_family(family_name)
    maps = param_maps(family, mc0)
    keys = _source_keys(stored, maps, mc0.tie_embeddings, path)
    for pm in maps:  # every stored shape is the one the arguments imply
        got = tuple(stored[keys[pm.sharded_key]].size)
        if pm.kind == "vocab":
            want = (got[0], mc0.hidden_size)
            if got[0] < rows:
                raise ConversionError(f"{keys[pm.sharded_key]} has {got[0]} rows, fewer than the "
                                      f"tokenizer's {rows} tokens")
        else:
            want = (mc0.num_layers,) + megatron_shape(pm, mc0, 0) if pm.per_layer else megatron_shape(pm, mc0, 0)
        if got != want:
            raise ConversionError(
                f"{keys[pm.sharded_key]} is stored as {list(got)}, but the arguments imply {list(want)}"
            )
    embed = stored[keys["embedding.word_embeddings.weight"]]
    dtype = dtype or _DTYPE_NAMES.get(embed.properties.dtype, "bf16")
    mask = resolve_mask(mask_token, tokenizer, rows, mask_token_string, notes)
    vocab = rows + (1 if mask is not None and mask.new_row else 0)
    mc = dataclasses.replace(mc0, vocab_size=vocab)
    n_params = sum(torch.Size(megatron_shape(pm, mc, vocab)).numel() * (mc.num_layers if pm.per_layer else 1)
                   for pm in maps)
    check_free_space(out_dir, n_params * TORCH_DTYPES[dtype].itemsize)
    finite = FiniteCheck(allow_nonfinite)
    reader = TensorFileReader(path, md)

    def read(key: str, dest: torch.Tensor, layer: Optional[int], row0: int = 0) -> None:
        """Rows ``row0 ..`` of the stored tensor ``key`` (at ``layer``) into ``dest``."""
        offsets = (row0,) + (0,) * (dest.dim() - 1)
        if layer is None:
            reader.read(key, dest, offsets)
        else:
            reader.read(key, dest.unsqueeze(0), (layer,) + offsets)

    mask_rows = {}  # the mean of the tokenizer's rows, per vocabulary tensor (read ahead: one pass)
    if mask is not None and mask.init_rows is not None:
        for pm in maps:
            if pm.kind == "vocab":
                key = keys[pm.sharded_key]
                mask_rows[key] = mean_of_rows(lambda d, a, b, key=key: read(key, d, None, a),
                                              mask.init_rows, mc.hidden_size, TORCH_DTYPES[dtype])

    def fill(pm, layer, dest: torch.Tensor, row0: int) -> None:
        key = keys[pm.sharded_key]
        lo, hi = row0, row0 + dest.shape[0]
        at = layer if pm.per_layer else None
        part = dest[: max(0, min(hi, rows) - lo)] if pm.kind == "vocab" else dest
        if part.numel():
            read(key, part, at, lo)
            name = key + (f" (layer {layer})" if pm.per_layer else "")
            source = stored[key].properties.dtype
            if source != dest.dtype and not all_finite(part):  # the source's, or made by the cast?
                raw = torch.empty(part.shape, dtype=source)
                read(key, raw, at, lo)
                finite.check_cast(raw, part, name)
            else:
                finite.check(part, name)
        if pm.kind == "vocab":
            dest[part.shape[0]:].zero_()
            if key in mask_rows and lo <= mask.id < hi:
                dest[mask.id - lo] = mask_rows[key]

    from ._runtime import quiet_megatron_logs

    quiet_megatron_logs()
    with reader, AtomicOutputDir(out_dir, force, (load,)) as tmp:
        phases = save_model(mc, maps, tp, TORCH_DTYPES[dtype], os.path.join(tmp, WEIGHTS_DIR), fill, progress)
        notes.extend(finite.warn())
        files = write_tokenizer(tokenizer_dir, tmp, tokenizer, mask)
        meta = CheckpointMetadata(
            kind="megatron",
            family=family.name,
            hf_architecture=family.architecture,
            model_config=mc.to_dict(),
            vocab={"real": vocab, "padded": mc.padded_vocab_size(tp), "stored": mc.padded_vocab_size(tp),
                   "hf": rows, "tokenizer": rows},
            mask_token=mask.as_json() if mask is not None else None,
            dtype=dtype,
            weights={"format": "torch_dist", "path": WEIGHTS_DIR, "key_prefix": ""},
            parallel={"target_tp": tp, "target_pp": pp, "written_tp": 1, "written_pp": 1,
                      "reshardable": True},
            tokenizer={"files": files, "note": None},
            block_size=1,
            attention_layout="causal",
            recipe="none",
            step=0,
            hf_config=None,
            source={"path": os.path.abspath(path), "tool": "tools/convert_megatron_lm.py",
                    "iteration": iteration, "args": "common.pt" if args_yaml is None else args_yaml,
                    "source_tp": args.get("tensor_model_parallel_size"),
                    "source_pp": args.get("pipeline_model_parallel_size"),
                    "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
            notes=notes,
        )
        write_metadata(tmp, meta)
    seconds = time.time() - start
    mask_txt = f", mask token id {mask.id} ({mask.method})" if mask is not None else ", no mask token"
    summary = (
        f"converted Megatron-LM {path} (iteration {iteration}) -> {out_dir}: {n_params:,} parameters, "
        f"{dtype}, {family.architecture}, target layout TP={tp} PP={pp} (torch_dist, reshardable), "
        f"vocab {vocab} padded to {mc.padded_vocab_size(tp)}{mask_txt}, {seconds:.1f} s "
        f"(streaming {phases['read'] + phases['write']:.1f} s: read {phases['read']:.1f} s, "
        f"write {phases['write']:.1f} s)"
    )
    return ConversionResult(os.path.abspath(out_dir), n_params, dtype, seconds, meta, summary)
