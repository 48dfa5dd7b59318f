"""`sparse_attention`: the one entry point to every backend, with checks and head reordering."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from functools import lru_cache

import torch

from ..layout import VideoLayout
from ..patterns.table import BlockTable
from . import dense
from .checks import check_inputs

logger = logging.getLogger("sparse_vdit")

BACKENDS = ("auto", "reference", "flex", "fa4", "triton")
FAST_HEAD_DIMS = (64, 128)
RANGE_BACKENDS = ("triton",)  # read key-block ranges and token-major heads in place; the others
# read index lists and need token-major heads permuted in memory


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
    name = resolve_backend(backend, q)
    if name == "fa4":
        name = _fa4_tiles_or_fallback(backend, table.block_size, q)
    table = table if table.device == q.device else table.to(q.device)
    layout = table.layout
    if table.all_skip:
        return torch.zeros_like(q)
    if table.all_dense and backend != "reference":
        return dense.forward(q, k, v, kv_len=layout.kv_len, softmax_scale=scale, use_fa4=name == "fa4")
    kv_indices = None if name in RANGE_BACKENDS else table.kv_indices
    return torch.ops.sparse_vdit.sparse_attention(
        q, k, v, table.kv_num_blocks, kv_indices, table.range_starts, table.range_ends, table.token_major,
        list(table.token_major_heads),
        layout.frames, layout.height, layout.width, layout.text, layout.text_position,
        table.block_size, layout.kv_len, scale, name,
    )  # fmt: skip


def _backend_module(name: str):
    return importlib.import_module(f"sparse_vdit.kernels.{name}")


def _input_problem(name: str, dtype: torch.dtype, head_dim: int) -> str | None:
    if name == "reference":
        return None
    if dtype == torch.float64:
        return f"backend {name!r} takes bf16, fp16 or fp32; float64 runs on the 'reference' backend"
    if head_dim not in FAST_HEAD_DIMS:
        return f"backend {name!r} supports head dims {FAST_HEAD_DIMS}, not {head_dim}"
    if name == "fa4" and dtype == torch.float32:
        return "backend 'fa4' needs bf16 or fp16 inputs, not float32"
    return None


@lru_cache(maxsize=None)
def _availability(name: str, device: torch.device) -> tuple[bool, str]:
    if name == "reference":
        return True, "plain torch"
    if device.type != "cuda" and name != "triton":  # triton also runs under TRITON_INTERPRET=1
        return False, f"{name} needs a CUDA GPU, tensors are on {device}"
    try:
        module = _backend_module(name)
    except ImportError as err:
        return False, f"sparse_vdit.kernels.{name} could not be imported ({err})"
    return module.is_available(device)


_AUTO_ORDER = ("fa4", "triton", "flex", "reference")


@lru_cache(maxsize=None)
def _auto(device: torch.device, dtype: torch.dtype, head_dim: int, passed_over: tuple[str, ...] = ()) -> tuple[str, str]:
    """The first usable backend of ``_AUTO_ORDER`` (less ``passed_over``) and why earlier ones were not."""
    if device.type != "cuda":
        return "reference", f"no fast backend on {device.type}"
    reasons = []
    for name in (n for n in _AUTO_ORDER if n not in passed_over):
        problem = _input_problem(name, dtype, head_dim)
        ok, why = (False, problem) if problem else _availability(name, device)
        if ok:
            return name, "; ".join(reasons)
        reasons.append(f"{name}: {why}")
    raise AssertionError("the reference backend is always available")


_SAID: set = set()


@lru_cache(maxsize=None)
def _fa4_supports(block_size: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    from . import fa4

    return fa4.supports(block_size, head_dim, dtype, device)


def _fa4_tiles_or_fallback(backend: str, block_size: int, q: torch.Tensor) -> str:
    """FA4 runs only some block sizes (64/128 on Hopper, multiples of 256 on Blackwell)."""
    ok, why = _fa4_supports(block_size, q.shape[-1], q.dtype, q.device)
    if ok:
        return "fa4"
    if backend != "auto":
        raise ValueError(why)
    return _auto(q.device, q.dtype, q.shape[-1], ("fa4",))[0]


def resolve_backend(backend: str, q: torch.Tensor) -> str:
    """The backend ``backend`` names for tensors like ``q`` (``auto`` resolved; availability checked)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    device = q.device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if backend == "auto":
        name, skipped = _auto(device, q.dtype, q.shape[-1])
        key = (device, q.dtype, q.shape[-1])
        if key not in _SAID and not torch.compiler.is_compiling():
            _SAID.add(key)
            logger.warning(
                "sparse_vdit: backend 'auto' uses %r for %s head_dim=%d on %s%s",
                name, str(q.dtype).removeprefix("torch."), q.shape[-1], device, f" ({skipped})" if skipped else "",
            )  # fmt: skip
        return name
    problem = _input_problem(backend, q.dtype, q.shape[-1])
    if problem:
        raise ValueError(problem)
    ok, why = _availability(backend, device)
    if not ok:
        raise RuntimeError(f"backend {backend!r} is not available: {why}")
    return backend


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
def _sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kv_num_blocks: torch.Tensor,
    kv_indices: torch.Tensor | None,
    range_starts: torch.Tensor,
    range_ends: torch.Tensor,
    token_major: torch.Tensor,
    token_major_heads: list[int],
    frames: int,
    height: int,
    width: int,
    text: int,
    text_position: str,
    block_size: int,
    kv_len: int,
    softmax_scale: float,
    backend: str,
) -> torch.Tensor:
    layout = VideoLayout(frames, height, width, text, text_position)
    kwargs = dict(block_size=block_size, kv_len=kv_len, softmax_scale=softmax_scale)
    if backend in RANGE_BACKENDS:
        order = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
        tm = token_major if token_major_heads else None
        ranges = (range_starts, range_ends)
        return _backend_module(backend).forward(q, k, v, kv_num_blocks, None, ranges=ranges, token_major=tm, layout=order, **kwargs)
    q, k, v = (reorder_heads(t, layout, token_major_heads) for t in (q, k, v))
    out = _backend_module(backend).forward(q, k, v, kv_num_blocks, kv_indices, **kwargs)
    return reorder_heads(out, layout, token_major_heads, to_token_major=False)


@_sparse_attention_op.register_fake
def _(q, k, v, kv_num_blocks, kv_indices, range_starts, range_ends, *args):
    return torch.empty_like(q)
