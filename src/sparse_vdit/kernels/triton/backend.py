"""The Triton backend's entry: measured tiles where asked for, then one launch.

``launcher`` launches with a given or rule-based tile choice; ``tuning`` times the launcher to
find tiles (``SPARSE_VDIT_TRITON_AUTOTUNE=1``); this module joins them, so neither imports the other.
"""

from __future__ import annotations

import torch

from . import launcher, tuning
from .launcher import is_available


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_num_blocks: torch.Tensor,
            kv_indices: torch.Tensor | None, *, block_size: int, tiles=None, **kwargs) -> torch.Tensor:  # fmt: skip
    """:func:`launcher.forward` with the tuned tiles of this GPU and shape when
    ``SPARSE_VDIT_TRITON_AUTOTUNE=1`` on CUDA (and no ``tiles`` given)."""
    if tiles is None and q.device.type == "cuda" and tuning.enabled():
        batch, n, heads, dim = q.shape
        tiles = tuning.tuned_tiles(batch, heads, n, dim, q.dtype, block_size, q.device)
    return launcher.forward(q, k, v, kv_num_blocks, kv_indices, block_size=block_size, tiles=tiles, **kwargs)


__all__ = ["forward", "is_available"]
