"""HF <-> megatron-core checkpoint conversion, checkpoint metadata (``nbdiff.json``) and the
model loader. See ``mapping.py`` for the parameter map and ``metadata.py`` for the format."""
from .errors import CheckpointMetadataError, ConversionError
from .families import FAMILIES, Family, get_family, parse_hf_config
from .metadata import (
    FORMAT,
    FORMAT_VERSION,
    METADATA_NAME,
    SHIFT,
    CheckpointMetadata,
    read_metadata,
    write_metadata,
)


def convert_hf_to_megatron(*args, **kwargs):
    """See :func:`megatron_nbdiff.checkpoint.hf_to_megatron.convert_hf_to_megatron`."""
    from .hf_to_megatron import convert_hf_to_megatron as _convert

    return _convert(*args, **kwargs)


def convert_megatron_to_hf(*args, **kwargs):
    """See :func:`megatron_nbdiff.checkpoint.megatron_to_hf.convert_megatron_to_hf`."""
    from .megatron_to_hf import convert_megatron_to_hf as _convert

    return _convert(*args, **kwargs)


def load_model(*args, **kwargs):
    """See :func:`megatron_nbdiff.checkpoint.loader.load_model`."""
    from .loader import load_model as _load

    return _load(*args, **kwargs)


__all__ = [
    "FAMILIES",
    "FORMAT",
    "FORMAT_VERSION",
    "METADATA_NAME",
    "SHIFT",
    "CheckpointMetadata",
    "CheckpointMetadataError",
    "ConversionError",
    "Family",
    "convert_hf_to_megatron",
    "convert_megatron_to_hf",
    "get_family",
    "load_model",
    "parse_hf_config",
    "read_metadata",
    "write_metadata",
]
