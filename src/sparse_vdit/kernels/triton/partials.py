"""Per-key-block attention partials of sampled query rows (the offline search's probe) in Triton.

For each sampled row and key block ``j`` (``block`` keys, in frame-major or any given key order):
the block's score maximum ``m``, ``z = sum exp(s - m)`` and ``a = sum exp(s - m) v``. Any
block-sparse candidate's output on those rows is then a masked combination of the partials
(:mod:`sparse_vdit.methods.estimate`). One program per (row tile, batch x head, key block): the
scores never reach memory, where the torch path writes a ``rows x keys`` score matrix per head
and reads it several times. The torch reference is ``sparse_vdit.methods.estimate._partials``.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from ...block_table import is_power_of_two, num_blocks
from .kernel import dot
from .launcher import LOG2E


@triton.jit
def block_partials_fwd(
    QR, K, V, ORDER,  # QR [B, R, H, D]; K, V [B, N, H, D] (last dims contiguous); ORDER int32 [KV] or unused
    A, Z, M,  # A float32 [B, H, R, KB, D]; Z, M float32 [B, H, R, KB] (contiguous)
    stride_qb, stride_qr, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    NUM_ROWS, HEADS, KV_LEN, NUM_KB,
    qk_scale,  # softmax_scale * log2(e)
    BLOCK: tl.constexpr,  # keys per key block
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    GATHER: tl.constexpr,  # key t of the order sits at sequence position ORDER[t]
    IEEE: tl.constexpr,
):  # fmt: skip
    tile, bh, kb = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS  # batch * stride can pass 2^31
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_t = kb * BLOCK + tl.arange(0, BLOCK)
    row_ok = offs_m < NUM_ROWS
    valid = offs_t < KV_LEN
    pos = tl.load(ORDER + offs_t, mask=valid, other=0) if GATHER else offs_t
    q = tl.load(QR + batch * stride_qb + head * stride_qh + offs_m[:, None] * stride_qr + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)  # fmt: skip
    k = tl.load(K + batch * stride_kb + head * stride_kh + pos[None, :] * stride_kn + offs_d[:, None],
                mask=valid[None, :], other=0.0)  # fmt: skip
    s = dot(q, k, None, IEEE)
    s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
    m = tl.max(s, 1)  # every key block holds at least one real key
    e = tl.math.exp2(s - m[:, None])
    z = tl.sum(e, 1)
    v = tl.load(V + batch * stride_vb + head * stride_vh + pos[:, None] * stride_vn + offs_d[None, :],
                mask=valid[:, None], other=0.0).to(tl.float32)  # fmt: skip
    a = dot(e, v, None, IEEE)  # without IEEE TensorFloat-32, as the torch probe's matmuls on CUDA
    cell = (bh * NUM_ROWS + offs_m) * NUM_KB + kb  # [BLOCK_M] index into [B, H, R, KB]
    tl.store(Z + cell, z, mask=row_ok)
    tl.store(M + cell, m / 1.4426950408889634, mask=row_ok)  # back to natural-log (score) units
    tl.store(A + cell[:, None] * HEAD_DIM + offs_d[None, :], a, mask=row_ok[:, None])


DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def supports(block: int, head_dim: int, dtype: torch.dtype) -> bool:
    """Whether the kernel takes this key block, head size (powers of two, at least 16) and dtype."""
    return dtype in DTYPES and all(x >= 16 and is_power_of_two(x) for x in (block, head_dim))


def block_partials(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_len: int,
    block: int,
    softmax_scale: float,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials ``(a, z, m)`` of ``q_rows`` ``[B, R, H, D]`` against the first ``kv_len`` keys of ``k, v``.

    Keys are taken in sequence order, or in ``order`` (the sequence position of each key of the
    order, ``[kv_len]``) when given; key block ``j`` holds keys ``j*block .. (j+1)*block - 1`` of
    that order (the last may be ragged). Returns ``a`` float32 ``[B, H, R, KB, D]`` and ``z``,
    ``m`` float32 ``[B, H, R, KB]``, as ``estimate._partials`` does.
    """
    batch, rows, heads, dim = q_rows.shape
    if not supports(block, dim, q_rows.dtype):
        raise ValueError(f"block_partials needs power-of-two block and head_dim >= 16 and a dtype of {DTYPES}, "
                         f"got {block}, {dim} and {q_rows.dtype}")  # fmt: skip
    if order is not None and order.shape != (kv_len,):
        raise ValueError(f"order must be [kv_len] = [{kv_len}], got {tuple(order.shape)}")
    q_rows, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q_rows, k, v))
    kb = num_blocks(kv_len, block)
    dev = q_rows.device
    a = torch.empty(batch, heads, rows, kb, dim, dtype=torch.float32, device=dev)
    z = torch.empty(batch, heads, rows, kb, dtype=torch.float32, device=dev)
    m = torch.empty(batch, heads, rows, kb, dtype=torch.float32, device=dev)
    order_arg = order.to(device=dev, dtype=torch.int32).contiguous() if order is not None else z
    block_m = 64 if dim <= 64 or block <= 64 else 32
    block_m = min(block_m, max(16, triton.next_power_of_2(rows)))
    extra = {} if dev.type == "cpu" else {"num_warps": 8 if block * dim >= 128 * 128 else 4, "num_stages": 1}
    block_partials_fwd[(triton.cdiv(rows, block_m), batch * heads, kb)](
        q_rows, k, v, order_arg, a, z, m,
        q_rows.stride(0), q_rows.stride(1), q_rows.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        rows, heads, kv_len, kb,
        softmax_scale * LOG2E,
        BLOCK=block, BLOCK_M=block_m, HEAD_DIM=dim, GATHER=order is not None,
        IEEE=q_rows.dtype == torch.float32 and dev.type == "cpu",
        **extra,
    )  # fmt: skip
    return a, z, m
