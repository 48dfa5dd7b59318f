"""The Sparse-vDiT offline search driven through a diffusers model: samplers and :func:`search`.

The method lives in :mod:`sparse_vdit.methods.search` (:class:`~sparse_vdit.methods.search.Searcher`,
a pattern source that records losses and builds the plan). This module drives it: it installs the
searcher on the model (:func:`~sparse_vdit.apply` with ``pattern_source=``), runs every prompt x
seed through a sampler with a progress bar, removes it, optionally times one dense generation,
and returns the plan.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ...methods.candidates import Candidate
from ...methods.search import Searcher, SearchSettings
from ...patterns import Pattern
from ...plan import ExpertPlans, Plan
from ...timing import synchronize
from .api import apply, remove, sparse
from .families import family_of, transformer_of

Sampler = Callable[[Any, int, int], Any]  # (prompt, seed, steps) -> anything; runs one generation

__all__ = ["Sampler", "expert_steps", "output_grams", "pipeline_sampler", "run_search", "search", "searchers_for"]


# --- samplers --------------------------------------------------------------------------------


def pipeline_sampler(pipe: Any, **kwargs) -> Sampler:
    """Runs ``pipe(prompt, num_inference_steps=steps, generator=seed, output_type="latent", **kwargs)``.

    A prompt may be a string or a dict of pipeline inputs (e.g. ``prompt_embeds``). The pipeline's
    own progress bar is hidden while it runs.
    """

    def run(prompt, seed: int, steps: int):
        args = dict(kwargs)
        args.update(prompt if isinstance(prompt, Mapping) else {"prompt": prompt})
        args.setdefault("output_type", "latent")
        config = dict(getattr(pipe, "_progress_bar_config", {}))
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        try:
            return pipe(num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(seed), **args)
        finally:
            if hasattr(pipe, "set_progress_bar_config"):
                pipe._progress_bar_config = config

    return run


def _default_sampler(model: Any) -> Sampler:
    if getattr(model, "transformer", None) is not None and callable(model):
        return pipeline_sampler(model)
    raise TypeError(
        f"search got a {type(model).__name__}, not a diffusers pipeline: pass sampler=, e.g. "
        "sparse_vdit.organism_sampler(model) for the organism, or any fn(prompt, seed, steps)"
    )


def output_grams(model: Any) -> list[torch.Tensor]:
    """Per self-attention layer ``[H, D, D]`` float32 (CPU): ``W_h^T W_h`` of each head's columns
    ``W_h`` of the layer's output projection (``to_out[0]``), for ``error="output"``.

    Raises where a layer has no such projection (e.g. HunyuanVideo's single-stream blocks, whose
    attention output is projected together with the MLP's).
    """
    transformer = transformer_of(model)
    heads = transformer.config.num_attention_heads
    grams = []
    for i, module in enumerate(family_of(transformer).attention_modules(transformer)):
        to_out = getattr(module, "to_out", None)
        linear = to_out[0] if isinstance(to_out, torch.nn.ModuleList) else to_out
        weight = getattr(linear, "weight", None)
        if weight is None or weight.shape[1] % heads:
            raise ValueError(f"error='output' needs each self-attention layer's output projection; layer {i} "
                             f"({type(module).__name__}) has none of {heads} heads' width")  # fmt: skip
        w = weight.detach().float().cpu().reshape(weight.shape[0], heads, -1).transpose(0, 1)  # [H, out, D]
        grams.append(w.transpose(1, 2) @ w)
    return grams


# --- driving a searcher ------------------------------------------------------------------------


def expert_steps(pipe: Any, steps: int) -> dict[str, tuple[int, int]] | None:
    """The ``[first, stop)`` steps each expert of a two-expert pipeline runs (Wan2.2 A14B:
    ``transformer`` while ``t >= boundary_ratio * num_train_timesteps``, then ``transformer_2``),
    from the pipeline's scheduler at ``steps`` steps; None for a pipeline of one transformer."""
    import copy

    if getattr(pipe, "transformer_2", None) is None:
        return None
    ratio = getattr(getattr(pipe, "config", None), "boundary_ratio", None)
    if ratio is None:
        raise ValueError("the pipeline has a transformer_2 but no boundary_ratio: cannot tell which expert runs a step")
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps)
    boundary = ratio * scheduler.config.num_train_timesteps
    high = sum(1 for t in scheduler.timesteps.tolist() if t >= boundary)
    return {"transformer": (0, high), "transformer_2": (high, steps)}


