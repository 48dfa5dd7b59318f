"""bench/svg.py's launch sweep of the fused profiling kernel (--tiles x --programs-per-sm), checked on
the CPU through its dry run (no timing assertions), and the kernel's programs-per-SM tunable.

The dry run itself (parts, summary) is also covered by tests/bench/test_e2e_bench.py."""

import json
import os
from types import SimpleNamespace

import pytest
import torch


def _triton_ready(dry_run: bool = False):
    """Skip unless Triton kernels can run: on CUDA, or on the CPU through the interpreter (which
    a dry run, always on the CPU, needs even on a GPU machine)."""
    pytest.importorskip("triton")
    if (dry_run or not torch.cuda.is_available()) and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1" if not dry_run else "a dry run's Triton path needs TRITON_INTERPRET=1")


@pytest.fixture(scope="module")
def bench(load_script):
    return load_script("svg")


def test_svg_bench_dry_run_sweeps_programs_per_sm_and_splits_the_profile(bench, tmp_path, load_script):
    _triton_ready(dry_run=True)
    from sparse_vdit.kernels.triton import sampled

    before = dict(sampled.TUNING)
    result = bench.main(["--dry-run", "--shapes", "tiny-text", "--densities", "0.4", "--rows", "16", "--sets", "1",
                         "--profile-backends", "triton", "torch", "--programs-per-sm", "2", "8",
                         "--tiles", "16,16,0,0", "--out", str(tmp_path)])  # fmt: skip
    assert sampled.TUNING == before  # each sweep point's overrides are undone
    saved = json.loads((tmp_path / "svg-dry-run.json").read_text())
    assert saved["summary"] == result["summary"]
    rows = [r for r in saved["rows"] if "density" in r]
    assert rows and all("programs_per_sm" in r and "tiles" in r for r in rows)
    assert not [r for r in rows if "error" in r]

    triton = [r for r in rows if r["profile_backend"] == "triton"]
    points = {("16,16,0,0", p) for p in (2, 8)}  # (the default tiles: test_svg_bench_profile_replays_...)
    assert {(r["tiles"], r["programs_per_sm"]) for r in triton} == points
    for point in points:  # every part at every point, the profile split into kernel and fused call
        parts = {r["part"] for r in triton if (r["tiles"], r["programs_per_sm"]) == point and "ms" in r}
        assert parts == {"profile", "profile-kernel", "profile-fused", "decide", "attn-fast", "attn-flex",
                         "layer-fast", "layer-flex", "decide-device", "attn-select", "layer-device"}  # fmt: skip
    for r in triton:  # the launch the kernel actually got
        launch = r["launch"]
        assert launch["programs"] == launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
        assert launch["splits"] == launch["grid"][2] >= 1 and launch["grid"][1] == r["heads"]
        default_n = sampled._tiles(16, r.get("head_dim", 64), torch.device("cpu"))[1]
        assert launch["block_n"] == (16 if r["tiles"] == "16,16,0,0" else default_n)
    torch_rows = [r for r in rows if r["profile_backend"] == "torch"]
    assert torch_rows and all(r["programs_per_sm"] is None and r["tiles"] is None for r in torch_rows)
    assert not {"profile-kernel", "profile-fused"} & {r["part"] for r in torch_rows}

    summary = {(s["profile_backend"], s["tiles"], s["programs_per_sm"]): s for s in result["summary"]}
    assert set(summary) == {("triton", *p) for p in points} | {("torch", None, None)}
    for key, s in summary.items():
        assert s["profile_ms"] > 0 and s["attn_fast_ms"] > 0
        if key[0] == "triton":
            assert s["profile_kernel_ms"] > 0
            assert s["profile_merge_ms"] is not None and s["profile_other_ms"] is not None
        else:
            assert s["profile_kernel_ms"] is None and s["profile_merge_ms"] is None

    # bench/report.py still renders the summary (one table line per sweep point)
    report = load_script("report")
    saved["versions"].update(gpu="cpu", triton="-", flash_attn_4="-")
    table = report.svg(saved)
    assert table.count("| tiny-text | 0.40 | 16 |") == len(summary)


def test_svg_bench_rejects_bad_tiles(bench):
    with pytest.raises(SystemExit):
        bench.parse(["--dry-run", "--tiles", "32,32,8"])
    with pytest.raises(SystemExit):
        bench.parse(["--dry-run", "--programs-per-sm", "0"])
    args = bench.parse(["--dry-run", "--tiles", "32,32,8,2", "default", "32,32,8,2"])
    from sparse_vdit.kernels.triton.sampled import PROGRAMS_PER_SM

    assert args.tiles == ["32,32,8,2", "default"] and args.programs_per_sm == [PROGRAMS_PER_SM]  # the kernel's


