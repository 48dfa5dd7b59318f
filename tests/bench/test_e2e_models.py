"""bench/e2e.py knows Wan2.2-A14B (both experts, one after the other) and HunyuanVideo 1.5 (dry run)."""

import json

import pytest

pytest.importorskip("diffusers")


def test_dry_run_times_both_wan22_experts_and_hunyuan15(load_script, tmp_path):
    e2e = load_script("e2e")
    out = tmp_path / "e2e.json"
    assert e2e.main(["--dry-run", "--models", "wan2.2-a14b,hunyuan1.5", "--densities", "0.25", "--svg-densities", "",
                     "--online-densities", "", "--repeats", "1", "--out", str(out)]) == 0  # fmt: skip
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["variant"]) for r in rows] == [
        (model, variant) for model in ("wan2.2-a14b-transformer", "wan2.2-a14b-transformer_2", "hunyuan1.5")
        for variant in ("unpatched", "dense", "sparse-25")
    ]  # fmt: skip
    assert all(r["seconds"] > 0 and r["speedup_vs_unpatched"] > 0 for r in rows)
    assert all(r["density"] == pytest.approx(0.25, abs=0.03) for r in rows if r["variant"] == "sparse-25")


def test_hunyuan15_layout_joins_image_byt5_and_mllm_tokens(load_script):
    models = load_script("models")
    bench = models.MODELS["hunyuan1.5"]
    assert bench.self_attention_text() == (1000 + 256 + 729, 120 + 16)
    a, b = (models.MODELS[f"wan2.2-a14b-{n}"] for n in ("transformer", "transformer_2"))
    assert a.config == b.config and a.seed != b.seed  # one architecture, two sets of weights
