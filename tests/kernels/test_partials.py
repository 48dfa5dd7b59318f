"""The search probe's fused Triton partials against the torch reference (``estimate._partials``),
on random inputs with ragged key blocks and row tiles, in sequence and gathered key order; output
buffers are poisoned so unwritten elements show. On the CPU through the Triton interpreter."""

import pytest
import torch

pytest.importorskip("triton")

from sparse_vdit import VideoLayout  # noqa: E402
from sparse_vdit.kernels.triton import partials as P  # noqa: E402
from sparse_vdit.methods.estimate import _partials  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = {  # name: (batch, rows, heads, dim, kv_len, tokens, block)
    "ragged": (2, 37, 3, 32, 150, 150, 16),
    "kv-shorter-than-tokens": (1, 20, 2, 16, 97, 120, 32),
    "one-block": (1, 5, 1, 64, 11, 11, 16),
}


def _reference(q, k, v, kv_len, block, scale, order):
    keys = order if order is not None else torch.arange(kv_len)
    qh = q.double().transpose(1, 2)
    kh, vh = (t[:, keys.to(t.device)].double().transpose(1, 2) for t in (k, v))
    return _partials((qh @ kh.transpose(-1, -2)) * scale, vh, block, -(-kv_len // block))


@pytest.fixture
def poisoned(monkeypatch):
    real = torch.empty

    def nan_empty(*args, **kwargs):
        return real(*args, **kwargs).fill_(float("nan"))

    monkeypatch.setattr(P.torch, "empty", nan_empty)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_partials_match_torch(case, dtype, gather, poisoned):
    if dtype == torch.bfloat16 and DEVICE == "cpu":
        pytest.skip("the Triton interpreter computes bf16 dots wrongly on the CPU")
    batch, rows, heads, dim, kv_len, tokens, block = CASES[case]
    g = torch.Generator().manual_seed(len(case) + dim)
    q = torch.randn(batch, rows, heads, dim, generator=g) * 1.5
    k = torch.randn(batch, tokens, heads, dim, generator=g)
    v = torch.randn(batch, tokens, heads, dim, generator=g)
    order = torch.randperm(kv_len, generator=g) if gather else None
    scale = dim**-0.5
    got = P.block_partials(*(t.to(DEVICE, dtype) for t in (q, k, v)), kv_len=kv_len, block=block,
                           softmax_scale=scale, order=order)  # fmt: skip
    want = _reference(*(t.to(dtype).float() for t in (q, k, v)), kv_len, block, scale, order)
    tol = 1e-5 if dtype == torch.float32 and DEVICE == "cpu" else 5e-3  # TensorFloat-32 on CUDA
    for name, a, b in zip("azm", got, want):
        assert a.shape == b.shape and a.dtype == torch.float32, name
        assert not a.isnan().any(), f"{name}: unwritten elements"
        assert torch.allclose(a.cpu().double(), b, rtol=tol, atol=tol * b.abs().max().item()), name


def test_token_major_order_of_a_text_layout():
    """The gathered order the probe uses: video keys token-major, text in place."""
    layout = VideoLayout(3, 5, 9, 13, "prefix")
    order = layout.token_major_order("cpu")[: layout.kv_len]
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, n, 2, 16, generator=g) for n in (24, layout.num_tokens, layout.num_tokens))
    got = P.block_partials(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kv_len=layout.kv_len, block=16, softmax_scale=0.25,
                           order=order)  # fmt: skip
    want = _reference(q, k, v, layout.kv_len, 16, 0.25, order)
    tol = 1e-5 if DEVICE == "cpu" else 5e-3  # TensorFloat-32 on CUDA
    for a, b in zip(got, want):
        assert torch.allclose(a.cpu().double(), b, rtol=tol, atol=tol * b.abs().max().item())


def test_bad_arguments_are_refused():
    q = k = v = torch.randn(1, 8, 1, 16)
    with pytest.raises(ValueError, match="power-of-two"):
        P.block_partials(q, k, v, kv_len=8, block=24, softmax_scale=1.0)
    with pytest.raises(ValueError, match="order must be"):
        P.block_partials(q, k, v, kv_len=8, block=16, softmax_scale=1.0, order=torch.arange(5))
