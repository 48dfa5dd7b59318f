"""A/B of kernel variants on one GPU: the Triton attention kernel's options and the SVG profiling kernel's.

    python bench/kernel_variants.py [--parts attention profile] [--variants NAME ...] [--out DIR]
    python bench/kernel_variants.py --dry-run    # a tiny shape on the CPU (Triton interpreter, fp16)

``attention`` (issue 7): our Triton block-sparse kernel (`sparse_attention(..., backend="triton")`)
with each of ``launcher.OPTIONS`` (TMA key tiles, warp-specialised key loop) on band tables
(frame-major, where TMA applies) and multi-diagonal tables (token-major) of the DESIGN.md shapes,
against dense cuDNN SDPA: block efficiency ``density * t_cuDNN / t``; ``tiles`` variants replace
the launcher's tile rule.

``profile`` (issue 5): the fused sampled-row kernel (`kernels.triton.sampled.sampled_outputs`,
64 rows, SVG's two bands at 25% / 20%) at Wan-14B 720p with each ``sampled.TUNING`` setting.

Every variant is checked against the first of its group (relative RMS) before it is timed;
failures (a variant that does not compile on this Triton) are reported, not fatal. Prints a table
last and writes ``kernel_variants.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

if __name__ == "__main__" and "--dry-run" in sys.argv[1:]:  # before triton.jit: dry runs interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
import common  # noqa: E402  (the bench library: shapes, tables, timer)

from sparse_vdit import sparse_attention  # noqa: E402
from sparse_vdit.kernels.triton import launcher, sampled  # noqa: E402
from sparse_vdit.methods.svg import fused_inputs, band_widths, sample_rows  # noqa: E402
from sparse_vdit.timing import device_name  # noqa: E402

ATTENTION_VARIANTS = {  # launcher.OPTIONS, plus "tiles" (BLOCK_M, BLOCK_N, warps, stages) over the rule
    "work": {"schedule": "work", "tma": False, "warp_specialize": False},  # the kernel before the options
    "heads": {"schedule": "heads", "tma": False, "warp_specialize": False},
    "levels": {"schedule": "levels", "tma": False, "warp_specialize": False},
    "tma": {"schedule": "work", "tma": True, "warp_specialize": False},
    "ws": {"schedule": "work", "tma": False, "warp_specialize": True},
    "tma+ws": {"schedule": "work", "tma": True, "warp_specialize": True},
    "heads+tma": {"schedule": "heads", "tma": True, "warp_specialize": False},
    "heads+tma+ws": {"schedule": "heads", "tma": True, "warp_specialize": True},
    "levels+tma": {"schedule": "levels", "tma": True, "warp_specialize": False},  # launcher.DEFAULTS
    "levels+tma+ws": {"schedule": "levels", "tma": True, "warp_specialize": True},
    "128x128x8x2": {"schedule": "work", "tma": False, "warp_specialize": False, "tiles": (128, 128, 8, 2)},
    "ws 128x128x8x2": {"schedule": "work", "tma": False, "warp_specialize": True, "tiles": (128, 128, 8, 2)},
    "tma+ws 128x128x8x2": {"schedule": "work", "tma": True, "warp_specialize": True, "tiles": (128, 128, 8, 2)},
    "ws 128x64x4x3": {"schedule": "work", "tma": False, "warp_specialize": True, "tiles": (128, 64, 4, 3)},
}
UNSET = {"tma": None, "warp_specialize": None, "schedule": None}
DRY_SHAPE = common.Shape("tiny", common.VideoLayout(4, 8, 16), 2, 64)  # --dry-run: 512 tokens, 4 blocks
PROFILE_VARIANTS = {  # sampled.TUNING; the first is the default (sampled._tiles)
    "64x32x4x3": {},
    "16x64x4x3 (before)": {"block_m": 16, "block_n": 64, "num_warps": 4, "num_stages": 3},
    "no row-wise 64x32x4x3": {"row_wise": False},
    "64x32x4x2": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 2},
    "64x32x4x4": {"block_m": 64, "block_n": 32, "num_warps": 4, "num_stages": 4},
    "64x32x8x3": {"block_m": 64, "block_n": 32, "num_warps": 8, "num_stages": 3},
    "64x16x4x3": {"block_m": 64, "block_n": 16, "num_warps": 4, "num_stages": 3},
    "64x64x4x3": {"block_m": 64, "block_n": 64, "num_warps": 4, "num_stages": 3},
    "64x32x4x3 pps4": {"programs_per_sm": 4},
    "64x32x4x3 pps16": {"programs_per_sm": 16},
}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).square().mean().sqrt() / b.square().mean().sqrt().clamp_min(1e-30))


def triton_with_tiles(q, k, v, table, tiles):
    """The Triton backend with the launcher's tile rule replaced by ``tiles``."""
    rule = launcher._tiles
    launcher._tiles = lambda block, dim, device, override=None: rule(block, dim, device, override or tiles)
    try:
        return sparse_attention(q, k, v, table, backend="triton")
    finally:
        launcher._tiles = rule


