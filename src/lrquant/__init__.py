"""lrquant: post-training quantization of transformer foundation models."""

__version__ = "0.1.0"
