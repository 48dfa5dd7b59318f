"""The processor's fused path (issue 21): the family's rotary embedding applied in the pass that
permutes token-major heads, on tiny Wan, HunyuanVideo and CogVideoX 1.5 transformers (CPU).

Compared with the same plan on the old path (the model's rotary in torch, then ``sparse_attention``)
and with the unpatched model under per-head masked float64 attention (the oracle).
"""

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import Plan
from sparse_vdit.integrations.diffusers import processor
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical
from tiny_diffusers import BLOCK, BUILDERS, oracle

pytest.importorskip("diffusers")

MIXED = [
    [multi_diagonal(0.2), diagonal(0.5), dense(), vertical(((0.0, 1.0),), 0.3)],
    [skip(), multi_diagonal(0.1), multi_diagonal(0.4), diagonal(0.0)],
]


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def count_fused_calls(monkeypatch) -> list:
    """The rotary pair rule of every fused call from now on (the processor's fused path, spied on)."""
    calls = []
    original = processor.attention_in_head_order
    monkeypatch.setattr(processor, "attention_in_head_order",
                        lambda *a, **kw: calls.append(kw["rotary"].pairs) or original(*a, **kw))  # fmt: skip
    return calls


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "cogvideox"])
def test_fused_path_equals_old_path_and_oracle(name, monkeypatch):
    # hunyuan: padded prompts of one length (samples of different lengths rotate first, then split)
    model, inputs = BUILDERS[name](**({"valid": (5,)} if name == "hunyuan_video" else {}))
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    fused_calls = count_fused_calls(monkeypatch)
    with sparse_vdit.sparse(model, plan, backend="reference") as state:
        state.fuse_rotary = True  # the default (None) too; forced here against the False below
        fused = run(model, inputs)
        state.fuse_rotary = False
        old = run(model, inputs)
    assert fused_calls == [{"wan": "wan"}.get(name, "interleaved")] * len(MIXED)
    with oracle(name, MIXED):
        expected = run(model, inputs)
    assert rel_rms(fused, old) < 1e-6
    assert rel_rms(fused, expected) < 1e-5


@pytest.mark.parametrize("name", ["wan", "hunyuan_video", "cogvideox"])
def test_fused_by_default_for_every_family(name, monkeypatch):
    """fuse_rotary None (the default): every family fuses on CUDA (faster on an H200 for all four measured
    shapes, issue 21), not on the CPU (the pass would run in Triton's interpreter); False keeps the
    model's torch rotary, True forces fusion."""
    model, inputs = BUILDERS[name](**({"valid": (5,)} if name == "hunyuan_video" else {}))
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    fused_calls = count_fused_calls(monkeypatch)
    counts = {}
    with sparse_vdit.sparse(model, plan, backend="reference") as state:
        assert state.fuse_rotary is None
        for setting in (None, False, True):
            state.fuse_rotary = setting
            assert state.rotary_fused(torch.device("cuda")) == (setting is not False)
            assert state.rotary_fused(torch.device("cpu")) == (setting is True)
            fused_calls.clear()
            run(model, inputs)
            counts[setting] = len(fused_calls)
    assert counts == {None: 0, False: 0, True: len(MIXED)}


def test_wan_rotary_in_float32_casts_the_tables_once(monkeypatch):
    """state.rotary_float32: Wan's float64 tables cast once per forward (every layer shares them),
    the fused pass gets float32 tables, the output matches the old path (float64 rotary in torch)."""
    model, inputs = BUILDERS["wan"]()
    # float64 tables as diffusers' WanRotaryPosEmbed builds them (the tiny model's cast made them float32)
    model.rope.freqs_cos, model.rope.freqs_sin = model.rope.freqs_cos.double(), model.rope.freqs_sin.double()
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    casts, tables = [], []
    original_cast, original_attention = processor.in_float32, processor.attention_in_head_order
    monkeypatch.setattr(processor, "in_float32", lambda r: casts.append(r.cos.dtype) or original_cast(r))
    monkeypatch.setattr(processor, "attention_in_head_order",
                        lambda *a, **kw: tables.append(kw["rotary"].cos.dtype) or original_attention(*a, **kw))  # fmt: skip
    with sparse_vdit.sparse(model, plan, backend="reference") as state:
        assert state.rotary_float32 is False
        state.fuse_rotary = False
        old = run(model, inputs)
        state.fuse_rotary, state.rotary_float32 = True, True
        fused = run(model, inputs)
        fused_again = run(model, inputs)
    assert casts == [torch.float64] * 2  # one cast per forward (per set of tables), not per layer
    assert tables == [torch.float32] * (2 * len(MIXED))
    assert rel_rms(fused, old) < 1e-6
    assert torch.equal(fused, fused_again)


