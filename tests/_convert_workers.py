"""Helpers for the conversion tests: tiny random HF checkpoints of each family (built with
transformers from a config, no downloads), a tiny tokenizer, and the two-process gloo worker that
loads converted checkpoints at TP=2 and PP=2 (spawned; importable by module name)."""
from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors import safe_open

from _gloo import run_world

SEQ = 16
FAMILY_SETUPS = {
    # family: (config class, model class, extra config, tied embeddings)
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, False),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"use_sliding_window": False}, True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 24}, False),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, True),
}


def tiny_tokenizer(directory: str, n_tokens: int) -> None:
    """A WordLevel tokenizer over ``w0 .. w{n-2}`` plus ``[UNK]``, saved as an HF fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(n_tokens - 1)}
    vocab["[UNK]"] = n_tokens - 1
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="w1").save_pretrained(directory)


def random_hf_model(model_name: str, cfg, seed: int):
    """The transformers ``model_name`` of ``cfg`` (eval, sdpa) with weights drawn large enough that
    a mapping mistake changes the logits visibly: norms ``1 + 0.2 N(0, 1)``, the rest ``N(0, 0.15)``."""
    import transformers

    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    return model


def make_hf_checkpoint(directory: str, family: str, *, vocab: int = 150, layers: int = 2,
                       tie=None, tokenizer_tokens=None, seed: int = 0, dtype=torch.float32,
                       max_shard_size=None, rope=None):
    """Save a tiny random model of ``family`` (weights drawn large enough that mapping mistakes
    change the logits visibly); ``rope`` is an optional RoPE scaling dict (``rope_parameters``
    without ``rope_theta``). Returns the HF model (eval, fp32, sdpa)."""
    import transformers

    cfg_name, model_name, extra, tied = FAMILY_SETUPS[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, rope_theta=5000.0, tie_word_embeddings=tied if tie is None else tie,
        **({} if rope is None else {"rope_parameters": dict(rope, rope_theta=5000.0)}), **extra,
    )
    model = random_hf_model(model_name, cfg, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    if dtype == torch.float32:
        model.save_pretrained(directory, **kwargs)
    else:  # a copy: casting in place would also round the model's rotary inv_freq buffer
        import copy

        copy.deepcopy(model).to(dtype).save_pretrained(directory, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(dtype).float())
    if tokenizer_tokens:
        tiny_tokenizer(directory, tokenizer_tokens)
    return model


def input_ids(vocab: int, seed: int = 0, b: int = 2):
    return torch.randint(0, vocab, (b, SEQ), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


# ---------------------------------------------------------------------------------------------
# two-process worker


def run_layouts(out_dir: str, jobs: list[dict]) -> list:
    """:func:`layouts` on two gloo processes (it sets up its own parallel layouts)."""
    return run_world("_convert_workers", "layouts", out_dir, world=2, init=False, jobs=jobs)


def _pp_logits(model, ids, stage):
    """Two-stage forward with an explicit send of the stage-0 activations to stage 1."""
    import torch.distributed as dist

    with torch.no_grad():
        if stage == 0:
            hidden = model(ids).hidden.contiguous()
            dist.send(hidden, dst=1)
            return None
        cfg = model.model_config
        buf = torch.empty(ids.shape[1], ids.shape[0], cfg.hidden_size)
        dist.recv(buf, src=0)
        model.set_input_tensor(buf)
        return model(ids).clean


def _save_from_layout(model, src, dst, rank, copy_tokenizer=False, step=None, **parallel):
    """Save ``model`` (this process group's layout) as a checkpoint written at that layout, with
    ``src``'s metadata and the ``parallel`` fields replaced."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from megatron_nbdiff.checkpoint import read_metadata, write_metadata

    if rank == 0:
        os.makedirs(os.path.join(dst, "model"))
    dist.barrier()
    dist_checkpointing.save(model.sharded_state_dict(), os.path.join(dst, "model"))
    dist.barrier()
    if rank == 0:
        meta = read_metadata(src)
        changes = dict(parallel=dict(meta.parallel, **parallel))
        if step is not None:
            changes["step"] = step
        write_metadata(dst, meta.updated(**changes))
        if copy_tokenizer:
            for f in meta.tokenizer["files"]:
                shutil.copy(os.path.join(src, f), os.path.join(dst, f))
    dist.barrier()


def layouts(rank, world, port, jobs):
    """For each job: load the converted checkpoint at TP=2 (logits), save it from TP=2 (a
    checkpoint *written* at TP=2), load the converted one and the TP=2-written one at PP=2
    (logits on the last stage), and optionally save from PP=2."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_nbdiff.checkpoint import load_model
    from megatron_nbdiff.parallel import destroy_parallel, initialize_parallel

    out = {}
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for job in jobs:
            src, ids, name = job["ckpt"], job["ids"], job["name"]
            res = out.setdefault(name, {})
            initialize_parallel(2, 1)
            model = load_model(src, tp=2, pp=1).eval()
            with torch.no_grad():
                res["tp2"] = model(ids).clean
            if job.get("save_tp2"):
                _save_from_layout(model, src, job["save_tp2"], rank, copy_tokenizer=True, step=7,
                                  written_tp=2, written_pp=1, target_tp=2, target_pp=1)
            del model
            initialize_parallel(1, 2)
            stage = parallel_state.get_pipeline_model_parallel_rank()
            res["stage"] = stage
            for key, path in (("pp2", src), ("pp2_from_tp2", job.get("save_tp2"))):
                if path is None:
                    continue
                # tied embeddings at PP=2 rely on compat's Tensor.cuda shim (installed by
                # initialize_parallel)
                model = load_model(path, tp=1, pp=2).eval()
                res[key] = _pp_logits(model, ids, stage)
            if job.get("save_pp2"):
                _save_from_layout(model, src, job["save_pp2"], rank, written_tp=1, written_pp=2)
            del model
    finally:
        destroy_parallel()
    return out


def write_json(path, data):
    with open(path, "w") as f:
        json.dump(data, f)


def hf_tensors(directory: str) -> dict:
    """Every tensor of the HF safetensors checkpoint in ``directory`` (sharded or not)."""
    out = {}
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.isfile(index):
        files = sorted(set(json.load(open(index))["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        with safe_open(os.path.join(directory, name), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


def assert_same_hf_tensors(a: str, b: str) -> None:
    """The two HF checkpoints hold the same tensor names, dtypes and values, bit for bit."""
    ta, tb = hf_tensors(a), hf_tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


def convert_as_adapted(hf: str, directory, block: int) -> tuple[str, str, dict]:
    """Convert ``hf`` into ``directory/meg`` with a mask token appended and mark it, in its
    nbdiff.json, as an nbdiff model trained for block size ``block`` (what a real adaptation
    records); export that to ``directory/exp``. Returns (meg, exp, the nbdiff.json dict)."""
    from megatron_nbdiff.checkpoint import convert_hf_to_megatron, convert_megatron_to_hf

    meg, exp = os.path.join(str(directory), "meg"), os.path.join(str(directory), "exp")
    convert_hf_to_megatron(hf, meg, mask_token="append", progress=False)
    meta_path = os.path.join(meg, "nbdiff.json")
    with open(meta_path) as f:
        meta = json.load(f)
    meta.update(block_size=block, attention_layout="dual_context_causal", recipe="nbdiff")
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    convert_megatron_to_hf(meg, exp, progress=False)
    return meg, exp, meta
