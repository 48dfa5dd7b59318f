"""SVG's modes: the reference's choices (sink, profile masks, per-sample choice) and the device decision."""

from types import SimpleNamespace

import pytest
import torch

from helpers import masked_attention, rel_rms, token_mask
from sparse_vdit import VideoLayout, compile_layer, sparse_attention
from sparse_vdit.kernels import select_attention
from sparse_vdit.methods.svg import SVG, token_major_positions
from sparse_vdit.patterns import HeadChoice

torch.set_num_threads(1)
BLOCK = 16
WAN = VideoLayout(7, 6, 8)  # no text, as Wan's self-attention: 48 tokens a frame, 3 blocks


def heads_qkv(layout, kinds, batch=1, dim=16, sigma=20.0, seed=0):
    """q, k, v whose head attends like a Gaussian of ``sigma`` tokens around the query in frame-major
    ("S") or token-major ("T") order, or mostly to the first frame's keys ("K", a sink head)."""
    g = torch.Generator().manual_seed(seed)
    n = layout.num_tokens
    pos = torch.arange(n)
    coords = {"S": pos.double() / n, "T": token_major_positions(pos, layout).double() / n}
    c = n**2 / (2 * sigma**2) * dim**0.5
    q = torch.zeros(batch, n, len(kinds), dim, dtype=torch.float64)
    k = torch.zeros_like(q)
    for h, kind in enumerate(kinds):
        if kind in "Kk":  # a score of 12 (after the 1/sqrt(d) scale) on every key of the first frame's
            q[:, :, h, 0] = 12 * dim**0.5  # worth in frame-major ("K") or token-major ("k") order
            order = pos if kind == "K" else token_major_positions(pos, layout)
            k[:, :, h, 0] = (order < layout.frame_tokens).double()
            continue
        x = coords[kind]
        q[:, :, h, :3] = c * torch.stack([torch.ones_like(x), x, x * x], -1)
        k[:, :, h, :3] = torch.stack([-x * x, 2 * x, -torch.ones_like(x)], -1)
    q[..., 3:] = 0.05 * torch.randn(q[..., 3:].shape, generator=g, dtype=torch.float64)
    k[..., 3:] = 0.05 * torch.randn(k[..., 3:].shape, generator=g, dtype=torch.float64)
    v = torch.randn(q.shape, generator=g, dtype=torch.float64)
    return q.float(), k.float(), v.float()


def call(q, k, v, layout, step=20, layer=3, state=None):
    return SimpleNamespace(step=step, layer=layer, q=q, k=k, v=v, layout=layout, state=state)


def exact_error(q, k, v, table, head):
    """Relative RMS error of one head of ``table`` against dense attention, float64 oracle."""
    scale = q.shape[-1] ** -0.5
    n = table.layout.num_tokens
    full = masked_attention(q[:, :, head], k[:, :, head], v[:, :, head], torch.ones(n, n, dtype=torch.bool), scale)
    ours = masked_attention(q[:, :, head], k[:, :, head], v[:, :, head], token_mask(table, head), scale)
    return rel_rms(ours, full)


@pytest.mark.parametrize("mode", ["reference", "ours"])
def test_spatial_temporal_and_sink_heads_are_classified(mode):
    q, k, v = heads_qkv(WAN, "STKST")
    svg = SVG(0.3, mode=mode, warmup_steps=0, warmup_layers=0, sampled_rows=32, block_size=BLOCK)
    patterns = svg(call(q, k, v, WAN))
    names = "".join("T" if p.name == "temporal" else "S" for p in patterns)
    assert names[:2] + names[3:] == "STST"
    table = compile_layer(patterns, WAN, BLOCK)
    sink_error = exact_error(q, k, v, table, 2)
    if mode == "reference":  # the sink is in both masks (each head's own order): the sink head is served
        # the first latent frame is the spatial mask's sink (frame-major); the temporal one's are
        # other keys (the first S token-major positions): the sink head goes spatial
        assert names[2] == "S" and all(p.sink == 1.0 for p in patterns) and sink_error < 1e-3, sink_error
        assert float(svg.last_errors[0, 0, 2]) < 1e-6 < float(svg.last_errors[1, 0, 2])
    else:
        assert all(p.sink == 0.0 for p in patterns) and sink_error > 0.3, sink_error


def test_sink_head_error_is_the_references():
    """The reference runs the band plus kv < S in the head's order; our table covers it, so our
    error on a head that attends its order's first S keys is at most the reference's (float64)."""
    q, k, v = heads_qkv(WAN, "Kk")
    scale = q.shape[-1] ** -0.5
    n = WAN.num_tokens
    full_mask = torch.ones(n, n, dtype=torch.bool)
    svg = SVG(0.25, warmup_steps=0, warmup_layers=0, block_size=BLOCK)
    band = svg.reference(WAN).band_tokens(WAN, 0.25, BLOCK)
    without = SVG(0.25, mode="ours", block_size=BLOCK).candidates(WAN)
    for head, (pattern, no_sink) in enumerate(zip(svg.candidates(WAN), without)):
        order = torch.arange(n) if not pattern.token_major else token_major_positions(torch.arange(n), WAN)
        ref_mask = ((order[:, None] - order[None, :]).abs() <= band) | (order[None, :] < WAN.frame_tokens)
        full = masked_attention(q[:, :, head], k[:, :, head], v[:, :, head], full_mask, scale)
        reference = rel_rms(masked_attention(q[:, :, head], k[:, :, head], v[:, :, head], ref_mask, scale), full)
        ours = exact_error(q, k, v, compile_layer([pattern] * 2, WAN, BLOCK), head)
        assert ours <= max(2 * reference, 1e-12) and reference < 1e-3, (pattern, ours, reference)
        assert exact_error(q, k, v, compile_layer([no_sink] * 2, WAN, BLOCK), head) > 0.3  # without the sink


