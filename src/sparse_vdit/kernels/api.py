"""`sparse_attention`: the one entry point to every backend, with checks and head reordering."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..block_table import BlockTable, table_by_key
from ..layout import VideoLayout
from . import dense, registry
from .registry import API_DTYPES, resolve


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    table: BlockTable,
    softmax_scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Block-sparse self-attention of one layer, every head in one kernel launch.

    Args:
        q, k, v: ``(batch, seq, heads, head_dim)`` tensors of one dtype (bf16, fp16 or fp32) on
            one device; ``seq`` must equal ``table.layout.num_tokens`` and ``heads`` the table's.
        table: the layer's :class:`~sparse_vdit.patterns.BlockTable` (``compile_layer``); moved
            to the tensors' device if needed (cached).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: ``"fa4"`` (FlashAttention-4 block sparsity, Hopper/Blackwell), ``"triton"``
            (ours), ``"flex"`` (FlexAttention), ``"reference"`` (plain torch, any device), or
            ``"auto"``: the fastest one that runs these inputs and this table, said once in the
            ``sparse_vdit`` log (:mod:`sparse_vdit.kernels.registry`).

    Heads whose pattern needs token-major order are permuted together by one strided copy
    before the kernel and back after it (:func:`reorder_heads`), or read in place by the Triton
    kernel. Padded text keys (``layout.kv_len``) are never attended; a query row that visits no
    key block (``skip`` heads) comes out exactly zero.

    Returns:
        ``(batch, seq, heads, head_dim)`` output in the dtype of ``q``.
    """
    scale = _check(q, k, v, table, softmax_scale)
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


def _check(q, k, v, table, softmax_scale) -> float:
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
    if q.dtype not in API_DTYPES:
        raise TypeError(f"dtype {q.dtype} not supported; use one of {[str(d) for d in API_DTYPES]}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v are on different devices: {q.device}, {k.device}, {v.device}")
    _, seq, heads, dim = q.shape
    if seq != table.layout.num_tokens:
        raise ValueError(
            f"sequence length {seq} does not match the table's layout "
            f"({table.layout.describe()} = {table.layout.num_tokens} tokens): table built for another layout"
        )
    if heads != table.num_heads:
        raise ValueError(f"{heads} heads in q but the table has {table.num_heads}")
    if dim > 256 or dim % 8:
        raise ValueError(f"head_dim {dim} not supported (a multiple of 8, at most 256)")
    if softmax_scale is None:
        return dim**-0.5
    if not softmax_scale > 0:
        raise ValueError(f"softmax_scale must be positive, got {softmax_scale!r}")
    return float(softmax_scale)



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
