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
        for key in ("dense_ms", "select_ms", "select_old_ms", "select_eager_ms", "select_grouped_ms", "select_topp_ms",
                    "sparse_ms", "sparse_grouped_ms", "plan_ms", "fresh_ms", "hybrid_ms", "cluster_ms",
                    "cluster_attention_ms"):  # fmt: skip
            assert r[key] > 0
        assert r["same_blocks_as_old"] and r["same_blocks_eager"]  # the faster paths keep the same blocks
        assert r["runs_per_row_grouped"] <= r["runs_per_row"] and r["density_grouped"] == pytest.approx(r["density_target"])
        assert 0.15 < r["plan_density"] < 0.6 and r["attention_vs_plan"] > 0
        assert r["host_syncs_select"] == "n/a (CPU)" and 0 < r["density_topp"] <= r["density"]
        assert r["cluster_density"] == pytest.approx(r["density_target"])  # no forced diagonal: exactly the budget


def test_dry_run_times_the_block_list_mode_beside_the_ranges(tmp_path, load_script, capsys):
    module = load_script("online_cost")
    out = tmp_path / "online-cost.json"
    assert module.main(["--dry-run", "--block-list", "--list-stages", "5", "--cluster-iters", "0", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    for key in ("sparse_list_ms", "sparse_grouped_list_ms", "plan_list_ms", "sparse_list_stages5_ms"):
        assert row[key] > 0
    assert row["list_vs_plan"] == pytest.approx(row["sparse_list_ms"] / row["plan_ms"])
    assert row["list_vs_ranges"] == pytest.approx(row["sparse_list_ms"] / row["sparse_ms"])
    assert row["list_stages5_vs_plan"] == pytest.approx(row["sparse_list_stages5_ms"] / row["plan_ms"])
    assert "list vs plan" in capsys.readouterr().out
    options = module.triton_launcher.OPTIONS
    assert options["block_list"] is None and options["list_stages"] is None  # restored after each call
