"""Block-sparse attention backward in Triton, exact for the forward's block table.

Two launches, FlashAttention-2 style, no atomics: ``dK, dV`` by key tile, looping over the query
blocks that visit its key block (the table's transposed form, :attr:`BlockTable.query_ranges`),
and ``dQ`` by query tile, looping over the forward's key-block ranges. Both recompute the
probabilities from the forward's log-sum-exp (``launcher.forward(..., return_lse=True)``) and
``delta = rowsum(dO * O)``. Token-major heads are read and written through their order in place,
as in the forward. Every element of dQ, dK, dV is written (zeros for keys nobody visits: skipped
heads, padded text). The torch reference is autograd through ``sparse_vdit.kernels.reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...block_table import num_blocks
from .kernel import sequence_rows
from .launcher import LOG2E, _schedule, option


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _program(SCHEDULE, TOKEN_MAJOR, NUM_TILES, N, HEADS, stride_b, stride_h, ANY_TOKEN_MAJOR: tl.constexpr):
    """This program's work item (heaviest first): ``(head, tile, token_major, base, stats)``, with the
    offsets of its (batch, head) in the ``[B, N, H, D]`` tensors (``base``) and in LSE / DELTA (``stats``)."""
    item = tl.load(SCHEDULE + tl.program_id(0))
    head = item // NUM_TILES
    batch = tl.program_id(1).to(tl.int64)
    token_major = False
    if ANY_TOKEN_MAJOR:
        token_major = tl.load(TOKEN_MAJOR + head) != 0
    return head, item % NUM_TILES, token_major, batch * stride_b + head * stride_h, (batch * HEADS + head) * N


@triton.jit
def _rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr):
    """Memory rows of positions ``offs`` in the head's own order (token-major heads read in place)."""
    rows = offs
    if ANY_TOKEN_MAJOR:
        rows = sequence_rows(offs, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    return rows


@triton.jit
def block_sparse_attention_bwd_dkdv(
    Q, K, V, DO, DK, DV,  # [B, N, H, D], one set of strides (the launcher makes them contiguous)
    LSE, DELTA,  # float32 [B, H, N] by memory row
    STARTS, ENDS,  # int32 [H, Kb, R]: the query blocks visiting each key block, as ranges
    SCHEDULE,  # int32 [H * NUM_K_TILES]: work items, heaviest first
    TOKEN_MAJOR,  # int8 [H]
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_K_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale, softmax_scale,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per program
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr,
):  # fmt: skip
    head, tile, token_major, base, stats = _program(SCHEDULE, TOKEN_MAJOR, NUM_K_TILES, N, HEADS, stride_b, stride_h,
                                                    ANY_TOKEN_MAJOR)  # fmt: skip
    column = tile * BLOCK_N // TABLE_BLOCK  # the key block holding this tile
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions in the head's own order
    offs_d = tl.arange(0, HEAD_DIM)
    rows_n = _rows(offs_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    key_ok = offs_n < KV_LEN
    kv_offsets = base + rows_n[:, None] * stride_n + offs_d[None, :]
    k = tl.load(K + kv_offsets, mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + kv_offsets, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    ranges = head * stride_rh + column * stride_rm
    for r in range(0, NUM_RANGES):
        first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
        last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, N)
        for start in range(first, last, BLOCK_M):
            offs_m = start + tl.arange(0, BLOCK_M)
            q_ok = offs_m < last
            rows_m = _rows(offs_m, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
            q_t = tl.load(Q + base + rows_m[None, :] * stride_n + offs_d[:, None], mask=q_ok[None, :], other=0.0)
            do = tl.load(DO + base + rows_m[:, None] * stride_n + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            lse = tl.load(LSE + stats + rows_m, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + stats + rows_m, mask=q_ok, other=0.0)
            p_t = tl.math.exp2(_dot(k, q_t, IEEE) * qk_scale - lse[None, :] * 1.4426950408889634)  # [BLOCK_N, BLOCK_M]
            p_t = tl.where(key_ok[:, None], p_t, 0.0)
            dv += _dot(p_t.to(do.dtype), do, IEEE)
            dp_t = _dot(v, tl.trans(do), IEEE)
            ds_t = p_t * (dp_t - delta[None, :])
            dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), IEEE)
    out_ok = (offs_n < N)[:, None]
    tl.store(DK + kv_offsets, (dk * softmax_scale).to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + kv_offsets, dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def block_sparse_attention_bwd_dq(
    Q, K, V, DO, DQ,  # [B, N, H, D], one set of strides
    LSE, DELTA,  # float32 [B, H, N] by memory row
    STARTS, ENDS,  # int32 [H, Qb, R]: the forward's key-block ranges
    SCHEDULE,  # int32 [H * NUM_Q_TILES]
    TOKEN_MAJOR,  # int8 [H]
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_Q_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale, softmax_scale,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr,
):  # fmt: skip
    head, tile, token_major, base, stats = _program(SCHEDULE, TOKEN_MAJOR, NUM_Q_TILES, N, HEADS, stride_b, stride_h,
                                                    ANY_TOKEN_MAJOR)  # fmt: skip
    row = tile * BLOCK_M // TABLE_BLOCK
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = _rows(offs_m, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    q_ok = offs_m < N
    q_offsets = base + rows_m[:, None] * stride_n + offs_d[None, :]
    q = tl.load(Q + q_offsets, mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + q_offsets, mask=q_ok[:, None], other=0.0)
    lse = tl.load(LSE + stats + rows_m, mask=q_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + stats + rows_m, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    ranges = head * stride_rh + row * stride_rm
    for r in range(0, NUM_RANGES):
        first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
        last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, KV_LEN)
        for start in range(first, last, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            key_ok = offs_n < last
            rows_n = _rows(offs_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
            kv_t = base + rows_n[None, :] * stride_n + offs_d[:, None]
            k_t = tl.load(K + kv_t, mask=key_ok[None, :], other=0.0)  # [D, BLOCK_N]
            v_t = tl.load(V + kv_t, mask=key_ok[None, :], other=0.0)
            p = tl.math.exp2(_dot(q, k_t, IEEE) * qk_scale - lse[:, None])
            p = tl.where(key_ok[None, :], p, 0.0)
            ds = p * (_dot(do, v_t, IEEE) - delta[:, None])
            dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), IEEE)
    tl.store(DQ + q_offsets, (dq * softmax_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None])


def _tiles(block_size: int, head_dim: int, device: torch.device, override=None) -> tuple[int, int, int, int, int]:
    """(dK/dV key tile, its query step, dQ query tile, its key step, num_warps); ``override`` checked.

    The CPU (interpreter) takes whole table blocks: fewest programs and steps.
    """
    if override is not None:
        tiles = tuple(int(x) for x in override)
        for tile in tiles[:4]:
            if tile < 16 or tile & (tile - 1) or block_size % tile:
                raise ValueError(f"backward tile {tile} must be a power of two >= 16 dividing the block size {block_size}")
        return tiles  # type: ignore[return-value]
    if device.type == "cpu":
        return block_size, block_size, block_size, block_size, 4
    # the Triton tutorial's split for the backward: wide tiles held, narrow steps streamed; 8 warps at
    # D=128 so that dK and dV (two 128 x 128 fp32 accumulators) fit in registers
    big, small = min(block_size, 128), min(block_size, 32 if head_dim > 64 else 64)
    return big, small, big, small, 8 if head_dim > 64 else 4


OVERRIDE: dict[str, tuple | None] = {"tiles": None, "num_stages": None}  # set by benchmarks


def backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    table,
    softmax_scale: float,
    *,
    token_major: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of block-sparse attention over ``table`` for ``[B, N, H, D]`` tensors.

    ``out`` and ``lse`` (float32 ``[B, H, N]``, natural log, by memory row) come from the forward.
    ``token_major``: read token-major heads through their order in place (False: q, k, v, out and
    grad_out are already in each head's own order, as for FlashAttention-4's forward).
    """
    batch, n, heads, dim = q.shape
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    device = q.device
    block = table.block_size
    kv_tile, q_step, q_tile, kv_step, warps = _tiles(block, dim, device, OVERRIDE["tiles"])
    layout = table.layout
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # [B, H, N]
    lse = lse.contiguous()
    order = option("schedule")
    num_q_tiles, num_k_tiles = num_blocks(n, q_tile), num_blocks(n, kv_tile)
    dq_schedule = table.form(("triton.bwd.dq_schedule", block // q_tile, num_q_tiles, order),
                             lambda t: _schedule(t.kv_num_blocks, block // q_tile, num_q_tiles, order))  # fmt: skip
    dkdv_schedule = table.form(("triton.bwd.dkdv_schedule", block // kv_tile, num_k_tiles, order),
                               lambda t: _schedule(t.query_num_blocks, block // kv_tile, num_k_tiles, order))  # fmt: skip
    any_token_major = token_major and bool(table.token_major_heads)
    flags = table.token_major.to(torch.int8) if any_token_major else delta
    q_starts, q_ends = table.query_ranges
    dq, dk, dv = (torch.empty_like(q) for _ in range(3))
    extra = {} if device.type == "cpu" else {"num_warps": warps, "num_stages": OVERRIDE["num_stages"] or 3}
    common = dict(
        FRAMES=layout.frames, TABLE_BLOCK=block, HEAD_DIM=dim, IEEE=q.dtype == torch.float32,
        ANY_TOKEN_MAJOR=any_token_major, **extra,
    )  # fmt: skip
    sizes = (layout.frame_tokens, layout.video_start, layout.video_tokens, softmax_scale * LOG2E, softmax_scale)
    block_sparse_attention_bwd_dkdv[(heads * num_k_tiles, batch)](
        q, k, v, grad_out, dk, dv, lse, delta, q_starts, q_ends, dkdv_schedule, flags,
        q.stride(0), q.stride(1), q.stride(2), q_starts.stride(0), q_starts.stride(1),
        n, layout.kv_len, heads, num_k_tiles, q_starts.shape[2], *sizes,
        BLOCK_M=q_step, BLOCK_N=kv_tile, **common,
    )  # fmt: skip
    starts, ends = table.range_starts.contiguous(), table.range_ends.contiguous()
    block_sparse_attention_bwd_dq[(heads * num_q_tiles, batch)](
        q, k, v, grad_out, dq, lse, delta, starts, ends, dq_schedule, flags,
        q.stride(0), q.stride(1), q.stride(2), starts.stride(0), starts.stride(1),
        n, layout.kv_len, heads, num_q_tiles, starts.shape[2], *sizes,
        BLOCK_M=q_tile, BLOCK_N=kv_step, **common,
    )  # fmt: skip
    return dq, dk, dv


__all__ = ["backward"]
