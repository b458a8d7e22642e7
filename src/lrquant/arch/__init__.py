"""Architecture maps as data: where the blocks are and which module feeds which linears."""

from lrquant.arch.registry import ArchSpec, SmoothPair, get_arch_spec, supported_model_types

__all__ = ["ArchSpec", "SmoothPair", "get_arch_spec", "supported_model_types"]
