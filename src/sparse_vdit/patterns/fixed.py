"""Patterns that ignore the video structure: every block, or none."""

from __future__ import annotations

import torch

from .base import Geometry, Pattern, register


@register("dense")
def _dense(pattern: Pattern, g: Geometry):
    lo = torch.zeros(g.num_q_blocks, 1, dtype=torch.long)
    return lo, lo + g.num_kv_blocks


@register("skip")
def _skip(pattern: Pattern, g: Geometry):
    lo = torch.zeros(g.num_q_blocks, 1, dtype=torch.long)
    return lo, lo


def dense() -> Pattern:
    """Full attention: every query block visits every key block."""
    return Pattern("dense")


def skip() -> Pattern:
    """No blocks at all: the head's output is exactly zero (text rows included)."""
    return Pattern("skip")
