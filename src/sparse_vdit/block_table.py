"""The compiled block table of one layer: what the kernels see of patterns.

Built from patterns by :func:`sparse_vdit.patterns.compile_layer`; this module knows nothing of
patterns beyond each head's ``name`` and ``token_major`` flag.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from functools import cached_property

import torch

from .layout import VideoLayout

DEFAULT_BLOCK = 128  # tokens per block, everywhere a block size is not given


def num_blocks(tokens: int, block: int) -> int:
    """Blocks of ``block`` tokens that cover ``tokens`` tokens (the last one may be ragged)."""
    return -(-tokens // block)


def is_power_of_two(x: int) -> bool:
    """Whether the int ``x`` is a power of two (1, 2, 4, ...)."""
    return x >= 1 and x & (x - 1) == 0


def valid_block_size(block_size) -> bool:
    """Whether ``block_size`` is a usable table block: an int, a power of two, at least 16."""
    return isinstance(block_size, int) and block_size >= 16 and is_power_of_two(block_size)
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
    patterns: tuple  # one pattern per head (objects with .name and .token_major)
    range_starts: torch.Tensor  # int32 [H, Qb, R]
    range_ends: torch.Tensor  # int32 [H, Qb, R]
    token_major: torch.Tensor  # bool [H]
    _moved: dict = field(default_factory=dict, repr=False, compare=False)  # device -> this table there

    @property
    def num_heads(self) -> int:
        return len(self.patterns)

    @property
    def num_q_blocks(self) -> int:
        return self.range_starts.shape[1]

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.layout.kv_len, self.block_size)

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
        """This table on ``device`` (one copy per device, kept with the table)."""
        device = torch.device(device)
        if device == self.device:
            return self
        hit = self._moved.get(device)
        if hit is None:
            hit = self._moved[device] = BlockTable(
                self.layout, self.block_size, self.patterns,
                self.range_starts.to(device), self.range_ends.to(device), self.token_major.to(device),
            )  # fmt: skip
        return hit

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



def expand_ranges(starts: torch.Tensor, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ranges [..., R] -> (count [...], ascending indices [..., max count]), on their device.

    Unused index slots repeat the row's last index (0 for an empty row), so every slot is a
    valid key-block index, as FlexAttention and FlashAttention-4 require.
    """
    shape = starts.shape[:-1]
    starts, ends = starts.reshape(-1, starts.shape[-1]).long(), ends.reshape(-1, ends.shape[-1]).long()
    length = ends - starts
    cum = torch.cumsum(length, dim=1)
    count = cum[:, -1]
    width = max(int(count.max()) if count.numel() else 0, 1)
    slot = torch.arange(width, device=starts.device).expand(len(count), width).contiguous()
    which = torch.searchsorted(cum, slot, right=True).clamp(max=starts.shape[1] - 1)
    index = torch.gather(starts, 1, which) + slot - (torch.gather(cum, 1, which) - torch.gather(length, 1, which))
    last = torch.gather(index, 1, (count - 1).clamp(min=0)[:, None])
    index = torch.where(slot < count[:, None], index, last)
    index = torch.where(count[:, None] > 0, index, 0)
    return count.to(torch.int32).reshape(shape), index.to(torch.int32).reshape(*shape, width)
