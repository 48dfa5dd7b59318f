"""sparse_vdit.apply / remove on tiny Wan, HunyuanVideo and CogVideoX transformers (CPU)."""

import pytest
import torch

import sparse_vdit
from helpers import rel_rms
from sparse_vdit import Plan, PlanError
from sparse_vdit.integrations.diffusers import AttentionCall, state_of
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical
from tiny_diffusers import BLOCK, BUILDERS, FRAMES, HEADS, LAYERS, oracle, undo_compile

pytest.importorskip("diffusers")

FAMILY = {"wan": "wan", "hunyuan_video": "hunyuan_video", "cogvideox": "cogvideox", "cogvideox1.0": "cogvideox"}
MIXED = [
    [dense(), diagonal(0.5), multi_diagonal(0.2), vertical(((0.0, 1.0),), 0.3)],
    [skip(), temporal(0.1), spatial(1.0), diagonal(0.0)],
]


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("name", BUILDERS)
def test_dense_plan_equals_unpatched_model(name):
    model, inputs = BUILDERS[name]()
    expected = run(model, inputs)
    with sparse_vdit.sparse(model, Plan.dense(model, block_size=BLOCK)) as state:
        out = run(model, inputs)
        assert state.steps.grid == (FRAMES, 4, 4)
    assert rel_rms(out, expected) < 1e-6


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_dense_plan_with_fused_qkv_projections(name):
    model, inputs = BUILDERS[name]()
    model.fuse_qkv_projections()
    expected = run(model, inputs)
    with sparse_vdit.sparse(model, Plan.dense(model)):
        assert rel_rms(run(model, inputs), expected) < 1e-6


@pytest.mark.parametrize("name", BUILDERS)
def test_sparse_plan_equals_masked_reference_oracle(name):
    model, inputs = BUILDERS[name]()  # hunyuan: one dual-stream and one single-stream block
    layers = [MIXED[i % len(MIXED)] for i in range(sparse_vdit.model_spec(model).num_layers)]  # VACE: 4
    plan = Plan.from_layers(model, layers, block_size=BLOCK)
    with sparse_vdit.sparse(model, plan, backend="reference"):
        out = run(model, inputs)
    with oracle(name, layers) as calls:
        expected = run(model, inputs)
    assert calls["n"] == len(layers)  # the oracle saw every self-attention layer once, in layer order
    assert rel_rms(out, expected) < 1e-5
    assert rel_rms(out, run(model, inputs)) > 1e-3  # and the plan does change the output


@pytest.mark.parametrize("name", BUILDERS)
def test_remove_restores_original_processors_bit_identical(name):
    model, inputs = BUILDERS[name]()
    before = run(model, inputs)
    modules = sparse_vdit.integrations.diffusers.family_of(model).attention_modules(model)
    originals = [m.processor for m in modules]
    others = dict(getattr(model, "attn_processors", {}))  # Mochi has none
    sparse_vdit.apply(model, Plan.uniform(model, diagonal(0.5), block_size=BLOCK))
    assert all(type(m.processor).__name__ == "SparseAttnProcessor" for m in modules)
    run(model, inputs)
    sparse_vdit.remove(model)
    assert all(m.processor is o for m, o in zip(modules, originals))
    assert all(model.attn_processors[k] is v for k, v in others.items())
    assert not model._forward_pre_hooks and state_of(model) is None
    assert torch.equal(run(model, inputs), before)


def test_only_self_attention_is_replaced():
    model, _ = BUILDERS["wan"]()
    with sparse_vdit.sparse(model, Plan.dense(model)):
        assert all(type(b.attn1.processor).__name__ == "SparseAttnProcessor" for b in model.blocks)
        assert all(type(b.attn2.processor).__name__ == "WanAttnProcessor" for b in model.blocks)
    model, _ = BUILDERS["hunyuan_video"]()
    with sparse_vdit.sparse(model, Plan.dense(model)):
        refiner = [m.processor for n, m in model.named_modules() if "context_embedder" in n and hasattr(m, "processor")]
        assert refiner and all(type(p).__name__ != "SparseAttnProcessor" for p in refiner)


