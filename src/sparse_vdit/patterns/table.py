"""Compile one pattern per head into one block table for the whole layer (head fusion)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch

from ..block_table import DEFAULT_BLOCK, BlockTable, drop_all_forms, valid_block_size
from ..layout import VideoLayout
from .base import Pattern, head_ranges


def compile_layer(
    patterns: Sequence[Pattern],
    layout: VideoLayout,
    block_size: int = DEFAULT_BLOCK,
    device: torch.device | str = "cpu",
) -> BlockTable:
    """Build the block table of a layer from one pattern per head; cached.

    Each distinct pattern's ranges are built once per layout and kept on ``device``; a layer's
    table stacks them: ``8 x heads x query blocks x ranges`` bytes, ranges being a handful.
    """
    patterns = tuple(patterns)
    if not patterns:
        raise ValueError("compile_layer needs at least one head")
    for p in patterns:
        if not isinstance(p, Pattern):
            raise TypeError(f"expected Pattern objects (e.g. sparse_vdit.patterns.diagonal(1.0)), got {p!r}")
    if not valid_block_size(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    return _compile(patterns, layout, block_size, torch.device(device))


@lru_cache(maxsize=1024)
def device_ranges(pattern: Pattern, layout: VideoLayout, block: int, device: torch.device):
    """:func:`head_ranges` on ``device``, cached (one copy per pattern, layout, block and device)."""
    starts, ends = head_ranges(pattern, layout, block)
    return starts.to(device), ends.to(device)


def _pad(x: torch.Tensor, width: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], 1)


@lru_cache(maxsize=1024)
def _compile(patterns: tuple[Pattern, ...], layout: VideoLayout, block: int, device: torch.device) -> BlockTable:
    rows = [device_ranges(p, layout, block, device) for p in patterns]
    width = max(starts.shape[1] for starts, _ in rows)
    starts = torch.stack([_pad(s, width) for s, _ in rows])
    ends = torch.stack([_pad(e, width) for _, e in rows])
    token_major = torch.tensor([p.token_major for p in patterns], dtype=torch.bool, device=device)
    return BlockTable(layout, block, patterns, starts, ends, token_major)


def clear_compiled() -> None:
    """Forget every compiled table and head's ranges, and all that was derived from tables."""
    for cached in (_compile, device_ranges, head_ranges):
        cached.cache_clear()
    drop_all_forms()
