"""The Triton backward's dK/dV kernel for Hopper (sm90) in Gluon, warp-specialised (``backward.OPTIONS["gluon"]``).

Counters of the Triton dK/dV kernel on an H100 (``bench/backward_counters.py``, BENCHMARKS.md) put a fifth of
its warps' stalled time on the waits for each step's two score MMAs and most of the rest on CTA barriers: its
two warpgroups share the step's shared-memory slots, so they run the step in lock step and the tensor cores idle
while both compute exponentials. Here, as in FlashAttention-3, one producer warp loads K, V and each step's
queries and dO by TMA (and its rows of LSE and delta) into a ring of ``STAGES`` slots (``full`` / ``empty``
mbarriers), and two consumer warpgroups (partitions of their own: no barrier between them) each own 64 of the
tile's 128 keys: step by step ``S^T`` and ``dP^T`` (asynchronous), P, ``dV += P^T dO``, dS, ``dK += dS^T Q``, the
dS tile stored (``STORE_DS``; not for heads whose dQ pass recomputes), the slot released. One warpgroup's
exponentials then run while the other's MMAs do. Consumers get 232 registers a thread, the producer 32
(``setmaxnreg``).

Same inputs and results as the Triton kernel's stored-dS path when no head is read through the token-major
order in place (each head's own order, as in training after the head-ordered forward, or no token-major
head): dK (scaled) and dV by row, and each step's dS^T tile in the layout the dQ kernel reads (memory row =
key, the step's columns in :func:`.ds_tiles.store_order`'s order). Keys at or past the real ones get zero
probabilities (their dK, dV rows are zeroed by the launcher, as for the Triton kernel).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

# Triton 3.6 names the TMA load async_copy_global_to_shared; later versions async_load (the old name raises)
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

STAGES = 4  # slots of queries and dO the producer may run ahead by
HALF = gl.constexpr(64)  # keys a consumer warpgroup owns (one m64 warpgroup MMA)
CONSUMER_REGS, PRODUCER_REGS = gl.constexpr(232), gl.constexpr(32)
# whole-kernel cap from which the compiler hands out registers by warpgroup: 12 warps (the producer's rounded
# to a warpgroup) x 32 x 168 = 64,512 of the SM's 65,536; the default partition gets what the workers leave (232)
MAXNREG = 168


@gluon.constexpr_function
def mma_layout(columns):
    """The accumulator layout of one warpgroup's ``[64, columns]`` MMA tiles."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, columns, 16])


@gluon.constexpr_function
def buffer_layout(rows, dim, dtype):
    """The shared-memory layout of a ``[rows, dim]`` buffer that TMA fills and MMAs read."""
    return gl.NVMMASharedLayout.get_default_for([rows, dim], dtype)


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


@gluon.jit
def _load_rows(desc, batch, row, col, bar, smem):
    """TMA load of sample ``batch``'s rows from ``row``, columns from ``col`` (a :func:`row_descriptor`) into the
    ``[rows, D]`` buffer ``smem``, arriving on ``bar``."""
    _tma_load(desc, [batch, row, col], bar, smem.reshape([1, smem.shape[0], smem.shape[1]]))


@gluon.jit
def _work(SCHEDULE, NUM_K_TILES, HEAD_DIM: gl.constexpr):
    """This program's ``(head, tile, batch, column of its heads' features)``."""
    item = gl.load(SCHEDULE + gl.program_id(0))
    head = item // NUM_K_TILES
    return head, item % NUM_K_TILES, gl.program_id(1), head * HEAD_DIM


@gluon.jit
def _range(STARTS, ENDS, ranges, r, N, TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr):
    """Query range ``r`` of this key block: ``(first query block, first row, last row, steps)``."""
    q0 = gl.load(STARTS + ranges + r)
    first = q0 * TABLE_BLOCK
    last = gl.minimum(gl.load(ENDS + ranges + r) * TABLE_BLOCK, N)
    return q0, first, last, gl.maximum(last - first + BLOCK_M - 1, 0) // BLOCK_M