def test_samples_decide_separately_and_the_host_path_groups_them():
    a, b = heads_qkv(WAN, "ST"), heads_qkv(WAN, "TS", seed=1)
    q, k, v = (torch.cat([x, y]) for x, y in zip(a, b))
    svg = SVG(0.3, warmup_steps=0, warmup_layers=0, sampled_rows=32, block_size=BLOCK)
    choice = svg(call(q, k, v, WAN))
    assert isinstance(choice, HeadChoice) and choice.selected.tolist() == [[0, 1], [1, 0]]
    out = select_attention(q, k, v, choice.table(WAN, BLOCK), choice.selected, backend="reference")
    for i in range(2):
        table = compile_layer(choice.patterns(i), WAN, BLOCK)
        assert torch.equal(out[i : i + 1], sparse_attention(q[i : i + 1], k[i : i + 1], v[i : i + 1], table,
                                                            backend="reference"))  # fmt: skip
    ours = SVG(0.3, mode="ours", warmup_steps=0, warmup_layers=0, sampled_rows=32, block_size=BLOCK)
    assert isinstance(ours(call(q, k, v, WAN)), tuple)  # batch_mean: one table for the batch


def test_device_decision_reads_nothing_back(monkeypatch):
    q, k, v = heads_qkv(WAN, "STST", batch=2)
    host = SVG(0.3, warmup_steps=0, warmup_layers=0, block_size=BLOCK, profile_backend="torch", decide="host")
    device = SVG(0.3, warmup_steps=0, warmup_layers=0, block_size=BLOCK, profile_backend="torch", decide="device")
    expected = host(call(q, k, v, WAN))
    device(call(q, k, v, WAN))  # caches (tables, key blocks) filled, as after the first step

    def no_sync(*args, **kwargs):
        raise AssertionError("the SVG step read a tensor on the host")

    for name in ("cpu", "item", "tolist", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    choice = device(call(q, k, v, WAN))
    monkeypatch.undo()
    assert isinstance(choice, HeadChoice) and device.last_decided_on == "device"
    assert choice.patterns(0) == expected and choice.patterns(1) == expected


def test_variants_are_named_options():
    svg = SVG(mode="ours", sink=True, row_sampling="replacement")
    assert svg.profile_masks == "executed" and svg.choice == "batch_mean" and svg.row_sampling == "replacement"
    assert all(p.sink == 1.0 for p in svg.candidates(WAN))
    for kwargs in ({"mode": "theirs"}, {"profile_masks": "x"}, {"row_sampling": "x"}, {"choice": "x"}, {"decide": "x"},
                   {"sink": 1}):  # fmt: skip
        with pytest.raises(ValueError, match="svg: " + next(iter(kwargs))):
            SVG(**kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_fused_profile_of_the_reference_masks_equals_the_torch_path(dtype):
    """The reference's profile masks (sink included) and rows drawn with replacement (repeats) through
    the fused Triton pass (interpreter on the CPU) and the torch path."""
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    from sparse_vdit.methods.svg import sampled_outputs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    svg = SVG(0.25, block_size=BLOCK)
    rows = svg.rows(WAN, 3, 2)[:24]
    rows[1] = rows[0]  # a repeated row, as sampling with replacement gives
    patterns = svg.profile_patterns(WAN)
    assert all(p.sink == 1.0 for p in patterns)
    q, k, v = (t.to(device, dtype) for t in heads_qkv(WAN, "STK", dim=32))
    ref = sampled_outputs(q.float(), k.float(), v.float(), rows, WAN, patterns, BLOCK, backend="torch")
    got = sampled_outputs(q, k, v, rows, WAN, patterns, BLOCK, backend="triton")
    tol = {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for a, b in zip(got, ref):
        assert a.shape == b.shape and not a.isnan().any() and rel_rms(a, b) < tol, rel_rms(a, b)


def test_auto_decides_on_the_device_for_the_triton_backend():
    pytest.importorskip("triton")
    import os

    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    on_gpu = os.environ.get("TRITON_INTERPRET") != "1"  # the Triton backend runs CUDA tensors there
    q, k, v = (t.cuda() if on_gpu else t for t in heads_qkv(WAN, "ST", dim=64))
    svg = SVG(0.3, warmup_steps=0, warmup_layers=0, block_size=BLOCK, profile_backend="torch")
    host = svg(call(q, k, v, WAN, state=SimpleNamespace(backend="reference")))
    assert svg.last_decided_on == "host" and isinstance(host, tuple)
    choice = svg(call(q, k, v, WAN, state=SimpleNamespace(backend="triton")))
    assert svg.last_decided_on == "device" and choice.patterns(0) == host
    out = select_attention(q, k, v, choice.table(WAN, BLOCK), choice.selected, backend="triton")
    table = compile_layer(host, WAN, BLOCK)
    expected = sparse_attention(q.double(), k.double(), v.double(), table, backend="reference")
    # tf32 dot products on the GPU; float32 in the interpreter, whose base-2 softmax over these sharp heads'
    # logits (|q| up to ~1e3) lands at 2.1e-5 (numpy 2.4, triton 3.9; torch's float32 reference: 2.5e-6)
    assert rel_rms(out.double(), expected) < (1e-3 if on_gpu else 1e-4)
