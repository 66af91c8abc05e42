"""Held-out losses and decoding speed of a model through its decoding runner (HF or Megatron).

Sequences
---------
:func:`load_sequences` reads a megatron-core indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``, as
written by ``tools/preprocess_data.py``) or a JSONL file of texts (tokenised with the model's
tokenizer, each document followed by its end-of-document token like the preprocessing tool
does). Every document is cut into consecutive windows of ``seq_length`` tokens; windows shorter
than 2 tokens are dropped and no window spans two documents.

Losses (:func:`heldout_losses`)
-------------------------------
For a window ``x_0 .. x_{L-1}`` the targets are ``x_1 .. x_{L-1}`` (``N = L - 1`` per window; the
first token has no prediction, as in training). All averages below divide by the total ``N`` over
all windows unless said otherwise; cross-entropies are in nats, softmax over the runner's whole
vocabulary (the appended mask token included, as in the training losses).

* ``ar.loss``: next-token cross-entropy of the clean causal stream, the logit at ``j - 1``
  scoring ``x_j`` (``runner.prefill`` of ``x_0``, then ``runner.commit`` of ``x_1 .. x_{L-2}``).
  This equals the HF model's own causal-LM loss on the window.
* ``block[B]`` (block diffusion, docs/method.md, "Losses"; evaluated the way block decoding sees a
  sequence): blocks of ``B`` positions start at the window's first token (the last one may be
  shorter). Noise: :func:`megatron_nbdiff.noise.mask_tokens` with ``block_size=B``, one ``t`` per
  block (``t ~ U(eps, 1)``, ``uniform`` or ``stratified`` sampling), every token except a
  block's first masked with probability ``t``; seed ``seed``, step ``step``, sample index = the
  window's index in the sequence list, so the noise of a window depends on nothing else (not
  on the batch size). Block ``k``'s noisy copy runs bidirectionally against the clean tokens
  before it, which it sees causally: this is exactly what the dual-stream attention gives a
  noisy block (``runner.full`` of the noisy block for ``k = 0``; ``runner.prefill`` of the clean
  first block, then ``runner.denoise`` of each noisy block and ``runner.commit`` of its clean
  copy). A masked ``x_j`` is scored by the noisy logit at ``j - 1``. Reported:

  - ``diffusion_loss``: ``sum_masked CE / N``, the training definition with weight 1 (NBDiff);
    0 at ``B = 1``, where no token is masked, as in training;
  - ``diffusion_loss_inv_t``: ``sum_masked CE / t / N`` (the 1/t-weighted training definition);
  - ``masked_ce``: ``sum_masked CE / #masked`` (None when nothing is masked);
  - ``nll_bound``: ``(sum_{j % B == 0} AR CE_j + sum_masked CE_j / t) / N``, a Monte-Carlo
    estimate of the block-diffusion negative-log-likelihood upper bound per token: each block's
    first token is produced by the causal pass (exact term), the rest by masked diffusion (the
    ELBO term, the ``(0, eps)`` part of the ``t`` integral left out). At ``B = 1`` every target is
    a block's first token and ``nll_bound`` equals ``ar.loss`` exactly;
  - ``masked_tokens``, ``forward_passes``.

* ``single_stream`` (docs/method.md, "Single-stream diffusion (DiffuLLaMA)"; computed for
  single-stream layouts, or on request): one
  ``t`` per window, every target masked with probability ``t`` (``block_size=None``,
  ``t_mode="per_sequence"``), one bidirectional pass over the noisy window (``runner.full``);
  ``diffusion_loss`` is the 1/t-weighted DiffuLLaMA loss ``sum_masked CE / t / N`` (also its
  ``nll_bound``), plus ``diffusion_loss_weight_one`` and ``masked_ce``.

Decoding speed (:func:`decoding_speed`)
---------------------------------------
Prompts are decoded with :func:`megatron_nbdiff.inference.generate` in block mode at each threshold
(full mode: once, it has no threshold), and once with ``mode="ar"`` as the baseline, for
``max_new_tokens`` tokens each, ignoring EOS so every
setting produces the same number of tokens. ``tokens_per_forward`` = generated tokens / forward
passes summed over prompts (a pass shared by a batch counts once per row);
``tokens_per_s`` = generated tokens / wall seconds of the decoding calls, after one warm-up call.
"""
from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from ..data.jsonl import iter_jsonl
from ..inference.runner import ModelRunner
from .block_walk import walk_blocks
from .common import EvaluationError, is_single_stream

__all__ = ["load_sequences", "heldout_losses", "decoding_speed", "parse_int_list", "parse_float_list"]


