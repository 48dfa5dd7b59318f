"""bench/e2e.py runs end to end on tiny models on the CPU (--dry-run); its plans hit their density."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).parents[2] / "bench" / "e2e.py"


@pytest.fixture(scope="module")
def e2e():
    spec = importlib.util.spec_from_file_location("bench_e2e", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_results_and_table(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--dry-run", "--models", "hunyuan", "--densities", "0.3", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["unpatched", "dense", "sparse-30"]
    assert all(r["seconds"] > 0 and r["dry_run"] for r in rows)
    assert rows[2]["speedup_vs_unpatched"] > 0 and rows[2]["speedup_vs_dense"] > 0
    assert 0 < rows[2]["attention_share"] < 1
    assert "x unpatched" in capsys.readouterr().out.splitlines()[-5]  # the table comes last


def test_mixed_plans_hit_their_density(e2e):
    from sparse_vdit import VideoLayout
    from sparse_vdit.plan import KNOWN_MODELS

    layout = VideoLayout(21, 30, 52)  # Wan-1.3B 480p
    spec = KNOWN_MODELS["wan2.1-t2v-1.3b"]
    for density in (0.5, 0.3, 0.1):
        plan = e2e.mixed_plan(spec, layout, density, 128)
        assert plan.density(layout) == pytest.approx(density, abs=0.01)
        names = [p.name for layer in plan.schedule[0].layers for p in layer]
        assert names.count("skip") == round(0.05 * len(names))
        assert {"diagonal", "multi_diagonal", "vertical"} <= set(names)
