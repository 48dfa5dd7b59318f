"""Sparse-vDiT offline search: one pattern per (step range, layer, head), found in real sampling passes.

This module is the method: :class:`Searcher` is a pattern source and drives nothing. The driver,
:func:`sparse_vdit.search` (in the diffusers integration), installs it on the model
(:func:`sparse_vdit.apply`), runs the sampler on every prompt x seed and asks it for the plan
(:meth:`Searcher.plan`). At every layer call after the warm-up it scores each candidate per head,
``loss = error(O_candidate, O_dense) + lam * cost``, gives each head its lowest-loss candidate if
that loss is under ``epsilon`` (and, where dense competes, under dense's own loss ``lam * 1``;
else dense), and returns those patterns: the layer computes with them, so the next layer sees the
sparse output and errors propagate as at inference (greedy, layer by layer, as in the paper).
Losses are summed per (step bucket, layer) over all calls, prompts and seeds; the plan takes, per
head, the lowest mean loss under the same rule, and places fitted stripes from the attention mass
summed over those calls (per call they are placed and scored on the same sampled rows, so their
per-call error is a little optimistic).

``mode="paper"`` is the paper's setting; every one of our changes has its own switch
(:class:`SearchSettings`). Costs: with the sampled estimate a layer call costs the exact attention
of a few query blocks (in two key orders) plus the chosen sparse layer, so a search run costs
about one generation; with whole outputs it costs dense + one launch per candidate + the choice.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .._version import __version__
from ..block_table import DEFAULT_BLOCK, num_blocks
from ..layout import VideoLayout
from ..patterns import Pattern, dense
from ..plan import Plan, StepRange, as_spec
from .candidates import MassVertical, as_candidates, num_key_blocks, paper_candidates, tuned_candidates
from ..timing import device_name
from .cost import MeasuredCost, Shape, as_cost_model
from .estimate import block_rows, default_sample_blocks, output_errors, probe, sample_query_blocks

MODES = ("ours", "paper")
ERRORS = ("relative", "absolute", "output")
ESTIMATES = ("sampled", "full")
# (epsilon, lambda) defaults per error kind: the paper's for its absolute MSE; ours for the
# relative MSE (squared relative RMS error of the head's output, 1.0 for a skipped head). On the
# organism (BENCHMARKS.md, fidelity) epsilon = lambda = 0.01 kept 21.5 dB, 0.003 26.8 dB, 0.05 17 dB.
# "output": a head's squared error in what it adds to the layer's output (through the output
# projection, when the driver gives its weights), relative to the layer's mean head: on the same
# scale as "relative" when every head contributes alike, but a head that adds little costs little
# to skip (skipping head h costs H x its share of the layer's output energy), so skips become possible.
DEFAULTS = {"absolute": (1.0, 0.5), "relative": (0.01, 0.01), "output": (0.01, 0.01)}


@dataclass(frozen=True)
class SearchSettings:
    """Everything that decides a search; ``None`` fields take the ``mode``'s default.

    =================  ===========================  ==========================================
    setting            ``mode="paper"``             ``mode="ours"``
    =================  ===========================  ==========================================
    error              ``absolute`` MSE             ``relative`` MSE per head (scale-free);
                                                    ``output``: through the output projection,
                                                    relative to the layer's mean head (skips)
    estimate           ``full`` outputs             ``sampled`` query blocks (``sample_blocks``: 8,
                                                    at most 1/8 of them, at least 2)
    tune               False: 4 fixed sparse modes  True: band widths, stripes by attention mass
    cost               ``blocks`` (1 - sparsity)    ``auto``: measured on CUDA, else blocks
    dense_competes     False                        True: a sparse pick must also beat dense's
                                                    own loss ``lam * 1`` (never slower than dense)
    buckets            1 step range                 2 step ranges after the warm-up
    warmup_steps       0                            10% of the steps, dense
    epsilon, lam       1.0, 0.5                     0.01, 0.01 (relative error), else 1.0, 0.5
    runs               one prompt, one seed         every prompt x seed, stability reported
    =================  ===========================  ==========================================
    """

    mode: str = "ours"
    epsilon: float | None = None
    lam: float | None = None
    error: str | None = None
    estimate: str | None = None
    sample_blocks: int | None = None
    tune: bool | None = None
    candidates: tuple | None = None
    cost: Any = None
    dense_competes: bool | None = None
    warmup_steps: int | None = None
    warmup_layers: int = 0
    buckets: int | None = None
    block_size: int = DEFAULT_BLOCK
    backend: str = "auto"

    def resolve(self, steps: int, device: torch.device) -> SearchSettings:
        """A copy with every ``None`` filled in and every value checked."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        paper = self.mode == "paper"
        error = self.error or ("absolute" if paper else "relative")
        estimate = self.estimate or ("full" if paper else "sampled")
        if error not in ERRORS:
            raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
        if estimate not in ESTIMATES:
            raise ValueError(f"estimate must be one of {ESTIMATES}, got {estimate!r}")
        epsilon, lam = DEFAULTS[error]
        epsilon = epsilon if self.epsilon is None else float(self.epsilon)
        lam = lam if self.lam is None else float(self.lam)
        if not epsilon >= 0 or not lam >= 0:
            raise ValueError(f"epsilon and lam must be >= 0, got {epsilon!r} and {lam!r}")
        tune = (not paper) if self.tune is None else bool(self.tune)
        competes = (not paper) if self.dense_competes is None else bool(self.dense_competes)
        if self.candidates is not None:
            candidates = as_candidates(self.candidates)
        else:
            candidates = tuned_candidates() if tune else paper_candidates()
        cost = self.cost if self.cost is not None else ("blocks" if paper else "auto")
        if cost == "auto":
            cost = "measure" if device.type == "cuda" else "blocks"
        warmup = self.warmup_steps if self.warmup_steps is not None else (0 if paper else round(0.1 * steps))
        buckets = self.buckets if self.buckets is not None else (1 if paper else 2)
        checks = (
            ("steps", steps, 1),
            ("warmup_steps", warmup, 0),
            ("warmup_layers", self.warmup_layers, 0),
            ("buckets", buckets, 1),
            ("sample_blocks", 1 if self.sample_blocks is None else self.sample_blocks, 1),
        )
        for name, value, low in checks:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if warmup >= steps:
            raise ValueError(f"warmup_steps={warmup} leaves none of the {steps} steps to search")
        return replace(self, epsilon=epsilon, lam=lam, error=error, estimate=estimate, tune=tune, candidates=candidates,
                       cost=cost, dense_competes=competes, warmup_steps=warmup, buckets=buckets)  # fmt: skip

    def bucket_starts(self, steps: int, step_range: tuple[int, int] | None = None) -> list[int]:
        """First step of each step bucket (the first is the end of the warm-up); with
        ``step_range`` (an expert's ``[first, stop)`` steps), the buckets split those steps."""
        first, stop = (0, steps) if step_range is None else step_range
        first = max(first, self.warmup_steps)
        span = max(stop - first, 1)
        starts = [first + (i * span) // self.buckets for i in range(self.buckets)]
        return sorted(set(starts))

    def describe(self) -> dict:
        """JSON-ready settings for the plan's ``made_by``."""
        out = {name: getattr(self, name) for name in self.__dataclass_fields__}
        out["candidates"] = [c.key for c in self.candidates or ()]
        out["cost"] = self.cost if isinstance(self.cost, str) else type(self.cost).__name__
        return out


@dataclass
class CallRecord:
    """One searched layer call: per candidate and head the error and loss, and the heads' choice."""

    run: int
    step: int
    layer: int
    bucket: int
    error: torch.Tensor  # float64 [C, H]
    loss: torch.Tensor  # float64 [C, H]
    choice: torch.Tensor  # long [H]: candidate index, -1 = dense


@dataclass
class _Sums:
    loss: torch.Tensor
    mass: torch.Tensor
    calls: int = 0


@dataclass
class _Context:
    """Per layout and shape: candidate costs."""

    shape: Shape
    costs: torch.Tensor  # float64 [C]


def decide(loss: torch.Tensor, epsilon: float, dense_loss: float | None = None) -> torch.Tensor:
    """Per head (``loss`` is ``[candidates, heads]``) the lowest-loss candidate if that loss is under
    ``epsilon`` (and under ``dense_loss`` where given), else -1: dense."""
    best = loss.min(0)
    keep = best.values < epsilon
    if dense_loss is not None:
        keep &= best.values < dense_loss
    return torch.where(keep, best.indices, torch.full_like(best.indices, -1))


class Searcher:
    """The search as a pattern source (``searcher(call)``): :meth:`plan` gives the plan from the
    losses recorded so far; :attr:`records` keeps every layer call.

    It drives nothing: the driver (``run_search`` of the diffusers integration) installs it, calls
    :meth:`start_run` before each prompt x seed and may set :attr:`bar`.

    Args:
        spec: the model's :class:`~sparse_vdit.ModelSpec`, or its transformer (anything
            :func:`~sparse_vdit.plan.as_spec` reads).
        prompts, steps, seeds: as :func:`sparse_vdit.search`; runs are every prompt x seed.
        settings: the :class:`SearchSettings` (default: ``mode="ours"``).
        device: where the model runs (decides ``cost="auto"``); default: that of ``spec``'s
            parameters if it is a module, else the CPU.
        output_grams: for ``error="output"``, per layer ``[H, D, D]``: ``W_h^T W_h`` of each head's
            columns ``W_h`` of the layer's output projection (the driver reads them from the model,
            :func:`~sparse_vdit.integrations.diffusers.search.output_grams`); without them each head's
            output counts as it is (identity).
        step_range: ``[first, stop)``: the steps this model runs, for one expert of a pipeline of
            several (Wan2.2 A14B); the step buckets split them.
    """

    def __init__(
        self,
        spec: Any,
        prompts: Sequence[Any],
        *,
        steps: int,
        seeds: Sequence[int] = (0,),
        settings: SearchSettings | None = None,
        device: torch.device | str | None = None,
        output_grams: Sequence[torch.Tensor] | None = None,
        step_range: tuple[int, int] | None = None,
    ) -> None:
        self.spec = as_spec(spec)
        self.step_range = step_range
        self.prompts = [prompts] if isinstance(prompts, (str, Mapping)) else list(prompts)
        self.seeds = [int(s) for s in seeds]
        if not self.prompts or not self.seeds:
            raise ValueError("search needs at least one prompt and one seed")
        self.steps = steps
        if device is None:
            param = next(spec.parameters(), None) if isinstance(spec, torch.nn.Module) else None
            device = param.device if param is not None else torch.device("cpu")
        self.settings = (settings or SearchSettings()).resolve(steps, torch.device(device))
        if self.settings.mode == "paper" and len(self.prompts) * len(self.seeds) > 1:
            raise ValueError(
                f"mode='paper' searches one prompt with one seed, as the paper does; got {len(self.prompts)} "
                f"prompts x {len(self.seeds)} seeds (use mode='ours', whose other switches can be set as the paper's)"
            )
        self.cost_model = as_cost_model(self.settings.cost)
        if output_grams is not None and len(output_grams) != self.spec.num_layers:
            raise ValueError(f"{len(output_grams)} output grams for {self.spec.num_layers} layers")
        self.output_grams = list(output_grams) if output_grams is not None and self.settings.error == "output" else None
        self.records: list[CallRecord] = []
        self.layout: VideoLayout | None = None
        self.bar = None  # a tqdm-like progress bar over (run, step, layer), set by the driver
        self._sums: dict[tuple[int, int, int], _Sums] = {}
        self._contexts: dict[tuple, _Context] = {}
        self._starts = self.settings.bucket_starts(steps, step_range)
        self._run = 0
        self._seen: set = set()
        self.cost_seconds = 0.0  # spent building cost tables (inside the first run)

    # --- the pattern source --------------------------------------------------------------------

    def __call__(self, call) -> tuple[Pattern, ...] | None:
        s = self.settings
        self._tick(call)
        if call.step < s.warmup_steps or call.layer < s.warmup_layers:
            return None
        with torch.no_grad(), torch.profiler.record_function("sparse_vdit.search_call"):
            return self._search_call(call)

    def _search_call(self, call) -> tuple[Pattern, ...] | None:
        s, layout, block = self.settings, call.layout, self.settings.block_size
        base = layout.with_text_valid(None)
        if self.layout is None:
            self.layout = base
        elif base != self.layout:
            raise RuntimeError(f"search saw two video layouts, {self.layout.describe()} and {base.describe()}; "
                               "search one resolution at a time")  # fmt: skip
        ctx = self._context(call)
        candidates = s.candidates
        gen = torch.Generator().manual_seed(1_000_003 * self._run + 1_009 * call.step + call.layer)
        num_q_blocks = num_blocks(layout.num_tokens, block)
        count = s.sample_blocks or default_sample_blocks(num_q_blocks)
        rows = block_rows(sample_query_blocks(num_q_blocks, count, gen), block, layout.num_tokens)
        q, k, v = call.q, call.k, call.v
        gram = self._gram(call)
        if s.estimate == "sampled":
            with torch.profiler.record_function("sparse_vdit.probe"):
                result = probe(q, k, v, layout, block, rows, candidates, gram=gram)
            sq, ref, count, mass, patterns = result.sq, result.ref, result.count, result.mass, result.patterns
        else:
            fitted = [c for c in candidates if isinstance(c, MassVertical)]
            if fitted:  # attention mass on the sampled rows places the stripes
                result = probe(q, k, v, layout, block, rows, fitted)
                mass, fitted_patterns = result.mass, dict(zip(fitted, result.patterns))
            else:
                mass, fitted_patterns = torch.zeros(q.shape[2], num_key_blocks(layout, block)), {}
            reference = call.dense_output()
            sq = torch.zeros(len(candidates), q.shape[2], dtype=torch.float64)
            patterns = []
            for i, c in enumerate(candidates):
                heads = fitted_patterns[c] if isinstance(c, MassVertical) else (c.pattern,) * q.shape[2]
                sq[i], ref, count = output_errors(call.output(heads), reference, gram)
                patterns.append(heads)
        if s.error == "relative":
            error = sq / ref.clamp_min(1e-30)
        elif s.error == "output":  # against the layer's mean head output energy
            error = sq / (ref.sum() / len(ref)).clamp_min(1e-30)
        else:
            error = sq / count
        loss = error + s.lam * ctx.costs[:, None]
        choice = decide(loss, s.epsilon, self._dense_loss)
        bucket = bisect.bisect_right(self._starts, call.step) - 1
        self.records.append(CallRecord(self._run, call.step, call.layer, bucket, error, loss, choice))
        self._add(bucket, call.layer, loss, mass)
        if bool((choice < 0).all()):
            return None
        return tuple(dense() if c < 0 else patterns[c][h] for h, c in enumerate(choice.tolist()))

    def _gram(self, call) -> torch.Tensor | None:
        """``[heads of this call, D, D]`` output-projection Gram of the call's layer (``error="output"``)."""
        if self.output_grams is None:
            return None
        gram = self.output_grams[call.layer]
        if call.heads is not None:
            gram = gram[call.heads.start : call.heads.stop]
        return gram.to(call.q.device)

    def _context(self, call) -> _Context:
        q, layout = call.q, self.layout  # costs at the unpadded layout (padded text changes little)
        key = (q.shape[2], q.shape[3], q.dtype, q.device)
        ctx = self._contexts.get(key)
        if ctx is None:
            start, s = time.perf_counter(), self.settings
            shape = Shape(layout, q.shape[2], q.shape[3], q.dtype, q.device, s.block_size, s.backend)
            reps = {c.key: c.representative(layout, s.block_size) for c in s.candidates}
            if isinstance(self.cost_model, MeasuredCost):
                self.cost_model.prepare(reps, shape)
            costs = [self.cost_model.relative(key_, p, shape) for key_, p in reps.items()]
            ctx = self._contexts[key] = _Context(shape, torch.tensor(costs, dtype=torch.float64))
            self.cost_seconds += time.perf_counter() - start
        return ctx

    def _add(self, bucket: int, layer: int, loss: torch.Tensor, mass: torch.Tensor) -> None:
        width = num_blocks(self.layout.num_tokens, self.settings.block_size)
        mass = torch.nn.functional.pad(mass, (0, width - mass.shape[1]))
        sums = self._sums.get((self._run, bucket, layer))
        if sums is None:
            sums = self._sums[(self._run, bucket, layer)] = _Sums(torch.zeros_like(loss), torch.zeros_like(mass))
        sums.loss += loss
        sums.mass += mass
        sums.calls += 1

    def _tick(self, call) -> None:
        key = (self._run, call.step, call.layer)
        if self.bar is not None and key not in self._seen:
            self._seen.add(key)
            self.bar.update(1)
            if call.layer == 0:
                self.bar.set_postfix_str(f"run {self._run + 1}/{self._runs} step {call.step + 1}/{self.steps}")

    # --- runs ----------------------------------------------------------------------------------

    @property
    def _dense_loss(self) -> float | None:
        """Dense's own loss (no error, relative cost 1) where dense competes, else None."""
        return self.settings.lam if self.settings.dense_competes else None

    @property
    def _runs(self) -> int:
        return len(self.prompts) * len(self.seeds)

    def runs(self) -> list[tuple[Any, int]]:
        """The ``(prompt, seed)`` of every run, in order: every prompt with every seed."""
        return [(p, seed) for p in self.prompts for seed in self.seeds]

    def start_run(self, index: int) -> None:
        """The layer calls from now on belong to run ``index`` (of :meth:`runs`)."""
        self._run = index

    # --- the plan ------------------------------------------------------------------------------

    def choices(self, run: int | None = None) -> torch.Tensor:
        """long ``[buckets, layers, heads]``: candidate per head from the mean loss (-1 dense).

        Over every run, or over run ``run`` alone.
        """
        s = self.settings
        out = torch.full((len(self._starts), self.spec.num_layers, self.spec.num_heads), -1, dtype=torch.long)
        for (bucket, layer), sums in self._merged(run).items():
            out[bucket, layer] = decide(sums.loss / sums.calls, s.epsilon, self._dense_loss)
        return out

    def _merged(self, run: int | None) -> dict[tuple[int, int], _Sums]:
        merged: dict[tuple[int, int], _Sums] = {}
        for (r, bucket, layer), sums in self._sums.items():
            if run is not None and r != run:
                continue
            m = merged.get((bucket, layer))
            if m is None:
                merged[(bucket, layer)] = _Sums(sums.loss.clone(), sums.mass.clone(), sums.calls)
            else:
                m.loss += sums.loss
                m.mass += sums.mass
                m.calls += sums.calls
        return merged

    def plan(self, **stats) -> Plan:
        """The plan from everything recorded so far (``stats`` go to ``made_by["stats"]``)."""
        s, layout, block = self.settings, self.layout, self.settings.block_size
        choices = self.choices()
        merged = self._merged(None)
        context = next(iter(self._contexts.values()))
        ctx_shape = context.shape
        schedule = []
        for bucket, start in enumerate(self._starts):
            layers = []
            for layer in range(self.spec.num_layers):
                mass = merged[(bucket, layer)].mass if (bucket, layer) in merged else None
                heads = []
                for h, c in enumerate(choices[bucket, layer].tolist()):
                    heads.append(dense() if c < 0 else s.candidates[c].pattern_for(
                        None if mass is None else mass[h, : num_key_blocks(layout, block)], layout, block))  # fmt: skip
                layers.append(tuple(heads))
            schedule.append(StepRange(0 if bucket == 0 else start, tuple(layers)))
        made_by = {
            "method": "offline",
            "algorithm": "sparse-vdit search (Sparse-vDiT)",
            **s.describe(),
            "cost": self.cost_model.describe(),
            "aggregate": "mean loss over calls per (step bucket, layer)",
            "steps": self.steps,
            "bucket_starts": self._starts,
            "prompts": [p if isinstance(p, str) else "<inputs>" for p in self.prompts],
            "seeds": self.seeds,
            "device": device_name(ctx_shape.device),
            "torch": torch.__version__,
            "sparse_vdit": __version__,
        }
        made_by["sample_blocks"] = s.sample_blocks or default_sample_blocks(num_blocks(layout.num_tokens, block))
        costs = {c.key: float(x) for c, x in zip(s.candidates, context.costs)}
        made_by["candidate_costs"] = costs
        plan = Plan(self.spec, tuple(schedule), s.warmup_steps, s.warmup_layers, block, layout, made_by)
        made_by["stats"] = {**{k: v for k, v in stats.items() if v is not None}, **self.stats(plan, choices, costs)}
        return plan

    def stats(self, plan: Plan, choices: torch.Tensor, costs: dict[str, float]) -> dict:
        """Layer calls searched, density, expected attention speedup, and stability across runs."""
        s = self.settings
        cost = torch.tensor([1.0] + list(costs.values()), dtype=torch.float64)[choices + 1]  # [buckets, L, H]
        total = sparse_total = 0.0
        for step in range(self.steps):
            total += self.spec.num_layers * self.spec.num_heads
            if step < s.warmup_steps:
                sparse_total += self.spec.num_layers * self.spec.num_heads
                continue
            per_layer = cost[bisect.bisect_right(self._starts, step) - 1].sum(1)
            per_layer[: s.warmup_layers] = self.spec.num_heads
            sparse_total += float(per_layer.sum())
        out = {
            "layer_calls": len(self.records),
            "density": plan.density(steps=self.steps),
            "expected_speedup": total / sparse_total if sparse_total > 0 else None,  # None: every head skipped
            "speedup_basis": "attention only, cost model " + self.cost_model.name,
        }
        runs = self._runs
        if runs > 1:
            per_run = torch.stack([self.choices(r) for r in range(runs)])  # [runs, buckets, L, H]
            searched = torch.zeros_like(choices, dtype=torch.bool)
            searched[:, s.warmup_layers :] = True
            differ = (per_run != per_run[:1]).any(0)[searched]
            off = (per_run != choices[None]).flatten(1)[:, searched.flatten()].double().mean(1)
            out["stability"] = {
                "runs": runs,
                "changed_share": float(differ.double().mean()),
                "run_vs_plan_share": [float(x) for x in off],
            }
        return out

