"""A pattern: one head's rule for which key blocks each query block visits.

Each pattern family describes a head's rows as a few key-block intervals per query block
(:func:`register` below); :func:`head_rows` merges them into the compiled form, a count and an
ascending list of key-block indices per query block, without ever forming a dense mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Callable

import torch

from ..block_table import num_blocks
from ..layout import VideoLayout

def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# name -> (interval builder, needs token-major order)
_FAMILIES: dict[str, tuple[Callable, bool]] = {}


def register(name: str, token_major: bool = False):
    """Register an interval builder ``fn(pattern, geometry) -> (lo, hi)`` of shape [Qb, m]."""

    def wrap(fn):
        _FAMILIES[name] = (fn, token_major)
        return fn

    return wrap


def pattern_names() -> tuple[str, ...]:
    """Names of the registered pattern families, in registration order (what a plan may name)."""
    return tuple(_FAMILIES)


@dataclass(frozen=True)
class Pattern:
    """One head's pattern and its parameters (layout-relative units; see DESIGN.md).

    Build them with the named functions (``dense()``, ``diagonal(1.0)``, ...), not directly.
    ``width`` is in frames for frame-major patterns and a fraction of the video for token-major
    ones; ``columns`` are ``(start, end)`` ranges of the video in frames. ``sink`` (frames, 0 =
    none) adds an attention sink: every query also visits the first ``sink * S`` video keys *in
    the head's own order* (the first frame(s) for frame-major heads, the first ``sink * S``
    token-major positions for token-major ones), as SVG's reference code does on Wan
    (:func:`with_sink`). It is part of the head's table: no extra launch.
    """

    name: str
    width: float = 0.0
    columns: tuple[tuple[float, float], ...] = ()
    sink: float = 0.0

    def __post_init__(self) -> None:
        if self.name not in _FAMILIES:
            raise ValueError(f"unknown pattern {self.name!r}; known: {', '.join(_FAMILIES)}")
        if not _finite(self.width) or self.width < 0:
            raise ValueError(f"pattern {self.name}: width must be a finite number >= 0, got {self.width!r}")
        for lo, hi in self.columns:
            if not (_finite(lo) and _finite(hi) and 0 <= lo < hi):
                raise ValueError(f"pattern {self.name}: column range ({lo}, {hi}) must satisfy 0 <= start < end")
        if not _finite(self.sink) or self.sink < 0:
            raise ValueError(f"pattern {self.name}: sink must be a finite number >= 0 of frames, got {self.sink!r}")

    @property
    def token_major(self) -> bool:
        """Whether the head's tokens are permuted to token-major order before attention."""
        return _FAMILIES[self.name][1]

    def to_dict(self) -> dict:
        out: dict = {"name": self.name}
        if self.width:
            out["width"] = self.width
        if self.columns:
            out["columns"] = [list(c) for c in self.columns]
        if self.sink:
            out["sink"] = self.sink
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Pattern:
        unknown = set(data) - {"name", "width", "columns", "sink"}
        if unknown:
            raise ValueError(f"pattern {data.get('name')!r}: unknown parameters {sorted(unknown)}")
        if "name" not in data:
            raise ValueError(f"pattern without a name: {data}")
        columns = tuple((float(lo), float(hi)) for lo, hi in data.get("columns", ()))
        return cls(str(data["name"]), float(data.get("width", 0.0)), columns, float(data.get("sink", 0.0)))

    def __str__(self) -> str:
        args = [f"{self.width:g}"] if self.width else []
        args += [f"{lo:g}-{hi:g}" for lo, hi in self.columns]
        args += [f"sink={self.sink:g}"] if self.sink else []
        return f"{self.name}({', '.join(args)})"


def with_sink(pattern: Pattern, frames: float = 1.0) -> Pattern:
    """``pattern`` plus an attention sink of the first ``frames`` frames' worth of keys in the
    head's own order (``frames=0`` removes it); ``skip`` stays without one."""
    if pattern.name == "skip":
        return pattern
    return replace(pattern, sink=float(frames))