def searchers_for(model: Any, prompts, *, steps: int, seeds=(0,), settings: SearchSettings | None = None,
                  error_grams: bool = False) -> Searcher | dict[str, Searcher]:  # fmt: skip
    """A :class:`Searcher` for the model, or one per expert (each on the steps it runs)."""
    spans = expert_steps(model, steps) if not _is_transformer(model) else None
    experts = {"transformer": transformer_of(model)}
    if spans is not None:
        experts["transformer_2"] = getattr(model.transformer_2, "_orig_mod", model.transformer_2)
    searchers = {
        name: Searcher(transformer, prompts, steps=steps, seeds=seeds, settings=settings,
                       output_grams=output_grams(transformer) if error_grams else None,
                       step_range=None if spans is None else spans[name])
        for name, transformer in experts.items()
    }  # fmt: skip
    return searchers if spans is not None else searchers["transformer"]


def _is_transformer(obj: Any) -> bool:
    return getattr(obj, "transformer", None) is None


def run_search(
    searcher: Searcher | Mapping[str, Searcher],
    model: Any,
    sampler: Sampler | None = None,
    *,
    time_dense: bool = False,
    progress: bool = True,
) -> Plan | ExpertPlans:
    """Run every prompt x seed of ``searcher`` through ``sampler`` with the search installed on
    ``model`` (a pipeline or transformer); the plan (an :class:`~sparse_vdit.plan.ExpertPlans`
    for one searcher per expert, :func:`searchers_for`).

    ``sampler`` defaults to :func:`pipeline_sampler` for pipelines; ``time_dense`` also times one
    dense generation (``made_by["stats"]["dense_seconds"]``); ``progress`` shows a bar over steps
    and layers.
    """
    from tqdm.auto import tqdm

    searchers = dict(searcher) if isinstance(searcher, Mapping) else {"transformer": searcher}
    first = next(iter(searchers.values()))
    sampler = sampler or _default_sampler(model)
    transformer = transformer_of(model)
    s = first.settings
    runs = first.runs()
    total = sum(len(runs) * _steps_run(x) * x.spec.num_layers for x in searchers.values())
    bar = tqdm(total=total, desc="search", unit="layer", disable=not progress)
    for x in searchers.values():
        x.bar = bar
    run_seconds = []
    start = time.perf_counter()
    try:
        source = searchers if isinstance(searcher, Mapping) else searcher
        apply(model, pattern_source=source, backend=s.backend, block_size=s.block_size)
        try:
            for i, (prompt, seed) in enumerate(runs):
                for x in searchers.values():
                    x.start_run(i)
                t0 = time.perf_counter()
                sampler(prompt, seed, first.steps)
                _sync(transformer)
                run_seconds.append(time.perf_counter() - t0)
        finally:
            remove(model)
    finally:
        bar.close()
        for x in searchers.values():
            x.bar = None
    seconds = time.perf_counter() - start
    dense_seconds = _time_dense(first, model, sampler, runs[0]) if time_dense else None
    plans = {}
    for name, x in searchers.items():
        if x.layout is None and x.step_range is not None and x.step_range[0] >= x.step_range[1]:
            plans[name] = Plan.dense(x.spec, block_size=s.block_size)  # an expert this step count never runs
            continue
        if x.layout is None:
            raise RuntimeError(f"the sampler ran no searched layer call of {name}: check steps, warm-up and the sampler")
        cost = x.cost_seconds
        plans[name] = x.plan(search_seconds=seconds, run_seconds=run_seconds, cost_table_seconds=cost,
                             dense_seconds=dense_seconds)  # fmt: skip
    return ExpertPlans(plans) if isinstance(searcher, Mapping) else plans["transformer"]


