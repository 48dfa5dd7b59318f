"""Patterns: per-head rules that become block tables (see DESIGN.md, "Pattern definitions")."""

from .band import diagonal, multi_diagonal, spatial, temporal
from ..block_table import expand_ranges
from .base import Pattern, head_ranges, pattern_names, with_sink
from .choice import HeadChoice
from .draw import draw_pattern, draw_table
from .fixed import dense, skip
from .table import DEFAULT_BLOCK, BlockTable, compile_layer
from .vertical import vertical

__all__ = [
    "DEFAULT_BLOCK",
    "BlockTable",
    "HeadChoice",
    "Pattern",
    "compile_layer",
    "dense",
    "diagonal",
    "draw_pattern",
    "draw_table",
    "expand_ranges",
    "head_ranges",
    "multi_diagonal",
    "pattern_names",
    "skip",
    "spatial",
    "temporal",
    "vertical",
    "with_sink",
]
