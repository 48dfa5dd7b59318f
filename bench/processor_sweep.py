"""The Triton sweep of ``bench/processor_attention.py --sweep`` (issue 21): where the processor call loses.

Three parts, each checked before it is timed: the fused input pass alone with each launch option
set of :data:`PASS_VARIANTS` (``kernels/triton/rotary.py``'s ``OPTIONS``), the attention kernel
alone on head-ordered inputs with each tile choice of :data:`TILE_VARIANTS`
(``launcher.OPTIONS["tiles"]``), and the whole call with the winners of both (:func:`tuned_fn`).
Options are set only around each call (:func:`variant`), so the other paths run the defaults.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from common import say, time_fn

from sparse_vdit.kernels.head_order import attention_in_head_order, in_float32, to_head_order
from sparse_vdit.kernels.triton import backend as triton_backend
from sparse_vdit.kernels.triton import launcher
from sparse_vdit.kernels.triton import rotary as rotary_kernel

# rotary.OPTIONS of the fused pass; "default" is rotary.DEFAULTS (16 tokens a program, 4 warps). Removed
# after issue 21's H200 sweep, where they lost everywhere: the tile-first grid and the second load of
# each channel's partner (BENCHMARKS.md). Kept: the block sizes that came within 5% (float32 Wan tables).
PASS_VARIANTS = {"default": {}, "b32": {"block": 32}, "b64-w8": {"block": 64, "warps": 8}}
# head dim -> name -> launcher.OPTIONS["tiles"] (BLOCK_M, BLOCK_N, warps, stages); "default": the
# launcher's choice (its rule, or SMALL_LAUNCH_TILES for small launches at low density). Removed after
# the sweep (lost on every row): 128x64x8x2 (D=128), 128x64x4x3 and 64x128x4x3 (D=64).
TILE_VARIANTS = {
    128: {"default": None, "128x64x8x3": (128, 64, 8, 3), "64x64x4x3": (64, 64, 4, 3)},
    64: {"default": None},
}


@contextmanager
def variant(pass_options: dict | None = None, tiles=None):
    """The fused pass's launch options and the kernel's tiles set for the calls inside, restored after."""
    saved_pass = dict(rotary_kernel.OPTIONS)
    rotary_kernel.OPTIONS.update(pass_options or {})
    try:
        with launcher.options_set(tiles=tiles):
            yield
    finally:
        rotary_kernel.OPTIONS.update(saved_pass)


def _rel(out, ref) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _tables(rotary) -> dict:
    """The family's tables, and float32 ones beside float64 tables (Wan's)."""
    return {"native": rotary, "f32": in_float32(rotary)} if rotary.cos.dtype == torch.float64 else {"native": rotary}


def pass_sweep(shape, rotary, table, sets, args, rows: list) -> dict:
    """Time the fused pass (q, k rotated, v; ``table``'s token-major heads reordered) per option set
    and table dtype; returns {"native" / "f32": fastest variant name}."""
    best, reference = {}, None
    q = sets[0][0]
    for label, tables in _tables(rotary).items():
        base = None
        moved = 6 * q.numel() * q.element_size() + 2 * tables.cos.numel() * tables.cos.element_size()
        for name in args.pass_variants:
            options = PASS_VARIANTS[name]

            def fn(q, k, v, options=options, tables=tables):
                with variant(options):
                    return to_head_order(q, k, v, table, tables)

            row = dict(part="pass", shape=shape.name, tables=label, variant=name, dtype=str(tables.cos.dtype))
            try:
                out = fn(*sets[0])
                base = base if base is not None else out
                reference = reference if reference is not None else out
                row["check"] = max(_rel(o, b) for o, b in zip(out, base))
                row["check_vs_native"] = max(_rel(o, r) for o, r in zip(out, reference))
                del out
                ms, host, reps = time_fn(fn, sets, target_ms=args.target_ms)
            except Exception as exc:  # a variant that cannot run here is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                say(f"  pass {label} {name}: {row['error']}")
                rows.append(row)
                continue
            row.update(ms=ms, host_ms=host, reps=reps, gbps=moved / ms * 1e-6)
            rows.append(row)
            say(f"  pass {label:6s} {name:16s} {ms:8.3f} ms {row['gbps']:7.0f} GB/s check {row['check']:.1e} "
                f"(vs native {row['check_vs_native']:.1e})")  # fmt: skip
            if row["check"] <= args.check_tol and (label not in best or ms < best[label][1]):
                best[label] = (name, ms)
    return {label: name for label, (name, _) in best.items()}


def tile_sweep(shape, kind, target, table, sets, args, cudnn_ms: float, rows: list) -> str | None:
    """Time the attention kernel alone on head-ordered inputs per tile choice; returns the fastest
    choice's name (None when none ran). Block efficiency against dense cuDNN without rotary."""
    dim = shape.dim
    ordered = [to_head_order(*s, table) for s in sets]  # no rotary: the kernel alone
    scale = dim**-0.5
    base, best = None, None
    for name in args.tile_variants:
        if name not in TILE_VARIANTS.get(dim, {}):
            continue
        tiles = TILE_VARIANTS[dim][name]

        def fn(q, k, v, tiles=tiles):
            with variant(tiles=tiles):
                return triton_backend.run(q, k, v, table, scale, head_order=True)

        row = dict(part="kernel", shape=shape.name, kind=kind, target=target, density=table.density, variant=name,
                   tiles=list(tiles) if tiles else None)  # fmt: skip
        try:
            out = fn(*ordered[0])
            base = base if base is not None else out
            row["check"] = _rel(out, base)
            del out
            ms, host, reps = time_fn(fn, ordered, target_ms=args.target_ms)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            say(f"  kernel {kind} {target} {name}: {row['error']}")
            rows.append(row)
            continue
        row.update(ms=ms, host_ms=host, reps=reps, block_eff=table.density * cudnn_ms / ms)
        rows.append(row)
        say(f"  kernel {kind:10s} {table.density:5.3f} {name:12s} {ms:9.3f} ms eff {row['block_eff']:5.2f} "
            f"check {row['check']:.1e}")  # fmt: skip
        if row["check"] <= args.check_tol and (best is None or ms < best[1]):
            best = (name, ms)
    del ordered
    return None if best is None else best[0]


def tuned_fn(table, tables, pass_name: str, tile_name: str | None, dim: int):
    """``fn(q, k, v)``: the fused Triton call with the pass options ``pass_name`` and the tiles ``tile_name``."""
    options = PASS_VARIANTS[pass_name]
    tiles = TILE_VARIANTS.get(dim, {}).get(tile_name)

    def run(q, k, v):
        with variant(options, tiles):
            return attention_in_head_order(q, k, v, table, backend="triton", rotary=tables)

    return run


def print_sweep(result: dict) -> None:
    """The components (pass, kernel), then the winners: the short table, printed last."""
    rows = [r for r in result["rows"] if "ms" in r]
    passes = [r for r in rows if r.get("part") == "pass"]
    if passes:
        print("\nfused pass alone (q, k rotated + v, every head token-major): ms (GB/s)")
        for shape in dict.fromkeys(r["shape"] for r in passes):
            cells = [f"{r['tables']}/{r['variant']} {r['ms']:.3f} ({r['gbps']:.0f})" for r in passes if r["shape"] == shape]
            print(f"  {shape}: " + "; ".join(cells))
    kernels = [r for r in rows if r.get("part") == "kernel"]
    if kernels:
        print("\nattention kernel alone on head-ordered inputs: block efficiency vs dense cuDNN (no rotary)")
        for key in dict.fromkeys((r["shape"], r["kind"], r["target"]) for r in kernels):
            cells = [f"{r['variant']} {r['block_eff']:.2f}" for r in kernels if (r["shape"], r["kind"], r["target"]) == key]
            print(f"  {key[0]:18s} {key[1]:10s} {key[2]:5.2f}: " + "  ".join(cells))
    calls = [r for r in rows if r.get("part") == "call" and r["backend"].startswith("triton/")]
    if not calls:
        return
    paths = list(dict.fromkeys(r["path"] for r in calls))
    print("\nwinners: whole processor call, block efficiency (tuned: the shape's fastest pass options + the row's "
          "fastest tiles; -f32: float64 tables cast to float32)")
    width = max(len(p) for p in paths) + 1
    print(f"  {'shape':18s} {'kind':10s} {'target':>6s} " + " ".join(f"{p:>{width}s}" for p in paths) + "  pass / tiles")
    for key in dict.fromkeys((r["shape"], r["kind"], r["target"]) for r in calls):
        hit = {r["path"]: r for r in calls if (r["shape"], r["kind"], r["target"]) == key}
        cells = [f"{hit[p]['block_eff']:.2f}" if p in hit else "-" for p in paths]
        chosen = ", ".join(dict.fromkeys(f"{r['pass_variant']} / {r['tile_variant']}" for r in hit.values() if "pass_variant" in r))
        print(f"  {key[0]:18s} {key[1]:10s} {key[2]:6.2f} " + " ".join(f"{c:>{width}s}" for c in cells) + f"  {chosen}")
