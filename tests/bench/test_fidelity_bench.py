"""bench/fidelity.py --quick: every method family on a tiny random organism, JSON, Pareto PNG, table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

SCRIPT = Path(__file__).parents[2] / "bench" / "fidelity.py"


def test_quick_run_writes_results_plot_and_table(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_fidelity", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    out = tmp_path / "fidelity.json"
    assert module.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    families = [r["family"] for r in data["rows"]]
    assert families == ["dense", "offline", "offline", "svg", "window-spatial", "window-temporal", "skip-only"]
    assert data["videos"] == 2 and data["dry_run"] and not data["speedup_meaningful"]
    for r in data["rows"]:
        assert 0 < r["density"] <= 1 and r["flop_reduction"] == pytest.approx(1 / r["density"])
        assert r["psnr"] > 0 and 0 < r["ssim"] <= 1 and r["attention_speedup"] > 0
    assert data["rows"][0]["psnr"] == float("inf") and min(r["density"] for r in data["rows"]) < 0.5
    assert out.with_suffix(".png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "| window-temporal-0.1 |" in text and "NOT meaningful" in text
