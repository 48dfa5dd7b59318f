"""What the attention kernels' key loops compile to on Hopper, without a GPU.

    python bench/sm90_loop.py               # the Triton forward
    python bench/sm90_loop.py --backward    # and the backward's dK/dV and dQ kernels
    python bench/sm90_loop.py --backward --variants default dp-early   # under the backward's variants
    python bench/sm90_loop.py --gluon-backward   # and the warp-specialised Gluon dK/dV kernel

Compiles each kernel for sm_90a on the CPU with the installed Triton and its bundled ``ptxas`` /
``cuobjdump``, then reads the innermost loop that issues warpgroup MMAs from the SASS: the order of
its MMAs (``HGMMA``), waits for them (``DEPBAR<=n``: at most n MMA groups left in flight), the softmax's
exponentials (``EXP``, with the bf16 packing of P), CTA barriers and TMA loads. A loop that reads
``HGMMA ... DEPBAR<=0 EXP`` runs its softmax with the tensor cores idle; ``DEPBAR<=1 EXP DEPBAR<=0``
overlaps it with the previous tile's ``P V`` (the Gluon forward and dK/dV kernels written that way lost to
the Triton kernels on an H200, 2026-12-05: BENCHMARKS.md). Also registers, spills and shared memory per program, and two checks read
from the PTX: TMA loads after CTA barriers, and registers that asynchronous MMAs read left alone until waited.
With ``--json`` each kernel also carries a digest of its SASS: run it on two checkouts to see whether a change to
a kernel's source changed its machine code.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

try:  # run as a script from a checkout without installing
    import sparse_vdit  # noqa: F401
except ImportError:  # pragma: no cover
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

SHARED_LIMIT = 232448  # bytes of shared memory one program may use on sm90 (227 KB)


@dataclass
class Compiled:
    name: str
    registers: int
    spilled: int  # bytes stored to local memory
    shared: int
    loop: list[str]  # the innermost MMA loop's instruction classes in order, runs merged ("EXPx34")
    stores: dict[str, int]  # the loop's global stores by opcode ("STG.E.128": 2)
    loads_after_barriers: bool  # every TMA load follows a CTA barrier with no MMA between (tma_loads_follow_barriers)
    operands_kept: bool  # no register an MMA reads is written while the MMA may run (register_operands_kept)
    sass_digest: str  # of the whole SASS, addresses left out: equal digests, the same machine code (sass_digest)


def _tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


# argument types by name across the kernels compiled here (anything else: an int32 scalar)
_TYPES = {**dict.fromkeys(("Q", "K", "V", "O", "DO", "DQ", "DK", "DV", "DS", "DQ_SIDE", "DK_SIDE", "DV_SIDE"), "*bf16"),
          **dict.fromkeys(("LSE", "LSE_T", "DELTA", "DELTA_T"), "*fp32"), "TOKEN_MAJOR": "*i8", "RECOMPUTE": "*i8",
          **dict.fromkeys(("STARTS", "ENDS", "SLOTS", "SCHEDULE", "SELECTED", "COUNTS", "BLOCKS", "PAIR_SLOTS",
                           "Q_FIRST", "SIDE_SLOT"), "*i32"),
          **dict.fromkeys(("qk_scale", "softmax_scale"), "fp32")}  # fmt: skip


def _aligned(types: dict) -> dict:
    """Pointers and strides marked divisible by 16, as Triton's launch specialises them for real tensors."""
    return {(i,): [["tt.divisibility", 16]] for i, (name, kind) in enumerate(types.items())
            if kind.startswith("*") or name.startswith("stride")}  # fmt: skip


