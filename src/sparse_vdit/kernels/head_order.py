"""Attention on inputs already in each head's own order, with the rotary embedding fused in.

The fused path of a layer call (issue 21): :func:`to_head_order` applies the model's rotary
embedding to q and k and writes every token-major head of the table in token-major order in the
same pass (one Triton launch for q and k, one for v), then :func:`attention_in_head_order` runs
the backend on those tensors and returns the output frame-major: the Triton kernel stores its rows
to their frame-major positions itself, the other backends' output goes back through one copy
(:func:`to_frame_major`). No separate gather runs. Differentiable: on the Triton backend the backward
runs on the head-ordered tensors too (:mod:`.head_order_op`, the op under autograd).

The rotary conventions (model-agnostic; the integration says which one a model uses):

- ``"interleaved"``: diffusers' ``apply_rotary_emb(x, (cos, sin), use_real_unbind_dim=-1)`` (HunyuanVideo,
  CogVideoX): ``x * cos + rotate_half(x) * sin`` on adjacent channel pairs, in float32 (or the
  tables' float64), cast back.
- ``"wan"``: Wan's processor: pairs rotated with ``cos[..., 0::2]`` and ``sin[..., 1::2]`` in
  the tables' dtype, cast back.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..block_table import BlockTable
from . import registry
from .api import needs_grad, reorder_heads, skipped_layer
from .checks import check_inputs
from .head_order_op import PAIRS, Rotary, fused_head_order, in_head_order, train_in_head_order

# The Triton backend runs token-major heads on this path permuted (q, k, v written in each head's
# order by the fused pass, every key tile contiguous). A rotary-only pass with the kernel reading
# token-major heads through the order lost on an H200 (issue 21, BENCHMARKS.md) and was removed, as
# was q left out of the pass and rotated by the kernel on load (slower in 44 of the sweep's 48 calls).




def in_float32(rotary: Rotary) -> Rotary:
    """``rotary`` with float64 tables (Wan's) cast to float32: the fused pass then computes in float32."""
    if rotary.cos.dtype != torch.float64:
        return rotary
    return replace(rotary, cos=rotary.cos.float(), sin=rotary.sin.float())


def apply_rotary(x: torch.Tensor, rotary: Rotary | None) -> torch.Tensor:
    """``x`` [B, N, H, D] with ``rotary`` applied in plain torch (the reference; float64 stays float64)."""
    if rotary is None:
        return x
    compute = torch.float64 if torch.float64 in (x.dtype, rotary.cos.dtype) else torch.float32
    part = x[:, rotary.start : rotary.end].to(compute)
    cos, sin = (t.to(compute)[None, :, None, :] for t in (rotary.cos, rotary.sin))
    if rotary.pairs == "wan":
        cos, sin = cos[..., 0::2].repeat_interleave(2, -1), sin[..., 1::2].repeat_interleave(2, -1)
    real, imag = part.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-imag, real], dim=-1).flatten(-2)
    out = x.clone()
    out[:, rotary.start : rotary.end] = (part * cos + rotated * sin).to(x.dtype)
    return out


def reference_head_order(x: torch.Tensor, table: BlockTable, rotary: Rotary | None = None) -> torch.Tensor:
    """:func:`to_head_order` of one tensor in plain torch: rotary, then :func:`reorder_heads`."""
    return reorder_heads(apply_rotary(x, rotary), table.layout, table.token_major_heads)


def fused_pass_runs(x: torch.Tensor, rotary: Rotary | None = None) -> bool:
    """Whether the Triton pass runs for ``x`` (CUDA, or the CPU under the interpreter; with ``rotary``,
    head dims that are powers of two)."""
    ok, _ = registry.available("triton", x.device)
    if rotary is not None:
        from .triton.rotary import supports

        ok = ok and supports(x.shape[-1])
    return ok and x.dtype != torch.float64


