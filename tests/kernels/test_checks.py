"""Input checks before any kernel, and NaN / inf semantics equal to dense SDPA over the visited keys."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical

LAYOUT = VideoLayout(3, 4, 6, 5, "suffix", text_valid=3)  # 77 tokens: ragged blocks, padded text
HEADS = [dense(), skip(), diagonal(0.5), multi_diagonal(0.2), vertical(((0.0, 1.0),), 0.0)]
BLOCK = 16


def inputs(dtype=torch.float32, dim=64, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, LAYOUT.num_tokens, len(HEADS), dim, generator=g).to(dtype) for _ in range(3)]


def visited_sdpa(q, k, v, table, scale=None):
    """The oracle: per head and query row, dense SDPA (float64) over exactly the keys the row visits,
    in the head's own order; rows that visit nothing are 0."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(table.num_heads):
        order = LAYOUT.token_major_order() if table.patterns[h].token_major else torch.arange(LAYOUT.num_tokens)
        qh, kh, vh = (t[:, order, h].double() for t in (q, k, v))
        blocks = table.block_mask(h)  # [Qb, Kb]
        for i in range(blocks.shape[0]):
            rows = slice(i * BLOCK, min((i + 1) * BLOCK, LAYOUT.num_tokens))
            keys = blocks[i].repeat_interleave(BLOCK)[: LAYOUT.kv_len].nonzero()[:, 0]
            if len(keys):
                o = F.scaled_dot_product_attention(qh[:, None, rows], kh[:, None, keys], vh[:, None, keys], scale=scale)
                out[:, order[rows], h] = o[:, 0]
    return out


def poison(q, k, v, table):
    """NaN and inf where dense attention would be ruined but a sparse row must not see them."""
    q, k, v = (t.clone() for t in (q, k, v))
    q[:, :, 1] = float("inf")  # the skip head: still exactly 0
    q[0, 40, 2] = float("nan")  # one row of the diagonal head: NaN there (as SDPA), not elsewhere
    far = 40  # a key in block 2: the diagonal head's query blocks 0, 1 and 3 never visit it
    assert not table.block_mask(2)[0, far // BLOCK]
    k[1, far, 2] = float("nan")
    v[1, far, 2] = float("inf")
    v[0, 56, 4] = float("nan")  # block 3: the vertical head's query blocks 0-2 visit only the first frame
    k[:, LAYOUT.num_tokens - 1] = float("nan")  # a padded text key: no row ever attends it
    v[:, LAYOUT.num_tokens - 1] = float("inf")
    return q, k, v


def backends():
    out = ["reference"]
    try:
        import triton  # noqa: F401

        out.append("triton")  # the interpreter on the CPU
    except ImportError:
        pass
    if torch.cuda.is_available():
        out += ["flex", "fa4"]
    return out


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")  # numpy, interpreter
@pytest.mark.parametrize("backend", backends())
def test_nan_and_inf_as_dense_sdpa_on_the_visited_keys(backend):
    device = "cuda" if torch.cuda.is_available() and backend != "reference" else "cpu"  # triton: interpreter on CPU
    dtype = torch.float32 if backend != "fa4" else torch.bfloat16
    table = compile_layer(HEADS, LAYOUT, BLOCK)
    q, k, v = poison(*inputs(dtype), table)
    expected = visited_sdpa(q, k, v, table)
    try:
        out = sparse_attention(*(t.to(device) for t in (q, k, v)), table, backend=backend).cpu()
    except (RuntimeError, ValueError) as err:
        pytest.skip(f"{backend} cannot run here: {err}")
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))  # skip head: exact zeros despite inf q
    assert torch.equal(out.isnan(), expected.isnan()), (out.isnan().nonzero().tolist(), expected.isnan().nonzero().tolist())
    assert expected[0, 40, 2].isnan().all() and expected[1, 32:48, 2].isnan().all()  # from visited NaN / inf
    assert expected[0, 48:64, 4].isnan().all()
    assert not expected[1, :32, 2].isnan().any() and not expected[0, :48, 4].isnan().any()  # nothing leaks
    assert not expected[:, :, [0, 3]].isnan().any()
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance, equal_nan=True)


def test_float64_runs_on_the_reference_backend_only():
    table = compile_layer(HEADS, LAYOUT, BLOCK)
    q, k, v = inputs(torch.float64)
    out = sparse_attention(q, k, v, table, backend="reference")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, visited_sdpa(q, k, v, table), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sparse_attention(q, k, v, table), out)  # auto on the CPU: the reference
    with pytest.raises(ValueError, match="float64 runs on the 'reference' backend"):
        sparse_attention(q, k, v, table, backend="triton")


