"""bench/processor_attention.py: a dry run on the CPU (Triton interpreter) times and checks each path."""

import json

import pytest
import torch


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_processor_attention_dry_run(family, load_script, tmp_path, capsys, monkeypatch):
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    script = load_script("processor_attention")
    monkeypatch.setitem(script.FAMILY, "tiny", family)  # wan: float64 tables, the -f32 paths run too
    if family == "wan":  # Wan has no text tokens in its self-attention
        monkeypatch.setattr(script, "TINY", script.Shape("tiny", script.VideoLayout(3, 5, 9), 4, 128))  # D=128: tile choices
    sweep = ["--sweep", "--pass-variants", "default", "b32", "--tile-variants", "default", "64x64x4x3"]
    result = script.main(["--dry-run", "--densities", "0.3", "--kinds", "mixed", "--backends", "triton", "--sets", "1",
                          "--out", str(tmp_path), *(sweep if family == "wan" else [])])  # fmt: skip
    assert sorted(label for backend, label in script.PATHS if backend == "triton") == [
        "fused-permuted", "fused-permuted-f32", "old"]  # the -f32 path runs for float64 tables only (Wan)
    rows = {(r["kind"], r["path"]): r for r in result["rows"] if r["part"] in ("dense", "call")}
    expected = {("dense", "dense-old"), ("dense", "dense-fused"), ("mixed", "old"), ("mixed", "fused-permuted")}
    if family == "wan":  # and the sweep: cuDNN alone, the tuned calls (the fastest pass options and tiles)
        expected |= {("dense", "dense-fused-f32"), ("mixed", "fused-permuted-f32"), ("dense", "dense-cudnn"),
                     ("dense", "dense-fused-tuned"), ("dense", "dense-fused-tuned-f32"), ("mixed", "tuned"),
                     ("mixed", "tuned-f32")}  # fmt: skip
        passes = [(r["tables"], r["variant"]) for r in result["rows"] if r["part"] == "pass"]
        assert passes == [(t, v) for t in ("native", "f32") for v in ("default", "b32")]
        kernels = [r for r in result["rows"] if r["part"] == "kernel"]
        assert [r["variant"] for r in kernels] == ["default", "64x64x4x3"] and all(r["check"] < 1e-6 for r in kernels)
        assert all(r["check"] < 1e-6 and r["check_vs_native"] < 1e-3 for r in result["rows"] if r["part"] == "pass")
        tuned = rows[("mixed", "tuned-f32")]
        assert tuned["pass_variant"] in ("default", "b32") and tuned["tile_variant"] in ("default", "64x64x4x3")
    assert set(rows) == expected
    assert all(r["ms"] > 0 for r in rows.values())
    for path in ("fused-permuted", "fused-permuted-f32", "tuned", "tuned-f32"):  # fp32: equal to old
        assert rows.get(("mixed", path), {"check": 0.0})["check"] < 1e-6
    assert result["failed_checks"] == []
    assert json.loads((tmp_path / "processor-attention.json").read_text())["rows"] == result["rows"]
    printed = capsys.readouterr().out
    assert "triton/fused-permuted" in printed.split("block efficiency")[1]  # the table
    if family == "wan":  # the winners, printed last
        assert "tuned-f32" in printed.split("winners:")[-1]
