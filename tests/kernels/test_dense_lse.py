"""Dense attention with its LSE by cuDNN (``kernels.dense.forward_with_lse`` / ``backward_from_lse``), the route of
dense layers in compiled training: against float64 autograd of the masked attention, text padding included."""

from __future__ import annotations

import pytest
import torch

from helpers import rel_rms
from sparse_vdit.kernels import dense


def test_cudnn_lse_route_is_not_taken_off_cuda():
    q = torch.randn(1, 8, 2, 64, dtype=torch.bfloat16)
    assert not dense.lse_serves(q, q, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim, kv_len", [(128, 300), (64, 277)], ids=["whole", "text-padding"])
def test_gpu_cudnn_with_lse_matches_float64(dtype, head_dim, kv_len):
    """Output, LSE and gradients (batch 2, 300 rows, keys past ``kv_len`` masked) within 2x of torch's own dense
    attention in the same dtype; dK and dV of the masked keys exactly zero."""
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(2, 300, 3, head_dim, generator=g, device="cuda", dtype=dtype) for _ in range(4))
    if not dense.lse_serves(q, k, v):
        pytest.skip("cuDNN attention does not serve these inputs here")
    scale = head_dim**-0.5

    def torch_dense(q, k, v):  # [B, N, H, D] over the first kv_len keys, autograd
        q, k, v = (t.transpose(1, 2) for t in (q, k[:, :kv_len], v[:, :kv_len]))
        scores = (q @ k.transpose(-1, -2)) * scale
        return (scores.softmax(-1) @ v).transpose(1, 2), scores.logsumexp(-1)

    exact = [t.double().requires_grad_() for t in (q, k, v)]
    out64, lse64 = torch_dense(*exact)
    grads64 = torch.autograd.grad(out64, exact, grad.double())
    low = [t.detach().requires_grad_() for t in (q, k, v)]
    out_low = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (low[0], low[1][:, :kv_len], low[2][:, :kv_len])), scale=scale).transpose(1, 2)
    grads_low = torch.autograd.grad(out_low, low, grad)

    out, lse = dense.forward_with_lse(q, k, v, kv_len=kv_len, softmax_scale=scale)
    assert out.shape == q.shape and out.is_contiguous() and lse.shape == (2, 3, 300) and lse.dtype == torch.float32
    grads = dense.backward_from_lse(grad, q, k, v, out, lse, kv_len=kv_len, softmax_scale=scale)
    out64, out_low = out64.detach(), out_low.detach()
    assert rel_rms(out, out64) <= 2 * rel_rms(out_low, out64) + 1e-6
    assert rel_rms(lse, lse64.detach()) < 1e-3
    for ours, theirs, exact_grad in zip(grads, grads_low, grads64):
        assert ours.shape == exact_grad.shape and torch.isfinite(ours).all()
        assert rel_rms(ours, exact_grad) <= 2 * rel_rms(theirs, exact_grad) + 1e-6
    for ours in grads[1:]:
        assert (ours[:, kv_len:] == 0).all()
