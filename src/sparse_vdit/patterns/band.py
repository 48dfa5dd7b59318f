"""Band patterns: neighbours in frame-major order (spatial) or token-major order (temporal)."""

from __future__ import annotations

from .base import Geometry, Pattern, band, register


def _frame_band(pattern: Pattern, g: Geometry):
    return band(g, pattern.width * g.layout.frame_tokens)


def _token_major_band(pattern: Pattern, g: Geometry):
    return band(g, pattern.width * g.layout.video_tokens)


register("diagonal")(_frame_band)
register("spatial")(_frame_band)
register("multi_diagonal", token_major=True)(_token_major_band)
register("temporal", token_major=True)(_token_major_band)


def diagonal(width: float = 1.0) -> Pattern:
    """Sparse-vDiT diagonal: key blocks within ``width`` frames' worth of tokens (frame-major)."""
    return Pattern("diagonal", float(width))


def multi_diagonal(width: float = 0.1) -> Pattern:
    """Sparse-vDiT multi-diagonal: the same spatial neighbourhood in every frame.

    The head is permuted to token-major order (``p * F + f``); it then visits key blocks within
    ``width * F * S`` tokens of the query block.
    """
    return Pattern("multi_diagonal", float(width))


def spatial(width: float = 1.0) -> Pattern:
    """SVG spatial head: a band of ``width`` frames in frame-major order (as :func:`diagonal`)."""
    return Pattern("spatial", float(width))


def temporal(width: float = 0.1) -> Pattern:
    """SVG temporal head: a band of ``width * F * S`` tokens in token-major order."""
    return Pattern("temporal", float(width))
