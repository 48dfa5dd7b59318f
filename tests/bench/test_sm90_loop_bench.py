"""bench/sm90_loop.py: the forward kernels and the backward's dK/dV kernel compiled for sm_90a on the CPU, their
key loops read from the SASS."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "sm90_loop.py"


def test_reads_the_key_loops_of_both_kernels():
    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--backward", "--head-dims", "64", "--gluon-tiles",
                           "64x64x4x2"], env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["name"] for row in rows] == ["triton 128x64x8x3 D64", "triton backward dK/dV D64", "triton backward dQ D64",
                                             "gluon 64x64x4x2 D64"]  # fmt: skip
    for row in rows:
        assert row["registers"] > 0 and 0 < row["shared"] and row["spilled"] >= 0
        assert any(step.startswith("HGMMA") for step in row["loop"])
        # the dQ kernel on stored dS is one MMA a step (no softmax), kept in flight while the next loads
        assert any(s.startswith("EXP") for s in row["loop"]) != ("dQ" in row["name"]), row["loop"]


def test_loop_stores_counts_the_innermost_mma_loops_global_stores(load_script):
    module = load_script("sm90_loop")
    sass = [(0x00, "STG.E.U16 [R2.64], R4"), (0x10, "HGMMA.64x32x16.F32.BF16 R24, gdesc[UR8], RZ"),
            (0x20, "STG.E.128 [R2.64], R8"), (0x30, "@P0 STG.E.128 [R6.64], R12"), (0x40, "@P1 BRA 0x10"),
            (0x50, "STG.E [R2.64], R4")]  # fmt: skip
    assert module.loop_stores(sass) == {"STG.E.128": 2}
    assert module.mma_loop(sass) == ["HGMMA"]


def test_tma_loads_follow_barriers_reads_the_ptx(load_script):
    module = load_script("sm90_loop")
    ordered = "bar.sync 0;\nmov.u32 %r1, 0;\n// begin inline asm\n@%p2 cp.async.bulk.tensor.2d.shared::cluster [%r1];"
    assert module.tma_loads_follow_barriers("mbarrier.init.shared.b64 [%r0], 1;\n@%p1 cp.async.bulk.tensor.2d [%r1];")
    assert module.tma_loads_follow_barriers("wgmma.wait_group.sync.aligned 0;\n" + ordered)
    assert not module.tma_loads_follow_barriers(ordered.replace("mov.u32 %r1, 0;", "wgmma.mma_async.sync.aligned ...;"))
    assert not module.tma_loads_follow_barriers(ordered.replace("mov.u32 %r1, 0;", "$L__BB0_3:"))
    assert module.tma_loads_follow_barriers(ordered.replace("mov.u32 %r1, 0;", "$L__tmp13:"))  # a debug range


def test_refuses_the_interpreter_and_bad_tiles(load_script, monkeypatch):
    module = load_script("sm90_loop")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET unset"):
        module.main(["--head-dims", "64"])
    assert module.parse_tiles("128x64x8x3") == (128, 64, 8, 3)
    with pytest.raises(Exception, match="BLOCK_MxBLOCK_N"):
        module.parse_tiles("128x64")
