"""Where the Triton backward's kernels (:mod:`.backward`, :mod:`.backward_dq`) find their rows: a program's work
item, the memory rows of a head's positions (token-major heads read in place), the side buffers of token-major
heads' gradients, and one step's tiles by pointers or tensor descriptors."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernel import sequence_rows


@triton.jit
def work_item(SCHEDULE, TOKEN_MAJOR, NUM_TILES, N, HEADS, stride_b, stride_h, ANY_TOKEN_MAJOR: tl.constexpr):
    """This program's work item (heaviest first): ``(head, tile, batch, token_major, base, stats)``, with
    the offsets of its (batch, head) in the ``[B, N, H, D]`` tensors (``base``) and in LSE / DELTA (``stats``)."""
    item = tl.load(SCHEDULE + tl.program_id(0))
    head = item // NUM_TILES
    batch = tl.program_id(1)  # int32: a TMA coordinate
    token_major = False
    if ANY_TOKEN_MAJOR:
        token_major = tl.load(TOKEN_MAJOR + head) != 0
    offset_b = batch.to(tl.int64)
    return head, item % NUM_TILES, batch, token_major, offset_b * stride_b + head * stride_h, (offset_b * HEADS + head) * N


@triton.jit
def memory_rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES: tl.constexpr,
                ANY_TOKEN_MAJOR: tl.constexpr):
    """Memory rows of positions ``offs`` in the head's own order (token-major heads read in place)."""
    rows = offs
    if ANY_TOKEN_MAJOR:
        rows = sequence_rows(offs, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    return rows


@triton.jit
def side_rows(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM: tl.constexpr):
    """Where a (batch, head)'s gradient rows go with SIDE_OUT: ``(side, base, row stride)``, a token-major
    head's to its slot of the compact side buffer ``[B, N, Ht, D]`` (``side``), the others' where they were."""
    slot = tl.load(SIDE_SLOT + head)
    side = slot >= 0
    base = tl.where(side, batch.to(tl.int64) * stride_sb + slot * HEAD_DIM, base)
    return side, base, tl.where(side, stride_sn, stride_n)


@triton.jit
def load_tile(PTR, DESC, base, rows, ok, batch, head, start, stride_n,
              BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """``[BLOCK, HEAD_DIM]``: rows ``rows`` of one (batch, head); through ``DESC`` (whole tiles of
    contiguous rows from ``start``) with TMA, else by pointers (rows not ``ok`` read 0 when MASKED)."""
    if TMA:
        return DESC.load([batch, start, head, 0]).reshape(BLOCK, HEAD_DIM)
    ptrs = PTR + base + rows[:, None] * stride_n + tl.arange(0, HEAD_DIM)[None, :]
    if MASKED:
        return tl.load(ptrs, mask=ok[:, None], other=0.0)
    return tl.load(ptrs)


@triton.jit
def load_step(A, B, A_DESC, B_DESC, start, last, base, batch, head, stride_n, token_major, FRAME_TOKENS,
              VIDEO_START, VIDEO_TOKENS, FRAMES: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
              ANY_TOKEN_MAJOR: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """The ``BLOCK`` positions from ``start`` of a loop over ``[.., last)``: ``(rows, ok, a, b)``, their
    memory rows, which are before ``last``, and their ``[BLOCK, HEAD_DIM]`` tiles of A and B."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < last
    rows = memory_rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    a = load_tile(A, A_DESC, base, rows, ok, batch, head, start, stride_n, BLOCK, HEAD_DIM, MASKED, TMA)
    b = load_tile(B, B_DESC, base, rows, ok, batch, head, start, stride_n, BLOCK, HEAD_DIM, MASKED, TMA)
    return rows, ok, a, b


__all__ = ["load_step", "load_tile", "memory_rows", "side_rows", "work_item"]