@gluon.constexpr_function
def _columns_first(layout):
    """``layout`` (a linear one) with its registers reordered, column steps before row steps: a thread's
    registers then run along a row, as wide stores need."""
    registers = sorted(layout.reg_bases, key=lambda basis: basis[0] != 0)  # stable: each kind keeps its order
    return gl.DistributedLinearLayout(reg_bases=registers, lane_bases=layout.lane_bases, warp_bases=layout.warp_bases,
                                      block_bases=layout.block_bases, shape=layout.shape)  # fmt: skip


@gluon.jit
def _store_ds(ds_t, DS, pair, ds_rows, start, TABLE_BLOCK: gl.constexpr):
    """Step ``ds_t`` (``[64 keys, BLOCK_M]``) into its pair's tile in the dQ kernel's column order: query
    ``8j + 2t + b`` (t < 4, b < 2) at column ``t * BLOCK_M / 4 + 2j + b``. The reorder moves no data between
    threads (a thread's accumulator holds queries ``8j + 2t + b`` of one ``t``): 16-byte stores."""
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
def _producer(a, TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr):
    """The loads: K and V once, then each step's queries and dO into the next free slot by TMA, and its rows of
    LSE and delta (read here, off the consumers' path: waiting for them was a sixth of their stalls) by stores."""
    (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, full, empty, kv_bar,
     LSE, DELTA, STARTS, ENDS, SCHEDULE, stride_rh, stride_rm, N, HEADS, NUM_K_TILES, NUM_RANGES) = a  # fmt: skip
    head, tile, batch, col = _work(SCHEDULE, NUM_K_TILES, HEAD_DIM)
    stats = (batch.to(gl.int64) * HEADS + head) * N
    row_layout: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    mbarrier.expect(kv_bar, 4 * k_desc.block_type.nbytes)
    for half in gl.static_range(2):
        _load_rows(k_desc, batch, tile * BLOCK_N + half * HALF, col, kv_bar, k_smem.index(half))
        _load_rows(v_desc, batch, tile * BLOCK_N + half * HALF, col, kv_bar, v_smem.index(half))
    ranges = head * stride_rh + tile * BLOCK_N // TABLE_BLOCK * stride_rm
    g = 0
    for r in range(0, NUM_RANGES):
        _, first, last, nsteps = _range(STARTS, ENDS, ranges, r, N, TABLE_BLOCK, BLOCK_M)
        for i in range(0, nsteps):
            slot = g % STAGES
            mbarrier.wait(empty.index(slot), (g // STAGES & 1) ^ 1)  # both consumers done with its last step
            mbarrier.expect(full.index(slot), q_desc.block_type.nbytes + do_desc.block_type.nbytes)
            _load_rows(q_desc, batch, first + i * BLOCK_M, col, full.index(slot), q_smem.index(slot))
            _load_rows(do_desc, batch, first + i * BLOCK_M, col, full.index(slot), do_smem.index(slot))
            offs = first + i * BLOCK_M + gl.arange(0, BLOCK_M, layout=row_layout)
            lse_smem.index(slot).store(gl.load(LSE + stats + offs, mask=offs < last, other=float("inf")))
            delta_smem.index(slot).store(gl.load(DELTA + stats + offs, mask=offs < last, other=0.0))
            mbarrier.arrive(full.index(slot), count=1)  # the slot's second arrival, after the TMA's
            g += 1


@gluon.jit
def _consumer(a, part: gl.constexpr, TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_DS: gl.constexpr, SIDE_OUT: gl.constexpr,
              SLOTTED_ONLY: gl.constexpr):
    """Warpgroup ``part``'s 64 keys: every step of every query range (STORE_DS: its dS tile stored; SLOTTED_ONLY:
    not where the pair's slot is negative), then its rows of dK and dV (SIDE_OUT: a token-major head's to its slot
    of DK_SIDE, DV_SIDE)."""
    (q_desc, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, full, empty, kv_bar, DK, DV, STARTS, ENDS,
     SCHEDULE, DS, PAIR_SLOTS, Q_FIRST, stride_b, stride_n, stride_h, stride_rh, stride_rm, N, KV_LEN, NUM_K_TILES,
     NUM_RANGES, qk_scale, softmax_scale, ds_pairs, slot_base, DK_SIDE, DV_SIDE, SIDE_SLOT, stride_sb,
     stride_sn) = a  # fmt: skip
    head, tile, batch, _ = _work(SCHEDULE, NUM_K_TILES, HEAD_DIM)
    ds_pair0 = batch.to(gl.int64) * ds_pairs - slot_base
    s_layout: gl.constexpr = mma_layout(BLOCK_M)
    o_layout: gl.constexpr = mma_layout(HEAD_DIM)
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_desc.dtype
    rows_here = tile * BLOCK_N + part * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, s_layout))
    key_ok = rows_here < KV_LEN
    ds_rows = (rows_here % TABLE_BLOCK) * TABLE_BLOCK
    k_half = k_smem.index(part)
    v_half = v_smem.index(part)
    zero_s = gl.zeros([HALF, BLOCK_M], gl.float32, layout=s_layout)
    dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    dv = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
    mbarrier.wait(kv_bar, 0)
    ranges = head * stride_rh + tile * BLOCK_N // TABLE_BLOCK * stride_rm
    g = 0
    for r in range(0, NUM_RANGES):
        q0, first, last, nsteps = _range(STARTS, ENDS, ranges, r, N, TABLE_BLOCK, BLOCK_M)
        pair_slots = PAIR_SLOTS
        if STORE_DS:
            pair_slots = PAIR_SLOTS + (gl.load(Q_FIRST + ranges + r) - q0)
        for i in range(0, nsteps):
            slot = g % STAGES
            start = first + i * BLOCK_M
            pair_slot = 0
            if STORE_DS:
                pair_slot = gl.load(pair_slots + start // TABLE_BLOCK)
            mbarrier.wait(full.index(slot), g // STAGES & 1)
            # read before the MMAs: issued among them, the reads queue behind their operand reads
            lse = lse_smem.index(slot).load(gl.SliceLayout(0, s_layout))
            delta = delta_smem.index(slot).load(gl.SliceLayout(0, s_layout))
            s_t = warpgroup_mma(k_half, q_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            dp_t = warpgroup_mma(v_half, do_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
            s_t = warpgroup_mma_wait(num_outstanding=1, deps=(s_t,))  # the scores; dP^T still running
            p_t = gl.exp2(s_t * qk_scale - lse[None, :])
            p_t = gl.where(key_ok[:, None], p_t, 0.0)
            p_op = gl.convert_layout(p_t.to(dtype), a_layout)
            dv = warpgroup_mma(p_op, do_smem.index(slot), dv, is_async=True)
            dp_t = warpgroup_mma_wait(num_outstanding=1, deps=(dp_t,))  # dP^T; the dV update still running
            ds_t = p_t * (dp_t - delta[None, :])
            ds_op = gl.convert_layout(ds_t.to(dtype), a_layout)
            dk = warpgroup_mma(ds_op, q_smem.index(slot), dk, is_async=True)
            if STORE_DS:
                if SLOTTED_ONLY:
                    if pair_slot >= 0:
                        _store_ds(ds_t.to(dtype), DS, ds_pair0 + pair_slot, ds_rows, start, TABLE_BLOCK)
                else:
                    _store_ds(ds_t.to(dtype), DS, ds_pair0 + pair_slot, ds_rows, start, TABLE_BLOCK)
            dv, dk, p_op, ds_op = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dk, p_op, ds_op))
            mbarrier.arrive(empty.index(slot), count=1)  # this warpgroup is done with the slot
            g += 1
    offs_n = tile * BLOCK_N + part * HALF + gl.arange(0, HALF, layout=gl.SliceLayout(1, o_layout))
    offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
    base = batch.to(gl.int64) * stride_b + head * stride_h
    if SIDE_OUT:
        slot = gl.load(SIDE_SLOT + head)
        side = slot >= 0
        base = gl.where(side, batch.to(gl.int64) * stride_sb + slot * HEAD_DIM, base)
        stride_n = gl.where(side, stride_sn, stride_n)
        DK, DV = gl.where(side, DK_SIDE, DK), gl.where(side, DV_SIDE, DV)
    out_ok = (offs_n < N)[:, None]
    gl.store(DK + base + offs_n[:, None] * stride_n + offs_d[None, :], (dk * softmax_scale).to(DK.dtype.element_ty),
             mask=out_ok)  # fmt: skip
    gl.store(DV + base + offs_n[:, None] * stride_n + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_ok)


@gluon.jit
def _worker(a, c, TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, STORE_DS: gl.constexpr, SIDE_OUT: gl.constexpr, SLOTTED_ONLY: gl.constexpr):
    """The producer partition (worker partitions share one signature: ``a`` the producer's arguments, ``c`` the
    consumers')."""
    _producer(a, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)


@gluon.jit
def _second_consumer(a, c, TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                     HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, STORE_DS: gl.constexpr, SIDE_OUT: gl.constexpr,
                     SLOTTED_ONLY: gl.constexpr):
    """The second consumer warpgroup's partition (keys 64-127 of the tile)."""
    _consumer(c, 1, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, STORE_DS, SIDE_OUT, SLOTTED_ONLY)


@gluon.jit
def block_sparse_attention_bwd_dkdv_ws(
    q_desc, do_desc,  # TMA descriptors of the [B, N, H * D] views of Q and dO; blocks [1, BLOCK_M, D]
    k_desc, v_desc,  # of K and V; blocks [1, 64, D]
    DK, DV,  # [B, N, H, D] contiguous
    LSE, DELTA,  # float32 [B, H, N] by row; LSE in base 2
    STARTS, ENDS,  # int32 [H, Kb, R]: the query blocks visiting each key block, as ranges
    SCHEDULE,  # int32 [H * NUM_K_TILES]: work items head * NUM_K_TILES + tile, heaviest first
    DS,  # with STORE_DS: [B, ds_pairs, TABLE_BLOCK, TABLE_BLOCK] stored dS^T tiles; else unused
    PAIR_SLOTS, Q_FIRST,  # int32 [pairs] slots in the transposed table's order; int32 [H, Kb, R] each range's first
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_K_TILES, NUM_RANGES,
    qk_scale, softmax_scale,
    ds_pairs, slot_base,  # DS holds slots [slot_base, slot_base + ds_pairs)
    DK_SIDE, DV_SIDE, SIDE_SLOT,  # with SIDE_OUT: [B, N, Ht, D] token-major heads' dK, dV; int32 [H] their slots
    stride_sb, stride_sn,  # with SIDE_OUT: the side buffers' batch and row strides
    TABLE_BLOCK: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
    STAGES: gl.constexpr, STORE_DS: gl.constexpr, SIDE_OUT: gl.constexpr,
    SLOTTED_ONLY: gl.constexpr,  # with STORE_DS: no tile for pairs whose slot is negative (their dQ recomputes)
):  # fmt: skip
    gl.static_assert(BLOCK_N == 2 * HALF, "two consumer warpgroups of 64 keys")
    dtype: gl.constexpr = q_desc.dtype
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], buffer_layout(HALF, HEAD_DIM, dtype))
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], buffer_layout(HALF, HEAD_DIM, dtype))
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], buffer_layout(BLOCK_M, HEAD_DIM, dtype))
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], buffer_layout(BLOCK_M, HEAD_DIM, dtype))
    stat_layout: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stat_layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_M], stat_layout)
    full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(full.index(s), count=2)  # the TMA's bytes, the producer's LSE and delta
        mbarrier.init(empty.index(s), count=2)  # one arrival from each consumer warpgroup
    mbarrier.init(kv_bar, count=1)
    producer = (q_desc, do_desc, k_desc, v_desc, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, full, empty,
                kv_bar, LSE, DELTA, STARTS, ENDS, SCHEDULE, stride_rh, stride_rm, N, HEADS, NUM_K_TILES,
                NUM_RANGES)  # fmt: skip
    consumer = (q_desc, k_smem, v_smem, q_smem, do_smem, lse_smem, delta_smem, full, empty, kv_bar, DK, DV, STARTS,
                ENDS, SCHEDULE, DS, PAIR_SLOTS, Q_FIRST, stride_b, stride_n, stride_h, stride_rh, stride_rm, N,
                KV_LEN, NUM_K_TILES, NUM_RANGES, qk_scale, softmax_scale, ds_pairs, slot_base, DK_SIDE, DV_SIDE,
                SIDE_SLOT, stride_sb, stride_sn)  # fmt: skip
    gl.warp_specialize([(_consumer, (consumer, 0, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, STORE_DS,
                                     SIDE_OUT, SLOTTED_ONLY)),
                        (_second_consumer, (producer, consumer, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES,
                                            STORE_DS, SIDE_OUT, SLOTTED_ONLY)),
                        (_worker, (producer, consumer, TABLE_BLOCK, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, STORE_DS,
                                   SIDE_OUT, SLOTTED_ONLY))],
                       [4, 1], [CONSUMER_REGS, PRODUCER_REGS])  # fmt: skip


