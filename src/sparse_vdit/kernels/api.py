"""`sparse_attention`: the one entry point to every backend, with checks and head reordering."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack, contextmanager

import torch

from ..block_table import BlockTable, table_by_key
from ..layout import VideoLayout
from . import dense, registry
from .checks import check_inputs
from .head_order_op import train_in_head_order
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

    Differentiable on every backend (also under ``torch.compile``), exact for the same table:
    ``triton`` runs its own backward kernels (:mod:`~sparse_vdit.kernels.triton.backward`) from the
    log-sum-exp its forward saves (with token-major heads, by
    :func:`~sparse_vdit.kernels.head_order_op.train_in_head_order`: the forward's head-ordered copies of
    q, k, v are kept, so the backward runs as on frame-major heads); ``fa4`` runs FA4's own block-sparse
    backward where its tiles fit the table (:func:`~sparse_vdit.kernels.fa4.backward_path`, said once in the log), else the Triton
    backward on the permuted tensors with FA4's log-sum-exp; ``flex`` and ``reference`` recompute their
    forward under autograd in the backward. Skipped heads and keys that no query visits get zero gradients.

    Returns:
        ``(batch, seq, heads, head_dim)`` output in the dtype of ``q``.
    """
    scale = check_inputs(q, k, v, table, softmax_scale, layout)
    table = table if table.device == q.device else table.to(q.device)
    if torch.compiler.is_compiling():  # no per-table bookkeeping inside a traced graph
        # a named backend goes to the op as named: its checks walk the package, which dynamo cannot trace
        name = backend if backend in _backend_names() else resolve(backend, q, table.block_size)
    else:
        name = registry.choose(backend, q, table).name
    if table.all_skip:
        return skipped_layer(q, k, v)
    if table.all_dense and backend != "reference":
        use_fa4 = name == "fa4" and not needs_grad(q, k, v)  # FA4's dense call has no backward: SDPA's has
        return dense.forward(q, k, v, kv_len=table.layout.kv_len, softmax_scale=scale, use_fa4=use_fa4)
    if name == "triton" and table.token_major_heads and needs_grad(q, k, v):
        return train_in_head_order(q, k, v, table, scale)
    return torch.ops.sparse_vdit.sparse_attention(q, k, v, table.key, scale, name)[0]


@torch.compiler.assume_constant_result
def _backend_names() -> tuple[str, ...]:
    return registry.names()


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a call on ``tensors``: grad mode on and one of them requires a gradient."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class _SkippedLayer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return torch.zeros_like(q)

    @staticmethod
    def backward(ctx, grad_out):
        return torch.zeros_like(grad_out), torch.zeros_like(grad_out), torch.zeros_like(grad_out)