def _compile(fn, constexprs: dict, descriptors: dict, options: dict, gluon: bool = False):
    """``fn`` compiled for sm_90a on the CPU: bf16 tensors, int32 tables and strides, ``descriptors`` (name:
    tensordesc type) for its descriptor arguments, pointers and strides aligned as a real launch's; ``gluon``: a Gluon
    kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    if gluon:
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource  # noqa: N814
    else:
        from triton.compiler import ASTSource

    types = {name: "constexpr" if name in constexprs else descriptors.get(name, _TYPES.get(name, "i32"))
             for name in inspect.signature(fn.fn).parameters}  # fmt: skip
    names = list(types)
    source = ASTSource(fn, types, constexprs={(names.index(k),): v for k, v in constexprs.items()}, attrs=_aligned(types))
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def compile_triton(tiles: tuple[int, int, int, int] = (128, 64, 8, 3), head_dim: int = 128, block: int = 128):
    """Our Triton kernel (``kernels.triton.kernel``, head-ordered inputs through TMA) compiled for sm_90a."""
    from sparse_vdit.kernels.triton.kernel import block_sparse_attention_fwd

    block_m, block_n, warps, stages = tiles
    constexprs = dict(FRAMES=21, TABLE_BLOCK=block, BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=head_dim,
                      STORE_LSE=False, IEEE=False, ANY_TOKEN_MAJOR=True, TMA=True, WARP_SPECIALIZE=False,
                      SELECT=False, HEAD_ORDER=True, BLOCK_LIST=False)  # fmt: skip
    desc = f"tensordesc<bf16[1,{block_n},1,{head_dim}]>"
    return _compile(block_sparse_attention_fwd, constexprs, {"K_DESC": desc, "V_DESC": desc},
                    dict(num_warps=warps, num_stages=stages))  # fmt: skip


def backward_options(variant: str = "default", head_dim: int = 128) -> dict:
    """The Triton backward's options under ``variant`` (``backward.VARIANTS``), defaults filled in, ``dq_split`` as
    ``backward.split_share`` has it on sm90 at ``head_dim``."""
    from sparse_vdit.kernels.triton.backward import DEFAULTS, VARIANTS

    options = {**DEFAULTS, **VARIANTS[variant]}
    if "dq_split" not in VARIANTS[variant] and head_dim != 128:
        options["dq_split"] = 0.0
    return options


def compile_triton_dkdv(head_dim: int = 128, block: int = 128, variant: str = "default"):
    """The Triton backward's dK/dV kernel (``kernels.triton.backward``, head-ordered inputs, dS stored) at its
    default tiles (128 keys a program, 32-query steps) and launch, compiled for sm_90a under ``variant``'s
    options (``dp_early``, ``warps``, ``stages``)."""
    from sparse_vdit.kernels.triton.backward import _tiles, block_sparse_attention_bwd_dkdv

    options = backward_options(variant, head_dim)
    kv_tile, q_step, _, _ = _tiles(block, _CUDA)
    constexprs = dict(FRAMES=21, TABLE_BLOCK=block, BLOCK_M=q_step, BLOCK_N=kv_tile, HEAD_DIM=head_dim, IEEE=False,
                      ANY_TOKEN_MAJOR=False, TMA=True, STORE_DS=options["dq"] == "stored",
                      DP_EARLY=bool(options["dp_early"]), SIDE_OUT=bool(options["side_out"]),
                      SLOTTED_ONLY=bool(options["dq_split"]))  # fmt: skip
    desc = f"tensordesc<bf16[1,{q_step},1,{head_dim}]>"
    return _compile(block_sparse_attention_bwd_dkdv, constexprs, {"Q_DESC": desc, "DO_DESC": desc},
                    dict(num_warps=options["warps"][0], num_stages=options["stages"][0]))  # fmt: skip


def _gluon_descriptor(rows: int, head_dim: int) -> str:
    """The type of a Gluon TMA descriptor of bf16 ``[1, rows, head_dim]`` blocks in their default shared layout
    (``gluon_backward.row_descriptor``'s)."""
    from triton.experimental.gluon import language as gl

    layout = gl.NVMMASharedLayout.get_default_for([1, rows, head_dim], gl.bfloat16)
    return f"tensordesc<bf16[1,{rows},{head_dim}],{layout!r}>"


def compile_gluon_dkdv(head_dim: int = 128, block: int = 128, store_ds: bool = True, side_out: bool = False,
                       slotted_only: bool = False):
    """The warp-specialised Gluon dK/dV kernel (``kernels.triton.gluon_backward``) at the Triton backward's query
    step, storing dS or not (the heads whose dQ pass recomputes), token-major heads' rows to side buffers or not
    (``side_out``), dS only for pairs with a slot or not (``slotted_only``: the ``dq_split`` variants), compiled
    for sm_90a."""
    from sparse_vdit.kernels.triton import gluon_backward as GB
    from sparse_vdit.kernels.triton.backward import _tiles

    _, q_step, _, _ = _tiles(block, _CUDA)
    constexprs = dict(TABLE_BLOCK=block, BLOCK_M=q_step, BLOCK_N=2 * GB.HALF.value, HEAD_DIM=head_dim, STAGES=GB.STAGES,
                      STORE_DS=store_ds, SIDE_OUT=side_out, SLOTTED_ONLY=slotted_only)  # fmt: skip
    steps, keys = _gluon_descriptor(q_step, head_dim), _gluon_descriptor(GB.HALF.value, head_dim)
    descriptors = {"q_desc": steps, "do_desc": steps, "k_desc": keys, "v_desc": keys}
    return _compile(GB.block_sparse_attention_bwd_dkdv_ws, constexprs, descriptors,
                    dict(num_warps=4, maxnreg=GB.MAXNREG), gluon=True)  # fmt: skip


def compile_triton_dq(head_dim: int = 128, block: int = 128, variant: str = "default"):
    """The Triton backward's dQ kernel on stored dS tiles (``block_sparse_attention_bwd_dq_stored``: one MMA a
    step, dS and K by TMA) at its default tiles (128 queries a program, 64-key steps) and launch, compiled for
    sm_90a under ``variant``'s options (``warps``, ``stages``; ``dq_split``: with the recomputing path beside)."""
    from sparse_vdit.kernels.triton.backward import _tiles
    from sparse_vdit.kernels.triton.backward_dq import block_sparse_attention_bwd_dq_stored

    options = backward_options(variant, head_dim)
    _, q_step, q_tile, kv_step = _tiles(block, _CUDA)
    constexprs = dict(FRAMES=21, TABLE_BLOCK=block, BLOCK_M=q_tile, BLOCK_N=kv_step, HEAD_DIM=head_dim, IEEE=False,
                      ANY_TOKEN_MAJOR=False, TMA=True, DS_TMA=True, Q_STEP=q_step, ACCUMULATE=False,
                      SIDE_OUT=bool(options["side_out"]), SPLIT=bool(options["dq_split"]),
                      SPLIT_STAGES=options["dq_split_stages"] if options["dq_split"] else None)  # fmt: skip
    keys = f"tensordesc<bf16[1,{kv_step},1,{head_dim}]>"
    descriptors = {"K_DESC": keys, "V_DESC": keys, "DS": f"tensordesc<bf16[{kv_step},{q_tile}]>"}
    return _compile(block_sparse_attention_bwd_dq_stored, constexprs, descriptors,
                    dict(num_warps=options["warps"][1], num_stages=options["stages"][1]))  # fmt: skip


class _Cuda:  # the backward's tile rule asks only for the device's type
    type = "cuda"


_CUDA = _Cuda()


def _ptxas_info(ptx: str) -> tuple[int, int]:
    """(registers, spilled bytes) that the ptxas Triton compiles sm90 with reports for ``ptx``."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        command = [get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", os.path.join(tmp, "k.cubin")]
        report = subprocess.run(command, capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spilled = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spilled


def sass(cubin: bytes) -> list[tuple[int, str]]:
    """(address, instruction) of ``cubin``'s SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    found = (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in text.splitlines())
    return [(int(m.group(1), 16), m.group(2).strip()) for m in found if m]


CLASSES = (("MUFU.EX2", "EXP"), ("F2FP", "EXP"), ("HGMMA", "HGMMA"), ("BAR.SYNC", "BAR"), ("UTMALDG", "TMA"))


def _innermost_mma_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The instructions of the innermost loop (shortest predicated backward branch) holding an ``HGMMA``."""
    best = None
    for address, text in instructions:
        target = re.search(r"\bBRA (0x[0-9a-f]+)", text)
        # a loop's back edge is predicated; the jumps back from spin-waits laid out at the end are not
        if target is None or not text.startswith("@") or int(target.group(1), 16) >= address:
            continue
        body = [t for a, t in instructions if int(target.group(1), 16) <= a <= address]
        if any("HGMMA" in t for t in body) and (best is None or len(body) < len(best)):
            best = body
    return best or []


def mma_loop(instructions: list[tuple[int, str]]) -> list[str]:
    """The innermost loop holding an ``HGMMA``, as instruction classes in order with runs merged: ``HGMMAx8``,
    ``DEPBAR<=1``, ``EXPx48``, ``BAR``, ``TMA``."""
    runs: list[list] = []
    for text in _innermost_mma_loop(instructions):
        name = next((label for key, label in CLASSES if key in text), None)
        if "WARPGROUP.DEPBAR" in text:
            name = f"DEPBAR<={int(text.split()[-1], 16)}"
        if name is None:
            continue
        if runs and runs[-1][0] == name and name in ("EXP", "HGMMA"):
            runs[-1][1] += 1
        else:
            runs.append([name, 1])
    return [f"{name}x{count}" if count > 1 else name for name, count in runs]


def loop_stores(instructions: list[tuple[int, str]]) -> dict[str, int]:
    """The global stores of the innermost MMA loop by opcode (``{"STG.E.128": 2}``: two 16-byte stores a
    thread an iteration; ``STG.E.U16``: two bytes each)."""
    stores: dict[str, int] = {}
    for text in _innermost_mma_loop(instructions):
        opcode = text.split()[1] if text.startswith("@") else text.split()[0]
        if opcode.startswith("STG"):
            stores[opcode] = stores.get(opcode, 0) + 1
    return stores


def tma_loads_follow_barriers(ptx: str) -> bool:
    """Whether every TMA load in ``ptx`` comes after a CTA barrier (``bar.sync``) with no warpgroup MMA and no
    branch target between: a load into a shared buffer that the program's other warpgroup may still be reading
    with an MMA is ordered after that warpgroup's wait for it only by such a barrier (Triton's shared-memory
    barrier pass puts them there; nothing in the kernels asks for them)."""
    lines = [line.strip() for line in ptx.splitlines()]
    for i, line in enumerate(lines):
        if "cp.async.bulk.tensor" not in line:
            continue
        for before in reversed(lines[:i]):  # back to the barrier, or to the kernel's entry (no MMA before it)
            if before.startswith("bar.sync"):
                break
            if "wgmma" in before or before.startswith("$L__BB"):  # a branch target ($L__tmp: debug ranges)
                return False
    return True


_REGISTER_A = re.compile(r"wgmma\.mma_async\S*\s+\{[^}]*\},\s*\{([^}]*)\}")


def register_operands_kept(ptx: str) -> bool:
    """Whether no register that an asynchronous MMA reads its A operand from (``wgmma.mma_async`` with
    ``{...}`` registers) is written where that MMA may still be running, judged in straight-line code (no branch
    target between the write and the MMA): a write before the MMA must come after the last ``wgmma.wait_group``
    before it, a write after it after a wait. (A write before that wait, in a loop, lands while the previous
    iteration's MMA reads the register: undefined in PTX. The Gluon dK/dV kernel of 2026-12-05, since removed,
    packed its dS tiles for their store into the dK update's registers there, and its dK came out wrong.)"""
    lines = [line.strip() for line in ptx.splitlines()]
    waits = [i for i, line in enumerate(lines) if line.startswith("wgmma.wait_group")]
    labels = [i for i, line in enumerate(lines) if line.startswith("$L__BB")]
    writes: dict[str, list[int]] = {}
    for i, line in enumerate(lines):
        target = re.match(r"(?:@!?%p\d+\s+)?[a-z][\w.]*\s+(%r\d+),", line)
        if target and not line.startswith(("st.", "wgmma")):
            writes.setdefault(target.group(1), []).append(i)
    for i, line in enumerate(lines):
        operands = _REGISTER_A.search(line)
        if not operands:
            continue
        for register in re.findall(r"%r\d+", operands.group(1)):
            for w in writes.get(register, []):
                low, high = min(w, i), max(w, i)
                if any(low < x < high for x in labels):
                    continue
                between = any(low < x < high for x in waits)
                if between == (w < i):  # before: a wait between them; after: none
                    return False
    return True


def sass_digest(instructions: list[tuple[int, str]]) -> str:
    """A short digest of ``instructions`` without their addresses: two checkouts' ``--json`` rows with equal
    digests compiled to the same machine code (how a refactor of a kernel is checked without a GPU)."""
    return hashlib.sha1("\n".join(text for _, text in instructions).encode()).hexdigest()[:12]


def summarize(name: str, kernel) -> Compiled:
    registers, spilled = _ptxas_info(kernel.asm["ptx"])
    instructions = sass(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    return Compiled(name, registers, spilled, kernel.metadata.shared, mma_loop(instructions), loop_stores(instructions),
                    tma_loads_follow_barriers(ptx), register_operands_kept(ptx), sass_digest(instructions))


def overlaps_softmax(loop: list[str]) -> bool:
    """Whether the loop's exponentials run between a wait that leaves one MMA group in flight and the
    wait for all: the softmax beside the previous tile's ``P V``."""
    try:
        first, last = loop.index("DEPBAR<=1"), loop.index("DEPBAR<=0")
    except ValueError:
        return False
    return first < last and any(step.startswith("EXP") for step in loop[first:last])


def waits_for_all(loop: list[str]) -> bool:
    """Whether the loop waits, somewhere, for every MMA it issued (``DEPBAR<=0``): with none, each step's
    exponentials would run beside MMAs still in flight."""
    return "DEPBAR<=0" in loop


def main(argv=None) -> list[Compiled]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--head-dims", nargs="*", type=int, default=[128, 64])
    p.add_argument("--json", action="store_true", help="print the rows as JSON (for tests), not a table")
    p.add_argument("--backward", action="store_true", help="also the Triton backward's dK/dV and dQ kernels")
    p.add_argument("--variants", nargs="*", default=["default"],
                   help="with --backward: the backward's variants to compile (backward.VARIANTS; 'all': every one)")
    p.add_argument("--gluon-backward", action="store_true",
                   help="also the warp-specialised Gluon dK/dV kernel (registers: the kernel's cap; its consumers get 232)")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("compiling for sm_90a needs TRITON_INTERPRET unset (the interpreter wraps Triton's own functions)")
    rows = []
    from sparse_vdit.kernels.triton.backward import VARIANTS

    variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown backward variant {name!r}; known: {', '.join(VARIANTS)}")
    for dim in args.head_dims:
        rows.append(summarize(f"triton 128x64x8x3 D{dim}", compile_triton((128, 64, 8, 3), dim)))
        if args.backward:
            for variant in variants:
                tag = "" if variant == "default" else f" {variant}"
                rows.append(summarize(f"triton backward dK/dV D{dim}{tag}", compile_triton_dkdv(dim, variant=variant)))
                differs = ("warps", "stages", "side_out", "dq_split", "dq_split_stages")  # its dQ kernel's options
                mine, default = backward_options(variant, dim), backward_options("default", dim)
                if variant == "default" or any(mine[key] != default[key] for key in differs):
                    rows.append(summarize(f"triton backward dQ D{dim}{tag}", compile_triton_dq(dim, variant=variant)))
        if args.gluon_backward:
            rows.append(summarize(f"gluon backward dK/dV D{dim}", compile_gluon_dkdv(dim)))
            rows.append(summarize(f"gluon backward dK/dV D{dim} no dS", compile_gluon_dkdv(dim, store_ds=False)))
            if "side-out" in variants:
                rows.append(summarize(f"gluon backward dK/dV D{dim} side-out", compile_gluon_dkdv(dim, side_out=True)))
            if any(backward_options(variant, dim)["dq_split"] for variant in variants):
                rows.append(summarize(f"gluon backward dK/dV D{dim} slotted only",
                                      compile_gluon_dkdv(dim, slotted_only=True)))
    if args.json:
        print(json.dumps([{**asdict(row), "overlaps": overlaps_softmax(row.loop), "waits_for_all": waits_for_all(row.loop)}
                          for row in rows]))  # fmt: skip
        return rows
    print("\n| kernel | registers | spilled B | shared KB | softmax beside P V | waits for every MMA | key loop (SASS) "
          "| loop's global stores | MMA operands kept |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.name} | {row.registers} | {row.spilled} | {row.shared / 1024:.1f} | "
              f"{'yes' if overlaps_softmax(row.loop) else 'no'} | {'yes' if waits_for_all(row.loop) else 'no'} | "
              f"{' '.join(row.loop)} | {' '.join(f'{op}x{n}' for op, n in row.stores.items()) or '-'} | "
              f"{'yes' if row.operands_kept else 'NO'} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
