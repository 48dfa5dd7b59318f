"""Sparse self-attention for diffusers video transformers (Wan, HunyuanVideo, CogVideoX).

Importing this package does not import diffusers; models are recognised by class name.
"""

from .api import apply, remove, sparse, state_of
from .families import FAMILIES, Family, family_of, model_spec
from .parallel import context_parallel_plan, enable_context_parallel
from .processor import AttentionCall, SparseAttnProcessor, SparseState, plan_source
from .search import pipeline_sampler, run_search
from .steps import StepTracker

__all__ = [
    "FAMILIES",
    "AttentionCall",
    "Family",
    "SparseAttnProcessor",
    "SparseState",
    "StepTracker",
    "apply",
    "context_parallel_plan",
    "enable_context_parallel",
    "family_of",
    "model_spec",
    "pipeline_sampler",
    "plan_source",
    "remove",
    "run_search",
    "sparse",
    "state_of",
]
