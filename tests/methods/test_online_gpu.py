"""Online top-p selection on a GPU: no host sync while deciding, and every backend runs its tables (gpu)."""

import pytest
import torch

from sparse_vdit import Plan, VideoLayout, sparse_attention
from sparse_vdit.kernels import registry
from sparse_vdit.methods import Hybrid, TopP
from sparse_vdit.methods.online import online_table

pytestmark = pytest.mark.gpu
LAYOUT = VideoLayout(5, 30, 52, text=77, text_position="suffix", text_valid=40)  # 7,877 tokens: ragged, padded text


class _Call:
    def __init__(self, step, layer, q, k, layout):
        self.step, self.layer, self.q, self.k, self.layout, self.heads = step, layer, q, k, layout, None


def _inputs(heads=6, dim=128, batch=2, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(batch, LAYOUT.num_tokens, heads, dim, generator=gen, device="cuda", dtype=torch.bfloat16)
            for _ in range(3)]  # fmt: skip


def _no_sync(fn):
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        return fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_deciding_makes_no_host_sync():
    q, k, _ = _inputs()
    online_table(q, k, LAYOUT, 128, 0.9, 0.05, 0.3)  # first call: per-layout caches filled (host copies)
    table = _no_sync(lambda: online_table(q, k, LAYOUT, 128, 0.9, 0.05, 0.3))
    source = TopP(0.9, max_density=0.3, block_size=128, cluster_iters=2)
    source(_Call(0, 0, q, k, LAYOUT))
    permuted = _no_sync(lambda: source(_Call(1, 0, q, k, LAYOUT)))
    assert 0 < table.density < 0.6 and permuted.table.num_heads == 12


@pytest.mark.parametrize("backend", ["triton", "fa4"])
def test_hybrid_layer_call_makes_no_host_sync(backend):
    """A hybrid's table (plan heads, token-major ones included, beside online heads) and its attention call,
    after the plan table's first use: no host sync, so the layer calls queue ahead of the GPU (session h: one
    sync per layer cost the hybrid 1.14-1.19x the plan's forward end to end)."""
    from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip
    from sparse_vdit.plan import ModelSpec, StepRange

    ok, why = registry.available(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    q, k, v = _inputs()
    layer = (diagonal(0.3), dense(), multi_diagonal(0.2), skip(), dense(), diagonal(0.1))
    plan = Plan(ModelSpec("wan", 1, 6), (StepRange(0, (layer,)),), 0, 0, 128, LAYOUT)
    hybrid = Hybrid(plan, TopP(1.0, min_density=0.25, max_density=0.25, block_size=128))

    def call(step):
        table = hybrid(_Call(step, 0, q, k, LAYOUT))
        return table, sparse_attention(q, k, v, table, backend=backend)

    call(0)  # first use: the plan table and its merge maps are made (host copies), kernels compile
    table, out = _no_sync(lambda: call(1))
    assert table.token_major_heads == (2,) and {p.name for p in (table.patterns[h] for h in (1, 4))} == {"top-p"}
    ref = sparse_attention(q.double(), k.double(), v.double(), table, backend="reference")
    assert (out.double() - ref).norm() / ref.norm() < 2e-2


@pytest.mark.parametrize("key_group", [1, 2])
def test_compiled_selection_keeps_the_same_blocks_without_a_host_sync(key_group):
    q, k, _ = _inputs()
    for p, low, high in ((1.0, 0.25, 0.25), (0.9, 0.05, 0.3)):  # the top-k path and the sorted top-p path
        eager = online_table(q, k, LAYOUT, 128, p, low, high, key_group=key_group, compile="never")
        online_table(q, k, LAYOUT, 128, p, low, high, key_group=key_group, compile="always")  # compiles (host work)
        compiled = _no_sync(lambda: online_table(q, k, LAYOUT, 128, p, low, high, key_group=key_group, compile="always"))
        assert torch.equal(compiled.range_starts, eager.range_starts) and torch.equal(compiled.range_ends, eager.range_ends)
        assert torch.equal(compiled.kv_indices, eager.kv_indices)


@pytest.mark.parametrize("backend", ["triton", "fa4", "flex"])
def test_backends_run_online_and_clustered_tables_like_the_reference(backend):
    ok, why = registry.available(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    q, k, v = _inputs()
    table = online_table(q, k, LAYOUT, 128, 0.9, 0.05, 0.3)
    ref = sparse_attention(q.double(), k.double(), v.double(), table, backend="reference")
    out = sparse_attention(q, k, v, table, backend=backend)
    assert (out.double() - ref).norm() / ref.norm() < 2e-2
    permuted = TopP(0.8, max_density=0.3, block_size=128, cluster_iters=2)(_Call(0, 0, q, k, LAYOUT))
    permuted.q = permuted.k = None  # gather the float64 inputs, not the selection's bf16 copies
    ref = permuted.attend(q.double(), k.double(), v.double(), "reference")
    out = permuted.attend(q, k, v, backend)
    assert (out.double() - ref).norm() / ref.norm() < 2e-2
