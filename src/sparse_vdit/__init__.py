"""sparse-vdit: per-head sparse attention for video diffusion transformers."""

from ._version import __version__
from .kernels import sparse_attention
from .layout import VideoLayout
from .patterns import BlockTable, Pattern, compile_layer
from .plan import ModelSpec, Plan, PlanError
from .integrations.diffusers import apply, model_spec, pipeline_sampler, remove, sparse
from .integrations.diffusers.search import search
from .compare import organism_sampler

__all__ = [
    "BlockTable",
    "ModelSpec",
    "Pattern",
    "Plan",
    "PlanError",
    "VideoLayout",
    "apply",
    "compile_layer",
    "model_spec",
    "organism_sampler",
    "pipeline_sampler",
    "remove",
    "search",
    "sparse",
    "sparse_attention",
    "__version__",
]
