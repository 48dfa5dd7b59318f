"""bench/e2e.py runs end to end on tiny models on the CPU (--dry-run); its plans hit their density."""

import json

import pytest

pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def e2e(load_script):
    return load_script("e2e")


def test_dry_run_writes_results_and_table(e2e, tmp_path, capsys):
    out = tmp_path / "e2e.json"
    assert e2e.main(["--dry-run", "--models", "hunyuan", "--densities", "0.3", "--svg-densities", "0.3", "--repeats",
                     "1", "--svg-backends", "auto,flex,reference-device,reference-plan", "--online-densities", "0.3",
                     "--online-block-list", "--out", str(out), "--profile", str(tmp_path / "prof")]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [r["variant"] for r in rows] == ["unpatched", "dense", "sparse-30", "svg-30", "svg-30-flex",
                                            "svg-30-reference-device", "svg-30-reference-plan", "hybrid-30", "hybrid-30-list", "top-k-30",
                                            "top-k-30-clustered", "top-k-30-every2", "top-k-30-g2",
                                            "top-k-30-list"]  # fmt: skip
    online = rows[7:]
    plan_row = rows[6]  # SVG's recorded choices as a fixed plan: no profiling, the same backend
    rows = rows[:6]
    assert plan_row["svg_backend"] == "reference" and "profile_seconds" not in plan_row and plan_row["seconds"] > 0
    assert 0 < plan_row["density"] < 1 and plan_row["target_density"] == 0.3
    for r in online:  # the selection is timed inside the attention, like SVG's profiling
        assert 0 < r["profile_seconds"] < r["attention_seconds"] and r["online_calls"] > 0
        assert 0 < r["density"] < 1 and r["target_density"] == 0.3
    named = {r["variant"]: r for r in online}
    every, grouped = named["top-k-30-every2"], named["top-k-30-g2"]  # successive steps: the second forward of
    assert every["every"] == 2 and every["online_reused"] > 0 and every["online_calls"] == every["online_reused"]
    assert grouped["key_group"] == 2 and named["top-k-30"]["key_group"] == 1  # each unit reuses the tables
    listed = {"top-k-30-list", "hybrid-30-list"}  # the Triton kernel's mode
    assert all(named[v]["block_list"] == (v in listed) for v in named)
    assert rows[5]["svg_decided_on"] == "device" and rows[3]["svg_decided_on"] == "host"
    assert all(r["seconds"] > 0 and r["dry_run"] for r in rows)
    assert rows[2]["speedup_vs_unpatched"] > 0 and rows[2]["speedup_vs_dense"] > 0
    assert 0 < rows[2]["attention_share"] < 1
    for svg in rows[3:]:  # the profiling overhead is its own column, part of the attention time
        assert 0 < svg["profile_seconds"] < svg["attention_seconds"] and 0 < svg["profile_share"] < 1
        assert 0 < svg["density"] < 1 and svg["target_density"] == 0.3 and "profile_share" not in rows[2]
    assert rows[4]["svg_backend"] == "reference"  # the CPU stand-in for flex
    assert "x unpatched" in capsys.readouterr().out.splitlines()[-16]  # the table comes last
    traces = {p.stem: p.read_text() for p in (tmp_path / "prof").iterdir()}  # one profiled forward per variant
    assert set(traces) == {f"hunyuan-eager-{r['variant']}" for r in json.loads(out.read_text())["results"]}
    assert "sorted by self_cpu_time_total" in traces["hunyuan-eager-hybrid-30"]
    assert "aten::" in traces["hunyuan-eager-hybrid-30"]


def test_mixed_plans_hit_their_density(load_script):
    from sparse_vdit import VideoLayout
    from sparse_vdit.plan import KNOWN_MODELS

    layout = VideoLayout(21, 30, 52)  # Wan-1.3B 480p
    spec = KNOWN_MODELS["wan2.1-t2v-1.3b"]
    for density in (0.5, 0.3, 0.1):
        plan = load_script("models").mixed_plan(spec, layout, density, 128)
        assert plan.density(layout) == pytest.approx(density, abs=0.01)
        names = [p.name for layer in plan.schedule[0].layers for p in layer]
        assert names.count("skip") == round(0.05 * len(names))
        assert {"diagonal", "multi_diagonal", "vertical"} <= set(names)


def test_svg_attention_bench_dry_run(tmp_path, load_script):
    module = load_script("svg")
    result = module.main(["--dry-run", "--shapes", "tiny-text", "--densities", "0.4", "--profile-backends", "torch",
                          "--out", str(tmp_path)])  # fmt: skip
    parts = {r["part"] for r in result["rows"] if "ms" in r}
    assert parts == {"cudnn-dense", "profile", "decide", "attn-fast", "attn-flex", "layer-fast", "layer-flex",
                     "decide-device", "attn-select", "layer-device"}
    (summary,) = result["summary"]
    assert summary["profile_share"] > 0 and summary["flex_over_fast"] > 0 and summary["profile_backend"] == "torch"
    assert json.loads((tmp_path / "svg-dry-run.json").read_text())["summary"] == result["summary"]


def test_triton_options_tag_rows_and_merge_apart(e2e, tmp_path, capsys):
    """``--triton-options``: set for the run and restored after it; its rows carry them and merge beside the
    rows run without them, in one file."""
    from sparse_vdit.kernels.triton import launcher

    out = tmp_path / "e2e.json"
    common = ["--dry-run", "--models", "hunyuan", "--densities", "0.3", "--svg-densities", "", "--online-densities", "",
              "--repeats", "1", "--out", str(out)]  # fmt: skip
    assert e2e.main(common) == 0
    assert e2e.main([*common, "--triton-options", "schedule=heads", "tma=False"]) == 0
    assert launcher.OPTIONS["schedule"] is None and launcher.OPTIONS["tma"] is None
    rows = json.loads(out.read_text())["results"]
    tagged = sorted(r["variant"] for r in rows if r.get("options") == "schedule=heads,tma=False")
    plain = sorted(r["variant"] for r in rows if "options" not in r)
    assert tagged == plain == ["dense", "sparse-30", "unpatched"]
    assert "sparse-30 [schedule=heads,tma=False]" in capsys.readouterr().out
    assert e2e.triton_options(["tiles=(128, 64, 8, 3)", "schedule=levels"]) == {"tiles": (128, 64, 8, 3),
                                                                                  "schedule": "levels"}
    with pytest.raises(ValueError, match="NAME=VALUE"):
        e2e.triton_options(["glon=True"])
    with pytest.raises(ValueError, match="NAME=VALUE"):
        e2e.triton_options(["tma"])
