"""The GPU backends (fa4, flex) against the torch reference, directly and through sparse_attention.

Run on a GPU: ``pytest -m gpu -q tests/kernels/test_gpu_backends.py``. Every case compares with
``kernels.reference`` run in float32 on upcast inputs, by relative RMS error, and allows at most
twice the error of plain torch attention (SDPA) at the same precision on the same layout
(DESIGN.md). Outputs must hold no NaN, skip heads must be exactly zero, padded text keys are
filled with large values so that attending to them would show, and FA4's output buffer starts
as NaN so that unwritten elements would show.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F

from helpers import rel_rms
from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.block_table import num_blocks
from sparse_vdit.kernels import api, reference, registry
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LAYOUTS = {
    # 1560-token frames (12.2 blocks of 128), 77 text tokens after the video, 60 of them real
    "3x30x52+suffix77pad": VideoLayout(3, 30, 52, 77, "suffix", text_valid=60),
    # a smaller one: 480-token frames, 40 text tokens before the video; 1000 tokens, last block ragged
    "2x12x20+prefix40": VideoLayout(2, 12, 20, 40, "prefix"),
}
LAYERS = {
    "dense": [dense()] * 5,
    "skip": [skip()] * 5,
    "diagonal": [diagonal(w) for w in (0.0, 0.3, 0.7, 1.0, 1.6)],
    "multi_diagonal": [multi_diagonal(w) for w in (0.0, 0.02, 0.05, 0.1, 0.25)],
    "vertical": [
        vertical(((0.0, 1.0),), 0.3),
        vertical(((0.0, 0.5),), 0.0),
        vertical(((0.5, 0.75), (1.5, 2.0)), 0.2),
        vertical(((1.0, 1.1),), 1.0),
        vertical(((0.0, 0.05),), 0.6),
    ],
    "spatial": [spatial(w) for w in (0.0, 0.5, 1.0, 1.5, 2.5)],
    "temporal": [temporal(w) for w in (0.0, 0.03, 0.08, 0.15, 0.4)],
    "mixed": [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda"  # a dry run of the harness on the CPU may set this to "cpu"
BATCH, HEADS, BLOCK = 2, 5, 128
_LOG = os.environ.get("SPARSE_VDIT_TEST_LOG")


def _log(**record):
    if _LOG:
        with open(_LOG, "a") as f:
            f.write(json.dumps(record) + "\n")


def _require(backend: str):
    ok, why = registry.available(backend, torch.device("cuda", torch.cuda.current_device()))
    if not ok:
        pytest.skip(f"{backend}: {why}")


@pytest.fixture(autouse=True)
def _poison_fa4(monkeypatch):
    from sparse_vdit.kernels import fa4

    monkeypatch.setattr(fa4, "_POISON", True)


def _inputs(layout: VideoLayout, dtype: torch.dtype, dim: int, seed: int):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k, v = (
        torch.randn(BATCH, layout.num_tokens, HEADS, dim, generator=g, device=DEVICE, dtype=torch.float32)
        for _ in range(3)
    )
    # padded text keys take no part: make them loud, so that a kernel attending to them fails
    k[:, layout.kv_len :] *= 300.0
    v[:, layout.kv_len :] = 1e3
    return q.to(dtype), k.to(dtype), v.to(dtype)


@lru_cache(maxsize=None)
def _torch_error(layout_name: str, dtype_name: str, dim: int) -> float:
    """Relative RMS error of plain SDPA at this precision vs float32 SDPA, dense, same layout."""
    layout, dtype = LAYOUTS[layout_name], DTYPES[dtype_name]
    q, k, v = _inputs(layout, dtype, dim, seed=123)
    q, k, v = q.transpose(1, 2), k[:, : layout.kv_len].transpose(1, 2), v[:, : layout.kv_len].transpose(1, 2)
    low = F.scaled_dot_product_attention(q, k, v)
    high = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return rel_rms(low, high)


def _check(out, ref, table, out_dtype, bound, what):
    assert out.dtype == out_dtype and out.shape == ref.shape
    assert not out.isnan().any(), "NaN in the output"
    for h, p in enumerate(table.patterns):
        if p.name == "skip":
            assert torch.equal(out[:, :, h], torch.zeros_like(out[:, :, h])), f"skip head {h} is not exactly zero"
    live = [h for h, p in enumerate(table.patterns) if p.name != "skip"]
    err = rel_rms(out[:, :, live], ref[:, :, live]) if live else 0.0
    _log(err=err, bound=bound, **what)
    print(what, f"err {err:.2e} bound {bound:.2e}")
    assert err <= bound, f"relative RMS error {err:.3e} > {bound:.3e} (2x plain SDPA)"


# The full grid for fa4; flex compiles a kernel per (shape, dtype, dim), so it gets fewer combinations.
CASES = [
    (backend, layout, layer, dtype, dim)
    for backend in ("fa4", "flex")
    for layout in LAYOUTS
    for dtype in DTYPES
    for dim in (64, 128)
    for layer in LAYERS
    if backend == "fa4" or layout == "2x12x20+prefix40" or (dtype, dim) in (("bf16", 128), ("fp16", 64))
]


@pytest.mark.parametrize("backend, layout_name, layer, dtype_name, dim", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_backend_matches_reference(backend, layout_name, layer, dtype_name, dim):
    """The backend module's forward (the contract api.py calls) on pre-permuted inputs."""
    _require(backend)
    from sparse_vdit.kernels import fa4, flex

    module = {"fa4": fa4, "flex": flex}[backend]
    layout, dtype = LAYOUTS[layout_name], DTYPES[dtype_name]
    table = compile_layer(LAYERS[layer], layout, BLOCK, DEVICE)
    heads = table.token_major_heads
    q, k, v = (api.reorder_heads(t, layout, heads) for t in _inputs(layout, dtype, dim, seed=31 * len(layer) + dim))
    args = (table.kv_num_blocks, table.kv_indices)
    kwargs = dict(block_size=BLOCK, kv_len=layout.kv_len, softmax_scale=dim**-0.5)
    out = module.forward(q, k, v, *args, **kwargs)
    ref = reference.forward(q.float(), k.float(), v.float(), *args, **kwargs)
    bound = 2 * _torch_error(layout_name, dtype_name, dim)
    _check(out, ref, table, dtype, bound, dict(backend=backend, layout=layout_name, layer=layer, dtype=dtype_name, dim=dim))
    # a second call reuses the cached block-sparse objects and gives the same result
    again = module.forward(q, k, v, *args, **kwargs)
    assert torch.equal(out, again)


