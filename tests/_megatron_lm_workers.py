"""Checkpoints as Megatron-LM GPT training writes them, made without Megatron-LM (not installed):
megatron-core's own ``GPTModel`` with its local layer spec, at TP=2 on two gloo processes, saved
with ``dist_checkpointing`` the way Megatron-LM's ``save_checkpoint`` does for
``--ckpt-format torch_dist`` (``iter_0000007/`` with the run's arguments, the iteration and the
checkpoint version in ``common.pt`` beside the model and optimizer entries, and
``latest_checkpointed_iteration.txt``). Transformer Engine is not installed either. TE's layer
specs store the input norms inside the fused linears (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``); megatron-core's local spec maps its keys to those same names
when it saves, so the ``te`` checkpoints carry exactly TE's names (checked), and the ``local``
one renames them to the module names (``input_layernorm.weight``, ``pre_mlp_layernorm.weight``)
that checkpoints of specs without that key map hold. Spawned by ``run_world``."""
from __future__ import annotations

import argparse
import os

import torch

VOCAB = 150  # tokenizer tokens; the model's vocabulary is padded to 256 (128 x TP=2)
PADDED = 256
SEQ = 40
LOCAL_NAMES = {"decoder.layers.self_attention.linear_qkv.layer_norm_weight": "decoder.layers.input_layernorm.weight",
               "decoder.layers.mlp.linear_fc1.layer_norm_weight": "decoder.layers.pre_mlp_layernorm.weight"}
# variant -> (stored names, tied embeddings, extra model tensor)
VARIANTS = {"te": ("te", False, False), "local": ("local", True, False), "extra": ("te", False, True)}


def run_args(tied: bool) -> argparse.Namespace:
    """The architecture arguments Megatron-LM stores (plus a few of the others)."""
    from megatron.core.transformer.enums import AttnBackend

    return argparse.Namespace(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        group_query_attention=True, num_query_groups=2, kv_channels=16, max_position_embeddings=64,
        seq_length=32, position_embedding_type="rope", rotary_base=5000, rotary_percent=1.0,
        normalization="RMSNorm", norm_epsilon=1e-5, swiglu=True, add_bias_linear=False,
        add_qkv_bias=False, qk_layernorm=False, untie_embeddings_and_output_weights=not tied,
        tensor_model_parallel_size=2, pipeline_model_parallel_size=1, padded_vocab_size=PADDED,
        params_dtype=torch.float32, attention_backend=AttnBackend.auto, lr=3e-4,
        tokenizer_type="HuggingFaceTokenizer", make_vocab_size_divisible_by=128,
    )


def _model(tied: bool):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_nbdiff.config import ModelConfig

    mc = ModelConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                     ffn_hidden_size=96, max_seq_len=64, rope_base=5000.0, norm_eps=1e-5, tie_embeddings=tied)
    tc = mc.transformer_config(tp=2, pp=1, dtype="fp32", use_cpu_initialization=True)
    torch.manual_seed(1234)  # the same master weights on both ranks, each keeps its TP part
    model = GPTModel(config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=PADDED, max_sequence_length=64, position_embedding_type="rope",
                     rotary_base=5000, share_embeddings_and_output_weights=tied).eval()
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:  # replicated: the same values on both ranks
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(6.0)  # megatron's std 0.02 is too small for mapping mistakes to show
    return model


def _logits(model, ids):
    import torch.distributed as dist
    from megatron.core import parallel_state

    b, s = ids.shape
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True: masked
    with torch.no_grad():
        out = model(ids, torch.arange(s).expand(b, s), causal)
    group = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(out) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, out.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def write_checkpoints(rank, *, world, port, root, ids):
    """Each variant into ``root/<variant>/`` (a Megatron-LM --save directory); returns the
    source model's logits per variant (TP=2, gathered)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_nbdiff import compat
    from megatron_nbdiff.parallel import initialize_parallel

    compat.no_orphan_writers()
    initialize_parallel(2, 1, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    out = {}
    for variant, (names, tied, extra) in VARIANTS.items():
        model = _model(tied)
        out[variant] = _logits(model, ids)
        sharded = model.sharded_state_dict()
        keys = {v.key for v in sharded.values() if isinstance(v, ShardedTensor)}
        assert set(LOCAL_NAMES) <= keys, sorted(keys)  # TE's names, as TE's specs store them
        if names == "local":
            for value in sharded.values():
                if isinstance(value, ShardedTensor) and value.key in LOCAL_NAMES:
                    value.key = LOCAL_NAMES[value.key]
        if extra:  # a tensor no dense GPT of these arguments has
            sharded["decoder.layers.0.mlp.router.weight"] = ShardedTensor.from_rank_offsets(
                "decoder.layers.mlp.router.weight", torch.ones(1, 4, 64), (0, 0, 2), replica_id=rank)
            sharded["decoder.layers.1.mlp.router.weight"] = ShardedTensor.from_rank_offsets(
                "decoder.layers.mlp.router.weight", torch.ones(1, 4, 64), (0, 1, 2), replica_id=rank)
        state = {
            "args": run_args(tied), "checkpoint_version": 3.0, "iteration": 7, "model": sharded,
            # an optimizer entry beside the model's (skipped by the converter)
            "optimizer": {"step": ShardedTensor.from_rank_offsets("optimizer.state.step", torch.ones(3),
                                                                  replica_id=rank)},
        }
        save_dir = os.path.join(root, variant)
        path = os.path.join(save_dir, "iter_0000007")
        if rank == 0:
            os.makedirs(path)
        dist.barrier()
        dist_checkpointing.save(state, path)
        dist.barrier()
        if rank == 0:
            with open(os.path.join(save_dir, "latest_checkpointed_iteration.txt"), "w") as f:
                f.write("7")
    return out
