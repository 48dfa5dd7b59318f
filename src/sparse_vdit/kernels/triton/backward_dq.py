"""The Triton backward's dQ kernels (launched by :func:`.backward.backward`), by query tile over the forward's
key-block ranges: :func:`block_sparse_attention_bwd_dq` recomputes the probabilities (``S``, ``dP``, then
``dQ += dS K``: three matmuls a step); :func:`block_sparse_attention_bwd_dq_stored` multiplies the dS tiles the
dK/dV kernel stored by K (one matmul a step, bound by reading the tiles from memory) and, with ``SPLIT``, leaves the
query blocks marked in ``RECOMPUTE`` to the recomputing path in the same launch (:func:`.ds_tiles.recompute_rows`):
programs bound by the tensor cores then run beside programs bound by memory."""

from __future__ import annotations

import triton
import triton.language as tl

from . import ds_tiles
from .backward_rows import load_step, load_tile, memory_rows, side_rows, work_item
from .kernel import dot

# sizes and table shapes not specialised on (divisibility by 16): bench/backward.py's small check layouts
# then run the very kernels it times, compiled once
SIZES = ["N", "KV_LEN", "HEADS", "NUM_RANGES", "FRAME_TOKENS", "VIDEO_START", "VIDEO_TOKENS", "stride_rh", "stride_rm"]


