"""bench/locality.py: where attention mass goes, on constructed heads and a tiny organism."""

import json

import pytest
import torch

pytest.importorskip("diffusers")

GRID = (4, 8, 8)  # 256 tokens


def test_uniform_and_self_attention_heads_score_as_they_must(load_script):
    module = load_script("locality")
    masks = module.regions(GRID, "cpu")
    n = 256
    uniform = module.head_stats(torch.zeros(n, 16), torch.randn(n, 16), masks, block=64)
    assert uniform["eff"] == pytest.approx(1.0) and uniform["top25"] == pytest.approx(0.25, abs=1e-6)
    assert uniform["blk25"] == pytest.approx(0.25) and uniform["frame"] == pytest.approx(0.25)  # mass = area
    assert uniform["window"] == pytest.approx(float(masks["window"].float().mean()))
    codes = 20 * torch.eye(n)  # each query matches only its own key: logit 25 against 0
    own = module.head_stats(codes, codes, masks, block=64)
    assert own["eff"] < 2 / n and own["top1"] > 0.99 and own["window"] > 0.99 and own["blk25"] > 0.99


def test_tiny_organism_rows_and_tables(tmp_path, load_script, capsys):
    from helpers import saved_tiny_organism

    module = load_script("locality")
    weights = saved_tiny_organism(tmp_path / "tiny")
    out = tmp_path / "locality.json"
    module.main(["--weights", str(weights), "--steps", "2", "--record", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    config = json.loads((weights / "config.json").read_text())
    assert len(data["rows"]) == config["num_layers"] * config["num_attention_heads"]
    assert data["area"]["frame"] == pytest.approx(1 / data["grid"][0])
    for r in data["rows"]:
        assert r["step"] == 1 and 0 < r["eff"] <= 1
        assert r["top1"] <= r["top5"] <= r["top25"] <= 1 + 1e-6
        assert r["window"] <= r["band3"] + 1e-6 and r["window"] <= r["tube"] + 1e-6 and r["frame"] <= r["band3"] + 1e-6
    assert "| step |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no calls recorded"):
        module.main(["--weights", str(weights), "--steps", "2", "--record", "5", "--out", str(out)])


def test_head_kinds_count_heads_by_their_mean_effective_share(load_script):
    module = load_script("locality")
    effs = {(0, 0): [0.01, 0.03], (0, 1): [0.5, 0.9], (1, 0): [0.97, 0.99], (1, 1): [0.3, 0.2]}  # means .02 .7 .98 .25
    rows = [{"layer": lh[0], "head": lh[1], "eff": e} for lh, es in effs.items() for e in es]
    kinds = module.head_kinds(rows)
    assert (kinds["heads"], kinds["sharp"], kinds["between"], kinds["uniform"], kinds["flat"]) == (4, 1, 1, 2, 1)
    assert kinds["eff"] == pytest.approx((0.02 + 0.7 + 0.98 + 0.25) / 4)


def test_summarize_compares_saved_runs_without_a_model(tmp_path, load_script, capsys):
    module = load_script("locality")
    paths = []
    for name, eff in (("early", 0.02), ("late", 0.9)):
        rows = [{"layer": 0, "head": h, "eff": eff, "blk25": 0.5, "window": 0.1} for h in range(3)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"grid": [2, 4, 4], "rows": rows, "weights_trained": {"total_steps": 7, "total_videos_seen": 70}}))
        paths.append(str(path))
    assert module.main(["--summarize", *paths]) == 0
    out = capsys.readouterr().out
    assert "| early | 7 (70) | 2x4x4 | 3 | 0 | 0 (0) | 0.02 |" in out
    assert "| late | 7 (70) | 2x4x4 | 0 | 0 | 3 (0) | 0.90 |" in out