@pytest.mark.parametrize(
    "scale, error, message",
    [(math.inf, ValueError, "finite and positive"), (math.nan, ValueError, "finite and positive"),
     (0.0, ValueError, "finite and positive"), (-0.1, ValueError, "finite and positive"),
     (True, TypeError, "real number"), ("0.1", TypeError, "real number"), (torch.tensor(0.1), TypeError, "real number")],
    ids=["inf", "nan", "zero", "negative", "bool", "str", "tensor"],
)  # fmt: skip
def test_softmax_scale_is_checked(scale, error, message):
    q, k, v = inputs()
    with pytest.raises(error, match=message):
        sparse_attention(q, k, v, compile_layer(HEADS, LAYOUT, BLOCK), softmax_scale=scale)


def test_softmax_scale_numbers_that_are_fine():
    q, k, v = inputs(torch.float64)
    table = compile_layer(HEADS, LAYOUT, BLOCK)
    for scale in (1, np.float64(0.2), 0.05):
        torch.testing.assert_close(sparse_attention(q, k, v, table, softmax_scale=scale),
                                   visited_sdpa(q, k, v, table, scale=float(scale)), rtol=1e-12, atol=1e-12)  # fmt: skip


def test_head_dim_zero_and_odd_sizes_are_refused():
    table = compile_layer(HEADS, LAYOUT, BLOCK)
    for dim in (0, 4, 12, 264):
        q, k, v = inputs(dim=dim)
        with pytest.raises(ValueError, match=f"head_dim {dim} not supported"):
            sparse_attention(q, k, v, table)
    q, k, v = (t[:0] for t in inputs())
    with pytest.raises(ValueError, match="empty batch"):
        sparse_attention(q, k, v, table)


def test_a_table_of_another_layout_with_the_same_token_count_is_refused():
    other = VideoLayout(3, 6, 4, 5, "suffix", text_valid=3)  # 77 tokens too, frames of another shape
    assert other.num_tokens == LAYOUT.num_tokens
    table = compile_layer(HEADS, other, BLOCK)
    q, k, v = inputs()
    with pytest.raises(ValueError, match="the table was compiled for 3x6x4 .* laid out as 3x4x6"):
        sparse_attention(q, k, v, table, layout=LAYOUT)
    with pytest.raises(TypeError, match="layout must be a VideoLayout"):
        sparse_attention(q, k, v, table, layout=(3, 4, 6))
    out = sparse_attention(q, k, v, compile_layer(HEADS, LAYOUT, BLOCK), layout=LAYOUT)
    assert out.shape == q.shape


# --- GPU (skipped without CUDA): `pytest -m gpu -q tests/kernels/test_checks.py` ------------------


@pytest.mark.gpu
def test_gpu_triton_offsets_past_2_31_elements():
    layout = VideoLayout(16, 64, 64)  # 65,536 tokens
    heads, dim, batch = 64, 128, 5  # batch 4 starts at element 4 x 65,536 x 64 x 128 = 2^31
    table = compile_layer([diagonal(0.5), multi_diagonal(0.05)] * (heads // 2), layout, 128, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(batch, layout.num_tokens, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g)
               for _ in range(3))  # fmt: skip
    assert q.numel() > 2**31 and (batch - 1) * q.stride(0) >= 2**31
    out = sparse_attention(q, k, v, table, backend="triton")
    for b in (0, batch - 1):  # the same kernel on one batch element alone (small offsets) gives the same bits
        alone = sparse_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], table, backend="triton")
        assert torch.equal(out[b : b + 1], alone), f"batch element {b} differs"


@pytest.mark.gpu
@pytest.mark.parametrize("block", [64, 32])
def test_gpu_flex_runs_blocks_below_128(block):
    from helpers import rel_rms

    layout = VideoLayout(5, 30, 52, 20, "suffix", text_valid=13)  # ragged blocks, padded text
    heads = [diagonal(0.5), multi_diagonal(0.1), dense(), skip()]
    table = compile_layer(heads, layout, block, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, len(heads), 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    out = sparse_attention(q, k, v, table, backend="flex")
    ref = sparse_attention(q.float(), k.float(), v.float(), table, backend="reference")
    assert rel_rms(out.float(), ref) < 1e-2 and torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))
