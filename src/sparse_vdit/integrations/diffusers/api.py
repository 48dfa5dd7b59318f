"""``apply`` / ``remove`` / ``sparse``: install and undo sparse attention on a diffusers model."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from ...block_table import DEFAULT_BLOCK, valid_block_size
from ...kernels import registry
from ...plan import EXPERT_COMPONENTS, ExpertPlans, Plan, PlanError, load_plans
from .families import family_of, set_processor, transformer_of
from ...methods.protocol import PatternSource
from .parallel import check_supported
from .processor import SparseAttnProcessor, SparseState
from .steps import STATE_ATTR, install_step_hook, remove_step_hook, wrap_scheduler

logger = logging.getLogger("sparse_vdit")


def apply(
    pipe_or_transformer: Any,
    plan: Plan | ExpertPlans | str | Path | None = None,
    *,
    method: str | None = None,
    backend: str = "auto",
    pattern_source: PatternSource | Mapping[str, PatternSource] | None = None,
    block_size: int | None = None,
    **options: Any,
) -> SparseState:
    """Make a diffusers pipeline's (or transformer's) self-attention sparse according to ``plan``.

    Supports the models of :data:`~sparse_vdit.integrations.diffusers.families.FAMILIES` (README's
    table); cross-attention is untouched. Everything is validated before anything is installed.
    A pipeline with two experts (Wan2.2 A14B: ``transformer``, ``transformer_2``) gets both patched;
    they count one step sequence, so a plan's steps are the pipeline's.

    Args:
        pipe_or_transformer: a pipeline with a ``transformer`` attribute, or the transformer.
        plan: a :class:`~sparse_vdit.plan.Plan` (for every expert it fits), an
            :class:`~sparse_vdit.plan.ExpertPlans` (one plan per component name), or the path of
            a plan file of either kind; it must fit the model.
        method: ``"svg"`` for Sparse VideoGen, decided online every step instead of a plan
            (:class:`~sparse_vdit.methods.svg.SVG`); ``options`` go to it: ``density=0.3``,
            ``warmup_steps`` (default 25% of the scheduler's steps), ``warmup_layers=1``,
            ``sampled_rows=64``, ``record=False``, ``error``, ``seed``. The source is
            ``state.svg`` (``state.svg.to_plan()`` after a generation with ``record=True``).
        backend: kernel for sparse layers (``"auto"``, ``"fa4"``, ``"triton"``, ``"flex"``,
            ``"reference"``); dense layers and steps always run the fastest dense kernel.
        pattern_source: decides the patterns per call instead of the plan (online methods, search);
            see :class:`~sparse_vdit.methods.protocol.AttentionCall`; or one per component name.
        block_size: block size of the tables (default: the plan's, else 128).

    Composes with diffusers' context parallelism (Ulysses or ring; ``enable_parallelism`` for Wan,
    :func:`~sparse_vdit.enable_context_parallel` for every family; before or after ``apply``): each
    rank exchanges q/k/v to the full sequence and its ``heads / degree`` heads, runs the plan's
    patterns of its global heads in one launch per layer, and exchanges back (``parallel.py``).
    Head counts the degree does not divide raise.

    Returns:
        The :class:`SparseState` of ``transformer`` (current step, timings, hook points);
        ``state.experts`` maps each component name to its state.

    Example::

        state = sparse_vdit.apply(pipe, Plan.load("plan.json"))
        video = pipe(prompt="...").frames[0]
        sparse_vdit.remove(pipe)

        state = sparse_vdit.apply(pipe, method="svg", density=0.25, record=True)
    """
    experts = experts_of(pipe_or_transformer)
    for name, model in experts.items():
        if getattr(model, STATE_ATTR, None) is not None:
            raise RuntimeError(f"sparse-vdit is already applied to {name}; call sparse_vdit.remove() first")
    if isinstance(plan, (str, Path)):
        plan = load_plans(plan)
    plans = _plans_per_expert(plan, experts)
    sources = _sources_per_expert(pattern_source, experts)
    checked = {name: _check(model, plans[name], sources[name], method, options, backend, block_size)
               for name, model in experts.items()}  # fmt: skip

    states: dict[str, SparseState] = {}
    for name, model in experts.items():
        family, spec, parallel, svg = checked[name]
        source = svg if svg is not None else sources[name]
        state = SparseState(family, spec, plan=plans[name], pattern_source=source, backend=backend, block_size=block_size)
        if states:  # the experts of one pipeline count one step sequence (Wan2.2: transformer, then transformer_2)
            state.steps = next(iter(states.values())).steps
        state.component, state.svg, state._undo_scheduler = name, svg, None
        setattr(model, STATE_ATTR, state)
        install_step_hook(model)
        for i, module in enumerate(family.attention_modules(model)):
            processor = SparseAttnProcessor(family, i, state, module.processor)
            if parallel is not None and processor._parallel_config is None:  # stock processors without the slot
                processor._parallel_config = parallel
            set_processor(module, processor)
        if svg is not None:
            svg.spec = spec
            if svg.num_steps is None:  # the scheduler's step count, once a pipeline has set it
                svg.num_steps = state.steps.scheduler_steps
        states[name] = state
    first = next(iter(states.values()))
    if not _is_transformer(pipe_or_transformer):
        first._undo_scheduler = wrap_scheduler(pipe_or_transformer, first.steps)
    for state in states.values():
        state.experts = states
    return first


def _is_transformer(obj: Any) -> bool:
    return getattr(obj, "transformer", None) is None


def experts_of(pipe_or_transformer: Any) -> dict[str, Any]:
    """The denoising transformers of a pipeline by component name (``transformer``, and Wan2.2's
    ``transformer_2``), or ``{"transformer": model}`` for a transformer."""
    experts = {"transformer": transformer_of(pipe_or_transformer)}
    if not _is_transformer(pipe_or_transformer):
        for name in EXPERT_COMPONENTS[1:]:
            model = getattr(pipe_or_transformer, name, None)
            if model is not None:
                experts[name] = getattr(model, "_orig_mod", model)
    return experts


def _plans_per_expert(plan, experts: dict) -> dict[str, Plan | None]:
    """One plan (or None) per expert: an :class:`ExpertPlans` by name, a single plan for every expert."""
    if isinstance(plan, ExpertPlans):
        missing, extra = set(experts) - set(plan), set(plan) - set(experts)
        if missing or extra:
            raise PlanError(f"the plans are for {', '.join(sorted(plan))}, but the model's denoising transformers "
                            f"are {', '.join(experts)}")  # fmt: skip
        return {name: plan[name] for name in experts}
    if plan is not None and not isinstance(plan, Plan):
        raise TypeError(f"plan must be a Plan, ExpertPlans or a path to a plan file, got {type(plan).__name__}")
    return dict.fromkeys(experts, plan)


def _sources_per_expert(source, experts: dict) -> dict[str, PatternSource | None]:
    if isinstance(source, Mapping):
        if set(source) != set(experts):
            raise ValueError(f"pattern sources for {', '.join(sorted(source))}, but the model's denoising "
                             f"transformers are {', '.join(experts)}")  # fmt: skip
        return dict(source)
    return dict.fromkeys(experts, source)


def _check(model, plan, pattern_source, method, options, backend, block_size):
    """Everything about one transformer that can be refused, before anything is installed:
    ``(family, spec, parallel config, svg source)``."""
    family = family_of(model)
    spec = family.spec(model)
    svg = _method_source(method, dict(options), plan, pattern_source, block_size)
    if plan is None and pattern_source is None and svg is None:
        raise ValueError("sparse_vdit.apply needs a plan (or a pattern_source)")
    if plan is not None:
        plan.check(spec)
    if backend not in registry.backends():
        raise ValueError(f"unknown backend {backend!r}; choose one of {registry.backends()}")
    if block_size is not None and not valid_block_size(block_size):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size!r}")
    family.check_model(model)  # shapes the kernels cannot take, attention without a 3D token grid
    for i, module in enumerate(family.attention_modules(model)):
        name = type(module.processor).__name__
        if name not in family.processor_classes:
            stock = family.processor_classes[0]
            reset = (f"model.set_attn_processor({stock}())" if hasattr(model, "set_attn_processor")
                     else f"module.processor = {stock}() on each self-attention module")  # fmt: skip
            raise RuntimeError(
                f"layer {i} uses attention processor {name}, not diffusers' {' / '.join(family.processor_classes)}; "
                f"sparse-vdit replaces only the stock processors: reset them first, e.g. {reset} with {stock} "
                f"from {family.processor_module}, or remove the other patch"
            )
    parallel = getattr(model, "_parallel_config", None)  # diffusers records enable_parallelism's config here
    if getattr(parallel, "context_parallel_config", None) is None:
        parallel = None
    else:
        check_supported(model, family, parallel.context_parallel_config)  # raises for odd heads, uneven shards
    return family, spec, parallel, svg


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
    """The :class:`SparseState` applied to a pipeline's ``transformer`` (or a transformer), or None;
    ``state.experts`` holds every patched expert's state by component name."""
    return getattr(transformer_of(pipe_or_transformer), STATE_ATTR, None)


def remove(pipe_or_transformer: Any) -> None:
    """Undo :func:`apply` on every patched expert: the stock processors back (the ones installed at
    ``apply``, or the stock ones set since), no hooks left. Processors of other libraries set after
    ``apply`` stay."""
    experts = {name: m for name, m in experts_of(pipe_or_transformer).items() if getattr(m, STATE_ATTR, None)}
    if not experts:
        raise RuntimeError("sparse-vdit is not applied to this model")
    for model in experts.values():
        state = getattr(model, STATE_ATTR)
        for module in state.family.attention_modules(model):
            processor = module.processor
            if isinstance(processor, SparseAttnProcessor) and processor.state is state:
                set_processor(module, processor.original)
        remove_step_hook(model)
        if state._undo_scheduler is not None:
            state._undo_scheduler()
        delattr(model, STATE_ATTR)


@contextmanager
def sparse(pipe_or_transformer: Any, plan: Plan | str | Path | None = None, **kwargs):
    """``with sparse_vdit.sparse(pipe, plan): ...``: :func:`apply` on entry, :func:`remove` on exit."""
    state = apply(pipe_or_transformer, plan, **kwargs)
    try:
        yield state
    finally:
        remove(pipe_or_transformer)
