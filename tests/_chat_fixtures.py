"""A ChatML template and a tiny tokenizer that carries it, shared by the chat data and chat
decoding tests (and the way transformers tokenizers carry templates: Jinja in the tokenizer's
config)."""
from __future__ import annotations

from megatron_nbdiff.data.make_tokenizer import train_bpe_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chatml(messages, generation_prompt: bool = False) -> str:
    """The ChatML text of ``messages`` (and of the assistant header with ``generation_prompt``),
    written out here independently of the template."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def make_chat_tokenizer(out_dir, template, words: list[str]) -> str:
    """A 300-entry byte-level BPE trained on rotations of ``words``, with ChatML's two special
    tokens added and ``template`` (None: no template) as its chat template; returns its folder."""
    from transformers import AutoTokenizer

    texts = [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 3
    path = train_bpe_tokenizer(texts, 300, str(out_dir))
    hf = AutoTokenizer.from_pretrained(path)
    hf.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(path)
    return path
