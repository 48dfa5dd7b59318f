"""One pass that applies a rotary embedding and puts each head in its own token order (or back).

The fixed cost of token-major heads is the permutation of q, k, v before attention and of the
output after it. On a real model the rotary embedding is applied to q and k right before
attention, so the permutation rides on that pass: :func:`rotary_order` reads q and k once, rotates
them, and writes every token-major head in token-major order (v in a second launch, permuted
only). With ``to_head_order=False`` and no rotary it is the inverse (an output back to frame-major).
The torch reference is :func:`sparse_vdit.kernels.head_order.reference_head_order`.

Launch options (:data:`OPTIONS`, None: :data:`DEFAULTS`), set by benchmarks and tests, the defaults
as measured before issue 21's sweep: ``block`` tokens per program, ``warps``, ``heads_fastest``
(programs ordered head by head within a token tile, so those running at once share the rotary
table's rows and read q/k rows that lie side by side in memory), ``split_pairs`` (channel pairs
split in registers instead of a second load of each channel's partner; head dims that are powers of two).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import rotate_pairs as _rotate_split
from .kernel import sequence_rows


@triton.jit
def _rotate(x, xp, COS, SIN, rows, inside, stride_c, offs_d, ok, WAN_PAIRS: tl.constexpr, F64: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` for interleaved channel pairs (``xp``: each channel's partner)."""
    cmask = ok & inside[:, None]
    crow = tl.where(inside, rows, 0).to(tl.int64)[:, None] * stride_c
    if WAN_PAIRS:  # Wan: cos of the pair's even channel, sin of its odd one
        cd = offs_d - offs_d % 2
        sd = offs_d | 1
    else:  # diffusers apply_rotary_emb (use_real_unbind_dim=-1): each channel its own cos / sin
        cd = offs_d
        sd = offs_d
    c = tl.load(COS + crow + cd[None, :], mask=cmask, other=1.0)
    s = tl.load(SIN + crow + sd[None, :], mask=cmask, other=0.0)
    if F64:
        c, s, x, xp = c.to(tl.float64), s.to(tl.float64), x.to(tl.float64), xp.to(tl.float64)
    else:
        c, s, x, xp = c.to(tl.float32), s.to(tl.float32), x.to(tl.float32), xp.to(tl.float32)
    sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)[None, :]
    return x * c + (sign * xp) * s


