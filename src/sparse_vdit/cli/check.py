"""`sparse-vdit check`: every pattern on a small layout, each backend against the reference."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..kernels import sparse_attention
from ..kernels import registry
from ..kernels.api import resolve_backend
from ..layout import VideoLayout
from .common import ORGANISM_BLOCK, CommandError, add_device, block_size, positive_int, writable_folder
from ..patterns import compile_layer, dense, diagonal, draw_pattern, draw_table, multi_diagonal, skip, spatial, temporal, vertical

PATTERNS = {
    "dense": dense(),
    "skip": skip(),
    "diagonal": diagonal(1.0),
    "multi_diagonal": multi_diagonal(0.06),
    "vertical": vertical(((0.0, 1.0),), width=0.5),
    "spatial": spatial(1.5),
    "temporal": temporal(0.1),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--frames", type=positive_int, default=6, help="latent frames of the test layout")
    parser.add_argument("--height", type=positive_int, default=16, help="tokens per frame, down")
    parser.add_argument("--width", type=positive_int, default=20, help="tokens per frame = height x width (320: ragged blocks)")
    parser.add_argument("--text", type=int, default=40, help="text tokens (suffix); 0 for none")
    parser.add_argument("--text-valid", type=int, default=30, help="unpadded text tokens")
    parser.add_argument("--head-dim", type=int, default=64, choices=(64, 128), help="head dimension")
    parser.add_argument("--block-size", "--block", dest="block", type=block_size, default=ORGANISM_BLOCK,
                        help="block size of the table")  # fmt: skip
    add_device(parser)
    parser.add_argument("--out", type=Path, default=Path("sparse-vdit-check"), help="folder for pictures and results")


def _time(fn, repeats: int = 3) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def run(args: argparse.Namespace) -> int:
    text = args.text
    if not 0 <= args.text_valid <= text or text < 0:
        raise CommandError(f"need 0 <= --text-valid ({args.text_valid}) <= --text ({text})")
    layout = VideoLayout(
        args.frames, args.height, args.width, text, "suffix" if text else "none", args.text_valid if text else None
    )
    writable_folder(args.out)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = list(PATTERNS.values())
    table = compile_layer(heads, layout, args.block, device)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(1, layout.num_tokens, len(heads), args.head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    print(f"layout {layout.describe()}, block {args.block}, {len(heads)} heads x {args.head_dim}, {dtype}, {device}")
    print(f"table density {table.density:.1%} of blocks")

    reference = sparse_attention(q, k, v, table, backend="reference")
    chosen = resolve_backend("auto", q)
    rows, failed = [], False
    for backend in registry.names():
        try:
            out = sparse_attention(q, k, v, table, backend=backend)
        except (RuntimeError, ValueError, TypeError) as err:
            rows.append({"backend": backend, "status": f"unavailable: {err}"})
            continue
        err = float((out.double() - reference.double()).norm() / reference.double().norm())
        ok = err < (1e-2 if dtype == torch.bfloat16 else 1e-5) and not out.isnan().any() and not out[:, :, 1].any()
        failed |= not ok
        ms = _time(lambda: sparse_attention(q, k, v, table, backend=backend))
        rows.append({"backend": backend, "status": "ok" if ok else "MISMATCH", "rel_rms_vs_reference": err, "ms": ms})

    args.out.mkdir(parents=True, exist_ok=True)
    draw_table(table.to("cpu"), args.out / "layer.png", title=f"one layer, every pattern: {layout.describe()}")
    for name, pattern in PATTERNS.items():
        draw_pattern(pattern, layout, args.out / f"pattern_{name}.png", args.block)
    (args.out / "check.json").write_text(json.dumps({"layout": layout.describe(), "auto": chosen, "rows": rows}, indent=2))

    print(f"\n{'backend':<10} {'status':<10} {'rel RMS vs ref':>15} {'ms':>9}")
    for r in rows:
        if "ms" in r:
            print(f"{r['backend']:<10} {r['status']:<10} {r['rel_rms_vs_reference']:>15.2e} {r['ms']:>9.2f}")
        else:
            print(f"{r['backend']:<10} {r['status']}")
    print(f"\nauto -> {chosen}; pictures and check.json in {args.out}/")
    return 1 if failed else 0
