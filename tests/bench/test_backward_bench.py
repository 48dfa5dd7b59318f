"""bench/backward.py: a dry run on the CPU times the Triton (interpreter) and reference backwards."""

import json

import pytest
import torch


def test_backward_dry_run(load_script, tmp_path):
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    result = load_script("backward").main(["--dry-run", "--backends", "triton", "--kinds", "band", "--out", str(tmp_path),
                                           "--variants", "default", "--profile"])  # fmt: skip
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) == {"cudnn-backward", "triton[default]", "reference"}
    (check,) = result["checks"]["default"]  # checked against float64 before it was timed
    assert check["ok"] and max(check["error"]) < 1e-5, check
    assert rows["triton[default]"]["variant"] == "default"
    assert all(r["ms"] > 0 and r["block_eff"] > 0 for r in rows.values())
    assert abs(rows["triton[default]"]["density"] - 0.1) < 0.2  # 4 x 4 blocks: the nearest density reached
    assert json.loads((tmp_path / "backward.json").read_text())["rows"] == result["rows"]
    traces = sorted(p.name for p in (tmp_path / "profile").iterdir())  # one profiled backward per sparse row
    assert traces == ["tiny-band-0.1-reference.txt", "tiny-band-0.1-triton[default].txt"]
    assert "sorted by self_cpu_time_total" in (tmp_path / "profile" / traces[1]).read_text()


def test_fa4_rows_say_which_backward_and_the_ab_forces_triton(load_script, monkeypatch):
    from sparse_vdit import VideoLayout, compile_layer
    from sparse_vdit.kernels import fa4
    from sparse_vdit.patterns import diagonal

    script = load_script("backward")
    monkeypatch.setattr(fa4, "BACKWARD", "auto")
    monkeypatch.setattr(fa4, "_arch_of", lambda device: (9, 0))  # a Hopper GPU, as FA4's backward sees it
    table = compile_layer([diagonal(0.5)] * 2, VideoLayout(2, 8, 16), 128)
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    assert script.use_backend("fa4") == "fa4" and fa4.BACKWARD == "auto"
    assert script.backend_label("fa4", None, table, q) == ("fa4[bwd=fa4]", "fa4")
    assert script.use_backend("fa4/triton") == "fa4" and fa4.BACKWARD == "triton"
    assert script.backend_label("fa4", None, table, q) == ("fa4[bwd=triton]", "triton")
    assert script.use_backend(None) is None and fa4.BACKWARD == fa4.BACKWARD_DEFAULT
    assert script.backend_label("triton", "default", table, q) == ("triton[default]", "triton")


def test_triton_rows_say_how_the_kernels_launch(load_script, monkeypatch):
    """triton_launches: one launch where every head's dS tiles fit the share; heads in key windows where one
    head's tiles are over it; every head recomputing under ``dq="recompute"`` (what the bench rows record)."""
    pytest.importorskip("triton")
    from sparse_vdit import VideoLayout, clear_caches, compile_layer
    from sparse_vdit.kernels.triton import backward
    from sparse_vdit.patterns import dense, diagonal

    script = load_script("backward")
    table = compile_layer([diagonal(0.5), dense(), diagonal(0.25)], VideoLayout(2, 8, 16), 16)  # 16 blocks of 16
    q = torch.zeros(1, 256, 3, 64, dtype=torch.float16)
    assert script.triton_launches(table, q) == {"launches": 1, "windowed_heads": 0, "recomputed_heads": 0}
    pair_bytes = 16 * 16 * 2
    monkeypatch.setitem(backward.OPTIONS, "ds_budget", 200 * pair_bytes / (8 << 30))  # the dense head has 256 pairs
    clear_caches()
    said = script.triton_launches(table, q)
    assert said["windowed_heads"] == 1 and said["launches"] >= 2 and said["recomputed_heads"] == 0, said
    monkeypatch.setitem(backward.OPTIONS, "dq", "recompute")
    assert script.triton_launches(table, q) == {"launches": 1, "windowed_heads": 0, "recomputed_heads": 3}


def test_backward_dry_run_skips_fa4_specs_without_a_gpu(load_script, tmp_path):
    from sparse_vdit.kernels import fa4, registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    result = load_script("backward").main(["--dry-run", "--backends", "fa4", "fa4/triton", "--kinds", "band",
                                           "--out", str(tmp_path)])  # fmt: skip
    assert set(result["skipped_backends"]) == {"fa4", "fa4/triton"}
    assert {r["backend"] for r in result["rows"]} == {"cudnn-backward", "reference"}
    assert fa4.BACKWARD == fa4.BACKWARD_DEFAULT


