"""SVG (online spatial/temporal heads): rows, masks, errors, classification, outputs, widths, plans."""

import json
from types import SimpleNamespace

import pytest
import torch

import sparse_vdit
from helpers import masked_attention, rel_rms, token_mask
from sparse_vdit import Plan, VideoLayout, compile_layer, sparse_attention
from sparse_vdit.kernels.api import reorder_heads
from sparse_vdit.methods.svg import (
    SVG,
    band_widths,
    row_masks,
    sample_rows,
    sampled_errors,
    sampled_outputs,
    token_major_positions,
)

BLOCK = 16
LAYOUTS = {
    "video": VideoLayout(6, 12, 12),
    "prefix-text": VideoLayout(6, 12, 12, 20, "prefix"),
    "suffix-padded": VideoLayout(6, 12, 12, 24, "suffix", 13),
}
KINDS = "STTSTS"  # per head: purely spatial or purely temporal


def structured_qkv(layout, kinds=KINDS, batch=2, dim=16, sigma=24.0, noise=0.05, seed=0):
    """q, k, v (B, N, H, D) whose head h attends like a Gaussian of ``sigma`` tokens around the query,

    in frame-major order (spatial heads, "S": the same frame region) or in token-major order
    (temporal heads, "T": the same spatial position in every frame). Logits are exactly
    ``-(x_i - x_j)^2 / (2 sigma^2)`` in tokens: ``q = c [1, x, x^2]``, ``k = [-x^2, 2x, -1]``.
    """
    g = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    pos = torch.arange(n)
    coords = {"S": pos.double() / n, "T": token_major_positions(pos, layout).double() / n}
    c = n**2 / (2 * sigma**2) * dim**0.5  # undoes the softmax scale
    q = torch.zeros(batch, n, len(kinds), dim, dtype=torch.float64)
    k = torch.zeros_like(q)
    for h, kind in enumerate(kinds):
        x = coords[kind]
        q[:, :, h, :3] = c * torch.stack([torch.ones_like(x), x, x * x], -1)
        k[:, :, h, :3] = torch.stack([-x * x, 2 * x, -torch.ones_like(x)], -1)
    q[..., 3:] = noise * torch.randn(q[..., 3:].shape, generator=g, dtype=torch.float64)
    k[..., 3:] = noise * torch.randn(k[..., 3:].shape, generator=g, dtype=torch.float64)
    v = torch.randn(q.shape, generator=g, dtype=torch.float64)
    return q.float(), k.float(), v.float()


def call(q, k, v, layout, step=5, layer=3):
    return SimpleNamespace(step=step, layer=layer, q=q, k=k, v=v, layout=layout)


# --- rows and masks ------------------------------------------------------------------------------


