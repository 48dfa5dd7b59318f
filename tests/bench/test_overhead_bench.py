"""bench/overhead.py: runs on a tiny Wan and writes its rows."""

import json

import pytest

pytest.importorskip("diffusers")


def test_overhead_rows(tmp_path, load_script):
    module = load_script("overhead")
    out = tmp_path / "overhead.json"
    module.main(["--models", "wan-1.3b", "--repeats", "2", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert row["model"] == "wan-1.3b" and row["layer_calls"] == 2
    for key in ("unpatched_ms", "dense_ms", "sparse_ms"):
        assert row[key] > 0
    assert row["share_of_gpu_dense_step"] == pytest.approx(row["dense_us_per_call"] * 1e-3 * 30 / 606.3)
