"""Our Triton block-sparse attention backend (any CUDA GPU Triton supports).

``kernel.py`` holds the kernel, ``launcher.py`` the tile rule and work schedule, ``tuning.py`` the
measured tiles, ``backend.py`` the entry that joins them; the torch reference it is checked
against is ``sparse_vdit.kernels.reference``.
"""

from .backend import BACKEND, forward, is_available, run

__all__ = ["BACKEND", "forward", "is_available", "run"]
