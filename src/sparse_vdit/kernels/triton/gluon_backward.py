"""The Triton backward's dK/dV kernel for Hopper (sm90) in Gluon (``backward.OPTIONS["gluon"]``, issue 18).

Compiled for sm_90a, the Triton dK/dV kernel waits for each query step's ``S^T = K Q^T`` and
``dP^T = V dO^T`` and then for ``dV += P^T dO`` and ``dK += dS^T Q`` before going on (``bench/sm90_loop.py
--backward``): the tensor cores idle while the exponentials and dS are computed. Here the MMAs are
asynchronous, as in FlashAttention-3: step ``j``'s P and dS are computed while step ``j - 1``'s
``dV`` and ``dK`` updates run; then step ``j + 1``'s ``S^T`` and ``dP^T`` are issued, the updates waited for
(the scores stay in flight), step ``j``'s updates issued, and the scores waited for (the updates stay in
flight). Queries and dO arrive by TMA ``STAGES`` steps ahead.

Same inputs and results as the Triton kernel's stored-dS path when no head is read through the token-major
order in place (inputs in each head's own order, or no token-major head): dK (scaled) and dV by row, and each
step's dS^T tile in the layout the dQ kernel reads (memory row = key, the step's columns in
:func:`.backward._store_order`'s order). Keys at or past the real ones get zero probabilities (their dK, dV
rows are zeroed by the launcher, as for the Triton kernel).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_init,
    warpgroup_mma_wait,
)

# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load (the old name raises)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

# a register cap keeps ptxas's schedule; the whole file at 8 warps: at 240 the loop spills
# (24 bytes with Triton 3.6, 16 at 248 with 3.9), at 255 it does not (252 / 255 registers used)
MAXNREG = 255
STAGES = 3  # at least 3: step j + 1's loads are issued at step j - 1 (its slot freed by step j - 2's updates)


@gluon.constexpr_function
def mma_layout(num_warps, columns):
    """The warpgroup MMA accumulator layout of ``[rows, columns]`` tiles: warps stacked along the rows."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, columns, 16])


