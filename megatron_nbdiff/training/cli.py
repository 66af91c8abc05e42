"""``nbdiff-train`` / ``tools/train.py``: train with a recipe.

``nbdiff-train --config FILE.yaml [section.key=value ...]`` on one process, or under
``torchrun --nproc-per-node N``. Exit codes: 0 done, 75 saved after SIGTERM/SIGUSR1/SIGINT
(requeue me), 3 NaN/Inf loss, 2 bad configuration or inputs (reported before any work starts),
1 an OS error (disk full), 130 interrupted before anything could be saved.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import ArgumentParser, entry


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = ArgumentParser(prog="nbdiff-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML run config (sections model, recipe, data, train, checkpoint)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--quiet", action="store_true", help="no progress bar or console lines")
    args = p.parse_args(argv)

    from ..config import RunConfig
    from ..parallel import destroy_parallel
    from .trainer import Trainer

    cfg = RunConfig.load(args.config, args.overrides)
    try:
        return Trainer(cfg, quiet=args.quiet).run()
    finally:
        destroy_parallel()


console_main = entry(main)  # the ``nbdiff-train`` console script
