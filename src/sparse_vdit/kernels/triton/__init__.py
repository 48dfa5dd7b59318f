"""Our Triton block-sparse attention backend (any CUDA GPU Triton supports).

``kernel.py`` holds the forward kernel, ``backward.py`` the backward kernels, ``launcher.py`` the
tile rule and work schedule, ``tuning.py`` the measured tiles, ``placement.py`` the per-(sample, head)
token-order permutation (FA4 with the choice on the device), ``backend.py`` the entry that joins
them; the torch reference it is checked against is ``sparse_vdit.kernels.reference``.
"""

from .backend import BACKEND, SELECT_ON_DEVICE, forward, is_available, run, run_backward, run_selected, run_with_lse

__all__ = ["BACKEND", "SELECT_ON_DEVICE", "forward", "is_available", "run", "run_backward", "run_selected", "run_with_lse"]
