"""Layer specs and the two-stream model wrapper."""
from .model import NBDiffModel, PositionRopeGPTModel, StreamLogits, unwrap_model
from .spec import get_nbdiff_block_spec, get_nbdiff_layer_spec

__all__ = [
    "NBDiffModel",
    "PositionRopeGPTModel",
    "StreamLogits",
    "get_nbdiff_block_spec",
    "get_nbdiff_layer_spec",
    "unwrap_model",
]
