"""Search candidates: the sparse patterns a head may take, fixed or fitted to its attention.

A candidate gives, for the rows the search probes, which key blocks each head visits (a bool
``[rows, key blocks]`` mask in the candidate's token order) and, once chosen, the concrete
:class:`~sparse_vdit.patterns.Pattern` of a head. :class:`Fixed` is one pattern for every head;
:class:`MassVertical` picks each head's key columns from the attention mass they received on the
probed rows (vertical stripes "chosen by attention mass"), plus a local band.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import torch

from .. import patterns as _patterns
from ..block_table import num_blocks
from ..layout import VideoLayout
from ..patterns import Pattern, diagonal, multi_diagonal, pattern_names, skip, vertical, with_sink
from ..patterns.table import device_ranges


@dataclass(frozen=True)
class Fixed:
    """One pattern, the same for every head (the paper's modes, or one band width)."""

    pattern: Pattern

    @property
    def key(self) -> str:
        return str(self.pattern)

    @property
    def name(self) -> str:
        return self.pattern.name

    @property
    def token_major(self) -> bool:
        return self.pattern.token_major

    def representative(self, layout: VideoLayout, block: int) -> Pattern:
        """The pattern timed for the cost table."""
        return self.pattern

    def pattern_for(self, mass: torch.Tensor | None, layout: VideoLayout, block: int) -> Pattern:
        return self.pattern


@dataclass(frozen=True)
class MassVertical:
    """Vertical stripes on the ``share`` of video key blocks with the most attention mass, per head.

    The mass is measured on the probed query rows of each call (and summed over calls for the
    plan); ``width`` adds a local band in frames, as in :func:`~sparse_vdit.patterns.vertical`.
    """

    share: float
    width: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ValueError(f"MassVertical.share must lie in (0, 1], got {self.share!r}")
        if not self.width >= 0:
            raise ValueError(f"MassVertical.width must be >= 0, got {self.width!r}")

    name = "vertical"
    token_major = False

    @property
    def key(self) -> str:
        return f"vertical(top {self.share:.0%} by mass, {self.width:g})"

    def columns(self, layout: VideoLayout, block: int) -> int:
        """How many key blocks the stripes take at ``layout``."""
        return max(1, round(self.share * len(video_key_blocks(layout, block))))

    def representative(self, layout: VideoLayout, block: int) -> Pattern:
        """Stripes on the first key blocks of the video: same block count as a fitted head."""
        chosen = torch.zeros(num_key_blocks(layout, block), dtype=torch.bool)
        chosen[video_key_blocks(layout, block)[: self.columns(layout, block)]] = True
        return vertical(block_columns(chosen, layout, block), self.width)

    def pattern_for(self, mass: torch.Tensor, layout: VideoLayout, block: int) -> Pattern:
        """The head's pattern from its mass per key block (frame-major, float [key blocks])."""
        return self.pattern_from(self.select(mass[None], layout, block)[0], layout, block)

    def pattern_from(self, chosen: torch.Tensor, layout: VideoLayout, block: int) -> Pattern:
        """The head's pattern from its chosen key blocks (bool [key blocks])."""
        return vertical(block_columns(chosen, layout, block), self.width)

    def select(self, mass: torch.Tensor, layout: VideoLayout, block: int) -> torch.Tensor:
        """Bool ``[heads, key blocks]``: the top video key blocks of each head's ``mass`` row."""
        video = video_key_blocks(layout, block).to(mass.device)
        top = mass[:, video].topk(self.columns(layout, block), dim=1).indices
        chosen = torch.zeros(mass.shape[0], mass.shape[1], dtype=torch.bool, device=mass.device)
        return chosen.scatter_(1, video[top], True)

    def band(self) -> Pattern:
        """The local band (text rules included) that every head of this candidate keeps."""
        return diagonal(self.width)


Candidate = Fixed | MassVertical


def num_key_blocks(layout: VideoLayout, block: int) -> int:
    """Key blocks of ``layout`` (padded text excluded, as in a block table)."""
    return num_blocks(layout.kv_len, block)


@lru_cache(maxsize=256)
def video_key_blocks(layout: VideoLayout, block: int) -> torch.Tensor:
    """Indices of the key blocks that hold video tokens (long, ascending)."""
    first = layout.video_start // block
    last = min(num_blocks(layout.video_start + layout.video_tokens, block), num_key_blocks(layout, block))
    return torch.arange(first, last)


def block_columns(chosen: torch.Tensor, layout: VideoLayout, block: int) -> tuple[tuple[float, float], ...]:
    """Chosen key blocks (bool ``[key blocks]``) as ``vertical`` column ranges in frames (merged).

    Block ``j`` covers the video tokens ``[j * block, (j + 1) * block)`` clipped to the video;
    the ranges round-trip exactly to the same key blocks at this layout.
    """
    s, v0, v1 = layout.frame_tokens, layout.video_start, layout.video_start + layout.video_tokens
    ranges: list[list[int]] = []
    for j in torch.nonzero(chosen.cpu()).flatten().tolist():
        lo, hi = max(j * block, v0), min((j + 1) * block, v1)
        if lo >= hi:
            continue
        if ranges and ranges[-1][1] == lo:
            ranges[-1][1] = hi
        else:
            ranges.append([lo, hi])
    if not ranges:
        raise ValueError("no video key block chosen for the vertical stripes")
    return tuple(((lo - v0) / s, (hi - v0) / s) for lo, hi in ranges)


def row_mask(pattern: Pattern, layout: VideoLayout, block: int, q_blocks: torch.Tensor) -> torch.Tensor:
    """Bool ``[rows, key blocks]``: key blocks ``pattern`` visits from the query block of each row.

    ``q_blocks`` are the rows' query blocks in the pattern's own order (token-major for
    token-major patterns); the key blocks are in that order too.
    """
    starts, ends = device_ranges(pattern, layout, block, q_blocks.device)
    starts, ends = starts[q_blocks].long(), ends[q_blocks].long()  # [rows, R]
    columns = torch.arange(num_key_blocks(layout, block), device=q_blocks.device)
    inside = (columns[None, None, :] >= starts[..., None]) & (columns[None, None, :] < ends[..., None])
    return inside.any(1)


# --- default candidate sets ---------------------------------------------------------------

DIAGONAL_WIDTHS = (0.25, 0.5, 1.0, 2.0)  # frames each side
MULTI_DIAGONAL_WIDTHS = (0.03, 0.06, 0.12, 0.25)  # fraction of the video, token-major
VERTICAL_SHARES = (0.05, 0.1, 0.2)  # share of the video key blocks kept as stripes
SINK_DIAGONAL_WIDTHS = (0.5, 1.0)  # bands given a first-frame sink (SVG's on Wan) when sinks are searched
SINK_MULTI_DIAGONAL_WIDTHS = (0.06, 0.12)


def paper_candidates() -> tuple[Candidate, ...]:
    """The paper's four sparse modes at this package's default widths (dense is the fallback)."""
    return (Fixed(skip()), Fixed(diagonal()), Fixed(multi_diagonal()), Fixed(vertical()))


def tuned_candidates(sinks: bool = False) -> tuple[Candidate, ...]:
    """Band widths searched, and vertical stripes placed by attention mass; with ``sinks``, also
    bands plus the first frame's worth of keys in the head's own order (:func:`sink_candidates`)."""
    return (
        (Fixed(skip()),)
        + tuple(Fixed(diagonal(w)) for w in DIAGONAL_WIDTHS)
        + tuple(Fixed(multi_diagonal(w)) for w in MULTI_DIAGONAL_WIDTHS)
        + tuple(MassVertical(s) for s in VERTICAL_SHARES)
        + (sink_candidates() if sinks else ())
    )


def sink_candidates(frames: float = 1.0) -> tuple[Candidate, ...]:
    """Bands plus an attention sink of ``frames`` frames (the first frame for frame-major bands, the
    first ``frames * S`` token-major positions for multi-diagonal ones), as SVG runs on Wan."""
    return tuple(Fixed(with_sink(diagonal(w), frames)) for w in SINK_DIAGONAL_WIDTHS) + tuple(
        Fixed(with_sink(multi_diagonal(w), frames)) for w in SINK_MULTI_DIAGONAL_WIDTHS
    )


def as_candidates(items: Iterable[Candidate | Pattern | str]) -> tuple[Candidate, ...]:
    """Candidates from candidates, patterns or pattern names (``dense`` is dropped: it is the fallback)."""
    out: list[Candidate] = []
    for item in items:
        if isinstance(item, str):
            factory = getattr(_patterns, item, None)
            if item not in pattern_names() or not callable(factory):
                raise ValueError(f"unknown candidate pattern {item!r}; known: {', '.join(pattern_names())}")
            item = factory()
        if isinstance(item, Pattern):
            item = Fixed(item)
        if not isinstance(item, (Fixed, MassVertical)):
            raise TypeError(f"a candidate must be a Pattern, a pattern name, Fixed or MassVertical; got {item!r}")
        if item.name == "dense" or any(c.key == item.key for c in out):
            continue
        out.append(item)
    if not out:
        raise ValueError("no sparse candidates to search (dense alone is always the fallback)")
    return tuple(out)


def parse_candidate(text: str) -> Candidate:
    """A candidate from the command line: ``skip``, ``diagonal:0.5``, ``multi_diagonal:0.1``,
    ``vertical`` (the first frame), ``vertical:0.5`` (first frame + band), ``mass:0.1[:width]``;
    a pattern may end in ``+sink`` (the first frame in the head's order) or ``+sink=F`` (F frames)."""
    text, _, sink = text.strip().partition("+")
    if sink:
        if sink != "sink" and not sink.startswith("sink="):
            raise ValueError(f"candidate {text}+{sink}: write PATTERN+sink or PATTERN+sink=FRAMES")
        try:
            frames = float(sink.partition("=")[2] or 1.0)
        except ValueError:
            raise ValueError(f"candidate {text}+{sink}: the sink's frames must be a number") from None
        base = parse_candidate(text)
        if not isinstance(base, Fixed) or base.name == "skip":
            raise ValueError(f"candidate {text}+{sink}: a sink goes on a band or vertical pattern")
        return Fixed(with_sink(base.pattern, frames))
    name, *args = text.split(":")
    try:
        values = [float(a) for a in args]
    except ValueError:
        raise ValueError(f"candidate {text!r}: parameters must be numbers") from None
    if name == "mass":
        if len(values) not in (1, 2):
            raise ValueError(f"candidate {text!r}: write mass:SHARE or mass:SHARE:WIDTH")
        return MassVertical(*values)
    factory = getattr(_patterns, name, None)
    if name not in pattern_names() or not callable(factory) or len(values) > 1:
        raise ValueError(f"candidate {text!r}: write NAME or NAME:WIDTH with NAME one of "
                         f"{', '.join(pattern_names())}, or mass:SHARE[:WIDTH]")  # fmt: skip
    if name == "vertical":
        return Fixed(vertical(width=values[0] if values else 0.0))
    return Fixed(factory(*values))
