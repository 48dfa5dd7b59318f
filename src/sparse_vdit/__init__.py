"""sparse-vdit: per-head sparse attention for video diffusion transformers."""

from ._version import __version__
from .kernels import sparse_attention
from .layout import VideoLayout
from .patterns import BlockTable, Pattern, compile_layer
from .plan import ExpertPlans, ModelSpec, Plan, PlanError, load_plans
from .integrations.diffusers import apply, enable_context_parallel, model_spec, pipeline_sampler, remove, sparse
from .integrations.diffusers.search import search
from .compare import organism_sampler


def clear_caches() -> None:
    """Drop every compiled block table, everything derived from tables (index lists, backend
    masks, work orders, copies on other devices) and the per-layout caches; all are rebuilt on use."""
    from . import layout, methods
    from .patterns.table import clear_compiled

    clear_compiled()
    methods.clear_caches()
    layout._orders.cache_clear()


__all__ = [
    "clear_caches",
    "BlockTable",
    "ExpertPlans",
    "ModelSpec",
    "Pattern",
    "Plan",
    "PlanError",
    "VideoLayout",
    "apply",
    "compile_layer",
    "enable_context_parallel",
    "load_plans",
    "model_spec",
    "organism_sampler",
    "pipeline_sampler",
    "remove",
    "search",
    "sparse",
    "sparse_attention",
    "__version__",
]
