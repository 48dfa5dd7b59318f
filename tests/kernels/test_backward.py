"""Gradients of sparse_attention on every backend against float64 autograd of dense masked attention.

The oracle is ``helpers.masked_attention`` (per head, token mask from the table, float64) under
autograd; a backend may be at most twice as wrong as plain dense torch attention (SDPA) at the
same precision, by relative RMS error of dq, dk and dv (DESIGN.md). The Triton kernels run under
the interpreter on the CPU (fp16/fp32, small sizes); the gpu-marked tests take bigger layouts on
triton, flex and fa4 in bf16/fp16 (fa4 with each of its backwards: FA4's block-sparse one and the
Triton one): ``pytest -m gpu -q tests/kernels/test_backward.py``. The fa4 route on the CPU, FA4 faked:
test_fa4_backward.py.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_gradients, grads, masked_attention, poison_empty_like, rel_rms, token_mask
from sparse_vdit import VideoLayout, clear_caches, compile_layer, sparse_attention
from sparse_vdit.block_table import transpose_ranges
from sparse_vdit.kernels.head_order import attention_in_head_order
from sparse_vdit.kernels import registry
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical
from strategies import examples, layouts, patterns

torch.set_num_threads(1)
try:
    from sparse_vdit.kernels.triton.backward import VARIANTS
except ImportError:  # no triton: the Triton tests skip
    VARIANTS = {"default": {}}

MIXED = [dense(), skip(), diagonal(0.5), multi_diagonal(0.1), vertical(((0.0, 1.0),), 0.3)]
CASES = {  # layout, block, heads, batch, head dim: small, for the interpreter
    "mixed-text-suffix-padded-batch2": (VideoLayout(2, 5, 9, 20, "suffix", text_valid=7), 32, MIXED, 2, 64),
    "mixed-text-prefix-d128": (VideoLayout(3, 4, 7, 13, "prefix"), 32, MIXED[:4], 1, 128),
    "svg-spatial-temporal-batch2": (VideoLayout(4, 4, 6), 32, [spatial(1.0), temporal(0.2), spatial(0.0)], 2, 64),
    "odd-frames-ragged-block16": (VideoLayout(3, 5, 7), 16, [diagonal(0.5), multi_diagonal(0.2)], 1, 64),
}
# a ragged last query block and key range with a whole step before their ragged one (the variant tests'
# 16-row steps on 32-token blocks: 120 tokens, 118 real keys)
RAGGED_STEPS = (VideoLayout(2, 5, 9, 30, "suffix", text_valid=28), 32, MIXED, 1, 64)
GPU_CASES = {
    # 1560-token frames (12.2 blocks of 128), 77 text tokens after the video, 60 real
    "3x30x52+suffix77pad": (VideoLayout(3, 30, 52, 77, "suffix", text_valid=60), 128, [*MIXED, temporal(0.1)], 2, 128),
    "2x12x20+prefix40-d64": (VideoLayout(2, 12, 20, 40, "prefix"), 128, MIXED, 1, 64),
    # 3240 tokens (40 in the last block: a whole 32-query step, then a ragged one), 3150 real keys (78 in the last)
    "2x30x52+suffix120pad-ragged-steps": (VideoLayout(2, 30, 52, 120, "suffix", text_valid=30), 128, MIXED, 1, 128),
}


def _needs_interpreter() -> None:
    """Skip unless the Triton backend runs on the CPU (triton installed, TRITON_INTERPRET=1)."""
    pytest.importorskip("triton")
    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1)")


def _inputs(layout, heads, batch, dim, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(batch, layout.num_tokens, heads, dim, generator=g, device=device) for _ in range(4)]


def _oracle(table, q, k, v, grad_out, scale):
    """Float64 autograd of per-head masked attention with the table's token masks."""

    def fn(q, k, v):
        heads = []
        for h in range(table.num_heads):
            mask = token_mask(table, h).to(q.device)
            heads.append(masked_attention(q[:, :, h], k[:, :, h], v[:, :, h], mask, scale))
        return torch.stack(heads, dim=2)

    return grads(fn, torch.float64, q, k, v, grad_out)


