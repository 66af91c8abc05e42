"""Hugging Face safetensors checkpoint -> megatron-core distributed checkpoint + ``nbdiff.json``.

Conversion runs on one process. It checks everything it can before writing (config, every
shard's header, every tensor's presence and shape, the mask token, the parallel layout), then
writes the project's model layout in ``torch_dist`` format (:mod:`.streaming_save`), reading
each HF tensor straight into its megatron tensor when the writer reaches it (rows of q/k/v into
their interleaved places, gate and up into the two halves of fc1, the vocabulary rows into the
padded embedding).
Every tensor read is checked for NaN/Inf (:mod:`.finite`): refused unless ``allow_nonfinite``.
torch_dist stores global tensors, so the checkpoint loads at any TP/PP/EP (megatron reshards on
load; a MoE layer's experts are one tensor with an expert axis, :mod:`.mapping`); ``--tp/--pp``
are validated, set the vocabulary padding, and are recorded as the target, as is ``ep`` (which
must divide the experts) for a MoE model.
Peak memory is about one tensor (the embedding, or one layer's largest weight): the writer asks
for each tensor when it writes it (:mod:`.streaming_save`).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import time
from typing import Callable, Optional

import torch

from .errors import ConversionError
from .families import HFModelInfo, parse_hf_config
from .finite import FiniteCheck, all_finite
from .fsutil import AtomicOutputDir, check_free_space, check_output_dir
from .mapping import ParamMap, ffn_width, hf_tensor_shapes, param_maps, qkv_blocks
from .metadata import WEIGHTS_DIR, CheckpointMetadata, write_metadata
from .safetensors_io import SafetensorsCheckpoint
from .streaming_save import save_model
from .tokenizer import DEFAULT_MASK_STRING, MaskPlan, load_tokenizer, resolve_mask, write_tokenizer

_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
_DTYPE_OF = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_TORCH_DTYPE = {v: k for k, v in _DTYPE_OF.items()}


@dataclasses.dataclass
class ConversionResult:
    out_dir: str
    parameters: int
    dtype: str
    seconds: float
    metadata: CheckpointMetadata
    summary: str


def check_layout(mc, tp: int, pp: int, ep: int = 1) -> None:
    if not isinstance(tp, int) or tp < 1 or not isinstance(pp, int) or pp < 1:
        raise ConversionError(f"--tp and --pp must be positive integers, found {tp} and {pp}")
    if not isinstance(ep, int) or isinstance(ep, bool) or ep < 1:
        raise ConversionError(f"--ep must be a positive integer, found {ep!r}")
    if ep > 1 and not mc.is_moe:
        raise ConversionError(f"--ep {ep}: expert parallelism needs a mixture-of-experts model; this one is dense")
    if mc.is_moe and mc.num_experts % ep:
        raise ConversionError(f"--ep {ep} does not divide the {mc.num_experts} experts")
    if mc.num_attention_heads % tp:
        raise ConversionError(
            f"--tp {tp} does not divide the {mc.num_attention_heads} attention heads"
        )
    if mc.num_query_groups % tp:
        raise ConversionError(
            f"--tp {tp} does not divide the {mc.num_query_groups} query groups (key/value heads)"
        )
    if mc.num_layers % pp:
        raise ConversionError(f"--pp {pp} does not divide the {mc.num_layers} layers")


def _check_tensors(ckpt: SafetensorsCheckpoint, info: HFModelInfo, maps: list[ParamMap],
                   notes: list[str]) -> int:
    """Every expected tensor present with the config's shape; nothing unexplained left over.
    Returns the parameter count."""
    expected = hf_tensor_shapes(maps, info.model_config, info.model_config.vocab_size)
    fam = info.family.name
    for name, shape in expected.items():
        if name not in ckpt:
            raise ConversionError(
                f"tensor {name!r} is missing from {ckpt.dir} (a {fam} model with this config.json "
                "needs it)"
            )
        got = ckpt.entries[name].shape
        if tuple(got) != tuple(shape):
            raise ConversionError(
                f"shape mismatch: tensor {name!r} is {list(got)} but config.json implies {list(shape)}"
            )
    extra = sorted(n for n in ckpt.entries if n not in expected and not n.endswith(_IGNORED_SUFFIXES))
    if info.model_config.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
        notes.append("tie_word_embeddings is true: lm_head.weight in the checkpoint was ignored")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ConversionError(
            f"unexpected tensor {extra[0]!r}{more} in {ckpt.dir}: not part of a {fam} model with "
            "this config.json"
        )
    n = 0
    for shape in expected.values():
        k = 1
        for s in shape:
            k *= s
        n += k
    return n


def mean_of_rows(read_rows: Callable[[torch.Tensor, int, int], None], rows: int, cols: int,
                 dtype: torch.dtype, chunk: int = 1024) -> torch.Tensor:
    """Mean of rows ``[0, rows)`` of a tensor as stored in ``dtype``, read ``chunk`` rows at a
    time by ``read_rows(dest, start, stop)`` and accumulated in float64 (the mask token's row)."""
    acc = torch.zeros(cols, dtype=torch.float64)
    buf = torch.empty(min(chunk, rows), cols, dtype=dtype)
    for lo in range(0, rows, chunk):
        part = buf[: min(rows, lo + chunk) - lo]
        read_rows(part, lo, lo + part.shape[0])
        acc += part.sum(0, dtype=torch.float64)
    return (acc / rows).to(dtype)


def _intersect(lo: int, hi: int, start: int, stop: int) -> Optional[tuple[int, int]]:
    a, b = max(lo, start), min(hi, stop)
    return (a, b) if a < b else None


def _read_checked(ckpt: SafetensorsCheckpoint, name: str, dest: torch.Tensor, finite: FiniteCheck,
                  start: int = 0, stop: Optional[int] = None) -> None:
    """Read rows of HF tensor ``name`` into ``dest`` and check them for NaN/Inf (when the read
    converted the dtype, the source rows are re-read to tell the source's from the cast's)."""
    ckpt.read_rows_into(name, dest, start, stop)
    source = ckpt.entries[name].dtype
    if dest.dtype != source and not all_finite(dest):
        raw = torch.empty(dest.shape, dtype=source)
        ckpt.read_rows_into(name, raw, start, stop)
        finite.check_cast(raw, dest, name)
    else:
        finite.check(dest, name)


def _fill(pm: ParamMap, layer, dest: torch.Tensor, row0: int, ckpt: SafetensorsCheckpoint, mc,
          hf_rows: int, mask: Optional[MaskPlan], mask_rows: dict, finite: FiniteCheck) -> None:
    """Rows ``row0 .. row0 + len(dest)`` of the megatron tensor of ``pm`` at ``layer``, from the HF
    tensors (module docstring); ``mask_rows``: the mask token's row per vocabulary tensor."""
    names = pm.hf_names(layer)
    lo, hi = row0, row0 + dest.shape[0]
    if pm.kind == "copy":
        _read_checked(ckpt, names[0], dest, finite, lo, hi)
    elif pm.kind == "qkv":
        for source, src_row, dst_row, rows in qkv_blocks(mc):
            part = _intersect(lo, hi, dst_row, dst_row + rows)
            if part is not None:
                a, b = part
                _read_checked(ckpt, names[source], dest[a - lo: b - lo], finite,
                              src_row + a - dst_row, src_row + b - dst_row)
    elif pm.kind == "fc1":
        f = ffn_width(pm, mc)
        for source, start in ((0, 0), (1, f)):  # [gate ; up]
            part = _intersect(lo, hi, start, start + f)
            if part is not None:
                a, b = part
                _read_checked(ckpt, names[source], dest[a - lo: b - lo], finite, a - start, b - start)
    elif pm.kind == "vocab":
        part = _intersect(lo, hi, 0, hf_rows)
        if part is not None:
            _read_checked(ckpt, names[0], dest[: part[1] - lo], finite, lo, part[1])
        dest[max(0, hf_rows - lo):].zero_()
        if names[0] in mask_rows and lo <= mask.id < hi:
            dest[mask.id - lo] = mask_rows[names[0]]
    else:  # pragma: no cover - the table has no other kinds
        raise AssertionError(pm.kind)


def convert_hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    *,
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    mask_token: str = "append",
    mask_token_string: str = DEFAULT_MASK_STRING,
    dtype: Optional[str] = None,
    force: bool = False,
    max_seq_len: Optional[int] = None,
    make_vocab_size_divisible_by: int = 128,
    progress: bool = True,
    allow_nonfinite: bool = False,
) -> ConversionResult:
    """Convert ``hf_dir`` into ``out_dir`` (see module docstring). Raises ConversionError; with
    ``allow_nonfinite`` NaN/Inf weights are converted with a warning and a note in
    ``nbdiff.json`` instead."""

    start = time.time()
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir} is not a directory")
    check_output_dir(out_dir, force, (hf_dir,))
    if dtype is not None and dtype not in _TORCH_DTYPE:
        raise ConversionError(f"--dtype must be one of {sorted(_TORCH_DTYPE)}, found {dtype!r}")
    info = parse_hf_config(hf_dir, max_seq_len, make_vocab_size_divisible_by)
    mc0 = info.model_config
    check_layout(mc0, tp, pp, ep)
    notes = list(info.notes)
    maps = param_maps(info.family, mc0)
    with SafetensorsCheckpoint(hf_dir) as ckpt:
        n_params = _check_tensors(ckpt, info, maps, notes)
        dtype = dtype or info.dtype or _DTYPE_OF.get(ckpt.entries["model.embed_tokens.weight"].dtype, "bf16")
        tokenizer = load_tokenizer(hf_dir)
        if tokenizer is None:
            notes.append("the source checkpoint has no tokenizer files; none were written")
        hf_rows = mc0.vocab_size
        mask = resolve_mask(mask_token, tokenizer, hf_rows, mask_token_string, notes)
        vocab = hf_rows + (1 if mask is not None and mask.new_row else 0)
        mc = dataclasses.replace(mc0, vocab_size=vocab)
        if mask is not None and mask.new_row:
            n_params += mc.hidden_size * (1 if mc.tie_embeddings else 2)
        check_free_space(out_dir, n_params * torch.empty((), dtype=_TORCH_DTYPE[dtype]).element_size())
        finite = FiniteCheck(allow_nonfinite)
        mask_rows = {}  # the mean of the existing rows, per vocabulary tensor (read ahead: one pass)
        if mask is not None and mask.init_rows is not None:
            for pm in maps:
                if pm.kind == "vocab":
                    name = pm.hf_names()[0]
                    mask_rows[name] = mean_of_rows(
                        lambda d, a, b, name=name: ckpt.read_rows_into(name, d, a, b),
                        mask.init_rows, mc.hidden_size, _TORCH_DTYPE[dtype])
        with AtomicOutputDir(out_dir, force, (hf_dir,)) as tmp:
            phases = save_model(
                mc, maps, tp, _TORCH_DTYPE[dtype], os.path.join(tmp, WEIGHTS_DIR),
                lambda pm, layer, dest, row0: _fill(pm, layer, dest, row0, ckpt, mc, hf_rows, mask,
                                                    mask_rows, finite),
                progress)
            notes.extend(finite.warn())
            files = write_tokenizer(hf_dir, tmp, tokenizer, mask)
            meta = CheckpointMetadata(
                kind="megatron",
                family=info.family.name,
                hf_architecture=info.family.architecture,
                model_config=mc.to_dict(),
                vocab={"real": vocab, "padded": mc.padded_vocab_size(tp),
                       "stored": mc.padded_vocab_size(tp), "hf": hf_rows,
                       "tokenizer": len(tokenizer) if tokenizer is not None else None},
                mask_token=mask.as_json() if mask is not None else None,
                dtype=dtype,
                weights={"format": "torch_dist", "path": WEIGHTS_DIR, "key_prefix": ""},
                parallel={"target_tp": tp, "target_pp": pp, "written_tp": 1, "written_pp": 1,
                          "reshardable": True, **({"target_ep": ep} if mc.is_moe else {})},
                tokenizer={"files": files,
                           "note": None if files else "no tokenizer files in the source checkpoint"},
                block_size=1,
                attention_layout="causal",
                recipe="none",
                step=0,
                hf_config=info.raw_config,
                source={"path": os.path.abspath(hf_dir), "tool": "tools/convert_hf_to_megatron.py",
                        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
                notes=notes,
            )
            write_metadata(tmp, meta)
    seconds = time.time() - start
    mask_txt = (f", mask token id {mask.id} ({mask.method})" if mask is not None else ", no mask token")
    summary = (
        f"converted {hf_dir} -> {out_dir}: {n_params:,} parameters, {dtype}, {info.family.architecture}, "
        f"target layout TP={tp} PP={pp}{f' EP={ep}' if mc.is_moe else ''} (torch_dist, reshardable), "
        f"{f'{mc.num_experts} experts top-{mc.moe_topk}, ' if mc.is_moe else ''}vocab {vocab} padded to "
        f"{mc.padded_vocab_size(tp)}{mask_txt}, {seconds:.1f} s (streaming "
        f"{phases['read'] + phases['write']:.1f} s: read {phases['read']:.1f} s, write {phases['write']:.1f} s)"
    )
    return ConversionResult(os.path.abspath(out_dir), n_params, dtype, seconds, meta, summary)
