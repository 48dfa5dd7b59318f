"""sparse-vdit: per-head sparse attention for video diffusion transformers."""

from .kernels import sparse_attention
from .layout import VideoLayout
from .patterns import BlockTable, Pattern, compile_layer

__version__ = "0.1.0"

__all__ = ["BlockTable", "Pattern", "VideoLayout", "compile_layer", "sparse_attention", "__version__"]
