"""`select_attention`: block-sparse attention where every (sample, head) picks one row of a table of candidates.

A backend that reads the choice on the device says so in its module (``SELECT_ON_DEVICE``, with
``run_selected(q, k, v, candidates, selected, softmax_scale)``; see :mod:`.registry`): Triton
always, FlashAttention-4 when its ``SELECT_ON_DEVICE`` is set. Every other backend runs the host
path: the choice copied to the host once, one :func:`~sparse_vdit.sparse_attention` per group of
samples with the same choices.

Differentiable on both paths: the host path through :func:`~sparse_vdit.sparse_attention`, the
device path by recomputing each group's chosen rows in its backward (:func:`_select_attention_backward_op`).
"""

from __future__ import annotations

import torch

from ..block_table import BlockTable, table_by_key
from ..layout import VideoLayout
from . import registry
from .api import autograd_inside_op, sparse_attention
from .checks import check_inputs
from .registry import resolve


def decides_on_device(backend: str) -> bool:
    """Whether :func:`select_attention` keeps the choice on the device for this (resolved) backend."""
    return registry.get(backend).selects_on_device


def select_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    candidates: BlockTable,
    selected: torch.Tensor,
    softmax_scale: float | None = None,
    backend: str = "auto",
    layout: VideoLayout | None = None,
) -> torch.Tensor:
    """Attention of one layer where head ``h`` of sample ``b`` uses row ``selected[b, h]`` of ``candidates``.

    Args:
        q, k, v, softmax_scale, backend, layout: as for :func:`~sparse_vdit.sparse_attention`.
        candidates: a table with one row per candidate pattern (``compile_layer(candidates, ...)``,
            e.g. :meth:`~sparse_vdit.patterns.HeadChoice.table`), any number of rows.
        selected: int32 ``[batch, heads]``, values below ``candidates.num_heads`` (on the device
            path the kernel reads them unchecked; the host path checks them).

    On a backend that reads the choice on the device (Triton; FA4 with ``fa4.SELECT_ON_DEVICE``)
    and ``selected`` on q's device, the candidates stay resident and one launch reads the choice
    (and with it each head's token order): no host sync, nothing permuted on the host. Otherwise
    ``selected`` is copied to the host once and each group of samples with the same choices runs
    :func:`~sparse_vdit.sparse_attention` with the rows it chose (:meth:`BlockTable.heads`).
    """
    scale = check_inputs(q, k, v, candidates, softmax_scale, layout, selected=selected)
    candidates = candidates if candidates.device == q.device else candidates.to(q.device)
    if torch.compiler.is_compiling():
        name = resolve(backend, q, candidates.block_size)
    else:
        name = registry.choose(backend, q, candidates).name
    if decides_on_device(name) and selected.device == q.device:
        return torch.ops.sparse_vdit.select_attention(q, k, v, candidates.key, selected, scale, name)
    rows = selected.cpu()  # the host path's one sync
    if bool((rows < 0).any()) or bool((rows >= candidates.num_heads).any()):
        raise ValueError(f"selected holds values outside [0, {candidates.num_heads}) (the candidates' rows)")
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, row in enumerate(rows.tolist()):
        groups.setdefault(tuple(row), []).append(b)
    if len(groups) == 1:
        return sparse_attention(q, k, v, candidates.heads(next(iter(groups))), scale, backend)
    out = torch.empty_like(q)
    for row, samples in groups.items():
        index = torch.tensor(samples, device=q.device)
        out[index] = sparse_attention(q[index], k[index], v[index], candidates.heads(row), scale, backend)
    return out


@torch.library.custom_op("sparse_vdit::select_attention", mutates_args=())
def _select_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_key: int, selected: torch.Tensor,
                         softmax_scale: float, backend: str) -> torch.Tensor:  # fmt: skip
    """The device path of :func:`select_attention`, opaque to ``torch.compile`` (the table travels as its key)."""
    return registry.get(backend).module.run_selected(q, k, v, table_by_key(table_key), selected, softmax_scale)


@_select_attention_op.register_fake
def _(q, k, v, table_key, selected, softmax_scale, backend):
    return torch.empty_like(q)


@torch.library.custom_op("sparse_vdit::select_attention_backward", mutates_args=())
def _select_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  table_key: int, selected: torch.Tensor, softmax_scale: float,
                                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv)`` of the device path: per group of samples with the same choices, the chosen
    rows' :func:`~sparse_vdit.sparse_attention` recomputed under autograd and differentiated by its
    backend's own backward (one host sync for the choice, one extra forward)."""
    candidates = table_by_key(table_key)
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, row in enumerate(selected.cpu().tolist()):
        groups.setdefault(tuple(row), []).append(b)
    grads = [torch.zeros_like(t) for t in (q, k, v)]
    for row, samples in groups.items():
        index = torch.tensor(samples, device=q.device)
        with autograd_inside_op():
            inputs = [t[index].detach().requires_grad_() for t in (q, k, v)]
            out = sparse_attention(*inputs, candidates.heads(row), softmax_scale, backend)
            if not out.requires_grad:  # every chosen row skips: zero gradients
                continue
            parts = torch.autograd.grad(out, inputs, grad_out[index], allow_unused=True)
        for grad, part in zip(grads, parts):
            if part is not None:
                grad[index] = part
    return tuple(grads)


@_select_attention_backward_op.register_fake
def _(grad_out, q, k, v, table_key, selected, softmax_scale, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _select_setup_context(ctx, inputs, output) -> None:
    q, k, v, table_key, selected, softmax_scale, backend = inputs
    ctx.save_for_backward(q, k, v, selected)
    ctx.table_key, ctx.softmax_scale, ctx.backend = table_key, softmax_scale, backend


def _select_backward(ctx, grad_out):
    q, k, v, selected = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparse_vdit.select_attention_backward(
        grad_out.contiguous(), q, k, v, ctx.table_key, selected, ctx.softmax_scale, ctx.backend)  # fmt: skip
    return dq, dk, dv, None, None, None, None


# training through SVG's device-side choice (the host path differentiates sparse_attention directly)
torch.library.register_autograd("sparse_vdit::select_attention", _select_backward, setup_context=_select_setup_context)
