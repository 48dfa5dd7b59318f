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
def online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, MASKED: tl.constexpr, IEEE: tl.constexpr):
    """One key tile: q [BLOCK_M, D] against k [D, BLOCK_N] and v [BLOCK_N, D]; returns (m, l, acc).

    ``MASKED``: ``valid`` [BLOCK_N] marks the keys that exist (the ragged last tile); the tile
    always holds one at least, so the running max stays finite after it.
    """
    if IEEE:
        qk = tl.dot(q, k, input_precision="ieee")
    else:
        qk = tl.dot(q, k)
    if MASKED:
        qk = tl.where(valid[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.math.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return m_new, l_i, acc


@triton.jit
def key_range(
    q, m_i, l_i, acc, first, last, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC, qk_scale,
    FRAMES: tl.constexpr, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, IEEE: tl.constexpr,
    TOKEN_MAJOR: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):  # fmt: skip
    """Keys ``[first, last)`` of the head's own order into (m, l, acc): whole tiles unmasked, then the
    ragged one. ``TOKEN_MAJOR``: positions are token-major, rows are read through the permutation."""
    offs_t = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    full = first + tl.maximum(last - first, 0) // BLOCK_N * BLOCK_N  # end of the whole key tiles
    for start in tl.range(first, full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        if TMA:
            k = K_DESC.load([batch, start, head, 0]).reshape(BLOCK_N, HEAD_DIM).T  # [D, BLOCK_N]
            v = V_DESC.load([batch, start, head, 0]).reshape(BLOCK_N, HEAD_DIM)
        else:
            rows_n = start + offs_t
            if TOKEN_MAJOR:
                rows_n = sequence_rows(rows_n, True, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
            k = tl.load(k_base + rows_n[None, :] * stride_kn + offs_d[:, None])  # [D, BLOCK_N]
            v = tl.load(v_base + rows_n[:, None] * stride_vn + offs_d[None, :])  # [BLOCK_N, D]
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, offs_t, False, IEEE)
    if full < last:
        offs_n = full + offs_t
        valid = offs_n < last
        rows_n = offs_n
        if TOKEN_MAJOR:
            rows_n = sequence_rows(offs_n, True, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
        k = tl.load(k_base + rows_n[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0.0)
        v = tl.load(v_base + rows_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
        m_i, l_i, acc = online_softmax_step(q, k, v, m_i, l_i, acc, qk_scale, valid, True, IEEE)
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
    for r in range(0, NUM_RANGES):
        # a range of key blocks is a contiguous run of keys (in the head's order): no index list to read
        first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
        last = tl.minimum(tl.load(ENDS + ranges + r) * TABLE_BLOCK, KV_LEN)
        if HEAD_ORDER:  # every head is contiguous in its own order: whole key tiles through TMA
            m_i, l_i, acc = key_range(
                q, m_i, l_i, acc, first, last, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, IEEE,
                False, TMA, WARP_SPECIALIZE)  # fmt: skip
        elif token_major:  # one loop per kind of head, each compiled for its own loads
            m_i, l_i, acc = key_range(
                q, m_i, l_i, acc, first, last, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, IEEE,
                True, False, WARP_SPECIALIZE)  # fmt: skip
        else:
            m_i, l_i, acc = key_range(
                q, m_i, l_i, acc, first, last, batch, head, k_base, v_base, stride_kn, stride_vn, K_DESC, V_DESC,
                qk_scale, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS, BLOCK_N, HEAD_DIM, IEEE,
                False, TMA, WARP_SPECIALIZE)  # fmt: skip

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that visit nothing stay 0
    o_ptrs = O + offset_b * stride_ob + head * stride_oh + rows_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("inf"), (m_i + tl.math.log2(l_i)) * 0.6931471805599453)
        tl.store(LSE + offset_b * stride_lb + head * N + rows_m, lse, mask=offs_m < N)
