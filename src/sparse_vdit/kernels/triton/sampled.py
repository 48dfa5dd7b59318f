"""Sampled-row attention under two masks, fused (SVG's online profiling) in Triton.

For a few query rows, one pass over the keys gives three attention outputs at once: exact, and
restricted to each row's key-block ranges under two masks (one frame-major, one token-major: the
spatial and temporal bands). Scores are never written to memory; each (row tile, sample, head,
key split) program keeps three FlashAttention-style accumulators that share the exact row's
running max, and a second launch merges the splits. A frame-major mask whose blocks hold whole key
tiles is tested once per row and key tile, others key by key. Each row's key-block ranges are read from per-position tables kept resident per
layout (only the rows travel per call). :func:`choose_heads` turns the outputs into per-head errors
and the choice in one more launch. The torch reference is
:func:`sparse_vdit.methods.svg.sampled_outputs` with ``backend="torch"``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .kernel import dot
from .launcher import LOG2E


@triton.jit
def _inside(RS, RE, rows, row_ok, key_block, NUM_POSITIONS, NR: tl.constexpr):
    """[BLOCK_M, BLOCK_N]: whether each key block lies in one of its row's ``NR`` ranges (the
    per-position tables ``RS`` / ``RE`` [NR, NUM_POSITIONS] read at the rows' positions)."""
    hit = (rows[:, None] < 0) & (key_block[None, :] < 0)  # all False, [BLOCK_M, BLOCK_N]
    for r in tl.static_range(NR):
        lo = tl.load(RS + r * NUM_POSITIONS + rows, mask=row_ok, other=0)
        hi = tl.load(RE + r * NUM_POSITIONS + rows, mask=row_ok, other=0)
        hit = hit | ((key_block[None, :] >= lo[:, None]) & (key_block[None, :] < hi[:, None]))
    return hit


@triton.jit
def _row_inside(RS, RE, rows, row_ok, key_block, NUM_POSITIONS, NR: tl.constexpr):
    """[BLOCK_M]: whether the one key block ``key_block`` of a whole tile lies in each row's ranges."""
    hit = rows < 0  # all False
    for r in tl.static_range(NR):
        lo = tl.load(RS + r * NUM_POSITIONS + rows, mask=row_ok, other=0)
        hi = tl.load(RE + r * NUM_POSITIONS + rows, mask=row_ok, other=0)
        hit = hit | ((key_block >= lo) & (key_block < hi))
    return hit


