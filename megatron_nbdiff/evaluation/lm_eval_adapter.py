"""lm-evaluation-harness model ``nbdiff``: the project's decoders behind lm-eval's ``LM`` interface.

    import megatron_nbdiff.evaluation.lm_eval_adapter  # registers the model name "nbdiff"
    lm_eval.simple_evaluate(model="nbdiff",
                            model_args="model=DIR,mode=block,threshold=0.9,block_size=32",
                            tasks=[...], task_manager=TaskManager(include_path=TASKS_DIR))

``DIR`` is anything :func:`megatron_nbdiff.inference.load_runner` loads (an exported HF folder, a
Megatron checkpoint, a training run folder); ``model=`` also takes a loaded ``ModelRunner``
(``NBDiffLM(model=runner, ...)``). ``pretrained=`` is accepted as another name for ``model=``.

Model arguments
---------------
Decoding (``generate_until`` and the greedy check of diffusion scoring): ``mode`` (``block``,
``full``, ``ar``), ``block_size`` (default: the trained one), ``threshold``, ``sub_blocks``,
``confidence``, ``steps`` (full mode), ``seed`` (sampling). Scoring: ``loglikelihood``
(``ar`` or ``diffusion``), ``mc_samples`` (16), ``mc_seed`` (0), ``mc_eps`` (1e-3), ``greedy_check`` (true). Other:
``batch_size`` (8; ``auto`` means 8), ``max_length`` (default: the model's maximum positions),
``max_gen_toks`` (default for requests that give none, 256), ``add_bos_token`` (false: prompts are
encoded without special tokens, as lm-eval's HF model does by default), ``stop_check_every``
(64), ``device``, ``dtype``, ``tp``, ``ep``.

What each request type computes
-------------------------------
``loglikelihood`` with ``loglikelihood=ar`` (default): the exact log-probability of the
continuation under the clean (causal) stream, ``sum_j log p(c_j | x, c_<j)``. The context is
prefilled causally (its last logit scores ``c_0``) and ``c_0 .. c_{n-2}`` are committed causally
(their logits score ``c_1 .. c_{n-1}``), softmax over the whole vocabulary the runner reports
(the appended mask token included, as in the training losses). ``is_greedy``: every ``c_j`` is
the argmax of its logit with the mask token excluded (what greedy AR decoding would produce).

``loglikelihood`` with ``loglikelihood=diffusion``: a Monte-Carlo estimate of the diffusion
evidence lower bound (ELBO) of ``log p(c | x)``, so lower than or equal to the model's true
log-likelihood in expectation.

* ``mode=block`` (block diffusion, docs/method.md, "Noise" and "Decoding"): the continuation is cut into
  blocks of ``B`` tokens aligned at its first token, as block decoding lays them out after a
  prompt. ``log p(c | x) = sum_k [log p(first_k | x, c_<kB) + log p(rest_k | first_k, x, c_<kB)]``.
  The first term is exact: the causal logit of the previous position (the prefill's last logit,
  then the last logit of committing the clean block ``k-1``). The second is bounded by
  ``E_t [ sum_{masked j} (1/t) log p(c_j | noisy block, clean context) ]``: one ``t`` per block,
  each non-first token of the block masked with probability ``t``, the noisy block run
  bidirectionally against the causal KV cache of the clean context (``runner.denoise``), the
  token at ``j`` scored by the logit at ``j-1``.
* ``mode=full`` (single-stream, docs/method.md, "Single-stream diffusion (DiffuLLaMA)"): one ``t``
  per continuation, every
  continuation token (the first included) masked with probability ``t``, one bidirectional pass
  over context + noisy continuation (``runner.full``); estimate
  ``sum_{masked j} (1/t) log p(c_j | x, noisy c)``.

The noise comes from :func:`megatron_nbdiff.noise.mask_tokens` with seed ``mc_seed``, ``step`` =
CRC-32 of the request's token ids and sample indices ``0 .. mc_samples-1``, ``t`` stratified over
the ``mc_samples`` draws (one per stratum of ``[eps, 1)``, which lowers the variance of the
mean) and ``t ~ U(eps, 1)``; the estimate is the mean over the draws. It therefore depends only on
the seed and the request, not on batching or request order. With ``t`` drawn from ``[eps, 1)``
instead of ``(0, 1)`` the integral of the bound over ``(0, eps)`` is left out, a bias of order
``eps`` per token. At ``B = 1`` every token is a block's first token and the estimate is the exact
AR log-likelihood. ``is_greedy`` in this mode: the configured decoder, run greedily from the
context for ``len(c)`` tokens, produces exactly ``c`` (one decoding per request; with
``greedy_check=false`` it is skipped and ``is_greedy`` is always False, which suits
multiple-choice tasks, whose metrics do not read it).

``loglikelihood_rolling``: lm-eval's disjoint rolling windows of at most ``max_length`` tokens
(the first conditioned on ``prefix_token_id``: BOS with ``add_bos_token``, else EOS), each scored
as a ``loglikelihood`` request with the configured method, summed per document.

``generate_until``: the configured decoder (``generate``'s block, full or AR decoding) with the
request's ``max_gen_toks``, ``do_sample``/``temperature``/``top_p``; generation stops at EOS (not
included in the text) and the text is cut before the first ``until`` string. In block and AR mode
the continuation is produced in chunks of ``stop_check_every`` tokens (rounded up to a multiple of
the block size) and a row stops as soon as one of its ``until`` strings appears; because chunks
end on block boundaries and a new chunk's prefill computes the same causal pass as the commit it
replaces, chunking changes the result only by floating-point rounding. Full mode decodes the whole
span at once. Options lm-eval may pass that the decoders lack (``top_k``, ...) are ignored with a
warning. When the tokenizer has a chat template, generation also stops at the template's
end-of-turn token (left out of the text, as EOS is), whether or not the prompt was rendered with
the template. ``decode_stats`` accumulates the generated tokens, forward passes and seconds of every
``generate_until`` call (``tokens_per_forward()`` reads it).

Chat templates
--------------
``lm_eval.simple_evaluate(..., apply_chat_template=True)`` (``--apply_chat_template`` on lm-eval's
command line) renders every request's context with :meth:`NBDiffLM.apply_chat_template`: the
checkpoint tokenizer's chat template (:mod:`megatron_nbdiff.inference.chat`), with the generation
prompt, or, when lm-eval passes ``add_generation_prompt=False`` (a task with a ``gen_prefix``, the
last message being the assistant's start), continuing the final message, as lm-eval's Hugging
Face model does; a template that refuses a system turn is retried without it, with a warning,
also as that model does. The rendered text is encoded without special tokens (the template writes
its own BOS). ``chat_template()`` returns the template text (lm-eval logs it);
``tokenizer_name`` names the checkpoint (lm-eval's request-cache key). A checkpoint whose
tokenizer has no chat template, or a template whose assistant turns end with no special token, is
refused with an :class:`EvaluationError` when a chat template is asked for.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import time
import zlib
from collections import defaultdict
from typing import Any, Optional, Sequence

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..inference.api import load_runner, resolve_block_size
from ..inference.chat import ChatTemplate
from ..inference.decode import MODES, DecodeOptions, block_decode, full_decode
from ..inference.runner import ModelRunner
from .block_walk import walk_blocks
from .common import DEFAULT_MAX_LENGTH, EvaluationError, runner_max_length, tokenizer_bos_id

log = logging.getLogger(__name__)

LOGLIKELIHOOD_METHODS = ("ar", "diffusion")
_GEN_KEYS_DONE = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise EvaluationError(f"{name} must be true or false, found {value!r}")


def _as_int(name: str, value: Any, low: int = 1) -> int:
    try:
        out = int(value)
        if isinstance(value, float) and out != value:
            raise ValueError
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be an integer, found {value!r}") from None
    if out < low:
        raise EvaluationError(f"{name} must be >= {low}, found {out}")
    return out


def _as_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise EvaluationError(f"{name} must be a number, found {value!r}") from None


def _chunks(seq: Sequence, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


@register_model("nbdiff")
class NBDiffLM(TemplateLM):
    """lm-eval model over a :class:`~megatron_nbdiff.inference.ModelRunner` (module docstring)."""

    backend = "causal"

    def __init__(self, model: Any = None, pretrained: Any = None, mode: str = "block",
                 block_size: Optional[int] = None, threshold: float = 0.9, sub_blocks: int = 1,
                 confidence: str = "prob", steps: Optional[int] = None, seed: int = 0,
                 loglikelihood: str = "ar", mc_samples: int = 16, mc_seed: int = 0,
                 mc_eps: float = 1e-3, greedy_check: Any = True, batch_size: Any = 8, max_batch_size: Any = None,
                 max_length: Optional[int] = None, max_gen_toks: int = 256,
                 add_bos_token: Any = False, stop_check_every: int = 64, device: Any = None,
                 dtype: Optional[str] = None, tp: Optional[int] = None, ep: Optional[int] = None,
                 **unknown: Any) -> None:
        super().__init__()
        if unknown:
            known = sorted(k for k in inspect.signature(type(self).__init__).parameters if k not in ("self", "unknown"))
            raise EvaluationError(f"unknown nbdiff model argument(s) {sorted(unknown)}; known: {known}")
        if model is not None and pretrained is not None:
            raise EvaluationError("give the checkpoint as model= or pretrained=, not both")
        model = model if model is not None else pretrained
        if model is None:
            raise EvaluationError("no model given: pass model=DIR (an exported HF folder, a Megatron "
                                  "checkpoint or a training run folder)")
        if isinstance(model, ModelRunner):
            self.runner = model
        else:
            if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
                # lm-eval's command line passes device=cuda unless told otherwise
                log.warning("device %s requested but CUDA is not available: the model runs on the CPU", device)
                device = None
            self.runner = load_runner(str(model), device=device, dtype=dtype, tp=tp, ep=ep)
        info = self.runner.info
        if self.runner.tokenizer is None:
            raise EvaluationError(f"{info.source} has no tokenizer: lm-eval hands the model text")
        if mode not in MODES:
            raise EvaluationError(f"mode must be one of {MODES}, found {mode!r}")
        bs = resolve_block_size(info, mode, None if block_size is None else _as_int("block_size", block_size),
                                error=EvaluationError)
        self.mode = mode
        self.block_size = bs
        self.opts = DecodeOptions(mode=mode, block_size=bs if mode == "block" else None,
                                  threshold=_as_float("threshold", threshold),
                                  sub_blocks=_as_int("sub_blocks", sub_blocks),
                                  confidence=confidence, steps=None if steps is None else _as_int("steps", steps),
                                  seed=_as_int("seed", seed, 0), temperature=0.0)
        self.opts.validate()
        if mode == "block" and self.opts.sub_blocks > bs:
            raise EvaluationError(f"sub_blocks {self.opts.sub_blocks} exceeds the block size {bs}")
        if loglikelihood not in LOGLIKELIHOOD_METHODS:
            raise EvaluationError(f"loglikelihood must be one of {LOGLIKELIHOOD_METHODS}, found {loglikelihood!r}")
        if loglikelihood == "diffusion":
            if mode == "ar":
                raise EvaluationError("loglikelihood=diffusion needs mode=block (block-diffusion bound) "
                                      "or mode=full (single-stream bound), not mode=ar")
            if info.mask_token_id is None:
                raise EvaluationError(f"{info.source}: no mask token id, so loglikelihood=diffusion cannot run")
        self.loglikelihood_method = loglikelihood
        self.mc_samples = _as_int("mc_samples", mc_samples)
        if self.mc_samples > 65536:
            raise EvaluationError(f"mc_samples must be <= 65536, found {self.mc_samples}")
        self.mc_seed = _as_int("mc_seed", mc_seed, 0)
        self.greedy_check = _as_bool("greedy_check", greedy_check)
        self.mc_eps = _as_float("mc_eps", mc_eps)
        if not 0.0 < self.mc_eps < 1.0:
            raise EvaluationError(f"mc_eps must lie in (0, 1), found {mc_eps}")
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            log.info("batch_size %s: the nbdiff model has no automatic batch sizing; using 8", batch_size)
            batch_size = 8
        self._batch_size = _as_int("batch_size", batch_size)
        model_max = runner_max_length(self.runner)
        self._max_length = (_as_int("max_length", max_length) if max_length is not None
                            else (model_max or DEFAULT_MAX_LENGTH))
        if model_max is not None and self._max_length > model_max:
            raise EvaluationError(f"max_length {self._max_length} exceeds the model's {model_max} positions")
        if self._max_length < 2:
            raise EvaluationError(f"max_length must be >= 2, found {self._max_length}")
        self._max_gen_toks = _as_int("max_gen_toks", max_gen_toks)
        self.add_bos_token = _as_bool("add_bos_token", add_bos_token)
        self.stop_check_every = _as_int("stop_check_every", stop_check_every, 0)
        self.tokenizer = self.runner.tokenizer
        self._bos = tokenizer_bos_id(self.tokenizer)
        if self.add_bos_token and self._bos is None:
            raise EvaluationError(f"add_bos_token=true but the tokenizer of {info.source} has no BOS token")
        self._warned_keys: set = set()
        self.decode_stats = dict(tokens=0, forward_passes=0, seconds=0.0, calls=0)
        self._chat: Optional[ChatTemplate] = None
        self._chat_error = ""
        try:
            self._chat = ChatTemplate.of(self.runner, error=EvaluationError)
        except EvaluationError as exc:
            self._chat_error = str(exc)
            if self.tokenizer is not None and getattr(self.tokenizer.hf, "chat_template", None):
                log.warning("nbdiff: %s; apply_chat_template cannot be used", exc)
        self._stop_ids = tuple(self._chat.end_of_turn_ids) if self._chat is not None else ()

    # -- lm-eval plumbing ---------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.runner.info.eos_token_ids
        if not eos:
            raise EvaluationError(f"{self.runner.info.source} has no EOS token, which lm-eval needs as the "
                                  "prefix of empty contexts; pass add_bos_token=true if it has a BOS token")
        return int(eos[0])

    @property
    def prefix_token_id(self) -> int:
        if self.add_bos_token and self._bos is not None:
            return int(self._bos)
        return self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return self.runner.device

    @property
    def tokenizer_name(self) -> str:
        """The checkpoint's name (lm-eval fingerprints its request cache with it)."""
        return str(self.runner.info.source).replace("/", "__")

    # -- chat templates (module docstring, "Chat templates") ---------------------------------------
    def _chat_or_raise(self) -> ChatTemplate:
        if self._chat is None:
            raise EvaluationError(self._chat_error)
        return self._chat

    def chat_template(self, chat_template: Any = False) -> Optional[str]:
        """The template text lm-eval logs: None when ``chat_template`` is False or None; a name
        selects one of several named templates (default: ``"default"``)."""
        if chat_template is False or chat_template is None:
            return None
        template = self._chat_or_raise().template
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise EvaluationError(f"{self.runner.info.source}: no chat template named {name!r}; the tokenizer "
                                      f"has {sorted(template)}")
            return template[name]
        return template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        """``chat_history`` rendered by the tokenizer's chat template, as lm-eval's LM interface
        defines it."""
        chat = self._chat_or_raise()
        history = list(chat_history)
        kw = dict(add_generation_prompt=add_generation_prompt, continue_final_message=not add_generation_prompt,
                  where="lm-eval chat history")
        try:
            return chat.render(history, **kw)
        except EvaluationError:
            without = [m for m in history if not (isinstance(m, dict) and m.get("role") == "system")]
            if len(without) == len(history):
                raise
            log.warning("nbdiff: the chat template failed on a history with a system turn; retrying without it")
            return chat.render(without, **kw)

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None,
                   left_truncate_len: Optional[int] = None, **kwargs) -> list[int]:
        ids = list(self.tokenizer.encode(string))
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        if special and self._bos is not None:
            ids = [int(self._bos)] + ids
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    def tokens_per_forward(self) -> Optional[float]:
        s = self.decode_stats
        return s["tokens"] / s["forward_passes"] if s["forward_passes"] else None

    # -- scoring ------------------------------------------------------------------------------
    def _fit(self, ctx: list[int], cont: list[int]) -> list[int]:
        """The context cut from the left so that the model input fits ``max_length``."""
        if not ctx:
            raise EvaluationError("a loglikelihood request with an empty context (lm-eval adds the prefix token)")
        full_diffusion = self.loglikelihood_method == "diffusion" and self.mode == "full"
        room = self.max_length - len(cont) + (0 if full_diffusion else 1)  # context tokens that fit
        if room < 1:
            raise EvaluationError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}")
        return ctx[-room:]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results: list = [None] * len(requests)
        work = []
        for i, (_, ctx, cont) in enumerate(requests):
            ctx, cont = [int(t) for t in ctx], [int(t) for t in cont]
            if not cont:
                results[i] = (0.0, True)
                continue
            work.append((i, self._fit(ctx, cont), cont))
        bar = tqdm(total=len(work), disable=disable_tqdm or self.rank != 0,
                   desc=f"loglikelihood ({self.loglikelihood_method})")
        if self.loglikelihood_method == "ar":
            self._score_ar(work, results, bar)
        else:
            self._score_diffusion(work, results, bar)
            if self.greedy_check:
                self._greedy_by_decoding(work, results)
        bar.close()
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def _by_length(self, work: list, rows_per_request: int = 1):
        """Batches of requests with equal continuation length, longest contexts first."""
        groups = defaultdict(list)
        for item in work:
            groups[len(item[2])].append(item)
        per_batch = max(1, self.batch_size // rows_per_request)
        for n in sorted(groups, reverse=True):
            items = sorted(groups[n], key=lambda it: -len(it[1]))
            yield from _chunks(items, per_batch)

    @torch.no_grad()
    def _score_ar(self, work: list, results: list, bar) -> None:
        mask_id = self.runner.info.mask_token_id
        for batch in self._by_length(work):
            cont = torch.tensor([c for _, _, c in batch], dtype=torch.long, device=self.runner.device)
            logits = self.runner.prefill([ctx for _, ctx, _ in batch])[:, None]
            if cont.shape[1] > 1:
                logits = torch.cat([logits, self.runner.commit(cont[:, :-1])], 1)
            logits = logits.float()
            logp = logits.gather(-1, cont[..., None])[..., 0] - torch.logsumexp(logits, -1)
            if mask_id is not None:
                logits[..., mask_id] = float("-inf")
            greedy = (logits.argmax(-1) == cont).all(1)
            for (i, _, _), ll, g in zip(batch, logp.sum(1).tolist(), greedy.tolist()):
                results[i] = (float(ll), bool(g))
            bar.update(len(batch))

    def _noise(self, ctx: list[int], cont: list[int]):
        """Noised copies (``mc_samples`` rows) of the continuation, padded to whole blocks."""
        from ..noise import mask_tokens

        N, n = self.mc_samples, len(cont)
        step = zlib.crc32(json.dumps([ctx, cont]).encode())
        if self.mode == "full":
            tokens = torch.tensor([cont] * N, dtype=torch.long)
            return tokens, mask_tokens(tokens, block_size=None, mask_token_id=self.runner.info.mask_token_id,
                                       seed=self.mc_seed, step=step, sample_index=0, t_mode="per_sequence",
                                       t_sampling="stratified", strata=N, eps=self.mc_eps,
                                       keep_block_first=False, weight_mode="inv_t")
        B = self.block_size
        padded = math.ceil(n / B) * B
        tokens = torch.zeros(N, padded, dtype=torch.long)
        tokens[:, :n] = torch.tensor(cont, dtype=torch.long)
        loss_mask = torch.zeros(N, padded, dtype=torch.bool)
        loss_mask[:, :n] = True
        return tokens, mask_tokens(tokens, block_size=B, mask_token_id=self.runner.info.mask_token_id,
                                   seed=self.mc_seed, step=step, sample_index=0, loss_mask=loss_mask,
                                   t_mode="per_block", t_sampling="stratified", strata=N, eps=self.mc_eps,
                                   keep_block_first=True, weight_mode="inv_t")

    @torch.no_grad()
    def _score_diffusion(self, work: list, results: list, bar) -> None:
        N = self.mc_samples
        dev = self.runner.device
        for batch in self._by_length(work, rows_per_request=N):
            n = len(batch[0][2])
            noised = [self._noise(ctx, cont) for _, ctx, cont in batch]
            tokens = torch.cat([t for t, _ in noised]).to(dev)  # [R, padded], R = len(batch) * N
            noisy = torch.cat([z.noisy_ids for _, z in noised]).to(dev)
            masked = torch.cat([z.is_masked for _, z in noised]).to(dev)
            weight = torch.cat([z.weight for _, z in noised]).to(dev)
            ctxs = [ctx for _, ctx, _ in batch for _ in range(N)]
            R = tokens.shape[0]
            est = torch.zeros(R, dtype=torch.float64, device=dev)
            if self.mode == "full":
                P = max(len(c) for c in ctxs)
                ids = torch.zeros(R, P + n, dtype=torch.long, device=dev)
                valid = torch.zeros(R, P + n, dtype=torch.bool, device=dev)
                for r, c in enumerate(ctxs):
                    ids[r, P - len(c):P] = torch.tensor(c, dtype=torch.long, device=dev)
                    valid[r, P - len(c):] = True
                ids[:, P:] = noisy
                lg = self.runner.full(ids, valid)[:, P - 1:P + n - 1].float()  # logit j-1 predicts j
                logp = lg.gather(-1, tokens[..., None])[..., 0] - torch.logsumexp(lg, -1)
                est += (logp * weight).sum(1).double()
            else:
                for s, e, last, lg in walk_blocks(self.runner, tokens[:, :n], noisy[:, :n], masked[:, :n],
                                                  self.block_size, context=ctxs):
                    last = last.float()
                    first = tokens[:, s]
                    est += (last.gather(-1, first[:, None])[:, 0] - torch.logsumexp(last, -1)).double()
                    if lg is not None:
                        lg = lg.float()
                        tgt = tokens[:, s + 1:e]
                        logp = lg.gather(-1, tgt[..., None])[..., 0] - torch.logsumexp(lg, -1)
                        est += (logp * weight[:, s + 1:e]).sum(1).double()
            per_request = est.view(len(batch), N).mean(1).tolist()
            for (i, _, _), ll in zip(batch, per_request):
                results[i] = (float(ll), False)  # is_greedy filled by _greedy_by_decoding
            bar.update(len(batch))

    def _decode(self, prompts: list[list[int]], opts: DecodeOptions):
        if self.mode == "full":
            return full_decode(self.runner, prompts, opts)
        return block_decode(self.runner, prompts, opts, block_size=self.block_size)

    def _greedy_by_decoding(self, work: list, results: list) -> None:
        for batch in self._by_length(work):
            n = len(batch[0][2])
            opts = dataclasses.replace(self.opts, max_new_tokens=n, temperature=0.0, stop_at_eos=False)
            outs = self._decode([ctx for _, ctx, _ in batch], opts)
            for (i, _, cont), out in zip(batch, outs):
                results[i] = (results[i][0], list(out.token_ids) == cont)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        full_diffusion = self.loglikelihood_method == "diffusion" and self.mode == "full"
        window = self.max_length - (1 if full_diffusion else 0)
        pieces, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            ids = self.tok_encode(string, add_special_tokens=False)
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=window, context_len=1)):
                pieces.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(pieces, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (ll, _) in zip(owner, scores):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ---------------------------------------------------------------------------
    def _gen_options(self, gen_kwargs: Any) -> tuple[list[str], int, DecodeOptions]:
        if not isinstance(gen_kwargs, dict):
            raise EvaluationError(f"generation arguments must be a dict, found {type(gen_kwargs).__name__}")
        until = gen_kwargs.get("until")
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif isinstance(until, (list, tuple)) and all(isinstance(u, str) for u in until):
            until = list(until)
        else:
            raise EvaluationError(f"'until' must be a string or a list of strings, found {until!r}")
        until = [u for u in until if u]
        max_gen = _as_int("max_gen_toks", gen_kwargs.get("max_gen_toks", self.max_gen_toks))
        do_sample = _as_bool("do_sample", gen_kwargs.get("do_sample", False))
        temperature = float(gen_kwargs.get("temperature", 1.0 if do_sample else 0.0))
        if not do_sample:
            temperature = 0.0
        top_p = float(gen_kwargs.get("top_p", 1.0))
        ignored = sorted(set(gen_kwargs) - set(_GEN_KEYS_DONE) - self._warned_keys)
        if ignored:
            self._warned_keys.update(ignored)
            log.warning("nbdiff: ignoring generation option(s) %s: the block / full / AR decoders do not "
                        "support them", ignored)
        opts = dataclasses.replace(self.opts, max_new_tokens=max_gen, temperature=temperature,
                                   top_p=top_p, stop_at_eos=True, stop_token_ids=self._stop_ids)
        opts.validate()
        return until, max_gen, opts

    def _gen_prompt(self, context: str, max_gen: int) -> list[int]:
        room = self.max_length - max_gen
        if room < 1:
            raise EvaluationError(f"max_gen_toks {max_gen} leaves no room for the prompt in max_length "
                                  f"{self.max_length}")
        ids = self.tok_encode(context)[-room:] if context else []
        return ids or [self.prefix_token_id]

    @staticmethod
    def _cut(text: str, until: list[str]) -> tuple[str, bool]:
        cuts = [text.find(u) for u in until]
        cuts = [c for c in cuts if c >= 0]
        return (text[:min(cuts)], True) if cuts else (text, False)

    def _generate_batch(self, prompts: list[list[int]], until: list[str], max_gen: int,
                        opts: DecodeOptions) -> list[str]:
        eos = set(self.runner.info.eos_token_ids) | set(self._stop_ids)
        gen: list[list[int]] = [[] for _ in prompts]
        active = list(range(len(prompts)))
        if self.mode == "full" or self.stop_check_every == 0:
            chunk = max_gen
        else:
            chunk = math.ceil(self.stop_check_every / self.block_size) * self.block_size
        produced = rounds = 0
        while active and produced < max_gen:
            n = min(chunk, max_gen - produced)
            o = dataclasses.replace(opts, max_new_tokens=n, seed=opts.seed + rounds)
            t0 = time.perf_counter()
            outs = self._decode([prompts[i] + gen[i] for i in active], o)
            self.decode_stats["seconds"] += time.perf_counter() - t0
            self.decode_stats["calls"] += 1
            still = []
            for i, out in zip(active, outs):
                ids = list(out.token_ids)
                self.decode_stats["tokens"] += len(ids)
                self.decode_stats["forward_passes"] += int(out.stats["forward_passes"])
                stop = False
                for k, t in enumerate(ids):
                    if t in eos:
                        ids, stop = ids[:k], True
                        break
                gen[i].extend(ids)
                if not stop and until:
                    stop = self._cut(self.tok_decode(gen[i]), until)[1]
                if not stop:
                    still.append(i)
            active = still
            produced += n
            rounds += 1
        return [self._cut(self.tok_decode(g), until)[0] for g in gen]

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list = [None] * len(requests)
        groups = defaultdict(list)
        for i, req in enumerate(requests):
            groups[json.dumps(req.args[1], sort_keys=True, default=str)].append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until")
        for idxs in groups.values():
            until, max_gen, opts = self._gen_options(requests[idxs[0]].args[1])
            prompts = {i: self._gen_prompt(requests[i].args[0], max_gen) for i in idxs}
            order = sorted(idxs, key=lambda i: -len(prompts[i]))
            for batch in _chunks(order, self.batch_size):
                texts = self._generate_batch([prompts[i] for i in batch], until, max_gen, opts)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results
