"""Block-sparse attention backward in Triton, exact for the forward's block table.

FlashAttention-2 style: ``dK, dV`` by key tile, looping over the query blocks that visit its key
block (the table's transposed form, :attr:`BlockTable.query_ranges`), recomputing the probabilities
from the forward's log-sum-exp (``launcher.forward(..., return_lse=True)``, turned to base 2 by a
prologue kernel that also computes ``delta = rowsum(dO * O)``: :mod:`.backward_prologue`). The same
kernel stores each visited pair's ``dS`` tile (heads in chunks within a memory share, :data:`DEFAULTS`),
and ``dQ = dS K`` runs by query tile over the forward's key-block ranges: one matmul per block (a head whose
tiles alone do not fit the share goes in key-block windows, dQ adding their parts: :func:`.ds_tiles.head_chunks`;
``dq="recompute"``: dQ recomputes the probabilities, no tiles stored). Each range's whole
steps run unmasked (frame-major heads read them, and the dQ kernel its dS tiles, through tensor
descriptors, TMA, on sm90+), only its ragged last step masked; the tiles go out as wide stores from
the matmul's registers, rows and columns in an order that needs no exchange between threads.
Token-major heads are read and written through their order in place, as in the forward (their LSE
and delta gathered into their order once, for the dK/dV kernel's whole steps), or, after the forward on
head-ordered q, k, v (``head_order``: how eager training runs), as frame-major heads, the prologue
putting grad_out and the statistics in head order (``to_frame_major``: the gradients back by one pass for dq and dk,
one for dv). Every element of dQ, dK, dV is written (zeros for keys nobody visits: skipped heads, padded text). On
Hopper the dK/dV launches on inputs in each head's own order go to a warp-specialised kernel in Gluon
(:mod:`.gluon_backward`: a producer warp and two consumer warpgroups, as FlashAttention-3; ``OPTIONS["gluon"]``,
:mod:`.gluon_choice`), the same tiles and results. The torch reference is autograd through
``sparse_vdit.kernels.reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...block_table import num_blocks
from .kernel import dot, sequence_rows
from . import ds_tiles, gluon_choice
from .backward_prologue import prologue, prologue_in_head_order, stats_in_head_order
from .launcher import LOG2E, _descriptors, _tma_ok, option, side_slots, token_major_flags
from .rotary import grads_to_frame_major

# Options of the backward (None: DEFAULTS), set by benchmarks (bench/backward.py --variants) and tests:
# ``tiles`` (dK/dV key tile, its query step, dQ query tile, its key step; None: the rule of _tiles),
# ``warps`` and ``stages`` (dK/dV kernel, dQ kernel), ``tma`` (tensor descriptors where the device has
# them, sm90+: frame-major heads' whole steps, and the stored dS tiles); ``dq``: "stored" (the dK/dV kernel
# stores each visited pair's dS tile, the dQ kernel multiplies it by K: 5 matmuls a block) or "recompute"
# (the dQ kernel recomputes the probabilities: 7); ``ds_budget``: the share of the device's memory the
# stored tiles may take at once (heads go in chunks that fit, a head over it in key-block windows).
# ``dp_early``: the dK/dV kernel's step computes dP before the exponentials (:func:`_dkdv_steps`).
# ``gluon``: on sm90 the dK/dV launches go to the warp-specialised Gluon kernel (gluon_backward.py) where it applies:
# "all" at head dims 128 and 64 and where dQ recomputes, True at head dim 128 with dS stored only (BENCHMARKS.md).
# ``side_out``: with ``to_frame_major``, token-major heads' gradients go to compact side buffers, the others' in place,
# so the passes back to frame-major move those heads only.
OPTIONS: dict = {"tiles": None, "warps": None, "stages": None, "tma": None, "dq": None, "ds_budget": None,
                 "dp_early": None, "gluon": None, "side_out": None}
DEFAULTS: dict = {"tiles": None, "warps": (8, 8), "stages": (3, 3), "tma": True, "dq": "stored", "ds_budget": 0.15,
                  "dp_early": False, "gluon": "all", "side_out": True}


# Candidates timed by ``bench/backward.py --variants`` (each checked first): a winner becomes DEFAULTS; lost (numbers
# and git commits in BENCHMARKS.md): dQ added by the dK/dV kernel (atomics, TMA reductions), dS by TMA stores, 64-key
# dK/dV tiles (also at 4 warps, two programs an SM), 64/128-query steps, 32/128-key dQ steps, other stages and warps,
# token-major q and dO copied, dQ on a side stream, a Gluon kernel pipelined in each warpgroup, gradients stored at
# frame-major rows (sessions k, o, t; dK and dV only, ae-af), recompute + dp-early, exponentials on the FMA units, k
# and v as register operands, Triton 3.9, LSE and delta a step ahead. Tiles are for 128-token table blocks (tests
# scale them).
VARIANTS: dict[str, dict] = {
    "default": {},  # stored dS (through descriptors on sm90+), 128-key dK/dV tiles with 32-query steps, 128-query
    # dQ tiles with 64-key steps, 8 warps, 3 stages; dK/dV by the Gluon kernel on sm90 where it applies
    "recompute": {"dq": "recompute"},  # what heads over the memory share run (and devices with little memory)
    "dp-early": {"dp_early": True},  # dP's MMAs beside the exponentials, dV's beside dS (sm90 SASS)
    "triton-dkdv": {"gluon": False},  # the Triton dK/dV kernel everywhere (its two warpgroups in lock step on sm90)
    "gluon-all": {"gluon": "all"},  # the Gluon kernel at head dim 64 too (CogVideoX), and where dQ recomputes (default)
    "gluon-d128": {"gluon": True},  # the Gluon kernel at head dim 128 with dS stored only (the default until session ad)
    "side-out": {"side_out": True},  # the passes back to frame-major over token-major heads only (the default)
    "all-heads-out": {"side_out": False},  # the passes back over every head (the default until session ad)
}


def backward_option(name: str):
    """The backward option ``name`` in force: ``OPTIONS`` where set, else ``DEFAULTS``."""
    return DEFAULTS[name] if OPTIONS[name] is None else OPTIONS[name]


@triton.jit
def _program(SCHEDULE, TOKEN_MAJOR, NUM_TILES, N, HEADS, stride_b, stride_h, ANY_TOKEN_MAJOR: tl.constexpr):
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
def _rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr):
    """Memory rows of positions ``offs`` in the head's own order (token-major heads read in place)."""
    rows = offs
    if ANY_TOKEN_MAJOR:
        rows = sequence_rows(offs, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    return rows


@triton.jit
def _side(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM: tl.constexpr):
    """Where a (batch, head)'s gradient rows go with SIDE_OUT: ``(side, base, row stride)``, a token-major
    head's to its slot of the compact side buffer ``[B, N, Ht, D]`` (``side``), the others' where they were."""
    slot = tl.load(SIDE_SLOT + head)
    side = slot >= 0
    base = tl.where(side, batch.to(tl.int64) * stride_sb + slot * HEAD_DIM, base)
    return side, base, tl.where(side, stride_sn, stride_n)


@triton.jit
def _tile(PTR, DESC, base, rows, ok, batch, head, start, stride_n,
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
def _step(A, B, A_DESC, B_DESC, start, last, base, batch, head, stride_n, token_major, FRAME_TOKENS, VIDEO_START,
          VIDEO_TOKENS, FRAMES: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
          ANY_TOKEN_MAJOR: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr):  # fmt: skip
    """The ``BLOCK`` positions from ``start`` of a loop over ``[.., last)``: ``(rows, ok, a, b)``, their
    memory rows, which are before ``last``, and their ``[BLOCK, HEAD_DIM]`` tiles of A and B."""
    offs = start + tl.arange(0, BLOCK)
    ok = offs < last
    rows = _rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    a = _tile(A, A_DESC, base, rows, ok, batch, head, start, stride_n, BLOCK, HEAD_DIM, MASKED, TMA)
    b = _tile(B, B_DESC, base, rows, ok, batch, head, start, stride_n, BLOCK, HEAD_DIM, MASKED, TMA)
    return rows, ok, a, b


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, first, last, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, base, stats, batch, head,
    stride_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
    DS, ds_pair0, ds_keys, PAIR_SLOTS,
    FRAMES: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
    STORE_DS: tl.constexpr, TABLE_BLOCK: tl.constexpr, STATS_IN_ORDER: tl.constexpr, DP_EARLY: tl.constexpr,
):  # fmt: skip
    """Query steps ``[first, last)`` into ``(dk, dv)`` of one key tile; MASKED: rows ``>= last`` masked.
    Keys past the real ones are not masked: their rows of dK, dV are zeroed by the launcher.
    STORE_DS: each step's ``dS^T`` also goes to its pair's ``[TABLE_BLOCK keys, TABLE_BLOCK queries]``
    tile of DS (pair ``ds_pair0 + slot``, the slot of query block ``b`` at ``PAIR_SLOTS + b``), in
    :func:`.ds_tiles.store_order` (``ds_keys``: the offsets of that order's rows in a pair), for the dQ kernel.
    STATS_IN_ORDER: LSE and DELTA hold the head's rows in its own order. DP_EARLY: ``dP = V dO^T`` written
    before the exponentials (the tutorial's order has it after the ``dV`` update): on sm90 its MMAs then run
    beside them, and ``dV``'s beside ``dS`` (bench/sm90_loop.py)."""
    for start in range(first, last, BLOCK_M):
        if STORE_DS:
            slot = tl.load(PAIR_SLOTS + start // TABLE_BLOCK)
        rows_m, q_ok, q, do = _step(Q, DO, Q_DESC, DO_DESC, start, last, base, batch, head, stride_n, token_major,
                                    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, BLOCK_M, HEAD_DIM,
                                    ANY_TOKEN_MAJOR, MASKED, TMA)  # fmt: skip
        if STATS_IN_ORDER:
            rows_m = start + tl.arange(0, BLOCK_M)
        if MASKED:
            lse = tl.load(LSE + stats + rows_m, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + stats + rows_m, mask=q_ok, other=0.0)
        else:
            lse = tl.load(LSE + stats + rows_m)
            delta = tl.load(DELTA + stats + rows_m)
        s_t = dot(k, tl.trans(q), None, IEEE)  # [BLOCK_N, BLOCK_M]
        if DP_EARLY:
            dp_t = dot(v, tl.trans(do), None, IEEE)
        p_t = tl.math.exp2(s_t * qk_scale - lse[None, :])
        dv += dot(p_t.to(do.dtype), do, None, IEEE)
        if not DP_EARLY:
            dp_t = dot(v, tl.trans(do), None, IEEE)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        dk += dot(ds_t, q, None, IEEE)
        if STORE_DS:  # the whole box: columns of queries past ``last`` are never read back
            columns = tl.multiple_of(start % TABLE_BLOCK, BLOCK_M) + tl.arange(0, BLOCK_M)
            ptrs = DS + (ds_pair0 + slot) * (TABLE_BLOCK * TABLE_BLOCK) + ds_keys[:, None] + columns[None, :]
            tl.store(ptrs, ds_tiles.store_order(ds_t))
    return dk, dv


# sizes and table shapes not specialised on (divisibility by 16): bench/backward.py's small check layouts
# then run the very kernels it times, compiled once
_SIZES = ["N", "KV_LEN", "HEADS", "NUM_RANGES", "FRAME_TOKENS", "VIDEO_START", "VIDEO_TOKENS", "stride_rh", "stride_rm"]


@triton.jit(do_not_specialize=[*_SIZES, "NUM_K_TILES"])
def block_sparse_attention_bwd_dkdv(
    Q, K, V, DO, DK, DV,  # [B, N, H, D], one set of strides (the launcher makes them contiguous)
    Q_DESC, DO_DESC,  # with TMA: descriptors of Q and DO, blocks [1, BLOCK_M, 1, D]; else unused
    LSE_T, DELTA_T,  # with ANY_TOKEN_MAJOR: LSE and DELTA with token-major heads' rows in their own order
    LSE, DELTA,  # float32 [B, H, N] by memory row; LSE in base 2
    STARTS, ENDS,  # int32 [H, Kb, R]: the query blocks visiting each key block, as ranges
    SCHEDULE,  # int32 [H * NUM_K_TILES]: work items, heaviest first
    TOKEN_MAJOR,  # int8 [H]
    DS,  # with STORE_DS: [B, ds_pairs, TABLE_BLOCK, TABLE_BLOCK] dS^T of each visited pair; else unused
    PAIR_SLOTS,  # with STORE_DS: int32 [pairs] the slots in the transposed table's order
    Q_FIRST,  # with STORE_DS: int32 [H, Kb, R], where each query range starts in PAIR_SLOTS
    DK_SIDE, DV_SIDE, SIDE_SLOT,  # with SIDE_OUT: [B, N, Ht, D] token-major heads' dK, dV; int32 [H] their slots
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_K_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale, softmax_scale,
    ds_pairs, slot_base,  # DS holds slots [slot_base, slot_base + ds_pairs)
    stride_sb, stride_sn,  # with SIDE_OUT: the side buffers' batch and row strides
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per step
    BLOCK_N: tl.constexpr,  # keys per program
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
    STORE_DS: tl.constexpr,
    DP_EARLY: tl.constexpr,  # the step's order (_dkdv_steps)
    SIDE_OUT: tl.constexpr,  # token-major heads' rows to DK_SIDE, DV_SIDE (_side)
):  # fmt: skip
    head, tile, batch, token_major, base, stats = _program(SCHEDULE, TOKEN_MAJOR, NUM_K_TILES, N, HEADS, stride_b,
                                                           stride_h, ANY_TOKEN_MAJOR)  # fmt: skip
    column = tile * BLOCK_N // TABLE_BLOCK  # the key block holding this tile
    ds_pair0 = batch.to(tl.int64) * ds_pairs - slot_base
    ds_keys = (tile * BLOCK_N % TABLE_BLOCK + ds_tiles.stored_key(tl.arange(0, BLOCK_N), BLOCK_N)) * TABLE_BLOCK
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions in the head's own order
    offs_d = tl.arange(0, HEAD_DIM)
    rows_n = _rows(offs_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
    key_ok = offs_n < KV_LEN
    # addresses built from each tensor's own pointer: a shared [BLOCK, D] offset tensor would stay live
    # (in registers) across the loop for the stores at the end
    k = tl.load(K + base + rows_n[:, None] * stride_n + offs_d[None, :], mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
    v = tl.load(V + base + rows_n[:, None] * stride_n + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    ranges = head * stride_rh + column * stride_rm
    for r in range(0, NUM_RANGES):
        q0 = tl.load(STARTS + ranges + r)
        first = q0 * TABLE_BLOCK
        last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, N)
        pair_slots = PAIR_SLOTS
        if STORE_DS:
            pair_slots = PAIR_SLOTS + (tl.load(Q_FIRST + ranges + r) - q0)
        full = first + tl.maximum(last - first, 0) // BLOCK_M * BLOCK_M  # whole steps unmasked, one loop per
        if token_major:  # kind of head (token-major: LSE and delta in the head's order); then the ragged step
            dk, dv = _dkdv_steps(dk, dv, k, v, first, full, Q, DO, Q_DESC, DO_DESC, LSE_T, DELTA_T, base, stats, batch,
                                 head, stride_n, True, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                                 DS, ds_pair0, ds_keys, pair_slots,
                                 FRAMES, BLOCK_M, HEAD_DIM, IEEE, True, False, False, STORE_DS, TABLE_BLOCK,
                                 True, DP_EARLY)  # fmt: skip
        else:
            dk, dv = _dkdv_steps(dk, dv, k, v, first, full, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, base, stats, batch,
                                 head, stride_n, False, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                                 DS, ds_pair0, ds_keys, pair_slots,
                                 FRAMES, BLOCK_M, HEAD_DIM, IEEE, False, TMA, False, STORE_DS, TABLE_BLOCK,
                                 False, DP_EARLY)  # fmt: skip
        dk, dv = _dkdv_steps(dk, dv, k, v, full, last, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, base, stats, batch, head,
                             stride_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                             DS, ds_pair0, ds_keys, pair_slots,
                             FRAMES, BLOCK_M, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR, False, True, STORE_DS,
                             TABLE_BLOCK, False, DP_EARLY)  # fmt: skip
    out_ok = (offs_n < N)[:, None]  # rows of keys past KV_LEN are zeroed by the launcher
    dk = dk * softmax_scale  # (a tl.where here costs register spills in the loop on sm90)
    if SIDE_OUT:
        side, base, stride_n = _side(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM)
        DK, DV = tl.where(side, DK_SIDE, DK), tl.where(side, DV_SIDE, DV)
    tl.store(DK + base + rows_n[:, None] * stride_n + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + base + rows_n[:, None] * stride_n + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_ok)


@triton.jit
def _dq_steps(
    dq, q, do, lse, delta, first, last, K, V, K_DESC, V_DESC, base, batch, head, stride_n, token_major,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
    FRAMES: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Key steps ``[first, last)`` into ``dq`` of one query tile; MASKED: keys ``>= last`` masked."""
    for start in range(first, last, BLOCK_N):
        _, key_ok, k, v = _step(K, V, K_DESC, V_DESC, start, last, base, batch, head, stride_n, token_major,
                                FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, BLOCK_N, HEAD_DIM,
                                ANY_TOKEN_MAJOR, MASKED, TMA)  # fmt: skip
        p = tl.math.exp2(dot(q, tl.trans(k), None, IEEE) * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(key_ok[None, :], p, 0.0)
        ds = p * (dot(do, tl.trans(v), None, IEEE) - delta[:, None])
        dq += dot(ds.to(k.dtype), k, None, IEEE)
    return dq


@triton.jit(do_not_specialize=[*_SIZES, "NUM_Q_TILES"])
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
    SIDE_OUT: tl.constexpr,  # token-major heads' rows to DQ_SIDE (_side)
):  # fmt: skip
    head, tile, batch, token_major, base, stats = _program(SCHEDULE, TOKEN_MAJOR, NUM_Q_TILES, N, HEADS, stride_b,
                                                           stride_h, ANY_TOKEN_MAJOR)  # fmt: skip
    row = tile * BLOCK_M // TABLE_BLOCK
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = _rows(offs_m, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
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
        side, base, stride_n = _side(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM)
        DQ = tl.where(side, DQ_SIDE, DQ)
    _store_dq(DQ + base + rows_m[:, None] * stride_n + offs_d[None, :], dq * softmax_scale, q_ok, ACCUMULATE)


@triton.jit
def _dq_stored_steps(
    dq, ds_queries, ds_pair, first, lo, last, K, K_DESC, DS, base, batch, head, stride_n, token_major,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
    DS_TMA: tl.constexpr,
):  # fmt: skip
    """Key steps ``[lo, last)`` of the range from ``first`` into ``dq``: ``dS K`` with dS read from the
    pairs' stored tiles (``ds_pair``: the range's first pair); MASKED: keys ``>= last`` masked. DS_TMA:
    DS a descriptor of the tiles' ``[pairs * TABLE_BLOCK, TABLE_BLOCK]`` view, ``ds_queries`` the first column."""
    for start in range(lo, last, BLOCK_N):
        offs = start + tl.arange(0, BLOCK_N)
        key_ok = offs < last
        rows = _rows(offs, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
        k = _tile(K, K_DESC, base, rows, key_ok, batch, head, start, stride_n, BLOCK_N, HEAD_DIM, MASKED, TMA)
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


@triton.jit(do_not_specialize=[*_SIZES, "NUM_Q_TILES", "ds_pairs", "slot_base"])
def block_sparse_attention_bwd_dq_stored(
    K, DQ,  # [B, N, H, D], one set of strides
    K_DESC,  # with TMA: descriptor of K, blocks [1, BLOCK_N, 1, D]; else unused
    DS,  # [B, ds_pairs, TABLE_BLOCK, TABLE_BLOCK]: dS^T of each visited pair, from the dK/dV kernel
    STARTS, ENDS, SLOTS,  # int32 [H, Qb, R]: the forward's key-block ranges, the slot of each range's first pair
    SCHEDULE,  # int32 [H * NUM_Q_TILES]
    TOKEN_MAJOR,  # int8 [H]
    DQ_SIDE, SIDE_SLOT,  # with SIDE_OUT: [B, N, Ht, D] token-major heads' dQ; int32 [H] their slots
    stride_b, stride_n, stride_h, stride_rh, stride_rm,
    N, KV_LEN, HEADS, NUM_Q_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    softmax_scale, ds_pairs, slot_base, stride_sb, stride_sn,
    FRAMES: tl.constexpr, TABLE_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per step
    HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
    DS_TMA: tl.constexpr,  # DS is a descriptor of its [B * ds_pairs * TABLE_BLOCK, TABLE_BLOCK] view
    Q_STEP: tl.constexpr,  # the dK/dV kernel's query step (the tiles' columns in ds_tiles.store_order)
    ACCUMULATE: tl.constexpr,  # add to DQ (a head's key blocks in windows, ds_tiles.head_chunks)
    SIDE_OUT: tl.constexpr,  # token-major heads' rows to DQ_SIDE (_side)
):  # fmt: skip
    """``dQ = dS K`` for one query tile: one matmul per step, the probabilities not recomputed; row ``i``
    of ``dq`` is the query at the tiles' column ``i``."""
    head, tile, batch, token_major, base, _ = _program(SCHEDULE, TOKEN_MAJOR, NUM_Q_TILES, N, HEADS, stride_b,
                                                       stride_h, ANY_TOKEN_MAJOR)  # fmt: skip
    row = tile * BLOCK_M // TABLE_BLOCK
    columns = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_m = ds_tiles.stored_query(columns, Q_STEP)
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = _rows(offs_m, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
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
                                  FRAMES, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, True, False, False, DS_TMA)  # fmt: skip
        else:
            dq = _dq_stored_steps(dq, ds_queries, ds_pair, first, first, full, K, K_DESC, DS, base, batch, head,
                                  stride_n, False, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
                                  FRAMES, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, False, TMA, False, DS_TMA)  # fmt: skip
        dq = _dq_stored_steps(dq, ds_queries, ds_pair, first, full, last, K, K_DESC, DS, base, batch, head, stride_n,
                              token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
                              FRAMES, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR, False, True,
                              DS_TMA)  # fmt: skip
    if SIDE_OUT:
        side, base, stride_n = _side(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM)
        DQ = tl.where(side, DQ_SIDE, DQ)
    _store_dq(DQ + base + rows_m[:, None] * stride_n + offs_d[None, :], dq * softmax_scale, offs_m < N, ACCUMULATE)


@triton.jit
def _store_dq(ptrs, dq, ok, ACCUMULATE: tl.constexpr):
    """``dq`` (float32) to ``ptrs``, rows ``ok`` only; ACCUMULATE: added to what is there."""
    if ACCUMULATE:
        dq += tl.load(ptrs, mask=ok[:, None], other=0.0).to(tl.float32)
    tl.store(ptrs, dq.to(ptrs.dtype.element_ty), mask=ok[:, None])


def _tiles(block_size: int, device: torch.device, override=None) -> tuple[int, int, int, int]:
    """(dK/dV key tile, its query step, dQ query tile, its key step); ``override`` checked.

    The CPU (interpreter) takes whole table blocks: fewest programs and steps.
    """
    if override is not None:
        tiles = tuple(int(x) for x in override)
        for tile in tiles:
            if tile < 16 or tile & (tile - 1) or block_size % tile:
                raise ValueError(f"backward tile {tile} must be a power of two >= 16 dividing the block size {block_size}")
        return tiles  # type: ignore[return-value]
    if device.type == "cpu":
        return block_size, block_size, block_size, block_size
    # the Triton tutorial's split for the backward: wide tiles held, narrow steps streamed (64-key dQ steps
    # measured faster than 32 at D=128, recomputing or not: BENCHMARKS.md, session i; 32-query steps at D=64
    # too, session s)
    big, small = min(block_size, 128), min(block_size, 32)
    return big, small, big, min(block_size, 64)


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
    head_order: bool = False,
    to_frame_major: bool = False,
    rotary=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` of block-sparse attention over ``table`` for ``[B, N, H, D]`` tensors.

    ``out`` and ``lse`` (float32 ``[B, H, N]``, natural log, by memory row) come from the forward.
    ``token_major``: read token-major heads through their order in place (False: q, k, v, out and
    grad_out are already in each head's own order, as for FlashAttention-4's forward). ``head_order``:
    q, k, v are in each head's own order while grad_out, out and lse are frame-major, as the forward on
    head-ordered inputs leaves them (``launcher.forward(head_order=True)``): the prologue's pass puts
    grad_out and the statistics in head order, and the gradients come back in head order, or with
    ``to_frame_major`` frame-major, dq and dk through the transpose of ``rotary`` (a
    :class:`~sparse_vdit.kernels.head_order_op.Rotary` or None): the backward of the forward's pass into head
    order (:func:`.rotary.grads_to_frame_major`). How the kernels run: :data:`OPTIONS`. Memory besides the
    gradients: the stored dS tiles of one chunk of heads (or of a head's key blocks), at most ``ds_budget`` of
    the device's memory (a chunk that finds no memory free recomputes instead).
    """
    if to_frame_major and not head_order:
        raise ValueError("to_frame_major undoes the forward's head order: it needs head_order=True")
    batch, n, heads, dim = q.shape
    q, k, v, out, grad_out = (t.contiguous() for t in (q, k, v, out, grad_out))
    device = q.device
    block = table.block_size
    kv_tile, q_step, q_tile, kv_step = _tiles(block, device, backward_option("tiles"))
    warps, stages = backward_option("warps"), backward_option("stages")
    tma = bool(backward_option("tma")) and _tma_ok(device)
    layout = table.layout
    if head_order and table.token_major_heads:  # the statistics and grad_out in the order q, k, v are in
        delta, lse2, grad_out = prologue_in_head_order(grad_out, out, lse.contiguous(), table)
    else:
        delta, lse2 = prologue(grad_out, out, lse.contiguous())
    order = option("schedule")
    num_q_tiles, num_k_tiles = num_blocks(n, q_tile), num_blocks(n, kv_tile)
    any_token_major = token_major and not head_order and bool(table.token_major_heads)
    flags = token_major_flags(table) if any_token_major else delta
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    moved = len(table.token_major_heads) if head_order and to_frame_major else 0
    sides = bool(backward_option("side_out")) and 0 < moved < heads  # a compact buffer for the heads to move
    side_shape = dict(size=(batch, n, moved, dim), dtype=q.dtype, device=device)
    dk_side, dv_side = (torch.empty(**side_shape), torch.empty(**side_shape)) if sides else (dk, dv)
    side_slot, side_strides = (side_slots(table), dk_side.stride()[:2]) if sides else (delta, (0, 0))
    launch = [{} if device.type == "cpu" else {"num_warps": w, "num_stages": s} for w, s in zip(warps, stages)]
    common = dict(FRAMES=layout.frames, TABLE_BLOCK=block, HEAD_DIM=dim, IEEE=q.dtype == torch.float32,
                  ANY_TOKEN_MAJOR=any_token_major)  # fmt: skip
    sizes = (layout.frame_tokens, layout.video_start, layout.video_tokens, softmax_scale * LOG2E, softmax_scale)
    chunks = [ds_tiles.Chunk(0, heads, False)]  # recompute: no slots
    if backward_option("dq") == "stored":
        chunks = ds_tiles.table_chunks(table, batch, q.element_size(), device, float(backward_option("ds_budget")))
    windows = any(c.keys is not None for c in chunks)  # a head's key blocks in parts: dQ adds them up
    dq = torch.zeros_like(q) if windows else torch.empty_like(q)
    dq_side = (torch.zeros if windows else torch.empty)(**side_shape) if sides else dq
    q_descriptors = _descriptors(q, grad_out, q_step) if tma else None
    lse_t, delta_t = lse2, delta
    if any_token_major:  # token-major heads' LSE and delta in their order: read by position, not gathered
        lse_t, delta_t = stats_in_head_order(table, lse2, delta)
    kv_descriptors = _descriptors(k, v, kv_step) if tma else None
    for chunk in chunks:
        h0, h1, stored = chunk[:3]
        part = table if chunk.keys is None else table.form(("triton.bwd.window", chunk),  # cut to its key windows
                                                           lambda t: ds_tiles.window(t, chunk))  # fmt: skip
        q_starts, q_ends = part.query_ranges
        starts, ends = part.range_starts.contiguous(), part.range_ends.contiguous()
        slots, head_first, pair_slots, q_first = starts, [0] * (heads + 1), starts, q_starts
        if stored:
            slots, head_first, pair_slots, q_first = part.form("triton.bwd.ds_slots", ds_tiles.slots)
        pairs = head_first[h1] - head_first[h0]
        ds = ds_tiles.buffer((batch, max(pairs, 1), block, block), q.dtype, device) if stored else None
        stored = ds is not None  # no memory for them now: these heads recompute
        ds = delta if ds is None else ds
        ds_load = ds_tiles.descriptor(ds, (kv_step, q_tile)) if stored and tma else ds
        dkdv_schedule = table.form(("triton.bwd.dkdv_schedule", block // kv_tile, num_k_tiles, order, chunk),
                                   lambda t: ds_tiles.chunk_schedule(t.query_num_blocks, block // kv_tile, num_k_tiles,
                                                                     order, chunk))  # fmt: skip
        if not (gluon_choice.takes(q, part, kv_tile, q_step, stored, any_token_major, backward_option("gluon"))
                and gluon_choice.run(q, k, v, grad_out, dk, dv, lse_t, delta_t, q_starts, q_ends, dkdv_schedule, ds,
                                    pair_slots, q_first, table=part, q_step=q_step, softmax_scale=softmax_scale,
                                    pairs=pairs, slot_base=head_first[h0], store_ds=stored,
                                    sides=(dk_side, dv_side, side_slot) if sides else None)):  # fmt: skip
            block_sparse_attention_bwd_dkdv[(len(dkdv_schedule), batch)](
                q, k, v, grad_out, dk, dv, *(q_descriptors or (delta, delta)), lse_t, delta_t,
                lse2, delta, q_starts, q_ends,
                dkdv_schedule, flags, ds, pair_slots, q_first, dk_side, dv_side, side_slot,
                q.stride(0), q.stride(1), q.stride(2), q_starts.stride(0), q_starts.stride(1),
                n, layout.kv_len, heads, num_k_tiles, q_starts.shape[2], *sizes,
                pairs, head_first[h0], *side_strides,
                BLOCK_M=q_step, BLOCK_N=kv_tile, TMA=q_descriptors is not None, STORE_DS=stored,
                DP_EARLY=bool(backward_option("dp_early")), SIDE_OUT=sides, **common, **launch[0],
            )  # fmt: skip
        dq_schedule = part.form(("triton.bwd.dq_schedule", block // q_tile, num_q_tiles, order, h0, h1, windows),
                                lambda t: ds_tiles.chunk_schedule(t.kv_num_blocks, block // q_tile, num_q_tiles, order,
                                                                  chunk._replace(keys=None), windows))  # fmt: skip
        ranges = (starts.stride(0), starts.stride(1), n, layout.kv_len, heads, num_q_tiles, starts.shape[2])
        if stored:
            block_sparse_attention_bwd_dq_stored[(len(dq_schedule), batch)](
                k, dq, kv_descriptors[0] if kv_descriptors else delta, ds_load, starts, ends, slots, dq_schedule, flags,
                dq_side, side_slot, q.stride(0), q.stride(1), q.stride(2), *ranges, *sizes[:3], softmax_scale, pairs,
                head_first[h0], *side_strides,
                BLOCK_M=q_tile, BLOCK_N=kv_step, TMA=kv_descriptors is not None, DS_TMA=tma, Q_STEP=q_step,
                ACCUMULATE=windows, SIDE_OUT=sides, **common, **launch[1],
            )  # fmt: skip
        else:
            block_sparse_attention_bwd_dq[(len(dq_schedule), batch)](
                q, k, v, grad_out, dq, *(kv_descriptors or (delta, delta)), lse2, delta, starts, ends, dq_schedule,
                flags, dq_side, side_slot, q.stride(0), q.stride(1), q.stride(2), *ranges, *sizes, *side_strides,
                BLOCK_M=q_tile, BLOCK_N=kv_step, TMA=kv_descriptors is not None, ACCUMULATE=windows,
                SIDE_OUT=sides, **common, **launch[1],
            )  # fmt: skip
    if to_frame_major:
        dq, dk, dv = grads_to_frame_major(dq, dk, dv, token_major_flags(table), (layout.frames, *sizes[:3]), rotary,
                                          (side_slot, dq_side, dk_side, dv_side) if sides else None)  # fmt: skip
    if layout.kv_len < n:  # the kernel left the rows of padded keys as they came (not moved: text rows)
        dk[:, layout.kv_len :], dv[:, layout.kv_len :] = 0, 0
    return dq, dk, dv


__all__ = ["OPTIONS", "VARIANTS", "backward"]
