"""Chat data for instruction tuning: conversations rendered through the tokenizer's chat template,
their loss masks, and the check the trainer runs on a loss-mask dataset (docs/method.md,
"Instruction tuning").

Input (``nbdiff-preprocess --format chat``): JSONL, one conversation per non-empty line, either

- ``{"messages": [{"role": ..., "content": ...}, ...]}``: roles ``system``, ``user``,
  ``assistant``; several turns; a system turn is optional; at least one assistant turn, and the
  first message is not an assistant turn. Only ``role`` and ``content`` (a string) are passed to the
  template; other keys of a message are ignored.
- ``{"prompt": ..., "response": ...}`` (strings; an optional ``"system"`` string): rendered as
  ``[system,] user = prompt, assistant = response``.

On-disk format (a prefix ``P``):

- ``P.bin`` / ``P.idx``: the tokens, a megatron-core indexed dataset exactly as for text corpora:
  one sequence and one document per conversation (``document_indices = [0, 1, ..., n]``), token
  dtype ``uint16`` when the vocabulary has fewer than 65,500 entries, else ``int32``. The tokens
  are the tokenizer's encoding (no special tokens added: the template writes its own BOS) of the
  full conversation rendered by the template with ``add_generation_prompt=False``, followed by
  the end-of-document (eos) token unless ``--no-eod``.
- ``P.loss_mask.bin`` / ``P.loss_mask.idx``: a second indexed dataset of dtype ``uint8`` with the
  same number of sequences and documents and the same sequence lengths as ``P``. Value 1 on the
  tokens the model is trained to produce: for every assistant turn, from the first token that
  overlaps the assistant content through the turn's end-of-turn token; 0 everywhere else (system
  and user turns, role headers, separators after the end-of-turn token, the EOD).

The trainer calls :func:`check_loss_mask` (or :func:`loss_mask_prefix` to name the files) before
reading the mask with megatron's ``IndexedDataset(loss_mask_prefix(P))``.

How assistant spans are found (prefix renderings): for the assistant message ``k`` the template
renders ``messages[:k]`` with ``add_generation_prompt=True`` (text ``A``, ending with the
assistant header) and ``messages[:k+1]`` without (text ``B``). ``A`` must be a prefix of ``B`` and
``B`` a prefix of the full rendering, and ``B`` must continue ``A`` with the assistant content
(verbatim, or stripped of surrounding whitespace for templates that ``trim`` it); a template that
breaks either (one that rewrites earlier turns once later ones exist, or renders no generation
prompt) is refused with an error naming the conversation. The content occupies
``B[len(A):len(A)+len(content)]``; the end-of-turn token is the first special token of the
tokenizer (``all_special_ids`` or an added token marked special) that starts after the content
and inside ``B``; a template whose assistant turns end with no special token is refused, since
decoding could never stop at the end of a turn. The full rendering is tokenised once, with
character offsets (a fast tokenizer is required), and the character spans become token spans: a
token that straddles the header/content boundary (e.g. ``"ASSISTANT: "`` + ``"hi"`` becoming the
token ``" hi"``) counts as content. Transformers' ``return_assistant_tokens_mask`` was not used:
it needs a template written with ``{% generation %}`` markers, which few released templates have.

Truncation (``--max-tokens N``, counting the EOD): a conversation that does not fit is cut after
the last assistant turn that fits, at the end of that turn's rendering ``B`` (the following turns
are dropped, never split); one in which not even the first assistant turn fits is dropped. Both
are counted and reported in one warning at the end of the run.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from .tokenizer import TokenizerError

ROLES = ("system", "user", "assistant")
LOSS_MASK_SUFFIX = ".loss_mask"
# a conversation the template must render, checked once before any data is read
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def loss_mask_prefix(prefix: str) -> str:
    """The prefix of the loss-mask dataset that belongs to the token dataset ``prefix``."""
    return prefix + LOSS_MASK_SUFFIX


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def conversation_from_record(obj, where: str) -> list[dict]:
    """The validated messages of one JSONL record (module docstring, "Input"); ``where`` is
    ``"<file> line <n>"``. Raises :class:`DataError` naming the field."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with 'messages' or 'prompt'/'response', "
                        f"found {_type(obj)}")
    if "messages" in obj:
        if "prompt" in obj or "response" in obj:
            raise DataError(f"{where}: has both 'messages' and 'prompt'/'response'; give one of the two")
        raw = obj["messages"]
        if not isinstance(raw, list):
            raise DataError(f"{where}: field 'messages' must be a list of {{role, content}} objects, "
                            f"found {_type(raw)}")
        if not raw:
            raise DataError(f"{where}: field 'messages' is empty")
        messages = []
        for i, m in enumerate(raw):
            field = f"messages[{i}]"
            if not isinstance(m, dict):
                raise DataError(f"{where}: field '{field}' must be an object with role and content, found {_type(m)}")
            for key in ("role", "content"):
                if key not in m:
                    raise DataError(f"{where}: field '{field}' has no '{key}'")
                if not isinstance(m[key], str):
                    raise DataError(f"{where}: field '{field}.{key}' must be a string, found {_type(m[key])}")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: field '{field}.role': unknown role {m['role']!r} "
                                f"(expected one of {', '.join(ROLES)})")
            messages.append({"role": m["role"], "content": m["content"]})
    elif "prompt" in obj or "response" in obj:
        messages = []
        if "system" in obj:
            if not isinstance(obj["system"], str):
                raise DataError(f"{where}: field 'system' must be a string, found {_type(obj['system'])}")
            messages.append({"role": "system", "content": obj["system"]})
        for key, role in (("prompt", "user"), ("response", "assistant")):
            if key not in obj:
                raise DataError(f"{where}: field '{key}' is missing (a prompt/response record needs both)")
            if not isinstance(obj[key], str):
                raise DataError(f"{where}: field '{key}' must be a string, found {_type(obj[key])}")
            messages.append({"role": role, "content": obj[key]})
    else:
        raise DataError(f"{where}: no field 'messages' and no 'prompt'/'response' in the JSON object")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant turn (nothing to train on)")
    if messages[0]["role"] == "assistant":
        raise DataError(f"{where}: field 'messages[0].role': a conversation cannot start with an assistant "
                        "turn (no prompt to render before it)")
    return messages


