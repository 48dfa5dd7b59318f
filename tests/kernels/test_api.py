import pytest
import torch
import torch.nn.functional as F

from helpers import masked_attention, rel_rms, token_mask
from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.kernels import api
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical

MIXED = [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3)]
LAYOUTS = {
    "ragged-frames": (VideoLayout(3, 6, 7), 16),
    "text-prefix": (VideoLayout(3, 5, 9, 13, "prefix"), 16),
    "text-suffix-padded": (VideoLayout(3, 5, 9, 40, "suffix", text_valid=7), 16),
}


def qkv(layout, heads=5, dim=32, batch=2, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g).to(dtype) for _ in range(3)]


@pytest.mark.parametrize("name", LAYOUTS)
def test_reference_equals_per_head_masked_attention(name):
    layout, block = LAYOUTS[name]
    table = compile_layer(MIXED, layout, block)
    q, k, v = qkv(layout)
    out = sparse_attention(q, k, v, table, backend="reference")
    for h in range(table.num_heads):
        expected = masked_attention(q[:, :, h], k[:, :, h], v[:, :, h], token_mask(table, h), 32**-0.5)
        assert rel_rms(out[:, :, h], expected) < 1e-5, table.patterns[h]
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))  # skip head: exact zeros
    assert not out.isnan().any()


def test_token_major_heads_attend_along_time():
    """A narrow multi-diagonal head lets a token see itself in every frame, not its frame neighbours."""
    layout = VideoLayout(8, 8, 8)  # 64-token frames, 512 tokens
    table = compile_layer([multi_diagonal(0.0), temporal(0.0)], layout, 16)
    mask = token_mask(table, 0)
    assert torch.equal(mask, token_mask(table, 1))
    token = 3 * 64 + 10  # frame 3, position 10
    assert all(mask[token, f * 64 + 10] for f in range(8))
    assert not mask[token, 3 * 64 + 40]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_dense_table_matches_sdpa(dtype):
    layout = VideoLayout(2, 5, 7, 6, "prefix")
    table = compile_layer([dense()] * 3, layout, 16)
    q, k, v = qkv(layout, heads=3, dtype=dtype)
    expected = F.scaled_dot_product_attention(*(t.transpose(1, 2).double() for t in (q, k, v))).transpose(1, 2)
    torch_err = rel_rms(F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2), expected)
    for backend in ("reference", "auto"):
        out = sparse_attention(q, k, v, table, backend=backend)
        assert out.dtype == dtype
        assert rel_rms(out, expected) <= max(2 * torch_err, 1e-6), backend


def test_softmax_scale_and_all_skip():
    layout = VideoLayout(2, 4, 4)
    q, k, v = qkv(layout, heads=2)
    table = compile_layer([diagonal(0.5), spatial(1.0)], layout, 16)
    a = sparse_attention(q, k, v, table, softmax_scale=0.5)
    b = sparse_attention(q * (0.5 / 32**-0.5), k, v, table)
    assert rel_rms(a, b) < 1e-6
    zeros = sparse_attention(q, k, v, compile_layer([skip()] * 2, layout, 16))
    assert torch.equal(zeros, torch.zeros_like(q))


def test_custom_op_passes_opcheck_and_compiles():
    layout, block = LAYOUTS["text-suffix-padded"]
    table = compile_layer(MIXED, layout, block)
    q, k, v = qkv(layout)
    args = (q, k, v, table.key, 0.2, "reference")  # the op takes the table by its key
    torch.library.opcheck(torch.ops.sparse_vdit.sparse_attention.default, args)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, table), backend="aot_eager", fullgraph=True)
    assert rel_rms(compiled(q, k, v), sparse_attention(q, k, v, table)) == 0.0


def test_a_fresh_table_compiles_in_one_graph():
    """Nothing read from the table before torch.compile traces the call (Python 3.11's cached_property
    takes a lock dynamo cannot trace: the table caches what every call reads when it is made)."""
    layout = VideoLayout(2, 4, 4)
    table = compile_layer([dense(), diagonal(0.5)], layout, 16)
    q, k, v = qkv(layout, heads=2)
    compiled = torch.compile(lambda q, k, v: sparse_attention(q, k, v, table, backend="reference"),
                             backend="aot_eager", fullgraph=True)  # fmt: skip
    assert rel_rms(compiled(q, k, v), sparse_attention(q, k, v, table, backend="reference")) == 0.0


def _bad(layout, **changes):
    q, k, v = qkv(layout, heads=2)
    args = dict(q=q, k=k, v=v, table=compile_layer([dense(), diagonal(1.0)], layout, 16))
    args.update(changes)
    return args


@pytest.mark.parametrize(
    "change, error, message",
    [
        (lambda a, L: dict(k=a["k"][:, :-1]), ValueError, "shapes differ"),
        (lambda a, L: dict(v=a["v"].half()), TypeError, "dtypes differ"),
        (lambda a, L: dict(q=a["q"].int(), k=a["k"].int(), v=a["v"].int()), TypeError, "not supported"),
        (lambda a, L: dict(q=a["q"][0]), ValueError, "batch, seq, heads"),
        (lambda a, L: dict(table=compile_layer([dense()] * 2, VideoLayout(2, 4, 5), 16)), ValueError, "another layout"),
        (lambda a, L: dict(table=compile_layer([dense()] * 3, L, 16)), ValueError, "3"),
        (lambda a, L: dict(table="dense"), TypeError, "BlockTable"),
        (lambda a, L: dict(q=a["q"].tolist()), TypeError, "torch.Tensor"),
        (lambda a, L: dict(softmax_scale=-1.0), ValueError, "softmax_scale"),
        (lambda a, L: dict(backend="cuda"), ValueError, "unknown backend"),
        (lambda a, L: dict(backend="flex"), ValueError, "head dims"),
    ],
    ids=["shape", "dtype-mismatch", "dtype-unsupported", "rank", "layout", "heads", "table-type", "not-tensor",
         "scale", "backend-name", "head-dim"],
)  # fmt: skip
def test_bad_input_is_rejected_before_any_kernel(change, error, message):
    layout = VideoLayout(2, 4, 4)
    args = _bad(layout)
    args.update(change(args, layout))
    with pytest.raises(error, match=message):
        sparse_attention(**args)


def test_gpu_backends_refuse_cpu_tensors_with_a_reason():
    layout = VideoLayout(2, 8, 8)
    q, k, v = qkv(layout, heads=2, dim=64, dtype=torch.float16)
    table = compile_layer([diagonal(1.0)] * 2, layout, 16)
    for backend in ("fa4", "flex"):
        with pytest.raises(RuntimeError, match="CUDA"):
            sparse_attention(q, k, v, table, backend=backend)


@pytest.mark.parametrize("heads", [[0, 1, 2], [1, 2], [0, 2], []], ids=["all", "contiguous", "scattered", "none"])
def test_reorder_heads_round_trips_and_moves_only_the_given_heads(heads):
    layout = VideoLayout(3, 4, 5, 6, "prefix")
    x = torch.randn(2, layout.num_tokens, 3, 8)
    y = api.reorder_heads(x, layout, heads)
    assert torch.equal(api.reorder_heads(y, layout, heads, to_token_major=False), x)
    perm = layout.token_major_order()
    for h in range(3):
        assert torch.equal(y[:, :, h], x[:, perm, h] if h in heads else x[:, :, h])
