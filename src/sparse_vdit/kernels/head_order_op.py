"""The fused path under autograd: block-sparse attention on the Triton backend with q, k, v put in each
head's own order (the rotary fused in), one custom op with its backward, opaque to ``torch.compile``.

The forward keeps the head-ordered, rotated q, k, v it made (in place of the inputs); the backward runs
the kernels on them as on frame-major heads (its prologue puts grad_out in head order), then one pass
takes dq and dk back to frame-major through the rotary's transpose and one takes dv back. Below both
:func:`~sparse_vdit.kernels.sparse_attention` (whose eager training runs token-major heads here) and
:mod:`.head_order` (the processor's fused path, and the torch references).

:func:`forward_with_lse` / :func:`backward_from_lse` are the same path without autograd, split where a caller
keeps the output and LSE itself (the compiled processor's op), on triton or any backend whose module has
``run_with_lse`` and ``run_backward`` on head-ordered tensors (fa4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..block_table import BlockTable, table_by_key
from . import registry

PAIRS = ("interleaved", "wan")


@dataclass(frozen=True, eq=False)
class Rotary:
    """A rotary embedding of sequence rows ``start .. start + len(cos)``: ``cos`` / ``sin`` [R, D]
    (float32 or float64, last dim contiguous), ``pairs`` one of :data:`PAIRS`. Other rows pass unchanged."""

    cos: torch.Tensor
    sin: torch.Tensor
    start: int = 0
    pairs: str = "interleaved"

    def __post_init__(self) -> None:
        if self.pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {self.pairs!r}")
        if self.cos.dim() != 2 or self.cos.shape != self.sin.shape or self.cos.shape[1] % 2:
            raise ValueError(f"cos and sin must be [rows, even head_dim] alike, got {tuple(self.cos.shape)}, "
                             f"{tuple(self.sin.shape)}")  # fmt: skip
        if self.cos.stride(-1) != 1 or self.sin.stride(-1) != 1 or self.cos.stride(0) != self.sin.stride(0):
            raise ValueError("cos and sin need a contiguous last dim and the same row stride")

    @property
    def end(self) -> int:
        return self.start + self.cos.shape[0]


def geometry(table: BlockTable) -> tuple[int, int, int, int]:
    """(frames, tokens per frame, first video position, video tokens) of the table's layout, as the passes take them."""
    layout = table.layout
    return layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens


def flags(table: BlockTable) -> torch.Tensor | None:
    """The table's int8 token-major head flags (None when every head is frame-major); imports Triton on use."""
    from .triton.launcher import token_major_flags

    return token_major_flags(table)


def fused_head_order(q, k, v, table: BlockTable, rotary: Rotary | None = None):
    """(q, k, v) rotated (q and k) and with the table's token-major heads in token-major order, by the
    Triton pass: one launch for q and k, one for v (:func:`~sparse_vdit.kernels.triton.rotary.rotary_order`)."""
    from .triton.rotary import rotary_order

    token_major, shape = flags(table), geometry(table)
    if token_major is None and rotary is None:
        return q, k, v
    q, k = rotary_order(q, token_major, shape, rotary, second=k)
    return q, k, in_head_order(v, table)


def train_in_head_order(q, k, v, table: BlockTable, softmax_scale: float, rotary: Rotary | None = None) -> torch.Tensor:
    """Differentiable block-sparse attention of frame-major q, k, v (q and k before ``rotary``) on the Triton
    backend through head order; output frame-major. Inputs are the caller's to check."""
    cos, sin, start, pairs = rotary_args(rotary)
    return torch.ops.sparse_vdit.attention_in_head_order(q, k, v, cos, sin, start, pairs, table.key, softmax_scale)[0]


def forward_with_lse(q, k, v, table: BlockTable, softmax_scale: float, rotary: Rotary | None = None,
                     backend: str = "triton"):  # fmt: skip
    """``(out, lse)`` of the fused path, no autograd: the output frame-major and the LSE in the order ``backend``
    ran the rows, what :func:`backward_from_lse` needs besides the inputs (the compiled processor's op keeps
    them). ``backend``: one whose module has ``run_with_lse`` and ``run_backward`` (triton stores its rows
    frame-major itself; the others' output goes back in one pass)."""
    q, k, v = fused_head_order(q, k, v, table, rotary)
    if backend == "triton":
        from .triton import backend as triton

        return triton.run_with_lse(q, k, v, table, softmax_scale, head_order=True)
    out, lse = registry.get(backend).module.run_with_lse(q, k, v, table, softmax_scale)
    return in_head_order(out, table, to_head_order=False), lse


def backward_from_lse(grad_out, q, k, v, out, lse, table: BlockTable, softmax_scale: float,
                      rotary: Rotary | None = None, backend: str = "triton"):  # fmt: skip
    """``(dq, dk, dv)`` of :func:`forward_with_lse` from its inputs, output and LSE: the head-ordered q, k, v
    made again by one pass, then ``backend``'s backward (no forward kernel runs again)."""
    q, k, v = fused_head_order(q, k, v, table, rotary)
    if backend == "triton":
        cos, sin, start, pairs = rotary_args(rotary)
        return torch.ops.sparse_vdit.attention_in_head_order_backward(grad_out.contiguous(), q, k, v, out, lse, cos,
                                                                      sin, start, pairs, table.key, softmax_scale)  # fmt: skip
    grad_out, out = (in_head_order(t.contiguous(), table) for t in (grad_out, out))
    grads = registry.get(backend).module.run_backward(grad_out, q, k, v, out, lse, table, softmax_scale)
    return frame_major_grads(*grads, table, rotary)


