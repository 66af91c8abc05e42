"""Chat decoding (megatron_nbdiff.inference.chat, ``tools/generate.py --chat``) and the lm-eval
adapter's chat interface: prompts are the tokenizer's own rendering of the conversation (and equal
a ChatML string written out here), decoding stops at the template's end-of-turn token (a scripted
model produces it at a known place, inside a block), the text leaves it out, and a tokenizer
without a chat template is one ``error:`` line. The lm-eval path renders exactly what the
tokenizer renders when lm-eval itself builds the requests with ``apply_chat_template=True``."""
import json
import os
import shutil
import types
import warnings

import pytest
import torch

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.data import Tokenizer
from megatron_nbdiff.inference import DecodingError, ModelRunner, RunnerInfo, generate
from megatron_nbdiff.inference.chat import ChatTemplate, generate_chat, user_conversation
from megatron_nbdiff.inference.cli import main as generate_main

from _chat_fixtures import CHATML, chatml, make_chat_tokenizer

try:
    import lm_eval  # noqa: F401

    HAVE_LM_EVAL = True
except ImportError:
    HAVE_LM_EVAL = False
needs_lm_eval = pytest.mark.skipif(not HAVE_LM_EVAL, reason="lm-eval is not installed (requirements-eval.txt)")

WORDS = "the cat sat on a mat dog ran you are helpful what is two plus three five brief answer".split()
BLOCK = 4