def test_backward_dry_run_times_the_processor_calls(load_script, tmp_path):
    """--calls: the whole call's backward, rotary included, on the old and the fused path, against the
    faster dense call (rotary then dense attention)."""
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    result = load_script("backward").main(["--dry-run", "--backends", "triton", "--kinds", "multi_diag", "--calls",
                                           "--profile", "--out", str(tmp_path)])  # fmt: skip
    rows = {r["backend"]: r for r in result["rows"]}
    assert set(rows) - {"triton[call-fused-f32]"} == {  # the f32 row only for float64 tables (Wan's)
        "cudnn-backward", "dense-call[torch rotary]", "dense-call[fused rotary]", "triton", "triton[call-old]",
        "triton[call-fused]", "triton[op-in-place]", "reference"}  # fmt: skip
    for path in ("call-old", "call-fused"):  # --profile: each call's backward profiled beside the operator's
        assert list((tmp_path / "profile").glob(f"*-{path}.txt"))
    bar = min(rows[f"dense-call[{r}]"]["ms"] for r in ("torch rotary", "fused rotary"))
    for path in ("call-old", "call-fused"):
        row = rows[f"triton[{path}]"]
        assert row["ms"] > 0 and row["block_eff"] == pytest.approx(row["density"] * bar / row["ms"])
    row = rows["triton[op-in-place]"]  # the op alone: cuDNN's bar
    assert row["block_eff"] == pytest.approx(row["density"] * rows["cudnn-backward"]["ms"] / row["ms"])
    assert json.loads((tmp_path / "backward.json").read_text())["rows"] == result["rows"]


def test_backward_dry_run_times_the_calls_under_each_variant(load_script, tmp_path):
    """--calls with --variants: each variant's whole calls too, labelled by both, one table row per call."""
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    script = load_script("backward")
    result = script.main(["--dry-run", "--backends", "triton", "--kinds", "multi_diag", "--calls", "--variants",
                          "dp-early", "--out", str(tmp_path)])  # fmt: skip
    rows = {r["backend"]: r for r in result["rows"]}
    for variant in ("dp-early",):
        assert result["checks"][variant][0]["ok"], result["checks"][variant]
        for call in ("call-old", "call-fused"):
            row = rows[f"triton[{variant}][{call}]"]
            assert (row["variant"], row["call"]) == (variant, call) and row["ms"] > 0
    table = script.variant_table(result)
    assert "tiny / multi_diag / 0.10 / call call-fused " in table and "dp-early" in table.splitlines()[0]


def test_backward_rounds_time_every_row_again_in_the_other_order(load_script, tmp_path):
    """--rounds 2: cuDNN and every variant's rows timed in each round (the variants reversed in the second, checked
    only in the first), each row saying its round and its host time a call; the table gives the median."""
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    script = load_script("backward")
    result = script.main(["--dry-run", "--backends", "triton", "--kinds", "band", "--variants", "default", "side-out",
                          "--rounds", "2", "--reference", "round", "--out", str(tmp_path)])  # fmt: skip
    timed = [(r["round"], r["backend"]) for r in result["rows"] if r["backend"] != "reference"]
    assert timed == [(0, "cudnn-backward"), (0, "triton[default]"), (0, "triton[side-out]"),
                     (1, "cudnn-backward"), (1, "triton[side-out]"), (1, "triton[default]")]
    assert {v: len(c) for v, c in result["checks"].items()} == {"default": 1, "side-out": 1}
    assert all(r["host_ms"] > 0 and r["reps"] >= 1 for r in result["rows"])
    dense = {r["round"]: r["ms"] for r in result["rows"] if r["backend"] == "cudnn-backward"}
    effs = sorted(r["density"] * dense[r["round"]] / r["ms"] for r in result["rows"] if r.get("variant") == "default")
    assert [r["block_eff"] for r in result["rows"] if r.get("variant") == "default"] == pytest.approx(
        [r["density"] * dense[r["round"]] / r["ms"] for r in result["rows"] if r.get("variant") == "default"])
    table = script.variant_table(result)
    assert "(median of 2 rounds)" in table.splitlines()[0]
    assert f"{sum(effs) / 2:10.3f}" in table.splitlines()[1]  # the median of two: their mean