def parse_int_list(text: str, what: str, low: int = 1) -> list[int]:
    try:
        out = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EvaluationError(f"{what} must be comma-separated integers, found {text!r}") from None
    if not out:
        raise EvaluationError(f"{what} is empty")
    bad = [x for x in out if x < low]
    if bad:
        raise EvaluationError(f"{what} must be >= {low}, found {bad}")
    return sorted(dict.fromkeys(out))


def parse_float_list(text: str, what: str) -> list[float]:
    try:
        out = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise EvaluationError(f"{what} must be comma-separated numbers, found {text!r}") from None
    if not out:
        raise EvaluationError(f"{what} is empty")
    return sorted(dict.fromkeys(out))


# -- sequences ------------------------------------------------------------------------------------
def _read_jsonl_texts(path: str, json_key: str) -> list[str]:
    texts = []
    for n, obj in iter_jsonl(path, EvaluationError):
        if not isinstance(obj, dict) or not isinstance(obj.get(json_key), str):
            raise EvaluationError(f"{path} line {n}: expected an object with a string {json_key!r}")
        texts.append(obj[json_key])
    return texts


def _indexed_prefix(source: str) -> Optional[str]:
    for prefix in (source, source[:-4] if source.endswith((".bin", ".idx")) else None):
        if prefix and os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"):
            return prefix
    return None


def load_sequences(source: str, *, tokenizer=None, seq_length: int = 256, max_sequences: Optional[int] = None,
                   json_key: str = "text", append_eod: bool = True) -> list[list[int]]:
    """Token windows from an indexed-dataset prefix or a JSONL file (module docstring)."""
    if seq_length < 2:
        raise EvaluationError(f"seq_length must be >= 2, found {seq_length}")
    if max_sequences is not None and max_sequences < 1:
        raise EvaluationError(f"max_sequences must be >= 1, found {max_sequences}")
    prefix = _indexed_prefix(source)
    if prefix is not None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        from ..data.datasets import check_prefix
        from ..errors import DataError

        try:
            check_prefix(prefix)  # the one indexed-dataset check (header, counts, sizes)
        except DataError as exc:
            raise EvaluationError(str(exc)) from None
        try:
            ds = IndexedDataset(prefix)
        except Exception as exc:  # noqa: BLE001 - megatron raises assertion and struct errors
            raise EvaluationError(f"{prefix}.bin/.idx: not a readable indexed dataset ({exc})") from None
        docs = (ds[i].tolist() for i in range(len(ds)))
    elif os.path.isfile(source):
        if tokenizer is None:
            raise EvaluationError(f"{source} holds text but the model has no tokenizer: give an indexed dataset")
        eod = tokenizer.eod_id if append_eod else None

        def encoded():
            for text in _read_jsonl_texts(source, json_key):
                yield list(tokenizer.encode(text)) + ([eod] if eod is not None else [])

        docs = encoded()
    else:
        raise EvaluationError(f"data not found: {source} (expected a JSONL file or an indexed-dataset prefix "
                              "with PREFIX.bin and PREFIX.idx)")
    out: list[list[int]] = []
    for doc in docs:
        for s in range(0, len(doc), seq_length):
            window = [int(t) for t in doc[s:s + seq_length]]
            if len(window) >= 2:
                out.append(window)
                if max_sequences is not None and len(out) >= max_sequences:
                    return out
    if not out:
        raise EvaluationError(f"{source}: no window of at least 2 tokens")
    return out


# -- losses ---------------------------------------------------------------------------------------
def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    b, n, v = logits.shape
    return F.cross_entropy(logits.reshape(b * n, v).float(), targets.reshape(b * n), reduction="none").view(b, n)


class _Sums:
    def __init__(self):
        self.masked = 0
        self.ce_masked = 0.0
        self.ce_masked_inv_t = 0.0
        self.first_ar = 0.0
        self.passes = 0

    def entry(self, n: int, weight_one_key: str = "diffusion_loss") -> dict:
        return {
            weight_one_key: self.ce_masked / n,
            "diffusion_loss_inv_t": self.ce_masked_inv_t / n,
            "masked_ce": self.ce_masked / self.masked if self.masked else None,
            "nll_bound": (self.first_ar + self.ce_masked_inv_t) / n,
            "masked_tokens": self.masked,
            "forward_passes": self.passes,
        }


def _masked_sums(sums: _Sums, ce: torch.Tensor, masked: torch.Tensor, inv_t: torch.Tensor) -> None:
    """``ce``, ``masked`` and ``inv_t`` aligned on targets."""
    m = masked.float()
    sums.masked += int(masked.sum())
    sums.ce_masked += float((ce * m).double().sum())
    sums.ce_masked_inv_t += float((ce * inv_t * m).double().sum())


