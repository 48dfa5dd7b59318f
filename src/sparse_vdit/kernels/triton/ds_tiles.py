"""Where the Triton backward keeps its stored dS tiles (:mod:`.backward`, ``dq="stored"``).

One ``[block, block]`` tile per visited (query block, key block) pair, numbered head by head, query block by
query block, key block ascending (:func:`slots`); heads go in chunks whose tiles fit a memory share
(:func:`head_chunks`, :func:`budget`; a head over it in key-block windows, :func:`window`), the tiles of a chunk
in one buffer (:func:`buffer`), written by the dK/dV kernel's wide stores and read by the dQ kernel through tensor
descriptors where the device has them (:func:`descriptor`). A tile's rows and columns are stored in the order of
:func:`store_order`.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...block_table import BlockTable, pairs_by_column
from .launcher import _schedule, tile_work


def buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, allocate=None):
    """Room for stored dS tiles (``allocate``, default ``torch.empty``), or None when the device has not
    that much free now."""
    try:
        return (allocate or torch.empty)(shape, dtype=dtype, device=device)
    except torch.OutOfMemoryError:
        return None


def descriptor(ds: torch.Tensor, box: tuple[int, int]):
    """A tensor descriptor of the stored tiles' ``[pairs * block, block]`` view, ``box`` at a time."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows = ds.view(-1, ds.shape[-1])
    return TensorDescriptor(rows, list(rows.shape), list(rows.stride()), list(box))


def slots(table, recompute: torch.Tensor | None = None) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """Where stored dS tiles go, pairs numbered head by head, query block by query block, key block
    ascending: int32 ``[H, Qb, R]``, the slot of each forward range's first pair (for the dQ kernel); the
    first slot of each head (``H + 1`` entries, the last the number of pairs); and, for the dK/dV kernel,
    int32 ``[pairs]`` the slot of each pair taken in the transposed table's order (head, key block,
    query block) with int32 ``[H, Kb, R']``, where each of its query ranges starts in that list.
    ``recompute`` (``[H, Qb]``, :func:`recompute_rows`): those query blocks' pairs get no slot (-1 in the
    dK/dV kernel's list; the others numbered without them)."""
    _, _, by_column = pairs_by_column(table.range_starts, table.range_ends, table.num_q_blocks)
    lengths = (table.range_ends - table.range_starts).sum(2)  # [H, Qb] pairs of each query block
    keep = torch.ones_like(lengths, dtype=torch.bool) if recompute is None else (recompute == 0).to(lengths.device)
    stored = keep.flatten().repeat_interleave(lengths.flatten().long()).long()  # each pair in the forward order
    before = torch.cumsum(stored, 0) - stored  # stored pairs ahead of each pair: its slot where it is stored
    slot = torch.where(stored > 0, before, -1)
    first = _first_pairs(table.range_starts, table.range_ends).long()  # each range's first pair (forward order)
    before = torch.cat([before, before.new_tensor([int(stored.sum())])])  # an empty range may point past the end
    per_head = (lengths * keep).sum(1).tolist()
    return (before[first].to(torch.int32).contiguous(), [0, *itertools.accumulate(per_head)],
            slot[by_column].to(torch.int32), _first_pairs(*table.query_ranges))  # fmt: skip


def recompute_rows(kv_num_blocks: torch.Tensor, tiles_per_block: int, num_tiles: int, order: str,
                   share: float) -> torch.Tensor:
    """int8 ``[H, Qb]``, 1 for the query blocks whose dQ recomputes the probabilities though the tiles are stored
    (the backward's ``dq_split``): ``share`` of the dQ launch's busy programs, spread evenly through its order
    (``launcher._schedule`` of ``kv_num_blocks``), so that programs bound by the tensor cores run beside programs
    bound by reading tiles, and none in the last tenth of it (recomputing programs run longer: a longer tail).
    Their dS tiles are not stored (:func:`slots`)."""
    heads, q_blocks = kv_num_blocks.shape
    rows = torch.zeros(heads, q_blocks, dtype=torch.int8)
    if share <= 0:
        return rows.to(kv_num_blocks.device)
    schedule = _schedule(kv_num_blocks, tiles_per_block, num_tiles, order).long().cpu()
    busy = tile_work(kv_num_blocks, tiles_per_block, num_tiles).flatten().cpu()[schedule] > 0
    items = schedule[busy]
    blocks = items // num_tiles * q_blocks + items % num_tiles // tiles_per_block  # a block's tiles decide together
    unique, inverse = torch.unique(blocks, return_inverse=True)
    first = torch.full_like(unique, len(blocks)).scatter_reduce(0, inverse, torch.arange(len(blocks)), "amin")
    blocks = unique[torch.argsort(first)]  # each block at its first tile's place in the launch
    place = torch.arange(len(blocks), dtype=torch.float64)
    chosen = (torch.floor((place + 1) * share) > torch.floor(place * share)) & (place < 0.9 * len(blocks))
    rows.view(-1)[blocks[chosen]] = 1
    return rows.to(kv_num_blocks.device)


