"""`sparse_attention`: the one entry point to every backend, with checks and head reordering."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..block_table import BlockTable, table_by_key
from ..layout import VideoLayout
from . import dense, registry
from .checks import check_inputs
from .registry import resolve


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    softmax_scale: float | None = None,
    backend: str = "auto",
    layout: VideoLayout | None = None,
) -> torch.Tensor:
    """Block-sparse self-attention of one layer, every head in one kernel launch.

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)`` tensors of one dtype (bf16, fp16 or fp32;
            float64 on the reference backend) on one device; ``seq`` must equal
            ``table.layout.num_tokens`` and ``heads`` the table's; head_dim a multiple of 8 up to 256.
        table: the layer's :class:`~sparse_vdit.patterns.BlockTable` (``compile_layer``); moved
            to the tensors' device if needed (cached).
        softmax_scale: a finite positive number; defaults to ``head_dim ** -0.5``.
        backend: ``"fa4"`` (FlashAttention-4 block sparsity, Hopper/Blackwell), ``"triton"``
            (ours), ``"flex"`` (FlexAttention), ``"reference"`` (plain torch, any device), or
            ``"auto"``: the fastest one available, said once in the ``sparse_vdit`` log.
        layout: how q/k/v are laid out, if known: then the table must have been compiled for it
            (checked; a table of another layout with the same token count is refused).

    Heads whose pattern needs token-major order are permuted together by one strided copy
    before the kernel and back after it (:func:`reorder_heads`), or read in place by the Triton
    kernel. Padded text keys (``layout.kv_len``) are never attended; a query row that visits no
    key block (``skip`` heads) comes out exactly zero. NaN and inf behave as in dense SDPA over
    the keys a row visits: they propagate from visited keys, never from keys the row skips.
    Every input is checked (:func:`~sparse_vdit.kernels.checks.check_inputs`) before any kernel runs.

    Returns:
        ``(batch, seq, heads, head_dim)`` output in the dtype of ``q``.
    """
    scale = check_inputs(q, k, v, table, softmax_scale, layout)
    table = table if table.device == q.device else table.to(q.device)
    if torch.compiler.is_compiling():  # no per-table bookkeeping inside a traced graph
        name = resolve(backend, q, table.block_size)
    else:
        name = registry.choose(backend, q, table).name
    if table.all_skip:
        return torch.zeros_like(q)
    if table.all_dense and backend != "reference":
        return dense.forward(q, k, v, kv_len=table.layout.kv_len, softmax_scale=scale, use_fa4=name == "fa4")
    return torch.ops.sparse_vdit.sparse_attention(q, k, v, table.key, scale, name)


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend ``backend`` names for tensors like ``q`` (``auto`` resolved; availability checked)."""
    return resolve(backend, q)


def reorder_heads(x: torch.Tensor, layout: VideoLayout, heads: Sequence[int], to_token_major: bool = True) -> torch.Tensor:
    """Put the video tokens of ``heads`` in token-major order (or back); other heads and text unchanged.

    ``x`` is ``(batch, seq, heads, dim)``. One strided copy of the video part: frame-major
    ``(F, S)`` becomes token-major ``(S, F)``; with some heads only, the rest is copied as is.
    """
    if not heads:
        return x
    b, _, h, d = x.shape
    f, s, v0 = layout.frames, layout.frame_tokens, layout.video_start
    v1 = v0 + layout.video_tokens
    src_shape, dst_shape = ((b, f, s, h, d), (b, s, f, h, d)) if to_token_major else ((b, s, f, h, d), (b, f, s, h, d))
    x = x.contiguous()
    if len(heads) == h:
        out = torch.empty_like(x)
        out[:, :v0], out[:, v1:] = x[:, :v0], x[:, v1:]
        out[:, v0:v1].view(dst_shape).copy_(x[:, v0:v1].view(src_shape).transpose(1, 2))
        return out
    out = x.clone()
    src, dst = x[:, v0:v1].view(src_shape).transpose(1, 2), out[:, v0:v1].view(dst_shape)
    for first, last in _runs(heads):  # one strided copy per run of adjacent heads, no index tensor
        dst[:, :, :, first:last].copy_(src[:, :, :, first:last])
    return out


def _runs(heads: Sequence[int]) -> list[tuple[int, int]]:
    """Ascending head indices as ``[first, last)`` runs of adjacent heads."""
    runs: list[tuple[int, int]] = []
    for h in heads:
        if runs and runs[-1][1] == h:
            runs[-1] = (runs[-1][0], h + 1)
        else:
            runs.append((h, h + 1))
    return runs


@torch.library.custom_op("sparse_vdit::sparse_attention", mutates_args=())
def _sparse_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table_key: int, softmax_scale: float,
                         backend: str) -> torch.Tensor:  # fmt: skip
    """The kernel call behind :func:`sparse_attention`, opaque to ``torch.compile``.

    The table travels as its :attr:`~sparse_vdit.block_table.BlockTable.key` (the op looks the live
    table up), so a compiled graph holds no table tensors and every derived form stays with the table.
    """
    table = table_by_key(table_key)
    chosen = registry.get(backend)
    if chosen.token_major_in_place or not table.token_major_heads:
        return chosen.module.run(q, k, v, table, softmax_scale)
    heads = table.token_major_heads
    q, k, v = (reorder_heads(t, table.layout, heads) for t in (q, k, v))
    out = chosen.module.run(q, k, v, table, softmax_scale)
    return reorder_heads(out, table.layout, heads, to_token_major=False)


@_sparse_attention_op.register_fake
def _(q, k, v, table_key, softmax_scale, backend):
    return torch.empty_like(q)




def __getattr__(name: str):
    if name == "BACKENDS":  # found when first asked for (a new backend is one module)
        return registry.backends()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "reorder_heads", "resolve_backend", "sparse_attention"]
