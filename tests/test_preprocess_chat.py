"""Chat preprocessing and parallel tokenisation (megatron_nbdiff.data.chat, the ``--format chat``
and ``--workers`` paths of megatron_nbdiff.data.preprocess): the loss mask covers exactly the
assistant contents and their end-of-turn tokens (checked against a rendering computed here from
the messages), outputs are byte-identical for any number of workers, truncation at turn
boundaries, bad conversations and templates as one error line with nothing written, and
check_loss_mask on aligned and misaligned datasets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from megatron_nbdiff.cli import run_main
from megatron_nbdiff.data import Tokenizer
from megatron_nbdiff.data import preprocess as pp
from megatron_nbdiff.data.chat import check_loss_mask, loss_mask_prefix
from megatron_nbdiff.errors import DataError

from _chat_fixtures import CHATML, chatml, make_chat_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_data.py")
WORDS = "the cat sat on a mat dog ran park you are helpful answer question what is two plus three five".split()
# rewrites earlier assistant turns once a later one exists (as reasoning templates drop old thoughts)
NOT_PREFIX_STABLE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and "
                     "not loop.last %}(earlier answer){% else %}{{ m['content'] }}{% endif %}<|im_end|>\n"
                     "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
NO_SPECIAL_END = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")

CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "you are helpful"},
                  {"role": "user", "content": "what is two plus three"},
                  {"role": "assistant", "content": "five"},
                  {"role": "user", "content": "and the cat?"},
                  {"role": "assistant", "content": "the cat sat on a mat, café ☕"}]},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the dog ran"}]},
    {"prompt": "answer the question", "response": "a park", "system": "be brief"},
    {"messages": [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"},
                  {"role": "user", "content": "three (no answer to this one)"}]},
    {"messages": [{"role": "user", "content": "empty answer next"}, {"role": "assistant", "content": ""}]},
]


def as_messages(record):
    if "messages" in record:
        return record["messages"]
    return [{"role": "system", "content": record["system"]}, {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["response"]}]


def make_tokenizer(out_dir, template):
    return make_chat_tokenizer(out_dir, template, WORDS)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("chat_tok"), CHATML)


def write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def run_tool(*args):
    import contextlib
    import io
    import types

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main(pp.main, list(args))
    return types.SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


def read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def runs(mask):
    """``[(start, stop), ...]`` of the maximal runs of ones in ``mask``."""
    padded = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def test_loss_mask_is_exactly_the_assistant_turns(tmp_path, tok_dir):
    src = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    prefix = str(tmp_path / "out" / "chat")
    r = run_tool("--input", src, "--tokenizer", tok_dir, "--output-prefix", prefix, "--format", "chat", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "chat.loss_mask.bin/.idx" in r.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["chat.bin", "chat.idx", "chat.loss_mask.bin", "chat.loss_mask.idx"]
    tok = Tokenizer(tok_dir)
    tokens, masks = read(prefix), read(loss_mask_prefix(prefix))
    assert len(tokens) == len(masks) == len(CONVERSATIONS)
    for record, ids, mask in zip(CONVERSATIONS, tokens, masks):
        messages = as_messages(record)
        assert len(ids) == len(mask) and set(mask) <= {0, 1}
        assert ids[-1] == tok.eod_id and mask[-1] == 0
        assert tok.decode(ids[:-1]) == chatml(messages)
        trained = [tok.decode(ids[a:b]) for a, b in runs(mask)]
        assert trained == [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    summary = check_loss_mask(prefix)
    assert summary["documents"] == len(CONVERSATIONS)
    assert summary["tokens"] == sum(map(len, tokens)) and summary["loss_tokens"] == sum(map(sum, masks))


def test_output_is_identical_for_any_number_of_workers(tmp_path, tok_dir):
    """Small chunks, so two workers really share the work; every format; every file byte-equal."""
    import random

    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))  # noqa: E731
    conversations = []
    for _ in range(150):
        messages = [{"role": "system", "content": sentence()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": sentence()}, {"role": "assistant", "content": sentence()}]
        conversations.append({"messages": messages})
    chat = write_jsonl(tmp_path / "c.jsonl", conversations)
    texts = write_jsonl(tmp_path / "t.jsonl", [{"text": sentence()} for _ in range(300)])
    paragraphs = tmp_path / "p.txt"
    paragraphs.write_text("\n\n".join(sentence() + "\n" + sentence() for _ in range(300)))
    for src, fmt, files in [(chat, "chat", 4), (texts, "auto", 2), (str(paragraphs), "text", 2)]:
        outputs = []
        for workers in (1, 2):
            prefix = str(tmp_path / f"{fmt}-{workers}" / "d")
            s = pp.preprocess(src, tok_dir, prefix, quiet=True, fmt=fmt, workers=workers, chunk_bytes=700)
            assert s["workers"] == workers and s["documents"] == (150 if fmt == "chat" else 300)
            assert s["worker_kind"] == (None if workers == 1 else "processes" if fmt == "chat" else "threads")
            names = sorted(os.listdir(os.path.dirname(prefix)))
            assert len(names) == files
            outputs.append({n: open(os.path.join(os.path.dirname(prefix), n), "rb").read() for n in names})
        assert outputs[0] == outputs[1], fmt
    # and the batched, chunked path writes what one document at a time through megatron's builder does
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    tok = Tokenizer(tok_dir)
    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=np.uint16)
    for line in open(texts):
        ids = tok.encode(json.loads(line)["text"]) + [tok.eod_id]
        builder.add_document(np.array(ids), [len(ids)])
    builder.finalize(ref + ".idx")
    for suffix in (".bin", ".idx"):
        assert open(ref + suffix, "rb").read() == open(str(tmp_path / "auto-2" / "d") + suffix, "rb").read()


def test_max_tokens_cuts_at_a_turn_boundary_or_drops(tmp_path, tok_dir):
    tok = Tokenizer(tok_dir)
    long = [{"role": "user", "content": "what is two plus three"}, {"role": "assistant", "content": "five"},
            {"role": "user", "content": "and the cat"}, {"role": "assistant", "content": "the cat sat on a mat"},
            {"role": "user", "content": "and the dog"}, {"role": "assistant", "content": " ".join(WORDS * 3)}]
    two_turns = tok.encode(chatml(long[:4]))
    assert tok.encode(chatml(long))[:len(two_turns)] == two_turns
    limit = len(two_turns) + 1  # the first two assistant turns and the EOD fit, the third does not
    hopeless = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " ".join(WORDS * 4)}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "five"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in (long, hopeless, short)])
    prefix = str(tmp_path / "c")
    r = run_tool("--input", src, "--tokenizer", tok_dir, "--output-prefix", prefix, "--format", "chat",
                 "--max-tokens", str(limit), "--quiet")
    assert r.returncode == 0, r.stderr
    assert f"warning: --max-tokens {limit}: 1 conversations cut" in r.stderr and "1 dropped" in r.stderr
    tokens, masks = read(prefix), read(loss_mask_prefix(prefix))
    assert tokens == [two_turns + [tok.eod_id], tok.encode(chatml(short)) + [tok.eod_id]]
    trained = [tok.decode(tokens[0][a:b]) for a, b in runs(masks[0])]
    assert trained == ["five<|im_end|>", "the cat sat on a mat<|im_end|>"]
    r = run_tool("--input", write_jsonl(tmp_path / "h.jsonl", [{"messages": hopeless}]), "--tokenizer", tok_dir,
                 "--output-prefix", str(tmp_path / "h"), "--format", "chat", "--max-tokens", str(limit), "--quiet")
    assert r.returncode == 2 and "all 1 conversations are longer than --max-tokens" in r.stderr
    r = run_tool("--input", src, "--tokenizer", tok_dir, "--output-prefix", str(tmp_path / "t"), "--max-tokens", "9")
    assert r.returncode == 2 and "--max-tokens applies to --format chat only" in r.stderr


GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "five"}]}


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]},
     "line 3: field 'messages' has no assistant turn"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]},
     "line 3: field 'messages[1].role': unknown role 'bot' (expected one of system, user, assistant)"),
    ({"messages": []}, "line 3: field 'messages' is empty"),
    ({"messages": "hi"}, "line 3: field 'messages' must be a list of {role, content} objects, found str"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}]},
     "line 3: field 'messages[1].content' must be a string, found int"),
    ({"messages": [{"role": "user", "content": "hi"}, "assistant"]},
     "line 3: field 'messages[1]' must be an object with role and content, found str"),
    ({"messages": [{"role": "user"}]}, "line 3: field 'messages[0]' has no 'content'"),
    ({"prompt": "hi"}, "line 3: field 'response' is missing"),
    ({"prompt": "hi", "response": None}, "line 3: field 'response' must be a string, found null"),
    ({"text": "hi"}, "line 3: no field 'messages' and no 'prompt'/'response'"),
    ([1, 2], "line 3: expected a JSON object with 'messages' or 'prompt'/'response', found list"),
    ({"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "line 3: field 'messages[0].role': a conversation cannot start with an assistant turn"),
    ('{"messages": [', "c.jsonl:3: not valid JSON"),
])
def test_bad_conversations_are_named_and_leave_nothing(tmp_path, tok_dir, record, message):
    src = write_jsonl(tmp_path / "c.jsonl", [GOOD, GOOD, record, GOOD])
    out = tmp_path / "out"
    r = run_tool("--input", src, "--tokenizer", tok_dir, "--output-prefix", str(out / "c"), "--format", "chat",
                 "--quiet")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert message in errors[0] and src in errors[0], errors[0]
    assert os.listdir(out) == []


@pytest.mark.parametrize("template,message", [
    (None, "the tokenizer has no chat template (chat_template in tokenizer_config.json or chat_template.jinja)"),
    (NO_SPECIAL_END, "ends an assistant turn with no special token"),
    ("{% for m in messages %}{{ m['content'] }}{% endfor %", "the chat template of"),
])
def test_unusable_templates_are_refused_before_reading(tmp_path, template, message):
    tok = make_tokenizer(tmp_path / "tok", template)
    src = write_jsonl(tmp_path / "c.jsonl", [GOOD])
    r = run_tool("--input", src, "--tokenizer", tok, "--output-prefix", str(tmp_path / "out" / "c"),
                 "--format", "chat", "--quiet")
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and message in errors[0], r.stderr
    assert tok in errors[0] and not os.path.exists(tmp_path / "out")


def test_a_template_that_rewrites_earlier_turns_is_refused(tmp_path):
    tok = make_tokenizer(tmp_path / "tok", NOT_PREFIX_STABLE)
    src = write_jsonl(tmp_path / "c.jsonl", [GOOD, CONVERSATIONS[0]])  # one turn renders fine, two do not
    r = run_tool("--input", src, "--tokenizer", tok, "--output-prefix", str(tmp_path / "out" / "c"),
                 "--format", "chat", "--quiet")
    assert r.returncode == 2, r.stderr
    assert f"error: {src} line 2: the chat template of {tok} is not prefix-stable" in r.stderr
    assert os.listdir(tmp_path / "out") == []


def test_an_error_in_a_worker_on_the_command_line(tmp_path, tok_dir):
    """tools/preprocess_data.py --workers 2 as a user runs it: the bad line found by a worker is
    reported as one error line, no traceback, nothing written."""
    records = [GOOD] * 3000 + [{"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]
    src = write_jsonl(tmp_path / "c.jsonl", records + [GOOD] * 10)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, TOOL, "--input", src, "--tokenizer", tok_dir, "--output-prefix",
                           str(out / "c"), "--format", "chat", "--workers", "2", "--quiet"],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (f"error: {src} line 3001: field 'messages[1].role': unknown role 'robot' "
                                   "(expected one of system, user, assistant)")
    assert os.listdir(out) == []


def test_an_error_in_a_worker_thread_is_the_same_error(tmp_path, tok_dir):
    """JSONL with a fast tokenizer is tokenised by threads: the bad line one of them finds is the
    DataError a single worker raises, and nothing is written."""
    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": "the cat sat"}) + "\n" for _ in range(200)) + '{"text": \n'
                   + json.dumps({"text": "more"}) + "\n")
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        with pytest.raises(DataError, match=f"^{src}:201: not valid JSON"):
            pp.preprocess(str(src), tok_dir, str(out / "c"), quiet=True, workers=workers, chunk_bytes=100)
        assert os.listdir(out) == []


def test_publish_replaces_or_removes_the_loss_mask(tmp_path, tok_dir):
    chat = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS)
    text = write_jsonl(tmp_path / "t.jsonl", [{"text": "the cat sat"}])
    prefix = str(tmp_path / "d")
    assert pp.preprocess(chat, tok_dir, prefix, quiet=True, fmt="chat")["loss_tokens"] > 0
    with pytest.raises(DataError, match="already exist: pass --force"):
        pp.preprocess(chat, tok_dir, prefix, quiet=True, fmt="chat")
    # a text dataset over a chat one must not leave the old loss mask beside the new tokens
    pp.preprocess(text, tok_dir, prefix, quiet=True, force=True)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "d.bin", "d.idx", "t.jsonl"]
    with pytest.raises(DataError, match="no loss mask .*d.loss_mask.bin is missing"):
        check_loss_mask(prefix)
    # a lone loss mask also counts as an existing dataset
    pp.preprocess(chat, tok_dir, str(tmp_path / "e"), quiet=True, fmt="chat")
    for suffix in (".bin", ".idx"):
        os.remove(str(tmp_path / "e") + suffix)
    with pytest.raises(DataError, match=r"e.loss_mask.bin and .*e.loss_mask.idx already exist"):
        pp.preprocess(chat, tok_dir, str(tmp_path / "e"), quiet=True, fmt="chat")
    # temporaries of a killed chat run are cleared by the next run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"d.tmp-{dead.pid}.loss_mask.bin"
    stale.write_bytes(b"x")
    pp.preprocess(chat, tok_dir, prefix, quiet=True, fmt="chat", force=True)
    assert not stale.exists() and check_loss_mask(prefix)["documents"] == len(CONVERSATIONS)


def test_check_loss_mask_refuses_what_does_not_align(tmp_path, tok_dir):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    pp.preprocess(write_jsonl(tmp_path / "a.jsonl", CONVERSATIONS), tok_dir, a, quiet=True, fmt="chat")
    pp.preprocess(write_jsonl(tmp_path / "b.jsonl", CONVERSATIONS[:1] + CONVERSATIONS[2:] + CONVERSATIONS[1:2]),
                  tok_dir, b, quiet=True, fmt="chat")
    good = {s: open(loss_mask_prefix(a) + s, "rb").read() for s in (".bin", ".idx")}

    def put(files):
        for suffix, data in files.items():
            with open(loss_mask_prefix(a) + suffix, "wb") as f:
                f.write(data)

    # same documents and total size, another order: the lengths differ
    put({s: open(loss_mask_prefix(b) + s, "rb").read() for s in (".bin", ".idx")})
    with pytest.raises(DataError, match=r"a.loss_mask.idx: sequence 1 has \d+ mask values but \d+ tokens"):
        check_loss_mask(a)
    # a value that is not 0 or 1
    put(good)
    flipped = bytearray(good[".bin"])
    flipped[3] = 2
    put({".bin": bytes(flipped)})
    with pytest.raises(DataError, match="a.loss_mask.bin: value 2 at token 3"):
        check_loss_mask(a)
    assert check_loss_mask(a, values=False)["loss_tokens"] is None
    # a mask of another dtype
    tokens = read(a)
    builder = IndexedDatasetBuilder(loss_mask_prefix(a) + ".bin", dtype=np.uint16)
    for ids in tokens:
        builder.add_document(np.zeros(len(ids), np.uint16), [len(ids)])
    builder.finalize(loss_mask_prefix(a) + ".idx")
    with pytest.raises(DataError, match="a.loss_mask.idx: loss mask of dtype uint16, expected uint8"):
        check_loss_mask(a)
    # fewer documents
    builder = IndexedDatasetBuilder(loss_mask_prefix(a) + ".bin", dtype=np.uint8)
    for ids in tokens[:-1]:
        builder.add_document(np.zeros(len(ids), np.uint8), [len(ids)])
    builder.finalize(loss_mask_prefix(a) + ".idx")
    with pytest.raises(DataError, match=f"4 sequences, but {a}.idx has 5"):
        check_loss_mask(a)
    # a truncated .bin is caught by the pair check
    put(good)
    put({".bin": good[".bin"][:-1]})
    with pytest.raises(DataError, match="a.loss_mask.bin has"):
        check_loss_mask(a)
    put(good)
    assert check_loss_mask(a)["documents"] == len(CONVERSATIONS)


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path, tok_dir, monkeypatch):
    """A worker process killed mid-run (here it exits on its second chunk; chat data is
    tokenised by processes): the run stops with an OSError (exit 1 on the command line) instead of
    waiting forever, and writes nothing."""
    real = pp._Work.__call__

    def dies_on_the_second_chunk(self, chunk):
        if chunk[1][0][0] > 1:
            os._exit(9)
        return real(self, chunk)

    monkeypatch.setattr(pp._Work, "__call__", dies_on_the_second_chunk)
    src = write_jsonl(tmp_path / "c.jsonl", CONVERSATIONS * 10)
    with pytest.raises(OSError, match="a --workers process died"):
        pp.preprocess(src, tok_dir, str(tmp_path / "out" / "c"), quiet=True, fmt="chat", workers=2,
                      chunk_bytes=100)
    assert os.listdir(tmp_path / "out") == []