@dataclass(frozen=True)
class Geometry:
    """Block geometry of one layout: what interval builders need."""

    layout: VideoLayout
    block: int

    @property
    def num_q_blocks(self) -> int:
        return num_blocks(self.layout.num_tokens, self.block)

    @property
    def num_kv_blocks(self) -> int:
        return num_blocks(self.layout.kv_len, self.block)

    def centres(self, count: int) -> torch.Tensor:
        """Centre (in sequence positions) of the first ``count`` blocks; the last may be ragged."""
        start = torch.arange(count, dtype=torch.float64) * self.block
        end = torch.clamp(start + self.block, max=self.layout.num_tokens)
        return (start + end - 1) / 2

    def token_blocks(self, start: int, end: int, limit: int) -> tuple[int, int]:
        """Key-block interval covering sequence tokens ``[start, end)``, clipped to ``limit`` blocks."""
        if end <= start:
            return 0, 0
        return min(start // self.block, limit), min(num_blocks(end, self.block), limit)


TIE_SLACK = 1e-6  # tokens: how far past a band's edge a key block's centre may lie and still count as a tie


def band(geometry: Geometry, half_width: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Key blocks whose centre lies within ``half_width`` tokens of the query block's centre, ties included with
    :data:`TIE_SLACK` (a millionth of a token) to spare (a width that is a whole number of tokens on paper, 0.1
    of 30 frames, is one after float rounding too)."""
    cq = geometry.centres(geometry.num_q_blocks)
    ck = geometry.centres(geometry.num_kv_blocks)
    lo = torch.searchsorted(ck, cq - half_width - TIE_SLACK, right=False)
    hi = torch.searchsorted(ck, cq + half_width + TIE_SLACK, right=True)
    return lo[:, None], hi[:, None]


def text_intervals(geometry: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """DESIGN.md text rules: text query blocks visit every key; every query visits the text keys."""
    layout, qb, kb = geometry.layout, geometry.num_q_blocks, geometry.num_kv_blocks
    lo = torch.zeros(qb, 2, dtype=torch.long)
    hi = torch.zeros(qb, 2, dtype=torch.long)
    if layout.text == 0:
        return lo, hi
    valid = layout.text if layout.text_valid is None else layout.text_valid
    lo[:, 0], hi[:, 0] = geometry.token_blocks(layout.text_start, layout.text_start + valid, kb)
    q_lo, q_hi = geometry.token_blocks(layout.text_start, layout.text_start + layout.text, qb)
    hi[q_lo:q_hi, 1] = kb
    return lo, hi


def sink_intervals(geometry: Geometry, frames: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query block visits the key blocks of the first ``frames * S`` video positions
    (of the head's own order: tables of token-major heads count token-major positions)."""
    layout, qb = geometry.layout, geometry.num_q_blocks
    tokens = min(round(frames * layout.frame_tokens), layout.video_tokens)
    lo, hi = geometry.token_blocks(layout.video_start, layout.video_start + tokens, geometry.num_kv_blocks)
    return torch.full((qb, 1), lo, dtype=torch.long), torch.full((qb, 1), hi, dtype=torch.long)


def merge_intervals(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of ``m`` intervals ``[lo, hi)`` per row -> ascending disjoint ranges (starts, ends).

    Shapes [Qb, R] with R the most ranges any row needs; touching ranges are joined, and unused
    slots hold empty ranges (start == end == 0) after the used ones.
    """
    rows, m = lo.shape
    empty = hi <= lo
    lo = torch.where(empty, torch.iinfo(torch.long).max, lo)
    lo, order = torch.sort(lo, dim=1)
    hi = torch.gather(torch.where(empty, -1, hi), 1, order)
    valid = torch.gather(~empty, 1, order)
    covered = torch.cummax(hi, dim=1).values
    previous = torch.cat([torch.full_like(covered[:, :1], -1), covered[:, :-1]], dim=1)
    opens = (lo > previous) & valid  # this interval starts a new range
    group = torch.cumsum(opens, dim=1) - 1
    group = torch.where(valid, group, m)  # empty intervals go to a spare column
    starts = torch.full((rows, m + 1), torch.iinfo(torch.long).max, dtype=torch.long)
    ends = torch.zeros(rows, m + 1, dtype=torch.long)
    starts = starts.scatter_reduce(1, group, torch.where(valid, lo, 0), "amin")
    ends = ends.scatter_reduce(1, group, hi.clamp(min=0), "amax")
    used = torch.arange(m + 1)[None, :] < opens.sum(1, keepdim=True)
    width = max(int(used.sum(1).max()) if rows else 0, 1)
    starts = torch.where(used, starts, 0)[:, :width]
    ends = torch.where(used, ends, 0)[:, :width]
    return starts.to(torch.int32), ends.to(torch.int32)


@lru_cache(maxsize=512)
def head_ranges(pattern: Pattern, layout: VideoLayout, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One head's visited key blocks as ranges: (starts, ends), int32 [Qb, R], on the CPU."""
    geometry = Geometry(layout, block)
    builder, _ = _FAMILIES[pattern.name]
    lo, hi = builder(pattern, geometry)
    if pattern.name != "skip":
        text_lo, text_hi = text_intervals(geometry)
        lo, hi = torch.cat([lo, text_lo], 1), torch.cat([hi, text_hi], 1)
        if pattern.sink:
            sink_lo, sink_hi = sink_intervals(geometry, pattern.sink)
            lo, hi = torch.cat([lo, sink_lo], 1), torch.cat([hi, sink_hi], 1)
    return merge_intervals(lo, hi)