@triton.jit
def _dq_steps(
    dq, q, do, lse, delta, first, last, K, V, K_DESC, V_DESC, base, batch, head, stride_n, token_major,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
    FRAMES: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Key steps ``[first, last)`` into ``dq`` of one query tile; MASKED: keys ``>= last`` masked."""
    for start in range(first, last, BLOCK_N):
        _, key_ok, k, v = load_step(K, V, K_DESC, V_DESC, start, last, base, batch, head, stride_n, token_major,
                                    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, BLOCK_N, HEAD_DIM,
                                    ANY_TOKEN_MAJOR, MASKED, TMA)  # fmt: skip
        p = tl.math.exp2(dot(q, tl.trans(k), None, IEEE) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(key_ok[None, :], p, 0.0)
        ds = p * (dot(do, tl.trans(v), None, IEEE) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, None, IEEE)
    return dq


@triton.jit
def _dq_recomputed(
    Q, K, V, DO, DQ, K_DESC, V_DESC, LSE, DELTA, STARTS, ENDS, DQ_SIDE, SIDE_SLOT,
    head, tile, batch, token_major, base, stats, row, stride_n, stride_rh, stride_rm, N, KV_LEN, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale, softmax_scale, stride_sb, stride_sn,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
    ACCUMULATE: tl.constexpr, SIDE_OUT: tl.constexpr,
):  # fmt: skip
    """Query tile ``tile`` of (``batch``, ``head``) (table row ``row``), the probabilities recomputed: its DQ rows."""
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = memory_rows(offs_m, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    q_ok = offs_m < N
    q = tl.load(Q + base + rows_m[:, None] * stride_n + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    do = tl.load(DO + base + rows_m[:, None] * stride_n + offs_d[None, :], mask=q_ok[:, None], other=0.0)
    lse = tl.load(LSE + stats + rows_m, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + stats + rows_m, mask=q_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    ranges = head * stride_rh + row * stride_rm
    for r in range(0, NUM_RANGES):
        first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
        last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, KV_LEN)
        full = first + tl.maximum(last - first, 0) // BLOCK_N * BLOCK_N  # whole steps unmasked, one loop per
        if token_major:  # kind of head; then the ragged step
            dq = _dq_steps(dq, q, do, lse, delta, first, full, K, V, K_DESC, V_DESC, base, batch, head, stride_n,
                           True, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                           FRAMES, BLOCK_N, HEAD_DIM, IEEE, True, False, False)  # fmt: skip
        else:
            dq = _dq_steps(dq, q, do, lse, delta, first, full, K, V, K_DESC, V_DESC, base, batch, head, stride_n,
                           False, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                           FRAMES, BLOCK_N, HEAD_DIM, IEEE, False, TMA, False)  # fmt: skip
        dq = _dq_steps(dq, q, do, lse, delta, full, last, K, V, K_DESC, V_DESC, base, batch, head, stride_n,
                       token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                       FRAMES, BLOCK_N, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR, False, True)  # fmt: skip
    if SIDE_OUT:
        side, base, stride_n = side_rows(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM)
        DQ = tl.where(side, DQ_SIDE, DQ)
    _store_dq(DQ + base + rows_m[:, None] * stride_n + offs_d[None, :], dq * softmax_scale, q_ok, ACCUMULATE)


@triton.jit(do_not_specialize=[*SIZES, "NUM_Q_TILES"])
def block_sparse_attention_bwd_dq(
    Q, K, V, DO, DQ,  # [B, N, H, D], one set of strides
    K_DESC, V_DESC,  # with TMA: descriptors of K and V, blocks [1, BLOCK_N, 1, D]; else unused
    LSE, DELTA,  # float32 [B, H, N] by memory row; LSE in base 2
    STARTS, ENDS,  # int32 [H, Qb, R]: the forward's key-block ranges
    SCHEDULE,  # int32 [H * NUM_Q_TILES]
    TOKEN_MAJOR,  # int8 [H]
    DQ_SIDE, SIDE_SLOT,  # with SIDE_OUT: [B, N, Ht, D] token-major heads' dQ; int32 [H] their slots
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_Q_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale, softmax_scale, stride_sb, stride_sn,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # add to DQ (a head's key blocks in windows, ds_tiles.head_chunks)
    SIDE_OUT: tl.constexpr,  # token-major heads' rows to DQ_SIDE (side_rows)
):  # fmt: skip
    head, tile, batch, token_major, base, stats = work_item(SCHEDULE, TOKEN_MAJOR, NUM_Q_TILES, N, HEADS, stride_b,
                                                            stride_h, ANY_TOKEN_MAJOR)  # fmt: skip
    _dq_recomputed(Q, K, V, DO, DQ, K_DESC, V_DESC, LSE, DELTA, STARTS, ENDS, DQ_SIDE, SIDE_SLOT,
                   head, tile, batch, token_major, base, stats, tile * BLOCK_M // TABLE_BLOCK, stride_n, stride_rh,
                   stride_rm, N, KV_LEN, NUM_RANGES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                   softmax_scale, stride_sb, stride_sn, FRAMES, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, IEEE,
                   ANY_TOKEN_MAJOR, TMA, ACCUMULATE, SIDE_OUT)  # fmt: skip


@triton.jit
def _dq_stored_steps(
    dq, ds_queries, ds_pair, first, lo, last, K, K_DESC, DS, base, batch, head, stride_n, token_major,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
    DS_TMA: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """Key steps ``[lo, last)`` of the range from ``first`` into ``dq``: ``dS K`` with dS read from the
    pairs' stored tiles (``ds_pair``: the range's first pair); MASKED: keys ``>= last`` masked. DS_TMA:
    DS a descriptor of the tiles' ``[pairs * TABLE_BLOCK, TABLE_BLOCK]`` view, ``ds_queries`` the first column.
    STAGES: the loop's pipeline depth (None: the launch's)."""
    for start in tl.range(lo, last, BLOCK_N, num_stages=STAGES):
        offs = start + tl.arange(0, BLOCK_N)
        key_ok = offs < last
        rows = memory_rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
        k = load_tile(K, K_DESC, base, rows, key_ok, batch, head, start, stride_n, BLOCK_N, HEAD_DIM, MASKED, TMA)
        pair = ds_pair + (start - first) // TABLE_BLOCK
        if DS_TMA:
            ds = DS.load([(pair * TABLE_BLOCK + start % TABLE_BLOCK).to(tl.int32), ds_queries]).T
            if MASKED:
                ds = tl.where(key_ok[None, :], ds, 0.0)
        else:
            keys = (offs % TABLE_BLOCK) * TABLE_BLOCK
            ptrs = DS + pair * (TABLE_BLOCK * TABLE_BLOCK) + ds_queries[:, None] + keys[None, :]
            if MASKED:
                ds = tl.load(ptrs, mask=key_ok[None, :], other=0.0)
            else:
                ds = tl.load(ptrs)
        dq += dot(ds, k, None, IEEE)
    return dq


@triton.jit
def _dq_from_tiles(
    K, DQ, K_DESC, DS, STARTS, ENDS, SLOTS, DQ_SIDE, SIDE_SLOT,
    head, tile, batch, token_major, base, row, stride_n, stride_rh, stride_rm, N, KV_LEN, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, softmax_scale, ds_pairs, slot_base, stride_sb, stride_sn,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
    DS_TMA: tl.constexpr, Q_STEP: tl.constexpr, ACCUMULATE: tl.constexpr, SIDE_OUT: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """Query tile ``tile`` of (``batch``, ``head``) (table row ``row``) from the stored dS tiles: its rows of DQ;
    row ``i`` of the accumulator is the query at the tiles' column ``i`` (STAGES: the key loops' pipeline depth,
    None: the launch's)."""
    columns = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = ds_tiles.stored_query(columns, Q_STEP)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = memory_rows(offs_m, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    if DS_TMA:
        ds_queries = tile * BLOCK_M % TABLE_BLOCK
    else:
        ds_queries = columns % TABLE_BLOCK
    ds_pair0 = batch.to(tl.int64) * ds_pairs - slot_base
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    ranges = head * stride_rh + row * stride_rm
    for r in range(0, NUM_RANGES):
        first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
        last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, KV_LEN)
        ds_pair = ds_pair0 + tl.load(SLOTS + ranges + r)
        full = first + tl.maximum(last - first, 0) // BLOCK_N * BLOCK_N
        if token_major:
            dq = _dq_stored_steps(dq, ds_queries, ds_pair, first, first, full, K, K_DESC, DS, base, batch, head,
                                  stride_n, True, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
                                  FRAMES, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, True, False, False, DS_TMA,
                                  STAGES)  # fmt: skip
        else:
            dq = _dq_stored_steps(dq, ds_queries, ds_pair, first, first, full, K, K_DESC, DS, base, batch, head,
                                  stride_n, False, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
                                  FRAMES, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, False, TMA, False, DS_TMA,
                                  STAGES)  # fmt: skip
        dq = _dq_stored_steps(dq, ds_queries, ds_pair, first, full, last, K, K_DESC, DS, base, batch, head, stride_n,
                              token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
                              FRAMES, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR, False, True,
                              DS_TMA, STAGES)  # fmt: skip
    if SIDE_OUT:
        side, base, stride_n = side_rows(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM)
        DQ = tl.where(side, DQ_SIDE, DQ)
    _store_dq(DQ + base + rows_m[:, None] * stride_n + offs_d[None, :], dq * softmax_scale, offs_m < N, ACCUMULATE)


