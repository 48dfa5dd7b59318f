"""Methods: how a plan comes to be (offline search, online SVG, fixed baselines)."""

from .candidates import Fixed, MassVertical
from .cost import BlockCost, CostTable, FixedCost, MeasuredCost
from .protocol import AttentionCall, Observer, PatternSource, plan_source
from .search import SearchSettings, Searcher
from .svg import SVG, band_widths

__all__ = [
    "SVG", "band_widths", "AttentionCall", "Observer", "PatternSource", "plan_source",
    "BlockCost", "CostTable", "Fixed", "FixedCost", "MassVertical", "MeasuredCost", "SearchSettings", "Searcher",
]  # fmt: skip