def test_prompts_of_different_lengths_rotate_then_split(monkeypatch):
    model, inputs = BUILDERS["hunyuan_video"](valid=(3, 7))
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    with sparse_vdit.sparse(model, plan, backend="reference") as state:
        fused = run(model, inputs)
        state.fuse_rotary = False
        old = run(model, inputs)
    with oracle("hunyuan_video", MIXED):
        expected = run(model, inputs)
    assert rel_rms(fused, old) < 1e-6
    assert rel_rms(fused, expected) < 1e-5


def test_not_fused_where_the_source_reads_q_and_k(monkeypatch):
    """Observers (and online methods) see q and k after the rotary: the fused path stays off."""
    model, inputs = BUILDERS["wan"]()
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    monkeypatch.setattr(processor, "attention_in_head_order", lambda *a, **kw: pytest.fail("fused with an observer"))
    seen = []
    with sparse_vdit.sparse(model, plan, backend="reference") as state:
        state.fuse_rotary = True  # on, yet not fused
        state.observers.append(lambda call, patterns, out: seen.append(call.q))
        run(model, inputs)
    assert len(seen) == len(MIXED)


def test_compiled_blocks_fuse_too(monkeypatch):
    """Under torch.compile (fullgraph) the rotary tables go through the opaque attention op."""
    import torch._dynamo

    torch._dynamo.reset()
    model, inputs = BUILDERS["wan"](batch=1)
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    state = sparse_vdit.apply(model, plan, backend="reference")
    state.fuse_rotary = False
    old = run(model, inputs)
    state.fuse_rotary = True
    fused_calls = count_fused_calls(monkeypatch)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    try:
        out = run(model, inputs)
    finally:
        for block in model.blocks:
            block._compiled_call_impl = None
        sparse_vdit.remove(model)
        torch._dynamo.reset()
    assert fused_calls == ["wan"] * len(MIXED)
    assert rel_rms(out, old) < 1e-6


def test_not_fused_for_a_source_that_only_has_a_plan_attribute(monkeypatch):
    """A pattern source with a ``plan`` attribute of its own (the offline searcher has a ``plan()``
    method) reads q and k: only the state's own plan source fuses."""
    model, inputs = BUILDERS["wan"]()
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK, warmup_steps=0)
    seen = []

    def source(call):
        seen.append(call.q)
        return plan.patterns_for(call.step, call.layer)

    source.plan = lambda: plan
    monkeypatch.setattr(processor, "attention_in_head_order", lambda *a, **kw: pytest.fail("fused for a custom source"))
    with sparse_vdit.sparse(model, pattern_source=source, backend="reference") as state:
        state.fuse_rotary = True  # on, yet not fused
        with torch.no_grad():
            assert not state.fuses_rotary(torch.device("cpu"))
        run(model, inputs)
    assert len(seen) == len(MIXED)


def test_fused_path_trains_like_the_old_path(monkeypatch):
    """Training a tiny Wan (head dim 64: the Triton backend, under the interpreter): with the fused path
    the rotary and the token-major order go through one pass each way, the backward kernels run on the
    head-ordered tensors, and every parameter's gradient equals the old path's (torch rotary, in-place reads)."""
    from sparse_vdit.kernels import registry
    from tiny_diffusers import wan

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1)")
    torch.set_num_threads(1)
    model, inputs = wan(batch=1, num_attention_heads=2, attention_head_dim=64)
    model.train()
    layers = [[multi_diagonal(0.2), diagonal(0.5)], [vertical(((0.0, 1.0),), 0.3), multi_diagonal(0.4)]]
    plan = Plan.from_layers(model, layers, block_size=BLOCK, warmup_steps=0)
    fused_calls = count_fused_calls(monkeypatch)
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))
    grads = {}
    with sparse_vdit.sparse(model, plan, backend="triton") as state:
        for setting in (True, False):
            state.fuse_rotary = setting
            model.zero_grad(set_to_none=True)
            torch.nn.functional.mse_loss(model(**inputs)[0], target).backward()
            grads[setting] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert fused_calls == ["wan"] * len(layers)  # only with fusion on, and under autograd
    assert grads[True].keys() == grads[False].keys() and grads[True]
    worst = max(rel_rms(grads[True][n], grads[False][n]) for n in grads[True] if grads[False][n].norm() > 0)
    assert worst < 1e-4, worst


