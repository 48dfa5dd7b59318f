"""The Triton backward's prologue: ``delta = rowsum(dO * O)`` and the forward's log-sum-exp in base 2.

:func:`prologue` for tensors that share one order; :func:`prologue_in_head_order` for frame-major
``grad_out``, ``out`` and LSE when q, k, v are in each head's own order (the forward on head-ordered
inputs, :func:`~sparse_vdit.kernels.head_order.attention_in_head_order`): the same pass also writes
grad_out in head order, so no separate permutation runs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import sequence_rows
from .launcher import token_major_flags


@triton.jit(do_not_specialize=["ROWS", "HEADS", "N"])
def backward_prologue(O, DO, LSE, DELTA, LSE2, ROWS, HEADS, N, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """``DELTA = rowsum(DO * O)`` and ``LSE2 = LSE * log2(e)`` for ``BLOCK`` rows of the flat
    ``[B * N * H, D]`` tensors; DELTA, LSE, LSE2 are ``[B, H, N]``."""
    flat = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = flat < ROWS
    ptrs = flat.to(tl.int64)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    o = tl.load(O + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    do = tl.load(DO + ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    head = flat % HEADS
    stats = ((flat // HEADS) // N * HEADS + head).to(tl.int64) * N + (flat // HEADS) % N  # (batch, head, n)
    tl.store(DELTA + stats, tl.sum(o * do, 1), mask=ok)
    tl.store(LSE2 + stats, tl.load(LSE + stats, mask=ok) * 1.4426950408889634, mask=ok)


@triton.jit
def backward_prologue_in_head_order(O, DO, LSE, DELTA, LSE2, DO_OUT, TOKEN_MAJOR, N, HEADS, FRAME_TOKENS, VIDEO_START,
                                    VIDEO_TOKENS, FRAMES: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """:func:`backward_prologue` of frame-major ``O``, ``DO`` [B, N, H, D] and ``LSE`` [B, H, N] with its
    outputs in each head's own order (token-major heads permuted): ``DELTA``, ``LSE2`` [B, H, N] and
    ``DO_OUT`` (DO) [B, N, H, D]. A program per (batch, head) and ``BLOCK`` positions."""
    bh = tl.program_id(0)
    pos = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = pos < N
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS
    rows = sequence_rows(pos, tl.load(TOKEN_MAJOR + head) != 0, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    base = batch * N * HEADS * HEAD_DIM + head * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    src = base + rows.to(tl.int64)[:, None] * (HEADS * HEAD_DIM)
    o = tl.load(O + src, mask=ok[:, None], other=0.0)
    do = tl.load(DO + src, mask=ok[:, None], other=0.0)
    tl.store(DO_OUT + base + pos.to(tl.int64)[:, None] * (HEADS * HEAD_DIM), do, mask=ok[:, None])
    stats = bh.to(tl.int64) * N
    tl.store(DELTA + stats + pos, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1), mask=ok)
    tl.store(LSE2 + stats + pos, tl.load(LSE + stats + rows, mask=ok) * 1.4426950408889634, mask=ok)


def prologue(grad_out, out, lse) -> tuple[torch.Tensor, torch.Tensor]:
    """(delta, base-2 LSE), float32 ``[B, H, N]``, by one Triton pass."""
    batch, n, heads, dim = out.shape
    delta, lse2 = torch.empty_like(lse), torch.empty_like(lse)
    rows, block = batch * n * heads, 64
    extra = {} if out.device.type == "cpu" else {"num_warps": 4}
    backward_prologue[(triton.cdiv(rows, block),)](out, grad_out, lse, delta, lse2, rows, heads, n, BLOCK=block,
                                                   HEAD_DIM=dim, **extra)  # fmt: skip
    return delta, lse2


def prologue_in_head_order(grad_out, out, lse, table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta, base-2 LSE, grad_out) in each head's own order from the frame-major ones, by one Triton pass."""
    batch, n, heads, dim = out.shape
    delta, lse2, grad_in_order = torch.empty_like(lse), torch.empty_like(lse), torch.empty_like(grad_out)
    flags = token_major_flags(table)
    layout, block = table.layout, 64
    extra = {} if out.device.type == "cpu" else {"num_warps": 4}
    backward_prologue_in_head_order[(batch * heads, triton.cdiv(n, block))](
        out, grad_out, lse, delta, lse2, grad_in_order, flags, n, heads, layout.frame_tokens, layout.video_start,
        layout.video_tokens, FRAMES=layout.frames, BLOCK=block, HEAD_DIM=dim, **extra,
    )  # fmt: skip
    return delta, lse2, grad_in_order


def stats_in_head_order(table, *stats: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``stats`` (float32 ``[B, H, N]`` by memory row) with token-major heads' rows put in their own order (the
    index kept with ``table``), for the dK/dV kernel reading those heads through their order in place."""
    device = stats[0].device
    index = table.form("triton.bwd.stat_order", lambda t: _stat_order(t, device))
    return tuple(torch.gather(s, 2, index.expand_as(s)) for s in stats)


def _stat_order(table, device: torch.device) -> torch.Tensor:
    """int64 ``[1, H, N]``: the memory row of each position in each head's own order (token-major heads
    permuted, the others in place), to gather LSE and delta in that order."""
    rows = torch.arange(table.layout.num_tokens, device=device).repeat(table.num_heads, 1)
    if table.token_major_heads:
        rows[list(table.token_major_heads)] = table.layout.token_major_order(device)
    return rows[None]


__all__ = ["prologue", "prologue_in_head_order", "stats_in_head_order"]
