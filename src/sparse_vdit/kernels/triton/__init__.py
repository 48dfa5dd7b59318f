"""Our Triton block-sparse attention backend (any CUDA GPU Triton supports).

``kernel.py`` holds the kernel, ``launcher.py`` the tile choice and work schedule; the torch
reference it is checked against is ``sparse_vdit.kernels.reference``.
"""

from .launcher import forward, is_available

__all__ = ["forward", "is_available"]
