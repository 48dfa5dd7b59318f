"""One pass that applies a rotary embedding and puts each head in its own token order (or back).

The fixed cost of token-major heads is the permutation of q, k, v before attention and of the
output after it. On a real model the rotary embedding is applied to q and k right before
attention, so the permutation rides on that pass: :func:`rotary_order` reads q and k once, rotates
them, and writes every token-major head in token-major order (v in a second launch, permuted
only). With ``to_head_order=False`` it goes back to frame-major (an output; with ``transpose``, the
backward of the pass: gradients rotated by the transpose).
The torch reference is :func:`sparse_vdit.kernels.head_order.reference_head_order`.

Launch: a program per (batch, head) and tile of ``block`` tokens, a token tile's heads side by side
(those running at once share the rotary table's rows and read q / k rows that lie next to each
other in memory), channel pairs split in registers (head dims that are powers of two). Issue 21's
H200 sweep chose these (BENCHMARKS.md); the grid ordered tile-first and a second load of each
channel's partner lost everywhere and were removed. :data:`OPTIONS` (None: :data:`DEFAULTS`) sets
the tokens per program and the warps, for benchmarks and tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kernel import sequence_rows


@triton.jit
def rotate_pairs(x, COS, SIN, rows, inside, stride_c, offs_d, ok, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                 WAN_PAIRS: tl.constexpr, F64: tl.constexpr, TRANSPOSE: tl.constexpr = False):  # fmt: skip
    """``x`` [BLOCK, BLOCK_D] rotated by the rotary tables' rows ``rows`` where ``inside`` (else unchanged),
    channel pairs split in registers; float32 math (float64 with ``F64``). ``BLOCK_D`` is the head dim.
    ``WAN_PAIRS``: Wan's rule (cos of a pair's even channel, sin of its odd one); else diffusers'
    ``apply_rotary_emb`` (each channel its own cos / sin). ``TRANSPOSE``: the map's transpose (its backward)."""
    cmask = ok & inside[:, None]
    crow = tl.where(inside, rows, 0).to(tl.int64)[:, None] * stride_c
    c = tl.load(COS + crow + offs_d[None, :], mask=cmask, other=1.0)
    s = tl.load(SIN + crow + offs_d[None, :], mask=cmask, other=0.0)
    if F64:
        c, s, x = c.to(tl.float64), s.to(tl.float64), x.to(tl.float64)
    else:
        c, s, x = c.to(tl.float32), s.to(tl.float32), x.to(tl.float32)
    xe, xo = tl.split(tl.reshape(x, [BLOCK, BLOCK_D // 2, 2]))
    ce, co = tl.split(tl.reshape(c, [BLOCK, BLOCK_D // 2, 2]))
    se, so = tl.split(tl.reshape(s, [BLOCK, BLOCK_D // 2, 2]))
    if WAN_PAIRS:  # Wan: cos of the pair's even channel, sin of its odd one
        if TRANSPOSE:
            so = -so
        ye = xe * ce - xo * so
        yo = xo * ce + xe * so
    elif TRANSPOSE:  # of [[ce, -se], [so, co]]
        ye = xe * ce + xo * so
        yo = xo * co - xe * se
    else:  # diffusers apply_rotary_emb (use_real_unbind_dim=-1): each channel its own cos / sin
        ye = xe * ce - xo * se
        yo = xo * co + xe * so
    return tl.reshape(tl.join(ye, yo), [BLOCK, BLOCK_D])


@triton.jit
def rotary_order_fwd(
    X, Y, X2, Y2,  # [B, N, H, D], last dim contiguous; X2 / Y2 with PAIR (k beside q, same rotary)
    COS, SIN,  # [R, D] rows of the sequence from ROT_START on (float32 or float64); with ROTARY
    TOKEN_MAJOR,  # int8 [H]: heads to put in token-major order; with ANY_TOKEN_MAJOR
    XS, X2S,  # with SIDES: [B, N, Ht, D] token-major heads' rows in their order, X2S strided as XS
    SIDE_SLOT,  # with SIDES: int32 [H], each token-major head's slot in XS (-1: frame-major, read in place)
    stride_xb, stride_xn, stride_xh, stride_yb, stride_yn, stride_yh,
    stride_x2b, stride_x2n, stride_x2h, stride_y2b, stride_y2n, stride_y2h,
    stride_sb, stride_sn, stride_sh, stride_c,
    N, HEADS, ROT_START, ROT_END, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS,
    FRAMES: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    ROTARY: tl.constexpr, WAN_PAIRS: tl.constexpr, F64: tl.constexpr, PAIR: tl.constexpr,
    ANY_TOKEN_MAJOR: tl.constexpr,
    TO_HEAD_ORDER: tl.constexpr,  # Y[own position] = rotary(X[row]); else Y[row] = rotary(X[own position])
    TRANSPOSE: tl.constexpr,  # the rotation's transpose (the pass's backward)
    SIDES: tl.constexpr,  # back to frame-major in place (Y is X): token-major heads from XS, X2S
):  # fmt: skip
    bh = tl.program_id(0)  # grid (batch * heads, tiles): a token tile's heads run side by side
    tile = tl.program_id(1)
    batch, head = (bh // HEADS).to(tl.int64), bh % HEADS  # batch * stride can pass 2^31
    pos = tile * BLOCK + tl.arange(0, BLOCK)  # positions in the head's own order
    rows = pos
    offs_d = tl.arange(0, BLOCK_D)
    ok = (pos < N)[:, None] & (offs_d < HEAD_DIM)[None, :]
    x_at = batch * stride_xb + head * stride_xh
    x2_at = batch * stride_x2b + head * stride_x2h
    if SIDES:  # a frame-major head is read where it is written: rotated in place, else left alone
        slot = tl.load(SIDE_SLOT + head)
        token_major = slot >= 0
        if not ROTARY:
            ok = ok & (pos * 0 + slot >= 0)[:, None]  # (a scalar mask term: not in the interpreter)
        rows = sequence_rows(pos, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
        X, X2 = tl.where(token_major, XS, X), tl.where(token_major, X2S, X2)
        side_at = batch * stride_sb + slot * stride_sh
        x_at, x2_at = tl.where(token_major, side_at, x_at), tl.where(token_major, side_at, x2_at)
        stride_xn = tl.where(token_major, stride_sn, stride_xn)
        stride_x2n = tl.where(token_major, stride_sn, stride_x2n)
    elif ANY_TOKEN_MAJOR:
        token_major = tl.load(TOKEN_MAJOR + head) != 0
        rows = sequence_rows(pos, token_major, FRAMES, FRAME_TOKENS, VIDEO_START, VIDEO_TOKENS)
    src, dst = (rows, pos) if TO_HEAD_ORDER else (pos, rows)
    src64, dst64 = src.to(tl.int64)[:, None], dst.to(tl.int64)[:, None]
    x = tl.load(X + x_at + src64 * stride_xn + offs_d[None, :], mask=ok)
    if PAIR:
        x2 = tl.load(X2 + x2_at + src64 * stride_x2n + offs_d[None, :], mask=ok)
    if ROTARY:  # the table is indexed by the memory (sequence) row; BLOCK_D == HEAD_DIM
        inside = (rows >= ROT_START) & (rows < ROT_END)
        x = rotate_pairs(x, COS, SIN, rows - ROT_START, inside, stride_c, offs_d, ok, BLOCK, BLOCK_D, WAN_PAIRS, F64,
                         TRANSPOSE)  # fmt: skip
        if PAIR:
            x2 = rotate_pairs(x2, COS, SIN, rows - ROT_START, inside, stride_c, offs_d, ok, BLOCK, BLOCK_D,
                              WAN_PAIRS, F64, TRANSPOSE)  # fmt: skip
    tl.store(Y + batch * stride_yb + head * stride_yh + dst64 * stride_yn + offs_d[None, :], x.to(Y.dtype.element_ty),
             mask=ok)  # fmt: skip
    if PAIR:
        tl.store(Y2 + batch * stride_y2b + head * stride_y2h + dst64 * stride_y2n + offs_d[None, :],
                 x2.to(Y2.dtype.element_ty), mask=ok)  # fmt: skip


OPTIONS: dict[str, int | None] = {"block": None, "warps": None}
# Issue 21's H200 sweep: 16 tokens a program, 4 warps, fastest or within 1% of the fastest on every
# shape with the family's tables (Wan float64, HunyuanVideo / CogVideoX float32).
DEFAULTS: dict[str, int] = {"block": 16, "warps": 4}


def option(name: str) -> int:
    """The launch option ``name`` in force: ``OPTIONS`` where set, else ``DEFAULTS``."""
    return DEFAULTS[name] if OPTIONS[name] is None else OPTIONS[name]


def supports(head_dim: int) -> bool:
    """Whether the pass can rotate heads of ``head_dim`` channels (channel pairs split in registers: a power of two)."""
    return head_dim >= 2 and not head_dim & (head_dim - 1)


def rotary_order(
    x: torch.Tensor,
    token_major: torch.Tensor | None,
    geometry: tuple[int, int, int, int],
    rotary=None,
    second: torch.Tensor | None = None,
    to_head_order: bool = True,
    transpose: bool = False,
    sides: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` (and ``second``) [B, N, H, D] rotated by ``rotary`` and with each head in its own order.

    ``token_major``: int8 [H] on x's device, the heads to put in token-major order (None: none);
    ``geometry`` = (frames, frame tokens, video start, video tokens); ``rotary``: a
    :class:`~sparse_vdit.kernels.head_order.Rotary` or None (with one, D a power of two:
    :func:`supports`). ``to_head_order=False``: from each head's own order back to frame-major rows
    (the table still indexed by the frame-major row). ``transpose``: apply the rotation's transpose, so
    ``to_head_order=False, transpose=True`` is the backward of the pass. Returns new tensors, but with
    ``sides`` = ``(slots, x_side, second_side)`` (``to_head_order=False`` only): ``x`` (and ``second``, both
    contiguous) already hold the frame-major heads, and each token-major head's rows, in its order, are at its
    slot (int32 ``slots[h]``, -1 for the others) of the contiguous ``[B, N, Ht, D]`` ``x_side`` (and
    ``second_side``); those heads are written into ``x`` in place, the others rotated there or left alone,
    and ``x`` (and ``second``) returned. ``token_major`` is then not read.
    """
    batch, n, heads, dim = x.shape
    pair = second is not None
    tensors = (x, second) if pair else (x,)
    if sides is not None:
        if to_head_order or any(not t.is_contiguous() for t in (*tensors, *sides[1 : 1 + len(tensors)])):
            raise ValueError("sides take the way back to frame-major, into contiguous tensors from contiguous sides")
        token_major = None
    elif any(t.stride(-1) != 1 for t in tensors):
        tensors = tuple(t.contiguous() for t in tensors)
    if rotary is not None and not supports(dim):
        raise ValueError(f"the fused rotary pass needs a power-of-two head dim, got {dim}")
    if sides is None:
        outs = tuple(torch.empty(batch, n, heads, dim, dtype=t.dtype, device=t.device) for t in tensors)
    else:
        outs = tensors
    x2, y2 = (tensors[1], outs[1]) if pair else (tensors[0], outs[0])
    slots, xs, x2s = (x, x, x) if sides is None else (sides[0], sides[1], sides[2] if pair else sides[1])
    cos, sin = (rotary.cos, rotary.sin) if rotary is not None else (x, x)
    start, end = (rotary.start, rotary.start + rotary.cos.shape[0]) if rotary is not None else (0, 0)
    flags = token_major if token_major is not None else x  # any pointer when unused
    extra = {} if x.device.type == "cpu" else {"num_warps": int(option("warps"))}
    block = max(int(option("block")), triton.next_power_of_2(triton.cdiv(n, 65535)))  # the grid's 2nd dim: < 2^16
    rotary_order_fwd[(batch * heads, triton.cdiv(n, block))](
        tensors[0], outs[0], x2, y2, cos, sin, flags, xs, x2s, slots,
        *tensors[0].stride()[:3], *outs[0].stride()[:3], *x2.stride()[:3], *y2.stride()[:3], *xs.stride()[:3],
        cos.stride(0) if rotary is not None else 0,
        n, heads, start, end, geometry[1], geometry[2], geometry[3],
        FRAMES=geometry[0], BLOCK=block, HEAD_DIM=dim, BLOCK_D=triton.next_power_of_2(dim),
        ROTARY=rotary is not None, WAN_PAIRS=rotary is not None and rotary.pairs == "wan",
        F64=rotary is not None and rotary.cos.dtype == torch.float64, PAIR=pair,
        ANY_TOKEN_MAJOR=token_major is not None, TO_HEAD_ORDER=to_head_order, TRANSPOSE=transpose,
        SIDES=sides is not None, **extra,
    )  # fmt: skip
    return outs[0], (outs[1] if pair else None)


def grads_to_frame_major(dq, dk, dv, token_major: torch.Tensor | None, geometry: tuple[int, int, int, int],
                         rotary=None, sides: tuple | None = None):  # fmt: skip
    """Gradients of the head-ordered, rotated q, k, v back to frame-major rows and through the rotary's
    transpose: one pass for dq and dk, one for dv (none where there is nothing to undo). ``sides`` =
    ``(slots, dq_side, dk_side, dv_side)``: the token-major heads' gradients are in those (see
    :func:`rotary_order`), the others already in place in ``dq``, ``dk``, ``dv``."""
    if sides is not None:
        slots, dq_side, dk_side, dv_side = sides
        dq, dk = rotary_order(dq, None, geometry, rotary, second=dk, to_head_order=False, transpose=True,
                              sides=(slots, dq_side, dk_side))  # fmt: skip
        return dq, dk, rotary_order(dv, None, geometry, to_head_order=False, sides=(slots, dv_side, None))[0]
    if rotary is not None or token_major is not None:
        dq, dk = rotary_order(dq, token_major, geometry, rotary, second=dk, to_head_order=False, transpose=True)
    if token_major is not None:
        dv = rotary_order(dv, token_major, geometry, to_head_order=False)[0]
    return dq, dk, dv
