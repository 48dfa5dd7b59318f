"""Pictures of block maps: which key blocks each query block visits, per head."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ..layout import VideoLayout
from .base import Pattern
from .table import DEFAULT_BLOCK, BlockTable, compile_layer


def draw_table(table: BlockTable, path: str | Path, heads: Sequence[int] | None = None, title: str | None = None) -> Path:
    """Write a PNG with one block map per head (query blocks down, key blocks across)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(range(table.num_heads)) if heads is None else list(heads)
    cols = min(len(heads), 4)
    rows = math.ceil(len(heads) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, h in zip(axes.flat, heads):
        pattern = table.patterns[h]
        ax.imshow(table.block_mask(h).numpy(), cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
        order = "token-major" if pattern.token_major else "frame-major"
        ax.set_title(f"head {h}: {pattern}\n{float(table.head_density[h]):.1%} of blocks, {order}", fontsize=8)
        ax.set_axis_on()
        ax.set_xlabel("key block", fontsize=7)
        ax.set_ylabel("query block", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle(title or f"{table.layout.describe()}, block {table.block_size}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def draw_pattern(pattern: Pattern, layout: VideoLayout, path: str | Path, block_size: int = DEFAULT_BLOCK) -> Path:
    """Write a PNG of one pattern's block map at ``layout``."""
    return draw_table(compile_layer([pattern], layout, block_size), path)
