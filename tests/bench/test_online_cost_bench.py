"""bench/online_cost.py --dry-run: the selection-cost rows on a tiny shape on the CPU."""

import json

import pytest


def test_dry_run_writes_a_row_per_backend_and_density(tmp_path, load_script):
    module = load_script("online_cost")
    out = tmp_path / "online-cost.json"
    assert module.main(["--dry-run", "--densities", "0.25,0.5", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [(r["shape"], r["backend"], r["density_target"]) for r in rows] == [("tiny", "reference", 0.25),
                                                                              ("tiny", "reference", 0.5)]
    for r in rows:
        assert r["density"] == pytest.approx(r["density_target"])  # a fixed budget: top-k, diagonal included
        for key in ("dense_ms", "select_ms", "select_topp_ms", "sparse_ms", "fresh_ms", "hybrid_ms", "cluster_ms",
                    "cluster_attention_ms"):
            assert r[key] > 0
        assert r["host_syncs_select"] == "n/a (CPU)" and 0 < r["density_topp"] <= r["density"]
        assert r["cluster_density"] == pytest.approx(r["density_target"])  # no forced diagonal: exactly the budget
