"""Block-sparse attention backward in Triton, exact for the forward's block table.

FlashAttention-2 style: ``dK, dV`` by key tile, looping over the query blocks that visit its key
block (the table's transposed form, :attr:`BlockTable.query_ranges`), recomputing the probabilities
from the forward's log-sum-exp (``launcher.forward(..., return_lse=True)``, turned to base 2 by a
prologue kernel that also computes ``delta = rowsum(dO * O)``: :mod:`.backward_prologue`). The same
kernel stores each visited pair's ``dS`` tile (heads in chunks within a memory share, :data:`DEFAULTS`),
and ``dQ = dS K`` runs by query tile over the forward's key-block ranges: one matmul per block (a head whose
tiles alone do not fit the share goes in key-block windows, dQ adding their parts: :func:`.ds_tiles.head_chunks`;
``dq="recompute"``: dQ recomputes the probabilities, no tiles stored). On sm90 at head dim 128 a quarter of the dQ
launch's query blocks recompute beside those reading tiles, none stored for them (the dQ split, :mod:`.backward_dq`).
Each range's whole steps run unmasked (frame-major heads read them, and the dQ kernel its dS tiles, through tensor
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
from .kernel import dot
from . import ds_tiles, gluon_choice
from .backward_dq import SIZES, block_sparse_attention_bwd_dq, block_sparse_attention_bwd_dq_stored
from .backward_rows import load_step, memory_rows, side_rows, work_item
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
# so the passes back to frame-major move those heads only. ``dq_split``: with dS stored, that share of the dQ launch's
# programs recompute the probabilities instead of reading tiles (spread through it: ds_tiles.recompute_rows), no tiles
# stored for them; 0: none. ``dq_split_stages``: under the split, the pipeline depth of the loops reading tiles (None:
# the launch's; the recomputing path's registers leave one program an SM, so deeper loops keep as many tiles in flight).
OPTIONS: dict = {"tiles": None, "warps": None, "stages": None, "tma": None, "dq": None, "ds_budget": None,
                 "dp_early": None, "gluon": None, "side_out": None, "dq_split": None, "dq_split_stages": None}
DEFAULTS: dict = {"tiles": None, "warps": (8, 8), "stages": (3, 3), "tma": True, "dq": "stored", "ds_budget": 0.15,
                  "dp_early": False, "gluon": "all", "side_out": True, "dq_split": 0.25, "dq_split_stages": 5}
# (the default dq_split acts on sm90 at head dim 128 only: split_share)


# Candidates timed by ``bench/backward.py --variants`` (each checked first): a winner becomes DEFAULTS; lost (numbers
# and git commits in BENCHMARKS.md): dQ added by the dK/dV kernel (atomics, TMA reductions), dS by TMA stores, 64-key
# dK/dV tiles (also at 4 warps, two programs an SM), 64/128-query steps, 32/128-key dQ steps, other stages and warps,
# token-major q and dO copied, dQ on a side stream, a Gluon kernel pipelined in each warpgroup, gradients stored at
# frame-major rows (sessions k, o, t; dK and dV only, ae-af), recompute + dp-early, exponentials on the FMA units, k
# and v as register operands, Triton 3.9, LSE and delta a step ahead, the dQ split with the launch's 3 stages (15%,
# 25%, 50%) and with its recomputing programs in 32-query parts (ag). Tiles are for 128-token table blocks (tests
# scale them).
VARIANTS: dict[str, dict] = {
    "default": {},  # stored dS (through descriptors on sm90+), 128-key dK/dV tiles with 32-query steps, 128-query
    # dQ tiles with 64-key steps, 8 warps, 3 stages; dK/dV by the Gluon kernel on sm90 where it applies; a quarter of
    # the dQ programs recomputing beside those reading tiles, 5 stages deep (since session ag)
    "recompute": {"dq": "recompute"},  # what heads over the memory share run (and devices with little memory)
    "dp-early": {"dp_early": True},  # dP's MMAs beside the exponentials, dV's beside dS (sm90 SASS)
    "triton-dkdv": {"gluon": False},  # the Triton dK/dV kernel everywhere (its two warpgroups in lock step on sm90)
    "gluon-all": {"gluon": "all"},  # the Gluon kernel at head dim 64 too (CogVideoX), and where dQ recomputes (default)
    "gluon-d128": {"gluon": True},  # the Gluon kernel at head dim 128 with dS stored only (the default until session ad)
    "side-out": {"side_out": True},  # the passes back to frame-major over token-major heads only (the default)
    "all-heads-out": {"side_out": False},  # the passes back over every head (the default until session ad)
    "no-split": {"dq_split": 0.0},  # every dQ program reads tiles (the default until session ag)
    "dq-split-50": {"dq_split": 0.5},  # half the dQ programs recompute
}


def backward_option(name: str):
    """The backward option ``name`` in force: ``OPTIONS`` where set, else ``DEFAULTS``."""
    return DEFAULTS[name] if OPTIONS[name] is None else OPTIONS[name]


def split_share(device: torch.device, head_dim: int) -> float:
    """The dQ split in force (``dq_split``): ``OPTIONS``' where set, else the default's on sm90 at head dim 128, where
    it was measured (BENCHMARKS.md, session ag; its 5-stage loops need Hopper's shared memory), else none."""
    if OPTIONS["dq_split"] is not None:
        return float(OPTIONS["dq_split"])
    hopper = device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    return float(DEFAULTS["dq_split"]) if hopper and head_dim == 128 else 0.0


@triton.jit
def _dkdv_steps(
    dk, dv, k, v, first, last, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, base, stats, batch, head,
    stride_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
    DS, ds_pair0, ds_keys, PAIR_SLOTS,
    FRAMES: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    ANY_TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr,
    STORE_DS: tl.constexpr, TABLE_BLOCK: tl.constexpr, STATS_IN_ORDER: tl.constexpr, DP_EARLY: tl.constexpr,
    SLOTTED_ONLY: tl.constexpr,
):  # fmt: skip
    """Query steps ``[first, last)`` into ``(dk, dv)`` of one key tile; MASKED: rows ``>= last`` masked.
    Keys past the real ones are not masked: their rows of dK, dV are zeroed by the launcher.
    STORE_DS: each step's ``dS^T`` also goes to its pair's ``[TABLE_BLOCK keys, TABLE_BLOCK queries]``
    tile of DS (pair ``ds_pair0 + slot``, the slot of query block ``b`` at ``PAIR_SLOTS + b``), in
    :func:`.ds_tiles.store_order` (``ds_keys``: the offsets of that order's rows in a pair), for the dQ kernel;
    SLOTTED_ONLY: not for pairs whose slot is negative (their query block's dQ recomputes).
    STATS_IN_ORDER: LSE and DELTA hold the head's rows in its own order. DP_EARLY: ``dP = V dO^T`` written
    before the exponentials (the tutorial's order has it after the ``dV`` update): on sm90 its MMAs then run
    beside them, and ``dV``'s beside ``dS`` (bench/sm90_loop.py)."""
    for start in range(first, last, BLOCK_M):
        if STORE_DS:
            slot = tl.load(PAIR_SLOTS + start // TABLE_BLOCK)
        rows_m, q_ok, q, do = load_step(Q, DO, Q_DESC, DO_DESC, start, last, base, batch, head, stride_n,
                                        token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, BLOCK_M, HEAD_DIM,
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
            if SLOTTED_ONLY:
                if slot >= 0:
                    tl.store(ptrs, ds_tiles.store_order(ds_t))
            else:
                tl.store(ptrs, ds_tiles.store_order(ds_t))
    return dk, dv


@triton.jit(do_not_specialize=[*SIZES, "NUM_K_TILES"])
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
    SIDE_OUT: tl.constexpr,  # token-major heads' rows to DK_SIDE, DV_SIDE (side_rows)
    SLOTTED_ONLY: tl.constexpr,  # with STORE_DS: no tile for pairs whose slot is negative (their dQ recomputes)
):  # fmt: skip
    head, tile, batch, token_major, base, stats = work_item(SCHEDULE, TOKEN_MAJOR, NUM_K_TILES, N, HEADS, stride_b,
                                                            stride_h, ANY_TOKEN_MAJOR)  # fmt: skip
    column = tile * BLOCK_N // TABLE_BLOCK  # the key block holding this tile
    ds_pair0 = batch.to(tl.int64) * ds_pairs - slot_base
    ds_keys = (tile * BLOCK_N % TABLE_BLOCK + ds_tiles.stored_key(tl.arange(0, BLOCK_N), BLOCK_N)) * TABLE_BLOCK
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions in the head's own order
    offs_d = tl.arange(0, HEAD_DIM)
    rows_n = memory_rows(offs_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, FRAMES, ANY_TOKEN_MAJOR)
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
                                 True, DP_EARLY, SLOTTED_ONLY)  # fmt: skip
        else:
            dk, dv = _dkdv_steps(dk, dv, k, v, first, full, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, base, stats, batch,
                                 head, stride_n, False, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                                 DS, ds_pair0, ds_keys, pair_slots,
                                 FRAMES, BLOCK_M, HEAD_DIM, IEEE, False, TMA, False, STORE_DS, TABLE_BLOCK,
                                 False, DP_EARLY, SLOTTED_ONLY)  # fmt: skip
        dk, dv = _dkdv_steps(dk, dv, k, v, full, last, Q, DO, Q_DESC, DO_DESC, LSE, DELTA, base, stats, batch, head,
                             stride_n, token_major, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, qk_scale,
                             DS, ds_pair0, ds_keys, pair_slots,
                             FRAMES, BLOCK_M, HEAD_DIM, IEEE, ANY_TOKEN_MAJOR, False, True, STORE_DS,
                             TABLE_BLOCK, False, DP_EARLY, SLOTTED_ONLY)  # fmt: skip
    out_ok = (offs_n < N)[:, None]  # rows of keys past KV_LEN are zeroed by the launcher
    dk = dk * softmax_scale  # (a tl.where here costs register spills in the loop on sm90)
    if SIDE_OUT:
        side, base, stride_n = side_rows(SIDE_SLOT, head, batch, base, stride_n, stride_sb, stride_sn, HEAD_DIM)
        DK, DV = tl.where(side, DK_SIDE, DK), tl.where(side, DV_SIDE, DV)
    tl.store(DK + base + rows_n[:, None] * stride_n + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=out_ok)
    tl.store(DV + base + rows_n[:, None] * stride_n + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=out_ok)


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
    split = split_share(device, dim) if backward_option("dq") == "stored" else 0.0
    recompute = None  # with split: the query blocks whose dQ recomputes though the tiles are stored
    if split > 0:
        recompute = table.form(("triton.bwd.recompute_rows", block // q_tile, num_q_tiles, order, split),
                               lambda t: ds_tiles.recompute_rows(t.kv_num_blocks, block // q_tile, num_q_tiles, order,
                                                                 split))  # fmt: skip
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
            key = "triton.bwd.ds_slots" if recompute is None else ("triton.bwd.ds_slots", block // q_tile, num_q_tiles,
                                                                   order, split)  # fmt: skip
            slots, head_first, pair_slots, q_first = part.form(key, lambda t: ds_tiles.slots(t, recompute))
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
                                    slotted_only=recompute is not None,
                                    sides=(dk_side, dv_side, side_slot) if sides else None)):  # fmt: skip
            block_sparse_attention_bwd_dkdv[(len(dkdv_schedule), batch)](
                q, k, v, grad_out, dk, dv, *(q_descriptors or (delta, delta)), lse_t, delta_t,
                lse2, delta, q_starts, q_ends,
                dkdv_schedule, flags, ds, pair_slots, q_first, dk_side, dv_side, side_slot,
                q.stride(0), q.stride(1), q.stride(2), q_starts.stride(0), q_starts.stride(1),
                n, layout.kv_len, heads, num_k_tiles, q_starts.shape[2], *sizes,
                pairs, head_first[h0], *side_strides,
                BLOCK_M=q_step, BLOCK_N=kv_tile, TMA=q_descriptors is not None, STORE_DS=stored,
                DP_EARLY=bool(backward_option("dp_early")), SIDE_OUT=sides, SLOTTED_ONLY=recompute is not None,
                **common, **launch[0],
            )  # fmt: skip
        dq_schedule = part.form(("triton.bwd.dq_schedule", block // q_tile, num_q_tiles, order, h0, h1, windows),
                                lambda t: ds_tiles.chunk_schedule(t.kv_num_blocks, block // q_tile, num_q_tiles, order,
                                                                  chunk._replace(keys=None), windows))  # fmt: skip
        ranges = (starts.stride(0), starts.stride(1), n, layout.kv_len, heads, num_q_tiles, starts.shape[2])
        if stored:
            k_desc, v_desc = kv_descriptors or (delta, delta)
            block_sparse_attention_bwd_dq_stored[(len(dq_schedule), batch)](
                k, dq, k_desc, q, v, grad_out, v_desc, lse2, delta, delta if recompute is None else recompute,
                ds_load, starts, ends, slots, dq_schedule, flags, dq_side, side_slot, q.stride(0), q.stride(1),
                q.stride(2), *ranges, *sizes, pairs, head_first[h0], *side_strides,
                0 if recompute is None else recompute.stride(0),
                BLOCK_M=q_tile, BLOCK_N=kv_step, TMA=kv_descriptors is not None, DS_TMA=tma, Q_STEP=q_step,
                ACCUMULATE=windows, SIDE_OUT=sides, SPLIT=recompute is not None,
                SPLIT_STAGES=None if recompute is None else backward_option("dq_split_stages"), **common, **launch[1],
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


__all__ = ["OPTIONS", "VARIANTS", "backward", "split_share"]
