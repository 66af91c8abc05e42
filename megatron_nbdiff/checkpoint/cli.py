"""The conversion commands (``tools/convert_hf_to_megatron.py``,
``tools/convert_megatron_to_hf.py``, ``tools/convert_megatron_lm.py``): argument parsing, the
checks of the arguments, the call and a one-line summary. Run them through
:func:`megatron_nbdiff.cli.run_main`: bad input raises
:class:`~megatron_nbdiff.checkpoint.errors.ConversionError` (one ``error:`` line, exit 2), a full
disk or a permission problem an ``OSError`` (exit 1); neither leaves an output behind.

Heavy imports (torch, megatron-core) happen inside the mains: ``dist_checkpointing`` starts helper
processes with the ``spawn`` method, which re-import the command's ``__main__`` module.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import entry
from .errors import ConversionError

HF_TO_MEGATRON = """Convert a Hugging Face checkpoint (Llama, Qwen2, Qwen3, Mistral, Qwen3-MoE, Mixtral;
safetensors) into a megatron-core distributed checkpoint of megatron_nbdiff, with nbdiff.json and
the tokenizer.

    python tools/convert_hf_to_megatron.py --hf-dir HF --out-dir OUT --tp 2 --pp 2 \\
        --mask-token append --dtype bf16

--mask-token: ``append`` (add ``<|mask|>``, rows = mean of existing rows), an unused id, a token
string of the tokenizer's vocabulary, or ``none``. The checkpoint is written in the reshardable
torch_dist format and loads at any TP/PP(/EP); --tp/--pp are checked against the architecture, set
the vocabulary padding and are recorded as the target layout, as is --ep (expert parallelism of a
mixture-of-experts model: it must divide the experts; 1 for a dense model).

The output directory must not exist or be empty; --force replaces an earlier conversion (a
directory holding nbdiff.json), atomically, and never any other directory. A weight that is NaN
or infinite stops the conversion with an error naming it; --allow-nonfinite converts it anyway,
with a warning and a note in nbdiff.json. Only safetensors are read (pytorch_model.bin is a
pickle, which can run code when loaded). Exit status: 0 done, 2 bad input, 1 a file-system error
(disk full, permissions), 130 interrupted; no output is left behind on failure.
"""

MEGATRON_TO_HF = """Export a megatron_nbdiff checkpoint (converted or adapted, any TP/PP) to a plain Hugging Face
checkpoint of the original architecture: config.json, sharded safetensors with an index, the
tokenizer and nbdiff.json. Loads with AutoModelForCausalLM.from_pretrained, no remote code.

    python tools/convert_megatron_to_hf.py --megatron-dir CKPT --out-dir HF_OUT --dtype bf16

Every shard of the checkpoint is checked before anything is written. --force, --allow-nonfinite
and the exit status are as for tools/convert_hf_to_megatron.py; a cast to a narrower --dtype that
turns finite weights into infinities counts as non-finite.
"""


MEGATRON_LM = """Convert a checkpoint written by Megatron-LM GPT training (--ckpt-format torch_dist, any
TP/PP, Transformer Engine or local layer specs) into a megatron_nbdiff checkpoint with nbdiff.json.

    python tools/convert_megatron_lm.py --load SAVE_DIR --tokenizer HF_TOKENIZER_DIR --out-dir OUT \
        [--mask-token append] [--args-yaml ARGS.yaml] [--tp 8 --pp 4]