def chat_tokenizer(hf_tokenizer, source: str, purpose: str, error: type = TokenizerError):
    """``hf_tokenizer`` (a Hugging Face tokenizer, or None for sentencepiece) if it can render and
    split chats: it carries a chat template and is a fast tokenizer (character offsets find the
    assistant spans and the end-of-turn token). Otherwise ``error`` naming ``source`` and
    ``purpose`` (``"--format chat"``, ``"chat decoding"``: what needs it)."""
    if hf_tokenizer is None:
        raise error(f"{source}: a sentencepiece tokenizer has no chat template; {purpose} needs a Hugging Face "
                    "tokenizer with one")
    if not getattr(hf_tokenizer, "chat_template", None):
        raise error(f"{source}: the tokenizer has no chat template (chat_template in tokenizer_config.json or "
                    f"chat_template.jinja); {purpose} needs one")
    if not getattr(hf_tokenizer, "is_fast", False):
        raise error(f"{source}: {purpose} needs a fast tokenizer (tokenizer.json) for character offsets; this "
                    "one is a slow (Python) tokenizer")
    return hf_tokenizer


class ChatEncoder:
    """Renders validated conversations with a Hugging Face tokenizer's chat template and encodes
    them into tokens and loss masks (module docstring)."""

    def __init__(self, hf_tokenizer, source: str):
        chat_tokenizer(hf_tokenizer, source, "--format chat")
        self.hf = hf_tokenizer
        self.source = source
        special = set(hf_tokenizer.all_special_ids)
        special.update(i for i, t in hf_tokenizer.added_tokens_decoder.items() if getattr(t, "special", False))
        self.special_ids = np.array(sorted(special), dtype=np.int64)
        try:
            self.encode([(_PROBE, f"{source} (chat template check on a user/assistant conversation)")])
        except DataError as exc:
            raise TokenizerError(str(exc)) from None

    # -- rendering --------------------------------------------------------------------------
    def render(self, messages: Sequence[dict], add_generation_prompt: bool, where: str) -> str:
        """The template's text for ``messages``; a template error becomes a :class:`DataError`."""
        from jinja2 import TemplateError

        try:
            text = self.hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise DataError(f"{where}: the chat template of {self.source} failed on this conversation "
                            f"({type(exc).__name__}: {exc})") from None
        if not isinstance(text, str):
            raise DataError(f"{where}: the chat template of {self.source} rendered {_type(text)}, not text")
        return text

    def spans(self, messages: Sequence[dict], where: str) -> tuple[str, list[tuple[int, int, int]]]:
        """``(full text, [(content start, content end, turn end), ...])``: character spans of the
        assistant turns in the full rendering, found prefix by prefix (module docstring)."""
        full = self.render(messages, False, where)
        spans = []
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self.render(messages[:k], True, where)
            upto = self.render(messages[:k + 1], False, where)
            if not upto.startswith(before) or not full.startswith(upto):
                raise DataError(
                    f"{where}: the chat template of {self.source} is not prefix-stable: the rendering of "
                    f"messages[:{k}] (with the generation prompt) or of messages[:{k + 1}] is not a prefix of "
                    "the longer conversation's, so assistant turns cannot be located")
            rest = upto[len(before):]
            content = m["content"]
            if not rest.startswith(content):
                content = content.strip()
                if not rest.startswith(content):
                    raise DataError(
                        f"{where}: field 'messages[{k}].content': the chat template of {self.source} does not "
                        "render the assistant content right after the generation prompt (a template without "
                        "add_generation_prompt, or one that rewrites the content)")
            start = len(before)
            spans.append((start, start + len(content), len(upto)))
        return full, spans

    # -- tokens and masks -------------------------------------------------------------------
    def encode(self, conversations: Sequence[tuple[list[dict], str]], max_tokens: Optional[int] = None,
               eod_id: Optional[int] = None) -> tuple[list[list[int]], list[np.ndarray], int, int]:
        """Tokens and loss masks of ``(messages, where)`` conversations, with ``eod_id`` appended
        (mask 0) when given. Returns ``(token lists, uint8 masks, cut, dropped)``: with
        ``max_tokens`` (EOD included), the number of conversations cut at a turn boundary and
        dropped, which are left out of the lists."""
        rendered = [self.spans(messages, where) for messages, where in conversations]
        encodings = self.hf.backend_tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
        extra = 0 if eod_id is None else 1
        tokens, masks = [], []
        cut = dropped = 0
        for (text, spans), enc, (_, where) in zip(rendered, encodings, conversations):
            ids = np.asarray(enc.ids, dtype=np.int64)
            offsets = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            starts, ends = offsets[:, 0], offsets[:, 1]
            special = np.isin(ids, self.special_ids)
            mask = np.zeros(len(ids), dtype=np.uint8)
            turn_ends = []
            for start, stop, turn_end in spans:
                eot = np.flatnonzero(special & (starts >= stop) & (starts < turn_end))
                if eot.size == 0:
                    raise DataError(
                        f"{where}: the chat template of {self.source} ends an assistant turn with no special "
                        f"token ({text[stop:turn_end]!r} after the content), so there is no end-of-turn token "
                        "to train and to stop decoding at")
                first = np.flatnonzero((ends > start) & (starts < stop))
                lo = int(first[0]) if first.size and first[0] < eot[0] else int(eot[0])
                mask[lo:int(eot[0]) + 1] = 1
                turn_ends.append(int(np.count_nonzero(starts < turn_end)))
            n = len(ids)
            if max_tokens is not None and n + extra > max_tokens:
                fitting = [e for e in turn_ends if e + extra <= max_tokens]
                if not fitting:
                    dropped += 1
                    continue
                n = fitting[-1]
                cut += 1
            out = ids[:n].tolist()
            m = mask[:n]
            if eod_id is not None:
                out.append(eod_id)
                m = np.append(m, np.uint8(0))
            tokens.append(out)
            masks.append(m)
        return tokens, masks, cut, dropped


