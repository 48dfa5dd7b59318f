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
        "fused-permuted", "fused-permuted-f32", "old"]
    # the -f32 path runs for float64 tables only (Wan)
    rows = {(r["kind"], r["path"]): r for r in result["rows"] if r["part"] in ("dense", "call")}
    expected = {("dense", "dense-old"), ("dense", "dense-fused"), ("dense", "dense-cudnn"), ("dense", "dense-triton"),
                ("mixed", "old"), ("mixed", "fused-permuted")}  # fmt: skip
    if family == "wan":  # and the sweep: the tuned calls (the fastest pass options and tiles)
        expected |= {("dense", "dense-fused-f32"), ("mixed", "fused-permuted-f32"),
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
    # each call's rotary alone (identity order) and the efficiency with it left out, against cuDNN alone
    rotary = {r["path"]: r["ms"] for r in result["rows"] if r["part"] == "rotary"}
    assert set(rotary) == {script.ROTARY_OF_PATH[path] for kind, path in rows if kind == "mixed"}
    assert all(ms > 0 for ms in rotary.values())
    for (kind, path), row in rows.items():
        if kind == "mixed":
            assert row["rotary_ms"] == rotary[script.ROTARY_OF_PATH[path]]
            assert row["eff_excl"] == script.rotary_excluded_eff(row["density"], rows[("dense", "dense-cudnn")]["ms"],
                                                                 row["ms"], row["rotary_ms"])  # fmt: skip
    for path in ("fused-permuted", "fused-permuted-f32", "tuned", "tuned-f32"):  # fp32: equal to old
        assert rows.get(("mixed", path), {"check": 0.0})["check"] < 1e-6
    assert result["failed_checks"] == []
    assert json.loads((tmp_path / "processor-attention.json").read_text())["rows"] == result["rows"]
    printed = capsys.readouterr().out
    assert "triton/fused-permuted" in printed.split("block efficiency")[1]  # the table
    assert "triton/fused-permuted" in printed.split("rotary excluded")[1]  # and the one with the rotary left out
    # the metric's ceiling per call, and with the Triton kernel's own dense speed (its block path, all blocks)
    bar = min(r["ms"] for (kind, path), r in rows.items() if kind == "dense" and path not in script.KERNEL_ALONE)
    kernel = {path: rows[("dense", path)]["ms"] for path in ("dense-cudnn", "dense-triton")}
    for r in script.with_ceilings(result):
        assert r["ceiling"] == pytest.approx(script.metric_ceiling(r["density"], bar, min(kernel.values()), r["rotary_ms"]))
        assert r["own_ceiling"] == pytest.approx(script.metric_ceiling(r["density"], bar, kernel["dense-triton"],
                                                                       r["rotary_ms"]))  # fmt: skip
    assert "own dense kernel" in printed
    if family == "wan":  # the winners, printed last
        assert "tuned-f32" in printed.split("winners:")[-1]


def test_rotary_excluded_efficiency(load_script):
    """density x t_dense_kernel / (t_call - t_rotary): 1.0 for a call costing its rotary plus the density's
    share of the dense kernel; None where the call is not slower than its rotary."""
    eff = load_script("processor_attention").rotary_excluded_eff
    assert eff(0.05, 10.0, 2.0 + 0.05 * 10.0, 2.0) == pytest.approx(1.0)  # the permutation free: 1.0 at 5%
    assert eff(0.1, 10.0, 4.0, 2.0) == pytest.approx(0.5)  # twice the ideal time once the rotary is out
    assert eff(0.1, 10.0, 2.0, 2.0) is None and eff(0.1, 10.0, 1.5, 2.0) is None


@pytest.mark.parametrize("family", ["hunyuan_video", "wan"])
def test_rotary_fns_rotate_in_identity_order(family, load_script):
    """Every rotary timed alone gives q and k rotated as the model does, rows left in their order (no
    permutation), so the dense call's bar and the rotary-excluded efficiency measure the same rotary."""
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    torch.set_num_threads(1)
    script = load_script("processor_attention")
    shape = script.Shape("tiny", script.VideoLayout(3, 5, 9, *((19, "suffix") if family != "wan" else ())), 4, 64)
    rotary = script.rotary_tables(shape, family, torch.device("cpu"))
    q, k = (torch.randn(1, shape.layout.num_tokens, 4, 64, generator=torch.Generator().manual_seed(i)) for i in (0, 1))
    fns = script.rotary_fns(rotary, {"native": "default", "f32": "default"})
    assert set(fns) == {"old", "fused", "fused-tuned", "fused-tuned-f32"} | ({"fused-f32"} if family == "wan" else set())
    expected = [script.models_rotary(x, rotary) for x in (q, k)]
    assert not torch.equal(expected[0], q)  # the rotary does something here
    for label, fn in fns.items():
        for got, want in zip(fn(q, k), expected):
            assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max(), label


def test_metric_ceiling(load_script):
    """density x bar / (t_rotary + density x t_kernel): 1.0 with no rotary, below it at low density with one."""
    ceiling = load_script("processor_attention").metric_ceiling
    assert ceiling(0.1, 10.0, 10.0, 0.0) == pytest.approx(1.0)
    assert ceiling(0.05, 10.2, 10.0, 0.2) == pytest.approx(0.05 * 10.2 / (0.2 + 0.5))  # 0.73: the rotary paid whole
    assert ceiling(0.05, 10.2, 10.0, 0.2) < ceiling(0.4, 10.2, 10.0, 0.2) < 1.0
    assert ceiling(0.1, 10.0, 8.0, 0.0) == pytest.approx(1.25)  # a dense kernel faster than the bar's


def test_ceilings_from_saved_rows(load_script, tmp_path, capsys):
    """The ceiling of each call row takes the bar (the fastest dense call with a rotary), the fastest dense
    kernel alone (FA4's counted) and the row's own rotary; --from-json prints the tables of a saved run."""
    script = load_script("processor_attention")
    dense = [("dense-cudnn", 10.0), ("dense-fa4", 8.0), ("dense-old", 13.0), ("dense-fused", 10.5)]
    rows = [dict(part="dense", shape="s", kind="dense", backend=label, path=label, density=1.0, ms=ms, tflops=1.0)
            for label, ms in dense]  # fmt: skip
    rows.append(dict(part="rotary", shape="s", kind="rotary", backend="rotary-fused", path="fused", ms=0.2))
    call = dict(part="call", shape="s", kind="mixed", target=0.1, density=0.1, backend="fa4/fused", path="fused", ms=1.5,
                block_eff=0.1 * 10.5 / 1.5, rotary_ms=0.2, eff_excl=None)  # fmt: skip
    failed = dict(call, backend="triton/fused-permuted", error="boom")
    del failed["ms"]
    result = {"versions": {}, "rows": rows + [call, failed], "incomplete": [], "failed_checks": []}
    (got,) = script.with_ceilings(result)
    assert got["ceiling"] == pytest.approx(0.1 * 10.5 / (0.2 + 0.1 * 8.0))
    assert got["of_ceiling"] == pytest.approx(call["block_eff"] / got["ceiling"])
    path = tmp_path / "processor-attention.json"
    path.write_text(json.dumps(result))
    assert script.main(["--from-json", str(path)])["rows"] == result["rows"]
    printed = capsys.readouterr().out
    assert f"fused {got['ceiling']:.2f}" in printed.split("ceiling =")[1]
    assert "fa4/fused" in printed.split("share of its ceiling")[1]
    with pytest.raises(SystemExit, match="no file"):
        script.main(["--from-json", str(tmp_path / "missing.json")])
