"""The Gluon sm90 forward (``kernels.triton.gluon_forward``, ``launcher.OPTIONS["gluon"]``, issue 21).

On the CPU: its key loop as compiled for sm_90a (the softmax between the wait that leaves ``P V`` in
flight and the wait for it, no spills, shared memory within a program's 227 KB), where it applies, and
that the option leaves CPU calls to the Triton kernel. On an sm90 GPU (``-m gpu``): outputs (poisoned
first) and log-sum-exp against the float64 reference on awkward layouts, and the processor's path.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import sm90_loop  # noqa: E402
from helpers import random_qkv, rel_rms  # noqa: E402
from sparse_vdit import VideoLayout, compile_layer, sparse_attention  # noqa: E402
from sparse_vdit.block_table import table_from_mask  # noqa: E402
from sparse_vdit.kernels.head_order import Rotary, apply_rotary, attention_in_head_order, to_head_order  # noqa: E402
from sparse_vdit.kernels.triton import backend as triton_backend  # noqa: E402
from sparse_vdit.kernels.triton import gluon_forward, launcher  # noqa: E402
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical  # noqa: E402

torch.set_num_threads(1)
SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
MIXED = [multi_diagonal(0.15), dense(), skip(), diagonal(0.5), multi_diagonal(0.3), vertical(((0.0, 1.0),), 0.3)]
TILE_CHOICES = [None, (128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2)]


COMPILED = [("128x64x8x3", 128), ("128x128x8x2", 128), ("64x64x4x2", 128), ("128x64x8x3", 64)]


@pytest.fixture(scope="module")
def compiled_for_sm90():
    """``bench/sm90_loop.py --persistent`` on the Gluon kernel's tile choices, in a process of its own (compiling
    for sm_90a needs the Triton interpreter off)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    rows = []
    for dim in sorted({d for _, d in COMPILED}):
        tiles = [t for t, d in COMPILED if d == dim]
        done = subprocess.run([sys.executable, str(BENCH / "sm90_loop.py"), "--json", "--no-triton", "--persistent",
                               "--head-dims", str(dim), "--gluon-tiles", *tiles], env=env, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        rows += json.loads(done.stdout.strip().splitlines()[-1])
    return {row["name"]: row for row in rows}


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("tiles,dim", COMPILED)
def test_key_loop_runs_the_softmax_beside_p_v_on_sm90(compiled_for_sm90, tiles, dim, persistent):
    """Compiled for sm_90a with the installed Triton, one work item a program and persistent: the
    exponentials lie between the wait that leaves one MMA group (the previous tile's P V) in flight and
    the wait for it (held there by ``gluon_forward._after``; without it ptxas moved them below the second
    wait in some tile choices on Triton 3.6 and 3.9); shared memory within a program's 227 KB; nothing
    spills, but for the 128 x 128 tiles at head dim 128, which sit at the register limit (255 a thread)
    and spill 0-8 bytes depending on the Triton version and the variant (4 persistent on 3.6, 8 one
    item a program on 3.9)."""
    row = compiled_for_sm90[f"gluon {'persistent ' if persistent else ''}{tiles} D{dim}"]
    assert row["overlaps"], row["loop"]
    assert row["shared"] <= sm90_loop.SHARED_LIMIT
    assert row["loads_after_barriers"]  # no TMA load overwrites a slot the other warpgroup may still be reading
    assert row["spilled"] <= (8 if (tiles, dim) == ("128x128x8x2", 128) else 0), row["spilled"]


def test_overlap_reader_tells_the_two_orders_apart():
    assert sm90_loop.overlaps_softmax(["HGMMAx12", "DEPBAR<=1", "EXPx32", "DEPBAR<=0", "TMA"])
    assert not sm90_loop.overlaps_softmax(["HGMMAx8", "DEPBAR<=0", "EXPx50", "HGMMAx4"])
    assert not sm90_loop.overlaps_softmax(["HGMMAx8", "DEPBAR<=1", "DEPBAR<=0", "EXPx32"])


def _cpu_inputs(dtype=torch.bfloat16, dim=128, heads=MIXED, block=128):
    layout = VideoLayout(3, 8, 16, 24, "suffix")
    q, k, v = (torch.randn(1, layout.num_tokens, len(heads), dim).to(dtype) for _ in range(3))
    return q, k, v, compile_layer(heads, layout, block, "cpu")


def test_applies_says_why_not():
    q, k, v, table = _cpu_inputs()
    assert "bf16 or fp16" in gluon_forward.applies(q.float(), k.float(), v.float(), table, True)
    q96, k96, v96, _ = _cpu_inputs(dim=96)
    assert "D 64 or 128" in gluon_forward.applies(q96, k96, v96, table, True)
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)  # [B, N, H, D] with heads outermost in memory
    assert "contiguous" in gluon_forward.applies(strided, k, v, table, True)
    assert "own order" in gluon_forward.applies(q, k, v, table, False)
    q32, k32, v32, table32 = _cpu_inputs(block=32)
    assert "64- or 128-token" in gluon_forward.applies(q32, k32, v32, table32, True)
    assert "sm90" in gluon_forward.applies(q, k, v, table, True)
    fq, fk, fv, frame_major = _cpu_inputs(heads=[diagonal(0.5), dense()])  # no token-major head: any order serves
    assert "sm90" in gluon_forward.applies(fq, fk, fv, frame_major, False)


