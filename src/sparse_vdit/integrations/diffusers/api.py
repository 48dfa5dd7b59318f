"""``apply`` / ``remove`` / ``sparse``: install and undo sparse attention on a diffusers model."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...block_table import DEFAULT_BLOCK, valid_block_size
from ...kernels import registry
from ...plan import Plan
from .families import family_of, transformer_of
from ...methods.protocol import PatternSource
from .parallel import check_supported
from .processor import SparseAttnProcessor, SparseState
from .steps import install_step_hook, wrap_scheduler

logger = logging.getLogger("sparse_vdit")

STATE_ATTR = "_sparse_vdit_state"


def apply(
    pipe_or_transformer: Any,
    plan: Plan | str | Path | None = None,
    *,
    method: str | None = None,
    backend: str = "auto",
    pattern_source: PatternSource | None = None,
    block_size: int | None = None,
    **options: Any,
) -> SparseState:
    """Make a diffusers pipeline's (or transformer's) self-attention sparse according to ``plan``.

    Supports ``WanTransformer3DModel`` (``attn1``), ``HunyuanVideoTransformer3DModel`` (dual- and
    single-stream joint attention) and ``CogVideoXTransformer3DModel`` (joint attention);
    cross-attention is untouched. Everything is validated before anything is installed.

    Args:
        pipe_or_transformer: a pipeline with a ``transformer`` attribute, or the transformer.
        plan: a :class:`~sparse_vdit.plan.Plan` or the path of a plan file; it must fit the model.
        method: ``"svg"`` for Sparse VideoGen, decided online every step instead of a plan
            (:class:`~sparse_vdit.methods.svg.SVG`); ``options`` go to it: ``density=0.3``,
            ``warmup_steps`` (default 25% of the scheduler's steps), ``warmup_layers=1``,
            ``sampled_rows=64``, ``record=False``, ``error``, ``seed``. The source is
            ``state.svg`` (``state.svg.to_plan()`` after a generation with ``record=True``).
        backend: kernel for sparse layers (``"auto"``, ``"fa4"``, ``"triton"``, ``"flex"``,
            ``"reference"``); dense layers and steps always run the fastest dense kernel.
        pattern_source: decides the patterns per call instead of the plan (online methods, search);
            see :class:`~sparse_vdit.methods.protocol.AttentionCall`.
        block_size: block size of the tables (default: the plan's, else 128).

    Composes with diffusers' context parallelism (Ulysses or ring; ``enable_parallelism`` for Wan,
    :func:`~sparse_vdit.enable_context_parallel` for every family; before or after ``apply``): each
    rank exchanges q/k/v to the full sequence and its ``heads / degree`` heads, runs the plan's
    patterns of its global heads in one launch per layer, and exchanges back (``parallel.py``).
    Head counts the degree does not divide raise.

    Returns:
        The shared :class:`SparseState` (current step, timings, hook points).

    Example::

        state = sparse_vdit.apply(pipe, Plan.load("plan.json"))
        video = pipe(prompt="...").frames[0]
        sparse_vdit.remove(pipe)

        state = sparse_vdit.apply(pipe, method="svg", density=0.25, record=True)
    """
    model = transformer_of(pipe_or_transformer)
    family = family_of(model)
    spec = family.spec(model)
    if getattr(model, STATE_ATTR, None) is not None:
        raise RuntimeError("sparse-vdit is already applied to this model; call sparse_vdit.remove() first")
    svg = _method_source(method, options, plan, pattern_source, block_size)
    pattern_source = svg if svg is not None else pattern_source
    if isinstance(plan, (str, Path)):
        plan = Plan.load(plan)
    if plan is None and pattern_source is None:
        raise ValueError("sparse_vdit.apply needs a plan (or a pattern_source)")
    if plan is not None:
        if not isinstance(plan, Plan):
            raise TypeError(f"plan must be a Plan or a path to a plan file, got {type(plan).__name__}")
        plan.check(spec)
    if backend not in registry.backends():
        raise ValueError(f"unknown backend {backend!r}; choose one of {registry.backends()}")
    if block_size is not None and not valid_block_size(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    modules = family.attention_modules(model)
    for i, module in enumerate(modules):
        processor = module.processor
        name = type(processor).__name__
        if name not in family.processor_classes:
            raise RuntimeError(
                f"layer {i} uses attention processor {name}, not diffusers' {' / '.join(family.processor_classes)}; "
                "sparse-vdit replaces only the stock processors (reset them with set_default_attn_processor "
                "or remove the other patch first)"
            )
    parallel = getattr(model, "_parallel_config", None)  # diffusers records enable_parallelism's config here
    if getattr(parallel, "context_parallel_config", None) is None:
        parallel = None
    else:
        check_supported(model, family, parallel.context_parallel_config)  # raises for odd heads, uneven shards
    if getattr(pipe_or_transformer, "transformer_2", None) is not None:
        logger.warning("sparse-vdit: only pipe.transformer is patched, not pipe.transformer_2")

    state = SparseState(family, spec, plan=plan, pattern_source=pattern_source, backend=backend, block_size=block_size)
    originals = [module.processor for module in modules]
    hook = install_step_hook(model, family, state.steps)
    undo_scheduler = wrap_scheduler(pipe_or_transformer, state.steps) if model is not pipe_or_transformer else None
    for i, module in enumerate(modules):
        processor = SparseAttnProcessor(family, i, state, originals[i])
        if parallel is not None and processor._parallel_config is None:  # stock processors without the slot
            processor._parallel_config = parallel
        module.set_processor(processor)
    state._installed = (model, modules, originals, hook, undo_scheduler)
    state.svg = svg
    if svg is not None:
        svg.spec = spec
        if svg.num_steps is None:  # the scheduler's step count, once a pipeline has set it
            svg.num_steps = lambda: state.steps.num_steps
    setattr(model, STATE_ATTR, state)
    return state


def _method_source(method, options: dict, plan, pattern_source, block_size):
    """The pattern source of an online ``method`` (None without one); checks the arguments."""
    if method is None or method == "plan":
        if options:
            raise TypeError(f"sparse_vdit.apply got unexpected arguments {sorted(options)} "
                            "(method options need method='svg')")  # fmt: skip
        return None
    if method != "svg":
        raise ValueError(f"unknown method {method!r}; choose 'plan' (the default) or 'svg'")
    if plan is not None or pattern_source is not None:
        raise ValueError("method='svg' decides the patterns itself: give no plan or pattern_source")
    from ...methods.svg import SVG

    try:
        return SVG(**options, block_size=block_size or DEFAULT_BLOCK)
    except TypeError as err:
        raise TypeError(f"sparse_vdit.apply(method='svg'): {err}") from None


def state_of(pipe_or_transformer: Any) -> SparseState | None:
    """The :class:`SparseState` applied to a pipeline or transformer, or None."""
    return getattr(transformer_of(pipe_or_transformer), STATE_ATTR, None)


def remove(pipe_or_transformer: Any) -> None:
    """Undo :func:`apply`: the exact original processor objects, no hooks left."""
    model = transformer_of(pipe_or_transformer)
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        raise RuntimeError("sparse-vdit is not applied to this model")
    _, modules, originals, hook, undo_scheduler = state._installed
    for module, original in zip(modules, originals):
        module.set_processor(original)
    hook.remove()
    if undo_scheduler is not None:
        undo_scheduler()
    delattr(model, STATE_ATTR)


@contextmanager
def sparse(pipe_or_transformer: Any, plan: Plan | str | Path | None = None, **kwargs):
    """``with sparse_vdit.sparse(pipe, plan): ...``: :func:`apply` on entry, :func:`remove` on exit."""
    state = apply(pipe_or_transformer, plan, **kwargs)
    try:
        yield state
    finally:
        remove(pipe_or_transformer)
