"""Block-sparse FlashAttention-style forward in Triton, reading our block tables."""

import triton
import triton.language as tl


@triton.jit
def sequence_rows(pos, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS):
    """Row in memory (frame-major) of position ``pos`` of a head's own order.

    A token-major head's video position ``j = p * F + f`` lives at row ``f * S + p``; text and
    frame-major heads map to themselves. This reads token-major heads without permuting q/k/v.
    """
    j = pos - VIDEO_START
    moved = (j >= 0) & (j < VIDEO_TOKENS) & token_major
    return tl.where(moved, VIDEO_START + (j % FRAMES) * FRAME_TOKENS + j // FRAMES, pos)


@triton.jit
def dot(a, b, acc, IEEE: tl.constexpr):
    """``a @ b``, added to ``acc`` unless it is None: with ``IEEE`` exact float32 products (float32 inputs, as
    the torch reference computes them), else the tensor cores' own precision (TF32 for float32)."""
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key tile: q [BLOCK_M, D] against k [D, BLOCK_N] and v [BLOCK_N, D]; returns (m, l, acc).

    ``MASKED``: ``valid`` [BLOCK_N] marks the keys that exist (the ragged last tile); the tile
    always holds one at least, so the running max stays finite after it.
    """
    qk = dot(q, k, None, IEEE)
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = dot(p.to(v.dtype), v, acc, IEEE)
    return m_new, l_i, acc


@triton.jit
def whole_key_tile(
    start, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
    FRAMES: tl.constexpr, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr,
):  # fmt: skip
    """The whole key tile at ``start`` of the head's own order: (k [D, BLOCK_N], v [BLOCK_N, D]), unmasked."""
    if TMA:
        k = K_DESC.load([batch, start, head, 0]).reshape(BLOCK_N, HEAD_DIM).T
        v = V_DESC.load([batch, start, head, 0]).reshape(BLOCK_N, HEAD_DIM)
    else:
        offs_d = tl.arange(0, HEAD_DIM)
        rows_n = start + tl.arange(0, BLOCK_N)
        if TOKEN_MAJOR:
            rows_n = sequence_rows(rows_n, True, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
        k = tl.load(k_base + rows_n[None, :] * stride_kn + offs_d[:, None])
        v = tl.load(v_base + rows_n[:, None] * stride_vn + offs_d[None, :])
    return k, v


@triton.jit
def ragged_key_tile(
    q, m_i, l_i, acc, first, last, k_base, v_base, stride_kn, stride_vn, qk_scale,
    FRAMES: tl.constexpr, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr, TOKEN_MAJOR: tl.constexpr,
):  # fmt: skip
    """Keys ``[first, last)`` (fewer than ``BLOCK_N``, at least one) into (m, l, acc), masked."""
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = first + tl.arange(0, BLOCK_N)
    valid = offs_n < last
    rows_n = offs_n
    if TOKEN_MAJOR:
        rows_n = sequence_rows(offs_n, True, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    k = tl.load(k_base + rows_n[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0.0)
    v = tl.load(v_base + rows_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
    return online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, True, IEEE)


@triton.jit
def key_range(
    q, m_i, l_i, acc, first, last, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, qk_scale,
    FRAMES: tl.constexpr, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """Keys ``[first, last)`` of the head's own order into (m, l, acc): whole tiles unmasked, then the
    ragged one. ``TOKEN_MAJOR``: positions are token-major, rows are read through the permutation."""
    full = first + tl.maximum(last - first, 0) // BLOCK_N * BLOCK_N  # end of the whole key tiles
    for start in tl.range(first, full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k, v = whole_key_tile(start, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, FRAMES,
                              FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, TOKEN_MAJOR, TMA)  # fmt: skip
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, start, False, IEEE)
    if full < last:
        m_i, l_i, acc = ragged_key_tile(q, m_i, l_i, acc, full, last, k_base, v_base, stride_kn, stride_vn, qk_scale,
                                        FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, IEEE,
                                        TOKEN_MAJOR)  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def key_list(
    q, m_i, l_i, acc, blocks, count, KV_LEN, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, qk_scale,
    FRAMES: tl.constexpr, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, TABLE_BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """The ``count`` key blocks listed (ascending) at ``blocks`` into (m, l, acc): all their whole key
    tiles in one loop (tile ``i`` is tile ``i % tiles per block`` of block ``blocks[i // tiles per
    block]``), so the pipeliner prefetches across blocks; then the ragged tile of the last key block,
    which only the list's last entry can be."""
    last_block = tl.load(blocks + tl.maximum(count - 1, 0)) * TABLE_BLOCK  # first key of the last listed block
    whole_last = tl.minimum(tl.maximum(KV_LEN - last_block, 0) // BLOCK_N, TABLE_BLOCK // BLOCK_N)
    tiles = tl.where(count > 0, (count - 1) * (TABLE_BLOCK // BLOCK_N) + whole_last, 0)
    for i in tl.range(0, tiles, warp_specialize=WARP_SPECIALIZE):
        start = tl.load(blocks + i // (TABLE_BLOCK // BLOCK_N)) * TABLE_BLOCK + i % (TABLE_BLOCK // BLOCK_N) * BLOCK_N
        k, v = whole_key_tile(start, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, FRAMES,
                              FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, TOKEN_MAJOR, TMA)  # fmt: skip
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, start, False, IEEE)
    first = last_block + whole_last * BLOCK_N
    last = tl.minimum(last_block + TABLE_BLOCK, KV_LEN)
    if (count > 0) & (first < last):
        m_i, l_i, acc = ragged_key_tile(q, m_i, l_i, acc, first, last, k_base, v_base, stride_kn, stride_vn, qk_scale,
                                        FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, IEEE,
                                        TOKEN_MAJOR)  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def head_keys(
    q, m_i, l_i, acc, STARTS, ENDS, ranges, NUM_RANGES, blocks, count, KV_LEN, batch, head, k_base, v_base,
    stride_kn, stride_vn, K_DESC, V_DESC, qk_scale, FRAMES: tl.constexpr, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    TABLE_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr, BLOCK_LIST: tl.constexpr,
):  # fmt: skip
    """Every key a query tile visits into (m, l, acc): the list of blocks (``BLOCK_LIST``), else range by range."""
    if BLOCK_LIST:
        m_i, l_i, acc = key_list(
            q, m_i, l_i, acc, blocks, count, KV_LEN, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
            qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE,
            TOKEN_MAJOR, TMA, WARP_SPECIALIZE)  # fmt: skip
    else:
        for r in range(0, NUM_RANGES):
            # a range of key blocks is a contiguous run of keys (in the head's order): no index list to read
            first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
            last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, KV_LEN)
            m_i, l_i, acc = key_range(
                q, m_i, l_i, acc, first, last, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, IEEE,
                TOKEN_MAJOR, TMA, WARP_SPECIALIZE)  # fmt: skip
    return m_i, l_i, acc


@triton.jit
def block_sparse_attention_fwd(
    Q, K, V, O,  # [B, N, H, D]; last dim contiguous
    K_DESC, V_DESC,  # with TMA: tensor descriptors of K and V, blocks [1, BLOCK_N, 1, D]; else unused
    STARTS, ENDS,  # int32 [H, Qb, R]: visited key blocks as ranges [start, end), ascending
    SCHEDULE,  # int32 [H * Qb * TILES_PER_BLOCK]: work items, heaviest first
    TOKEN_MAJOR,  # int8 [H] (or [M] with SELECT): heads (candidates) whose table is in token-major order
    SELECTED,  # with SELECT: int32 [B, H], the candidate table of each (sample, head); else unused
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_rh, stride_rm, stride_sb,
    N, KV_LEN, NUM_Q_TILES, NUM_RANGES,
    FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale,  # softmax_scale * log2(e)
    LSE, stride_lb,  # with STORE_LSE: float32 [B, H, N] log-sum-exp by memory row (for the backward); else unused
    COUNTS, BLOCKS,  # with BLOCK_LIST: int32 [H, Qb] visited key blocks and int32 [H, Qb, W] their ascending list
    stride_ch, stride_bh, stride_bm,  # (candidates [M, ...] with SELECT); else unused
    FRAMES: tl.constexpr,  # a constant, so the token-major index arithmetic divides by a constant
    TABLE_BLOCK: tl.constexpr,  # block size of the table (tokens)
    BLOCK_M: tl.constexpr,  # query tile; divides TABLE_BLOCK
    BLOCK_N: tl.constexpr,  # key tile; divides TABLE_BLOCK
    HEAD_DIM: tl.constexpr,
    STORE_LSE: tl.constexpr,  # write each row's natural-log log-sum-exp to LSE (+inf where it visits nothing)
    IEEE: tl.constexpr,  # exact fp32 dots (no tf32) for float32 inputs
    ANY_TOKEN_MAJOR: tl.constexpr,  # some head reads its rows through the token-major order
    TMA: tl.constexpr,  # frame-major heads read whole key tiles through K_DESC / V_DESC
    WARP_SPECIALIZE: tl.constexpr,  # the whole-tile loop warp-specialised (Triton's tl.range option)
    SELECT: tl.constexpr,  # STARTS / ENDS / TOKEN_MAJOR hold candidates, SELECTED picks one per (sample, head)
    HEAD_ORDER: tl.constexpr,  # q, k, v hold each head in its own order (token-major heads permuted); O frame-major
    BLOCK_LIST: tl.constexpr,  # walk COUNTS / BLOCKS in one loop over key tiles, not STARTS / ENDS range by range
):  # fmt: skip
    item = tl.load(SCHEDULE + tl.program_id(0))
    head = item // NUM_Q_TILES
    tile = item % NUM_Q_TILES
    batch = tl.program_id(1)  # int32: a TMA coordinate
    offset_b = batch.to(tl.int64)  # batch * stride passes 2^31 at real sizes (Wan-14B 720p, batch 7)
    row = tile * BLOCK_M // TABLE_BLOCK  # the table's query block holding this tile
    entry = head  # the table row of this head
    if SELECT:  # decided on the device (SVG): no host round trip
        entry = tl.load(SELECTED + batch * stride_sb + head)

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the head's own order
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = offs_m
    token_major = False
    if ANY_TOKEN_MAJOR:
        token_major = tl.load(TOKEN_MAJOR + entry) != 0
        rows_m = sequence_rows(offs_m, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    load_m = offs_m if HEAD_ORDER else rows_m  # rows of q to read; the output goes to rows_m
    q_ptrs = Q + offset_b * stride_qb + head * stride_qh + load_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    ranges = entry * stride_rh + row * stride_rm
    k_base = K + offset_b * stride_kb + head * stride_kh
    v_base = V + offset_b * stride_vb + head * stride_vh
    count = 0
    blocks = BLOCKS
    if BLOCK_LIST:  # the visited key blocks as one ascending list
        count = tl.load(COUNTS + entry * stride_ch + row)
        blocks = BLOCKS + entry * stride_bh + row * stride_bm
    if HEAD_ORDER:  # every head is contiguous in its own order: whole key tiles through TMA
        m_i, l_i, acc = head_keys(
            q, m_i, l_i, acc, STARTS, ENDS, ranges, NUM_RANGES, blocks, count, KV_LEN, batch, head, k_base, v_base,
            stride_kn, stride_vn, K_DESC, V_DESC, qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
            TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, False, TMA, WARP_SPECIALIZE, BLOCK_LIST)  # fmt: skip
    elif token_major:  # one loop per kind of head, each compiled for its own loads
        m_i, l_i, acc = head_keys(
            q, m_i, l_i, acc, STARTS, ENDS, ranges, NUM_RANGES, blocks, count, KV_LEN, batch, head, k_base, v_base,
            stride_kn, stride_vn, K_DESC, V_DESC, qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
            TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, True, False, WARP_SPECIALIZE, BLOCK_LIST)  # fmt: skip
    else:
        m_i, l_i, acc = head_keys(
            q, m_i, l_i, acc, STARTS, ENDS, ranges, NUM_RANGES, blocks, count, KV_LEN, batch, head, k_base, v_base,
            stride_kn, stride_vn, K_DESC, V_DESC, qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
            TABLE_BLOCK, BLOCK_N, HEAD_DIM, IEEE, False, TMA, WARP_SPECIALIZE, BLOCK_LIST)  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that visit nothing stay 0
    o_ptrs = O + offset_b * stride_ob + head * stride_oh + rows_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(LSE + offset_b * stride_lb + head * N + rows_m, lse, mask=offs_m < N)
