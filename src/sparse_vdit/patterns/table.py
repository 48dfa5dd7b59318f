"""Compile one pattern per head into one block table for the whole layer (head fusion)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

import torch

from ..layout import VideoLayout
from .base import Pattern, expand_ranges, head_ranges

DEFAULT_BLOCK = 128
INDEX_CACHE_BYTES = 1 << 30  # expanded index lists kept for reuse, all tables together


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Which key blocks each query block of each head visits, for one layer and one layout.

    Stored compactly as ascending, disjoint key-block ranges ``[range_starts, range_ends)``
    (int32 [H, Qb, R], R = the most ranges a row needs, a handful); the FlexAttention-style
    index form ``kv_num_blocks`` [H, Qb] / ``kv_indices`` [H, Qb, max visited] is derived on
    the table's device when a backend asks for it. Heads with ``token_major[h]`` are laid out
    token-major (:meth:`VideoLayout.token_major_order`) and their blocks refer to that order.
    Key blocks cover only the first ``layout.kv_len`` tokens (padded text is never a key).
    """

    layout: VideoLayout
    block_size: int
    patterns: tuple[Pattern, ...]
    range_starts: torch.Tensor  # int32 [H, Qb, R]
    range_ends: torch.Tensor  # int32 [H, Qb, R]
    token_major: torch.Tensor  # bool [H]

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    @property
    def num_q_blocks(self) -> int:
        return self.range_starts.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.layout.kv_len // self.block_size)

    @property
    def device(self) -> torch.device:
        return self.range_starts.device

    @cached_property
    def kv_num_blocks(self) -> torch.Tensor:
        """int32 [H, Qb]: how many key blocks each (head, query block) visits."""
        return (self.range_ends - self.range_starts).sum(-1, dtype=torch.int32)

    @property
    def kv_indices(self) -> torch.Tensor:
        """int32 [H, Qb, max visited]: the visited key blocks, ascending; later slots repeat one.

        Built on the table's device from the ranges and kept in a cache bounded by
        ``INDEX_CACHE_BYTES`` (a dense head makes it [H, Qb, Kb]).
        """
        return _index_cache.get(self)

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
        columns = torch.arange(self.num_kv_blocks)
        starts, ends = self.range_starts[head].cpu(), self.range_ends[head].cpu()
        inside = (columns[None, None, :] >= starts[..., None]) & (columns[None, None, :] < ends[..., None])
        return inside.any(1)

    def __repr__(self) -> str:
        names = sorted({str(p) for p in self.patterns})
        return (
            f"BlockTable({self.layout.describe()}, block={self.block_size}, heads={self.num_heads}, "
            f"density={self.density:.3f}, patterns={names})"
        )


class _IndexCache:
    """Expanded index lists of recently used tables, least recently used dropped past a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.entries: OrderedDict[int, tuple[BlockTable, torch.Tensor]] = OrderedDict()

    def get(self, table: BlockTable) -> torch.Tensor:
        key = id(table)
        hit = self.entries.get(key)
        if hit is not None and hit[0] is table:
            self.entries.move_to_end(key)
            return hit[1]
        _, index = expand_ranges(table.range_starts, table.range_ends)
        self.entries[key] = (table, index)
        self.used += index.nbytes
        while self.used > self.budget and len(self.entries) > 1:
            _, (_, old) = self.entries.popitem(last=False)
            self.used -= old.nbytes
        return index


_index_cache = _IndexCache(INDEX_CACHE_BYTES)


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
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
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