class HeadOrderedTriton:
    """A backend module with FA4's contract, on the Triton kernels: ``run_with_lse`` / ``run_backward`` take and
    give tensors in each head's own order (the route other backends than triton take in the compiled op)."""

    @staticmethod
    def run_with_lse(q, k, v, table, scale):
        from sparse_vdit.kernels.api import reorder_heads
        from sparse_vdit.kernels.triton import backend

        out, lse = backend.run_with_lse(q, k, v, table, scale, head_order=True)  # stores frame-major rows
        return reorder_heads(out, table.layout, table.token_major_heads), lse

    @staticmethod
    def run_backward(grad_out, q, k, v, out, lse, table, scale):
        from sparse_vdit.kernels.api import reorder_heads
        from sparse_vdit.kernels.triton import backend

        grad_out, out = (reorder_heads(t, table.layout, table.token_major_heads, to_token_major=False)
                         for t in (grad_out, out))  # fmt: skip
        return backend.run_backward(grad_out, q, k, v, out, lse, table, scale, head_order=True)


@pytest.mark.parametrize("route", ["fused-checkpointing", "unfused-rotary", "head-ordered-backend"])
def test_compiled_training_runs_no_second_forward(route, monkeypatch):
    """Blocks compiled (aot_eager, fullgraph): the op's backward runs from the call's output and LSE (no replay
    of the call) on each route (the rotary fused on Triton, with checkpointing; the model's own rotary first; a
    backend that takes head-ordered tensors, as FA4), and every gradient equals the eager one."""
    import types

    import torch._dynamo

    from sparse_vdit.kernels import registry
    from tiny_diffusers import undo_compile, wan

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("the Triton interpreter is off (TRITON_INTERPRET=1)")
    torch.set_num_threads(1)
    torch._dynamo.reset()
    model, inputs = wan(batch=1, num_attention_heads=2, attention_head_dim=64)
    model.train()
    if route == "fused-checkpointing":
        model.enable_gradient_checkpointing()
    layers = [[multi_diagonal(0.2), diagonal(0.5)], [vertical(((0.0, 1.0),), 0.3), skip()]]
    target = torch.randn(inputs["hidden_states"].shape, generator=torch.Generator().manual_seed(3))

    def grads():
        model.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(model(**inputs)[0], target).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plan = Plan.from_layers(model, layers, block_size=BLOCK, warmup_steps=0)
    state = sparse_vdit.apply(model, plan, backend="triton")
    state.fuse_rotary = route != "unfused-rotary"
    eager = grads()
    calls = {"attend": 0, "forward": 0, "backward": 0}
    for name, key in (("forward_with_lse", "forward"), ("backward_from_lse", "backward")):
        original = getattr(processor, name)
        monkeypatch.setattr(processor, name, lambda *a, _f=original, _k=key, **kw: calls.__setitem__(_k, calls[_k] + 1)
                            or _f(*a, **kw))  # fmt: skip
    attend = state.attend
    monkeypatch.setattr(state, "attend", lambda *a, **kw: calls.__setitem__("attend", calls["attend"] + 1)
                        or attend(*a, **kw))  # fmt: skip
    if route == "head-ordered-backend":
        shim = types.SimpleNamespace(name="head_ordered", module=HeadOrderedTriton)
        get = registry.get
        monkeypatch.setattr(registry, "choose", lambda *a, **kw: shim)
        monkeypatch.setattr(registry, "get", lambda name: shim if name == shim.name else get(name))
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    try:
        compiled = grads()
    finally:
        undo_compile(model)
    assert calls == {"attend": 0, "forward": len(layers) * (2 if route == "fused-checkpointing" else 1),
                     "backward": len(layers)}  # fmt: skip
    assert compiled.keys() == eager.keys() and compiled
    worst = max(rel_rms(compiled[n], eager[n]) for n in compiled if eager[n].norm() > 0)
    assert worst < 1e-5, worst