def row_descriptor(t: torch.Tensor, rows: int):
    """A TMA descriptor of contiguous ``[B, N, H, D]`` ``t`` as its ``[B, N, H * D]`` view, ``[1, rows, D]`` at a
    time (one head's rows of one sample): coordinates ``(b, position, h * D)``; rows past the sample's ``N`` read
    as zeros (never the next sample's)."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    batch, n, heads, dim = t.shape
    element = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}[t.dtype]
    view = t.view(batch, n, heads * dim)
    layout = gl.NVMMASharedLayout.get_default_for([1, rows, dim], element)
    return TensorDescriptor(view, list(view.shape), list(view.stride()), [1, rows, dim], layout)


@gluon.constexpr_function
def buffer_layout(rows, dim, dtype):
    """The shared-memory layout of a ``[rows, dim]`` buffer that :func:`_load_rows` fills and MMAs read."""
    return gl.NVMMASharedLayout.get_default_for([rows, dim], dtype)


@gluon.jit
def _load_rows(desc, batch, row, col, bar, smem, pred=True):
    """TMA load of sample ``batch``'s rows from ``row`` and columns from ``col`` (a :func:`row_descriptor`) into the
    ``[rows, D]`` buffer ``smem``, arriving on ``bar``."""
    _tma_load(desc, [batch, row, col], bar, smem.reshape([1, smem.shape[0], smem.shape[1]]), pred=pred)


@gluon.jit
def _issue_step(i, nsteps, g0, first, batch, col, q_desc, do_desc, q_smem, do_smem, bars,
                BLOCK_M: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    """TMA loads of step ``i`` of the range (queries ``first + i * BLOCK_M``) into slot ``(g0 + i) % STAGES``."""
    ok = i < nsteps
    slot = (g0 + i) % STAGES
    mbarrier.expect(bars.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes, pred=ok)
    _load_rows(q_desc, batch, first + i * BLOCK_M, col, bars.index(slot), q_smem.index(slot), pred=ok)
    _load_rows(do_desc, batch, first + i * BLOCK_M, col, bars.index(slot), do_smem.index(slot), pred=ok)


@gluon.constexpr_function
def _columns_first(layout):
    """``layout`` (a linear one) with its registers reordered, column steps before row steps: a thread's
    registers then run along a row, as wide stores need."""
    registers = sorted(layout.reg_bases, key=lambda basis: basis[0] != 0)  # stable: each kind keeps its order
    return gl.DistributedLinearLayout(reg_bases=registers, lane_bases=layout.lane_bases, warp_bases=layout.warp_bases,
                                      block_bases=layout.block_bases, shape=layout.shape)  # fmt: skip


@gluon.jit
def _store_ds(ds_t, DS, pair, ds_rows, start, TABLE_BLOCK: gl.constexpr):
    """Step ``ds_t`` (``[BLOCK_N, BLOCK_M]``) into its pair's tile in the dQ kernel's column order: query
    ``8j + 2t + b`` (t < 4, b < 2) at column ``t * BLOCK_M / 4 + 2j + b`` (the inverse of
    ``backward._stored_query``). The reorder moves no data between threads (a thread's accumulator holds queries
    ``8j + 2t + b`` of one ``t``), so each thread's part of a row goes out as contiguous wide stores."""
    rows: gl.constexpr = ds_t.shape[0]
    columns: gl.constexpr = ds_t.shape[1]
    split = gl.reshape(ds_t, [rows, columns // 8, 4, 2])
    ordered = gl.reshape(gl.permute(split, [0, 2, 1, 3]), [rows, columns])
    layout: gl.constexpr = _columns_first(ordered.type.layout)
    ordered = gl.convert_layout(ordered, layout, assert_trivial=True)
    offs = gl.multiple_of(start % TABLE_BLOCK, columns) + gl.arange(0, columns, layout=gl.SliceLayout(0, layout))
    keys = gl.convert_layout(ds_rows, gl.SliceLayout(1, layout))
    gl.store(DS + pair * (TABLE_BLOCK * TABLE_BLOCK) + keys[:, None] + offs[None, :], ordered)


@gluon.jit
def _probabilities(s_t, dp_t, start, last, key_ok, LSE, DELTA, stats, qk_scale,
                   BLOCK_M: gl.constexpr, s_layout: gl.constexpr):  # fmt: skip
    """``(P^T, dS^T)`` of one step: queries at or past ``last`` and keys not ``key_ok`` give 0."""
    offs = start + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    q_ok = offs < last
    lse = gl.load(LSE + stats + offs, mask=q_ok, other=float("inf"))
    delta = gl.load(DELTA + stats + offs, mask=q_ok, other=0.0)
    p_t = gl.exp2(s_t * qk_scale - lse[None, :])
    p_t = gl.where(key_ok[:, None], p_t, 0.0)
    return p_t, p_t * (dp_t - delta[None, :])


@gluon.jit
def block_sparse_attention_bwd_dkdv_sm90(
    q_desc, do_desc,  # TMA descriptors of the [B, N, H * D] views of Q and dO; blocks [1, BLOCK_M, D]
    k_desc, v_desc,  # of K and V; blocks [1, BLOCK_N, D]
    DK, DV,  # [B, N, H, D] contiguous
    LSE, DELTA,  # float32 [B, H, N] by row; LSE in base 2
    STARTS, ENDS,  # int32 [H, Kb, R]: the query blocks visiting each key block, as ranges
    SCHEDULE,  # int32 [H * NUM_K_TILES]: work items head * NUM_K_TILES + tile, heaviest first
    DS,  # [B, ds_pairs, TABLE_BLOCK, TABLE_BLOCK] stored dS^T tiles
    PAIR_SLOTS, Q_FIRST,  # int32 [pairs] slots in the transposed table's order; int32 [H, Kb, R] each range's first
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_K_TILES, NUM_RANGES,
    qk_scale, softmax_scale,
    ds_pairs, slot_base,  # DS holds slots [slot_base, slot_base + ds_pairs)
    TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr, num_warps: gl.constexpr,
):  # fmt: skip
    gl.static_assert(STAGES >= 3, "step j + 1's loads are issued at step j - 1: at least 3 slots")
    item = gl.load(SCHEDULE + gl.program_id(0))
    head = item // NUM_K_TILES
    tile = item % NUM_K_TILES
    batch = gl.program_id(1)
    col = head * HEAD_DIM
    stats = (batch.to(gl.int64) * HEADS + head) * N
    column = tile * BLOCK_N // TABLE_BLOCK  # the key block holding this tile
    ds_pair0 = batch.to(gl.int64) * ds_pairs - slot_base

    s_layout: gl.constexpr = mma_layout(num_warps, BLOCK_M)
    o_layout: gl.constexpr = mma_layout(num_warps, HEAD_DIM)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_desc.dtype

    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], buffer_layout(BLOCK_N, HEAD_DIM, dtype))
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, HEAD_DIM], buffer_layout(BLOCK_N, HEAD_DIM, dtype))
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], buffer_layout(BLOCK_M, HEAD_DIM, dtype))
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], buffer_layout(BLOCK_M, HEAD_DIM, dtype))
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for b in gl.static_range(STAGES):
        mbarrier.init(bars.index(b), count=1)
    mbarrier.init(kv_bar, count=1)
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _load_rows(k_desc, batch, tile * BLOCK_N, col, kv_bar, k_smem)
    _load_rows(v_desc, batch, tile * BLOCK_N, col, kv_bar, v_smem)

    keys = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    key_ok = keys < KV_LEN
    ds_rows = (tile * BLOCK_N % TABLE_BLOCK + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))) * TABLE_BLOCK
    zero_s = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=o_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, layout=o_layout)
    mbarrier.wait(kv_bar, 0)
    g = 0  # steps taken so far over every range: the ring's slot and phase
    ranges = head * stride_rh + column * stride_rm
    for r in range(0, NUM_RANGES):
        q0 = gl.load(STARTS + ranges + r)
        first = q0 * TABLE_BLOCK
        last = gl.minimum(gl.load(ENDS + ranges + r) * TABLE_BLOCK, N)
        nsteps = gl.maximum(last - first + BLOCK_M - 1, 0) // BLOCK_M
        pair_slots = PAIR_SLOTS + (gl.load(Q_FIRST + ranges + r) - q0)
        for i in gl.static_range(STAGES):
            _issue_step(i, nsteps, g, first, batch, col, q_desc, do_desc, q_smem, do_smem, bars, BLOCK_M, STAGES)
        if nsteps > 0:
            slot = g % STAGES  # step 0's S^T and dP^T alone
            mbarrier.wait(bars.index(slot), (g // STAGES) & 1)
            s_t = warpgroup_mma(k_smem, q_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp_t = warpgroup_mma(v_smem, do_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s_t, dp_t = warpgroup_mma_wait(num_outstanding=0, deps=(s_t, dp_t))
            dv = warpgroup_mma_init(dv)  # the accumulators stay in flight from one step to the next
            dk = warpgroup_mma_init(dk)
            p_prev = gl.zeros([BLOCK_N, BLOCK_M], dtype, layout=a_layout)  # operands an update in flight reads
            ds_prev = gl.zeros([BLOCK_N, BLOCK_M], dtype, layout=a_layout)
            for j in range(0, nsteps - 1):
                # step j's P and dS while step j - 1's dV and dK updates are still on the tensor cores
                start = first + j * BLOCK_M
                p_t, ds_t = _probabilities(s_t, dp_t, start, last, key_ok, LSE, DELTA, stats, qk_scale, BLOCK_M,
                                           s_layout)  # fmt: skip
                slot = (g + j) % STAGES
                following = (g + j + 1) % STAGES
                mbarrier.wait(bars.index(following), ((g + j + 1) // STAGES) & 1)
                s_t = warpgroup_mma(k_smem, q_smem.index(following).permute((1, 0)), zero_s, use_acc=False,
                                    is_async=True)  # fmt: skip
                dp_t = warpgroup_mma(v_smem, do_smem.index(following).permute((1, 0)), zero_s, use_acc=False,
                                     is_async=True)  # fmt: skip
                # step j - 1's updates done (issued before the scores): their operands may be written again
                dv, dk, p_prev, ds_prev = warpgroup_mma_wait(num_outstanding=2, deps=(dv, dk, p_prev, ds_prev))
                p_prev = gl.convert_layout(p_t.to(dtype), a_layout)
                ds_prev = gl.convert_layout(ds_t.to(dtype), a_layout)
                dv = warpgroup_mma(p_prev, do_smem.index(slot), dv, is_async=True)
                dk = warpgroup_mma(ds_prev, q_smem.index(slot), dk, is_async=True)
                # stored only now: its 16-bit pairs are the registers the dK update reads, and packed before the
                # wait above they would overwrite those step j - 1's dK update may still be reading
                _store_ds(ds_t.to(dtype), DS, ds_pair0 + gl.load(pair_slots + start // TABLE_BLOCK), ds_rows, start,
                          TABLE_BLOCK)  # fmt: skip
                # the next step's scores; step j's updates stay in flight
                s_t, dp_t = warpgroup_mma_wait(num_outstanding=2, deps=(s_t, dp_t))
                if j > 0:  # step j - 1's slot is free: the step STAGES ahead of it goes there
                    _issue_step(j - 1 + STAGES, nsteps, g, first, batch, col, q_desc, do_desc, q_smem, do_smem, bars,
                                BLOCK_M, STAGES)  # fmt: skip
            start = first + (nsteps - 1) * BLOCK_M  # the last step
            p_t, ds_t = _probabilities(s_t, dp_t, start, last, key_ok, LSE, DELTA, stats, qk_scale, BLOCK_M, s_layout)
            slot = (g + nsteps - 1) % STAGES
            dv, dk, p_prev, ds_prev = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, p_prev, ds_prev))
            p_op = gl.convert_layout(p_t.to(dtype), a_layout)
            ds_op = gl.convert_layout(ds_t.to(dtype), a_layout)
            dv = warpgroup_mma(p_op, do_smem.index(slot), dv, is_async=True)
            dk = warpgroup_mma(ds_op, q_smem.index(slot), dk, is_async=True)
            _store_ds(ds_t.to(dtype), DS, ds_pair0 + gl.load(pair_slots + start // TABLE_BLOCK), ds_rows, start,
                      TABLE_BLOCK)  # fmt: skip
            dv, dk, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, p_op, ds_op))
        g += nsteps
    for b in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(b))
    mbarrier.invalidate(kv_bar)

    offs_n = tile * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    base = batch.to(gl.int64) * stride_b + head * stride_h
    out_ok = (offs_n < N)[:, None]
    gl.store(DK + base + offs_n[:, None] * stride_n + offs_d[None, :], (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=out_ok)  # fmt: skip
    gl.store(DV + base + offs_n[:, None] * stride_n + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_ok)


def applies(q: torch.Tensor, table, kv_tile: int, q_step: int, stored: bool, any_token_major: bool) -> str | None:
    """Why this kernel cannot take this dK/dV launch (None: it can): dS stored, no head read through the
    token-major order in place, bf16 / fp16, head dim 64 or 128, whole-block 128-key tiles with 32- or
    64-query steps, an sm90 GPU."""
    if not stored:
        return "needs the stored-dS path (dq='stored' and room for the tiles)"
    if any_token_major:
        return "needs inputs in each head's own order (no token-major head read in place)"
    if q.dtype not in (torch.bfloat16, torch.float16):
        return f"needs bf16 or fp16 (got {q.dtype})"
    if q.shape[-1] not in (64, 128):
        return f"needs head dim 64 or 128 (got {q.shape[-1]})"
    if kv_tile != table.block_size or kv_tile != 128 or q_step not in (32, 64):
        return f"needs 128-key tiles of 128-token blocks and 32- or 64-query steps (got {kv_tile}, {q_step})"
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device)[0] != 9:
        return "needs an sm90 (Hopper) GPU"
    return None


def dkdv(q, k, v, grad_out, dk, dv, lse2, delta, q_starts, q_ends, schedule, ds, pair_slots, q_first, *, table,
         kv_tile: int, q_step: int, softmax_scale: float, pairs: int, slot_base: int, warps: int = 8) -> None:  # fmt: skip
    """One dK/dV launch over ``schedule`` into ``dk``, ``dv`` and ``ds`` (:func:`applies` must hold), with
    the Triton kernel's arguments (``lse2`` in base 2, ``q_starts`` / ``q_ends`` the transposed table)."""
    from ...block_table import num_blocks
    from .launcher import LOG2E

    batch, n, heads, dim = q.shape
    block_sparse_attention_bwd_dkdv_sm90[(len(schedule), batch)](
        row_descriptor(q, q_step), row_descriptor(grad_out, q_step), row_descriptor(k, kv_tile), row_descriptor(v, kv_tile),
        dk, dv, lse2, delta, q_starts, q_ends, schedule, ds, pair_slots, q_first,
        q.stride(0), q.stride(1), q.stride(2), q_starts.stride(0), q_starts.stride(1),
        n, table.layout.kv_len, heads, num_blocks(n, kv_tile), q_starts.shape[2], softmax_scale * LOG2E,
        softmax_scale, pairs, slot_base,
        TABLE_BLOCK=table.block_size, BLOCK_M=q_step, BLOCK_N=kv_tile, HEAD_DIM=dim, STAGES=STAGES, num_warps=warps,
        maxnreg=MAXNREG,
    )  # fmt: skip


__all__ = ["MAXNREG", "STAGES", "applies", "block_sparse_attention_bwd_dkdv_sm90", "dkdv"]
