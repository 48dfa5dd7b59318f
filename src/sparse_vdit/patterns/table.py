"""Compile one pattern per head into one block table for the whole layer (head fusion)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from ..layout import VideoLayout
from .base import Pattern, head_rows

DEFAULT_BLOCK = 128


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Per head, per query block: how many key blocks it visits and which (FlexAttention's shape).

    ``kv_indices[h, i, :kv_num_blocks[h, i]]`` are ascending key-block indices of head ``h``'s
    query block ``i``; later slots repeat a valid index. Heads with ``token_major[h]`` are laid out
    token-major (:meth:`VideoLayout.token_major_order`) and their indices refer to that order.
    Key blocks cover only the first ``layout.kv_len`` tokens (padded text is never a key).
    """

    layout: VideoLayout
    block_size: int
    patterns: tuple[Pattern, ...]
    kv_num_blocks: torch.Tensor  # int32 [H, Qb]
    kv_indices: torch.Tensor  # int32 [H, Qb, max_visited]
    token_major: torch.Tensor  # bool [H]

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    @property
    def num_q_blocks(self) -> int:
        return self.kv_num_blocks.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.layout.kv_len // self.block_size)

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    @cached_property
    def token_major_heads(self) -> tuple[int, ...]:
        return tuple(h for h, p in enumerate(self.patterns) if p.token_major)

    @cached_property
    def all_dense(self) -> bool:
        return all(p.name == "dense" for p in self.patterns)

    @cached_property
    def all_skip(self) -> bool:
        return all(p.name == "skip" for p in self.patterns)

    @cached_property
    def head_density(self) -> torch.Tensor:
        """Share of (query block, key block) pairs each head visits, float64 [H]."""
        return self.kv_num_blocks.double().sum(1).cpu() / (self.num_q_blocks * self.num_kv_blocks)

    @property
    def density(self) -> float:
        """Share of all (head, query block, key block) pairs that are computed."""
        return float(self.head_density.mean())

    def to(self, device: torch.device | str) -> BlockTable:
        return compile_layer(self.patterns, self.layout, self.block_size, device)

    def block_mask(self, head: int) -> torch.Tensor:
        """Dense bool [Qb, Kb] map of one head's visited blocks (for drawing and tests only)."""
        out = torch.zeros(self.num_q_blocks, self.num_kv_blocks, dtype=torch.bool)
        counts, index = self.kv_num_blocks[head].cpu(), self.kv_indices[head].cpu().long()
        used = torch.arange(index.shape[1])[None, :] < counts[:, None]
        rows = torch.arange(self.num_q_blocks)[:, None].expand_as(index)
        out[rows[used], index[used]] = True
        return out

    def __repr__(self) -> str:
        names = sorted({str(p) for p in self.patterns})
        return (
            f"BlockTable({self.layout.describe()}, block={self.block_size}, heads={self.num_heads}, "
            f"density={self.density:.3f}, patterns={names})"
        )


def compile_layer(
    patterns: Sequence[Pattern],
    layout: VideoLayout,
    block_size: int = DEFAULT_BLOCK,
    device: torch.device | str = "cpu",
) -> BlockTable:
    """Build the block table of a layer from one pattern per head; cached.

    Each distinct pattern's rows are built once per layout and kept on ``device``; a layer's
    table stacks them, padded to the layer's largest visited count, so its memory is
    ``4 x heads x query blocks x max visited`` bytes (O(heads x query blocks x visited blocks)).
    The last 128 layer tables stay cached.
    """
    patterns = tuple(patterns)
    if not patterns:
        raise ValueError("compile_layer needs at least one head")
    for p in patterns:
        if not isinstance(p, Pattern):
            raise TypeError(f"expected Pattern objects (e.g. sparse_vdit.patterns.diagonal(1.0)), got {p!r}")
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    return _compile(patterns, layout, block_size, torch.device(device))


@lru_cache(maxsize=1024)
def _device_rows(pattern: Pattern, layout: VideoLayout, block: int, device: torch.device):
    count, index = head_rows(pattern, layout, block)
    return count.to(device), index.to(device)


@lru_cache(maxsize=128)
def _compile(patterns: tuple[Pattern, ...], layout: VideoLayout, block: int, device: torch.device) -> BlockTable:
    rows = [_device_rows(p, layout, block, device) for p in patterns]
    width = max(index.shape[1] for _, index in rows)
    counts = torch.stack([count for count, _ in rows])
    indices = torch.stack([torch.cat([index, index[:, -1:].expand(-1, width - index.shape[1])], 1) for _, index in rows])
    token_major = torch.tensor([p.token_major for p in patterns], dtype=torch.bool, device=device)
    return BlockTable(layout, block, patterns, counts, indices, token_major)