def test_tiles_for_cuts_tiles_to_the_block():
    assert gluon_forward.tiles_for(128, 128) == gluon_forward.TILES
    assert gluon_forward.tiles_for(64, 128) == (64, 64, 4, gluon_forward.TILES[3])
    assert gluon_forward.tiles_for(128, 64, (128, 128, 8, 2)) == (128, 128, 8, 2)
    with pytest.raises(ValueError, match="do not fit"):
        gluon_forward.tiles_for(128, 128, (32, 64, 4, 2))
    with pytest.raises(ValueError, match="at least 2 stages"):  # one slot: tile 1 would be waited for unissued
        gluon_forward.tiles_for(128, 128, (128, 64, 8, 1))


def test_programs_per_sm_counts_shared_memory_and_registers():
    assert gluon_forward.programs_per_sm((128, 64, 8, 3), 128) == 1  # 256 threads: registers allow one
    assert gluon_forward.programs_per_sm((64, 64, 4, 2), 128) == 2  # 97 KB of shared memory each
    assert gluon_forward.programs_per_sm((64, 64, 4, 2), 64) == 2  # 49 KB, but registers allow two
    assert gluon_forward.programs_per_sm((64, 128, 4, 4), 128) == 1  # 289 KB: more than an SM has, still one


def test_option_leaves_cpu_calls_to_the_triton_kernel(monkeypatch):
    """Off the GPU the option changes nothing: the Triton kernel (interpreted) gives the same output."""
    layout = VideoLayout(1, 16, 16)  # 256 tokens: a short call for the interpreter
    q, k, v = (torch.randn(1, layout.num_tokens, 3, 64, dtype=torch.float16) for _ in range(3))
    table = compile_layer([diagonal(0.5), dense(), skip()], layout, 64, "cpu")
    off = sparse_attention(q, k, v, table, backend="triton")
    monkeypatch.setitem(launcher.OPTIONS, "gluon", True)
    monkeypatch.setitem(launcher.OPTIONS, "gluon_persistent", True)
    on = sparse_attention(q, k, v, table, backend="triton")
    assert torch.equal(on, off)


# ------------------------------------------------------------------ on an sm90 GPU (-m gpu)
GPU_CASES = {  # layout, block, heads, batch, head dim
    "suffix-padded-mixed": (VideoLayout(7, 12, 20, 37, "suffix", text_valid=29), 128, MIXED, 2, 128),
    "prefix-ragged-d64": (VideoLayout(5, 9, 15, 45, "prefix"), 64, MIXED[:4], 1, 64),
    "no-text-token-major": (VideoLayout(9, 10, 13), 128, [multi_diagonal(0.2), multi_diagonal(0.05)], 1, 128),
}