@torch.no_grad()
def heldout_losses(runner: ModelRunner, sequences: Sequence[Sequence[int]], block_sizes: Sequence[int] = (1,), *,
                   seed: int = 0, step: int = 0, eps: float = 1e-3, t_sampling: str = "uniform",
                   batch_size: int = 8, single_stream: Optional[bool] = None, progress: bool = False) -> dict:
    """Held-out AR loss, block-diffusion losses per block size and (optionally) the single-stream
    diffusion loss of ``sequences`` (module docstring for the exact definitions)."""
    from tqdm import tqdm

    from ..noise import mask_tokens

    if not sequences:
        raise EvaluationError("no sequences to evaluate")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, found {batch_size}")
    block_sizes = sorted(dict.fromkeys(int(b) for b in block_sizes))
    if any(b < 1 for b in block_sizes):
        raise EvaluationError(f"block sizes must be >= 1, found {block_sizes}")
    if t_sampling not in ("uniform", "stratified", "antithetic"):
        raise EvaluationError(f"t_sampling must be uniform, stratified or antithetic, found {t_sampling!r}")
    mask_id = runner.info.mask_token_id
    if single_stream is None:
        single_stream = is_single_stream(runner) and mask_id is not None
    if mask_id is None and (single_stream or any(b > 1 for b in block_sizes)):
        raise EvaluationError(f"{runner.info.source} has no mask token: only block size 1 (the AR loss) can be "
                              "evaluated")
    seqs = [[int(t) for t in s] for s in sequences]
    V = runner.info.vocab_size
    for i, s in enumerate(seqs):
        if len(s) < 2:
            raise EvaluationError(f"sequence {i} has {len(s)} token(s); at least 2 are needed")
        if min(s) < 0 or max(s) >= V:
            raise EvaluationError(f"sequence {i}: token ids must lie in [0, {V}), found {min(s)}..{max(s)} "
                                  "(data tokenised with another tokenizer?)")
    dev = runner.device
    noise_kw = dict(mask_token_id=mask_id, seed=seed, step=step, eps=eps, t_sampling=t_sampling,
                    weight_mode="inv_t") if mask_id is not None else {}
    by_len = defaultdict(list)
    for i, s in enumerate(seqs):
        by_len[len(s)].append(i)
    batches = [(L, by_len[L][k:k + batch_size]) for L in sorted(by_len) for k in range(0, len(by_len[L]), batch_size)]
    n_targets = sum(len(s) - 1 for s in seqs)
    ar_sum = 0.0
    ar_passes = 0
    block = {B: _Sums() for B in block_sizes}
    single = _Sums()
    bar = tqdm(total=len(seqs), disable=not progress, desc="held-out losses", unit="seq")
    for L, idx in batches:
        tokens = torch.tensor([seqs[i] for i in idx], dtype=torch.long, device=dev)
        sample_index = torch.tensor(idx, dtype=torch.long, device=dev)
        b = tokens.shape[0]
        # clean causal stream: logits 0..L-2 score tokens 1..L-1
        logits = runner.prefill(tokens[:, :1].tolist())[:, None]
        ar_passes += 1
        if L > 2:
            logits = torch.cat([logits, runner.commit(tokens[:, 1:L - 1])], 1)
            ar_passes += 1
        ar_ce = _ce(logits, tokens[:, 1:])  # [b, L-1], entry j-1 scores token j
        del logits
        ar_sum += float(ar_ce.double().sum())
        for B in block_sizes:
            sums = block[B]
            first = torch.zeros(L - 1, dtype=torch.bool, device=dev)
            first[B - 1::B] = True  # targets j = 1..L-1 with j % B == 0
            sums.first_ar += float(ar_ce[:, first].double().sum())
            if B == 1:
                continue
            padded_len = math.ceil(L / B) * B
            padded = torch.zeros(b, padded_len, dtype=torch.long, device=dev)
            padded[:, :L] = tokens
            loss_mask = torch.zeros(b, padded_len, dtype=torch.bool, device=dev)
            loss_mask[:, :L] = True
            noise = mask_tokens(padded, block_size=B, sample_index=sample_index, loss_mask=loss_mask,
                                t_mode="per_block", keep_block_first=True, **noise_kw)
            noisy, masked, inv_t = noise.noisy_ids[:, :L], noise.is_masked[:, :L], noise.weight[:, :L]
            diff_ce = torch.zeros(b, L - 1, device=dev)
            for s, e, _, lg in walk_blocks(runner, tokens, noisy, masked, B):
                if lg is not None:
                    sums.passes += 1
                    diff_ce[:, s:e - 1] = _ce(lg, tokens[:, s + 1:e])
                sums.passes += int(e < L)  # the commit pass after every block but the last
            _masked_sums(sums, diff_ce, masked[:, 1:], inv_t[:, 1:])
        if single_stream:
            noise = mask_tokens(tokens, block_size=None, sample_index=sample_index, t_mode="per_sequence",
                                keep_block_first=True, **noise_kw)
            lg = runner.full(noise.noisy_ids, torch.ones(b, L, dtype=torch.bool, device=dev))
            single.passes += 1
            _masked_sums(single, _ce(lg[:, :-1], tokens[:, 1:]), noise.is_masked[:, 1:], noise.weight[:, 1:])
        bar.update(b)
    bar.close()
    ar_loss = ar_sum / n_targets
    report = {
        "num_sequences": len(seqs),
        "num_target_tokens": n_targets,
        "max_length": max(len(s) for s in seqs),
        "noise": dict(seed=seed, step=step, eps=eps, t_sampling=t_sampling),
        "ar": {"loss": ar_loss, "ppl": math.exp(min(ar_loss, 700.0)), "forward_passes": ar_passes},
        "block": {},
    }
    for B in block_sizes:
        entry = block[B].entry(n_targets)
        entry["ppl_bound"] = math.exp(min(entry["nll_bound"], 700.0))
        report["block"][str(B)] = entry
    if single_stream:
        entry = single.entry(n_targets, weight_one_key="diffusion_loss_weight_one")
        entry["diffusion_loss"] = entry["diffusion_loss_inv_t"]
        report["single_stream"] = entry
    return report


