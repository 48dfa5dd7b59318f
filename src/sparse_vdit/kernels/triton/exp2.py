"""The softmax's ``2^x`` in the Triton kernels, some of it on the FMA units.

Hopper's special-function unit computes 16 exponentials a clock per SM, against 128 fused multiply-adds: in
the backward's dK/dV step the tensor cores wait while 4,096 ``MUFU.EX2`` run. :func:`exp2_fma` computes
``2^x`` from multiply-adds and integer adds instead (FlashAttention-4's trick on Blackwell): ``x`` split into
an integer ``j`` and a fraction ``f`` in ``[-1/2, 1/2]``, ``2^f`` by a degree-3 polynomial, ``j`` added to
the result's exponent bits. :func:`exp2_split` computes half a tile's exponentials each way, so both units
work at once. For 16-bit kernels only: the polynomial's relative error (7.6e-5) is far under bf16's and
fp16's rounding of the probabilities, not under float32's.
"""

import triton
import triton.language as tl

# minimax (relative error) coefficients of 2^f on [-1/2, 1/2], constant term first: error 7.55e-5
C0 = tl.constexpr(0.99992835521698)
C1 = tl.constexpr(0.693260908126831)
C2 = tl.constexpr(0.2426070123910904)
C3 = tl.constexpr(0.05516988784074783)
ROUND = tl.constexpr(12582912.0)  # 1.5 * 2^23: x + ROUND holds round(x) in its low mantissa bits
LOWEST = tl.constexpr(-125.0)  # 2^x for x below it: about 2^-125 (the exponent field stays normal)


@triton.jit
def exp2_fma(x):
    """``2^x`` for float32 ``x <= 0`` (softmax arguments) by multiply-adds and integer adds; relative error
    7.6e-5, and about 2^-125 (not 0) for ``x < -125``, ``-inf`` included."""
    x = tl.maximum(x, LOWEST)
    shifted = x + ROUND
    f = x - (shifted - ROUND)
    p = ((C3 * f + C2) * f + C1) * f + C0
    bits = p.to(tl.int32, bitcast=True) + (shifted.to(tl.int32, bitcast=True) << 23)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def exp2_split(x):
    """``2^x`` of a float32 ``[M, N]`` tile: even columns by the special-function unit, odd ones by
    :func:`exp2_fma` (a thread of an sm90 MMA result holds column pairs, so no data moves)."""
    rows: tl.constexpr = x.shape[0]
    columns: tl.constexpr = x.shape[1]
    even, odd = tl.split(tl.reshape(x, [rows, columns // 2, 2]))
    return tl.reshape(tl.join(tl.math.exp2(even), exp2_fma(odd)), [rows, columns])