def _gpu_case(case, dtype, seed=0):
    layout, block, heads, batch, dim = GPU_CASES[case]
    q, k, v = random_qkv((batch, layout.num_tokens, len(heads), dim), dtype, "cuda", seed)
    return layout, compile_layer(heads, layout, block, "cuda"), (q, k, v)


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("persistent", [False, 3])
@pytest.mark.parametrize("tiles", TILE_CHOICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_gpu_matches_float64_reference(case, dtype, tiles, persistent):
    """Head-ordered inputs, the output poisoned first: within twice the Triton kernel's own error
    of the float64 reference; the log-sum-exp as the Triton kernel's (inf where a row visits nothing).
    ``persistent=3``: three programs take every work item in turn (skipped heads' items among them)."""
    layout, table, (q, k, v) = _gpu_case(case, dtype)
    scale = q.shape[-1] ** -0.5
    ref = sparse_attention(q.double(), k.double(), v.double(), table, backend="reference")
    hq, hk, hv = to_head_order(q, k, v, table)
    triton_out, triton_lse = triton_backend.run_with_lse(hq, hk, hv, table, scale, head_order=True)
    out = torch.full_like(q, float("nan"))
    out, lse = gluon_forward.forward(hq, hk, hv, table, scale, tiles=tiles, return_lse=True, out=out,
                                     persistent=persistent)  # fmt: skip
    assert not out.isnan().any()
    assert rel_rms(out, ref) <= 2 * rel_rms(triton_out, ref) + 1e-3
    assert torch.equal(lse.isinf(), triton_lse.isinf())
    finite = triton_lse.isfinite()
    assert (lse[finite] - triton_lse[finite]).abs().max() <= 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("persistent", [False, True, 2])
def test_gpu_scattered_table_with_empty_rows(persistent):
    """A frame-major table with scattered blocks, rows that visit nothing and the ragged last key block;
    one work item a program, as many programs as the GPU holds, and two programs for every item."""
    layout = VideoLayout(5, 16, 24, 77, "suffix", text_valid=50)
    g = torch.Generator().manual_seed(3)
    qb, kb = -(-layout.num_tokens // 128), -(-layout.kv_len // 128)
    keep = torch.rand(3, qb, kb, generator=g) < 0.3
    keep[:, ::4] = False
    keep[:, 1, -1] = True
    table = table_from_mask(layout, 128, keep.cuda(), "scattered")
    q, k, v = (torch.randn(1, layout.num_tokens, 3, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = sparse_attention(q.double(), k.double(), v.double(), table, backend="reference")
    out = gluon_forward.forward(q, k, v, table, 128**-0.5, out=torch.full_like(q, float("nan")), persistent=persistent)
    assert not out.isnan().any()
    assert rel_rms(out, ref) <= 2 * rel_rms(sparse_attention(q, k, v, table, backend="triton"), ref) + 1e-3


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("persistent", [False, 3])
def test_gpu_samples_do_not_reach_each_other(persistent):
    """A tile past a sample's last row reads zeros, not the next sample's rows: with NaN in sample 1's
    q, k, v, sample 0's output and log-sum-exp are those of sample 0 alone."""
    layout, table, (q, k, v) = _gpu_case("suffix-padded-mixed", torch.bfloat16, seed=6)
    hq, hk, hv = to_head_order(q, k, v, table)
    for t in (hq, hk, hv):
        t[1] = float("nan")
    both, lse_both = gluon_forward.forward(hq, hk, hv, table, 0.1, return_lse=True, persistent=persistent)
    alone, lse_alone = gluon_forward.forward(hq[:1].contiguous(), hk[:1].contiguous(), hv[:1].contiguous(), table,
                                             0.1, return_lse=True, persistent=persistent)  # fmt: skip
    assert not both[0].isnan().any()
    assert torch.equal(both[0], alone[0]) and torch.equal(lse_both[0], lse_alone[0])


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 (Hopper) GPU")
@pytest.mark.parametrize("persistent", [False, True])
def test_gpu_processor_path_with_the_option(monkeypatch, persistent):
    """The fused rotary path with ``launcher.OPTIONS["gluon"]`` (and ``"gluon_persistent"``): the float64
    reference's attention, and gradients (the Triton backward on the Gluon forward's log-sum-exp) as with the
    option off."""
    monkeypatch.setitem(launcher.OPTIONS, "gluon_persistent", persistent)
    layout, table, (q, k, v) = _gpu_case("suffix-padded-mixed", torch.bfloat16, seed=4)
    g = torch.Generator().manual_seed(1)
    angles = torch.rand(layout.video_tokens, 64, generator=g, dtype=torch.float64) * 6.3
    cos, sin = (f(angles).repeat_interleave(2, -1).float().cuda() for f in (torch.cos, torch.sin))
    rotary = Rotary(cos, sin, 0, "interleaved")
    ref = sparse_attention(apply_rotary(q.double(), rotary), apply_rotary(k.double(), rotary), v.double(), table,
                           backend="reference")  # fmt: skip
    grads = {}
    for on in (False, True):
        monkeypatch.setitem(launcher.OPTIONS, "gluon", on)
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention_in_head_order(*leaves, table, backend="triton", rotary=rotary)
        assert rel_rms(out, ref) <= 2e-2
        out.float().square().sum().backward()
        grads[on] = [t.grad for t in leaves]
    for a, b in zip(grads[True], grads[False]):
        assert rel_rms(a, b) <= 2e-2