def _dense_error(dtype, q, k, v, grad_out, kv_len):
    """How wrong plain dense SDPA's (out, dq, dk, dv) over the real keys are at ``dtype`` (the DESIGN.md yardstick)."""

    def sdpa(q, k, v):
        q, k, v = q.transpose(1, 2), k[:, :kv_len].transpose(1, 2), v[:, :kv_len].transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)

    exact = grads(sdpa, torch.float64, q, k, v, grad_out)
    approx = grads(sdpa, dtype, q, k, v, grad_out)
    return [rel_rms(a, b) for a, b in zip(approx, exact)]


def _check(case, backend, dtype, device, floor, monkeypatch=None, route="api"):
    """``route``: ``api`` (``sparse_attention``; Triton with token-major heads: the head-order op, checked
    to run) or ``op`` (the ``sparse_attention`` op itself: token-major heads read in place)."""
    layout, block, heads, batch, dim = case
    table = compile_layer(heads, layout, block, device)
    q, k, v, grad_out = _inputs(layout, len(heads), batch, dim, device)
    k[:, layout.kv_len :] = 1e4  # padded text keys: attending to them, or differentiating them, would show
    calls = []
    if monkeypatch is not None:  # every buffer allocated with empty_like starts as NaN: unwritten elements show
        poison_empty_like(monkeypatch)
        real = torch.ops.sparse_vdit.attention_in_head_order
        monkeypatch.setattr(torch.ops.sparse_vdit, "attention_in_head_order",
                            lambda *a: calls.append(1) or real(*a), raising=False)  # fmt: skip
    if route == "op":
        def attend(q, k, v):
            return torch.ops.sparse_vdit.sparse_attention(q, k, v, table.key, dim**-0.5, backend)[0]
    else:
        def attend(q, k, v):
            return sparse_attention(q, k, v, table, backend=backend)
    got = grads(attend, dtype, q, k, v, grad_out)
    if monkeypatch is not None:
        monkeypatch.undo()
        assert bool(calls) == (backend == "triton" and route == "api" and bool(table.token_major_heads)), calls
    expected = _oracle(table, q, k, v, grad_out, dim**-0.5)
    bounds = [max(2 * e, floor) for e in _dense_error(dtype, q, k, v, grad_out, layout.kv_len)]
    assert all(b == b for b in bounds)  # no NaN yardstick
    assert_gradients(got, expected, bounds, heads, layout.kv_len)


@pytest.mark.parametrize("case", CASES)
def test_reference_backward_matches_masked_attention(case):
    _check(CASES[case], "reference", torch.float32, "cpu", 1e-6)


