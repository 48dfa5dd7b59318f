import json

import pytest

from sparse_vdit import VideoLayout, compile_layer
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, spatial, temporal, vertical
from sparse_vdit.plan import KNOWN_MODELS, ModelSpec, Plan, PlanError, StepRange, as_spec

SPEC = ModelSpec("wan", 3, 4, "tiny")
LAYOUT = VideoLayout(4, 6, 7)


def mixed_plan():
    a = [[dense(), skip(), diagonal(0.5), multi_diagonal(0.1)],
         [vertical(((0.0, 1.0), (2.5, 2.75)), 0.3), spatial(1.0), temporal(0.05), dense()],
         [skip()] * 4]  # fmt: skip
    b = [[dense()] * 4, [diagonal(1.0)] * 4, [multi_diagonal(0.2)] * 4]
    return Plan(SPEC, (StepRange(0, tuple(map(tuple, a))), StepRange(10, tuple(map(tuple, b)))), warmup_steps=2,
                warmup_layers=1, block_size=16, layout=LAYOUT, made_by={"method": "test", "lambda": 0.5})  # fmt: skip


def test_save_load_round_trip_exactly(tmp_path):
    plan = mixed_plan()
    path = plan.save(tmp_path / "sub" / "plan.json")
    again = Plan.load(path)
    assert again == plan and again.made_by == plan.made_by and again.layout == LAYOUT
    assert again.dumps() == path.read_text()  # byte-identical on re-save
    data = json.loads(path.read_text())
    assert data["format"] == "sparse-vdit-plan" and data["version"] == 1
    assert data["model"] == {"family": "wan", "num_layers": 3, "num_heads": 4, "name": "tiny"}
    assert len(data["patterns"]) == len({p for r in plan.schedule for layer in r.layers for p in layer})


def test_patterns_for_warmup_and_step_ranges():
    plan = mixed_plan()
    assert plan.patterns_for(0, 2) == (dense(),) * 4 and plan.is_dense(1, 2)  # warm-up steps
    assert plan.patterns_for(5, 0) == (dense(),) * 4 and plan.is_dense(5, 0)  # warm-up layer
    assert plan.patterns_for(2, 1)[1] == spatial(1.0) and not plan.is_dense(2, 1)
    assert plan.patterns_for(9, 2) == (skip(),) * 4 and not plan.is_dense(9, 2)
    assert plan.patterns_for(10, 1) == (diagonal(1.0),) * 4 and plan.patterns_for(999, 2)[0] == multi_diagonal(0.2)
    with pytest.raises(IndexError, match="layer 3 out of range"):
        plan.patterns_for(0, 3)


def test_uniform_and_dense_and_density():
    uniform = Plan.uniform(SPEC, diagonal(0.5), block_size=16)
    assert all(p == diagonal(0.5) for layer in range(3) for p in uniform.patterns_for(0, layer))
    assert uniform.made_by["method"] == "uniform"
    assert uniform.density(LAYOUT) == pytest.approx(compile_layer([diagonal(0.5)], LAYOUT, 16).density)
    assert Plan.dense(SPEC).density(LAYOUT) == 1.0
    assert Plan.uniform(SPEC, "skip").density(LAYOUT) == 0.0
    warm = Plan.uniform(SPEC, skip(), warmup_steps=2)
    assert warm.density(LAYOUT, steps=4) == pytest.approx(0.5)  # 2 dense steps of 4
    assert Plan.uniform(SPEC, skip(), warmup_layers=1).density(LAYOUT) == pytest.approx(1 / 3)


def test_model_specs():
    assert as_spec("wan2.1-t2v-14b") == KNOWN_MODELS["wan2.1-t2v-14b"]
    assert as_spec(("cogvideox", 42, 48)).num_heads == 48
    assert Plan.dense("hunyuan-video").num_layers == 60
    with pytest.raises(PlanError, match="unknown model name"):
        as_spec("sora")
    with pytest.raises(PlanError, match="cannot tell"):
        as_spec(object())
    with pytest.raises(PlanError, match="unknown model family"):
        ModelSpec("allegro", 1, 1)


def test_check_against_model():
    plan = Plan.dense(SPEC)
    plan.check(("wan", 3, 4))
    for other in (("wan", 4, 4), ("wan", 3, 5), ("cogvideox", 3, 4)):
        with pytest.raises(PlanError, match="the plan is for tiny .* but the model is"):
            plan.check(other)
    with pytest.raises(PlanError, match="but the model is"):
        Plan.loads(plan.dumps(), model=("wan", 30, 12))


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(PlanError, match="cannot read plan"):
        Plan.load(tmp_path / "nope.json")
    with pytest.raises(PlanError, match="unknown pattern 'zigzag'"):
        Plan.uniform(SPEC, "zigzag")
    with pytest.raises(PlanError, match="layer 1 has 3 heads"):
        Plan.from_layers(SPEC, [[dense()] * 4, [dense()] * 3, [dense()] * 4])


def test_summary_mentions_shares():
    text = mixed_plan().summary()
    assert "tiny" in text and "steps 10+" in text and "dense" in text
