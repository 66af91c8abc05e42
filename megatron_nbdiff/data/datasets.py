"""The data component of training: indexed-dataset checks, dataset building, micro-batches and
document ids.

Data order is a pure function of the step: the ``j``-th sequence of step ``s`` is sample
``s * global_batch_size + j`` of the dataset (see :func:`micro_batches`), so a resume or another
data-parallel layout needs no loader state (docs/method.md, "Noise").

Before megatron-core opens a dataset (its reader fails with bare assertions), every prefix is
checked here: both files present, a megatron index header, counts and sizes that agree
(:func:`check_prefix`), and every token id inside the model's vocabulary and different from the
mask token (:func:`scan_tokens`, one pass over the ``.bin``, remembered per content fingerprint).
Megatron's sample-index cache is keyed by each prefix's :func:`fingerprint` (sizes and the bytes at
both ends of both files), so a dataset re-tokenised in place never reuses stale indices.

Loss masks (``data.loss_mask``, docs/method.md "Instruction tuning"): each prefix ``P`` then has a
sibling indexed dataset ``P.loss_mask`` (uint8, one value per token, the same sequences and
documents). :func:`check_loss_mask_prefix` refuses a sibling that is missing or does not align;
:class:`LossMaskedGPTDataset` reads, for every packed sample, the mask of exactly the token spans
megatron's sample index packs into it; :func:`micro_batches` then carries it next to the tokens.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import struct
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..errors import DataError
from ..fileio import atomic_write

_HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
_EDGE_BYTES = 1 << 20


class TokenizerInfo:
    """What megatron's GPTDataset needs of a tokenizer (end-of-document id, vocabulary size), plus
    the data fingerprints that megatron hashes into its cache key."""

    def __init__(self, eod: int, vocab_size: int, fingerprints: Sequence[str] = ()):
        self.eod = eod
        self.vocab_size = vocab_size
        self.unique_identifiers = {"class": "nbdiff-tokenizer", "eod": eod, "vocab_size": vocab_size,
                                   "data": list(fingerprints)}


def _index_header(prefix: str) -> tuple[type, int, int]:
    """(numpy token dtype, sequence count, document count) from ``prefix.idx``; DataError if it is
    not a megatron index."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx = prefix + ".idx"
    with open(idx, "rb") as f:
        head = f.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES or head[:9] != _INDEX_HEADER:
        raise DataError(f"data prefix {prefix!r}: unreadable indexed dataset ({idx} has no megatron index header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:_HEADER_BYTES])
    if version != 1:
        raise DataError(f"data prefix {prefix!r}: unreadable indexed dataset (index version {version}, expected 1)")
    try:
        dtype = DType.dtype_from_code(code)
    except Exception:  # noqa: BLE001 - megatron raises ValueError/KeyError for bad codes
        raise DataError(f"data prefix {prefix!r}: unreadable indexed dataset (dtype code {code})") from None
    return dtype, n_seq, n_doc


def check_prefix(prefix: str) -> None:
    """Validate an indexed dataset's two files (presence, header, counts, sizes) with messages
    that name the file and what disagrees."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (bin_, idx):
        if not os.path.isfile(path):
            raise DataError(f"data prefix {prefix!r}: missing {path}")
    dtype, n_seq, n_doc = _index_header(prefix)
    itemsize = np.dtype(dtype).itemsize
    need = _HEADER_BYTES + n_seq * 4 + n_seq * 8 + n_doc * 8
    if os.path.getsize(idx) < need:
        raise DataError(f"data prefix {prefix!r}: unreadable indexed dataset ({idx} is truncated)")
    with open(idx, "rb") as f:
        f.seek(_HEADER_BYTES)
        lengths = np.frombuffer(f.read(4 * n_seq), dtype=np.int32)
    expected = int(lengths.astype(np.int64).sum()) * itemsize
    if os.path.getsize(bin_) != expected:
        raise DataError(
            f"data prefix {prefix!r}: unreadable indexed dataset ({bin_} has {os.path.getsize(bin_)} "
            f"bytes, the index expects {expected})"
        )


def fingerprint(prefix: str) -> str:
    """A content fingerprint of a dataset pair: both sizes and a hash of the first and last MiB of
    both files. Re-tokenising a corpus in place changes it."""
    h = hashlib.sha256()
    for path in (prefix + ".idx", prefix + ".bin"):
        size = os.path.getsize(path)
        h.update(f"{os.path.basename(path)}:{size};".encode())
        with open(path, "rb") as f:
            h.update(f.read(_EDGE_BYTES))
            if size > _EDGE_BYTES:
                f.seek(max(_EDGE_BYTES, size - _EDGE_BYTES))
                h.update(f.read())
    return h.hexdigest()[:32]


def scan_tokens(prefix: str, watch: Optional[int] = None, cache_dir: Optional[str] = None,
                chunk: int = 1 << 24) -> dict:
    """One pass over ``prefix.bin``: ``{"max": largest id, "watch": occurrences of id watch}``.
    Remembered in ``cache_dir`` under the prefix's fingerprint, so a resume does not read the
    data again."""
    key = f"{fingerprint(prefix)}-{watch}"
    cached = os.path.join(cache_dir, f"token_scan-{key}.json") if cache_dir else None
    if cached and os.path.isfile(cached):
        try:
            with open(cached) as f:
                return json.load(f)
        except (OSError, ValueError):
            pass  # scanned again below
    dtype, _, _ = _index_header(prefix)
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r") if os.path.getsize(prefix + ".bin") else np.zeros(0, dtype)
    top, seen = -1, 0
    for start in range(0, len(data), chunk):
        part = np.asarray(data[start:start + chunk])
        top = max(top, int(part.max()))
        if watch is not None:
            seen += int(np.count_nonzero(part == watch))
    summary = {"max": top, "watch": seen}
    if cached and os.path.isdir(cache_dir):
        atomic_write(cached, json.dumps(summary))
    return summary


def check_token_ids(prefix: str, vocab_size: int, mask_token_id: Optional[int], tokenizer_vocab: int,
                    cache_dir: Optional[str] = None) -> None:
    """Refuse data the model cannot embed (an id ``>= vocab_size``), data made with another
    tokenizer (an id ``>= tokenizer_vocab``, the data tokenizer's size), and data that contains the
    mask token."""
    scan = scan_tokens(prefix, mask_token_id, cache_dir)
    for limit, what in ((vocab_size, "the model's vocabulary"), (tokenizer_vocab, "the data tokenizer's vocabulary")):
        if scan["max"] >= limit:
            raise DataError(
                f"data prefix {prefix!r}: token id {scan['max']} is outside {what} (size {limit}); "
                "was it tokenised with another tokenizer?"
            )
    if scan["watch"]:
        raise DataError(
            f"data prefix {prefix!r}: the data contains the mask token id {mask_token_id} "
            f"({scan['watch']} times)"
        )


def check_loss_mask_prefix(prefix: str, cache_dir: Optional[str] = None) -> None:
    """Refuse a token dataset ``prefix`` whose loss-mask sibling ``prefix.loss_mask`` is missing,
    unreadable, not uint8, holds other sequences or documents than the tokens, or a value other
    than 0 and 1 (:func:`megatron_nbdiff.data.chat.check_loss_mask`; each message names the file
    and what disagrees). The pass over the mask's values is remembered in ``cache_dir`` under both
    datasets' fingerprints, so a resume or another rank only re-checks the indices."""
    from .chat import check_loss_mask, loss_mask_prefix

    check_prefix(prefix)
    for path in (loss_mask_prefix(prefix) + ".bin", loss_mask_prefix(prefix) + ".idx"):
        if not os.path.isfile(path):  # before fingerprinting it
            check_loss_mask(prefix, values=False)
    key = f"{fingerprint(prefix)}-{fingerprint(loss_mask_prefix(prefix))}"
    cached = os.path.join(cache_dir, f"loss_mask_check-{key}.json") if cache_dir else None
    known = bool(cached and os.path.isfile(cached))
    summary = check_loss_mask(prefix, values=not known)
    if cached and not known and os.path.isdir(cache_dir):
        atomic_write(cached, json.dumps(summary))


def check_loss_masks(data_cfg, cache_dir: Optional[str] = None) -> None:
    """:func:`check_loss_mask_prefix` for every prefix of ``data.train`` when ``data.loss_mask``
    is on; nothing otherwise."""
    if data_cfg.loss_mask:
        for prefix in data_prefixes(data_cfg.train):
            check_loss_mask_prefix(prefix, cache_dir)


@functools.lru_cache(maxsize=1)
def loss_masked_gpt_dataset_class() -> type:
    """:class:`LossMaskedGPTDataset`, defined on first use (megatron-core is imported lazily)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from .chat import loss_mask_prefix

    class LossMaskedGPTDataset(GPTDataset):
        """megatron-core's ``GPTDataset`` whose samples also carry ``token_loss_mask`` ``[L]``
        (int64, aligned with ``tokens``: entry ``j`` is the mask of token ``j``), read from the
        sibling ``<prefix>.loss_mask`` over the same (sequence, offset, length) spans that the
        sample index packs into the sample; padding gets 0. The tokens are read again over those
        spans and compared with megatron's, so a mask can never be read from other spans."""

        def __init__(self, indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config):
            super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
            self.loss_mask_dataset = IndexedDataset(loss_mask_prefix(dataset_path), multimodal=False, mmap=True)
            if not np.array_equal(self.loss_mask_dataset.sequence_lengths, indexed_dataset.sequence_lengths):
                raise DataError(f"loss-mask dataset {loss_mask_prefix(dataset_path)} does not align with "
                                f"{dataset_path} (sequence lengths differ)")

        def sample_spans(self, idx: int) -> Iterator[tuple[int, int, int]]:
            """``(sequence id, offset, length)`` of every piece packed into sample ``idx``, in order
            (megatron's sample index arithmetic; the last piece includes the extra token)."""
            i = self.shuffle_index[idx]
            beg, beg_offset = (int(x) for x in self.sample_index[i])
            end, end_offset = (int(x) for x in self.sample_index[i + 1])
            extra = int(self.config.add_extra_token_to_sequence)
            for d in range(beg, end + 1):
                seq = int(self.document_index[d])
                offset = beg_offset if d == beg else 0
                length = end_offset - offset + extra if d == end else int(self.dataset.sequence_lengths[seq]) - offset
                yield seq, offset, length

        def __getitem__(self, idx):
            item = super().__getitem__(idx)  # loads megatron's indices on first use
            n = self.config.sequence_length + int(self.config.add_extra_token_to_sequence)
            spans = list(self.sample_spans(0 if idx is None else idx))
            text = np.concatenate([self.dataset.get(s, offset=o, length=k) for s, o, k in spans]).astype(np.int64)
            mask = np.concatenate([self.loss_mask_dataset.get(s, offset=o, length=k) for s, o, k in spans])
            real = min(len(text), n)  # the rest is padding
            seen = min(real, len(item["tokens"]))
            if len(text) != len(mask) or not np.array_equal(text[:seen], item["tokens"].numpy()[:seen]):
                raise DataError(f"{self.dataset_path}: sample {idx} read over megatron's sample spans differs from "
                                "megatron's own sample; the loss mask cannot be aligned with this megatron-core "
                                "version")
            out = np.zeros(n, dtype=np.int64)
            out[:real] = mask[:real]
            if self.config.add_extra_token_to_sequence:
                out = out[:-1]
            if idx is None:
                out[:] = 0
            item["token_loss_mask"] = torch.from_numpy(out)
            return item

    return LossMaskedGPTDataset


def data_prefixes(train: Sequence) -> list[str]:
    """The prefixes of ``data.train``: a list of prefixes or a flat blend ``[w1, p1, w2, p2, ...]``."""
    from megatron.core.datasets.utils import get_blend_from_list

    if not train:
        raise DataError("data.train is empty: give at least one indexed-dataset prefix")
    return list(get_blend_from_list([str(x) for x in train])[0])


def build_datasets(cfg, eod: int, vocab_size: int, cache_dir: str):
    """Train and validation ``GPTDataset``s through megatron-core's blended dataset builder, with
    the cache keyed by each prefix's fingerprint; with ``data.loss_mask``, every prefix's
    loss-mask sibling is checked first and the samples carry ``token_loss_mask``."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.utils import get_blend_from_list

    prefixes = data_prefixes(cfg.data.train)
    for prefix in prefixes:
        check_prefix(prefix)
    check_loss_masks(cfg.data, cache_dir if cache_dir and os.path.isdir(cache_dir) else None)
    dataset_class = loss_masked_gpt_dataset_class() if cfg.data.loss_mask else GPTDataset
    blend = get_blend_from_list([str(x) for x in cfg.data.train])
    t = cfg.train
    n_eval = t.eval_iters * t.global_batch_size * (t.steps // t.eval_interval + 1) if t.eval_interval else 0
    ds_cfg = GPTDatasetConfig(
        random_seed=t.seed,
        sequence_length=t.seq_len,
        blend=blend,
        split=cfg.data.split,
        path_to_cache=cache_dir,
        tokenizer=TokenizerInfo(eod, vocab_size, [fingerprint(p) for p in prefixes]),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        add_extra_token_to_sequence=False,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        dataset_class, [t.steps * t.global_batch_size, n_eval, 0], lambda: True, ds_cfg
    ).build()
    if train is None or len(train) == 0:
        raise DataError(f"data.train {cfg.data.train}: no training samples of length {t.seq_len}")
    return train, valid


def doc_ids_from_eod(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """Document id of every position ``[b, L]``: the number of end-of-document tokens strictly
    before it (an end-of-document token belongs to the document it ends)."""
    is_eod = (tokens == eod).to(torch.int64)
    return torch.cumsum(is_eod, dim=1) - is_eod


def micro_batches(dataset, base: int, num_micro: int, micro_batch_size: int, dp: int, dp_rank: int) -> list:
    """This data-parallel rank's micro-batches of one global batch starting at sample ``base``:
    ``(tokens [mbs, L], sample_index [mbs], loss_mask)`` triples, ``loss_mask`` ``[mbs, L]`` int64
    from a :class:`LossMaskedGPTDataset`, None otherwise (every token carries loss). Micro-batch
    ``m`` of rank ``r`` holds samples ``base + m * mbs * dp + r * mbs + (0..mbs-1)``."""
    out = []
    for m in range(num_micro):
        first = base + m * micro_batch_size * dp + dp_rank * micro_batch_size
        idx = torch.arange(first, first + micro_batch_size, dtype=torch.int64)
        items = [dataset[int(i) % len(dataset)] for i in idx]
        tokens = torch.stack([item["tokens"] for item in items])
        masked = ["token_loss_mask" in item for item in items]
        if any(masked) and not all(masked):
            raise DataError("a micro-batch mixes samples with and without a loss mask")
        loss_mask = torch.stack([item["token_loss_mask"] for item in items]) if all(masked) else None
        out.append((tokens, idx, loss_mask))
    return out