API_CASES = [(b, L, layer, "bf16", 128) for b in ("fa4", "flex") for L in LAYOUTS for layer in LAYERS] + [
    (b, "2x12x20+prefix40", "mixed", "fp16", 64) for b in ("fa4", "flex")
]


@pytest.mark.parametrize("backend, layout_name, layer, dtype_name, dim", API_CASES, ids=["-".join(map(str, c)) for c in API_CASES])
def test_public_api_matches_reference(backend, layout_name, layer, dtype_name, dim):
    """sparse_attention(..., backend=...) with its token-major permutation, vs the reference backend."""
    _require(backend)
    layout, dtype = LAYOUTS[layout_name], DTYPES[dtype_name]
    table = compile_layer(LAYERS[layer], layout, BLOCK)  # on the CPU: the API moves it
    q, k, v = _inputs(layout, dtype, dim, seed=7)
    out = sparse_attention(q, k, v, table, backend=backend)
    ref = sparse_attention(q.float(), k.float(), v.float(), table, backend="reference")
    bound = 2 * _torch_error(layout_name, dtype_name, dim)
    _check(out, ref, table, dtype, bound, dict(via="api", backend=backend, layout=layout_name, layer=layer, dtype=dtype_name, dim=dim))


def test_fa4_tables_are_cached_per_table():
    _require("fa4")
    from sparse_vdit.kernels import fa4

    layout = LAYOUTS["2x12x20+prefix40"]
    table = compile_layer(LAYERS["mixed"], layout, BLOCK, "cuda")
    first = fa4.table_tensors(table)
    assert fa4.table_tensors(table) is first  # kept with the table
    table.drop_forms()
    assert fa4.table_tensors(table) is not first
    assert first.full_block_cnt.shape == (1, HEADS, table.num_q_blocks)
    assert first.full_block_idx.shape[:3] == (1, HEADS, table.num_q_blocks)


def test_flex_block_mask_is_block_level_and_cached():
    _require("flex")
    from sparse_vdit.kernels import flex

    layout = LAYOUTS["3x30x52+suffix77pad"]
    table = compile_layer(LAYERS["mixed"], layout, BLOCK, "cuda")
    mask = flex.table_mask(table)
    kb = num_blocks(layout.kv_len, BLOCK)
    assert mask.full_kv_indices.shape == (1, HEADS, table.num_q_blocks, kb)  # block level, never N x N
    visited = mask.kv_num_blocks + mask.full_kv_num_blocks
    assert torch.equal(visited[0], table.kv_num_blocks)
    assert flex.table_mask(table) is mask  # kept with the table


def test_fa4_reports_what_it_cannot_run():
    from sparse_vdit.kernels import fa4

    ok, why = fa4.is_available()
    assert isinstance(ok, bool) and why
    if ok:
        assert fa4.supports(128, 128, torch.bfloat16, "cuda")[0] or torch.cuda.get_device_capability()[0] == 10
        assert not fa4.supports(128, 128, torch.float32, "cuda")[0]