# -- decoding speed -------------------------------------------------------------------------------
def decoding_speed(runner: ModelRunner, prompts: Sequence[Union[str, Sequence[int]]], thresholds: Sequence[float], *,
                   mode: str = "block", block_size: Optional[int] = None, max_new_tokens: int = 64,
                   batch_size: int = 1, sub_blocks: int = 1, confidence: str = "prob",
                   include_ar: bool = True, progress: bool = False) -> list[dict]:
    """Tokens per forward pass and tokens per second at each threshold (module docstring); the
    first record is the AR baseline when ``include_ar``."""
    from tqdm import tqdm

    from ..inference import generate

    if not prompts:
        raise EvaluationError("no prompts to decode")
    if batch_size < 1:
        raise EvaluationError(f"batch_size must be >= 1, found {batch_size}")
    for th in thresholds:
        if not 0.0 < float(th) <= 1.0:
            raise EvaluationError(f"threshold must lie in (0, 1], found {th}")
    if mode == "full":  # full-sequence decoding has no threshold: one record
        settings = [dict(mode="full", confidence=confidence)]
    elif mode == "block":
        settings = [dict(mode="block", threshold=float(th), block_size=block_size, sub_blocks=sub_blocks,
                         confidence=confidence) for th in thresholds]
    elif mode == "ar":
        settings = []
    else:
        raise EvaluationError(f"mode must be block, full or ar, found {mode!r}")
    if include_ar or mode == "ar":
        settings.insert(0, dict(mode="ar"))
    prompts = list(prompts)
    generate(runner, prompts[:1], max_new_tokens=min(4, max_new_tokens), stop_at_eos=False, **settings[-1])  # warm-up
    records = []
    bar = tqdm(total=len(settings) * len(prompts), disable=not progress, desc="decoding speed", unit="prompt")
    for kw in settings:
        tokens = passes = 0
        seconds = 0.0
        for k in range(0, len(prompts), batch_size):
            chunk = prompts[k:k + batch_size]
            t0 = time.perf_counter()
            outs = generate(runner, chunk, max_new_tokens=max_new_tokens, stop_at_eos=False, **kw)
            seconds += time.perf_counter() - t0
            for out in outs:
                tokens += len(out["token_ids"])
                passes += int(out["stats"]["forward_passes"])
            bar.update(len(chunk))
        rec = dict(mode=kw["mode"], threshold=kw.get("threshold"),
                   block_size={"ar": 1, "full": None}.get(kw["mode"], block_size or runner.info.block_size or 1),
                   prompts=len(prompts), tokens=tokens, forward_passes=passes, seconds=seconds,
                   tokens_per_forward=tokens / passes if passes else None,
                   tokens_per_s=tokens / seconds if seconds > 0 else None)
        records.append(rec)
    bar.close()
    return records
