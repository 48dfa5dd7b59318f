"""Measure (and cache) the cost table of the search's candidates at one layout on this device, and print it.

    python -m sparse_vdit.methods.cost_table --frames 21 --height 30 --width 52 --heads 12 --head-dim 128

The table is what ``search(..., cost="measure")`` reads (see :mod:`sparse_vdit.methods.cost`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..block_table import DEFAULT_BLOCK
from ..layout import VideoLayout
from ..patterns import compile_layer
from .candidates import paper_candidates, tuned_candidates
from ..kernels.registry import DTYPE_NAMES
from .cost import MeasuredCost, Shape, cache_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sparse_vdit.methods.cost_table", description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, required=True)
    p.add_argument("--height", type=int, required=True, help="latent tokens per frame, vertically")
    p.add_argument("--width", type=int, required=True, help="latent tokens per frame, horizontally")
    p.add_argument("--text", type=int, default=0)
    p.add_argument("--text-position", default="none", choices=("none", "prefix", "suffix"))
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_NAMES))
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK)
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cache-dir", type=Path, help=f"default: {cache_dir()}")
    p.add_argument("--candidates", choices=("tuned", "paper", "both"), default="both")
    args = p.parse_args(argv)
    layout = VideoLayout(args.frames, args.height, args.width, args.text, args.text_position)
    dtype = DTYPE_NAMES[args.dtype]
    shape = Shape(layout, args.heads, args.head_dim, dtype, torch.device(args.device), args.block_size,
                  args.backend)  # fmt: skip
    cands = {"tuned": tuned_candidates(), "paper": paper_candidates()}
    chosen = cands["tuned"] + cands["paper"] if args.candidates == "both" else cands[args.candidates]
    model = MeasuredCost(args.cache_dir, args.reps)
    model.prepare({c.key: c.representative(layout, args.block_size) for c in chosen}, shape)
    table, path = model.table(shape)
    print(f"{table.meta['device']}, {layout.describe()}, {args.heads} x {args.head_dim} {args.dtype}, "
          f"backend {table.meta['backend']}: dense {table.dense_ms:.3f} ms; table {path}")  # fmt: skip
    print(f"{'pattern':<36} {'ms':>9} {'time/dense':>10} {'blocks':>7} {'block eff.':>10}")
    for c in chosen:
        pattern = c.representative(layout, args.block_size)
        blocks = compile_layer([pattern], layout, args.block_size).density
        rel = table.relative(c.key)
        print(f"{c.key:<36} {table.ms[c.key]:9.3f} {rel:10.3f} {blocks:7.1%} {blocks / rel if rel else 0:10.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
