"""`sparse-vdit demo --quick` runs the organism path end to end: dense, a plan, SVG; files and table."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

from helpers import saved_tiny_organism  # noqa: E402
from sparse_vdit.cli.main import main  # noqa: E402


def _refuse(name):
    raise AssertionError(f"demo.json holds {name}: not JSON")


def test_demo_quick_end_to_end(tmp_path, capsys):
    assert main(["demo", "--quick", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny random organism" in out and "searched now" in out
    assert "1 torch thread" in out or "torch threads" in out
    info = json.loads((tmp_path / "demo.json").read_text(), parse_constant=_refuse)  # strict JSON
    assert [r["method"] for r in info["rows"]] == ["dense", "offline plan", "SVG 25%"]
    dense, plan, svg = info["rows"]
    assert dense["density"] == 1.0 and dense["psnr"] is None and dense["ssim"] == pytest.approx(1.0)
    assert svg["density"] < 1.0 and svg["psnr"] > 0 and 0 < svg["ssim"] <= 1
    assert all(r["seconds"] > 0 for r in info["rows"])
    assert (tmp_path / "plan.png").stat().st_size > 0
    import imageio.v3 as iio

    gif, mp4 = iio.imread(tmp_path / "dense_plan_svg.gif"), iio.imread(tmp_path / "dense_plan_svg.mp4")
    assert gif.shape[0] == mp4.shape[0] == 4  # every frame of the 4-frame videos
    # each panel sits under a white caption strip with dark text in it
    strip = gif[0, :22, :, :3]
    assert (strip == 255).mean() > 0.6 and (strip < 100).any()
    thirds = [strip[:, i * gif.shape[2] // 3 : (i + 1) * gif.shape[2] // 3] for i in range(3)]
    assert all((part < 100).any() for part in thirds)  # every panel is labelled


def test_demo_with_a_uniform_plan_and_given_weights(tmp_path, capsys):
    saved_tiny_organism(tmp_path / "w")
    assert main(["demo", "--weights", str(tmp_path / "w"), "--plan", "uniform", "--steps", "2", "--device", "cpu",
                 "--out", str(tmp_path / "out")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "organism weights from" in out and "uniform diagonal" in out and "Kernel check" not in out
    with pytest.raises(SystemExit, match="no organism weights"):
        main(["demo", "--weights", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])


def test_demo_model_choice_follows_the_device():
    import argparse

    from sparse_vdit.cli import demo
    from sparse_vdit.organism import model as M

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    for device, argv, model in [("cpu", [], "small"), ("cuda", [], "fidelity"), ("cuda:0", ["--model", "small"], "small"),
                                ("cpu", ["--model", "fidelity"], "fidelity")]:  # fmt: skip
        args = parser.parse_args([*argv, "--device", "cpu"])
        args.device = device  # "cuda" is refused at parse time without a GPU
        assert demo.shipped_model(args) == model
        assert demo._weights(args) == M.MODELS[model]
    assert (M.MODELS["fidelity"] / "config.json").exists() and (M.MODELS["small"] / "config.json").exists()
