"""megatron_nbdiff: adapt autoregressive LLM checkpoints into block-diffusion language models
on megatron-core. See METHOD.md and DESIGN.md for the algorithms and the layout."""

__version__ = "0.1.0"
