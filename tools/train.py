#!/usr/bin/env python
"""Train with a recipe: ``tools/train.py --config FILE.yaml [section.key=value ...]``.

One process (``python tools/train.py ...``) or many (``torchrun --nproc-per-node N
tools/train.py ...``). Exit codes: 0 done, 75 saved after SIGTERM/SIGUSR1 (requeue me),
3 stopped on a NaN/Inf loss, 2 bad configuration or inputs (reported before any work starts).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (sections model, recipe, data, train, checkpoint)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console lines")
    args = p.parse_args(argv)

    from megatron_nbdiff.checkpoint.errors import ConversionError
    from megatron_nbdiff.config import RunConfig
    from megatron_nbdiff.data.tokenizer import TokenizerError
    from megatron_nbdiff.training.trainer import EXIT_NAN, Trainer, TrainingError

    try:
        cfg = RunConfig.load(args.config, args.overrides)
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return Trainer(cfg, quiet=args.quiet).run()
    except (TrainingError, TokenizerError, ConversionError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NAN
    finally:
        from megatron_nbdiff.parallel import destroy_parallel

        destroy_parallel()


if __name__ == "__main__":
    sys.exit(main())