def frame_major_grads(dq, dk, dv, table: BlockTable, rotary: Rotary | None = None):
    """Gradients of the head-ordered, rotated q, k, v back to frame-major rows and through the rotary's
    transpose: one pass for dq and dk, one for dv (none where there is nothing to undo)."""
    from .triton.rotary import grads_to_frame_major

    return grads_to_frame_major(dq, dk, dv, flags(table), geometry(table), rotary)


def in_head_order(x: torch.Tensor, table: BlockTable, to_head_order: bool = True) -> torch.Tensor:
    """``x`` [B, N, H, D] with the table's token-major heads put in their order (or back to frame-major), one
    Triton pass (``x`` itself where the table has none)."""
    token_major = flags(table)
    if token_major is None:
        return x
    from .triton.rotary import rotary_order

    return rotary_order(x, token_major, geometry(table), to_head_order=to_head_order)[0]


def rotary_args(rotary: Rotary | None) -> tuple:
    """``(cos, sin, start, pairs)`` of ``rotary`` as the ops take them (None: no rotary)."""
    return (None, None, 0, PAIRS[0]) if rotary is None else (rotary.cos, rotary.sin, rotary.start, rotary.pairs)


def rotary_of(cos: torch.Tensor | None, sin: torch.Tensor | None, start: int, pairs: str) -> Rotary | None:
    """The :class:`Rotary` of an op's ``(cos, sin, start, pairs)`` arguments (None where ``cos`` is None)."""
    return None if cos is None else Rotary(cos, sin, start, pairs)


@torch.library.custom_op("sparse_vdit::attention_in_head_order", mutates_args=())
def _head_order_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                   sin: torch.Tensor | None, rotary_start: int, rotary_pairs: str, table_key: int,
                   softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """:func:`train_in_head_order`'s op, opaque to ``torch.compile``:
    ``(out, lse, q, k, v)``, the output and LSE frame-major, q, k, v rotated and in head order (for the backward)."""
    from .triton import backend

    table = table_by_key(table_key)
    q, k, v = fused_head_order(q, k, v, table, rotary_of(cos, sin, rotary_start, rotary_pairs))
    out, lse = backend.run_with_lse(q, k, v, table, softmax_scale, head_order=True)
    return out, lse, q, k, v


@_head_order_op.register_fake
def _(q, k, v, cos, sin, rotary_start, rotary_pairs, table_key, softmax_scale):
    batch, n, heads, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((batch, heads, n), dtype=torch.float32), q.new_empty(q.shape),
            k.new_empty(k.shape), v.new_empty(v.shape))  # fmt: skip


@torch.library.custom_op("sparse_vdit::attention_in_head_order_backward", mutates_args=())
def _head_order_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            out: torch.Tensor, lse: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None,
                            rotary_start: int, rotary_pairs: str, table_key: int, softmax_scale: float,
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv)`` of :func:`_head_order_op` (frame-major, before the rotary), from its head-ordered q, k, v."""
    from .triton import backend

    table = table_by_key(table_key)
    return backend.run_backward(grad_out, q, k, v, out, lse, table, softmax_scale, head_order=True,
                                to_frame_major=True, rotary=rotary_of(cos, sin, rotary_start, rotary_pairs))


@_head_order_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, cos, sin, rotary_start, rotary_pairs, table_key, softmax_scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _head_order_setup(ctx, inputs, output) -> None:
    cos, sin, rotary_start, rotary_pairs, table_key, softmax_scale = inputs[3:]
    out, lse, q, k, v = output
    ctx.save_for_backward(q, k, v, out, lse, cos, sin)
    ctx.mark_non_differentiable(lse, q, k, v)
    ctx.set_materialize_grads(False)  # no zeros for the outputs the backward ignores (lse, q, k, v)
    ctx.call = (rotary_start, rotary_pairs, table_key, softmax_scale)


def _head_order_backward(ctx, grad_out, *_grads_of_the_rest):
    if grad_out is None:  # the output itself took no part in the loss
        return None, None, None, None, None, None, None, None, None
    q, k, v, out, lse, cos, sin = ctx.saved_tensors
    grads = torch.ops.sparse_vdit.attention_in_head_order_backward(grad_out.contiguous(), q, k, v, out, lse, cos, sin,
                                                                   *ctx.call)  # fmt: skip
    return *grads, None, None, None, None, None, None


torch.library.register_autograd("sparse_vdit::attention_in_head_order", _head_order_backward,
                                setup_context=_head_order_setup)  # fmt: skip


__all__ = ["PAIRS", "Rotary", "backward_from_lse", "flags", "forward_with_lse", "frame_major_grads", "fused_head_order",
           "geometry", "in_head_order", "rotary_args", "rotary_of", "train_in_head_order"]