def _first_pairs(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """int32, the shape of ``starts``: the number of pairs in the ranges before each one (flat order)."""
    length = (ends - starts).long().flatten()
    return (torch.cumsum(length, 0) - length).view_as(starts).to(torch.int32).contiguous()


def budget(device: torch.device, share: float) -> int:
    """Bytes the stored dS tiles of one launch may take: ``share`` of the device's memory (of 8 GiB on the CPU)."""
    if device.type != "cuda":
        return int(share * (8 << 30))
    return int(share * torch.cuda.get_device_properties(device).total_memory)


def table_chunks(table: BlockTable, batch: int, element_size: int, device: torch.device, share: float) -> list[Chunk]:
    """The backward's launches for ``table`` (:func:`head_chunks` within :func:`budget`), kept with the table."""
    pair_bytes, limit = batch * table.block_size**2 * element_size, budget(device, share)
    return table.form(("triton.bwd.chunks", pair_bytes, limit),
                      lambda t: head_chunks(t.query_num_blocks, pair_bytes, limit))  # fmt: skip


class Chunk(NamedTuple):
    """One launch of each backward kernel over heads ``[h0, h1)``, their dS tiles ``stored`` (else dQ recomputes the
    probabilities); ``keys``: None (the heads whole) or each head's key-block window ``[lo, hi)`` (:func:`window`)."""

    h0: int
    h1: int
    stored: bool
    keys: tuple[tuple[int, int], ...] | None = None


def head_chunks(counts: torch.Tensor, pair_bytes: int, limit: int) -> list[Chunk]:
    """The backward's launches, heads in order, each chunk's dS tiles (``pair_bytes`` a pair) within ``limit``
    bytes; ``counts``: int ``[H, Kb]`` the pairs of each (head, key block) (the transposed table's query blocks).

    Heads that fit go whole, as many together as fit. A head whose tiles alone do not fit goes in key-block windows
    (its parts in consecutive chunks, beside whole heads where room is left: HunyuanVideo 720p at 50% has 14 GB of
    tiles a head, an H100's share is 12 GB); the dQ kernel then adds each window's part. A head with a key block
    whose tiles alone do not fit (only with a tiny ``limit``) is not stored: its dQ recomputes the probabilities,
    neighbours among such heads in one chunk."""
    counts = counts.detach().to("cpu", torch.int64)
    cap, width = limit // pair_bytes, counts.shape[1]
    chunks: list[Chunk] = []
    open_: list[tuple[int, int, int]] = []  # (head, lo, hi) of the chunk being filled
    used = 0

    def close() -> None:
        nonlocal open_, used
        if open_:
            chunks.append(_chunk(open_, width))
        open_, used = [], 0

    for h, row in enumerate(counts.tolist()):
        total = sum(row)
        if max(row, default=0) > cap:
            close()
            if chunks and not chunks[-1].stored and chunks[-1].h1 == h:  # the run before ends here: extend it
                chunks[-1] = Chunk(chunks[-1].h0, h + 1, False)
            else:
                chunks.append(Chunk(h, h + 1, False))
        elif total <= cap:
            if used + total > cap:
                close()
            open_.append((h, 0, width))
            used += total
        else:
            lo = 0
            for block, pairs in enumerate(row):
                if used + pairs > cap:
                    if block > lo:
                        open_.append((h, lo, block))
                    close()
                    lo = block
                used += pairs
            open_.append((h, lo, width))
    close()
    return chunks


def _chunk(segments: list[tuple[int, int, int]], width: int) -> Chunk:
    h0, h1 = segments[0][0], segments[-1][0] + 1
    if all(lo == 0 and hi == width for _, lo, hi in segments):
        return Chunk(h0, h1, True)
    windows = {h: (lo, hi) for h, lo, hi in segments}
    return Chunk(h0, h1, True, tuple(windows[h] for h in range(h0, h1)))


def _window_bounds(chunk: Chunk, heads: int, dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lo, hi)`` ``[heads]``: each head's key-block window in ``chunk`` (``[0, 0)``: a head outside it)."""
    bounds = torch.zeros(2, heads, dtype=dtype)
    bounds[:, chunk.h0 : chunk.h1] = torch.tensor(chunk.keys, dtype=dtype).T
    return tuple(bounds.to(device))


def window(table: BlockTable, chunk: Chunk) -> BlockTable:
    """``table`` cut to ``chunk``: its heads' key blocks within their windows, the other heads empty (the pairs,
    slots and transposed ranges of the chunk alone)."""
    lo, hi = (t[:, None, None] for t in _window_bounds(chunk, table.num_heads, torch.int32, table.device))
    starts, ends = (torch.minimum(torch.maximum(t, lo), hi) for t in (table.range_starts, table.range_ends))
    return BlockTable(table.layout, table.block_size, table.patterns, starts, ends, table.token_major)


def chunk_schedule(work: torch.Tensor, tiles_per_block: int, num_tiles: int, order: str, chunk: Chunk,
                   busy_only: bool = False) -> torch.Tensor:
    """``launcher._schedule``'s work items restricted to the heads of ``chunk`` (:class:`Chunk`) and,
    where it has key windows, each head's tiles to its window; ``busy_only``: tiles with no work left out."""
    schedule = _schedule(work, tiles_per_block, num_tiles, order)
    h0, h1 = chunk.h0, chunk.h1
    if (h0, h1) == (0, work.shape[0]) and chunk.keys is None and not busy_only:
        return schedule
    head, tile = schedule // num_tiles, schedule % num_tiles
    keep = (head >= h0) & (head < h1)
    if chunk.keys is not None:
        lo, hi = (t[head.long()] for t in _window_bounds(chunk, work.shape[0], torch.long, schedule.device))
        block_of = tile // tiles_per_block
        keep &= (block_of >= lo) & (block_of < hi)
    if busy_only:
        keep &= tile_work(work, tiles_per_block, num_tiles).flatten()[schedule.long()] > 0
    return schedule[keep].contiguous()


@triton.jit
def store_order(ds_t):
    """``ds_t`` ``[BLOCK_N, BLOCK_M]`` reordered so that sm90 matmul results go out as wide stores with no
    exchange between threads: row ``16h + 8a + l`` (``l < 8``) to ``a * BLOCK_N / 2 + 8h + l``
    (:func:`stored_key` undoes it: the tile's own rows), and query ``8j + 2t + b`` (``t < 4``, ``b < 2``)
    to column ``t * BLOCK_M / 4 + 2j + b`` (the tile's columns stay in this order: :func:`stored_query`)."""
    rows: tl.constexpr = ds_t.shape[0]
    columns: tl.constexpr = ds_t.shape[1]
    split = tl.reshape(ds_t, [rows // 16, 2, 8, columns // 8, 4, 2])
    return tl.reshape(tl.permute(split, [1, 0, 2, 4, 3, 5]), [rows, columns])


@triton.jit
def stored_key(row, BLOCK_N: tl.constexpr):
    """The key offset of row ``row`` of :func:`store_order`'s tile."""
    return row // 8 % (BLOCK_N // 16) * 16 + row // (BLOCK_N // 2) * 8 + row % 8


@triton.jit
def stored_query(position, Q_STEP: tl.constexpr):
    """The query offset held at stored column ``position`` (:func:`store_order`'s columns, steps of ``Q_STEP``)."""
    within = position % Q_STEP
    t, rest = within // (Q_STEP // 4), within % (Q_STEP // 4)
    return position - within + rest // 2 * 8 + t * 2 + rest % 2