def test_sampled_rows_cover_every_frame_deterministically():
    layout = LAYOUTS["prefix-text"]
    rows = sample_rows(layout, 24, step=3, layer=1)
    assert torch.equal(rows, sample_rows(layout, 24, step=3, layer=1))
    assert not torch.equal(rows, sample_rows(layout, 24, step=4, layer=1))
    assert not torch.equal(rows, sample_rows(layout, 24, step=3, layer=2))
    assert rows.unique().numel() == 24 and bool((rows >= 20).all() and (rows < 20 + 864).all())  # video only
    frames = ((rows - 20) // layout.frame_tokens).unique()
    assert frames.tolist() == list(range(6))
    assert torch.equal(sample_rows(layout, 5000, 0, 0), torch.arange(20, 20 + 864))


@pytest.mark.parametrize("name", LAYOUTS)
def test_token_major_positions_are_the_layout_permutation(name):
    layout = LAYOUTS[name]
    pos = torch.arange(layout.num_tokens)
    assert torch.equal(token_major_positions(pos, layout), layout.frame_major_order())


@pytest.mark.parametrize("name", LAYOUTS)
def test_row_masks_equal_the_token_mask_oracle(name):
    layout = LAYOUTS[name]
    w = band_widths(layout, 0.3, BLOCK)
    rows = sample_rows(layout, 32, 0, 0)
    masks = row_masks(rows, layout, w.patterns(), BLOCK)
    assert masks.shape == (2, 32, layout.kv_len) and masks.dtype == torch.bool
    for i, pattern in enumerate(w.patterns()):
        expected = token_mask(compile_layer([pattern], layout, BLOCK), 0)[rows]
        assert torch.equal(masks[i], expected), pattern


@pytest.mark.parametrize("error", ["output", "mass"])
def test_sampled_errors_equal_a_float64_oracle_in_any_chunking(error):
    layout = LAYOUTS["suffix-padded"]
    q, k, v = structured_qkv(layout, kinds="STT", noise=1.0)
    rows = sample_rows(layout, 16, 1, 1)
    patterns = band_widths(layout, 0.3, BLOCK).patterns()
    masks = row_masks(rows, layout, patterns, BLOCK)
    scale = q.shape[-1] ** -0.5
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for h in range(3):
        for b in range(2):
            args = (q[b : b + 1, rows, h], k[b : b + 1, :, h], v[b : b + 1, :, h])
            full = torch.ones(len(rows), layout.kv_len, dtype=torch.bool)
            exact = masked_attention(*args, full, scale)
            for i in range(2):
                if error == "output":
                    expected[i, h] += (masked_attention(*args, masks[i], scale) - exact).square().mean() / 2
                else:
                    s = (args[0].double() @ args[1][:, : layout.kv_len].double().transpose(-1, -2)) * scale
                    p = torch.softmax(s, -1)
                    expected[i, h] += (1 - (p * masks[i]).sum(-1)).mean() / 2
    for chunk in (1, 16 * layout.kv_len * 2, 1 << 30):
        outputs, masses = sampled_outputs(q, k, v, rows, layout, patterns, BLOCK, chunk=chunk)
        assert outputs.shape == (2, 3, 3, 16, 16) and masses.shape == (2, 3, 3, 16)
        got = sampled_errors(outputs, masses, error)
        assert got.shape == (2, 3) and got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-7)


TRITON_CASES = {
    "video-fp32": ("video", torch.float32, 16),
    "prefix-text-fp16": ("prefix-text", torch.float16, 32),
    "suffix-padded-fp32-d32": ("suffix-padded", torch.float32, 32),
    "suffix-padded-bf16-d128": ("suffix-padded", torch.bfloat16, 128),  # GPU only (interpreter bf16 dots)
}


# kernel launch settings: the default rule, 16-row tiles with 16-key tiles (several row tiles; the
# frame-major mask tested once per row and tile, as on a GPU at block 128), and the mask tested per key
KERNEL_SETTINGS = {"default": {}, "16x16-row-wise": {"block_m": 16, "block_n": 16},
                   "per-key": {"block_n": 16, "row_wise": False}}
# the interpreter (CI's CPU suite) runs each case once and each setting once (video 16-row tiles, prefix per-key,
# suffix default); a GPU runs them all
INTERPRETER_LEFT_OUT = {("prefix-text-fp16", "16x16-row-wise"), ("suffix-padded-fp32-d32", "16x16-row-wise"),
                        ("video-fp32", "per-key"), ("video-fp32", "default"), ("prefix-text-fp16", "default"),
                        ("suffix-padded-fp32-d32", "per-key")}


