"""Time block-table construction for a whole model (every layer's table, cold and cached).

    python bench/tables.py [--device cuda] [--out bench/results/tables.json]
    python bench/tables.py --dry-run        # a tiny model on the CPU, to check the script

Target (issue 2): HunyuanVideo 720p, 60 layers x 24 heads, < 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the bench library beside it
from common import BLOCK  # noqa: E402

from sparse_vdit import VideoLayout, compile_layer  # noqa: E402
from sparse_vdit.patterns import dense, diagonal, multi_diagonal, skip, vertical  # noqa: E402
from sparse_vdit.patterns.table import clear_compiled  # noqa: E402
from sparse_vdit.timing import synchronize  # noqa: E402

MODELS = {
    "hunyuan-720p": (VideoLayout(33, 45, 80, 256, "suffix", text_valid=100), 60, 24),
    "wan-14b-720p": (VideoLayout(21, 45, 80), 40, 40),
    "wan-1.3b-480p": (VideoLayout(21, 30, 52), 30, 12),
    "cogvideox1.5-768p": (VideoLayout(11, 48, 85, 226, "prefix"), 42, 48),
}
TINY = {"tiny": (VideoLayout(3, 6, 8, 10, "suffix", text_valid=6), 3, 5)}  # --dry-run, block 16
# a searched plan has a handful of modes with a few widths each
POOL = (
    [dense(), skip()]
    + [diagonal(w) for w in (0.25, 0.5, 1.0, 2.0)]
    + [multi_diagonal(w) for w in (0.02, 0.05, 0.1)]
    + [vertical(((0.0, 1.0),), w) for w in (0.25, 0.5)]
)


def build_model(layout, layers, heads, device, block=BLOCK, seed=0):
    """Every layer's table of a random plan from :data:`POOL`, and the seconds it took."""
    rng = random.Random(seed)
    plan = [tuple(rng.choice(POOL) for _ in range(heads)) for _ in range(layers)]
    synchronize(device)
    start = time.perf_counter()
    tables = [compile_layer(p, layout, block, device) for p in plan]
    synchronize(device)
    return tables, time.perf_counter() - start


def main(argv=None) -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", default=None, help=f"a subset of {', '.join(MODELS)}")
    parser.add_argument("--out", default=None)
    parser.add_argument("--dry-run", action="store_true", help="a tiny model on the CPU, block 16")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.dry_run else args.device)
    known, block = (TINY, 16) if args.dry_run else (MODELS, BLOCK)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""), flush=True)  # fmt: skip
    rows = []
    for name in args.models or list(known):
        layout, layers, heads = known[name]
        clear_compiled()
        tables, cold = build_model(layout, layers, heads, device, block)
        _, cached = build_model(layout, layers, heads, device, block)
        mib = sum(t.range_starts.nbytes + t.range_ends.nbytes for t in tables) / 2**20
        rows.append({"model": name, "layers": layers, "heads": heads, "tokens": layout.num_tokens, "block": block,
                     "cold_s": cold, "cached_s": cached, "tables_mib": mib})  # fmt: skip
    print(f"\n{'model':<20} {'layers x heads':>15} {'cold s':>8} {'cached ms':>10} {'MiB':>8}")
    for r in rows:
        print(f"{r['model']:<20} {r['layers']:>6} x {r['heads']:<6} {r['cold_s']:>8.3f} {r['cached_s'] * 1e3:>10.2f} "
              f"{r['tables_mib']:>8.2f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
