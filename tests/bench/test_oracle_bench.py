"""bench/oracle.py: best block masks on a tiny random organism (the shipped one took 79 s here), on a short generation."""

import json

import pytest
import torch

pytest.importorskip("diffusers")


def test_oracle_keeping_every_block_is_exact_and_less_keeps_less(tmp_path, load_script):
    from helpers import saved_tiny_organism

    module = load_script("oracle")
    weights = saved_tiny_organism(tmp_path / "tiny")  # 4 x 8 x 8 = 256 tokens: 4 blocks of 64
    out = tmp_path / "oracle.json"
    module.main(["--weights", str(weights), "--steps", "2", "--from-step", "1", "--blocks", "64", "--densities", "0.5",
                 "1.0", "--out", str(out)])  # fmt: skip
    assert torch.is_grad_enabled()  # the script leaves autograd as it found it
    data = json.loads(out.read_text())
    rows = {(r["kind"], r["setting"]): r for r in data["rows"]}
    assert data["calls"] == 2 and data["heads"] == 4  # step 1 of 2, 2 layers x 2 heads
    for kind in ("per-call", "static"):
        full, half = rows[kind, 1.0], rows[kind, 0.5]
        assert full["max_rel_mse"] < 1e-10 and full["heads_under_6e-4"] == 4  # every block kept: exact
        assert 0 < half["mean_rel_mse"] < 1 and half["mean_rel_mse"] > full["mean_rel_mse"]
    candidates = [r for r in data["rows"] if r["kind"] == "candidate"]
    assert candidates and all(0 < r["density"] <= 1 and r["mean_rel_mse"] >= 0 for r in candidates)


def test_whole_generations_with_the_oracles(tmp_path, load_script):
    from helpers import saved_tiny_organism

    module = load_script("oracle")
    weights = saved_tiny_organism(tmp_path / "tiny")  # 4 x 8 x 8 = 256 tokens: 4 blocks of 64
    out = tmp_path / "oracle.json"
    module.main(["--weights", str(weights), "--skip-per-head", "--blocks", "64", "--generate-densities", "1.0",
                 "0.25", "--gen-captions", "1", "--gen-steps", "2", "--calibration-captions", "1",
                 "--backend", "reference", "--out", str(out)])  # fmt: skip
    gen = json.loads(out.read_text())["generation"]
    rows = {(r["kind"], r["mask_density"]): r for r in gen["rows"]}
    assert set(rows) == {(k, d) for k in ("static", "per-call") for d in (1.0, 0.25)}
    for kind in ("static", "per-call"):
        assert rows[kind, 1.0]["psnr"] > 60 and rows[kind, 1.0]["density"] == 1.0  # every block: the dense video
        assert rows[kind, 0.25]["psnr"] < rows[kind, 1.0]["psnr"]
        assert rows[kind, 0.25]["density"] == pytest.approx(0.25)  # 1 of 4 key blocks per query block
    assert gen["calibration_captions"] and gen["captions"][0] not in gen["calibration_captions"]