@pytest.mark.parametrize("setting", KERNEL_SETTINGS)
@pytest.mark.parametrize("case", TRITON_CASES)
def test_fused_triton_profiling_equals_the_torch_path(case, setting, monkeypatch):
    pytest.importorskip("triton")
    import os

    from sparse_vdit.kernels.triton import sampled as fused

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    name, dtype, dim = TRITON_CASES[case]
    layout = LAYOUTS[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter computes bf16 dots wrongly on the CPU")
    if device == "cpu" and (case, setting) in INTERPRETER_LEFT_OUT:
        pytest.skip("left out on the interpreter (its other cases cover this setting and case)")
    q, k, v = (t.to(device, dtype) for t in structured_qkv(layout, dim=dim, noise=1.0, sigma=60.0))
    rows = sample_rows(layout, 24, 2, 1).to(device)
    patterns = band_widths(layout, 0.25, BLOCK).patterns()
    ref = sampled_outputs(q.float(), k.float(), v.float(), rows, layout, patterns, BLOCK, backend="torch")
    monkeypatch.setattr(fused, "TUNING", dict(fused.TUNING, **KERNEL_SETTINGS[setting]))
    got = sampled_outputs(q, k, v, rows, layout, patterns, BLOCK, backend="triton")
    tol = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    for a, b in zip(got, ref):
        assert a.shape == b.shape and not a.isnan().any()
        assert rel_rms(a, b) < tol, rel_rms(a, b)
    for error in ("output", "mass"):
        e_got, e_ref = sampled_errors(*got, error), sampled_errors(*ref, error)
        assert torch.equal(e_got[1] < e_got[0], e_ref[1] < e_ref[0])
        assert rel_rms(e_got, e_ref) < 50 * tol


# --- classification and output ------------------------------------------------------------------


@pytest.mark.parametrize("error", ["output", "mass"])
@pytest.mark.parametrize("name", LAYOUTS)
def test_classifier_assigns_structured_heads(name, error):
    layout = LAYOUTS[name]
    q, k, v = structured_qkv(layout)
    svg = SVG(0.3, warmup_steps=0, warmup_layers=0, sampled_rows=32, error=error, block_size=BLOCK)
    for step in range(3):
        patterns = svg(call(q, k, v, layout, step=step))
        assert "".join("T" if p.name == "temporal" else "S" for p in patterns) == KINDS
        errors = svg.last_errors
        chosen, other = errors.min(0).values, errors.max(0).values
        assert bool((chosen < 0.5 * other).all()), errors  # clear decisions, not ties


def test_output_equals_reference_and_token_mask_oracle():
    layout = LAYOUTS["prefix-text"]
    q, k, v = structured_qkv(layout, noise=1.0)
    q[..., :3] *= 0.002  # softer heads: the masks matter for every row
    svg = SVG(0.25, warmup_steps=0, warmup_layers=0, block_size=BLOCK)
    patterns = svg(call(q, k, v, layout))
    table = compile_layer(patterns, layout, BLOCK)
    assert {p.name for p in patterns} <= {"spatial", "temporal"}
    assert table.token_major_heads == tuple(h for h, p in enumerate(patterns) if p.name == "temporal")
    out = sparse_attention(q, k, v, table, backend="reference")
    expected = torch.zeros(q.shape, dtype=torch.float64)
    for h in range(q.shape[2]):
        expected[:, :, h] = masked_attention(q[:, :, h], k[:, :, h], v[:, :, h], token_mask(table, h), q.shape[-1] ** -0.5)
    assert rel_rms(out, expected) < 1e-5
    dense_out = sparse_attention(q, k, v, compile_layer([sparse_vdit.patterns.dense()] * 6, layout, BLOCK), backend="reference")
    assert rel_rms(out, dense_out) > 1e-3


def test_mixed_permutation_round_trips_exactly():
    layout = LAYOUTS["suffix-padded"]
    x = torch.randn(2, layout.num_tokens, 6, 8)
    heads = [1, 2, 4]
    there = reorder_heads(x, layout, heads)
    assert torch.equal(reorder_heads(there, layout, heads, to_token_major=False), x)
    perm = layout.token_major_order()
    assert torch.equal(there[:, :, heads], x[:, perm][:, :, heads]) and torch.equal(there[:, :, [0, 3, 5]], x[:, :, [0, 3, 5]])


# --- widths and arguments -----------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.3, 0.25, 0.2])
@pytest.mark.parametrize(
    "layout,block",
    [(VideoLayout(21, 30, 52), 128), (VideoLayout(33, 45, 80, 256, "suffix", 64), 128),
     (VideoLayout(11, 48, 85, 226, "prefix"), 128), (LAYOUTS["prefix-text"], BLOCK)],  # fmt: skip
    ids=["wan-480p", "hunyuan-720p", "cogvideox-768p", "tiny"],
)
def test_density_lands_within_one_key_block_per_row(layout, block, density):
    w = band_widths(layout, density, block)
    kv_blocks = -(-layout.kv_len // block)
    for pattern, reported in zip(w.patterns(), (w.spatial_density, w.temporal_density)):
        table = compile_layer([pattern] * 3, layout, block)
        assert table.density == pytest.approx(reported)
        assert abs(table.density - density) <= 1 / kv_blocks, (pattern, table.density)


@pytest.mark.parametrize(
    "kwargs",
    [{"density": 0.0}, {"density": 1.5}, {"density": "0.3"}, {"warmup_steps": -1}, {"warmup_steps": 1.5},
     {"warmup_layers": -1}, {"sampled_rows": 0}, {"error": "kl"}, {"block_size": 100}, {"chunk": 0}],  # fmt: skip
)
def test_bad_arguments_raise_clearly(kwargs):
    with pytest.raises(ValueError, match="svg: " + next(iter(kwargs))):
        SVG(**kwargs)


def test_warmup_steps_follow_the_step_count():
    assert SVG(warmup_steps=3).warmup_steps_now() == 3
    assert SVG(num_steps=40, mode="ours").warmup_steps_now() == 10
    assert SVG(warmup_steps=0.1, num_steps=lambda: 50).warmup_steps_now() == 5
    assert SVG(mode="ours").warmup_steps_now() == 12  # unknown step count
    # the reference: floor(first_times_fp * steps) per model and task, first_layers_fp = 0.03
    assert SVG(num_steps=50).warmup_steps_now(LAYOUTS["video"]) == 15  # Wan T2V (no text)
    assert SVG(num_steps=50).warmup_steps_now(LAYOUTS["suffix-padded"]) == 5  # HunyuanVideo
    assert SVG().warmup_steps_now() == 15  # unknown step count: of 50
    svg = SVG()
    svg.spec = sparse_vdit.plan.KNOWN_MODELS["wan2.1-t2v-1.3b"]
    assert svg.warmup_layers_now() == 0 and SVG().warmup_layers_now() == 1 and SVG(mode="ours").warmup_layers_now() == 1
    svg.spec = sparse_vdit.plan.ModelSpec("wan", 40, 40, "wan2.1-i2v-14b-720p")
    assert svg.warmup_layers_now() == 1 and svg.warmup_steps_now() == 17  # I2V: 35% of 50


def test_density_one_is_dense_and_warmup_is_none():
    layout = LAYOUTS["video"]
    q, k, v = structured_qkv(layout)
    assert SVG(1.0, warmup_steps=0, warmup_layers=0)(call(q, k, v, layout)) is None
    svg = SVG(0.3, warmup_steps=2, warmup_layers=1, block_size=BLOCK)
    assert svg(call(q, k, v, layout, step=1, layer=5)) is None
    assert svg(call(q, k, v, layout, step=2, layer=0)) is None
    assert svg(call(q, k, v, layout, step=2, layer=1)) is not None


# --- through the diffusers integration (tiny Wan from config, CPU) ------------------------------


def _tiny_wan(batch=1):
    pytest.importorskip("diffusers")
    from integrations.tiny_diffusers import BLOCK as TINY_BLOCK
    from integrations.tiny_diffusers import wan

    model, inputs = wan(batch=batch)
    return model, inputs, TINY_BLOCK


def _run_steps(model, inputs, state, timesteps=(999.0, 700.0, 400.0)):
    """Forward per timestep; the attention output of every (step, layer) and the model outputs."""
    seen = {}
    state.observers.append(lambda call, patterns, out: seen.setdefault((call.step, call.layer), (patterns, out)))
    outs = []
    with torch.no_grad():
        for t in timesteps:
            inputs["timestep"] = torch.full((inputs["hidden_states"].shape[0],), t)
            outs.append(model(**inputs)[0])
    return seen, outs


def test_warmup_steps_and_layers_are_bit_equal_to_the_dense_plan():
    model, inputs, block = _tiny_wan()
    state = sparse_vdit.apply(model, Plan.dense(model, block_size=block))
    dense_seen, dense_outs = _run_steps(model, inputs, state)
    sparse_vdit.remove(model)
    state = sparse_vdit.apply(model, method="svg", density=0.3, warmup_steps=1, warmup_layers=1, block_size=block,
                              backend="reference")  # fmt: skip
    seen, outs = _run_steps(model, inputs, state)
    sparse_vdit.remove(model)
    assert state.svg is not None and state.svg.spec.num_layers == 2
    assert torch.equal(outs[0], dense_outs[0])  # warm-up step: the whole forward
    for (step, layer), (patterns, out) in seen.items():
        warm = step < 1 or layer < 1
        assert (patterns is None) == warm
        if warm:
            assert torch.equal(out, dense_seen[(step, layer)][1]), (step, layer)
        else:
            assert {p.name for p in patterns} <= {"spatial", "temporal"}
    assert not torch.equal(outs[1], dense_outs[1])  # later steps are sparse


def test_recorded_decisions_export_a_plan_that_replays_them():
    model, inputs, block = _tiny_wan()
    state = sparse_vdit.apply(model, method="svg", density=0.3, warmup_steps=1, warmup_layers=1, record=True,
                              sampled_rows=16, block_size=block, backend="reference")  # fmt: skip
    seen, outs = _run_steps(model, inputs, state, (999.0, 800.0, 600.0, 400.0))
    sparse_vdit.remove(model)
    plan = state.svg.to_plan()
    assert Plan.loads(plan.dumps()) == plan and json.loads(plan.dumps())["made_by"]["method"] == "svg"
    assert plan.warmup_steps == 1 and plan.warmup_layers == 1 and plan.block_size == block
    assert plan.layout is not None and plan.layout.frames == 3
    assert plan.schedule[0].start == 0 and all(p.name == "dense" for layer in plan.schedule[0].layers for p in layer)
    for (step, layer), (patterns, _) in seen.items():
        assert plan.patterns_for(step, layer) == (patterns or plan._dense_heads)
    errors = state.svg.errors()
    assert set(errors) == {(s, 1) for s in (1, 2, 3)} and errors[(1, 1)].shape == (2, 1, 4)  # per (sample, head)
    replay = sparse_vdit.apply(model, plan, backend="reference")  # the plan gives the same video
    _, replayed = _run_steps(model, inputs, replay, (999.0, 800.0, 600.0, 400.0))
    sparse_vdit.remove(model)
    assert all(torch.equal(a, b) for a, b in zip(replayed, outs))


def test_apply_svg_arguments_are_checked_before_anything_is_installed():
    model, _, _ = _tiny_wan()
    processors = dict(model.attn_processors)
    cases = [
        (dict(method="svg", density=0.0), ValueError, "density"),
        (dict(method="svg", density=0.3, sampled_rows=-2), ValueError, "sampled_rows"),
        (dict(method="svg", colour="red"), TypeError, "colour"),
        (dict(method="magic"), ValueError, "unknown method"),
        (dict(density=0.3), TypeError, "method='svg'"),
        (dict(method="svg", pattern_source=lambda call: None), ValueError, "no plan"),
    ]
    for kwargs, error, match in cases:
        with pytest.raises(error, match=match):
            sparse_vdit.apply(model, **kwargs)
    with pytest.raises(ValueError, match="no plan"):
        sparse_vdit.apply(model, Plan.dense(model), method="svg")
    assert sparse_vdit.integrations.diffusers.state_of(model) is None
    assert all(model.attn_processors[k] is v for k, v in processors.items()) and not model._forward_pre_hooks
    with sparse_vdit.sparse(model, method="svg") as state:
        assert state.svg.density_for(sparse_vdit.VideoLayout(3, 4, 4)) == 0.25 and state.svg.sampled_rows == 64
    assert all(model.attn_processors[k] is v for k, v in processors.items())


def test_generate_cli_with_svg_warms_up_from_the_scheduler_and_records(tmp_path):
    pytest.importorskip("imageio_ffmpeg")
    pytest.importorskip("accelerate")
    from integrations.test_generate_cli import tiny_wan_pipeline

    from sparse_vdit.cli.main import main

    tiny_wan_pipeline().save_pretrained(tmp_path / "pipe")
    g = torch.Generator().manual_seed(0)
    torch.save({"prompt_embeds": torch.randn(1, 8, 32, generator=g),
                "negative_prompt_embeds": torch.randn(1, 8, 32, generator=g)}, tmp_path / "embeds.pt")  # fmt: skip
    out = tmp_path / "video.mp4"
    code = main([
        "generate", "--model", str(tmp_path / "pipe"), "--method", "svg", "--density", "0.3",
        "--record-plan", str(tmp_path / "svg-plan.json"), "--prompt-embeds", str(tmp_path / "embeds.pt"),
        "--out", str(out), "--height", "64", "--width", "64", "--frames", "9", "--steps", "4",
        "--guidance-scale", "4", "--backend", "reference", "--device", "cpu", "--block-size", "16",
    ])  # fmt: skip
    assert code == 0 and out.stat().st_size > 0
    info = json.loads(out.with_suffix(".json").read_text())
    svg = info["svg"]
    assert svg["warmup_steps"] == 1  # 25% of the scheduler's 4 steps
    assert len(svg["profile_seconds"]) == 4 and svg["profile_seconds"][0] == 0 and svg["profile_seconds"][1] > 0
    assert 0 < svg["profile_share_of_attention"] < 1
    plan = Plan.load(tmp_path / "svg-plan.json")
    assert plan.made_by["method"] == "svg" and plan.warmup_steps == 1 and svg["recorded_plan"]
    assert info["plan"]["method"] == "svg" and 0 < info["plan_density"] < 1
    with pytest.raises(SystemExit, match="give no --plan"):
        main(["generate", "--model", "x", "--method", "svg", "--plan", "dense", "--prompt", "p"])
    with pytest.raises(SystemExit, match="density"):
        main(["generate", "--model", "x", "--method", "svg", "--density", "2", "--prompt", "p"])
    with pytest.raises(SystemExit, match="--plan"):
        main(["generate", "--model", "x", "--prompt", "p"])


@pytest.mark.gpu
def test_gpu_svg_layer_classifies_in_bf16_and_runs_the_fast_path():
    layout = VideoLayout(6, 12, 12, 20, "prefix")
    q, k, v = (t.cuda().bfloat16() for t in structured_qkv(layout, dim=128, batch=1))
    svg = SVG(0.3, warmup_steps=0, warmup_layers=0, block_size=BLOCK)
    patterns = svg(call(q, k, v, layout))
    assert svg.last_profile_backend == "triton"
    assert "".join("T" if p.name == "temporal" else "S" for p in patterns) == KINDS
    table = compile_layer(patterns, layout, BLOCK, "cuda")
    out = sparse_attention(q, k, v, table, backend="triton")
    ref = sparse_attention(q.float(), k.float(), v.float(), table, backend="reference")
    assert rel_rms(out, ref) < 2e-2
