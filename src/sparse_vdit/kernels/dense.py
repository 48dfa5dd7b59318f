"""Dense attention on the fastest kernel at hand (cuDNN SDPA on CUDA, or FlashAttention-4)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

_CUDA_ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` on ``[B, N, H, D]`` tensors, cuDNN first on CUDA.

    torch picks FlashAttention-2 by default on these shapes, 1.6-1.8x slower than cuDNN on an H100.
    """
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if q.is_cuda:
        with sdpa_kernel(_CUDA_ORDER, set_priority=True):
            out = F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, scale=softmax_scale)
    return out.transpose(1, 2)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_len: int, softmax_scale: float, use_fa4: bool) -> torch.Tensor:
    """Dense attention over the first ``kv_len`` keys; FlashAttention-4 dense where ``use_fa4``."""
    k, v = k[:, :kv_len], v[:, :kv_len]
    if use_fa4:
        from . import fa4

        return fa4.dense(q, k, v, softmax_scale=softmax_scale)
    return sdpa(q, k, v, softmax_scale).contiguous()


def lse_serves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether cuDNN's attention runs these ``[B, N, H, D]`` inputs with its LSE (:func:`forward_with_lse`)."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16) or not torch.backends.cuda.cudnn_sdp_enabled():
        return False
    params = torch.backends.cuda.SDPAParams(*(t.transpose(1, 2) for t in (q, k, v)), None, 0.0, False, False)
    return torch.backends.cuda.can_use_cudnn_attention(params, False)


def forward_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kv_len: int, softmax_scale: float):
    """``(out, lse)`` of dense attention over the first ``kv_len`` keys by cuDNN (:func:`lse_serves`): the
    output ``[B, N, H, D]`` and each row's log-sum-exp (float32 ``[B, H, N]``), for :func:`backward_from_lse`."""
    q, k, v = (t.transpose(1, 2) for t in (q, k[:, :kv_len], v[:, :kv_len]))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, scale=softmax_scale)[:2]
    return out.transpose(1, 2).contiguous(), lse.reshape(q.shape[:3])


def backward_from_lse(grad_out, q, k, v, out, lse, *, kv_len: int, softmax_scale: float):
    """``(dq, dk, dv)`` of :func:`forward_with_lse` by cuDNN's backward; keys past ``kv_len`` get zero gradients."""
    n = k.shape[1]
    grad_out, q, k, v, out = (t.transpose(1, 2) for t in (grad_out, q, k[:, :kv_len], v[:, :kv_len], out))
    seed = torch.zeros((), dtype=torch.long, device=q.device)  # no dropout: cuDNN reads neither
    dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse.unsqueeze(-1), seed, seed, None, None, None, q.shape[2], kv_len, 0.0, False,
        scale=softmax_scale)  # fmt: skip
    dk, dv = (torch.nn.functional.pad(t.transpose(1, 2), (0, 0, 0, 0, 0, n - kv_len)) for t in (dk, dv))
    return dq.transpose(1, 2).contiguous(), dk.contiguous(), dv.contiguous()
