"""``python -m megatron_nbdiff.evaluation ARGS``: lm-eval's own command line with the ``nbdiff``
model registered, e.g.

    python -m megatron_nbdiff.evaluation run --model nbdiff \\
        --model_args model=DIR,mode=block,threshold=0.9 \\
        --tasks nbdiff_toy --include_path megatron_nbdiff/evaluation/tasks

(``tools/eval.py`` wraps the same adapter with held-out losses, decoding speed and a plot.)
"""
import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as exc:
        print(f"error: lm-eval is not installed ({exc}); pip install -r requirements-eval.txt", file=sys.stderr)
        sys.exit(2)
    from . import lm_eval_adapter  # noqa: F401  (registers the model name "nbdiff")

    cli_evaluate()


if __name__ == "__main__":
    main()
