"""The attention step of :class:`~.processor.SparseAttnProcessor` under ``torch.compile``: one opaque custom op
(``sparse_vdit::diffusers_attention``) with its backward, so the graph has no break inside a block and the
state's Python decisions run eagerly at run time.

The op finds its :class:`~.processor.SparseState` by handle (:func:`register`). Its backward runs from the call's
output and LSE where the call takes a route (``SparseState.lse_route``), else it replays the call under autograd.
"""

from __future__ import annotations

import itertools
import weakref

import torch

from ...kernels.api import autograd_inside_op
from ...kernels.head_order_op import rotary_of
from .steps import timestep_value

_STATES: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


def register(state) -> int:
    """A new handle by which the compiled op finds ``state`` (held weakly)."""
    handle = next(_HANDLES)
    _STATES[handle] = state
    return handle


def _state(handle: int):
    state = _STATES.get(handle)
    if state is None:
        raise RuntimeError("sparse-vdit: this compiled graph belongs to a model whose sparse attention was removed")
    return state


# cudagraph_unsafe: under CUDA graphs (torch.compile mode="reduce-overhead") Inductor partitions the
# graph around the op and runs it eagerly every call, so the step and the plan's patterns are read at
# run time instead of being frozen at the captured step (and its host reads never run in a capture)
_HOST_DECIDES = (torch.Tag.cudagraph_unsafe,)


@torch.library.custom_op("sparse_vdit::diffusers_attention", mutates_args=(), tags=_HOST_DECIDES)
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, layer: torch.Tensor, handle: int,
    cos: torch.Tensor | None, sin: torch.Tensor | None, rotary_start: int, rotary_pairs: str, keep_lse: bool = False,
    timestep: torch.Tensor | None = None, grid: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """:meth:`SparseState.attend` as one opaque op: ``(out, lse)``. ``keep_lse`` (the graph was traced for
    training): the LSE (float32 [B, H, N]) for the backward where the call takes a
    :meth:`SparseState.lse_route`; NaN where it does not (the backward then replays), or without ``keep_lse``.
    ``cos`` / ``sin`` (or None): q and k still need that rotary embedding (fused where the call allows, else
    applied first).
    ``timestep`` / ``grid`` come only from a graph traced by ``torch.export`` (no step hook runs in it):
    layer 0 then counts the step here, at run time."""
    state = _state(handle)
    if timestep is not None and int(layer) == 0:
        state.steps.observe(timestep_value(timestep), None if grid is None else tuple(grid))
    rotary = rotary_of(cos, sin, rotary_start, rotary_pairs)
    if keep_lse:
        out, lse = state.attend_keeping_lse(int(layer), q, k, v, key_mask, rotary)
    else:
        out, lse = state.attend(int(layer), q, k, v, key_mask, rotary=rotary), None
    if lse is None:  # NaN: gradients made from it would show
        lse = q.new_full((q.shape[0], q.shape[2], q.shape[1]), float("nan"), dtype=torch.float32)
    return out.contiguous(), lse


@attention.register_fake
def _(q, k, v, key_mask, layer, handle, cos, sin, rotary_start, rotary_pairs, keep_lse=False, timestep=None, grid=None):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("sparse_vdit::diffusers_attention_backward", mutates_args=(), tags=_HOST_DECIDES)
def _attention_backward_op(
    grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    key_mask: torch.Tensor | None, layer: torch.Tensor, handle: int, cos: torch.Tensor | None,
    sin: torch.Tensor | None, rotary_start: int, rotary_pairs: str, lse_kept: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv)`` of :func:`attention`. Where the forward kept the LSE and the call takes a
    :meth:`SparseState.lse_route`, from the call's output and LSE (one pass to head order, then the kernels'
    backward); otherwise the call replayed under autograd (same step, same patterns; no timing, no
    observers), then differentiated."""
    state = _state(handle)
    rotary = rotary_of(cos, sin, rotary_start, rotary_pairs)
    route = state.lse_route(int(layer), q, k, v, key_mask, rotary) if lse_kept else None
    if route is not None:
        return state.lse_backward(route, grad, q, k, v, out, lse)
    with autograd_inside_op():
        inputs = [t.detach().requires_grad_() for t in (q, k, v)]
        out = state.attend(int(layer), *inputs, key_mask, observe=False, rotary=rotary)
        grads = torch.autograd.grad(out, inputs, grad, allow_unused=True) if out.requires_grad else (None,) * 3
    return tuple(torch.zeros_like(t) if g is None else g.contiguous() for g, t in zip(grads, (q, k, v)))


@_attention_backward_op.register_fake
def _(grad, q, k, v, out, lse, key_mask, layer, handle, cos, sin, rotary_start, rotary_pairs, lse_kept):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, key_mask, layer, handle, cos, sin, rotary_start, rotary_pairs, keep_lse = inputs[:11]
    ctx.save_for_backward(q, k, v, *output, key_mask, layer, cos, sin)
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.handle, ctx.rest = handle, (rotary_start, rotary_pairs, keep_lse)


def _attention_backward(ctx, grad, _grad_lse):
    if grad is None:  # the output itself took no part in the loss
        return (None,) * 13
    q, k, v, out, lse, key_mask, layer, cos, sin = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(grad.contiguous(), q, k, v, out, lse, key_mask, layer, ctx.handle, cos, sin,
                                        *ctx.rest)  # fmt: skip
    return dq, dk, dv, *(None,) * 10


torch.library.register_autograd("sparse_vdit::diffusers_attention", _attention_backward, setup_context=_attention_setup)
