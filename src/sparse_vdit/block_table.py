"""The compiled block table of one layer: what the kernels see of patterns.

Built from patterns by :func:`sparse_vdit.patterns.compile_layer`; this module knows nothing of
patterns beyond each head's ``name`` and ``token_major`` flag.
"""

from __future__ import annotations

import itertools
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from .layout import VideoLayout

DEFAULT_BLOCK = 128  # tokens per block, everywhere a block size is not given


def num_blocks(tokens: int, block: int) -> int:
    """Blocks of ``block`` tokens that cover ``tokens`` tokens (the last one may be ragged)."""
    return -(-tokens // block)


def is_power_of_two(x: int) -> bool:
    """Whether the int ``x`` is a power of two (1, 2, 4, ...)."""
    return x >= 1 and x & (x - 1) == 0


def all_dense(patterns) -> bool:
    """Whether every head's pattern is ``dense`` (the layer then runs the dense kernel)."""
    return all(p.name == "dense" for p in patterns)


def valid_block_size(block_size) -> bool:
    """Whether ``block_size`` is a usable table block: an int, a power of two, at least 16."""
    return isinstance(block_size, int) and block_size >= 16 and is_power_of_two(block_size)
FORMS_CACHE_BYTES = 1 << 30  # derived forms kept for reuse (index lists, backend objects), all tables together


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Which key blocks each query block of each head visits, for one layer and one layout.

    Stored compactly as ascending, disjoint key-block ranges ``[range_starts, range_ends)``
    (int32 [H, Qb, R], R = the most ranges a row needs, a handful); the FlexAttention-style
    index form ``kv_num_blocks`` [H, Qb] / ``kv_indices`` [H, Qb, max visited] is derived on
    the table's device when a backend asks for it. Heads with ``token_major[h]`` are laid out
    token-major (:meth:`VideoLayout.token_major_order`) and their blocks refer to that order.
    Key blocks cover only the first ``layout.kv_len`` tokens (padded text is never a key).

    The table owns everything derived from it (:meth:`form`: index lists, copies on other
    devices, each backend's mask objects and work order): built on first use, dropped together.
    ``key`` names the table to the ``sparse_vdit::sparse_attention`` op (:func:`table_by_key`).
    """

    layout: VideoLayout
    block_size: int
    patterns: tuple  # one pattern per head (objects with .name and .token_major)
    range_starts: torch.Tensor  # int32 [H, Qb, R]
    range_ends: torch.Tensor  # int32 [H, Qb, R]
    token_major: torch.Tensor  # bool [H]
    key: int = field(init=False, repr=False, compare=False)
    _forms: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", next(_SERIAL))
        _LIVE[self.key] = self
        for name in ("token_major_heads", "all_dense", "all_skip"):  # read by every call: cached now, so that
            getattr(self, name)  # torch.compile never traces cached_property's lock (Python 3.11: a graph break)

    def form(self, name: Any, build: Callable[[BlockTable], Any]) -> Any:
        """What ``build(self)`` derives from this table, built once and kept with it.

        ``name`` is any hashable (e.g. ``("triton.schedule", 2, "levels")``). The forms of a table
        are dropped together: by :meth:`drop_forms`, by :func:`sparse_vdit.clear_caches`, or when
        the forms of all tables pass ``FORMS_CACHE_BYTES`` (least recently used table first).
        """
        forms = self._forms
        if name in forms:
            _forms_in_use.touch(self)
            return forms[name]
        value = forms[name] = build(self)
        _forms_in_use.add(self, _nbytes(value))
        return value

    def drop_forms(self) -> None:
        """Forget everything derived from this table (it is rebuilt when asked for)."""
        _forms_in_use.forget(self)

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

        Built on the table's device from the ranges, once (a :meth:`form`; a dense head makes it
        [H, Qb, Kb]).
        """
        return self.form("kv_indices", lambda t: expand_ranges(t.range_starts, t.range_ends)[1])

    @property
    def query_ranges(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The transposed table: for each head and key block, the query blocks that visit it.

        Ascending, disjoint query-block ranges ``(starts, ends)``, int32 [H, Qb, R'] (one row per
        block of the whole sequence: key blocks past ``kv_len`` have none), built on the table's
        device once (a :meth:`form`). The backward pass reads it to sum each key block's gradient.
        """
        return self.form("query_ranges", lambda t: transpose_ranges(t.range_starts, t.range_ends, t.num_q_blocks))

    @property
    def query_num_blocks(self) -> torch.Tensor:
        """int32 [H, Qb]: how many query blocks visit each key block (0 past ``kv_len``)."""
        return self.form("query_num_blocks", lambda t: (t.query_ranges[1] - t.query_ranges[0]).sum(-1, dtype=torch.int32))

    @cached_property
    def token_major_heads(self) -> tuple[int, ...]:
        return tuple(h for h, p in enumerate(self.patterns) if p.token_major)

    @cached_property
    def all_dense(self) -> bool:
        return all_dense(self.patterns)

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
        return self.form(("to", device), lambda t: BlockTable(
            t.layout, t.block_size, t.patterns,
            t.range_starts.to(device), t.range_ends.to(device), t.token_major.to(device),
        ))  # fmt: skip

    def heads(self, rows: tuple[int, ...]) -> BlockTable:
        """The table whose head ``i`` is this table's head ``rows[i]`` (kept with this table).

        A table of candidates (one per row) becomes a layer's table this way, as each sample's
        per-head choice among them (:func:`sparse_vdit.kernels.select_attention`'s host path).
        """
        rows = tuple(int(r) for r in rows)
        if not rows or not all(0 <= r < self.num_heads for r in rows):
            raise ValueError(f"rows {rows} must index this table's {self.num_heads} heads")
        if rows == tuple(range(self.num_heads)):
            return self
        return self.form(("heads", rows), lambda t: BlockTable(
            t.layout, t.block_size, tuple(t.patterns[r] for r in rows),
            t.range_starts[list(rows)], t.range_ends[list(rows)], t.token_major[list(rows)],
        ))  # fmt: skip

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


@dataclass(frozen=True)
class MaskHead:
    """What a table built from a block mask (:func:`table_from_mask`) says of each head's pattern."""

    name: str = "mask"
    token_major: bool = False


def table_from_mask(
    layout: VideoLayout, block_size: int, keep: torch.Tensor, name: str = "mask", max_runs: int | None = None
) -> BlockTable:
    """The block table whose head ``h`` visits exactly the key blocks where ``keep[h]`` is true.

    ``keep``: bool ``[H, query blocks, key blocks]`` in frame-major order (key blocks cover
    ``layout.kv_len``); any shape of mask (e.g. an oracle's top key blocks per query block). The
    table is built on ``keep``'s device; each row becomes its runs of consecutive kept blocks.
    Text rules are not added: the mask is taken as it is.

    ``max_runs``: the table's range width, given by a caller that knows a bound on the runs of
    kept blocks in any row (no row may have more); the table is then built without reading the
    mask on the host (no device sync). ``None``: the width is counted (one sync).
    """
    if keep.dtype != torch.bool or keep.dim() != 3:
        raise ValueError(f"keep must be a bool [heads, query blocks, key blocks] tensor, got {keep.dtype} {tuple(keep.shape)}")
    qb, kb = num_blocks(layout.num_tokens, block_size), num_blocks(layout.kv_len, block_size)
    if tuple(keep.shape[1:]) != (qb, kb):
        raise ValueError(f"keep has {tuple(keep.shape[1:])} blocks; the layout {layout.describe()} at block "
                         f"{block_size} has ({qb}, {kb})")  # fmt: skip
    if max_runs is None:
        edges = torch.nn.functional.pad(keep.to(torch.int8), (1, 1)).diff(dim=-1)
        runs = int((edges == 1).sum(-1).max()) if keep.numel() else 0
    elif isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1:
        raise ValueError(f"max_runs must be an int >= 1 or None, got {max_runs!r}")
    else:
        runs = min(max_runs, kb // 2 + 1)  # no row has more runs than that
    starts, ends = mask_ranges(keep, max(runs, 1))
    token_major = torch.zeros(keep.shape[0], dtype=torch.bool, device=keep.device)
    return BlockTable(layout, block_size, (MaskHead(name),) * keep.shape[0], starts, ends, token_major)


def mask_ranges(keep: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[..., width]`` starts and ends of the runs of true in ``keep`` (bool ``[..., n]``),
    ascending, unused slots the empty range ``[0, 0)``; no row may have more than ``width`` runs."""
    edges = torch.nn.functional.pad(keep.to(torch.int8), (1, 1)).diff(dim=-1)  # [..., n + 1]
    return compact_positions(edges == 1, width), compact_positions(edges == -1, width)


def compact_positions(flag: torch.Tensor, width: int, fill: torch.Tensor | int = 0) -> torch.Tensor:
    """int32 ``[..., width]``: the positions where ``flag`` (bool ``[..., n]``) is true, ascending,
    the first ``width`` of them; later slots ``fill`` (a number, or a tensor broadcast to
    ``[..., 1]``). A prefix sum and one scatter (no sort, no host sync)."""
    slot = torch.cumsum(flag, -1, dtype=torch.int32) - 1
    slot = torch.where(flag & (slot < width), slot, width).long()  # the rest -> a spare slot, dropped
    position = torch.arange(flag.shape[-1], device=flag.device, dtype=torch.int32).expand_as(flag)
    out = torch.zeros(*flag.shape[:-1], width + 1, dtype=torch.int32, device=flag.device)
    out = out.scatter_(-1, slot, position)[..., :width]
    if isinstance(fill, torch.Tensor) or fill != 0:
        count = flag.sum(-1, keepdim=True, dtype=torch.int32)
        out = torch.where(torch.arange(width, device=flag.device) < count, out, torch.as_tensor(fill, dtype=torch.int32,
                          device=flag.device))  # fmt: skip
    return out


RUN_LENGTH = "run_length"  # the form of :func:`run_length`


def run_length(table: BlockTable) -> float:
    """Mean key blocks per non-empty range of ``table`` (how long its runs of visited blocks are; 0.0
    when it visits nothing), kept with the table: measured once (one host read), unless the table's
    builder declared it (:func:`declare_run_length`), as builders of per-call tables do to stay sync-free."""
    return table.form(RUN_LENGTH, _measure_run_length)


def _measure_run_length(table: BlockTable) -> float:
    lengths = (table.range_ends - table.range_starts).long()
    runs = int((lengths > 0).sum())
    return float(lengths.sum()) / runs if runs else 0.0


def declare_run_length(table: BlockTable, value: float) -> BlockTable:
    """Record ``value`` (known on the host) as ``table``'s :func:`run_length` instead of measuring it; ``table``."""
    table.form(RUN_LENGTH, lambda t: float(value))
    return table


_SERIAL = itertools.count(1)
_LIVE: weakref.WeakValueDictionary[int, BlockTable] = weakref.WeakValueDictionary()


def table_by_key(key: int) -> BlockTable:
    """The live table whose :attr:`BlockTable.key` is ``key``."""
    table = _LIVE.get(key)
    if table is None:
        raise RuntimeError(f"sparse-vdit: block table {key} no longer exists (a compiled graph outlived its table?)")
    return table


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, BlockTable):
        return sum(t.nbytes for t in (value.range_starts, value.range_ends, value.token_major))
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    members = getattr(value, "__dict__", None)
    if members:
        return sum(v.nbytes for v in members.values() if isinstance(v, torch.Tensor))
    return 0


class _FormsInUse:
    """Tables holding derived forms, least recently used first; past the byte budget a table's
    forms are all dropped at once."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self.tables: OrderedDict[int, tuple[BlockTable, int]] = OrderedDict()

    def add(self, table: BlockTable, nbytes: int) -> None:
        _, held = self.tables.pop(table.key, (table, 0))
        self.tables[table.key] = (table, held + nbytes)
        self.used += nbytes
        while self.used > self.budget and len(self.tables) > 1:
            _, (old, size) = self.tables.popitem(last=False)
            old._forms.clear()
            self.used -= size

    def touch(self, table: BlockTable) -> None:
        if table.key in self.tables:
            self.tables.move_to_end(table.key)

    def forget(self, table: BlockTable) -> None:
        entry = self.tables.pop(table.key, None)
        if entry is not None:
            self.used -= entry[1]
        table._forms.clear()

    def clear(self) -> None:
        for table, _ in list(self.tables.values()):
            table._forms.clear()
        self.tables.clear()
        self.used = 0


_forms_in_use = _FormsInUse(FORMS_CACHE_BYTES)


def drop_all_forms() -> None:
    """Drop the derived forms of every table (:meth:`BlockTable.form`)."""
    _forms_in_use.clear()


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


def pairs_by_column(starts: torch.Tensor, ends: torch.Tensor, num_columns: int) -> tuple[torch.Tensor, ...]:
    """Every pair held by row ranges [H, Rows, R], ordered by (head, column, row): ``(cell, row, index)``,
    int64 [pairs]: its ``head * num_columns + column``, its row, and its place in the ranges' own order
    (head, row, then each row's ranges in turn), on the inputs' device."""
    rows = starts.shape[1]
    count, columns = expand_ranges(starts, ends)  # [H, Rows], [H, Rows, W] each row's columns in range order
    used = torch.arange(columns.shape[-1], device=starts.device)[None, None, :] < count[..., None]
    head, row, where = used.nonzero(as_tuple=True)
    cell = head * num_columns + columns[head, row, where].long()
    index = torch.argsort(cell * rows + row)  # by (head, column), then row
    return cell[index], row[index], index


def transpose_ranges(starts: torch.Tensor, ends: torch.Tensor, num_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ranges [H, Rows, R] -> column ranges [H, num_columns, R']: for each column, its rows.

    Row ``i`` of head ``h`` holds columns ``[starts[h, i, r], ends[h, i, r])``; the result lists,
    for each column, the rows holding it as ascending, disjoint ranges (R' the most any column
    needs, at least 1; unused slots are empty ``[0, 0)``). Memory O(visited pairs), on the inputs' device.
    """
    heads, rows, _ = starts.shape
    device = starts.device
    cell, row, _ = pairs_by_column(starts, ends, num_columns)
    first = torch.ones_like(cell, dtype=torch.bool)  # a pair that starts a new range
    if cell.numel() > 1:
        first[1:] = (cell[1:] != cell[:-1]) | (row[1:] != row[:-1] + 1)
    run = torch.cumsum(first, 0) - 1  # range number of each pair
    run_cell, run_start = cell[first], row[first]
    run_end = torch.zeros_like(run_start).scatter_reduce_(0, run, row + 1, reduce="amax")
    per_cell = torch.zeros(heads * num_columns, dtype=torch.long, device=device)
    per_cell.scatter_add_(0, run_cell, torch.ones_like(run_cell))
    width = max(int(per_cell.max()) if per_cell.numel() else 0, 1)
    before = torch.cumsum(per_cell, 0) - per_cell  # runs of earlier cells
    slot_of_run = torch.arange(len(run_cell), device=device) - before[run_cell]
    out_starts = torch.zeros(heads * num_columns, width, dtype=torch.int32, device=device)
    out_ends = torch.zeros_like(out_starts)
    out_starts[run_cell, slot_of_run] = run_start.to(torch.int32)
    out_ends[run_cell, slot_of_run] = run_end.to(torch.int32)
    return out_starts.reshape(heads, num_columns, width), out_ends.reshape(heads, num_columns, width)