def make_tokenizer(out_dir, template):
    return make_chat_tokenizer(out_dir, template, WORDS)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("chat_tok"), CHATML)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tok_dir):
    """A tiny random Llama with the ChatML tokenizer, converted with an appended mask token and
    marked as trained for block 4, and its HF export; plus a copy of the export without a chat
    template."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from _convert_workers import convert_as_adapted

    d = tmp_path_factory.mktemp("chat_model")
    hf = str(d / "hf")
    vocab = Tokenizer(tok_dir).vocab_size
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(hf)
    for name in os.listdir(tok_dir):
        shutil.copy(os.path.join(tok_dir, name), hf)
    _, exp, _ = convert_as_adapted(hf, d, BLOCK)
    plain = str(d / "plain")
    shutil.copytree(exp, plain)
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(plain, name)):
            os.remove(os.path.join(plain, name))
    cfg_path = os.path.join(plain, "tokenizer_config.json")
    tc = json.load(open(cfg_path))
    tc.pop("chat_template", None)
    json.dump(tc, open(cfg_path, "w"))
    return dict(exp=exp, plain=plain)


@pytest.fixture(scope="module")
def runner(model_dirs):
    from megatron_nbdiff.inference import load_runner

    return load_runner(model_dirs["exp"])


def im_end(tok):
    return tok.hf.convert_tokens_to_ids("<|im_end|>")


# -- rendering -----------------------------------------------------------------------------------------
def test_prompt_ids_are_the_templates_rendering(runner):
    tpl = ChatTemplate.of(runner)
    hf = runner.tokenizer.hf
    assert tpl.end_of_turn_ids == (im_end(runner.tokenizer),)
    assert tpl.stop_ids(runner) == (im_end(runner.tokenizer),) + tuple(runner.info.eos_token_ids)
    for messages in (user_conversation("what is two plus three"),
                     user_conversation("what is two plus three", system="you are helpful, be brief"),
                     [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "sat on a mat"},
                      {"role": "user", "content": "and the dog?"}]):
        ids = tpl.prompt_ids(messages)
        own = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        assert ids == list(own)
        assert runner.tokenizer.decode(ids) == chatml(messages, True)
        header = runner.tokenizer.encode("<|im_start|>assistant\n")
        assert ids[-len(header):] == header


def test_generate_chat_on_a_converted_model(runner, model_dirs, capsys):
    """The real model through the API and the CLI: both decode the same ids from the same prompt;
    the CLI prints the text without a stop token."""
    messages = user_conversation("what is two plus three", system="be brief")
    out = generate_chat(runner, [messages], max_new_tokens=12, threshold=0.5)[0]
    ref = generate(runner, [out["prompt_ids"]], max_new_tokens=12, threshold=0.5,
                   stop_token_ids=[im_end(runner.tokenizer)])[0]
    assert out["token_ids"] == ref["token_ids"]
    assert out["stats"]["tokens"] == len(out["token_ids"])
    stops = ChatTemplate.of(runner).stop_ids(runner)
    if out["stopped"]:
        assert out["token_ids"][-1] in stops
    assert not any(t in stops for t in out["token_ids"][:-1])
    code = run_main(generate_main, ["--model", model_dirs["exp"], "--chat", "--system", "be brief", "--prompt",
                                    "what is two plus three", "--max-new-tokens", "12", "--threshold", "0.5"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed == out["text"] + "\n"
    assert "<|im_end|>" not in printed


# -- stopping at the end of the turn ---------------------------------------------------------------------
class ScriptedChatRunner(ModelRunner):
    """A runner whose logit at position ``p`` is certain of ``script[p + 1 - start]``, where
    ``start`` is the position after the last assistant header (``<|im_start|>assistant\n``) in
    the row's history, and of ``filler`` beyond the script: the generated sequence is the script,
    whatever the block layout and however often the caller starts again from prompt + output.
    It runs without a cache, so every call sees the whole history."""

    def __init__(self, tokenizer, script, filler):
        vocab = tokenizer.vocab_size + 1
        info = RunnerInfo(vocab_size=vocab, mask_token_id=vocab - 1, eos_token_ids=(tokenizer.eod_id,),
                          block_size=BLOCK, layout="dual_context_causal", has_metadata=True,
                          source="scripted chat model", max_length=256)
        super().__init__(info, torch.device("cpu"), use_cache=False, tokenizer=tokenizer)
        self.script, self.filler = list(script), filler
        self.header = tokenizer.encode("<|im_start|>assistant\n")

    def _reset_cache(self):
        pass

    def _start(self, row, pos):
        h = len(self.header)
        k = max(k for k in range(len(row) - h + 1) if row[k:k + h] == self.header)
        return int(pos[k]) + h

    def _forward(self, ids, position_ids, mask, past, cached, append):
        assert not cached
        b, n = ids.shape
        logits = torch.full((b, n, self.info.vocab_size), -30.0)
        for i in range(b):
            start = self._start(ids[i].tolist(), position_ids[i].tolist())
            for j in range(n):
                k = int(position_ids[i, j]) + 1 - start
                tok = self.script[k] if 0 <= k < len(self.script) else self.filler
                logits[i, j, tok] = 30.0
        return logits


def test_decoding_stops_at_the_end_of_turn_token(tok_dir):
    tok = Tokenizer(tok_dir)
    eot = im_end(tok)
    answer = tok.encode("five")
    junk = tok.encode(" the cat sat on a mat")
    # six tokens, then the end-of-turn token: the 3rd position of the second block of 4, so block
    # decoding must cut inside a block
    body = (tok.encode("two plus three is") + answer)[:6]
    assert len(body) == 6 and eot not in body
    runner = ScriptedChatRunner(tok, body + [eot] + junk, filler=tok.encode("dog")[0])
    for mode in ("block", "ar", "full"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # full-sequence decoding of a dual-stream model warns
            out = generate_chat(runner, ["what is two plus three"], system="be brief", mode=mode,
                                max_new_tokens=16)[0]
        assert out["token_ids"] == body + [eot], mode
        assert out["stopped"] is True and out["text"] == tok.decode(body)
        assert out["prompt_ids"] == tok.encode(chatml(user_conversation("what is two plus three", "be brief"), True))
    # without the chat stop the same model runs through the end-of-turn token into the junk
    plain = generate(runner, [out["prompt_ids"]], max_new_tokens=32)[0]
    assert plain["token_ids"][:len(body) + 1 + len(junk)] == body + [eot] + junk
    with pytest.raises(DecodingError, match="stop_token_ids must be non-negative token ids"):
        generate(runner, [out["prompt_ids"]], max_new_tokens=4, stop_token_ids=[eot, -1])
    # EOS still stops a chat turn, and is left out of the text too
    runner.script = body + [tok.eod_id] + junk
    out = generate_chat(runner, ["hi"], max_new_tokens=16)[0]
    assert out["token_ids"] == body + [tok.eod_id] and out["text"] == tok.decode(body) and out["stopped"]
    # max_new_tokens before the end of the turn: not stopped, nothing cut
    runner.script = body + [eot]
    out = generate_chat(runner, ["hi"], max_new_tokens=3)[0]
    assert out["token_ids"] == body[:3] and out["text"] == tok.decode(body[:3]) and not out["stopped"]


def test_cli_chat_prompt_file_with_a_scripted_model(tok_dir, tmp_path, monkeypatch, capsys):
    import megatron_nbdiff.inference.api as api

    tok = Tokenizer(tok_dir)
    eot = im_end(tok)
    body = tok.encode("five")
    runner = ScriptedChatRunner(tok, body + [eot] + tok.encode(" the dog"), filler=tok.encode("cat")[0])
    monkeypatch.setattr(api, "load_runner", lambda *a, **k: runner)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "what is two plus three"}) + "\n"
                       + json.dumps({"prompt": "two plus three", "system": "you are helpful", "id": 7}) + "\n")
    code = run_main(generate_main, ["--model", str(tmp_path), "--chat", "--prompt-file", str(prompts),
                                    "--system", "be brief", "--batch-size", "1"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["five", "five"]
    assert [x["token_ids"] for x in lines] == [body + [eot]] * 2
    assert lines[1]["id"] == 7 and lines[1]["stopped"] is True
    assert lines[0]["prompt_ids"] == tok.encode(chatml(user_conversation("what is two plus three", "be brief"), True))
    assert lines[1]["prompt_ids"] == tok.encode(chatml(user_conversation("two plus three", "you are helpful"), True))


# -- bad input -------------------------------------------------------------------------------------------
def errors(capsys, argv):
    code = run_main(generate_main, argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    lines = [x for x in captured.err.splitlines() if x.startswith("error")]  # not transformers' progress bars
    return code, lines, captured.out


def test_a_tokenizer_without_a_chat_template_is_one_error_line(model_dirs, capsys):
    code, lines, out = errors(capsys, ["--model", model_dirs["plain"], "--chat", "--prompt", "hi"])
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and "no chat template" in lines[0]
    assert model_dirs["plain"] in lines[0]


def test_bad_chat_options_and_prompt_files(model_dirs, tmp_path, capsys):
    exp = model_dirs["exp"]
    code, lines, _ = errors(capsys, ["--model", exp, "--system", "x", "--prompt", "hi"])
    assert code == 2 and lines == ["error: --system applies to --chat only"]
    code, lines, _ = errors(capsys, ["--model", exp, "--chat", "--mode", "full", "--suffix", "x", "--prompt", "hi"])
    assert code == 2 and len(lines) == 1 and "--suffix (infilling) does not apply" in lines[0]
    ids = tmp_path / "ids.jsonl"
    ids.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt_ids": [3, 4]}) + "\n")
    code, lines, out = errors(capsys, ["--model", exp, "--chat", "--prompt-file", str(ids)])
    assert code == 2 and out == "" and lines == [f"error: {ids} line 2: --chat needs a text 'prompt' (the user "
                                                 "message), found prompt_ids"]
    sysbad = tmp_path / "sys.jsonl"
    sysbad.write_text(json.dumps({"prompt": "hi", "system": 3}) + "\n")
    code, lines, out = errors(capsys, ["--model", exp, "--chat", "--prompt-file", str(sysbad)])
    assert code == 2 and out == "" and lines == [f"error: {sysbad} line 1: field 'system' must be a string, found int"]
    # a prompt that does not fit is refused before anything is decoded
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "the cat " * 80}) + "\n")
    code, lines, out = errors(capsys, ["--model", exp, "--chat", "--prompt-file", str(long)])
    assert code == 2 and out == "" and len(lines) == 1 and f"{long} line 2 has" in lines[0]


def test_a_template_that_ends_turns_with_no_special_token(tmp_path, capsys):
    from megatron_nbdiff.errors import NBDiffError

    path = make_tokenizer(tmp_path / "tok", "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                                           "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(NBDiffError, match="no special token"):
        ChatTemplate(Tokenizer(path), path)


# -- the lm-eval adapter ---------------------------------------------------------------------------------
def req(*args):
    return types.SimpleNamespace(args=args)


@needs_lm_eval
def test_adapter_renders_with_the_tokenizers_template(runner):
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM

    lm = NBDiffLM(model=runner)
    hf = runner.tokenizer.hf
    history = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "what is two plus three"}]
    assert lm.apply_chat_template(history) == chatml(history, True) == hf.apply_chat_template(
        history, tokenize=False, add_generation_prompt=True)
    # lm-eval's gen_prefix: the assistant turn is started and continued, not closed
    started = history + [{"role": "assistant", "content": "Answer:"}]
    assert lm.apply_chat_template(started, add_generation_prompt=False) == chatml(history, True) + "Answer:"
    assert lm.chat_template(True) == CHATML and lm.chat_template(False) is None
    assert lm.tokenizer_name == runner.info.source.replace("/", "__")


@needs_lm_eval
def test_lm_evals_own_chat_rendering_and_generation(runner):
    """simple_evaluate with apply_chat_template=True and a system instruction builds each context
    through the adapter: the request text is the ChatML rendering of [system, user], and the
    response is the decoder's continuation of those prompt ids, stopped at the end of the turn."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from megatron_nbdiff.evaluation import TASKS_DIR
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM

    lm = NBDiffLM(model=runner, threshold=0.5, batch_size=2)
    res = lm_eval.simple_evaluate(model=lm, tasks=["nbdiff_toy_copy"], task_manager=TaskManager(
        include_defaults=False, include_path=TASKS_DIR), limit=2, log_samples=True, bootstrap_iters=0,
        apply_chat_template=True, system_instruction="be brief")
    samples = res["samples"]["nbdiff_toy_copy"]
    assert len(samples) == 2
    eot = im_end(runner.tokenizer)
    for sample in samples:
        (ctx, gen_kwargs), = sample["arguments"]
        user = f"Repeat the words: {sample['doc']['words']}\nAnswer:"
        assert ctx == chatml([{"role": "system", "content": "be brief"}, {"role": "user", "content": user}], True)
        ids = generate(runner, runner.tokenizer.encode(ctx), threshold=0.5, max_new_tokens=16,
                       stop_token_ids=[eot])[0]["token_ids"]
        if ids and ids[-1] in (eot,) + tuple(runner.info.eos_token_ids):
            ids = ids[:-1]
        assert sample["resps"][0][0] == runner.tokenizer.decode(ids).split("\n")[0]


@needs_lm_eval
def test_adapter_generation_stops_at_the_end_of_turn(tok_dir, model_dirs):
    from megatron_nbdiff.evaluation.common import EvaluationError
    from megatron_nbdiff.evaluation.lm_eval_adapter import NBDiffLM
    from megatron_nbdiff.inference import load_runner

    tok = Tokenizer(tok_dir)
    body = tok.encode("two plus three is five")[:6]
    runner = ScriptedChatRunner(tok, body + [im_end(tok)] + tok.encode(" the dog ran"), filler=tok.encode("cat")[0])
    lm = NBDiffLM(model=runner, stop_check_every=4)
    ctx = lm.apply_chat_template([{"role": "user", "content": "what is two plus three"}])
    (text,) = lm.generate_until([req(ctx, {"until": ["\n\n"], "max_gen_toks": 24})], disable_tqdm=True)
    assert text == tok.decode(body)
    # a checkpoint without a chat template: one clear error when a template is asked for
    plain = NBDiffLM(model=load_runner(model_dirs["plain"]))
    with pytest.raises(EvaluationError, match="no chat template"):
        plain.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(EvaluationError, match="no chat template"):
        plain.chat_template(True)