@triton.jit
def rotary_order_fwd(
    X, Y, X2, Y2,  # [B, N, H, D], last dim contiguous; X2 / Y2 with PAIR (k beside q, same rotary)
    COS, SIN,  # [R, D] rows of the sequence from ROT_START on (float32 or float64); with ROTARY
    TOKEN_MAJOR,  # int8 [H]: heads to put in token-major order; with ANY_TOKEN_MAJOR
    stride_xb, stride_xn, stride_xh, stride_yb, stride_yn, stride_yh,
    stride_x2b, stride_x2n, stride_x2h, stride_y2b, stride_y2n, stride_y2h,
    stride_c,
    N, HEADS, ROT_START, ROT_END, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    FRAMES: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROTARY: tl.constexpr, WAN_PAIRS: tl.constexpr, F64: tl.constexpr, PAIR: tl.constexpr,
    ANY_TOKEN_MAJOR: tl.constexpr,
    TO_HEAD_ORDER: tl.constexpr,  # Y[own position] = rotary(X[row]); else Y[row] = X[own position]
    HEADS_FASTEST: tl.constexpr,  # grid (batch * heads, tiles): a token tile's heads run side by side
    SPLIT_PAIRS: tl.constexpr,  # channel pairs split in registers (BLOCK_D == HEAD_DIM), no partner load
):  # fmt: skip
    if HEADS_FASTEST:
        bh = tl.program_id(0)
        tile = tl.program_id(1)
    else:
        tile = tl.program_id(0)
        bh = tl.program_id(1)
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS  # batch * stride can pass 2^31
    pos = tile * BLOCK + tl.arange(0, BLOCK)  # positions in the head's own order
    rows = pos
    if ANY_TOKEN_MAJOR:
        token_major = tl.load(TOKEN_MAJOR + head) != 0
        rows = sequence_rows(pos, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    src, dst = (rows, pos) if TO_HEAD_ORDER else (pos, rows)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (pos < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    src64, dst64 = src.to(tl.int64)[:, None], dst.to(tl.int64)[:, None]
    x_base = X + batch * stride_xb + head * stride_xh + src64 * stride_xn
    x = tl.load(x_base + offs_d[None, :], mask=ok)
    if ROTARY:  # the table is indexed by the memory (sequence) row
        inside = (rows >= ROT_START) & (rows < ROT_END)
        partner = offs_d ^ 1
        if SPLIT_PAIRS:
            y = _rotate_split(x, COS, SIN, rows - ROT_START, inside, stride_c, offs_d, ok, BLOCK, BLOCK_D, WAN_PAIRS, F64)
        else:
            xp = tl.load(x_base + partner[None, :], mask=ok)
            y = _rotate(x, xp, COS, SIN, rows - ROT_START, inside, stride_c, offs_d, ok, WAN_PAIRS, F64)
        tl.store(Y + batch * stride_yb + head * stride_yh + dst64 * stride_yn + offs_d[None, :], y.to(Y.dtype.element_ty), mask=ok)
        if PAIR:
            x2_base = X2 + batch * stride_x2b + head * stride_x2h + src64 * stride_x2n
            x2 = tl.load(x2_base + offs_d[None, :], mask=ok)
            if SPLIT_PAIRS:
                y2 = _rotate_split(x2, COS, SIN, rows - ROT_START, inside, stride_c, offs_d, ok, BLOCK, BLOCK_D,
                                   WAN_PAIRS, F64)  # fmt: skip
            else:
                x2p = tl.load(x2_base + partner[None, :], mask=ok)
                y2 = _rotate(x2, x2p, COS, SIN, rows - ROT_START, inside, stride_c, offs_d, ok, WAN_PAIRS, F64)
            tl.store(Y2 + batch * stride_y2b + head * stride_y2h + dst64 * stride_y2n + offs_d[None, :],
                     y2.to(Y2.dtype.element_ty), mask=ok)  # fmt: skip
    else:
        tl.store(Y + batch * stride_yb + head * stride_yh + dst64 * stride_yn + offs_d[None, :], x, mask=ok)
        if PAIR:
            x2 = tl.load(X2 + batch * stride_x2b + head * stride_x2h + src64 * stride_x2n + offs_d[None, :], mask=ok)
            tl.store(Y2 + batch * stride_y2b + head * stride_y2h + dst64 * stride_y2n + offs_d[None, :], x2, mask=ok)


OPTIONS: dict[str, int | bool | None] = {"block": None, "warps": None, "heads_fastest": None, "split_pairs": None}
DEFAULTS: dict[str, int | bool] = {"block": 64, "warps": 4, "heads_fastest": False, "split_pairs": False}


def option(name: str):
    """The launch option ``name`` in force: ``OPTIONS`` where set, else ``DEFAULTS``."""
    return DEFAULTS[name] if OPTIONS[name] is None else OPTIONS[name]


def rotary_order(
    x: torch.Tensor,
    token_major: torch.Tensor | None,
    geometry: tuple[int, int, int, int],
    rotary=None,
    second: torch.Tensor | None = None,
    to_head_order: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (and ``second``) [B, N, H, D] rotated by ``rotary`` and with each head in its own order.

    ``token_major``: int8 [H] on x's device, the heads to put in token-major order (None: none);
    ``geometry`` = (frames, frame tokens, video start, video tokens); ``rotary``: a
    :class:`~sparse_vdit.kernels.head_order.Rotary` or None. ``to_head_order=False`` (no rotary):
    the inverse, from each head's own order back to frame-major rows. Returns new tensors.
    """
    batch, n, heads, dim = x.shape
    pair = second is not None
    tensors = (x, second) if pair else (x,)
    if any(t.stride(-1) != 1 for t in tensors):
        tensors = tuple(t.contiguous() for t in tensors)
    outs = tuple(torch.empty(batch, n, heads, dim, dtype=t.dtype, device=t.device) for t in tensors)
    x2, y2 = (tensors[1], outs[1]) if pair else (tensors[0], outs[0])
    if rotary is not None and not to_head_order:
        raise ValueError("the rotary embedding is applied on the way in (to_head_order=True)")
    cos, sin = (rotary.cos, rotary.sin) if rotary is not None else (x, x)
    start, end = (rotary.start, rotary.start + rotary.cos.shape[0]) if rotary is not None else (0, 0)
    flags = token_major if token_major is not None else x  # any pointer when unused
    extra = {} if x.device.type == "cpu" else {"num_warps": int(option("warps"))}
    block, block_d = int(option("block")), triton.next_power_of_2(dim)
    heads_fastest = bool(option("heads_fastest"))
    split = bool(option("split_pairs")) and block_d == dim and rotary is not None
    tiles = triton.cdiv(n, block)
    grid = (batch * heads, tiles) if heads_fastest else (tiles, batch * heads)
    rotary_order_fwd[grid](
        tensors[0], outs[0], x2, y2, cos, sin, flags,
        *tensors[0].stride()[:3], *outs[0].stride()[:3], *x2.stride()[:3], *y2.stride()[:3],
        cos.stride(0) if rotary is not None else 0,
        n, heads, start, end, geometry[1], geometry[2], geometry[3],
        FRAMES=geometry[0], BLOCK=block, HEAD_DIM=dim, BLOCK_D=block_d,
        ROTARY=rotary is not None, WAN_PAIRS=rotary is not None and rotary.pairs == "wan",
        F64=rotary is not None and rotary.cos.dtype == torch.float64, PAIR=pair,
        ANY_TOKEN_MAJOR=token_major is not None, TO_HEAD_ORDER=to_head_order,
        HEADS_FASTEST=heads_fastest, SPLIT_PAIRS=split, **extra,
    )  # fmt: skip
    return outs[0], (outs[1] if pair else None)
