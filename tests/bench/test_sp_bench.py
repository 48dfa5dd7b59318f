"""bench/sp.py parses its arguments and runs its --dry-run path (one CPU process, tiny Wan)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

SCRIPT = Path(__file__).parents[2] / "bench" / "sp.py"


def test_dry_run_one_process(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("bench_sp", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    out = tmp_path / "sp.json"
    assert module.main(["--dry-run", "--world", "1", "--models", "wan-14b", "--densities", "0.3", "--repeats", "1",
                        "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [(r["world"], r["variant"]) for r in rows] == [(1, "dense"), (1, "sparse-30")]
    assert all(r["seconds"] > 0 and r["dry_run"] for r in rows)
