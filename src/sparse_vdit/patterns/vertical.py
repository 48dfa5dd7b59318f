"""Vertical stripes: fixed key columns every query visits, plus a local band."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Geometry, Pattern, band, register


@register("vertical")
def _vertical(pattern: Pattern, g: Geometry):
    layout = g.layout
    band_lo, band_hi = band(g, pattern.width * layout.frame_tokens)
    spans = []
    for start, end in pattern.columns:
        first = layout.video_start + round(start * layout.frame_tokens)
        last = layout.video_start + min(round(end * layout.frame_tokens), layout.video_tokens)
        spans.append(g.token_blocks(first, last, g.num_kv_blocks))
    columns = torch.tensor(spans, dtype=torch.long).reshape(1, -1, 2).expand(g.num_q_blocks, -1, -1)
    return torch.cat([band_lo, columns[..., 0]], 1), torch.cat([band_hi, columns[..., 1]], 1)


def vertical(columns: Sequence[tuple[float, float]] = ((0.0, 1.0),), width: float = 0.0) -> Pattern:
    """Sparse-vDiT vertical stripe: key columns every query block visits, plus a local band.

    ``columns`` are ``(start, end)`` ranges of the video in frames (``(0, 1)`` is the first
    frame; ``(2.5, 2.75)`` a quarter of frame 2); ``width`` is the band in frames, as in
    :func:`diagonal`.
    """
    if not columns:
        raise ValueError("vertical needs at least one column range")
    return Pattern("vertical", float(width), tuple((float(a), float(b)) for a, b in columns))
