"""The warp-specialised Gluon sm90 dK/dV kernel (``kernels.triton.gluon_backward``, ``backward.OPTIONS["gluon"]``).

On the CPU: where it applies, and its consumer loop as compiled for sm_90a (no spills; the scores waited for
while dP^T still runs; dS tiles out as 16-byte stores). On an sm90 GPU (``-m gpu``): gradients through
``sparse_attention`` with the option on, against float64 autograd of the masked attention (test_backward's
``_check``: buffers NaN-poisoned, text before and after with padding, skipped and token-major heads, batch 2, head
dims 128 and 64, a ragged last step), the Gluon kernel checked to have run. The variant tests of
test_backward.py run it too (the default on sm90; variant ``triton-dkdv`` runs the Triton dK/dV kernel).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")

from sparse_vdit import VideoLayout, clear_caches, compile_layer  # noqa: E402
from sparse_vdit.kernels.triton import backward, gluon_backward, gluon_choice  # noqa: E402
from sparse_vdit.patterns import dense, diagonal  # noqa: E402

torch.set_num_threads(1)
SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "sm90_loop.py"
SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def test_gluon_applies_says_why_not():
    layout = VideoLayout(3, 8, 16)
    table = compile_layer([diagonal(0.5), dense()], layout, 128, "cpu")
    q = torch.zeros(1, layout.num_tokens, 2, 128, dtype=torch.bfloat16)
    assert "stored-dS" in gluon_backward.applies(q, table, 128, 32, False, False)
    assert "stored-dS" not in gluon_backward.applies(q, table, 128, 32, False, False, recompute=True)
    assert "own order" in gluon_backward.applies(q, table, 128, 32, True, True)
    assert "bf16 or fp16" in gluon_backward.applies(q.float(), table, 128, 32, True, False)
    assert "head dim" in gluon_backward.applies(q[..., :96], table, 128, 32, True, False)
    assert "128-key tiles" in gluon_backward.applies(q, table, 64, 32, True, False)
    assert "sm90" in gluon_backward.applies(q, table, 128, 32, True, False)  # a CPU tensor


def test_gluon_consumer_loop_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--gluon-backward", "--head-dims", "128", "64"],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row["name"]: row for row in json.loads(done.stdout.strip().splitlines()[-1])}
    for dim in (128, 64):
        row = rows[f"gluon backward dK/dV D{dim}"]
        assert row["spilled"] == 0 and 0 < row["shared"] <= 232448, row
        loop = row["loop"]
        # the step: both score MMAs issued, the scores waited for while dP^T runs, the exponentials, the updates
        first_wait = next(step for step in loop if step.startswith("DEPBAR"))
        assert first_wait == "DEPBAR<=1" and loop.index(first_wait) < next(
            i for i, step in enumerate(loop) if step.startswith("EXP")), loop
        assert row["stores"] == {"STG.E.128": 2}, row["stores"]  # each step's dS: two 16-byte stores a thread
        assert row["operands_kept"]  # no P / dS register an update reads is written while it runs
        recomputing = rows[f"gluon backward dK/dV D{dim} no dS"]  # for heads whose dQ pass recomputes
        assert recomputing["spilled"] == 0 and not recomputing["stores"] and recomputing["loop"] == loop


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["3x30x52+suffix77pad", "2x12x20+prefix40-d64", "2x30x52+suffix120pad-ragged-steps"])
def test_gpu_gluon_dkdv_matches_masked_attention(case, dtype, monkeypatch):
    from test_backward import GPU_CASES, _check

    calls = []
    real = gluon_backward.dkdv
    monkeypatch.setattr(gluon_backward, "dkdv", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    monkeypatch.setitem(backward.OPTIONS, "gluon", "all")  # head dim 64 too
    _check(GPU_CASES[case], "triton", dtype, "cuda", 1e-6, monkeypatch, "api")
    assert calls, "the Gluon kernel did not run"


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 GPU")
@pytest.mark.parametrize("case", ["3x30x52+suffix77pad", "2x12x20+prefix40-d64"])
def test_gpu_gluon_dkdv_for_heads_whose_dq_recomputes(case, monkeypatch):
    """No memory share for dS tiles: every head's dQ pass recomputes, and the Gluon kernel (``"all"``) runs
    without storing dS."""
    from test_backward import GPU_CASES, _check

    calls = []
    real = gluon_backward.dkdv
    monkeypatch.setattr(gluon_backward, "dkdv", lambda *a, **kw: calls.append(kw["store_ds"]) or real(*a, **kw))
    monkeypatch.setitem(backward.OPTIONS, "gluon", "all")
    monkeypatch.setitem(backward.OPTIONS, "ds_budget", 0.0)
    _check(GPU_CASES[case], "triton", torch.bfloat16, "cuda", 1e-6, monkeypatch, "api")
    assert False in calls, calls  # (a skipped head has no tiles: its launch may still count as storing)


@pytest.mark.gpu
@pytest.mark.skipif(not SM90, reason="needs an sm90 GPU")
@pytest.mark.parametrize("gluon", [True, False])
@pytest.mark.parametrize("case", ["3x30x52+suffix77pad", "2x30x52+suffix120pad-ragged-steps"])
def test_gpu_gluon_dkdv_in_key_block_windows(case, gluon, monkeypatch):
    """A share of 100 pairs' tiles: every head with more goes in key-block windows (each has a key block that every
    query block visits, the text's, so a share under one column, 38 pairs, would have them recompute instead), the
    Gluon kernel (or, ``gluon`` off, the Triton one) storing each window's tiles and the dQ kernel adding its part
    (HunyuanVideo 720p at 50% on an H100, in small: 43 and 20 launches)."""
    from test_backward import GPU_CASES, _check

    from sparse_vdit.kernels.triton import ds_tiles

    layout, block, heads, batch, dim = GPU_CASES[case]
    monkeypatch.setattr(ds_tiles, "budget", lambda device, share: 100 * batch * block * block * 2)
    chunks, calls = [], []
    real_chunks, real = ds_tiles.head_chunks, gluon_backward.dkdv
    monkeypatch.setattr(ds_tiles, "head_chunks", lambda *a: chunks.append(real_chunks(*a)) or chunks[-1])
    monkeypatch.setattr(gluon_backward, "dkdv", lambda *a, **kw: calls.append(kw["store_ds"]) or real(*a, **kw))
    clear_caches()  # the chunks are kept with the table: another test's may be there
    monkeypatch.setitem(backward.OPTIONS, "gluon", gluon)
    _check(GPU_CASES[case], "triton", torch.bfloat16, "cuda", 1e-6, monkeypatch, "api")
    assert any(c.keys is not None for c in chunks[-1]) and (True in calls) == gluon, (chunks, calls)


def test_a_triton_that_cannot_compile_it_runs_the_triton_kernel_after_one_warning(monkeypatch):
    """Gluon is Triton's experimental layer: where this Triton cannot build the kernel, the launch says so once and
    returns False (the caller runs the Triton dK/dV kernel); later launches do not try again."""
    from triton.compiler.errors import CompilationError

    monkeypatch.setattr(gluon_choice, "FAILED", [])
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise CompilationError(None, None, "unsupported op in this Triton")

    monkeypatch.setattr(gluon_backward, "dkdv", broken)
    with pytest.warns(RuntimeWarning, match="Triton dK/dV kernel runs instead"):
        assert gluon_choice.run() is False
    assert attempts == [1] and "unsupported op" in gluon_choice.FAILED[0]
    q = torch.zeros(1, 8, 1, 128, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: torch.device("cuda")))  # as if on a GPU
    assert gluon_choice.takes(q, None, 128, 32, True, False, True) is False  # not tried again