def test_context_manager_removes_on_error():
    model, inputs = BUILDERS["cogvideox"]()
    with pytest.raises(KeyError):
        with sparse_vdit.sparse(model, Plan.dense(model)):
            raise KeyError("boom")
    assert state_of(model) is None
    sparse_vdit.apply(model, Plan.dense(model))  # applies again cleanly
    sparse_vdit.remove(model)


# --- validation: nothing is half-applied ---------------------------------------------------------


def _untouched(model, processors):
    return state_of(model) is None and not model._forward_pre_hooks and all(
        model.attn_processors[k] is v for k, v in processors.items()
    )


@pytest.mark.parametrize(
    "case",
    ["wrong-layers", "wrong-heads", "wrong-family", "bad-backend", "bad-block", "malformed-file", "future-file", "not-a-plan"],
)
def test_bad_plans_raise_and_leave_model_untouched(case, tmp_path):
    model, _ = BUILDERS["wan"]()
    processors = dict(model.attn_processors)
    plan, kwargs, error = None, {}, PlanError
    if case == "wrong-layers":
        plan = Plan.dense(("wan", LAYERS + 1, HEADS))
    elif case == "wrong-heads":
        plan = Plan.dense(("wan", LAYERS, HEADS - 1))
    elif case == "wrong-family":
        plan = Plan.dense(("cogvideox", LAYERS, HEADS))
    elif case == "bad-backend":
        plan, kwargs, error = Plan.dense(model), {"backend": "cuda-magic"}, ValueError
    elif case == "bad-block":
        plan, kwargs, error = Plan.dense(model), {"block_size": 100}, ValueError
    elif case == "malformed-file":
        plan = tmp_path / "plan.json"
        plan.write_text('{"format": "sparse-vdit-plan", "version": 1,')
    elif case == "future-file":
        plan = tmp_path / "plan.json"
        plan.write_text(Plan.dense(model).dumps().replace('"version": 1', '"version": 99'))
    else:
        plan, error = {"layers": []}, TypeError
    with pytest.raises(error) as info:
        sparse_vdit.apply(model, plan, **kwargs)
    assert str(info.value)
    assert _untouched(model, processors)


def test_unknown_pattern_in_file_is_named(tmp_path):
    model, _ = BUILDERS["wan"]()
    path = tmp_path / "plan.json"
    path.write_text(Plan.uniform(model, diagonal(1.0)).dumps().replace('"diagonal"', '"diagonl"'))
    with pytest.raises(PlanError, match="unknown pattern 'diagonl'"):
        sparse_vdit.apply(model, path)
    assert state_of(model) is None


def test_refuses_twice_foreign_processors_and_unsupported_models():
    model, _ = BUILDERS["wan"]()
    sparse_vdit.apply(model, Plan.dense(model))
    with pytest.raises(RuntimeError, match="already applied"):
        sparse_vdit.apply(model, Plan.dense(model))
    sparse_vdit.remove(model)
    with pytest.raises(RuntimeError, match="not applied"):
        sparse_vdit.remove(model)

    class Foreign:
        def __call__(self, *args, **kwargs):
            raise AssertionError

    model.blocks[1].attn1.set_processor(Foreign())
    processors = dict(model.attn_processors)
    with pytest.raises(RuntimeError, match="layer 1 uses attention processor Foreign"):
        sparse_vdit.apply(model, Plan.dense(model))
    assert _untouched(model, processors)
    with pytest.raises(TypeError, match="supports WanTransformer3DModel"):
        sparse_vdit.apply(torch.nn.Linear(2, 2), Plan.dense(model))


# --- step tracking ---------------------------------------------------------------------------


def record_steps(state):
    seen = []
    state.observers.append(lambda call, patterns, out: seen.append((state.steps.generation, call.step, call.layer)))
    return seen


def steps_of(seen):
    """(generation, step) per forward (layer 0 calls)."""
    return [(g, s) for g, s, layer in seen if layer == 0]