@pytest.mark.parametrize("route", ["api", "op"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_triton_backward_matches_masked_attention(case, dtype, route, monkeypatch):
    _needs_interpreter()
    _check(CASES[case], "triton", dtype, "cpu", 2e-6, monkeypatch, route)


def _variant_options(name: str, block: int) -> dict:
    """A backward variant's options, its tiles (set for 128-token blocks) scaled to ``block`` (at least 16)."""
    from sparse_vdit.kernels.triton.backward import OPTIONS

    options = {**dict.fromkeys(OPTIONS), **VARIANTS[name]}
    tiles = options["tiles"] or (128, 32, 128, 64)  # the GPU rule's, not the interpreter's whole blocks: steps split
    options["tiles"] = tuple(max(16, t * block // 128) for t in tiles)
    return options


@pytest.mark.parametrize("route", ["api", "op"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["mixed-text-suffix-padded-batch2", "mixed-text-prefix-d128", "ragged-steps"])
def test_triton_backward_variants_match_masked_attention(case, variant, route, monkeypatch):
    """Every candidate of bench/backward.py --variants (fp16, tiles split into several steps per block,
    ragged last blocks, text, token-major and skipped heads), by both routes."""
    _needs_interpreter()
    from sparse_vdit.kernels.triton import backward

    layout = RAGGED_STEPS if case == "ragged-steps" else CASES[case]
    for key, value in _variant_options(variant, layout[1]).items():
        monkeypatch.setitem(backward.OPTIONS, key, value)
    _check(layout, "triton", torch.float16, "cpu", 2e-6, monkeypatch, route)


@st.composite
def layer_cases(draw, layout_cases=layouts(min_keys=2), blocks=(16, 32)):
    """(layout, block, heads, batch, head dim): a random layout of ``layout_cases`` (small by default: text before,
    after or none, padded or not), a block of ``blocks`` and one random pattern per head, some with a sink."""
    layout = draw(layout_cases)
    heads = draw(st.lists(patterns(), min_size=1, max_size=4))
    return layout, draw(st.sampled_from(blocks)), heads, draw(st.integers(1, 2)), draw(st.sampled_from([64, 128]))


@examples(8)
@given(case=layer_cases(), dtype=st.sampled_from([torch.float16, torch.float32]), route=st.sampled_from(["api", "op"]),
       variant=st.sampled_from([None, *VARIANTS]))
def test_triton_forward_and_backward_on_random_layers(case, dtype, route, variant):
    """Any layout and any mix of patterns: the Triton forward and backward (interpreter) against float64 autograd of
    the masked attention, every buffer NaN-poisoned; with the interpreter's tiles (``variant`` None) or under a
    backward variant of bench/backward.py with its GPU tiles scaled to the block (steps split, ragged ones). The
    same 8 examples on every run; ``SPARSE_VDIT_EXAMPLES=N`` draws N new ones."""
    _needs_interpreter()
    from sparse_vdit.kernels.triton import backward

    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in (_variant_options(variant, case[1]) if variant else {}).items():
            monkeypatch.setitem(backward.OPTIONS, key, value)
        _check(case, "triton", dtype, "cpu", 2e-6, monkeypatch, route)


@examples(4)
@given(case=layer_cases(), budget_pairs=st.integers(1, 6), route=st.sampled_from(["api", "op"]), side_out=st.booleans(),
       split=st.sampled_from([0.0, 0.5]))
def test_triton_backward_on_random_layers_in_key_block_windows(case, budget_pairs, route, side_out, split):
    """Any layout and mix of patterns with a dS share of a few pairs' tiles: heads in key-block windows (dQ adding
    their parts) and, where one key block's tiles are over it, recomputing, against float64 autograd, every buffer
    NaN-poisoned (fp16, the interpreter's tiles); ``side_out``: token-major heads' gradients in side buffers too;
    ``split``: the dQ split's share (its recomputing blocks adding their windows' parts too)."""
    _needs_interpreter()
    from sparse_vdit.kernels.triton import backward, ds_tiles

    layout, block, heads, batch, _ = case
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setitem(backward.OPTIONS, "side_out", side_out)
        monkeypatch.setitem(backward.OPTIONS, "dq_split", split)
        monkeypatch.setattr(ds_tiles, "budget", lambda device, share: budget_pairs * batch * block * block * 2)
        _check(case, "triton", torch.float16, "cpu", 2e-6, monkeypatch, route)


def test_head_chunks_fit_the_budget_in_order():
    pytest.importorskip("triton")
    from sparse_vdit.kernels.triton.ds_tiles import Chunk, head_chunks

    counts = torch.tensor([[1, 2, 0], [0, 0, 0], [2, 1, 1], [1, 0, 1]])  # pairs by (head, key block): 3, 0, 4, 2
    assert head_chunks(counts, 10, 1000) == [Chunk(0, 4, True)]
    assert head_chunks(counts, 10, 70) == [Chunk(0, 3, True), Chunk(3, 4, True)]
    assert head_chunks(counts, 10, 40) == [Chunk(0, 2, True), Chunk(2, 3, True), Chunk(3, 4, True)]
    assert head_chunks(torch.zeros(1, 2, dtype=torch.int64), 10, 0) == [Chunk(0, 1, True)]
    # a head over the budget alone: in key-block windows, a part beside the heads before or after where room is left
    assert head_chunks(counts, 10, 39) == [Chunk(0, 2, True), Chunk(2, 3, True, ((0, 2),)),
                                           Chunk(2, 4, True, ((2, 3), (0, 3)))]
    assert head_chunks(counts, 10, 20) == [Chunk(0, 1, True, ((0, 1),)), Chunk(0, 2, True, ((1, 3), (0, 3))),
                                           Chunk(2, 3, True, ((0, 1),)), Chunk(2, 3, True, ((1, 3),)),
                                           Chunk(3, 4, True)]
    # a key block over the budget alone: the head recomputes, neighbours among such heads in one run
    assert head_chunks(counts, 10, 10) == [Chunk(0, 1, False), Chunk(1, 2, True), Chunk(2, 3, False),
                                           Chunk(3, 4, True, ((0, 2),)), Chunk(3, 4, True, ((2, 3),))]
    assert head_chunks(counts[[0, 2, 1, 3]], 10, 10) == [Chunk(0, 2, False), Chunk(2, 4, True, ((0, 3), (0, 2))),
                                                         Chunk(3, 4, True, ((2, 3),))]
    for limit in (10, 20, 30, 39, 50):  # every pair in exactly one chunk, each stored chunk within the budget
        seen = torch.zeros_like(counts)
        for c in head_chunks(counts, 10, limit):
            windows = c.keys or [(0, counts.shape[1])] * (c.h1 - c.h0)
            for i, (lo, hi) in enumerate(windows):
                seen[c.h0 + i, lo:hi] += 1
            pairs = sum(int(counts[c.h0 + i, lo:hi].sum()) for i, (lo, hi) in enumerate(windows))
            assert not c.stored or pairs * 10 <= limit
        assert bool((seen == 1).all())


CHUNK_CASES = [(None, False, 0.0), (40, True, 0.0), (15, False, 0.0), (4, True, 0.0), (1, False, 0.0), (40, True, 0.5),
               (4, False, 0.5)]  # (dS share in pairs' tiles, descriptors, dQ split)


@pytest.mark.parametrize("budget_pairs, tma, split", CHUNK_CASES)
def test_triton_backward_stored_ds_in_head_chunks(budget_pairs, tma, split, monkeypatch):
    """The stored-dS dQ with every head in one launch, heads in chunks of at most 40 pairs' tiles
    (several launches), heads over a 15- and a 4-pair budget (in key-block windows, dQ adding their parts),
    and a budget no key block fits (those heads recompute); tiles by pointers and by descriptors; under the dQ split
    too: all against float64, every buffer (the stored tiles too) NaN-poisoned."""
    _needs_interpreter()
    from sparse_vdit.kernels.triton import backward, ds_tiles

    case = CASES["mixed-text-suffix-padded-batch2"]
    layout, block, heads, batch, _ = case
    pair_bytes = batch * block * block * 2
    for key, value in _variant_options("default", block).items():
        monkeypatch.setitem(backward.OPTIONS, key, value)
    monkeypatch.setitem(backward.OPTIONS, "tma", tma)
    monkeypatch.setitem(backward.OPTIONS, "dq_split", split)
    if budget_pairs is not None:
        monkeypatch.setattr(ds_tiles, "budget", lambda device, share: budget_pairs * pair_bytes)
    chunks = []
    real = ds_tiles.head_chunks
    monkeypatch.setattr(ds_tiles, "head_chunks", lambda *a: chunks.append(real(*a)) or chunks[-1])
    clear_caches()  # the chunks are kept with the table: another test's may be there
    _check(case, "triton", torch.float16, "cpu", 2e-6, monkeypatch)
    assert chunks, "the stored path was not asked for"
    stored = [c.stored for c in chunks[-1]]
    windowed = [c.keys is not None for c in chunks[-1]]
    if budget_pairs is None:
        assert chunks[-1] == [ds_tiles.Chunk(0, len(heads), True)]
    elif budget_pairs == 40:
        assert len(stored) > 1 and all(stored) and not any(windowed)
    elif budget_pairs in (15, 4):  # pairs by head: 16, 0 (skipped), 14, 14, 16; at most 4 a key block
        assert all(stored) and any(windowed)
    else:
        assert stored == [False, True, False]  # the skipped head has no pairs: it fits; the last three recompute together


@pytest.mark.parametrize("windows", [False, True])
def test_triton_backward_recomputes_when_no_memory_is_left_for_the_tiles(windows, monkeypatch):
    """Out of memory for the dS tiles: the heads recompute instead, nothing fails, gradients exact; with heads in
    key-block windows (a 4-pair budget), every other chunk finds no memory (its dQ part recomputed and added)."""
    _needs_interpreter()
    from sparse_vdit.kernels.triton import backward, ds_tiles

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("no room for the tiles")

    assert ds_tiles.buffer((2, 3), torch.float16, torch.device("cpu"), allocate=no_memory) is None
    asked = []
    real = ds_tiles.buffer
    case = CASES["mixed-text-suffix-padded-batch2"] if windows else RAGGED_STEPS
    if windows:
        monkeypatch.setattr(ds_tiles, "budget", lambda device, share: 4 * case[3] * case[1] ** 2 * 2)
    monkeypatch.setattr(ds_tiles, "buffer", lambda *a: asked.append(a) or real(
        *a, allocate=no_memory if not windows or len(asked) % 2 else None))  # fmt: skip
    for key, value in _variant_options("default", case[1]).items():
        monkeypatch.setitem(backward.OPTIONS, key, value)
    _check(case, "triton", torch.float16, "cpu", 2e-6, monkeypatch)
    assert len(asked) > (4 if windows else 0)


def test_triton_backward_on_permuted_tensors_as_fa4_runs_it():
    """The FA4 route: tensors already in each head's order (and the forward's LSE in that order),
    the Triton backward told not to permute, gradients permuted back: same as reading in place."""
    _needs_interpreter()
    from sparse_vdit.kernels.api import reorder_heads
    from sparse_vdit.kernels.triton import backend, launcher
    from sparse_vdit.kernels.triton.backward import backward

    layout, block, heads, batch, dim = CASES["svg-spatial-temporal-batch2"]
    table = compile_layer(heads, layout, block)
    q, k, v, grad_out = _inputs(layout, len(heads), batch, dim)
    scale = dim**-0.5
    out, lse = backend.run_with_lse(q, k, v, table, scale)
    in_place = backward(grad_out, q, k, v, out, lse, table, scale)
    moved = table.token_major_heads
    qp, kp, vp, gp = (reorder_heads(t, layout, moved) for t in (q, k, v, grad_out))
    out_p, lse_p = launcher.forward(qp, kp, vp, table.kv_num_blocks, None, block_size=block, kv_len=layout.kv_len,
                                    softmax_scale=scale, ranges=(table.range_starts, table.range_ends), return_lse=True)
    assert rel_rms(reorder_heads(out_p, layout, moved, to_token_major=False), out) < 1e-6
    permuted = backward(gp, qp, kp, vp, out_p, lse_p, table, scale, token_major=False)
    for a, b in zip(permuted, in_place):
        assert rel_rms(reorder_heads(a, layout, moved, to_token_major=False), b) < 1e-6


def test_backward_reuses_the_forwards_permuted_inputs(monkeypatch):
    """A backend that runs token-major heads permuted (reference here, fa4 and flex on the GPU) keeps
    the q, k, v it ran on for the backward: only grad_out goes in and dq, dk, dv come back (4 copies,
    not 7); gradients as before."""
    from sparse_vdit.kernels import api

    layout, block, heads, batch, dim = CASES["svg-spatial-temporal-batch2"]
    table = compile_layer(heads, layout, block)
    assert table.token_major_heads
    q, k, v, grad_out = _inputs(layout, len(heads), batch, dim)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = sparse_attention(*leaves, table, backend="reference")
    copies = []
    real = api.reorder_heads
    monkeypatch.setattr(api, "reorder_heads", lambda *a, **kw: copies.append(1) or real(*a, **kw))
    out.backward(grad_out)
    assert len(copies) == 4
    expected = _oracle(table, q, k, v, grad_out, dim**-0.5)
    for got, exact in zip((t.grad for t in leaves), expected[1:]):
        assert rel_rms(got, exact) < 1e-5


def test_transposed_table_lists_the_query_blocks_of_each_key_block():
    layout, block, heads, _, _ = CASES["mixed-text-suffix-padded-batch2"]
    table = compile_layer([*heads, temporal(0.1)], layout, 16)
    starts, ends = table.query_ranges
    rows = torch.arange(table.num_q_blocks)
    assert starts.shape[:2] == (table.num_heads, table.num_q_blocks)  # one row per block of the sequence
    for h in range(table.num_heads):
        got = ((rows[None, None, :] >= starts[h][..., None]) & (rows[None, None, :] < ends[h][..., None])).any(1)
        expected = torch.zeros(table.num_q_blocks, table.num_q_blocks, dtype=torch.bool)
        expected[: table.num_kv_blocks] = table.block_mask(h).T
        assert torch.equal(got, expected), h
        assert torch.equal(table.query_num_blocks[h], expected.sum(1, dtype=torch.int32))
    assert table.query_ranges[0] is starts  # kept with the table
    empty = transpose_ranges(torch.zeros(1, 2, 1, dtype=torch.int32), torch.zeros(1, 2, 1, dtype=torch.int32), 3)
    assert [t.shape for t in empty] == [(1, 3, 1)] * 2 and not empty[1].any()


def test_stored_tile_slots_agree_between_the_table_and_its_transpose():
    """Each visited pair's slot, counted in the forward ranges' order (the dQ kernel's), is the one the
    dK/dV kernel finds through the transposed table's list (where each query range starts in it)."""
    pytest.importorskip("triton")
    from sparse_vdit.kernels.triton.ds_tiles import slots

    layout, _, heads, _, _ = CASES["mixed-text-suffix-padded-batch2"]
    table = compile_layer([*heads, temporal(0.1)], layout, 16)
    first, head_first, by_column, q_first = slots(table)
    expected, slot = {}, 0
    for h in range(table.num_heads):
        for qb in range(table.num_q_blocks):
            for r in range(table.range_starts.shape[2]):
                s, e = int(table.range_starts[h, qb, r]), int(table.range_ends[h, qb, r])
                if e > s:
                    assert int(first[h, qb, r]) == slot
                for kb in range(s, e):
                    expected[h, qb, kb] = slot
                    slot += 1
        assert head_first[h + 1] == slot
    q_starts, q_ends = table.query_ranges
    found = {}
    for h, kb, r in zip(*torch.nonzero(q_ends > q_starts, as_tuple=True)):
        for qb in range(int(q_starts[h, kb, r]), int(q_ends[h, kb, r])):
            found[int(h), qb, int(kb)] = int(by_column[q_first[h, kb, r] + qb - q_starts[h, kb, r]])
    assert found == expected and len(by_column) == slot


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_backward_compiles_and_matches_eager(backend):
    """Compiled (the whole graph) gradients equal the eager ones; Triton: token-major heads through the head-order
    op in the graph too."""
    if backend == "triton" and not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1)")
    layout, block, heads, batch, dim = CASES["mixed-text-suffix-padded-batch2"]
    table = compile_layer(heads, layout, block)
    q, k, v, grad_out = _inputs(layout, len(heads), batch, dim)

    def attend(q, k, v):
        return sparse_attention(q, k, v, table, backend=backend)

    ops = []

    def recording(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    eager = grads(attend, torch.float32, q, k, v, grad_out)
    compiled = grads(torch.compile(attend, backend="aot_eager", fullgraph=True), torch.float32, q, k, v, grad_out)
    for a, b in zip(compiled, eager):
        assert rel_rms(a, b) == 0.0
    if backend == "triton":
        torch._dynamo.reset()
        grads(torch.compile(attend, backend=recording, fullgraph=True), torch.float32, q, k, v, grad_out)
        assert "sparse_vdit.attention_in_head_order" in ops, ops


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_backward_compiles_with_inductor_and_matches_eager():
    """Inductor on the GPU (bf16, Triton backend, token-major heads): the head-order op in the graph, the
    compiled gradients equal to the eager ones and within twice dense SDPA's error of float64."""
    device = torch.device("cuda", torch.cuda.current_device())
    ok, why = registry.available("triton", device)
    if not ok:
        pytest.skip(why)
    layout, block, heads, batch, dim = GPU_CASES["3x30x52+suffix77pad"]
    table = compile_layer(heads, layout, block, device)
    q, k, v, grad_out = _inputs(layout, len(heads), batch, dim, device)

    def attend(q, k, v):
        return sparse_attention(q, k, v, table, backend="triton")

    ops = []

    def recording(gm, example_inputs):
        ops.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    grads(torch.compile(attend, backend=recording, fullgraph=True), torch.bfloat16, q, k, v, grad_out)
    assert "sparse_vdit.attention_in_head_order" in ops, ops
    torch._dynamo.reset()
    eager = grads(attend, torch.bfloat16, q, k, v, grad_out)
    compiled = grads(torch.compile(attend, fullgraph=True), torch.bfloat16, q, k, v, grad_out)
    expected = _oracle(table, q, k, v, grad_out, dim**-0.5)
    bounds = _dense_error(torch.bfloat16, q, k, v, grad_out, layout.kv_len)
    for a, b, ref, bound in zip(compiled, eager, expected, bounds):
        assert rel_rms(a, b) == 0.0
        assert rel_rms(a, ref) <= 2 * bound
    torch._dynamo.reset()


def test_backward_op_passes_opcheck():
    layout, block, heads, batch, dim = CASES["svg-spatial-temporal-batch2"]
    table = compile_layer(heads, layout, block)
    q, k, v, _ = _inputs(layout, len(heads), batch, dim)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(torch.ops.sparse_vdit.sparse_attention.default, (q, k, v, table.key, 0.2, "reference"))


def test_every_backend_declares_a_backward():
    assert all(registry.get(name).backward for name in registry.names())


def test_dense_and_skip_tables_differentiate():
    layout = VideoLayout(2, 4, 4)
    q, k, v, grad_out = _inputs(layout, 2, 1, 32)
    dense_table = compile_layer([dense()] * 2, layout, 16)
    got = grads(lambda q, k, v: sparse_attention(q, k, v, dense_table), torch.float32, q, k, v, grad_out)
    expected = _oracle(dense_table, q, k, v, grad_out, 32**-0.5)
    assert all(rel_rms(a, b) < 1e-5 for a, b in zip(got, expected))
    skip_table = compile_layer([skip()] * 2, layout, 16)  # zeros, whose backward reaches q, k, v with zeros
    calls = {"api": lambda q, k, v: sparse_attention(q, k, v, skip_table),
             "head order": lambda q, k, v: attention_in_head_order(q, k, v, skip_table),
             "compiled": torch.compile(lambda q, k, v: sparse_attention(q, k, v, skip_table), backend="aot_eager",
                                       fullgraph=True)}  # fmt: skip
    for name, call in calls.items():
        out, *gradients = grads(call, torch.float32, q, k, v, grad_out)
        assert torch.equal(out, torch.zeros_like(out)), name
        assert all(g is not None and torch.equal(g, torch.zeros_like(q)) for g in gradients), name
    with torch.no_grad():
        assert sparse_attention(q.requires_grad_(), k, v, skip_table).grad_fn is None



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["triton", "triton-op", "flex", "fa4"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_backward_matches_masked_attention(case, backend, dtype, monkeypatch):
    backend, route = ("triton", "op") if backend == "triton-op" else (backend, "api")
    ok, why = registry.available(backend, torch.device("cuda", torch.cuda.current_device()))
    if not ok:
        pytest.skip(why)
    layout, block, heads, batch, dim = GPU_CASES[case]
    problem = registry.get(backend).table_problem(block, dim, dtype, torch.device("cuda", torch.cuda.current_device()))
    if problem:
        pytest.skip(problem)
    _check(GPU_CASES[case], backend, dtype, "cuda", 1e-6, monkeypatch if backend == "triton" else None, route)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("route", ["api", "op"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_triton_backward_variants_match_masked_attention(case, variant, route, monkeypatch):
    """Every Triton backward variant on the GPU (bf16; its own tiles, TMA), buffers NaN-poisoned, by both routes."""
    device = torch.device("cuda", torch.cuda.current_device())
    ok, why = registry.available("triton", device)
    if not ok:
        pytest.skip(why)
    from sparse_vdit.kernels.triton import backward

    for key, value in VARIANTS[variant].items():
        monkeypatch.setitem(backward.OPTIONS, key, value)
    _check(GPU_CASES[case], "triton", torch.bfloat16, "cuda", 1e-6, monkeypatch, route)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@examples(12)
@given(case=layer_cases(layouts(4, 20, 30, 80, min_keys=2), blocks=(64, 128)),
       route=st.sampled_from(["api", "op"]), variant=st.sampled_from(list(VARIANTS)))
def test_gpu_triton_on_random_layers(case, route, variant):
    """The GPU twin of :func:`test_triton_forward_and_backward_on_random_layers`: bf16, the kernels' own tiles and
    TMA, every backward variant, buffers NaN-poisoned; layouts where the tiles split blocks and frames are ragged."""
    device = torch.device("cuda", torch.cuda.current_device())
    ok, why = registry.available("triton", device)
    if not ok:
        pytest.skip(why)
    from sparse_vdit.kernels.triton import backward

    with pytest.MonkeyPatch.context() as monkeypatch:
        for key, value in VARIANTS[variant].items():
            monkeypatch.setitem(backward.OPTIONS, key, value)
        _check(case, "triton", torch.bfloat16, "cuda", 1e-6, monkeypatch, route)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("path", ["fa4", "triton"])
@pytest.mark.parametrize("case", GPU_CASES)
def test_gpu_fa4_backward_paths_match_masked_attention(case, path, dtype, monkeypatch):
    """The fa4 backend with each of its backwards forced (``fa4.BACKWARD``): FA4's block-sparse backward
    (the transposed table, kernels.fa4.backward_tensors) and the Triton one it falls back to; the forward's
    output and every gradient buffer NaN-poisoned (unwritten elements show)."""
    from sparse_vdit.kernels import fa4

    device = torch.device("cuda", torch.cuda.current_device())
    ok, why = registry.available("fa4", device)
    if not ok:
        pytest.skip(why)
    layout, block, heads, batch, dim = GPU_CASES[case]
    problem = registry.get("fa4").table_problem(block, dim, dtype, device)
    if problem:
        pytest.skip(problem)
    if path == "fa4":
        ok, why = fa4.backward_supports(block, dim, dtype, torch.cuda.get_device_capability(device))
        if not ok:
            pytest.skip(why)
    interface, _ = fa4._import()
    calls = []
    real = interface._flash_attn_bwd
    @functools.wraps(real)  # FA4 reads attributes of its own function (compile_cache): keep them on the spy
    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(interface, "_flash_attn_bwd", spy)
    monkeypatch.setattr(fa4, "BACKWARD", path)
    monkeypatch.setattr(fa4, "_POISON", True)
    _check(GPU_CASES[case], "fa4", dtype, "cuda", 1e-6)
    assert len(calls) == (1 if path == "fa4" else 0)  # the backward asked for is the one that ran