def test_paired_reference_is_cudnn_timed_just_before_and_after_each_row(load_script, tmp_path, monkeypatch):
    """The default reference: each row's block efficiency against the mean of cuDNN's times just before it (the
    round's first, or the one after the row before) and just after it; ``block_eff_round`` against the round's first."""
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    script = load_script("backward")
    dense_times = iter([10.0, 20.0, 30.0, 40.0])  # cuDNN slowing down, as a card heating up to its power cap

    def fake_measure(attend, sets, target_ms, trace=None, energy=None):
        if getattr(attend, "__name__", "") == "dense_backward":
            return next(dense_times), {"host_ms": 0.1, "reps": 1}
        return 2.0, {"host_ms": 0.1, "reps": 1}

    monkeypatch.setattr(script, "measure", fake_measure)
    result = script.main(["--dry-run", "--backends", "triton", "--kinds", "band", "--variants", "default", "side-out",
                          "--out", str(tmp_path)])  # fmt: skip
    assert result["reference"] == "paired"
    rows = {r["backend"]: r for r in result["rows"] if r.get("variant")}
    first, second = rows["triton[default]"], rows["triton[side-out]"]
    assert (first["dense_ms"], second["dense_ms"]) == (15.0, 25.0)
    assert first["block_eff"] == pytest.approx(first["density"] * 15.0 / 2.0)
    assert second["block_eff"] == pytest.approx(second["density"] * 25.0 / 2.0)
    assert second["block_eff_round"] == pytest.approx(second["density"] * 10.0 / 2.0)


def test_check_layouts_build_for_every_shape(load_script):
    """Each shape's small check layout is valid: padded text only where the layout allows it (a suffix)."""
    from common import SHAPES

    backward = load_script("backward")
    for name, shape in SHAPES.items():
        layout = backward.check_layout(shape)
        assert layout.frames == shape.layout.frames, name
        padded = layout.text_valid is not None and layout.text_valid < layout.text
        assert padded == (shape.layout.text_position == "suffix" and layout.text > 0), name


def test_energy_per_call_reads_the_counter_around_the_calls(load_script):
    """common.energy_per_call: joules per call from the counter's difference over the calls it made (3 at least),
    rotating the input sets; energy_counter is None on the CPU."""
    common = load_script("common")
    made = []

    def fn(x):
        made.append(x)

    joules, calls, seconds = common.energy_per_call(fn, [(1,), (2,)], counter=lambda: 0.25 * len(made), seconds=0.0,
                                                    synchronize=lambda: None)  # fmt: skip
    assert calls == 3 and made == [1, 2, 1] and joules == pytest.approx(0.25) and 0 < seconds < 1
    assert common.energy_counter(torch.device("cpu")) is None


def test_backward_dry_run_energy_says_there_is_no_counter(load_script, tmp_path):
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    result = load_script("backward").main(["--dry-run", "--backends", "triton", "--kinds", "band", "--energy",
                                           "--out", str(tmp_path)])  # fmt: skip
    assert "no energy counter" in result["energy"]
    assert result["rows"] and not any("joules" in r or "energy_eff" in r for r in result["rows"])


def test_backward_dry_run_energy_rows(load_script, tmp_path, monkeypatch):
    """--energy with a counter (a stand-in for NVML's): each row's joules and mean watts, and energy_eff =
    density x J_dense / J against the dense cuDNN row of its shape."""
    from sparse_vdit.kernels import registry

    if not registry.available("triton", torch.device("cpu"))[0]:
        pytest.skip("needs triton and TRITON_INTERPRET=1")
    script = load_script("backward")
    monkeypatch.setattr(script, "energy_counter", lambda device: (lambda: 0.0))
    spent = iter([4.0, 1.0, 2.0])  # J per call: dense, then the two sparse rows (triton, reference)
    monkeypatch.setattr(script, "energy_per_call", lambda fn, sets, counter: (next(spent), 3, 0.5))
    result = script.main(["--dry-run", "--backends", "triton", "--kinds", "band", "--energy", "--out", str(tmp_path)])
    dense, triton, reference = result["rows"]
    assert dense["joules"] == 4.0 and dense["watts"] == pytest.approx(8.0) and triton["watts"] == pytest.approx(2.0)
    assert "energy_eff" not in dense
    assert triton["energy_eff"] == pytest.approx(triton["density"] * 4.0 / 1.0)
    assert reference["energy_eff"] == pytest.approx(reference["density"] * 4.0 / 2.0)