# -- the trainer's check ------------------------------------------------------------------------
def check_loss_mask(prefix: str, values: bool = True, chunk: int = 1 << 24) -> dict:
    """Check that the loss-mask dataset of the token dataset ``prefix`` exists and aligns with
    it: both are readable indexed datasets (:func:`~megatron_nbdiff.data.datasets.check_prefix`),
    the mask's dtype is uint8, the sequence counts, document indices and sequence lengths agree,
    and (``values``) every value is 0 or 1, read in chunks of ``chunk`` bytes. Returns
    ``{"documents", "tokens", "loss_tokens"}`` (``loss_tokens`` is None without ``values``).
    Raises :class:`DataError` naming the file that disagrees."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from .datasets import check_prefix

    mask_prefix = loss_mask_prefix(prefix)
    check_prefix(prefix)
    for suffix in (".bin", ".idx"):
        if not os.path.isfile(mask_prefix + suffix):
            raise DataError(f"data prefix {prefix!r}: no loss mask ({mask_prefix + suffix} is missing); "
                            "write it with nbdiff-preprocess --format chat")
    check_prefix(mask_prefix)
    tok_index = IndexedDataset(prefix, multimodal=False, mmap=True)
    mask_index = IndexedDataset(mask_prefix, multimodal=False, mmap=True)
    idx = mask_prefix + ".idx"
    mask_dtype = np.dtype(mask_index.index.dtype)
    if mask_dtype != np.uint8:
        raise DataError(f"{idx}: loss mask of dtype {mask_dtype.name}, expected uint8")
    if len(mask_index.sequence_lengths) != len(tok_index.sequence_lengths):
        raise DataError(f"{idx}: {len(mask_index.sequence_lengths):,} sequences, but {prefix}.idx has "
                        f"{len(tok_index.sequence_lengths):,}: the loss mask belongs to another dataset")
    if not np.array_equal(mask_index.document_indices, tok_index.document_indices):
        raise DataError(f"{idx}: its document boundaries differ from {prefix}.idx's: the loss mask belongs "
                        "to another dataset")
    differ = np.flatnonzero(mask_index.sequence_lengths != tok_index.sequence_lengths)
    if differ.size:
        i = int(differ[0])
        raise DataError(f"{idx}: sequence {i} has {int(mask_index.sequence_lengths[i])} mask values but "
                        f"{int(tok_index.sequence_lengths[i])} tokens in {prefix}.bin ({differ.size:,} sequences "
                        "differ): the loss mask belongs to another dataset")
    tokens = int(tok_index.sequence_lengths.astype(np.int64).sum())
    loss_tokens = None
    if values:
        loss_tokens = 0
        path = mask_prefix + ".bin"
        with open(path, "rb") as f:
            offset = 0
            while True:
                part = np.frombuffer(f.read(chunk), dtype=np.uint8)
                if not part.size:
                    break
                bad = np.flatnonzero(part > 1)
                if bad.size:
                    raise DataError(f"{path}: value {int(part[bad[0]])} at token {offset + int(bad[0]):,}; "
                                    "a loss mask holds only 0 and 1")
                loss_tokens += int(np.count_nonzero(part))
                offset += part.size
    return {"documents": len(tok_index.document_indices) - 1, "tokens": tokens, "loss_tokens": loss_tokens}
