"""The checks of :func:`~sparse_vdit.kernels.sparse_attention`'s inputs, all in one place, before any kernel runs."""

from __future__ import annotations

import math
import numbers

import torch

from ..layout import VideoLayout
from ..block_table import BlockTable

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64)  # float64: the reference backend only
MAX_HEAD_DIM = 256


def check_inputs(q, k, v, table, softmax_scale, layout: VideoLayout | None = None, selected=None) -> float:
    """Raise TypeError / ValueError for inputs no backend should see; returns the softmax scale.

    ``layout``, when given, is how q/k/v are laid out: the table must have been compiled for it
    (a table of another layout with the same token count would silently attend the wrong keys).
    ``selected``, when given, is a per-(sample, head) choice among the table's rows (candidates):
    int32 ``[batch, heads]`` on q's device or the CPU; the table then may have any number of rows.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not isinstance(table, BlockTable):
        raise TypeError(f"table must be a BlockTable (sparse_vdit.patterns.compile_layer), got {type(table).__name__}")
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, seq, heads, head_dim), got shape {tuple(q.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPES:
        raise TypeError(f"dtype {q.dtype} not supported; use one of {[str(d) for d in DTYPES]}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    batch, seq, heads, dim = q.shape
    if layout is not None:
        if not isinstance(layout, VideoLayout):
            raise TypeError(f"layout must be a VideoLayout, got {type(layout).__name__}")
        if layout != table.layout:
            raise ValueError(f"the table was compiled for {table.layout.describe()}, but the inputs are laid out as "
                             f"{layout.describe()}: compile the table for the inputs' layout")  # fmt: skip
    if seq != table.layout.num_tokens:
        raise ValueError(
            f"sequence length {seq} does not match the table's layout "
            f"({table.layout.describe()} = {table.layout.num_tokens} tokens): table built for another layout"
        )
    if selected is None and heads != table.num_heads:
        raise ValueError(f"{heads} heads in q but the table has {table.num_heads}")
    if selected is not None:
        _check_selected(selected, batch, heads, q.device)
    if batch < 1:
        raise ValueError("batch must be >= 1, got an empty batch")
    problem = head_dim_problem(dim)
    if problem:
        raise ValueError(problem)
    if softmax_scale is None:
        return dim**-0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real):
        raise TypeError(f"softmax_scale must be a real number (or None for head_dim ** -0.5), got {softmax_scale!r}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be finite and positive, got {softmax_scale!r}")
    return float(softmax_scale)


def head_dim_problem(dim: int) -> str | None:
    """Why no backend takes heads of ``dim`` channels, or None if they are fine."""
    if not 8 <= dim <= MAX_HEAD_DIM or dim % 8:
        return f"head_dim {dim} not supported (a multiple of 8 from 8 to {MAX_HEAD_DIM})"
    return None


def _check_selected(selected, batch: int, heads: int, device: torch.device) -> None:
    if not isinstance(selected, torch.Tensor):
        raise TypeError(f"selected must be a torch.Tensor, got {type(selected).__name__}")
    if selected.dtype != torch.int32 or tuple(selected.shape) != (batch, heads):
        raise ValueError(f"selected must be int32 (batch, heads) = {(batch, heads)}, got {selected.dtype} "
                         f"{tuple(selected.shape)}")  # fmt: skip
    if selected.device not in (device, torch.device("cpu")):
        raise ValueError(f"selected is on {selected.device}; put it on {device} (or the CPU)")
