"""The fused input pass (rotary + token-major order) and attention on head-ordered inputs (issue 21).

Every path is compared with a float64 torch reference on random inputs, outputs poisoned (NaN),
at awkward sizes: odd frame sizes, text prefix and suffix (padded), ragged last blocks. The
rotary conventions are also compared with the models' own rotary in torch (Wan's processor,
diffusers' ``apply_rotary_emb``). CPU: the Triton interpreter in fp16 / fp32; GPU (``-m gpu``): bf16.
"""

import pytest
import torch

pytest.importorskip("triton")

from helpers import random_qkv, rel_rms  # noqa: E402
from sparse_vdit import VideoLayout, compile_layer, sparse_attention  # noqa: E402
from sparse_vdit.kernels import head_order  # noqa: E402
from sparse_vdit.kernels.head_order import Rotary, apply_rotary, attention_in_head_order, to_frame_major, to_head_order  # noqa: E402
from sparse_vdit.kernels.triton import launcher  # noqa: E402
from sparse_vdit.kernels.triton import rotary as rotary_kernel  # noqa: E402
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.bfloat16, torch.float16] if DEVICE == "cuda" else [torch.float16, torch.float32]
MIXED = [multi_diagonal(0.15), dense(), skip(), diagonal(0.5), multi_diagonal(0.3), vertical(((0.0, 1.0),), 0.3)]
CASES = {  # layout, block, heads, batch, head dim
    "suffix-padded-odd-frames": (VideoLayout(3, 5, 7, 19, "suffix", text_valid=11), 16, MIXED, 2, 64),
    "prefix-ragged": (VideoLayout(4, 3, 5, 13, "prefix"), 16, MIXED[:4], 1, 64),
    "no-text-all-token-major": (VideoLayout(5, 3, 3), 16, [multi_diagonal(0.2), multi_diagonal(0.05)], 1, 64),
}


def _inputs(case, dtype, seed=0):
    layout, block, heads, batch, dim = CASES[case]
    qkv = random_qkv((batch, layout.num_tokens, len(heads), dim), dtype, DEVICE, seed)
    return layout, compile_layer(heads, layout, block, DEVICE), qkv


