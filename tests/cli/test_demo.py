"""`sparse-vdit demo --quick` runs the organism path end to end: dense, a plan, SVG; files and table."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from sparse_vdit.cli.main import main  # noqa: E402


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny random organism" in out and "searched now" in out
    info = json.loads((tmp_path / "demo.json").read_text())
    assert [r["method"] for r in info["rows"]] == ["dense", "offline plan", "SVG 25%"]
    dense, plan, svg = info["rows"]
    assert dense["density"] == 1.0 and dense["psnr"] == float("inf") and dense["ssim"] == pytest.approx(1.0)
    assert svg["density"] < 1.0 and svg["psnr"] > 0 and 0 < svg["ssim"] <= 1
    assert all(r["seconds"] > 0 for r in info["rows"])
    assert (tmp_path / "dense_plan_svg.gif").stat().st_size > 0 and (tmp_path / "plan.png").stat().st_size > 0


def test_demo_with_a_uniform_plan_and_given_weights(tmp_path, capsys):
    from sparse_vdit.organism import model as M

    spec = M.OrganismSpec(frames=4, height=32, width=32)
    tiny = M.build_organism(M.organism_config(spec, num_layers=2, num_attention_heads=2, attention_head_dim=16,
                                              ffn_dim=64))  # fmt: skip
    M.save_organism(tiny, tmp_path / "w", spec)
    assert main(["demo", "--weights", str(tmp_path / "w"), "--plan", "uniform", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "organism weights from" in out and "uniform diagonal" in out and "Kernel check" not in out
    with pytest.raises(SystemExit, match="no organism weights"):
        main(["demo", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
