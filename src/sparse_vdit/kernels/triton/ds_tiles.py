"""Where the Triton backward keeps its stored dS tiles (:mod:`.backward`, ``dq="stored"``).

One ``[block, block]`` tile per visited (query block, key block) pair, numbered head by head, query block by
query block, key block ascending (:func:`slots`); heads go in chunks whose tiles fit a memory share
(:func:`head_chunks`, :func:`budget`), the tiles of a chunk in one buffer (:func:`buffer`), written by the
dK/dV kernel's wide stores and read by the dQ kernel through tensor descriptors where the device has them
(:func:`descriptor`). A tile's rows and columns are stored in the order of :func:`store_order`.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ...block_table import pairs_by_column


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


def slots(table) -> tuple[torch.Tensor, list[int], torch.Tensor, torch.Tensor]:
    """Where stored dS tiles go, pairs numbered head by head, query block by query block, key block
    ascending: int32 ``[H, Qb, R]``, the slot of each forward range's first pair (for the dQ kernel); the
    first slot of each head (``H + 1`` entries, the last the number of pairs); and, for the dK/dV kernel,
    int32 ``[pairs]`` the slot of each pair taken in the transposed table's order (head, key block,
    query block) with int32 ``[H, Kb, R']``, where each of its query ranges starts in that list."""
    _, _, by_column = pairs_by_column(table.range_starts, table.range_ends, table.num_q_blocks)
    per_head = (table.range_ends - table.range_starts).sum((1, 2)).tolist()
    return (_first_pairs(table.range_starts, table.range_ends), [0, *itertools.accumulate(per_head)],
            by_column.to(torch.int32), _first_pairs(*table.query_ranges))  # fmt: skip


def _first_pairs(starts: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """int32, the shape of ``starts``: the number of pairs in the ranges before each one (flat order)."""
    length = (ends - starts).long().flatten()
    return (torch.cumsum(length, 0) - length).view_as(starts).to(torch.int32).contiguous()


def budget(device: torch.device, share: float) -> int:
    """Bytes the stored dS tiles of one launch may take: ``share`` of the device's memory (of 8 GiB on the CPU)."""
    if device.type != "cuda":
        return int(share * (8 << 30))
    return int(share * torch.cuda.get_device_properties(device).total_memory)


def head_chunks(head_first: list[int], pair_bytes: int, limit: int) -> list[tuple[int, int, bool]]:
    """Runs of heads ``(h0, h1, stored)`` in order: heads whose dS tiles (``pair_bytes`` a pair) fit
    ``limit`` bytes together, stored; heads whose tiles alone do not fit, not stored (their dQ recomputes
    the probabilities), neighbours among them in one run (one launch of each kernel: on HunyuanVideo 720p at
    50% no head's tiles fit an H100's share, and one launch a head cost 0.02 of backward block efficiency)."""
    chunks: list[tuple[int, int, bool]] = []
    h0 = 0
    for h in range(len(head_first) - 1):
        alone = (head_first[h + 1] - head_first[h]) * pair_bytes > limit
        if h > h0 and (alone or (head_first[h + 1] - head_first[h0]) * pair_bytes > limit):
            chunks.append((h0, h, True))
            h0 = h
        if alone:
            if chunks and chunks[-1][1:] == (h, False):  # the run before ends here, not stored: extend it
                chunks[-1] = (chunks[-1][0], h + 1, False)
            else:
                chunks.append((h, h + 1, False))
            h0 = h + 1
    if h0 < len(head_first) - 1:
        chunks.append((h0, len(head_first) - 1, True))
    return chunks


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