def _steps_run(searcher: Searcher) -> int:
    first, stop = searcher.step_range or (0, searcher.steps)
    return max(stop - first, 0)


def _time_dense(searcher: Searcher, model: Any, sampler: Sampler, run: tuple[Any, int]) -> float:
    """Seconds of one generation with every head dense (our dense path: cuDNN / FA4 dense)."""
    plan = Plan.dense(searcher.spec, block_size=searcher.settings.block_size)
    with sparse(model, plan, backend=searcher.settings.backend):
        t0 = time.perf_counter()
        sampler(run[0], run[1], searcher.steps)
        _sync(transformer_of(model))
        return time.perf_counter() - t0


def _sync(model) -> None:
    synchronize(next(model.parameters()).device)


# --- the public function -----------------------------------------------------------------------


def search(
    model: Any,
    prompts: Sequence[Any] | str,
    *,
    steps: int,
    epsilon: float | None = None,
    lam: float | None = None,
    candidates: Sequence[Candidate | Pattern | str] | None = None,
    mode: str = "ours",
    seeds: Sequence[int] = (0,),
    sampler: Sampler | None = None,
    time_dense: bool = False,
    progress: bool = True,
    **settings,
) -> Plan:
    """Find a plan by the Sparse-vDiT offline search in real sampling passes.

    Args:
        model: a diffusers pipeline (Wan, HunyuanVideo, CogVideoX), or its transformer with ``sampler``.
        prompts: prompts (strings, or dicts of pipeline inputs); each is run with every seed.
        steps: denoising steps of each run (the plan's step ranges refer to them).
        epsilon, lam: a head takes its lowest ``error + lam * cost`` candidate if under ``epsilon``,
            else dense. Defaults: 1.0, 0.5 (the paper) for absolute errors, 0.01, 0.01 for relative.
        candidates: sparse patterns to try (patterns, names, or
            :class:`~sparse_vdit.methods.candidates.MassVertical`); dense is always the fallback.
            Default: the paper's four modes, or our tuned set (``tune=True``).
        mode: ``"paper"`` (absolute MSE on whole outputs, four fixed modes, block-count cost, one
            step range, one prompt) or ``"ours"``; see :class:`SearchSettings` for each switch.
        seeds: seeds of the runs.
        sampler: ``fn(prompt, seed, steps)`` running one generation through ``model``'s transformer
            (default for pipelines: :func:`pipeline_sampler`).
        time_dense: also time one dense generation (our dense kernels) for the search-cost ratio.
        progress: a progress bar over steps and layers.
        **settings: :class:`SearchSettings` fields (``error``: ``"output"`` weighs each head by what
            it adds to the layer's output, read from the model's output projections, so heads that
            add little can be skipped; ``estimate``, ``sample_blocks``,
            ``tune``, ``cost``, ``warmup_steps``, ``warmup_layers``, ``buckets``, ``block_size``, ``backend``).

    A pipeline with two experts (Wan2.2 A14B) is searched with one searcher per expert, each on
    the steps it runs (from the pipeline's ``boundary_ratio``); the result is then an
    :class:`~sparse_vdit.plan.ExpertPlans`.

    Returns:
        The :class:`~sparse_vdit.Plan`; ``plan.made_by`` holds every setting and ``["stats"]`` the
        search time, density, expected attention speedup and, with several runs, the stability.
    """
    unknown = set(settings) - set(SearchSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"search() got unknown settings {sorted(unknown)}")
    config = SearchSettings(mode=mode, epsilon=epsilon, lam=lam,
                            candidates=None if candidates is None else tuple(candidates), **settings)  # fmt: skip
    sampler = sampler or _default_sampler(model)
    searcher = searchers_for(model, prompts, steps=steps, seeds=seeds, settings=config,
                             error_grams=config.error == "output")  # fmt: skip
    return run_search(searcher, model, sampler, time_dense=time_dense, progress=progress)
