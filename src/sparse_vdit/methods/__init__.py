"""Methods: how a plan comes to be (offline search, online SVG and top-p, the hybrid, fixed baselines)."""

from . import candidates as _candidates
from . import estimate as _estimate
from . import online as _online
from . import svg as _svg
from . import svg_profile as _svg_profile
from .candidates import Fixed, MassVertical
from .cost import BlockCost, CostTable, FixedCost, MeasuredCost
from .online import Hybrid, TopP
from .oracle import MassRecorder, PerCallOracle, StaticOracle
from .protocol import AttentionCall, Observer, PatternSource, plan_source
from .search import SearchSettings, Searcher
from .svg import SVG, band_widths

__all__ = [
    "SVG", "band_widths", "AttentionCall", "Observer", "PatternSource", "plan_source",
    "BlockCost", "CostTable", "Fixed", "FixedCost", "MassVertical", "MeasuredCost", "SearchSettings", "Searcher",
    "MassRecorder", "PerCallOracle", "StaticOracle", "Hybrid", "TopP",
]  # fmt: skip


def clear_caches() -> None:
    """Forget the methods' per-layout caches (band widths, SVG candidates, key-block lists, row masks)."""
    for cached in (_svg.band_widths, _svg._candidates, _svg._profile, _svg_profile._key_blocks,
                   _svg_profile.position_ranges, _candidates.video_key_blocks, _estimate._all_rows_mask,
                   _online.forced_blocks, _online.max_runs):
        cached.cache_clear()