def test_svg_splits_follow_the_programs_per_sm_tunable(monkeypatch):
    pytest.importorskip("triton")
    from sparse_vdit.kernels.triton import sampled

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    cuda = torch.device("cuda")
    programs, kv_len, block_n = 4 * 40, 75_600, 64  # Wan-14B 720p: 4 row tiles (64 rows / 16) x 40 heads
    assert sampled.PROGRAMS_PER_SM == 2
    assert sampled._splits(programs, kv_len, block_n, cuda) == 2  # ceil(2 * 132 / 160): the default
    monkeypatch.setitem(sampled.TUNING, "programs_per_sm", 16)
    assert sampled._splits(programs, kv_len, block_n, cuda) == 14
    monkeypatch.setitem(sampled.TUNING, "programs_per_sm", 10_000)
    assert sampled._splits(programs, kv_len, block_n, cuda) == kv_len // (8 * block_n)  # splits stay >= 8 tiles
    monkeypatch.setitem(sampled.TUNING, "programs_per_sm", None)
    assert sampled._splits(programs, kv_len, block_n, cuda) == 2
    assert sampled._splits(programs, kv_len, block_n, torch.device("cpu")) == 2  # the interpreter ignores it


def test_svg_fused_profile_takes_explicit_splits():
    _triton_ready()
    from sparse_vdit import VideoLayout
    from sparse_vdit.kernels.triton.sampled import sampled_outputs
    from sparse_vdit.methods.svg import fused_inputs, band_widths, sample_rows

    layout, block = VideoLayout(4, 6, 8), 16
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 32, generator=g).to(device) for _ in range(3))
    patterns = band_widths(layout, 0.3, block).patterns()
    rows, starts, ends = fused_inputs(sample_rows(layout, 16, 0, 0), layout, patterns, block, torch.device(device))
    kw = dict(kv_len=layout.kv_len, softmax_scale=32**-0.5, block_size=block,
              layout=(layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens))  # fmt: skip
    args = (q, k, v, rows, starts, ends, tuple(p.token_major for p in patterns))
    auto = sampled_outputs(*args, **kw)
    for splits in (1, 3):
        got = sampled_outputs(*args, **kw, splits=splits)
        for a, b in zip(got, auto):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_svg_bench_profile_replays_run_through_the_timer(bench):
    """The profile-kernel / profile-fused replays go through ``common.time_fn`` as on the GPU (its
    first set's first item must be a tensor: the merged bench failed there with "'list' object has
    no attribute 'is_cuda'"), and replaying gives the classification's own outputs."""
    _triton_ready(dry_run=True)
    import common
    from sparse_vdit.kernels.triton import sampled
    from sparse_vdit.methods.svg import SVG

    shape = bench.DRY_SHAPES["tiny-video"]
    sets = common.random_sets(shape, 2, torch.device("cpu"), torch.float32)
    svg = SVG(0.4, warmup_steps=0, warmup_layers=0, sampled_rows=16, block_size=16, profile_backend="triton")
    parts, launch = bench.replay_parts(svg, sets, shape.layout, torch.device("cpu"))
    assert set(parts) == {"profile-kernel", "profile-fused"}
    assert launch["programs"] == launch["grid"][0] * launch["grid"][1] * launch["grid"][2]
    for name, (fn, replay_sets) in parts.items():
        assert all(isinstance(s[0], torch.Tensor) for s in replay_sets), name
        ms, _, reps = common.time_fn(fn, replay_sets)
        assert ms > 0 and reps == len(sets)
    fused = parts["profile-fused"][1][0][1]  # the captured sampled_outputs calls of the first set
    (args, kwargs), = fused
    out, mass = sampled.sampled_outputs(*args, **kwargs)
    torch.testing.assert_close(svg.classify(*sets[0], shape.layout, 0, 0),
                               bench_errors(out, mass, svg), rtol=0, atol=0)  # fmt: skip


def bench_errors(out, mass, svg):
    from sparse_vdit.methods.svg import sampled_errors

    return sampled_errors(out, mass, svg.error, per_sample=svg.choice == "per_sample")