def rotate(q: torch.Tensor, k: torch.Tensor, rotary: Rotary | None,
           transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """q and k with ``rotary`` applied, order unchanged: one fused pass where Triton runs (differentiable:
    its backward is the same pass with the rotation transposed), else plain torch. ``transpose``: the
    rotation's transpose (gradients back through the rotary; the fused pass only)."""
    if rotary is None:
        return q, k
    if not fused_pass_runs(q, rotary):
        if transpose:
            raise ValueError("the rotary's transpose runs in the fused pass only (Triton, head dims powers of two)")
        return apply_rotary(q, rotary), apply_rotary(k, rotary)
    return torch.ops.sparse_vdit.rotary_pass(q, k, rotary.cos, rotary.sin, rotary.start, rotary.pairs, transpose)


@torch.library.custom_op("sparse_vdit::rotary_pass", mutates_args=())
def _rotary_pass(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start: int, pairs: str,
                 transpose: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`rotate`'s fused pass (``transpose``: the rotation's transpose), opaque to ``torch.compile``."""
    from .triton.rotary import rotary_order

    return rotary_order(q, None, (1, 1, 0, 0), Rotary(cos, sin, start, pairs), second=k, transpose=transpose)


@_rotary_pass.register_fake
def _(q, k, cos, sin, start, pairs, transpose):
    return q.new_empty(q.shape), k.new_empty(k.shape)


def _rotary_pass_setup(ctx, inputs, output) -> None:
    _, _, cos, sin, start, pairs, transpose = inputs
    ctx.save_for_backward(cos, sin)
    ctx.rotary = (start, pairs, transpose)


def _rotary_pass_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    start, pairs, transpose = ctx.rotary
    grads = torch.ops.sparse_vdit.rotary_pass(grad_q, grad_k, cos, sin, start, pairs, not transpose)
    return *grads, None, None, None, None, None


torch.library.register_autograd("sparse_vdit::rotary_pass", _rotary_pass_backward, setup_context=_rotary_pass_setup)


def to_head_order(q, k, v, table: BlockTable, rotary: Rotary | None = None):
    """(q, k, v) rotated (q and k) and with the table's token-major heads in token-major order.

    One pass over q and k and one over v (Triton where it runs; else torch).
    """
    if not fused_pass_runs(q, rotary):
        return tuple(reference_head_order(t, table, r) for t, r in ((q, rotary), (k, rotary), (v, None)))
    return fused_head_order(q, k, v, table, rotary)


def to_frame_major(out: torch.Tensor, table: BlockTable) -> torch.Tensor:
    """An output in each head's own order back to frame-major rows (one copy)."""
    if not table.token_major_heads:
        return out
    if not fused_pass_runs(out):
        return reorder_heads(out, table.layout, table.token_major_heads, to_token_major=False)
    return in_head_order(out, table, to_head_order=False)


def attention_in_head_order(q, k, v, table: BlockTable, softmax_scale: float | None = None, backend: str = "auto",
                            rotary: Rotary | None = None) -> torch.Tensor:  # fmt: skip
    """Block-sparse attention of frame-major q, k, v [B, N, H, D] (q and k before ``rotary``), the
    rotary and the token-major permutation fused into one pass; output frame-major, as
    :func:`~sparse_vdit.kernels.sparse_attention` of the rotated inputs.

    Differentiable. On the Triton backend the backward runs on the head-ordered tensors the forward
    made (:func:`~sparse_vdit.kernels.head_order_op.train_in_head_order`). Other backends rotate
    (differentiably) and call ``sparse_attention``.
    """
    scale = check_inputs(q, k, v, table, softmax_scale)
    table = table if table.device == q.device else table.to(q.device)
    name = registry.choose(backend, q, table).name
    if table.all_skip:
        return skipped_layer(q, k, v)
    training = needs_grad(q, k, v)
    if table.all_dense or not table.token_major_heads or (
        training and (name != "triton" or not fused_pass_runs(q, rotary))
    ):
        from .api import sparse_attention

        return sparse_attention(*rotate(q, k, rotary), v, table, softmax_scale=scale, backend=name)
    if training:
        return train_in_head_order(q, k, v, table, scale, rotary)
    q, k, v = to_head_order(q, k, v, table, rotary)
    if name == "triton":  # stores its rows frame-major itself
        from .triton import backend

        return backend.run(q, k, v, table, scale, head_order=True)
    return to_frame_major(registry.get(name).module.run(q, k, v, table, scale), table)


__all__ = ["PAIRS", "Rotary", "apply_rotary", "attention_in_head_order", "fused_pass_runs", "in_float32",
           "reference_head_order", "rotate", "to_frame_major", "to_head_order"]