def _rotary(layout, dim, pairs, table_dtype=torch.float32, seed=1):
    """Tables like the models' (channel pairs share an angle), over the rows the family rotates."""
    g = torch.Generator().manual_seed(seed)
    start = layout.video_start if layout.text_position == "prefix" else 0
    angles = torch.rand(layout.video_tokens, dim // 2, generator=g, dtype=torch.float64) * 6.3
    cos, sin = (f(angles).repeat_interleave(2, -1).to(table_dtype).to(DEVICE) for f in (torch.cos, torch.sin))
    return Rotary(cos, sin, start, pairs)


@pytest.fixture
def poisoned(monkeypatch):
    """Output buffers of the fused pass start as NaN, so unwritten elements show."""
    empty = torch.empty

    def nan_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(rotary_kernel.torch, "empty", nan_empty)


def _models_rotary(x, rotary: Rotary):
    """The model's own rotary in torch: Wan's processor, or diffusers' apply_rotary_emb (on the rotated rows)."""
    rows = slice(rotary.start, rotary.end)
    if rotary.pairs == "wan":
        from sparse_vdit.integrations.diffusers.families import _wan_rotary

        part = _wan_rotary(x[:, rows], rotary.cos[None, :, None], rotary.sin[None, :, None])
    else:
        apply_rotary_emb = pytest.importorskip("diffusers.models.embeddings").apply_rotary_emb

        part = apply_rotary_emb(x[:, rows], (rotary.cos, rotary.sin), sequence_dim=1)
    return torch.cat([x[:, : rotary.start], part, x[:, rotary.end :]], dim=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pairs", head_order.PAIRS)
@pytest.mark.parametrize("case", CASES)
def test_fused_pass_matches_models_rotary_then_permutation(case, pairs, dtype, poisoned):
    layout, table, (q, k, v) = _inputs(case, dtype)
    table_dtype = torch.float64 if pairs == "wan" else torch.float32  # as Wan / diffusers build them
    rotary = _rotary(layout, q.shape[-1], pairs, table_dtype)
    fq, fk, fv = to_head_order(q, k, v, table, rotary)
    for fused, x, rot in ((fq, q, rotary), (fk, k, rotary), (fv, v, None)):
        assert not fused.isnan().any()
        exact = head_order.reference_head_order(x.double(), table, rot)  # float64 all the way
        assert rel_rms(fused, exact) <= 2 * torch.finfo(dtype).eps
        if rot is not None:  # the model's rotary in its own dtype, then the permutation
            model = head_order.reorder_heads(_models_rotary(x, rot), layout, table.token_major_heads)
            assert (fused.double() - model.double()).abs().max() <= 2 * torch.finfo(dtype).eps * model.abs().max()
        else:
            assert torch.equal(fused, head_order.reorder_heads(x, layout, table.token_major_heads))
    assert torch.equal(to_frame_major(fv, table), v)  # the inverse, as the FA4 path uses it


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES)
def test_wan_rotary_in_float32_matches_models_float64_rotary(case, dtype, poisoned):
    """Wan's float64 tables cast to float32 (head_order.in_float32): the fused pass computes in
    float32, and its half-precision outputs still match Wan's own float64 rotary within rounding."""
    layout, table, (q, k, v) = _inputs(case, dtype, seed=6)
    rotary = _rotary(layout, q.shape[-1], "wan", torch.float64)
    rotary32 = head_order.in_float32(rotary)
    assert rotary32.cos.dtype == rotary32.sin.dtype == torch.float32 and head_order.in_float32(rotary32) is rotary32
    fq, fk, _ = to_head_order(q, k, v, table, rotary32)
    for fused, x in ((fq, q), (fk, k)):
        assert not fused.isnan().any()
        model = head_order.reorder_heads(_models_rotary(x, rotary), layout, table.token_major_heads)  # float64 math
        assert (fused.double() - model.double()).abs().max() <= 2 * torch.finfo(dtype).eps * model.abs().max()
        assert rel_rms(fused, head_order.reference_head_order(x.double(), table, rotary)) <= 2 * torch.finfo(dtype).eps


ROTARY_OPTION_SETS = {  # rotary.OPTIONS the bench sweeps besides the defaults (covered above)
    "block32": {"block": 32},
    "block64-warps8": {"block": 64, "warps": 8},
}


@pytest.mark.parametrize("options", ROTARY_OPTION_SETS)
@pytest.mark.parametrize("pairs", head_order.PAIRS)
def test_rotary_pass_options_match_reference(options, pairs, poisoned, monkeypatch):
    """Each launch option set of the fused pass (tokens per program, warps) writes the same rotated,
    reordered q / k / v, and its inverse is exact; tables with a different value on each channel, so
    a pair rule mixed up shows."""
    monkeypatch.setattr(rotary_kernel, "OPTIONS", dict(rotary_kernel.OPTIONS, **ROTARY_OPTION_SETS[options]))
    dtype = DTYPES[0]
    layout, table, (q, k, v) = _inputs("suffix-padded-odd-frames", dtype, seed=8)
    rotary = _rotary(layout, q.shape[-1], pairs, torch.float64 if pairs == "wan" else torch.float32)
    g = torch.Generator(device=DEVICE).manual_seed(9)
    noise = [0.05 * torch.randn(rotary.cos.shape, generator=g, device=DEVICE, dtype=rotary.cos.dtype) for _ in range(2)]
    rotary = Rotary(rotary.cos + noise[0], rotary.sin + noise[1], rotary.start, pairs)
    fq, fk, fv = to_head_order(q, k, v, table, rotary)
    for fused, x, rot in ((fq, q, rotary), (fk, k, rotary), (fv, v, None)):
        assert not fused.isnan().any()
        exact = head_order.reference_head_order(x.double(), table, rot)
        assert rel_rms(fused, exact) <= 2 * torch.finfo(dtype).eps
    assert torch.equal(fv, head_order.reorder_heads(v, layout, table.token_major_heads))
    assert torch.equal(to_frame_major(fv, table), v)


def test_fused_call_reuses_the_tables_int8_flags(monkeypatch):
    """No cast of the token-major flags per call: the int8 flags are built once and kept with the
    table, shared by the fused pass and the attention kernel."""
    layout, table, (q, k, v) = _inputs("prefix-ragged", torch.float32, seed=5)
    seen = []
    forward, order = launcher.forward, rotary_kernel.rotary_order
    monkeypatch.setattr(launcher, "forward", lambda *a, **kw: seen.append(kw["token_major"]) or forward(*a, **kw))
    monkeypatch.setattr(rotary_kernel, "rotary_order", lambda x, flags, *a, **kw: seen.append(flags) or order(x, flags, *a, **kw))
    for _ in range(2):
        attention_in_head_order(q, k, v, table, backend="triton")
    assert len(seen) == 6 and all(f is seen[0] for f in seen) and seen[0].dtype == torch.int8


@pytest.mark.parametrize("case", CASES)
def test_rotate_only_keeps_order(case, poisoned):
    layout, table, (q, k, _) = _inputs(case, DTYPES[0])
    rotary = _rotary(layout, q.shape[-1], "interleaved")
    rq, rk = head_order.rotate(q, k, rotary)
    assert rel_rms(rq, apply_rotary(q.double(), rotary)) <= 2 * torch.finfo(q.dtype).eps
    assert rel_rms(rk, apply_rotary(k.double(), rotary)) <= 2 * torch.finfo(q.dtype).eps


@pytest.mark.parametrize("pairs", head_order.PAIRS)
@pytest.mark.parametrize("case", CASES)
def test_attention_in_head_order_matches_float64_reference(case, pairs, monkeypatch):
    """The default path: the fused pass (the family's tables: Wan float64, else float32), then the
    kernel on head-ordered inputs storing its rows frame-major; against float64 attention of the
    reference rotary, output buffers poisoned."""
    dtype = DTYPES[0]
    layout, table, (q, k, v) = _inputs(case, dtype, seed=3)
    rotary = _rotary(layout, q.shape[-1], pairs, torch.float64 if pairs == "wan" else torch.float32)
    if pairs == "interleaved":  # a different value on each channel: a pair rule mixed up shows
        g = torch.Generator(device=DEVICE).manual_seed(4)
        rotary = Rotary(*(t + 0.05 * torch.randn(t.shape, generator=g, device=DEVICE) for t in (rotary.cos, rotary.sin)),
                        rotary.start, pairs)  # fmt: skip
    empty_like = torch.empty_like
    monkeypatch.setattr(launcher.torch, "empty_like",
                        lambda x, *a, **kw: empty_like(x, *a, **kw).fill_(float("nan")))  # fmt: skip
    out = attention_in_head_order(q, k, v, table, backend="triton", rotary=rotary)
    monkeypatch.undo()
    ref = sparse_attention(apply_rotary(q.double(), rotary), apply_rotary(k.double(), rotary), v.double(), table,
                           backend="reference")  # fmt: skip
    assert not out.isnan().any()
    for h, p in enumerate(table.patterns):
        if p.name == "skip":
            assert torch.equal(out[:, :, h], torch.zeros_like(out[:, :, h]))
    assert rel_rms(out, ref) <= 4 * torch.finfo(dtype).eps, f"{rel_rms(out, ref):.2e}"


def test_head_dim_not_a_power_of_two_rotates_in_torch(poisoned):
    """The pass splits channel pairs in registers (power-of-two head dims): other head dims take the
    torch path, and the pass itself refuses them."""
    layout = VideoLayout(3, 5, 7, 19, "suffix", text_valid=11)
    g = torch.Generator(device=DEVICE).manual_seed(10)
    q, k, v = (torch.randn(1, layout.num_tokens, 2, 48, generator=g, device=DEVICE).to(DTYPES[0]) for _ in range(3))
    table = compile_layer([multi_diagonal(0.2), dense()], layout, 16, DEVICE)
    rotary = _rotary(layout, 48, "interleaved")
    fq, fk, fv = to_head_order(q, k, v, table, rotary)
    for fused, x, rot in ((fq, q, rotary), (fk, k, rotary), (fv, v, None)):
        assert rel_rms(fused, head_order.reference_head_order(x.double(), table, rot)) <= 2 * torch.finfo(q.dtype).eps
    with pytest.raises(ValueError, match="power-of-two head dim"):
        rotary_kernel.rotary_order(q, None, (1, 1, 0, 0), rotary)


def test_reference_backend_takes_the_torch_path():
    """A backend that does not read token-major heads in place: permuted, run, permuted back."""
    layout, table, (q, k, v) = _inputs("suffix-padded-odd-frames", torch.float32, seed=4)
    rotary = _rotary(layout, q.shape[-1], "interleaved")
    out = attention_in_head_order(q, k, v, table, backend="reference", rotary=rotary)
    ref = sparse_attention(apply_rotary(q.double(), rotary), apply_rotary(k.double(), rotary), v.double(), table,
                           backend="reference")  # fmt: skip
    assert rel_rms(out, ref) <= 1e-5  # fp32 rotary and attention against float64


def test_checks():
    layout, table, (q, k, v) = _inputs("prefix-ragged", torch.float32)
    with pytest.raises(ValueError, match="pairs"):
        Rotary(torch.zeros(3, 4), torch.zeros(3, 4), pairs="halves")
    with pytest.raises(ValueError, match="alike"):
        Rotary(torch.zeros(3, 4), torch.zeros(3, 6))


def _gpu_case(backend: str, pairs: str, seed: int, batch: int):
    """bf16 inputs at a real-like layout (1,560-token frames, text suffix), a mixed table, the
    family's tables, the float64 reference and the bound (twice the old path's error)."""
    from sparse_vdit.kernels import registry

    ok, why = registry.available(backend, torch.device("cuda"))
    if not ok:
        pytest.skip(why)
    layout = VideoLayout(5, 30, 52, 77, "suffix", text_valid=60)
    heads = [multi_diagonal(0.05), diagonal(0.4), multi_diagonal(0.2), skip(), vertical(((0.0, 0.5),), 0.2), dense()]
    table = compile_layer(heads, layout, 128, "cuda")
    g = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(batch, layout.num_tokens, len(heads), 128, generator=g, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))  # fmt: skip
    rotary = _rotary(layout, 128, pairs, torch.float64 if pairs == "wan" else torch.float32)
    ref = sparse_attention(apply_rotary(q.double(), rotary), apply_rotary(k.double(), rotary), v.double(), table,
                           backend="reference")  # fmt: skip
    old = sparse_attention(apply_rotary(q, rotary), apply_rotary(k, rotary), v, table, backend=backend)
    return table, (q, k, v), rotary, ref, 2 * rel_rms(old, ref) + 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "fa4"])
