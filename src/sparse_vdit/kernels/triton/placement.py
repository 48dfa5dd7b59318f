"""Per-(sample, head) token order chosen on the device: put heads in their own order and back.

For backends that read tables in a head's own order from memory (FlashAttention-4), the heads
whose chosen candidate is token-major are permuted frame-major -> token-major before attention
and back after, reading the choice in the kernel (one launch per tensor, every head copied once;
no host sync). The torch reference is :func:`sparse_vdit.kernels.api.reorder_heads` per sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import sequence_rows


@triton.jit
def head_order_fwd(
    X, Y,  # [B, N, H, D], last dim contiguous
    SELECTED,  # int32 [B, H]: the candidate of each (sample, head)
    TOKEN_MAJOR,  # int8 [M]: whether candidate m is token-major
    stride_xb, stride_xn, stride_xh,
    stride_yb, stride_yn, stride_yh,
    stride_sb,
    N, HEADS, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    FRAMES: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    TO_HEAD_ORDER: tl.constexpr,  # Y[own position] = X[row]; else Y[row] = X[own position]
):  # fmt: skip
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS  # batch * stride can pass 2^31
    token_major = tl.load(TOKEN_MAJOR + tl.load(SELECTED + batch * stride_sb + head)) != 0
    pos = tile * BLOCK + tl.arange(0, BLOCK)  # positions in the head's own order
    rows = sequence_rows(pos, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (pos < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src, dst = (rows, pos) if TO_HEAD_ORDER else (pos, rows)
    x = tl.load(X + batch * stride_xb + head * stride_xh + src[:, None] * stride_xn + offs_d[None, :], mask=ok)
    tl.store(Y + batch * stride_yb + head * stride_yh + dst[:, None] * stride_yn + offs_d[None, :], x, mask=ok)


def head_order(
    x: torch.Tensor,
    selected: torch.Tensor,
    token_major: torch.Tensor,
    layout: tuple[int, int, int, int],
    to_head_order: bool = True,
) -> torch.Tensor:
    """``x`` [B, N, H, D] with the video tokens of each (sample, head) whose candidate
    ``selected[b, h]`` is token-major (``token_major[m]``) in token-major order (or back);
    ``layout`` = (frames, frame tokens, video start, video tokens)."""
    batch, n, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(batch, n, heads, dim, dtype=x.dtype, device=x.device)
    block = 64
    flags = token_major.to(device=x.device, dtype=torch.int8)
    extra = {} if x.device.type == "cpu" else {"num_warps": 4}
    head_order_fwd[(triton.cdiv(n, block), batch * heads)](
        x, out, selected, flags,
        x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1), out.stride(2), selected.stride(0),
        n, heads, layout[1], layout[2], layout[3],
        FRAMES=layout[0], BLOCK=block, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
        TO_HEAD_ORDER=to_head_order, **extra,
    )  # fmt: skip
    return out