def attention_part(args, rows: list) -> None:
    from torch.nn.attention import SDPBackend

    device, dtype = args.device, args.dtype
    cudnn = common.sdpa_with(SDPBackend.MATH if args.dry_run else SDPBackend.CUDNN_ATTENTION)
    for name in args.shapes:
        shape = DRY_SHAPE if args.dry_run else common.SHAPES[name]
        sets = common.random_sets(shape, 2, device, dtype)
        dense_ms = common.time_fn(cudnn, sets, target_ms=args.target_ms)[0]
        for kind, density in [(k, d) for k in args.kinds for d in args.densities]:
            if (kind != "band" and density >= 1.0) or (kind == "mixed" and density != 0.3) or (
                    kind == "multi_diag" and density > 0.5):
                continue
            table, _ = common.table_for(kind, density, shape.layout, shape.heads, device)
            base = None
            calls = [(n, o) for n, o in ATTENTION_VARIANTS.items() if args.variants is None or n in args.variants]
            for variant, options in calls:
                row = {"part": "attention", "shape": name, "kind": kind, "density": round(table.density, 4),
                       "variant": variant, "cudnn_ms": dense_ms}  # fmt: skip
                try:
                    options = dict(options)
                    tiles = options.pop("tiles", None)
                    launcher.OPTIONS.update(UNSET, **options)
                    fn = (lambda q, k, v: sparse_attention(q, k, v, table, backend="triton")) if tiles is None \
                        else (lambda q, k, v, t=tiles: triton_with_tiles(q, k, v, table, t))  # noqa: E731
                    out = fn(*sets[0])
                    base = out if base is None else base
                    row["rel_rms_vs_first"] = rel(out, base)
                    row["nan"] = bool(out.isnan().any())
                    ms = common.time_fn(fn, sets, target_ms=args.target_ms)[0]
                    row.update(ms=ms, efficiency=table.density * dense_ms / ms)
                except Exception as err:  # noqa: BLE001 - a variant may not compile on this Triton
                    row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                    traceback.print_exc(limit=2)
                finally:
                    launcher.OPTIONS.update(UNSET)
                rows.append(row)
                print(json.dumps(row), flush=True)