@pytest.mark.parametrize("pairs", head_order.PAIRS)
def test_gpu_fused_path_matches_float64_reference(backend, pairs):
    """bf16 on the GPU at a real-like layout (1,560-token frames, text suffix)."""
    table, (q, k, v), rotary, ref, bound = _gpu_case(backend, pairs, seed=5, batch=2)
    variants = {"fused": rotary, "fused-f32": head_order.in_float32(rotary)} if pairs == "wan" else {"fused": rotary}
    for name, tables in variants.items():
        out = attention_in_head_order(q, k, v, table, backend=backend, rotary=tables)
        assert not out.isnan().any(), name
        assert rel_rms(out, ref) <= bound, f"{name}: {rel_rms(out, ref):.2e} > {bound:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("pairs", head_order.PAIRS)
def test_gpu_sweep_variants_match_float64_reference(pairs, monkeypatch):
    """bf16 on the GPU: the defaults and every fused-pass option set and tile choice that
    bench/processor_attention.py --sweep times (rotary.OPTIONS, launcher.OPTIONS["tiles"]) give the
    float64 reference's attention, with the family's tables and float32 ones."""
    table, (q, k, v), rotary, ref, bound = _gpu_case("triton", pairs, seed=6, batch=1)
    runs = [({}, None), *((options, None) for options in ROTARY_OPTION_SETS.values()),
            ({}, (128, 64, 8, 3)), ({}, launcher.SMALL_LAUNCH_TILES)]  # fmt: skip
    for options, tiles in runs:
        monkeypatch.setattr(rotary_kernel, "OPTIONS", dict(rotary_kernel.OPTIONS, **options))
        monkeypatch.setitem(launcher.OPTIONS, "tiles", tiles)
        for tables in dict.fromkeys((rotary, head_order.in_float32(rotary))):
            out = attention_in_head_order(q, k, v, table, backend="triton", rotary=tables)
            assert not out.isnan().any(), (options, tiles)
            error = rel_rms(out, ref)
            assert error <= bound, f"{options} {tiles}: {error:.2e} > {bound:.2e}"