@triton.jit(do_not_specialize=[*SIZES, "NUM_Q_TILES", "ds_pairs", "slot_base"])
def block_sparse_attention_bwd_dq_stored(
    K, DQ,  # [B, N, H, D], one set of strides
    K_DESC,  # with TMA: descriptor of K, blocks [1, BLOCK_N, 1, D]; else unused
    Q, V, DO, V_DESC, LSE, DELTA,  # with SPLIT: as block_sparse_attention_bwd_dq's; else unused
    RECOMPUTE,  # with SPLIT: int8 [H, Qb], nonzero where a query block recomputes (no tiles stored for it)
    DS,  # [B, ds_pairs, TABLE_BLOCK, TABLE_BLOCK]: dS^T of each visited pair, from the dK/dV kernel
    STARTS, ENDS, SLOTS,  # int32 [H, Qb, R]: the forward's key-block ranges, the slot of each range's first pair
    SCHEDULE,  # int32 [H * NUM_Q_TILES]
    TOKEN_MAJOR,  # int8 [H]
    DQ_SIDE, SIDE_SLOT,  # with SIDE_OUT: [B, N, Ht, D] token-major heads' dQ; int32 [H] their slots
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_Q_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale, softmax_scale, ds_pairs, slot_base, stride_sb, stride_sn, stride_xh,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
    DS_TMA: tl.constexpr,  # DS is a descriptor of its [B * ds_pairs * TABLE_BLOCK, TABLE_BLOCK] view
    Q_STEP: tl.constexpr,  # the dK/dV kernel's query step (the tiles' columns in ds_tiles.store_order)
    ACCUMULATE: tl.constexpr,  # add to DQ (a head's key blocks in windows, ds_tiles.head_chunks)
    SIDE_OUT: tl.constexpr,  # token-major heads' rows to DQ_SIDE (side_rows)
    SPLIT: tl.constexpr,  # query blocks marked in RECOMPUTE recompute the probabilities (stride_xh: its row stride)
    SPLIT_STAGES: tl.constexpr,  # the pipeline depth of the loops reading tiles (None: the launch's; set with SPLIT)
):  # fmt: skip
    """``dQ = dS K`` for one query tile: one matmul per step, the probabilities not recomputed (with SPLIT: but
    for the query blocks marked in RECOMPUTE)."""
    head, tile, batch, token_major, base, stats = work_item(SCHEDULE, TOKEN_MAJOR, NUM_Q_TILES, N, HEADS, stride_b,
                                                            stride_h, ANY_TOKEN_MAJOR)  # fmt: skip
    row = tile * BLOCK_M // TABLE_BLOCK
    recompute = False
    if SPLIT:
        recompute = tl.load(RECOMPUTE + head * stride_xh + row) != 0
    if recompute:
        _dq_recomputed(Q, K, V, DO, DQ, K_DESC, V_DESC, LSE, DELTA, STARTS, ENDS, DQ_SIDE, SIDE_SLOT,
                       head, tile, batch, token_major, base, stats, row, stride_n, stride_rh, stride_rm, N, KV_LEN,
                       NUM_RANGES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale, softmax_scale, stride_sb,
                       stride_sn, FRAMES, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR, TMA,
                       ACCUMULATE, SIDE_OUT)  # fmt: skip
    else:
        _dq_from_tiles(K, DQ, K_DESC, DS, STARTS, ENDS, SLOTS, DQ_SIDE, SIDE_SLOT,
                       head, tile, batch, token_major, base, row, stride_n, stride_rh, stride_rm, N, KV_LEN,
                       NUM_RANGES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, softmax_scale, ds_pairs, slot_base,
                       stride_sb, stride_sn, FRAMES, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR,
                       TMA, DS_TMA, Q_STEP, ACCUMULATE, SIDE_OUT, SPLIT_STAGES)  # fmt: skip


@triton.jit
def _store_dq(ptrs, dq, ok, ACCUMULATE: tl.constexpr):
    """``dq`` (float32) to ``ptrs``, rows ``ok`` only; ACCUMULATE: added to what is there."""
    if ACCUMULATE:
        dq += tl.load(ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(ptrs, dq.to(ptrs.dtype.element_ty), mask=ok[:, None])


__all__ = ["SIZES", "block_sparse_attention_bwd_dq", "block_sparse_attention_bwd_dq_stored"]
