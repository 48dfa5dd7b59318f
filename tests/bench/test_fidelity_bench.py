"""bench/fidelity.py --quick: every method family on a tiny random organism, JSON, Pareto PNG, table."""

import json

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("skimage")


def test_quick_run_writes_results_plot_and_table(tmp_path, capsys, load_script):
    module = load_script("fidelity")
    out = tmp_path / "fidelity.json"
    assert module.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    families = [r["family"] for r in data["rows"]]
    assert families == ["dense", "offline", "offline", "svg", "window-spatial", "window-temporal", "online-top-p",
                        "online-top-k", "online-top-k", "online-clustered", "hybrid", "oracle-static", "oracle-per-call", "skip-only"]  # fmt: skip
    assert data["videos"] == 2 and data["dry_run"] and not data["speedup_meaningful"]
    for r in data["rows"]:
        assert 0 < r["density"] <= 1 and r["flop_reduction"] == pytest.approx(1 / r["density"])
        assert r["psnr"] > 0 and 0 < r["ssim"] <= 1 and r["attention_speedup"] > 0
    assert data["rows"][0]["psnr"] == float("inf") and min(r["density"] for r in data["rows"]) < 0.5
    assert out.with_suffix(".png").stat().st_size > 0
    text = capsys.readouterr().out
    assert "| window-temporal-0.2 |" in text and "NOT meaningful" in text
    assert "| oracle-per-call-50 |" in out.with_suffix(".md").read_text() and data["not_run"] == []
    rows = {r["method"]: r for r in data["rows"]}
    for name in ("oracle-static-50", "oracle-per-call-50"):  # every step sparse (3 steps: no warm-up)
        assert rows[name]["density"] == pytest.approx(0.5) and rows[name]["mask_density"] == 0.5
    assert rows["skip-only"]["skipped_heads"] >= 0 and "skipped_heads" not in rows["svg-40"]
    assert rows["top-k-25"]["density"] == pytest.approx(0.25) and rows["top-p-0.9"]["p"] == 0.9
    assert rows["top-k-25-g2"]["key_group"] == 2 and 0.2 < rows["top-k-25-g2"]["density"] < 0.3
    assert rows["hybrid-eps=0.001-p=0.9"]["epsilon"] == 0.001 and "plan_density" in rows["hybrid-eps=0.001-p=0.9"]


def test_output_error_searches_oracles_at_full_density_and_the_budget(tmp_path, load_script):
    module = load_script("fidelity")
    out = tmp_path / "fidelity.json"
    args = ["--quick", "--device", "cpu", "--out", str(out), "--epsilons", "", "--output-epsilons", "0.01",
            "--no-skip-only", "--svg-densities", "", "--spatial-widths", "", "--temporal-widths", "0.2",
            "--oracle-densities", "1.0", "--online-ps", "", "--topk-densities", "", "--hybrid-ps", "",
            "--cluster-ps", ""]  # fmt: skip
    assert module.main(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "offline-out-eps=0.01", "window-temporal-0.2", "oracle-static-100",
                          "oracle-per-call-100"]  # fmt: skip
    assert rows["offline-out-eps=0.01"]["family"] == "offline-out" and "skipped_share" in rows["offline-out-eps=0.01"]
    for name in ("oracle-static-100", "oracle-per-call-100"):  # every block kept: the dense videos
        assert rows[name]["psnr"] > 60 and rows[name]["density"] == 1.0
    assert module.main([*args, "--budget-s", "0"]) == 0  # past the budget at once: dense alone runs
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["dense"] and len(data["not_run"]) == 4


def test_paper_setting_and_saved_plans(tmp_path, load_script):
    from sparse_vdit import Plan

    module = load_script("fidelity")
    out, plans = tmp_path / "fidelity.json", tmp_path / "plans"
    args = ["--quick", "--device", "cpu", "--out", str(out), "--paper", "--save-plans", str(plans),
            "--epsilons", "0.01", "--no-skip-only", "--svg-densities", "", "--spatial-widths", "",
            "--temporal-widths", "", "--oracle-densities", "", "--online-ps", "", "--topk-densities", "",
            "--hybrid-ps", "", "--cluster-ps", ""]  # fmt: skip
    assert module.main(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "offline-eps=0.01", "offline-paper"]
    assert rows["offline-paper"]["family"] == "offline-paper"
    for name in ("offline-eps=0.01", "offline-paper"):
        assert rows[name]["search_cost_vs_dense"] > 0 and rows[name]["search_runs"] >= 1
        plan = Plan.load(plans / f"{name}.json")
        assert plan.made_by["mode"] == ("paper" if name == "offline-paper" else "ours")
    assert json.loads((plans / "offline-eps=0.01.json").read_text())["made_by"]["epsilon"] == 0.01


def test_svg_variants_are_rows_of_their_own(tmp_path, load_script):
    module = load_script("fidelity")
    out = tmp_path / "fidelity.json"
    args = ["--quick", "--device", "cpu", "--out", str(out), "--epsilons", "", "--no-skip-only",
            "--svg-densities", "0.4", "--svg-variants", "ours", "profile_masks=executed", "sink=false",
            "--spatial-widths", "", "--temporal-widths", "", "--oracle-densities", "", "--online-ps", "",
            "--topk-densities", "", "--hybrid-ps", "", "--cluster-ps", ""]  # fmt: skip
    assert module.main(args) == 0
    rows = {r["method"]: r for r in json.loads(out.read_text())["rows"]}
    assert list(rows) == ["dense", "svg-40", "svg-40-ours", "svg-40-profile_masks=executed", "svg-40-sink=false"]
    assert all(rows[name]["family"] == "svg" and 0 < rows[name]["density"] < 1 for name in list(rows)[1:])
    assert rows["svg-40-ours"]["svg_options"] == {"density": 0.4, "mode": "ours"}
    assert rows["svg-40-sink=false"]["svg_options"] == {"density": 0.4, "sink": False}
    assert module.svg_variant("row_sampling=stratified") == ("row_sampling=stratified", {"row_sampling": "stratified"})
    for bad in ("profile_masks=nope", "colour=red", "sink=maybe"):
        with pytest.raises(Exception, match="one of"):
            module.svg_variant(bad)
