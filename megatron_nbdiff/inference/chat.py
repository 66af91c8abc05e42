"""Chat decoding: user messages rendered through the checkpoint tokenizer's chat template, and
decoding that stops at the template's end-of-turn token (docs/method.md, "Instruction tuning").

A prompt is a conversation (``[{"role", "content"}, ...]``, roles ``system``, ``user``,
``assistant``) whose last turn is the user's; :func:`user_conversation` builds one from a user
message and an optional system message. It is rendered by the tokenizer's template with
``add_generation_prompt=True`` (so the text ends with the assistant header) and encoded without
special tokens, since the template writes its own BOS: the ids are exactly what
``apply_chat_template(messages, tokenize=True, add_generation_prompt=True)`` gives, and the
prefix the training data (``tools/preprocess_data.py --format chat``,
:mod:`megatron_nbdiff.data.chat`) put before every assistant turn.

The end-of-turn token is found the way the training data's loss mask finds it: a user/assistant
probe conversation is encoded by :class:`megatron_nbdiff.data.chat.ChatEncoder`, and the last
loss-bearing token of the assistant turn (the first special token after its content) is the
end-of-turn token (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3). Decoding stops at it
or at the model's EOS; the returned ``token_ids`` keep the stop token (as :func:`generate` does
for EOS) and ``text`` leaves it out.

A tokenizer without a chat template, a slow (Python) tokenizer, or a template whose assistant
turns end with no special token is refused with one :class:`DecodingError` naming the checkpoint.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from .runner import DecodingError, ModelRunner

# the conversation whose assistant turn shows where the template ends a turn
_PROBE = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def user_conversation(user: str, system: Optional[str] = None) -> list[dict]:
    """``[system,] user``: the conversation of one user message."""
    messages = [] if system is None else [{"role": "system", "content": system}]
    return messages + [{"role": "user", "content": user}]


def hf_tokenizer(tokenizer, source: str, error: type = DecodingError):
    """The Hugging Face tokenizer behind a :class:`megatron_nbdiff.data.tokenizer.Tokenizer`, which
    must carry a chat template; ``error`` is raised (naming ``source``) otherwise."""
    from ..data.chat import chat_tokenizer

    if tokenizer is None:
        raise error(f"{source} has no tokenizer, so it has no chat template for --chat")
    return chat_tokenizer(tokenizer.hf, source, "chat decoding", error)


def end_of_turn_ids(hf, source: str, error: type = DecodingError) -> tuple[int, ...]:
    """The template's end-of-turn token id (module docstring), as a one-element tuple."""
    from ..data.chat import ChatEncoder
    from ..errors import NBDiffError

    try:
        encoder = ChatEncoder(hf, source)
        tokens, masks, _, _ = encoder.encode([(_PROBE, f"{source} (chat template check)")])
    except NBDiffError as exc:
        raise error(str(exc)) from None
    loss = [i for i, m in enumerate(masks[0]) if m]
    return (int(tokens[0][loss[-1]]),)


class ChatTemplate:
    """The chat template of a runner's (or a tokenizer's) checkpoint: rendering, prompt ids and
    the stop ids of chat decoding."""

    def __init__(self, tokenizer, source: str, error: type = DecodingError):
        self.tokenizer = tokenizer
        self.source = source
        self.error = error
        self.hf = hf_tokenizer(tokenizer, source, error)
        self.end_of_turn_ids = end_of_turn_ids(self.hf, source, error)

    @classmethod
    def of(cls, runner: ModelRunner, error: type = DecodingError) -> "ChatTemplate":
        return cls(runner.tokenizer, runner.info.source, error)

    @property
    def template(self):
        """The template text (a dict of named templates for tokenizers that carry several)."""
        return self.hf.chat_template

    def render(self, messages: Sequence[dict], add_generation_prompt: bool = True,
               continue_final_message: bool = False, where: str = "the conversation") -> str:
        """The template's text for ``messages``; a template error names ``where``."""
        from jinja2 import TemplateError

        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise self.error(f"{where}: message {i} must be an object with string 'role' and 'content', "
                                 f"found {m!r}")
        try:
            text = self.hf.apply_chat_template(list(messages), tokenize=False,
                                               add_generation_prompt=add_generation_prompt,
                                               continue_final_message=continue_final_message)
        except (TemplateError, TypeError, ValueError, KeyError, IndexError) as exc:
            raise self.error(f"{where}: the chat template of {self.source} failed ({type(exc).__name__}: "
                             f"{exc})") from None
        if not isinstance(text, str):
            raise self.error(f"{where}: the chat template of {self.source} rendered {type(text).__name__}, not text")
        return text

    def prompt_ids(self, messages: Sequence[dict], where: str = "the conversation") -> list[int]:
        """Token ids of ``messages`` rendered with the generation prompt (the template's BOS, if it
        writes one, included; no special tokens added)."""
        if not messages or not isinstance(messages[-1], dict) or messages[-1].get("role") != "user":
            raise self.error(f"{where}: a chat prompt must end with a user turn")
        return list(self.tokenizer.encode(self.render(messages, True, where=where)))

    def stop_ids(self, runner: ModelRunner) -> tuple[int, ...]:
        """End-of-turn ids first, then the model's EOS ids (no repeats)."""
        out = []
        for t in tuple(self.end_of_turn_ids) + tuple(runner.info.eos_token_ids):
            if int(t) not in out:
                out.append(int(t))
        return tuple(out)


def generate_chat(runner: ModelRunner, conversations: Sequence[Union[str, Sequence[dict]]],
                  system: Optional[str] = None, template: Optional[ChatTemplate] = None,
                  labels: Optional[Sequence[str]] = None, **options: Any) -> list[dict]:
    """Chat decoding with :func:`~megatron_nbdiff.inference.api.generate`'s options.
    ``conversations``: user messages (text, with ``system`` before each) or message lists ending
    with a user turn (taken as they are: ``system`` applies to text prompts only). Returns one
    ``{"token_ids", "text", "stats", "prompt_ids", "stopped"}`` per conversation: ``token_ids``
    generated (ending with the stop token when one was produced), ``text`` without the stop
    token, ``stopped`` whether the turn ended (end-of-turn or EOS)."""
    from .api import generate

    if "suffix" in options and options["suffix"] is not None:
        raise DecodingError("chat decoding generates the assistant turn after the prompt; a suffix (infilling) "
                            "does not apply")
    if options.get("stop_at_eos") is False:
        raise DecodingError("chat decoding stops at the end-of-turn token; stop_at_eos=False does not apply")
    template = template or ChatTemplate.of(runner)
    labels = list(labels) if labels is not None else [f"prompt {i}" for i in range(len(conversations))]
    prompts = []
    for label, conv in zip(labels, conversations):
        messages = user_conversation(conv, system) if isinstance(conv, str) else list(conv)
        prompts.append(template.prompt_ids(messages, where=label))
    if not prompts:
        raise DecodingError("no prompts given")
    stops = template.stop_ids(runner)
    extra = tuple(int(t) for t in options.pop("stop_token_ids", ()) or ())
    outs = generate(runner, prompts, stop_token_ids=stops + extra, **options)
    results = []
    for ids, out in zip(prompts, outs):
        gen = list(out["token_ids"])
        stopped = bool(gen) and gen[-1] in stops + extra
        body = gen[:-1] if stopped else gen
        results.append(dict(token_ids=gen, text=runner.tokenizer.decode(body), stats=out["stats"],
                            prompt_ids=ids, stopped=stopped))
    return results
