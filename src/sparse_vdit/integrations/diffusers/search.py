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
from ...plan import Plan
from .api import apply, remove, sparse
from .families import family_of, transformer_of

Sampler = Callable[[Any, int, int], Any]  # (prompt, seed, steps) -> anything; runs one generation

__all__ = ["Sampler", "output_grams", "pipeline_sampler", "run_search", "search"]


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


def run_search(
    searcher: Searcher,
    model: Any,
    sampler: Sampler | None = None,
    *,
    time_dense: bool = False,
    progress: bool = True,
) -> Plan:
    """Run every prompt x seed of ``searcher`` through ``sampler`` with the search installed on
    ``model`` (a pipeline or transformer); the plan.

    ``sampler`` defaults to :func:`pipeline_sampler` for pipelines; ``time_dense`` also times one
    dense generation (``made_by["stats"]["dense_seconds"]``); ``progress`` shows a bar over steps
    and layers.
    """
    from tqdm.auto import tqdm

    sampler = sampler or _default_sampler(model)
    transformer = transformer_of(model)
    s = searcher.settings
    runs = searcher.runs()
    total = len(runs) * searcher.steps * searcher.spec.num_layers
    searcher.bar = tqdm(total=total, desc="search", unit="layer", disable=not progress)
    run_seconds = []
    start = time.perf_counter()
    try:
        apply(model, pattern_source=searcher, backend=s.backend, block_size=s.block_size)
        try:
            for i, (prompt, seed) in enumerate(runs):
                searcher.start_run(i)
                t0 = time.perf_counter()
                sampler(prompt, seed, searcher.steps)
                _sync(transformer)
                run_seconds.append(time.perf_counter() - t0)
        finally:
            remove(model)
    finally:
        searcher.bar.close()
        searcher.bar = None
    seconds = time.perf_counter() - start
    if searcher.layout is None:
        raise RuntimeError("the sampler ran no searched layer call: check steps, warm-up and the sampler")
    dense_seconds = _time_dense(searcher, model, sampler, runs[0]) if time_dense else None
    return searcher.plan(search_seconds=seconds, run_seconds=run_seconds, cost_table_seconds=searcher.cost_seconds,
                         dense_seconds=dense_seconds)  # fmt: skip


def _time_dense(searcher: Searcher, model: Any, sampler: Sampler, run: tuple[Any, int]) -> float:
    """Seconds of one generation with every head dense (our dense path: cuDNN / FA4 dense)."""
    plan = Plan.dense(searcher.spec, block_size=searcher.settings.block_size)
    with sparse(model, plan, backend=searcher.settings.backend):
        t0 = time.perf_counter()
        sampler(run[0], run[1], searcher.steps)
        _sync(transformer_of(model))
        return time.perf_counter() - t0


def _sync(model) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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

    Returns:
        The :class:`~sparse_vdit.Plan`; ``plan.made_by`` holds every setting and ``["stats"]`` the
        search time, density, expected attention speedup and, with several runs, the stability.
    """
    unknown = set(settings) - set(SearchSettings.__dataclass_fields__)
    if unknown:
        raise TypeError(f"search() got unknown settings {sorted(unknown)}")
    config = SearchSettings(mode=mode, epsilon=epsilon, lam=lam,
                            candidates=None if candidates is None else tuple(candidates), **settings)  # fmt: skip
    transformer = transformer_of(model)
    sampler = sampler or _default_sampler(model)
    grams = output_grams(transformer) if config.error == "output" else None
    searcher = Searcher(transformer, prompts, steps=steps, seeds=seeds, settings=config, output_grams=grams)
    return run_search(searcher, model, sampler, time_dense=time_dense, progress=progress)
