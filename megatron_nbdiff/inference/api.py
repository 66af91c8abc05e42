"""``generate(model, prompts, **options)``: the Python entry point of decoding."""
from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Optional, Sequence, Union

from ..data.jsonl import iter_jsonl
from .decode import DecodeOptions, block_decode, full_decode
from .runner import DecodingError, ModelRunner

SINGLE_STREAM_LAYOUTS = ("single_annealed", "bidirectional")


def load_runner(path: str, *, device=None, dtype: Optional[str] = None, use_cache: bool = True,
                tp: Optional[int] = None, ep: Optional[int] = None, allow_pickle: bool = False) -> ModelRunner:
    """A runner for an exported HF directory, a Megatron checkpoint, or a training run folder
    (its newest complete checkpoint). HF directories without ``nbdiff.json`` load for AR decoding
    only. ``tp`` / ``ep``: the tensor- and expert-parallel sizes of a Megatron checkpoint's runner
    (None: those of the initialised process groups, else 1; an HF model runs whole on one process).
    ``allow_pickle``: let an HF directory without safetensors load its pickled
    ``pytorch_model.bin`` (only for a file you trust: unpickling can run code)."""
    from ..errors import NBDiffError
    from ..training.checkpointing import resolve_checkpoint

    if not isinstance(path, (str, os.PathLike)):
        raise DecodingError(f"model must be a checkpoint directory or a ModelRunner, found {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise DecodingError(f"model directory not found: {path}")
    try:
        path = resolve_checkpoint(path)
    except NBDiffError as exc:
        raise DecodingError(str(exc)) from None
    meta_path = os.path.join(path, "nbdiff.json")
    kind = None
    if os.path.isfile(meta_path):
        try:
            with open(meta_path) as f:
                kind = json.load(f).get("kind")
        except (OSError, ValueError) as exc:
            raise DecodingError(f"cannot read {meta_path}: {exc}") from None
    if kind == "megatron":
        from .megatron_runner import MegatronRunner

        return MegatronRunner.from_checkpoint(path, tp=tp, ep=ep, dtype=dtype, use_cache=use_cache)
    if kind in (None, "hf") and os.path.isfile(os.path.join(path, "config.json")):
        for name, size in (("tp", tp), ("ep", ep)):
            if size not in (None, 1):
                raise DecodingError(f"{name}={size}: {path} is a Hugging Face model, which runs whole on "
                                    f"one process; {name} applies to Megatron checkpoints")
        from .hf_runner import HFRunner

        return HFRunner.from_pretrained(path, device=device, dtype=dtype, use_cache=use_cache,
                                        allow_pickle=allow_pickle)
    if kind is None:
        raise DecodingError(
            f"{path} has neither nbdiff.json nor config.json: not an exported HF model, a converted "
            "or adapted Megatron checkpoint, or a training run folder"
        )
    raise DecodingError(f"{meta_path}: unknown checkpoint kind {kind!r}")


def read_prompt_file(path: str) -> list[tuple[int, dict]]:
    """``(line number, object)`` for every non-empty line of a JSONL prompt file; each object has
    ``prompt`` (text) or ``prompt_ids`` (token ids). Clear errors name the file and line."""
    if not os.path.isfile(path):
        raise DecodingError(f"prompt file not found: {path}")
    with open(path, "rb") as f:
        data = f.read()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DecodingError(f"{path} line {line}: not valid UTF-8") from None
    rows = []
    for n, row in iter_jsonl(path, DecodingError):
        if not isinstance(row, dict) or ("prompt" not in row and "prompt_ids" not in row):
            raise DecodingError(f"{path} line {n}: expected an object with 'prompt' or 'prompt_ids'")
        rows.append((n, row))
    if not rows:
        raise DecodingError(f"{path} holds no prompts")
    return rows


def _to_ids(x: Union[str, Sequence[int]], runner: ModelRunner, what: str) -> list[int]:
    if isinstance(x, str):
        if runner.tokenizer is None:
            raise DecodingError(f"{what} is text but {runner.info.source} has no tokenizer: pass token ids")
        return runner.tokenizer.encode(x)
    try:
        ids = [int(t) for t in x]
    except (TypeError, ValueError):
        raise DecodingError(f"{what} must be a string or a list of token ids, found {x!r}") from None
    return ids


def check_mode(info, mode: str, error: type = DecodingError) -> None:
    """Refuse a diffusion mode for a model whose ``nbdiff.json`` is missing."""
    if mode != "ar" and not info.has_metadata:
        raise error(
            f"{info.source} has no nbdiff.json, so its block size and mask token are unknown: "
            f"mode {mode!r} cannot run; mode 'ar' (plain autoregressive decoding) still works"
        )


def resolve_block_size(info, mode: str, block_size: Optional[int], error: type = DecodingError) -> int:
    """The block size a decoding ``mode`` runs at for the model described by ``info`` (a
    :class:`~megatron_nbdiff.inference.runner.RunnerInfo`), with the one set of checks and warnings
    shared by :func:`generate` and the lm-eval adapter: ``ar`` is block size 1; ``block`` defaults
    to the trained block size and warns when it differs or when the model is single-stream;
    ``full`` warns for a dual-stream model; diffusion modes need ``nbdiff.json`` and a mask token.
    ``error`` is the exception type raised (the adapter passes its own)."""
    check_mode(info, mode, error)
    if mode == "ar":
        if block_size not in (None, 1):
            raise error(f"mode=ar decodes one token per pass; block_size {block_size} needs mode=block")
        return 1
    bs = int(block_size) if block_size is not None else (info.block_size or 1)
    if mode == "block":
        if info.block_size is not None and bs != info.block_size:
            warnings.warn(f"block size {bs} differs from the {info.block_size} the model in {info.source} was "
                          "trained for; expect lower quality", stacklevel=3)
        if info.layout in SINGLE_STREAM_LAYOUTS:
            warnings.warn(f"{info.source} was trained with the single-stream layout {info.layout!r}: mode=full "
                          "is its native decoding", stacklevel=3)
    elif info.layout not in SINGLE_STREAM_LAYOUTS:
        warnings.warn(f"{info.source} was trained with layout {info.layout!r}, not a single-stream one: "
                      "full-sequence decoding is outside its training", stacklevel=3)
    if (mode == "full" or bs > 1) and info.mask_token_id is None:
        raise error(f"{info.source}: no mask token id, so mode {mode!r} cannot decode")
    return bs


def prepare_prompts(runner: ModelRunner, prompts: Sequence[Any], suffix: Any, opts: DecodeOptions,
                    labels: Optional[Sequence[str]] = None) -> tuple[list[list[int]], Optional[list[int]]]:
    """Token ids of ``prompts`` and ``suffix`` (text or ids), checked before any decoding: every
    prompt non-empty, every id in the vocabulary, and prompt + suffix + ``max_new_tokens`` within
    the model's maximum length. ``labels`` name the prompts in errors (``prompt i``)."""
    labels = list(labels) if labels is not None else [f"prompt {i}" for i in range(len(prompts))]
    suffix_ids = _to_ids(suffix, runner, "suffix") if suffix is not None else None
    ids = []
    for label, p in zip(labels, prompts):
        p_ids = _to_ids(p, runner, label)
        if not p_ids:
            raise DecodingError(f"{label} is empty")
        for what, seq in ((label, p_ids), ("suffix", suffix_ids or [])):
            bad = [t for t in seq if not 0 <= t < runner.info.vocab_size]
            if bad:
                raise DecodingError(
                    f"{what}: token ids must lie in [0, {runner.info.vocab_size}), found {bad[0]}"
                )
        ids.append(p_ids)
    check_lengths(ids, opts.max_new_tokens, len(suffix_ids or ()), runner.info, labels)
    return ids, suffix_ids


def check_lengths(ids: Sequence[Sequence[int]], max_new_tokens: int, suffix_len: int, info,
                  labels: Optional[Sequence[str]] = None) -> None:
    """Refuse a prompt that, with the suffix and ``max_new_tokens``, needs more positions than the
    model's maximum length (``info.max_length``; no check when it is unknown)."""
    limit = info.max_length
    if not limit:
        return
    extra = suffix_len
    for i, p in enumerate(ids):
        need = len(p) + extra + max_new_tokens
        if need > limit:
            label = labels[i] if labels is not None else f"prompt {i}"
            what = f"{label} has {len(p)} tokens" + (f", the suffix {extra}" if extra else "")
            room = limit - len(p) - extra
            fix = (f"lower max_new_tokens to {room} or shorten the prompt" if room >= 1
                   else "shorten the prompt")
            raise DecodingError(
                f"{what}; with max_new_tokens {max_new_tokens} that needs {need} positions, more "
                f"than the model's maximum length of {limit} ({info.source}): {fix}"
            )


def generate(model: Union[str, ModelRunner], prompts: Union[str, Sequence[Any]], **options: Any) -> list[dict]:
    """Decode ``prompts`` (strings or lists of token ids) with ``model`` (a checkpoint directory or
    a loaded runner). Options use the CLI's names: ``mode`` (block, full, ar), ``block_size``,
    ``threshold``, ``sub_blocks``, ``confidence``, ``max_new_tokens``, ``temperature`` (0: greedy),
    ``top_p``, ``steps``, ``suffix``, ``seed``, ``stop_at_eos``, ``stop_token_ids`` (more ids that
    end a row, as EOS does); loading options ``device``, ``dtype``, ``use_cache``, ``tp``,
    ``allow_pickle``. Returns one ``{"token_ids", "text", "stats"}`` per prompt (``token_ids``:
    generated ids only; ``text`` when a tokenizer is present). A prompt whose tokens, suffix and
    ``max_new_tokens`` exceed the model's maximum length is refused."""
    load_keys = {"device", "dtype", "use_cache", "tp", "allow_pickle"}
    fields = {f.name for f in dataclasses.fields(DecodeOptions)}
    unknown = sorted(set(options) - fields - load_keys)
    if unknown:
        raise DecodingError(f"unknown option(s) {unknown}; known: {sorted(fields | load_keys)}")
    if isinstance(model, ModelRunner):
        runner = model
    else:
        runner = load_runner(model, **{k: v for k, v in options.items() if k in load_keys})
    opts = DecodeOptions(**{k: v for k, v in options.items() if k in fields})
    opts.validate()
    info = runner.info
    if isinstance(prompts, str) or (
        isinstance(prompts, (list, tuple)) and prompts and all(isinstance(t, int) for t in prompts)
    ):
        prompts = [prompts]
    if not prompts:
        raise DecodingError("no prompts given")
    bs = resolve_block_size(info, opts.mode, opts.block_size)
    ids, opts.suffix = prepare_prompts(runner, prompts, opts.suffix, opts)
    if opts.mode == "full":
        results = full_decode(runner, ids, opts)
    else:
        results = block_decode(runner, ids, opts, block_size=bs)
    out = []
    for r in results:
        item = {"token_ids": r.token_ids, "stats": r.stats}
        if runner.tokenizer is not None:
            item["text"] = runner.tokenizer.decode(r.token_ids)
        out.append(item)
    return out