@pytest.mark.parametrize("cfg", ["none", "separate", "batched"])
def test_steps_counted_across_two_generations(cfg):
    model, inputs = BUILDERS["wan"](batch=2 if cfg == "batched" else 1)
    state = sparse_vdit.apply(model, Plan.dense(model))
    seen = record_steps(state)
    for _ in range(2):
        for t in (999.0, 700.0, 400.0):
            inputs["timestep"] = torch.full((inputs["hidden_states"].shape[0],), t)
            run(model, inputs)
            if cfg == "separate":
                run(model, inputs)  # the unconditional pass of the same step
    sparse_vdit.remove(model)
    per_step = 2 if cfg == "separate" else 1
    expected = [(g, s) for g in range(2) for s in range(3) for _ in range(per_step)]
    assert steps_of(seen) == expected
    assert all(layer in range(LAYERS) for _, _, layer in seen)


def test_steps_follow_the_plan_schedule_and_warmup():
    from sparse_vdit.plan import StepRange

    model, inputs = BUILDERS["wan"](batch=1)
    sparse_layers = (tuple([diagonal(0.0)] * HEADS),) * LAYERS
    plan = Plan(Plan.dense(model).spec, (StepRange(0, sparse_layers), StepRange(2, sparse_layers)), warmup_steps=1,
                warmup_layers=1, block_size=BLOCK)  # fmt: skip
    state = sparse_vdit.apply(model, plan, backend="reference")
    used = []
    state.observers.append(lambda call, patterns, out: used.append((call.step, call.layer, patterns is None)))
    for t in (999.0, 800.0, 600.0):
        inputs["timestep"] = torch.tensor([t])
        run(model, inputs)
    sparse_vdit.remove(model)
    assert used == [(0, 0, True), (0, 1, True), (1, 0, True), (1, 1, False), (2, 0, True), (2, 1, False)]


def test_pattern_source_hook_sees_each_layer_and_can_choose():
    model, inputs = BUILDERS["hunyuan_video"](batch=1, valid=(5,))
    calls = []

    def source(call: AttentionCall):
        calls.append((call.step, call.layer, call.layout, tuple(call.q.shape)))
        out = call.dense_output()
        assert out.shape == call.q.shape and torch.allclose(call.output([dense()] * HEADS), out)
        return [skip()] * HEADS if call.layer == 1 else None

    with sparse_vdit.sparse(model, pattern_source=source, block_size=BLOCK, backend="reference"):
        run(model, inputs)
    assert [c[:2] for c in calls] == [(0, 0), (0, 1)]
    layout = calls[0][2]
    assert (layout.frames, layout.height, layout.width, layout.text, layout.text_position, layout.text_valid) == (
        FRAMES, 4, 4, 7, "suffix", 5,
    )  # fmt: skip
    assert calls[0][3] == (1, FRAMES * 16 + 7, HEADS, 16)


def test_timings_are_recorded_per_step():
    model, inputs = BUILDERS["wan"](batch=1)
    state = sparse_vdit.apply(model, Plan.dense(model))
    state.timing = True
    for t in (999.0, 500.0):
        inputs["timestep"] = torch.tensor([t])
        run(model, inputs)
    seconds = state.attention_seconds()
    sparse_vdit.remove(model)
    assert sorted(seconds) == [0, 1] and all(s > 0 for s in seconds.values())


def test_torch_compile_regional_no_recompile_per_layer():
    """Blocks compiled once (fullgraph): the attention is one opaque op, the layer a tensor input."""
    import torch._dynamo

    torch._dynamo.reset()
    model, inputs = BUILDERS["wan"](batch=1)
    plan = Plan.from_layers(model, MIXED, block_size=BLOCK)
    state = sparse_vdit.apply(model, plan, backend="reference")
    eager = run(model, inputs)
    model.compile_repeated_blocks(backend="aot_eager", fullgraph=True)
    try:
        counters = torch._dynamo.utils.counters
        counters.clear()
        out = run(model, inputs)
        inputs["timestep"] = torch.tensor([500.0])
        run(model, inputs)
        assert state.step == 1
        assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    finally:
        undo_compile(model)
    assert rel_rms(out, eager) < 1e-6
