"""`sparse-vdit show`: the text summary and the PNG of a plan (no model needed)."""

import pytest

from sparse_vdit import VideoLayout
from sparse_vdit.cli.main import main
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical
from sparse_vdit.plan import ModelSpec, Plan, StepRange
from sparse_vdit.plan_view import range_label, summary_text

SPEC = ModelSpec("wan", 3, 4, "tiny")
LAYOUT = VideoLayout(4, 8, 8)


def searched_plan():
    a = [[dense(), skip(), diagonal(0.5), multi_diagonal(0.1)],
         [vertical(((0.0, 1.0),)), diagonal(1.0), diagonal(1.0), dense()],
         [skip(), skip(), multi_diagonal(0.25), diagonal(0.25)]]  # fmt: skip
    b = [[dense()] * 4, [diagonal(1.0)] * 4, [multi_diagonal(0.12)] * 4]
    made_by = {"method": "offline", "mode": "ours", "steps": 10, "error": "relative", "epsilon": 0.05, "lam": 0.05,
               "cost": {"kind": "blocks"}, "prompts": ["p"], "seeds": [0, 1],
               "stats": {"search_seconds": 3.0, "run_seconds": [1.5, 1.5], "dense_seconds": 1.0, "expected_speedup": 1.7,
                         "speedup_basis": "attention only, cost model blocks", "layer_calls": 48,
                         "stability": {"runs": 2, "changed_share": 0.125, "run_vs_plan_share": [0.1, 0.0]}}}  # fmt: skip
    return Plan(SPEC, (StepRange(0, tuple(map(tuple, a))), StepRange(6, tuple(map(tuple, b)))), warmup_steps=2,
                warmup_layers=1, block_size=16, layout=LAYOUT, made_by=made_by)  # fmt: skip


def test_show_writes_a_png_and_prints_the_summary(tmp_path, capsys):
    path = searched_plan().save(tmp_path / "plan.json")
    out = tmp_path / "pics" / "plan.png"
    assert main(["show", str(path), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "plan for tiny (wan, 3 layers x 4 heads), block 16, made by offline (mode ours)" in text
    assert "range 1, steps 3-6" in text and "range 2, steps 7-10" in text  # counted from 1
    assert "(warm-up: dense)" in text and "commonest:" in text
    assert "dense warm-up: 2 steps, 1 layer\n" in text
    assert "expected attention speedup 1.70x" in text and "12% of searched heads differ" in text
    assert "search run / dense: 1.50x" in text
    assert f"wrote {out}" in text


def test_summary_densities_per_layer_and_range_labels():
    plan = searched_plan()
    text = summary_text(plan)
    layer_1 = next(line for line in text.splitlines() if line.strip().startswith("1 "))
    assert layer_1.split()[1] == f"{_layer_density(plan, 0, 1):.1%}"
    assert range_label(plan, 0, 10) == "steps 3-6" and range_label(plan, 1) == "steps 7+"
    assert "n/a" in summary_text(Plan.uniform(SPEC, diagonal(1.0)))  # no layout: no densities


def _layer_density(plan, index, layer):
    from sparse_vdit import compile_layer

    return compile_layer(plan.schedule[index].layers[layer], LAYOUT, 16).density


def test_show_with_another_layout_and_bad_input(tmp_path, capsys):
    path = searched_plan().save(tmp_path / "plan.json")
    assert main(["show", str(path), "--layout", "8x16x16"]) == 0
    assert "8x16x16 = 2048 video tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--layout must look like"):
        main(["show", str(path), "--layout", "8x16"])
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit, match="not a sparse-vdit plan"):
        main(["show", str(tmp_path / "bad.json")])


def test_show_draws_every_expert_of_a_per_expert_file(tmp_path, capsys):
    from sparse_vdit.plan import ExpertPlans

    second = Plan.uniform(SPEC, diagonal(0.5), block_size=16, layout=LAYOUT)
    path = ExpertPlans({"transformer": searched_plan(), "transformer_2": second}).save(tmp_path / "plan.json")
    out = tmp_path / "plan.png"
    assert main(["show", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for name in ("transformer", "transformer_2"):
        picture = tmp_path / f"plan-{name}.png"
        assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {picture}" in text
        assert f"{name}:\nplan for tiny (wan, 3 layers x 4 heads)" in text
    assert not out.exists()