--load: the run's --save directory (latest_checkpointed_iteration.txt names the iteration) or
one iter_NNNNNNN directory. The architecture comes from the arguments stored in the checkpoint;
--args-yaml gives them where the checkpoint has none, or overrides single fields (same names as
Megatron-LM's arguments: num_layers, hidden_size, ffn_hidden_size, num_attention_heads,
group_query_attention, num_query_groups, kv_channels, max_position_embeddings, rotary_base,
norm_epsilon, swiglu, normalization, position_embedding_type, add_bias_linear, add_qkv_bias,
qk_layernorm, untie_embeddings_and_output_weights, use_rope_scaling, rope_scaling_factor, ...).
--tokenizer: the Hugging Face tokenizer the run used (its token count is the real vocabulary).
Models this project cannot represent (learned absolute positions, LayerNorm, non-gated or
non-SiLU MLPs, linear biases, experts) are refused. --tp/--pp default to the source run's layout.
--mask-token, --force, --allow-nonfinite and the exit status are as for convert_hf_to_megatron.py.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a :class:`ConversionError` (one ``error:`` line)."""

    def error(self, message):
        raise ConversionError(f"{message} (see {self.prog} --help)")


def _parser(doc: str, prog: str) -> argparse.ArgumentParser:
    return _Parser(prog=prog, description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _into_megatron_options(p: argparse.ArgumentParser, layout_default: Optional[int], layout_help: str) -> None:
    """The options both converters into this project's format take."""
    p.add_argument("--tp", type=int, default=layout_default, help=f"target tensor-parallel size ({layout_help})")
    p.add_argument("--pp", type=int, default=layout_default, help=f"target pipeline-parallel size ({layout_help})")
    p.add_argument("--mask-token", default="append",
                   help="append | none | an unused token id | a token string (default append)")
    p.add_argument("--mask-token-string", default="<|mask|>",
                   help="string of the appended mask token (default <|mask|>)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="parameter dtype (default: the checkpoint's)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="ModelConfig.max_seq_len (default: max_position_embeddings)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="vocabulary padding multiple per TP rank (default 128)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier conversion in --out-dir (a directory with nbdiff.json)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert NaN/Inf weights with a warning instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def hf_to_megatron_parser() -> argparse.ArgumentParser:
    p = _parser(HF_TO_MEGATRON, "convert_hf_to_megatron.py")
    p.add_argument("--hf-dir", required=True, help="HF checkpoint directory (config.json + safetensors)")
    p.add_argument("--out-dir", required=True, help="output directory (must not exist or be empty)")
    _into_megatron_options(p, 1, "default 1")
    p.add_argument("--ep", type=int, default=1,
                   help="target expert-parallel size of a mixture-of-experts model (default 1)")
    return p


def megatron_to_hf_parser() -> argparse.ArgumentParser:
    p = _parser(MEGATRON_TO_HF, "convert_megatron_to_hf.py")
    p.add_argument("--megatron-dir", required=True, help="checkpoint directory with nbdiff.json")
    p.add_argument("--out-dir", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="dtype of the exported weights (default: the stored one)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--force", action="store_true",
                   help="replace an earlier export in --out-dir (a directory with nbdiff.json)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="export NaN/Inf weights with a warning instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def megatron_lm_parser() -> argparse.ArgumentParser:
    p = _parser(MEGATRON_LM, "convert_megatron_lm.py")
    p.add_argument("--load", required=True, help="Megatron-LM --save directory, or one iter_* directory")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory of the run")
    p.add_argument("--out-dir", required=True, help="output directory (must not exist or be empty)")
    p.add_argument("--args-yaml", default=None, help="YAML of Megatron-LM arguments (see above)")
    _into_megatron_options(p, None, "default: the source run's")
    return p


def _positive(name: str, value: Optional[int]) -> None:
    if value is not None and value < 1:
        raise ConversionError(f"{name} must be a positive integer, found {value}")


def hf_to_megatron_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/convert_hf_to_megatron.py``: convert, print the one-line summary, return 0."""
    args = hf_to_megatron_parser().parse_args(argv)
    _positive("--tp", args.tp)
    _positive("--pp", args.pp)
    _positive("--ep", args.ep)
    _positive("--max-seq-len", args.max_seq_len)
    _positive("--make-vocab-size-divisible-by", args.make_vocab_size_divisible_by)
    from .. import compat
    from .hf_to_megatron import convert_hf_to_megatron

    compat.install_safe_loading()
    result = convert_hf_to_megatron(
        args.hf_dir, args.out_dir, tp=args.tp, pp=args.pp, ep=args.ep, mask_token=args.mask_token,
        mask_token_string=args.mask_token_string, dtype=args.dtype, force=args.force,
        max_seq_len=args.max_seq_len, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite,
    )
    print(result.summary)
    return 0


def megatron_to_hf_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/convert_megatron_to_hf.py``: export, print the one-line summary, return 0."""
    args = megatron_to_hf_parser().parse_args(argv)
    from .. import compat
    from .megatron_to_hf import convert_megatron_to_hf, parse_size

    max_bytes = parse_size(args.max_shard_size)
    compat.install_safe_loading()
    result = convert_megatron_to_hf(
        args.megatron_dir, args.out_dir, dtype=args.dtype, force=args.force,
        max_shard_size=max_bytes, progress=not args.no_progress,
        allow_nonfinite=args.allow_nonfinite,
    )
    print(result.summary)
    return 0


def megatron_lm_main(argv: Optional[Sequence[str]] = None) -> int:
    """``tools/convert_megatron_lm.py``: convert, print the one-line summary, return 0."""
    args = megatron_lm_parser().parse_args(argv)
    for name in ("tp", "pp", "max_seq_len", "make_vocab_size_divisible_by"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    from .. import compat
    from .megatron_lm import convert_megatron_lm

    compat.install_safe_loading()
    result = convert_megatron_lm(
        args.load, args.tokenizer, args.out_dir, tp=args.tp, pp=args.pp, mask_token=args.mask_token,
        mask_token_string=args.mask_token_string, args_yaml=args.args_yaml, dtype=args.dtype,
        force=args.force, max_seq_len=args.max_seq_len,
        make_vocab_size_divisible_by=args.make_vocab_size_divisible_by,
        progress=not args.no_progress, allow_nonfinite=args.allow_nonfinite,
    )
    print(result.summary)
    return 0


# console scripts (``nbdiff-convert-hf-to-megatron``, ``nbdiff-convert-megatron-to-hf``,
# ``nbdiff-convert-megatron-lm``): the mains
# under run_main's exit-code contract
hf_to_megatron_console = entry(hf_to_megatron_main)
megatron_to_hf_console = entry(megatron_to_hf_main)
megatron_lm_console = entry(megatron_lm_main)