def profile_part(args, rows: list) -> None:
    device, dtype = args.device, args.dtype
    shape = DRY_SHAPE if args.dry_run else common.SHAPES["wan14b-720p"]
    layout = shape.layout
    sets = common.random_sets(shape, 2, device, dtype)
    geometry = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
    for density in (0.25,) if args.dry_run else (0.25, 0.2):
        patterns = band_widths(layout, density, common.BLOCK).patterns()
        picks, starts, ends = fused_inputs(sample_rows(layout, 64, 3, 5), layout, patterns, common.BLOCK, device)
        tm = tuple(p.token_major for p in patterns)
        base = None
        for variant, tuning in PROFILE_VARIANTS.items():
            if getattr(args, "profile_variants", None) and variant not in args.profile_variants:
                continue
            row = {"part": "profile", "shape": shape.name, "density": density, "variant": variant}
            saved = dict(sampled.TUNING)
            try:
                sampled.TUNING.update(tuning)

                def fn(q, k, v):
                    return sampled.sampled_outputs(q, k, v, picks, starts, ends, tm,
                                                   kv_len=layout.kv_len, softmax_scale=shape.dim**-0.5,
                                                   block_size=common.BLOCK, layout=geometry)  # fmt: skip

                out = fn(*sets[0])
                base = out if base is None else base
                row["rel_rms_vs_first"] = max(rel(a, b) for a, b in zip(out, base))
                row["ms"] = common.time_fn(fn, sets, target_ms=args.target_ms)[0]
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
                traceback.print_exc(limit=2)
            finally:
                sampled.TUNING.clear()
                sampled.TUNING.update(saved)
            rows.append(row)
            print(json.dumps(row), flush=True)


def print_table(rows: list) -> None:
    """One line per (shape, kind, density) with each variant's block efficiency (attention) or ms
    (profile); an error shows as ``err``."""
    for part, value in (("profile", "ms"), ("attention", "efficiency")):
        mine = [r for r in rows if r["part"] == part]
        variants = list(dict.fromkeys(r["variant"] for r in mine))
        if not mine:
            continue
        print(f"\n{part}: {value} per variant")
        print("| shape | kind | density | " + " | ".join(variants) + " |")
        print("|---|---|---|" + "---|" * len(variants))
        cells: dict = {}
        for r in mine:
            key = (r["shape"], r.get("kind", "svg bands"), r["density"])
            cells.setdefault(key, {})[r["variant"]] = f"{r[value]:.3f}" if value in r else "err"
        for (shape, kind, density), got in cells.items():
            print(f"| {shape} | {kind} | {density:.3f} | " + " | ".join(got.get(v, "-") for v in variants) + " |")


def main(argv=None) -> list:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", nargs="*", default=["profile", "attention"], choices=["attention", "profile"])
    p.add_argument("--shapes", nargs="*", default=list(common.SHAPES), choices=list(common.SHAPES))
    p.add_argument("--kinds", nargs="*", default=["band", "multi_diag", "mixed"], choices=list(common.KINDS),
                   help="band and vertical at every density; multi_diag up to 50%%; mixed at 30%% only")
    p.add_argument("--densities", nargs="*", type=float, default=[0.1, 0.3, 0.5, 1.0])
    p.add_argument("--target-ms", type=float, default=200.0)
    p.add_argument("--variants", nargs="*", default=None, help="attention variants to run (default all)")
    p.add_argument("--out", default=common.out_dir())
    p.add_argument("--dry-run", action="store_true",
                   help="a tiny shape on the CPU in fp16 (Triton interpreter), two variants of each part")
    args = p.parse_args(argv)
    args.device, args.dtype = torch.device("cuda"), torch.bfloat16
    if args.dry_run:
        args.device, args.dtype = torch.device("cpu"), torch.float16
        args.shapes, args.kinds, args.densities, args.target_ms = ["tiny"], ["band"], [0.5], 1.0
        args.variants = args.variants or ["work", "levels+tma"]
        args.profile_variants = ["64x32x4x3", "64x64x4x3"]
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    meta = {"device": device_name("cpu" if args.dry_run else "cuda"), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "argv": argv or sys.argv[1:], "dry_run": args.dry_run}  # fmt: skip

    class Rows(list):  # saved after every row, so a run stopped at its time limit keeps what it measured
        def append(self, row):
            super().append(row)
            common.write_json(os.path.join(args.out, "kernel_variants.json"),
                              {"meta": dict(meta, seconds=round(time.time() - t0, 1)), "rows": self})

    rows = Rows()
    for part in args.parts:
        {"attention": attention_part, "profile": profile_part}[part](args, rows)
    print(json.dumps(meta))
    print_table(rows)
    return list(rows)


if __name__ == "__main__":
    main()
