"""bench/search_cost.py runs end to end on tiny models on the CPU (--dry-run): JSON fields and table."""

import json
import math
import os

import pytest

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("search_cost")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and does not crawl when other jobs share the CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _check(row: dict, steps: int, runs: int) -> None:
    assert row["dry_run"] and row["backend"] == "reference" and row["steps"] == steps
    assert len(row["run_seconds"]) == runs and all(s > 0 for s in row["run_seconds"])
    assert row["search_seconds"] >= sum(row["run_seconds"]) > 0
    assert row["dense_seconds"] > 0 and row["cost_table_seconds"] >= 0
    for key in ("ratio", "ratio_no_table", "run_ratio"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["ratio_no_table"] <= row["ratio"]
    assert 0 < row["density"] <= 1 and row["expected_speedup"] >= 1
    assert row["layer_calls"] > 0 and row["layout"] and row["candidate_costs"]


def test_dry_run_writes_results_and_table(bench, tmp_path, capsys):
    out, plans = tmp_path / "search_cost.json", tmp_path / "plans"
    cache = os.environ.get("SPARSE_VDIT_CACHE")
    # the budget counts from bench/common.py's import: a long test session must not skip the models
    args = ["--dry-run", "--modes", "ours,paper", "--repeats", "1", "--no-progress", "--out", str(out),
            "--save-plans", str(plans), "--budget-s", "1e6"]  # fmt: skip
    assert bench.main(args) == 0
    assert os.environ.get("SPARSE_VDIT_CACHE") == cache  # the fresh cost cache is undone
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["model"], r["mode"], r["repeat"]) for r in rows] == [("wan-1.3b", "ours", 0), ("wan-1.3b", "paper", 0)]
    for r in rows:
        _check(r, steps=2, runs=1)
        assert r["unpatched_seconds"] > 0 and r["ratio_vs_unpatched"] > 0
    assert rows[0]["error"] == "relative" and rows[1]["error"] == "absolute" and rows[1]["estimate"] == "full"
    assert data["runs"][0]["args"]["steps"] == 2
    assert sorted(p.name for p in plans.iterdir()) == ["wan-1.3b-ours-0-dry-run.json", "wan-1.3b-paper-0-dry-run.json"]
    lines = capsys.readouterr().out.splitlines()
    assert "ratio" in lines[-4] and lines[-1].startswith("wan-1.3b      paper")  # the table comes last

    # a second call merges by (model, mode, repeat); several prompts x seeds give stability, paper is skipped
    args = ["--dry-run", "--models", "hunyuan", "--modes", "ours,paper", "--prompts", "2", "--seeds", "0", "1",
            "--steps", "3", "--repeats", "1", "--no-unpatched", "--no-progress", "--out", str(out), "--budget-s", "1e6"]  # fmt: skip
    assert bench.main(args) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["mode"]) for r in rows] == [("wan-1.3b", "ours"), ("wan-1.3b", "paper"), ("hunyuan", "ours")]
    hunyuan = rows[2]
    _check(hunyuan, steps=3, runs=4)
    assert hunyuan["unpatched_seconds"] is None and hunyuan["stability"]["runs"] == 4


def test_sampler_steps_and_determinism(bench):
    import torch

    tiny = bench.TINY["cogvideox1.5"]
    model = bench.models.build(tiny, torch.device("cpu"), torch.float32)
    sampler = bench.bare_sampler(tiny, model, torch.device("cpu"), torch.float32, prompts=2)
    a, b = sampler("embedding-0", 0, 2), sampler("embedding-0", 0, 2)
    assert a.shape == tiny.latent and torch.isfinite(a).all() and torch.equal(a, b)
    assert not torch.equal(a, sampler("embedding-1", 0, 2)) and not torch.equal(a, sampler("embedding-0", 1, 2))
