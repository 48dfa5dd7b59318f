"""bench/oracle.py: best block masks on the shipped organism, on a short generation."""

import json

import pytest
import torch

pytest.importorskip("diffusers")


def test_oracle_keeping_every_block_is_exact_and_less_keeps_less(tmp_path, load_script):
    module = load_script("oracle")
    out = tmp_path / "oracle.json"
    module.main(["--steps", "2", "--from-step", "1", "--blocks", "64", "--densities", "0.5", "1.0", "--out", str(out)])
    assert torch.is_grad_enabled()  # the script leaves autograd as it found it
    data = json.loads(out.read_text())
    rows = {(r["kind"], r["setting"]): r for r in data["rows"]}
    assert data["calls"] == 8 and data["heads"] == 32  # step 1 of 2, 8 layers x 4 heads
    for kind in ("per-call", "static"):
        full, half = rows[kind, 1.0], rows[kind, 0.5]
        assert full["max_rel_mse"] < 1e-10 and full["heads_under_6e-4"] == 32  # every block kept: exact
        assert 0 < half["mean_rel_mse"] < 1 and half["mean_rel_mse"] > full["mean_rel_mse"]
    candidates = [r for r in data["rows"] if r["kind"] == "candidate"]
    assert candidates and all(0 < r["density"] <= 1 and r["mean_rel_mse"] >= 0 for r in candidates)
