"""megatron_nbdiff: adapt autoregressive LLM checkpoints into block-diffusion language models
on megatron-core. See docs/method.md for the algorithms and docs/architecture.md for the layout of the code."""

__version__ = "0.1.0"