@triton.jit
def _masked_step(acc, l_i, alpha, p, v, RS, RE, rows, row_ok, start, offs_n, token_major, NUM_POSITIONS,
                 NR: tl.constexpr, TABLE_BLOCK: tl.constexpr, TOKEN_MAJOR: tl.constexpr, ROW_WISE: tl.constexpr,
                 IEEE: tl.constexpr):  # fmt: skip
    """One key tile into a masked row's (acc, l), both rescaled by ``alpha`` first. ``ROW_WISE``: the
    tile lies in one frame-major key block (``BLOCK_N`` divides ``TABLE_BLOCK``), so one test per row
    decides; else keys are tested one by one."""
    acc = acc * alpha[:, None]
    l_i = l_i * alpha
    if ROW_WISE:
        inside = _row_inside(RS, RE, rows, row_ok, start // TABLE_BLOCK, NUM_POSITIONS, NR)
        p = tl.where(inside[:, None], p, 0.0)
    else:
        block = (token_major if TOKEN_MAJOR else offs_n) // TABLE_BLOCK
        p = tl.where(_inside(RS, RE, rows, row_ok, block, NUM_POSITIONS, NR), p, 0.0)
    acc = acc + dot(p.to(v.dtype), v, None, IEEE)
    l_i = l_i + tl.sum(p, 1)
    return acc, l_i


@triton.jit
def _safe(m):
    """A running max with -inf as 0 (rows that saw no key yet: exp2(-inf - 0) = 0, no NaN)."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def sampled_rows_fwd(
    Q, K, V,  # [B, N, H, D]; last dims contiguous
    ROWS,  # int32 [R]: the sampled query positions
    RS0, RE0, RS1, RE1,  # int32 [NR, P]: key-block ranges of every query position under mask 0 / mask 1
    PM, PL, PO,  # partials: max [B, H, S, R], sums [B, H, S, 3, R], outputs [B, H, S, 3, R, D] (fp32)
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    NUM_ROWS, NUM_POSITIONS, HEADS, KV_LEN, KEYS_PER_SPLIT, SPLITS,
    FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale,  # softmax_scale * log2(e)
    TABLE_BLOCK: tl.constexpr,
    TOKEN_MAJOR_0: tl.constexpr,  # whether mask 0's ranges count token-major key blocks
    TOKEN_MAJOR_1: tl.constexpr,
    ROW_WISE_0: tl.constexpr,  # mask 0 decided once per row and tile (see _masked_step)
    ROW_WISE_1: tl.constexpr,
    NR: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
):  # fmt: skip
    tile, bh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS  # batch * stride can pass 2^31
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < NUM_ROWS
    rows = tl.load(ROWS + offs_m, mask=row_ok, other=0)
    q = tl.load(Q + batch * stride_qb + head * stride_qh + rows[:, None] * stride_qn + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_0 = tl.zeros([BLOCK_M], tl.float32)
    l_1 = tl.zeros([BLOCK_M], tl.float32)
    l_2 = tl.zeros([BLOCK_M], tl.float32)
    acc_0 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc_1 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    acc_2 = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    first = split * KEYS_PER_SPLIT
    last = tl.minimum(first + KEYS_PER_SPLIT, KV_LEN)
    for start in range(first, last, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        valid = offs_n < last
        k = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0.0)
        qk = dot(q, k, None, IEEE)
        qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))
        # key blocks in frame-major and token-major order (video token f*S+p sits at p*F+f)
        j = offs_n - VIDEO_START
        video = (j >= 0) & (j < VIDEO_TOKENS)
        token_major = tl.where(video, VIDEO_START + (j % FRAME_TOKENS) * FRAMES + j // FRAME_TOKENS, offs_n)
        # one running max for all three accumulators (a masked row's max is at most the exact one's)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.math.exp2(m_i - _safe(m_new))
        l_0 = l_0 * alpha
        acc_0 = acc_0 * alpha[:, None]
        m_i = m_new
        p = tl.math.exp2(qk - _safe(m_i)[:, None])
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        pv = dot(p.to(v.dtype), v, None, IEEE)
        l_0 = l_0 + tl.sum(p, 1)
        acc_0 = acc_0 + pv
        acc_1, l_1 = _masked_step(acc_1, l_1, alpha, p, v, RS0, RE0, rows, row_ok, start, offs_n, token_major,
                                  NUM_POSITIONS, NR, TABLE_BLOCK, TOKEN_MAJOR_0, ROW_WISE_0, IEEE)  # fmt: skip
        acc_2, l_2 = _masked_step(acc_2, l_2, alpha, p, v, RS1, RE1, rows, row_ok, start, offs_n, token_major,
                                  NUM_POSITIONS, NR, TABLE_BLOCK, TOKEN_MAJOR_1, ROW_WISE_1, IEEE)  # fmt: skip

    part = (batch * HEADS + head) * SPLITS + split  # [B, H, S] flattened
    tl.store(PM + part * NUM_ROWS + offs_m, m_i, mask=row_ok)
    l_ptrs = PL + part * 3 * NUM_ROWS + offs_m
    tl.store(l_ptrs, l_0, mask=row_ok)
    tl.store(l_ptrs + NUM_ROWS, l_1, mask=row_ok)
    tl.store(l_ptrs + 2 * NUM_ROWS, l_2, mask=row_ok)
    o_ptrs = PO + part * 3 * NUM_ROWS * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, acc_0, mask=row_ok[:, None])
    tl.store(o_ptrs + NUM_ROWS * HEAD_DIM, acc_1, mask=row_ok[:, None])
    tl.store(o_ptrs + 2 * NUM_ROWS * HEAD_DIM, acc_2, mask=row_ok[:, None])


@triton.jit
def merge_splits(
    PM, PL, PO,  # partials of sampled_rows_fwd: max [BH, S, R], sums [BH, S, 3, R], outputs [BH, S, 3, R, D]
    OUT, MASS,  # float32 [BH, 3, R, D] normalised outputs, [BH, 3, R] masses relative to the exact row's
    NUM_ROWS, SPLITS,
    BLOCK_R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One (batch x head, row tile): the key splits' partials rescaled to their common max and summed."""
    bh, tile = tl.program_id(0), tl.program_id(1)
    offs_r = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_r < NUM_ROWS
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    for split in range(SPLITS):
        top = tl.maximum(top, tl.load(PM + (bh * SPLITS + split) * NUM_ROWS + offs_r, mask=ok, other=float("-inf")))
    l_0 = tl.zeros([BLOCK_R], tl.float32)
    l_1 = tl.zeros([BLOCK_R], tl.float32)
    l_2 = tl.zeros([BLOCK_R], tl.float32)
    o_0 = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    o_1 = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    o_2 = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
    top = tl.maximum(top, -1e30)  # rows past the end: -inf everywhere, weights 0 below
    tile_rd = offs_r[:, None] * HEAD_DIM + offs_d[None, :]
    for split in range(SPLITS):
        part = bh * SPLITS + split
        m = tl.load(PM + part * NUM_ROWS + offs_r, mask=ok, other=float("-inf"))
        w = tl.math.exp2(m - top)  # 0 where the split's max is -inf
        l_ptrs = PL + part * 3 * NUM_ROWS + offs_r
        l_0 += w * tl.load(l_ptrs, mask=ok, other=0.0)
        l_1 += w * tl.load(l_ptrs + NUM_ROWS, mask=ok, other=0.0)
        l_2 += w * tl.load(l_ptrs + 2 * NUM_ROWS, mask=ok, other=0.0)
        o_ptrs = PO + part * 3 * NUM_ROWS * HEAD_DIM + tile_rd
        o_0 += w[:, None] * tl.load(o_ptrs, mask=ok[:, None], other=0.0)
        o_1 += w[:, None] * tl.load(o_ptrs + NUM_ROWS * HEAD_DIM, mask=ok[:, None], other=0.0)
        o_2 += w[:, None] * tl.load(o_ptrs + 2 * NUM_ROWS * HEAD_DIM, mask=ok[:, None], other=0.0)
    out_ptrs = OUT + bh * 3 * NUM_ROWS * HEAD_DIM + tile_rd
    tl.store(out_ptrs, o_0 / tl.maximum(l_0, 1e-30)[:, None], mask=ok[:, None])
    tl.store(out_ptrs + NUM_ROWS * HEAD_DIM, o_1 / tl.maximum(l_1, 1e-30)[:, None], mask=ok[:, None])
    tl.store(out_ptrs + 2 * NUM_ROWS * HEAD_DIM, o_2 / tl.maximum(l_2, 1e-30)[:, None], mask=ok[:, None])
    mass_ptrs = MASS + bh * 3 * NUM_ROWS + offs_r
    exact = tl.maximum(l_0, 1e-30)
    tl.store(mass_ptrs, l_0 / exact, mask=ok)
    tl.store(mass_ptrs + NUM_ROWS, l_1 / exact, mask=ok)
    tl.store(mass_ptrs + 2 * NUM_ROWS, l_2 / exact, mask=ok)


@triton.jit
def choose_heads(
    OUT,  # float32 [B, H, 3, R, D]: merged outputs (exact, mask 0, mask 1)
    ERR,  # float32 [2, B, H] (PER_SAMPLE) or [2, H]: mean squared error of each mask's rows
    SEL,  # int32 [B, H]: the mask with the lower error (ties and NaN as torch.argmin: the first)
    BATCH, HEADS, NUM_ROWS,
    PER_SAMPLE: tl.constexpr,  # one choice per (sample, head); else errors averaged over the batch
    BLOCK_R: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One head: the output error of both masks over the rows (and the batch) and the choice."""
    head = tl.program_id(0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    size = NUM_ROWS * HEAD_DIM
    total_0 = 0.0
    total_1 = 0.0
    for b in range(BATCH):
        base = OUT + (b * HEADS + head).to(tl.int64) * 3 * size
        sum_0 = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
        sum_1 = tl.zeros([BLOCK_R, HEAD_DIM], tl.float32)
        for start in range(0, NUM_ROWS, BLOCK_R):
            ok = (start + offs_r < NUM_ROWS)[:, None]
            at = base + (start + offs_r)[:, None] * HEAD_DIM + offs_d[None, :]
            exact = tl.load(at, mask=ok, other=0.0)
            d_0 = tl.load(at + size, mask=ok, other=0.0) - exact
            d_1 = tl.load(at + 2 * size, mask=ok, other=0.0) - exact
            sum_0 += d_0 * d_0
            sum_1 += d_1 * d_1
        e_0 = tl.sum(tl.sum(sum_0, 1), 0) / size
        e_1 = tl.sum(tl.sum(sum_1, 1), 0) / size
        if PER_SAMPLE:
            tl.store(ERR + b * HEADS + head, e_0)
            tl.store(ERR + (BATCH + b) * HEADS + head, e_1)
            tl.store(SEL + b * HEADS + head, ((e_1 < e_0) | ((e_1 != e_1) & (e_0 == e_0))).to(tl.int32))
        else:
            total_0 += e_0
            total_1 += e_1
    if not PER_SAMPLE:
        e_0 = total_0 / BATCH
        e_1 = total_1 / BATCH
        tl.store(ERR + head, e_0)
        tl.store(ERR + HEADS + head, e_1)
        choice = ((e_1 < e_0) | ((e_1 != e_1) & (e_0 == e_0))).to(tl.int32)
        for b in range(BATCH):
            tl.store(SEL + b * HEADS + head, choice)


# Launch overrides for benchmarks (None: the rule below): the tile (block_m, block_n, num_warps,
# num_stages, see _tiles), how many programs per SM the key splits aim at (see _splits), whether
# frame-major masks are tested once per row and tile (row_wise, default on where exact) and the
# merge's rows per program (merge_rows, see _merge_rows; 16 before).
TUNING: dict[str, int | None] = {"block_m": None, "block_n": None, "num_warps": None, "num_stages": None,
                                 "programs_per_sm": None, "row_wise": None, "merge_rows": None}  # fmt: skip
LAUNCH_KEYS = ("block_m", "block_n", "num_warps", "num_stages", "programs_per_sm")
# Launch settings by the profile's size (score elements: samples x heads x rows x keys): the first
# rule whose bound holds; TUNING overrides any field. From the H200 run of bench/svg.py --kernel-sweep
# (2026-12-03, bench/results/svg-kernel-sweep-h200.json, 25% density, profile alone): Wan-1.3B 480p
# (2.5e7): 64 x 32 tiles, 4 warps, 2 per SM: 0.128 ms, 3.0% of attention (0.163-0.299 ms at 1, 4 or
# 8 per SM, at 8 warps or 64 x 64 tiles); Wan-14B 720p (1.9e8): the same tile at 8 per SM: 0.888 ms,
# 1.2% (1.03-2.15 ms elsewhere). The kernel variants timed there (fold, hull, gate, lazy rescale) were
# all slower and are gone (bench/svg_overhead.py's SWEEP says by how much). Above head dim 128: 16 x 64
# tiles, 2 stages.
LAUNCH_RULES: tuple[tuple[float, dict], ...] = (
    (7e7, dict(block_m=64, block_n=32, num_warps=4, num_stages=3, programs_per_sm=2)),
    (math.inf, dict(block_m=64, block_n=32, num_warps=4, num_stages=3, programs_per_sm=8)),
)  # fmt: skip
PROGRAMS_PER_SM = 2  # _splits' target when none is given


def launch_settings(size: float, dim: int) -> dict:
    """The kernel's launch settings for a profile of ``size`` score elements (batch x heads x rows x
    keys) at head dim ``dim``: the first :data:`LAUNCH_RULES` entry whose bound holds, then
    :data:`TUNING`'s overrides."""
    chosen = dict(next(rule for bound, rule in LAUNCH_RULES if size <= bound))
    if dim > 128:  # three float32 accumulators of BLOCK_M x dim: shared memory and registers
        chosen.update(block_m=16, block_n=64, num_warps=4, num_stages=2)
    chosen.update({k: TUNING[k] for k in LAUNCH_KEYS if TUNING.get(k) is not None})
    return chosen


def _tiles(rows: int, dim: int, device: torch.device, size: float = 0) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of :func:`launch_settings`: all of SVG's 64 sampled
    rows in one tile up to dim 128, so keys and values are read once."""
    chosen = launch_settings(size, dim)
    return tuple(chosen[k] for k in ("block_m", "block_n", "num_warps", "num_stages"))


def _splits(programs: int, kv_len: int, block_n: int, device: torch.device, per_sm: int | None = None) -> int:
    """Key splits so that the GPU gets about ``TUNING["programs_per_sm"]`` (else ``per_sm``, else
    :data:`PROGRAMS_PER_SM`) programs per SM, each split at least eight key tiles long (two splits on
    the interpreter, whatever the target)."""
    if device.type == "cpu":
        return min(2, max(1, kv_len // (4 * block_n)))
    per_sm = TUNING.get("programs_per_sm") or per_sm or PROGRAMS_PER_SM
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(math.ceil(per_sm * sms / programs), kv_len // (8 * block_n)))


def sampled_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    starts: torch.Tensor,
    ends: torch.Tensor,
    token_major: tuple[bool, bool],
    *,
    kv_len: int,
    softmax_scale: float,
    block_size: int,
    layout: tuple[int, int, int, int],
    splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact and two-mask attention of sampled rows: two launches (the key splits, their merge).

    Args:
        q, k, v: ``[B, N, H, D]``.
        rows: int32 ``[R]`` the sampled query positions (q's device).
        starts, ends: int32 ``[2, NR, P]`` contiguous, P >= every row + 1: key-block ranges of
            every query position under each mask (in token-major block numbers where
            ``token_major[i]``), read at the rows' positions in the kernel.
        layout: frames, frame tokens, video start, video tokens (for token-major key blocks).

    Returns:
        outputs float32 ``[B, H, 3, R, D]`` (exact, mask 0, mask 1; each normalised by its own
        mass) and masses float32 ``[B, H, 3, R]`` relative to the exact row's (the first is 1).
    """
    batch, _, heads, dim = q.shape
    num_rows = rows.numel()
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if rows.dtype != torch.int32 or starts.dtype != torch.int32 or ends.dtype != torch.int32:
        raise TypeError("rows, starts and ends must be int32")
    if not (starts.is_contiguous() and ends.is_contiguous()) or starts.dim() != 3 or starts.shape[0] != 2 \
            or starts.shape != ends.shape:  # fmt: skip
        raise ValueError(f"starts/ends must be contiguous [2, NR, positions], got {tuple(starts.shape)}, "
                         f"{tuple(ends.shape)}")  # fmt: skip
    chosen = launch_settings(batch * heads * num_rows * kv_len, dim)
    block_m, block_n, warps, stages = (chosen[k] for k in ("block_m", "block_n", "num_warps", "num_stages"))
    row_tiles = triton.cdiv(num_rows, block_m)
    splits = splits or _splits(row_tiles * batch * heads, kv_len, block_n, q.device, chosen["programs_per_sm"])
    per_split = triton.cdiv(triton.cdiv(kv_len, splits), block_n) * block_n
    splits = triton.cdiv(kv_len, per_split)
    dev = q.device
    pm = torch.empty(batch, heads, splits, num_rows, dtype=torch.float32, device=dev)
    pl = torch.empty(batch, heads, splits, 3, num_rows, dtype=torch.float32, device=dev)
    po = torch.empty(batch, heads, splits, 3, num_rows, dim, dtype=torch.float32, device=dev)
    extra = {} if dev.type == "cpu" else {"num_warps": warps, "num_stages": stages}
    row_wise = [TUNING.get("row_wise") is not False and not tm and block_size % block_n == 0 for tm in token_major]
    sampled_rows_fwd[(row_tiles, batch * heads, splits)](
        q, k, v, rows, starts[0], ends[0], starts[1], ends[1], pm, pl, po,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        num_rows, starts.shape[2], heads, kv_len, per_split, splits, *layout,
        softmax_scale * LOG2E,
        TABLE_BLOCK=block_size, TOKEN_MAJOR_0=bool(token_major[0]), TOKEN_MAJOR_1=bool(token_major[1]),
        ROW_WISE_0=row_wise[0], ROW_WISE_1=row_wise[1], NR=starts.shape[1],
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=dim, IEEE=q.dtype == torch.float32,
        **extra,
    )  # fmt: skip
    out = torch.empty(batch, heads, 3, num_rows, dim, dtype=torch.float32, device=dev)
    mass = torch.empty(batch, heads, 3, num_rows, dtype=torch.float32, device=dev)
    merge_rows = _merge_rows(batch * heads, num_rows, dev)
    merge_splits[(batch * heads, triton.cdiv(num_rows, merge_rows))](
        pm, pl, po, out, mass, num_rows, splits, BLOCK_R=merge_rows, HEAD_DIM=dim)
    return out, mass


def _merge_rows(programs: int, num_rows: int, device: torch.device) -> int:
    """Rows per program of the merge: 16, halved (down to 2) until the GPU gets two programs per SM
    (a merge of few heads, e.g. Wan-1.3B's 12 x 64 rows, otherwise runs 48 programs in series over
    the splits); ``TUNING["merge_rows"]`` overrides. Each row's result does not depend on it."""
    if TUNING.get("merge_rows"):
        return TUNING["merge_rows"]
    rows = 16
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
        while rows > 2 and programs * triton.cdiv(num_rows, rows) < target:
            rows //= 2
    return rows


def choose(outputs: torch.Tensor, per_sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Output errors of both masks and the choice, from :func:`sampled_outputs`' outputs, in one launch.

    Returns float32 errors ``[2, B, H]`` (``per_sample``) or ``[2, H]`` (averaged over the batch),
    the mean squared difference to the exact rows over rows and dims as
    :func:`sparse_vdit.methods.svg_profile.sampled_errors` (``"output"``) computes it, and int32
    ``[B, H]`` the mask with the lower error (``argmin``: ties go to mask 0).
    """
    batch, heads, three, num_rows, dim = outputs.shape
    if three != 3 or outputs.dtype != torch.float32 or not outputs.is_contiguous():
        raise ValueError(f"outputs must be contiguous float32 [B, H, 3, R, D], got {outputs.dtype} {tuple(outputs.shape)}")
    errors = torch.empty((2, batch, heads) if per_sample else (2, heads), dtype=torch.float32, device=outputs.device)
    selected = torch.empty(batch, heads, dtype=torch.int32, device=outputs.device)
    choose_heads[(heads,)](outputs, errors, selected, batch, heads, num_rows, PER_SAMPLE=per_sample,
                           BLOCK_R=16, HEAD_DIM=dim)  # fmt: skip
    return errors, selected
