"""bench/sm90_loop.py: the Triton forward and backward kernels compiled for sm_90a on the CPU, their key loops read
from the SASS, two checks from the PTX."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "bench" / "sm90_loop.py"


def test_reads_the_key_loops_of_both_kernels():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--json", "--backward", "--variants", "default", "dp-early",
                           "--head-dims", "64"], env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout.strip().splitlines()[-1])
    assert [row["name"] for row in rows] == ["triton 128x64x8x3 D64", "triton backward dK/dV D64", "triton backward dQ D64",
                                             "triton backward dK/dV D64 dp-early"]  # its dQ kernel is the default's
    by_name = {row["name"]: row for row in rows}
    # dp-early: dP's MMAs are issued after the scores' wait, among the exponentials (the tutorial's order issues
    # them with dV's after every exponential)
    def mma_then_exp_between_waits(loop: list[str]) -> bool:
        first = loop.index("DEPBAR<=0")
        between = loop[first + 1 : loop.index("DEPBAR<=0", first + 1)]
        mmas = [i for i, step in enumerate(between) if step.startswith("HGMMA")]
        return bool(mmas) and any(step.startswith("EXP") for step in between[mmas[0] + 1 :])

    assert mma_then_exp_between_waits(by_name["triton backward dK/dV D64 dp-early"]["loop"])
    assert not mma_then_exp_between_waits(by_name["triton backward dK/dV D64"]["loop"])
    for row in rows:
        assert row["registers"] > 0 and 0 < row["shared"] and row["spilled"] >= 0
        assert any(step.startswith("HGMMA") for step in row["loop"])
        # the dQ kernel on stored dS is one MMA a step (no softmax), kept in flight while the next loads
        assert any(s.startswith("EXP") for s in row["loop"]) != ("dQ" in row["name"]), row["loop"]
        assert row["loads_after_barriers"] and row["operands_kept"], row["name"]
        assert len(row["sass_digest"]) == 12 and int(row["sass_digest"], 16) >= 0
    assert len({row["sass_digest"] for row in rows}) == len(rows)  # six kernels, six machine codes


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


def test_register_operands_kept_reads_the_ptx(load_script):
    module = load_script("sm90_loop")
    mma = "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%r10,%r11}, {%r1,%r2}, %rd1, %p1, 1, 1, 1;"
    wait = "wgmma.wait_group.sync.aligned 2;"
    pack = "mov.b32 %r1, {%rs1, %rs2};"
    assert module.register_operands_kept("\n".join([wait, pack, mma]))  # packed after the previous update's wait
    assert not module.register_operands_kept("\n".join([pack, wait, mma]))  # packed while it may still read them
    assert not module.register_operands_kept("\n".join([mma, pack, wait]))  # written while it runs
    assert module.register_operands_kept("\n".join([mma, wait, pack]))
    assert module.register_operands_kept("\n".join([pack, "$L__BB0_2:", wait, mma]))  # not straight-line: not judged
    assert module.register_operands_kept("\n".join([pack, wait, mma.replace("{%r1,%r2}", "%rd2")]))  # A in shared memory


def test_refuses_the_interpreter(load_script, monkeypatch):
    module = load_script("sm90_loop")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET unset"):
        module.main(["--head-dims", "64"])