def skipped_layer(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The output of a layer whose every head is skipped: zeros like ``q``; where q, k or v need a gradient, zeros
    that backpropagate zero gradients to them (as a mixed layer's skipped heads do), so that what made them still
    takes part in the backward (an optimizer sees zeros, not None; DDP finds no unused parameter)."""
    if needs_grad(q, k, v):
        return _SkippedLayer.apply(q, k, v)
    return torch.zeros_like(q)


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
                         backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The kernel call behind :func:`sparse_attention`, opaque to ``torch.compile``: ``(out, lse, q, k, v)``.

    The table travels as its :attr:`~sparse_vdit.block_table.BlockTable.key` (the op looks the live
    table up), so a compiled graph holds no table tensors and every derived form stays with the table.
    ``lse`` is what the backend's backward needs from its forward (``run_with_lse``: the rows'
    log-sum-exp, float32 ``[B, H, N]`` in the order the backend ran them), else an empty tensor.
    The last three are q, k, v as the backend ran them where token-major heads were permuted for it
    (the backward reuses them instead of permuting again), else empty tensors.
    """
    table = table_by_key(table_key)
    module = registry.get(backend).module
    run_with_lse = getattr(module, "run_with_lse", None)
    permuted = _permuted_heads(backend, table)
    if permuted:
        q, k, v = (reorder_heads(t, table.layout, permuted) for t in (q, k, v))
    if run_with_lse is None:
        out, lse = module.run(q, k, v, table, softmax_scale), q.new_empty(0, dtype=torch.float32)
    else:
        out, lse = run_with_lse(q, k, v, table, softmax_scale)
    if permuted:
        return reorder_heads(out, table.layout, permuted, to_token_major=False), lse, q, k, v
    return (out, lse, *(q.new_empty(0) for _ in range(3)))


@_sparse_attention_op.register_fake
def _(q, k, v, table_key, softmax_scale, backend):
    module = registry.get(backend).module
    batch, n, heads, _ = q.shape
    shape = (batch, heads, n) if hasattr(module, "run_with_lse") else (0,)
    permuted = bool(_permuted_heads(backend, table_by_key(table_key)))
    inputs = (torch.empty_like(t) if permuted else q.new_empty(0) for t in (q, k, v))
    return torch.empty_like(q), q.new_empty(shape, dtype=torch.float32), *inputs


def _permuted_heads(backend: str, table: BlockTable) -> tuple[int, ...]:
    """The token-major heads that ``backend`` needs permuted in memory (none where it reads them in place)."""
    return () if registry.get(backend).token_major_in_place else table.token_major_heads


@torch.library.custom_op("sparse_vdit::sparse_attention_backward", mutates_args=())
def _sparse_attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  out: torch.Tensor, lse: torch.Tensor, table_key: int, softmax_scale: float,
                                  backend: str, inputs_permuted: bool = False,
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dq, dk, dv)`` of :func:`_sparse_attention_op`, opaque to ``torch.compile``.

    Token-major heads are permuted exactly as in the forward (a permutation: the gradients go back
    through the inverse); ``inputs_permuted``: q, k, v are the forward's permuted ones already. A
    backend with ``run_backward`` uses it with the forward's ``lse``; the others recompute their
    forward under autograd here.
    """
    table = table_by_key(table_key)
    module = registry.get(backend).module
    permuted = _permuted_heads(backend, table)
    run_backward = getattr(module, "run_backward", None)
    if permuted:
        grad_out = reorder_heads(grad_out, table.layout, permuted)
        if not inputs_permuted:
            q, k, v = (reorder_heads(t, table.layout, permuted) for t in (q, k, v))
        out = reorder_heads(out, table.layout, permuted) if run_backward is not None else out
    if run_backward is not None:
        grads = run_backward(grad_out, q, k, v, out, lse, table, softmax_scale)
    else:
        with autograd_inside_op():
            inputs = [t.detach().requires_grad_() for t in (q, k, v)]
            grads = torch.autograd.grad(module.run(*inputs, table, softmax_scale), inputs, grad_out)
    if permuted:
        grads = tuple(reorder_heads(g, table.layout, permuted, to_token_major=False) for g in grads)
    return tuple(g.contiguous() for g in grads)


@_sparse_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, table_key, softmax_scale, backend, inputs_permuted=False):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, table_key, softmax_scale, backend = inputs
    out, lse, *ran = output
    ctx.inputs_permuted = ran[0].numel() > 0  # the permuted copies the kernel ran on, kept instead of q, k, v
    ctx.save_for_backward(*(ran if ctx.inputs_permuted else (q, k, v)), out, lse)
    ctx.mark_non_differentiable(lse, *ran)
    ctx.set_materialize_grads(False)  # no zeros for the outputs the backward ignores (lse, the permuted copies)
    ctx.table_key, ctx.softmax_scale, ctx.backend = table_key, softmax_scale, backend


def _backward(ctx, grad_out, *_grads_of_the_rest):
    if grad_out is None:  # the output itself took no part in the loss
        return None, None, None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.sparse_vdit.sparse_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, ctx.table_key, ctx.softmax_scale, ctx.backend,
        ctx.inputs_permuted)  # fmt: skip
    return dq, dk, dv, None, None, None


torch.library.register_autograd("sparse_vdit::sparse_attention", _backward, setup_context=_setup_context)


_AUTOGRAD_KEYS = ("ADInplaceOrView", "AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "AutogradCPU",
                  "AutogradCUDA")  # fmt: skip


@contextmanager
def autograd_inside_op():
    """Let autograd record inside a custom op's implementation (which runs below autograd).

    For recomputing a forward to differentiate it there (``torch.autograd.grad``); grad mode on.
    """
    with ExitStack() as stack:
        for name in _AUTOGRAD_KEYS:
            key = getattr(torch._C.DispatchKey, name, None)
            if key is not None:
                stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(key, False))
        stack.enter_context(torch.enable_grad())
        yield




def __getattr__(name: str):
    if name == "BACKENDS":  # found when first asked for (a new backend is one module)
        return registry.backends()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["BACKENDS", "autograd_inside_op", "needs_grad", "reorder_heads", "resolve_backend", "sparse_attention"]
