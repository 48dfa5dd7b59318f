"""A top-k (or top-p) block table from mean-pooled q and k, in Triton, without a host sync.

Four launches: block means of q and of k (one read of each, float32 sums, the ragged last block
over its real tokens), then per head and tile of ``BLOCK_Q`` query blocks the scores against every
key block (``mean(q_i) . mean(k_j) * scale + log(tokens in key block j)``), their softmax averaged
over the batch (the estimated mass), and the kept blocks: every ``forced`` block plus the
``count - forced`` others of highest mass, ties to the lower key block (the k-th largest mass found
by bisection on its bits, the ties at it kept in key-block order); or, top-p, per row the shortest
prefix of that ranking (forced blocks first) whose mass reaches ``p`` (found by a second bisection),
clamped to a budget; a last launch writes the table forms the attention kernels read: key-block
ranges of a fixed width and the ascending index lists.

The rule and its torch version live in :mod:`sparse_vdit.methods.online` (``pooled_mass`` and
``top_k_keep`` / ``select_blocks``); this module knows tables and masks, not patterns.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...block_table import is_power_of_two, num_blocks

BLOCK_Q = 16  # query blocks per selection program (the least tl.dot takes)
BLOCK_D = 16  # head-dim slice per tl.dot of the scores
POOL_CHUNK = 16  # tokens summed per step of the pooling


@triton.jit
def _pool_kernel(X, OUT, stride_b, stride_n, stride_h, LENGTH, NUM_BLOCKS, HEADS,
                 TABLE_BLOCK: tl.constexpr, CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr):  # fmt: skip
    """OUT[b, h, i] = mean of X[b, i * TABLE_BLOCK : min(LENGTH, (i + 1) * TABLE_BLOCK), h] (float32)."""
    blk, bh = tl.program_id(0), tl.program_id(1)
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS  # batch * stride can pass 2^31
    offs_d = tl.arange(0, HEAD_DIM)
    start = blk * TABLE_BLOCK
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    for t in range(0, TABLE_BLOCK, CHUNK):
        rows = (start + t + tl.arange(0, CHUNK)).to(tl.int64)
        x = tl.load(X + batch * stride_b + head * stride_h + rows[:, None] * stride_n + offs_d[None, :],
                    mask=(rows < LENGTH)[:, None], other=0.0)  # fmt: skip
        acc += tl.sum(x.to(tl.float32), 0)
    tokens = tl.minimum(LENGTH - start, TABLE_BLOCK).to(tl.float32)
    tl.store(OUT + (bh.to(tl.int64) * NUM_BLOCKS + blk) * HEAD_DIM + offs_d, acc / tokens)


@triton.jit
def _top_p_count(mass, bits, forced, candidate, P, LOW, HIGH, BLOCK_Q: tl.constexpr):
    """Per row the blocks the top-p rule keeps: the shortest prefix of the ranking (forced blocks
    first, then by mass) whose mass reaches P, clamped to [LOW, HIGH], at least the forced ones."""
    forced_count = tl.sum(forced.to(tl.int32), 1)
    forced_mass = tl.sum(tl.where(forced, mass, 0.0), 1)
    others = tl.where(candidate, mass, 0.0)
    low = tl.zeros([BLOCK_Q], dtype=tl.int32)  # the largest t with forced + mass(bits >= t) >= P
    high = tl.full([BLOCK_Q], 0x7F800000, dtype=tl.int32)
    for _ in range(32):
        mid = low + (high - low + 1) // 2
        enough = forced_mass + tl.sum(tl.where(bits >= mid[:, None], others, 0.0), 1) >= P
        low, high = tl.where(enough, mid, low), tl.where(enough, high, mid - 1)
    reachable = forced_mass + tl.sum(others, 1) >= P
    last = low.to(tl.float32, bitcast=True)  # the mass of the block that reaches P
    above = tl.sum((bits > low[:, None]).to(tl.int32), 1)
    before = forced_mass + tl.sum(tl.where(bits > low[:, None], others, 0.0), 1)  # < P
    ties = tl.sum((bits == low[:, None]).to(tl.int32), 1)
    share = tl.minimum((P - before) / tl.where(last > 0, last, 1.0), 1e9)  # > 0: blocks of `last` still needed
    whole = share.to(tl.int32)  # its ceiling, kept within int32
    needed = tl.maximum(whole + (whole.to(tl.float32) < share).to(tl.int32), 1)
    reach = tl.where(reachable & (last > 0), above + tl.minimum(needed, ties), tl.sum(candidate.to(tl.int32), 1))
    reach = tl.where(forced_mass >= P, 0, reach) + forced_count
    return tl.maximum(tl.minimum(tl.maximum(reach, LOW), HIGH), forced_count)


@triton.jit
def _keep_kernel(QP, KP, FORCED, KEEP, BATCH, HEADS, NUM_Q, NUM_K, KV_LEN, scale, COUNT, P, LOW,
                 TABLE_BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
                 KB_POW2: tl.constexpr, TOP_P: tl.constexpr):  # fmt: skip
    """KEEP[h, i, :] (int8) of one head and ``BLOCK_Q`` query blocks: forced blocks plus the top
    ``COUNT - forced`` others by batch-averaged pooled mass, ties to the lower key block (``TOP_P``:
    ``COUNT`` per row from :func:`_top_p_count`, between ``LOW`` and ``COUNT``)."""
    head, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, KB_POW2)
    row_ok, col_ok = rows < NUM_Q, cols < NUM_K
    tokens = tl.maximum(tl.minimum(KV_LEN - cols * TABLE_BLOCK, TABLE_BLOCK), 1).to(tl.float32)
    bias = tl.log(tokens)
    offs_d = tl.arange(0, BLOCK_D)
    mass = tl.zeros([BLOCK_Q, KB_POW2], dtype=tl.float32)
    for b in range(BATCH):
        bh = (b * HEADS + head).to(tl.int64)
        acc = tl.zeros([BLOCK_Q, KB_POW2], dtype=tl.float32)
        for d in tl.static_range(0, HEAD_DIM, BLOCK_D):
            qt = tl.load(QP + (bh * NUM_Q + rows[:, None]) * HEAD_DIM + d + offs_d[None, :], mask=row_ok[:, None],
                         other=0.0)  # fmt: skip
            kt = tl.load(KP + (bh * NUM_K + cols[None, :]) * HEAD_DIM + d + offs_d[:, None], mask=col_ok[None, :],
                         other=0.0)  # fmt: skip
            acc += tl.dot(qt, kt, input_precision="ieee")
        s = tl.where(col_ok[None, :], acc * scale + bias[None, :], float("-inf"))
        e = tl.exp(s - tl.max(s, 1)[:, None])
        mass += e / tl.sum(e, 1)[:, None]
    mass = mass / BATCH
    cell = rows[:, None].to(tl.int64) * NUM_K + cols[None, :]
    inside = row_ok[:, None] & col_ok[None, :]
    forced = tl.load(FORCED + cell, mask=inside, other=0) != 0
    candidate = inside & ~forced
    bits = tl.where(candidate, mass.to(tl.int32, bitcast=True), -1)  # mass >= 0: its bits order as it does
    if TOP_P:
        count = _top_p_count(mass, bits, forced, candidate, P, LOW, COUNT, BLOCK_Q)
    else:
        count = tl.zeros([BLOCK_Q], dtype=tl.int32) + COUNT
    picks = tl.maximum(count - tl.sum(forced.to(tl.int32), 1), 0)  # [BLOCK_Q] non-forced blocks to keep
    low = tl.zeros([BLOCK_Q], dtype=tl.int32)  # the largest t with #(bits >= t) >= picks: the picks-th mass
    high = tl.full([BLOCK_Q], 0x7F800000, dtype=tl.int32)
    for _ in range(32):
        mid = low + (high - low + 1) // 2
        enough = tl.sum((bits >= mid[:, None]).to(tl.int32), 1) >= picks
        low, high = tl.where(enough, mid, low), tl.where(enough, high, mid - 1)
    above = bits > low[:, None]
    tied = bits == low[:, None]
    wanted = picks - tl.sum(above.to(tl.int32), 1)  # ties at the threshold still to keep, lowest first
    chosen = above | (tied & (tl.cumsum(tied.to(tl.int32), 1) <= wanted[:, None]))
    chosen = chosen & (picks > 0)[:, None]
    chosen = tl.where((tl.sum(candidate.to(tl.int32), 1) <= picks)[:, None], candidate, chosen)
    out = (head * NUM_Q).to(tl.int64) * NUM_K + cell
    tl.store(KEEP + out, (chosen | forced).to(tl.int8), mask=inside)


@triton.jit
def _table_kernel(KEEP, STARTS, ENDS, INDICES, NUM_Q, NUM_K, WIDTH, INDEX_WIDTH,
                  BLOCK_Q: tl.constexpr, KB_POW2: tl.constexpr, WIDTH_POW2: tl.constexpr,
                  INDEX_POW2: tl.constexpr):  # fmt: skip
    """The ranges (starts, ends; unused slots [0, 0)) and the ascending index lists (later slots
    repeating the last kept block, 0 for an empty row) of ``BLOCK_Q`` rows of KEEP."""
    head, tile = tl.program_id(0), tl.program_id(1)
    rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
    cols = tl.arange(0, KB_POW2)
    row_ok = rows < NUM_Q
    row = (head * NUM_Q + rows).to(tl.int64)  # [BLOCK_Q] row of the [H * Qb, ...] outputs
    at = KEEP + row[:, None] * NUM_K + cols[None, :]
    keep = tl.load(at, mask=row_ok[:, None] & (cols < NUM_K)[None, :], other=0) != 0
    before = tl.load(at - 1, mask=row_ok[:, None] & ((cols >= 1) & (cols < NUM_K))[None, :], other=0) != 0
    after = tl.load(at + 1, mask=row_ok[:, None] & (cols + 1 < NUM_K)[None, :], other=0) != 0
    first, last = keep & ~before, keep & ~after
    slot = tl.arange(0, WIDTH_POW2)
    runs = tl.sum(first.to(tl.int32), 1)
    unused = row_ok[:, None] & (slot[None, :] >= runs[:, None]) & (slot[None, :] < WIDTH)
    zeros = tl.zeros([BLOCK_Q, WIDTH_POW2], dtype=tl.int32)
    place = tl.cumsum(first.to(tl.int32), 1) - 1
    tl.store(STARTS + row[:, None] * WIDTH + place, cols[None, :], mask=first & (place < WIDTH))
    tl.store(STARTS + row[:, None] * WIDTH + slot[None, :], zeros, mask=unused)
    place = tl.cumsum(last.to(tl.int32), 1) - 1
    tl.store(ENDS + row[:, None] * WIDTH + place, cols[None, :] + 1, mask=last & (place < WIDTH))
    tl.store(ENDS + row[:, None] * WIDTH + slot[None, :], zeros, mask=unused)
    count = tl.sum(keep.to(tl.int32), 1)
    final = tl.maximum(tl.max(tl.where(keep, cols[None, :], -1), 1), 0)
    place = tl.cumsum(keep.to(tl.int32), 1) - 1
    tl.store(INDICES + row[:, None] * INDEX_WIDTH + place, cols[None, :], mask=keep & (place < INDEX_WIDTH))
    index_slot = tl.arange(0, INDEX_POW2)
    rest = row_ok[:, None] & (index_slot[None, :] >= count[:, None]) & (index_slot[None, :] < INDEX_WIDTH)
    tl.store(INDICES + row[:, None] * INDEX_WIDTH + index_slot[None, :],
             tl.zeros([BLOCK_Q, INDEX_POW2], dtype=tl.int32) + final[:, None], mask=rest)  # fmt: skip


def supports(q: torch.Tensor) -> bool:
    """Whether :func:`pooled_top_k` takes ``q``: a head dim that is a power of two >= 16; float16, bfloat16 or float32."""
    return q.shape[-1] >= BLOCK_D and is_power_of_two(q.shape[-1]) and q.dtype in (torch.float16, torch.bfloat16,
                                                                                   torch.float32)


def pool_blocks(x: torch.Tensor, length: int, block: int) -> torch.Tensor:
    """float32 ``[B, H, blocks, D]``: the mean of ``x[:, :length]`` (``(B, N, H, D)``) over each block
    of ``block`` tokens (the last one over its real tokens)."""
    batch, _, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    blocks = num_blocks(length, block)
    out = torch.empty(batch, heads, blocks, dim, dtype=torch.float32, device=x.device)
    _pool_kernel[(blocks, batch * heads)](x, out, x.stride(0), x.stride(1), x.stride(2), length, blocks, heads,
                                          TABLE_BLOCK=block, CHUNK=min(POOL_CHUNK, block), HEAD_DIM=dim)  # fmt: skip
    return out


def pooled_top_k(q: torch.Tensor, k: torch.Tensor, forced: torch.Tensor, count: int, *, block: int, kv_len: int,
                 range_width: int, index_width: int, softmax_scale: float | None = None, p: float | None = None,
                 min_count: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per head and query block, every ``forced`` key block and the ``count - forced`` others of highest
    pooled mass (ties to the lower key block), on q's device, no host sync.

    ``p`` (top-p): a row keeps instead the shortest prefix of that ranking (forced blocks first) whose
    mass reaches ``p``, clamped to ``[min_count, count]`` and at least the forced blocks.

    Args:
        q, k: ``(B, N, H, D)``; key blocks cover ``k[:, :kv_len]``, query blocks all of q's tokens.
        forced: bool ``[Qb, Kb]``, the blocks every head keeps.
        count: blocks a row keeps (more where more are forced).
        block: tokens per block. softmax_scale: of the pooled scores (default ``D ** -0.5``).
        range_width, index_width: widths of the table forms (no row may have more runs, or kept blocks).

    Returns:
        keep bool ``[H, Qb, Kb]``; int32 ``[H, Qb, range_width]`` starts and ends of each row's runs
        (ascending, unused slots ``[0, 0)``); int32 ``[H, Qb, index_width]`` its kept blocks ascending,
        later slots repeating the last (0 for an empty row).
    """
    batch, n, heads, dim = q.shape
    if not supports(q):
        raise ValueError(f"pooled_top_k needs a head dim that is a power of two >= {BLOCK_D} and a float dtype, "
                         f"got {dim}, {q.dtype}")  # fmt: skip
    qb, kb = num_blocks(n, block), num_blocks(kv_len, block)
    if tuple(forced.shape) != (qb, kb) or forced.dtype != torch.bool:
        raise ValueError(f"forced must be bool [{qb}, {kb}], got {forced.dtype} {tuple(forced.shape)}")
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    qp, kp = pool_blocks(q, n, block), pool_blocks(k, kv_len, block)
    keep = torch.empty(heads, qb, kb, dtype=torch.int8, device=q.device)
    grid = (heads, num_blocks(qb, BLOCK_Q))
    kb_pow2 = max(16, triton.next_power_of_2(kb))
    extra = {} if q.device.type == "cpu" else {"num_warps": 8 if kb_pow2 >= 512 else 4}
    top_p = p is not None
    _keep_kernel[grid](qp, kp, forced.contiguous().view(torch.int8), keep, batch, heads, qb, kb, kv_len, scale, count,
                       float(p) if top_p else 1.0, min_count, TABLE_BLOCK=block, HEAD_DIM=dim, BLOCK_Q=BLOCK_Q,
                       BLOCK_D=BLOCK_D, KB_POW2=kb_pow2, TOP_P=top_p, **extra)  # fmt: skip
    starts = torch.empty(heads, qb, range_width, dtype=torch.int32, device=q.device)
    ends, indices = torch.empty_like(starts), torch.empty(heads, qb, index_width, dtype=torch.int32, device=q.device)
    _table_kernel[grid](keep, starts, ends, indices, qb, kb, range_width, index_width, BLOCK_Q=BLOCK_Q,
                        KB_POW2=kb_pow2, WIDTH_POW2=triton.next_power_of_2(range_width),
                        INDEX_POW2=triton.next_power_of_2(index_width), **extra)  # fmt: skip
    return keep.view(torch.bool), starts, ends, indices


__all__ = ["pool_blocks", "pooled_top_k", "supports"]