def applies(q: torch.Tensor, table, kv_tile: int, q_step: int, stored: bool, any_token_major: bool,
            recompute: bool = False) -> str | None:
    """Why this kernel cannot take this dK/dV launch (None: it can): dS stored (or ``recompute``: also launches
    whose dQ pass recomputes, no dS stored), no head read through the token-major order in place, bf16 / fp16,
    head dim 64 or 128, 128-key tiles of 128-token blocks with 32- or 64-query steps, an sm90 GPU."""
    if not stored and not recompute:
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
         q_step: int, softmax_scale: float, pairs: int, slot_base: int, store_ds: bool = True,
         sides: tuple | None = None, slotted_only: bool = False) -> None:  # fmt: skip
    """One dK/dV launch over ``schedule`` into ``dk``, ``dv`` and (``store_ds``) ``ds`` (:func:`applies` must
    hold), with the Triton kernel's arguments (``lse2`` in base 2, ``q_starts`` / ``q_ends`` the transposed table);
    ``sides`` = ``(dk_side, dv_side, slots)``: token-major heads' rows to their slot of those (the Triton
    kernel's SIDE_OUT); ``slotted_only``: no dS tile for pairs whose slot is negative."""
    from ...block_table import num_blocks
    from .launcher import LOG2E

    batch, n, heads, dim = q.shape
    block_sparse_attention_bwd_dkdv_ws[(len(schedule), batch)](
        row_descriptor(q, q_step), row_descriptor(grad_out, q_step), row_descriptor(k, HALF.value), row_descriptor(v, HALF.value),
        dk, dv, lse2, delta, q_starts, q_ends, schedule, ds, pair_slots, q_first,
        q.stride(0), q.stride(1), q.stride(2), q_starts.stride(0), q_starts.stride(1),
        n, table.layout.kv_len, heads, num_blocks(n, 2 * HALF.value), q_starts.shape[2], softmax_scale * LOG2E,
        softmax_scale, pairs, slot_base, *(sides or (dk, dv, delta)),
        *(sides[0].stride()[:2] if sides else (0, 0)),
        TABLE_BLOCK=table.block_size, BLOCK_M=q_step, BLOCK_N=2 * HALF.value, HEAD_DIM=dim, STAGES=STAGES,
        STORE_DS=store_ds, SIDE_OUT=sides is not None, SLOTTED_ONLY=slotted_only, num_warps=4, maxnreg=MAXNREG,
    )  # fmt: skip


__all__ = ["MAXNREG", "STAGES", "applies", "block_sparse_attention_bwd_dkdv_ws", "dkdv"]