def test_svg_bench_overhead_dry_run_times_the_three_parts_of_each_variant(bench, tmp_path):
    """``--overhead``: attention alone (each set's own choice), the decision alone and the layer, for
    each step-path variant, plus the layer's kernel table; the variants' switches are restored."""
    from sparse_vdit.kernels.triton import sampled
    from sparse_vdit.methods import svg_profile

    before = dict(sampled.TUNING), svg_profile.FUSED_CHOICE
    result = bench.main(["--dry-run", "--overhead", "--shapes", "tiny-text", "--reps", "2", "--sets", "2",
                         "--profile-backends", "torch", "--out", str(tmp_path)])  # fmt: skip
    assert (dict(sampled.TUNING), svg_profile.FUSED_CHOICE) == before
    saved = json.loads((tmp_path / "svg-overhead-dry-run.json").read_text())
    assert saved["summary"] == result["summary"]
    timed = [r for r in saved["rows"] if "ms" in r]
    assert {(r["variant"], r["part"]) for r in timed} == {(v, f"overhead-{p}") for v in ("before", "after")
                                                          for p in ("attn", "profile", "layer")}  # fmt: skip
    assert all(r["ms"] > 0 and r["density"] == 0.25 and r["mode"] == "reference" for r in timed)
    tables = [r for r in saved["rows"] if r["part"] == "overhead-kernels"]
    assert len(tables) == 2 and all(t["kernels"] and t["kernels"][0]["calls"] >= 1 for t in tables)
    assert [(s["variant"], s["tiles"]) for s in result["summary"]] == [("before", "default"), ("after", "default")]
    for s in result["summary"]:
        assert s["layer_over_attn"] == s["layer_ms"] / s["attn_ms"] and s["profile_share"] == s["profile_ms"] / s["attn_ms"]
        assert s["other_ms"] == pytest.approx(s["layer_ms"] - s["attn_ms"] - s["profile_ms"])


def test_svg_bench_overhead_sweeps_launches_of_the_after_variant_only(bench):
    import svg_overhead

    args = bench.parse(["--dry-run", "--overhead", "--tiles", "default", "64,32,8,3", "--programs-per-sm", "8", "2"])
    assert svg_overhead.points(args) == [("before", "default", 8), ("after", "default", 8), ("after", "default", 2),
                                         ("after", "64,32,8,3", 8), ("after", "64,32,8,3", 2)]  # fmt: skip
    assert args.densities == [0.25] and bench.parse(["--dry-run"]).densities == [0.3, 0.25, 0.2]


def test_svg_bench_kernel_sweep_dry_run_times_each_point_and_the_rule_s_layer(bench, tmp_path):
    """``--kernel-sweep``: each (tiles, programs per SM) point's profile, its choice against the launch
    rule's, then attention / profile / layer for the rule and the finalists; TUNING is restored. (The
    torch profile here, for speed: the kernel's tiles are checked in
    tests/methods/test_svg_profile_kernel.py.)"""
    pytest.importorskip("triton")
    from sparse_vdit.kernels.triton import sampled

    before = dict(sampled.TUNING)
    result = bench.main(["--dry-run", "--kernel-sweep", "--shapes", "tiny-text", "--reps", "2", "--sets", "2",
                         "--tiles", "64,32,4,3", "16,16,4,3", "--programs-per-sm", "1", "4",
                         "--finalists", "1", "--profile-backends", "torch", "--out", str(tmp_path)])  # fmt: skip
    assert dict(sampled.TUNING) == before
    saved = json.loads((tmp_path / "svg-kernel-sweep-dry-run.json").read_text())
    assert saved["summary"] == result["summary"]
    swept = [r for r in saved["rows"] if r["part"] == "kernel-sweep-profile"]
    assert {(r["tiles"], r["programs_per_sm"]) for r in swept} == {(t, p) for t in ("64,32,4,3", "16,16,4,3")
                                                                   for p in (1, 4)}  # fmt: skip
    assert all(r["ms"] > 0 and r["same_choice"] is True for r in swept)
    layer = {(r["tiles"], r["programs_per_sm"]) for r in saved["rows"] if r["part"].startswith("kernel-layer-")}
    fastest = min(swept, key=lambda r: r["ms"])
    assert layer == {("rule", None), (fastest["tiles"], fastest["programs_per_sm"])}  # the rule and 1 finalist
    rule = next(s for s in result["summary"] if s["tiles"] == "rule")
    assert rule["layer_over_attn"] == rule["layer_ms"] / rule["layer_attn_ms"] and rule["profile_share"] > 0
    assert len(result["summary"]) == 5


def test_svg_bench_kernel_sweep_defaults_to_the_sweep_s_tiles(bench):
    import svg_overhead

    args = bench.parse(["--dry-run", "--kernel-sweep"])
    assert args.overhead and args.programs_per_sm == list(svg_overhead.SWEEP_PROGRAMS) and args.tiles == list(svg_overhead.SWEEP)
    assert bench.parse(["--dry-run", "--kernel-sweep", "--tiles", "32,32,4,2"]).tiles == ["32,32,4,2"]
    assert bench.parse(["--dry-run"]).tiles == ["default"]
    with pytest.raises(SystemExit):
        bench.parse(["--dry-run", "--kernel-sweep", "--tiles", "64,32,4"])
