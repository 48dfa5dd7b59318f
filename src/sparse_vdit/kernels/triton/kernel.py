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
def block_sparse_attention_fwd(
    Q, K, V, O,  # [B, N, H, D]; last dim contiguous
    STARTS, ENDS,  # int32 [H, Qb, R]: visited key blocks as ranges [start, end), ascending
    SCHEDULE,  # int32 [H * Qb * TILES_PER_BLOCK]: work items, heaviest first
    TOKEN_MAJOR,  # int8 [H]: heads whose table is in token-major order
    stride_qb, stride_qn, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_on, stride_oh,
    stride_rh, stride_rm,
    N, KV_LEN, NUM_Q_TILES, NUM_RANGES,
    FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    qk_scale,  # softmax_scale * log2(e)
    TABLE_BLOCK: tl.constexpr,  # block size of the table (tokens)
    BLOCK_M: tl.constexpr,  # query tile; divides TABLE_BLOCK
    BLOCK_N: tl.constexpr,  # key tile; divides TABLE_BLOCK
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,  # exact fp32 dots (no tf32) for float32 inputs
    ANY_TOKEN_MAJOR: tl.constexpr,  # some head reads its rows through the token-major order
):  # fmt: skip
    item = tl.load(SCHEDULE + tl.program_id(0))
    head = item // NUM_Q_TILES
    tile = item % NUM_Q_TILES
    batch = tl.program_id(1)
    row = tile * BLOCK_M // TABLE_BLOCK  # the table's query block holding this tile

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # positions in the head's own order
    offs_d = tl.arange(0, HEAD_DIM)
    rows_m = offs_m
    token_major = False
    if ANY_TOKEN_MAJOR:
        token_major = tl.load(TOKEN_MAJOR + head) != 0
        rows_m = sequence_rows(offs_m, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    q_ptrs = Q + batch * stride_qb + head * stride_qh + rows_m[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=offs_m[:, None] < N, other=0.0)  # [BLOCK_M, D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    ranges = head * stride_rh + row * stride_rm
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh
    for r in range(0, NUM_RANGES):
        # a range of key blocks is a contiguous run of keys: no index list to read
        first = tl.load(STARTS + ranges + r) * TABLE_BLOCK
        last = tl.load(ENDS + ranges + r) * TABLE_BLOCK
        for start in range(first, last, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            valid = offs_n < KV_LEN
            rows_n = offs_n
            if ANY_TOKEN_MAJOR:
                rows_n = sequence_rows(offs_n, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
            k = tl.load(k_base + rows_n[None, :] * stride_kn + offs_d[:, None], mask=valid[None, :], other=0.0)
            if IEEE:
                qk = tl.dot(q, k, input_precision="ieee")
            else:
                qk = tl.dot(q, k)
            qk = tl.where(valid[None, :], qk * qk_scale, float("-inf"))  # [BLOCK_M, BLOCK_N]
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with no valid key
            p = tl.math.exp2(qk - m_safe[:, None])
            alpha = tl.math.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + rows_n[:, None] * stride_vn + offs_d[None, :], mask=valid[:, None], other=0.0)
            if IEEE:
                pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that visit nothing stay 0
    o_ptrs = O + batch * stride_ob + head * stride_oh + rows_m[:, None] * stride_on + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=offs_m[:, None] < N)
