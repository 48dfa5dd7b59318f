"""Plans: which pattern every (step, layer, head) of a model uses, as a versioned JSON file.

A :class:`Plan` holds one or more step ranges; each range gives, per layer, one
:class:`~sparse_vdit.patterns.Pattern` per head. The first ``warmup_steps`` steps and the first
``warmup_layers`` layers run dense whatever the ranges say. Pattern parameters are in
layout-relative units (DESIGN.md), so a plan found at one resolution applies at another.

JSON schema (``version`` 1)::

    {
      "format": "sparse-vdit-plan", "version": 1,
      "model": {"family": "wan", "num_layers": 30, "num_heads": 12, "name": "..."?},
      "layout": {"frames": 21, "height": 30, "width": 52, "text": 0, "text_position": "none",
                 "text_valid": null} | null,
      "block_size": 128,
      "warmup": {"steps": 0, "layers": 0},
      "made_by": {"method": "uniform", ...},
      "patterns": [{"name": "dense"}, {"name": "diagonal", "width": 1.0}, ...],
      "schedule": [{"start": 0, "heads": [[0, 1, 1, ...], ...]}, {"start": 20, "heads": ...}]
    }

``patterns`` is a palette (a pattern other than ``skip`` may add ``"sink": F``: every query also
visits the first ``F`` frames' worth of keys in the head's own order); ``schedule[i].heads[layer][head]`` indexes it. Range ``i`` covers steps
``[start_i, start_{i+1})``, the last one every later step; the first starts at 0. Steps count
from 0 within each generation. Layers are the self-attention layers in forward order
(HunyuanVideo: the 20 dual-stream blocks, then the 40 single-stream ones).

A pipeline with several denoising transformers (Wan2.2 A14B: ``transformer`` for the high-noise
steps, ``transformer_2`` after the boundary) has one plan per expert, keyed by component name:
:class:`ExpertPlans`, saved as ``{"format", "version", "experts": {"transformer": {<plan>}, ...}}``.
Steps are the pipeline's steps for every expert. :func:`load_plans` reads either kind of file.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from .block_table import DEFAULT_BLOCK, all_dense, valid_block_size
from .layout import VideoLayout
from .patterns import Pattern, compile_layer
from .patterns import dense as _dense

from .plan_schema import FAMILIES, FORMAT, MAX_BLOCK, MIN_BLOCK, VERSION, PlanError, parse_plan_json, plan_fields
from .plan_schema import EXPERT_COMPONENTS, expert_documents, read_plan_text



@dataclass(frozen=True)
class ModelSpec:
    """What a plan must agree with: model family, self-attention layers and heads per layer."""

    family: str
    num_layers: int
    num_heads: int
    name: str | None = None

    def __post_init__(self) -> None:
        if self.family not in _FAMILIES:
            raise PlanError(f"unknown model family {self.family!r}; known: {', '.join(_FAMILIES)}")
        for key in ("num_layers", "num_heads"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"model {key} must be a positive int, got {value!r}")

    def describe(self) -> str:
        return f"{self.name or self.family} ({self.family}, {self.num_layers} layers x {self.num_heads} heads)"


# Model families and the published models of each are registered by the integrations, where the
# knowledge of models lives (sparse_vdit.integrations.diffusers.families).
_FAMILIES: list[str] = []
KNOWN_MODELS: dict[str, ModelSpec] = {}


def register_family(family: str, known_models: dict[str, tuple[int, int]] | None = None) -> None:
    """Let plans name ``family``; ``known_models`` maps model names to (self-attention layers, heads)."""
    if family not in _FAMILIES:
        _FAMILIES.append(family)
    for name, (layers, heads) in (known_models or {}).items():
        KNOWN_MODELS[name] = ModelSpec(family, layers, heads, name)


# Turn other objects (e.g. diffusers pipelines) into specs; the integrations register theirs.
_SPEC_RESOLVERS: list[Callable[[Any], ModelSpec | None]] = []


def register_spec_resolver(resolver: Callable[[Any], ModelSpec | None]) -> None:
    """Let :func:`as_spec` understand more objects; ``resolver`` returns None for ones it does not know."""
    if resolver not in _SPEC_RESOLVERS:
        _SPEC_RESOLVERS.append(resolver)


def as_spec(model: Any) -> ModelSpec:
    """A :class:`ModelSpec` from a spec, a known name, ``(family, layers, heads)``, or a model/pipeline."""
    if isinstance(model, ModelSpec):
        return model
    if isinstance(model, str):
        if model.lower() in KNOWN_MODELS:
            return KNOWN_MODELS[model.lower()]
        raise PlanError(f"unknown model name {model!r}; known: {', '.join(KNOWN_MODELS)} (or pass a ModelSpec)")
    if isinstance(model, tuple) and len(model) == 3:
        return ModelSpec(*model)
    for resolver in _SPEC_RESOLVERS:
        spec = resolver(model)
        if spec is not None:
            return spec
    raise PlanError(
        f"cannot tell the model family, layers and heads of a {type(model).__name__}; pass a ModelSpec, "
        f"a known name ({', '.join(KNOWN_MODELS)}), (family, layers, heads), or a supported diffusers model"
    )


Layers = tuple[tuple[Pattern, ...], ...]


@dataclass(frozen=True)
class StepRange:
    """Patterns of every layer and head from step ``start`` on (until the next range starts)."""

    start: int
    layers: Layers

    @cached_property
    def dense_layers(self) -> tuple[bool, ...]:
        return tuple(all_dense(heads) for heads in self.layers)


@dataclass(frozen=True, eq=True)
class Plan:
    """Per (step range, layer, head) a pattern, plus dense warm-up steps and layers.

    Build fixed plans with :meth:`uniform`, :meth:`dense` or :meth:`from_layers`; read and write
    them with :meth:`load` / :meth:`save`. The constructor validates everything.
    """

    spec: ModelSpec
    schedule: tuple[StepRange, ...]
    warmup_steps: int = 0
    warmup_layers: int = 0
    block_size: int = DEFAULT_BLOCK
    layout: VideoLayout | None = None
    made_by: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    # --- construction -------------------------------------------------------------------------

    @classmethod
    def from_layers(
        cls,
        model: Any,
        layers: Sequence[Sequence[Pattern]],
        *,
        warmup_steps: int = 0,
        warmup_layers: int = 0,
        block_size: int = DEFAULT_BLOCK,
        layout: VideoLayout | None = None,
        made_by: dict | None = None,
    ) -> Plan:
        """One step range: ``layers[layer][head]`` for every step after the warm-up."""
        rows = tuple(tuple(heads) for heads in layers)
        return cls(as_spec(model), (StepRange(0, rows),), warmup_steps, warmup_layers, block_size, layout,
                   dict(made_by or {"method": "manual"}))  # fmt: skip

    @classmethod
    def uniform(
        cls,
        model: Any,
        pattern: Pattern | str,
        *,
        warmup_steps: int = 0,
        warmup_layers: int = 0,
        block_size: int = DEFAULT_BLOCK,
        layout: VideoLayout | None = None,
    ) -> Plan:
        """Every head of every layer one pattern (the paper's window baselines), e.g.
        ``Plan.uniform("wan2.1-t2v-1.3b", diagonal(1.0), warmup_steps=10)``."""
        pattern = _pattern_arg(pattern)
        spec = as_spec(model)
        layers = [[pattern] * spec.num_heads] * spec.num_layers
        made_by = {"method": "uniform", "pattern": pattern.to_dict()}
        return cls.from_layers(spec, layers, warmup_steps=warmup_steps, warmup_layers=warmup_layers,
                               block_size=block_size, layout=layout, made_by=made_by)  # fmt: skip

    @classmethod
    def dense(cls, model: Any, *, block_size: int = DEFAULT_BLOCK, layout: VideoLayout | None = None) -> Plan:
        """Every head dense: through the integration, the same output as the unpatched model."""
        spec = as_spec(model)
        layers = [[_dense()] * spec.num_heads] * spec.num_layers
        return cls.from_layers(spec, layers, block_size=block_size, layout=layout, made_by={"method": "dense"})

    # --- queries ------------------------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return self.spec.num_layers

    @property
    def num_heads(self) -> int:
        return self.spec.num_heads

    @cached_property
    def _starts(self) -> list[int]:
        return [r.start for r in self.schedule]

    @cached_property
    def _dense_heads(self) -> tuple[Pattern, ...]:
        return (_dense(),) * self.num_heads

    def step_range(self, step: int) -> StepRange:
        """The range that step ``step`` (>= 0) falls in."""
        return self.schedule[bisect.bisect_right(self._starts, step) - 1]

    def is_dense(self, step: int, layer: int) -> bool:
        """Whether every head of ``layer`` is dense at ``step`` (warm-up included); no per-head loop."""
        self._check_layer(layer)
        if step < self.warmup_steps or layer < self.warmup_layers:
            return True
        return self.step_range(step).dense_layers[layer]

    def patterns_for(self, step: int, layer: int) -> tuple[Pattern, ...]:
        """One pattern per head of ``layer`` at denoising step ``step`` (0-based)."""
        self._check_layer(layer)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step < self.warmup_steps or layer < self.warmup_layers:
            return self._dense_heads
        return self.step_range(step).layers[layer]

    def density(self, layout: VideoLayout | None = None, steps: int | None = None) -> float:
        """Computed share of (head, query block, key block) pairs, text tokens included.

        At ``layout`` (default: the plan's own). With ``steps`` the mean over steps
        ``0..steps-1`` (warm-up included), else the density of one step after the warm-up.
        """
        layout = layout or self.layout
        if layout is None:
            raise ValueError("density needs a layout: the plan does not record one")
        cache: dict[Pattern, float] = {}

        def head_density(p: Pattern) -> float:
            if p not in cache:
                cache[p] = compile_layer([p], layout, self.block_size).density
            return cache[p]

        def step_density(step: int) -> float:
            total = sum(head_density(p) for layer in range(self.num_layers) for p in self.patterns_for(step, layer))
            return total / (self.num_layers * self.num_heads)

        if steps is None:
            return step_density(self.warmup_steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return sum(step_density(s) for s in range(steps)) / steps

    def check(self, model: Any) -> None:
        """Raise :class:`PlanError` unless the plan fits ``model`` (family, layers, heads)."""
        spec = as_spec(model)
        if (spec.family, spec.num_layers, spec.num_heads) != (self.spec.family, self.num_layers, self.num_heads):
            raise PlanError(f"the plan is for {self.spec.describe()}, but the model is {spec.describe()}")

    def summary(self) -> str:
        """A few lines: model, warm-up, pattern shares per step range."""
        lines = [f"plan for {self.spec.describe()}, block {self.block_size}, made by {self.made_by.get('method', '?')}"]
        lines.append(f"dense warm-up: {self.warmup_steps} steps, {self.warmup_layers} layers")
        for r in self.schedule:
            counts: dict[str, int] = {}
            for heads in r.layers:
                for p in heads:
                    counts[p.name] = counts.get(p.name, 0) + 1
            total = self.num_layers * self.num_heads
            shares = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(f"steps {r.start}+: {shares}")
        return "\n".join(lines)

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} out of range: the plan has {self.num_layers} layers")

    # --- JSON ---------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        palette: dict[Pattern, int] = {}
        schedule = []
        for r in self.schedule:
            rows = [[palette.setdefault(p, len(palette)) for p in heads] for heads in r.layers]
            schedule.append({"start": r.start, "heads": rows})
        model = {"family": self.spec.family, "num_layers": self.num_layers, "num_heads": self.num_heads}
        if self.spec.name is not None:
            model["name"] = self.spec.name
        return {
            "format": FORMAT,
            "version": VERSION,
            "model": model,
            "layout": None if self.layout is None else self.layout.to_dict(),
            "block_size": self.block_size,
            "warmup": {"steps": self.warmup_steps, "layers": self.warmup_layers},
            "made_by": self.made_by,
            "patterns": [p.to_dict() for p in palette],
            "schedule": schedule,
        }

    def dumps(self) -> str:
        """The plan as JSON text (one layer per line)."""
        data = self.to_dict()
        schedule = data.pop("schedule")
        text = json.dumps(data, indent=2)
        ranges = []
        for r in schedule:
            rows = ",\n".join(f"        {json.dumps(row)}" for row in r["heads"])
            ranges.append(f'    {{\n      "start": {r["start"]},\n      "heads": [\n{rows}\n      ]\n    }}')
        return text[:-2] + ',\n  "schedule": [\n' + ",\n".join(ranges) + "\n  ]\n}\n"

    def save(self, path: str | Path) -> Path:
        """Write the plan as JSON; :meth:`load` gives back an equal plan."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps())
        return path

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        """Validate a parsed JSON plan; errors name ``source`` and the offending field."""
        return _from_dict(data, source)

    @classmethod
    def loads(cls, text: str, source: str = "plan", model: Any = None) -> Plan:
        """Parse JSON text (see :meth:`load`)."""
        plan = _from_dict(parse_plan_json(text, source), source)
        if model is not None:
            plan.check(model)
        return plan

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> Plan:
        """Read and validate a plan file; with ``model``, also check it fits that model."""
        return cls.loads(read_plan_text(path), str(path), model)


# --- validation -----------------------------------------------------------------------------


def _pattern_arg(pattern: Pattern | str) -> Pattern:
    if isinstance(pattern, Pattern):
        return pattern
    if isinstance(pattern, str):
        from . import patterns as module

        factory = getattr(module, pattern, None)
        if pattern not in module.pattern_names() or not callable(factory):
            raise PlanError(f"unknown pattern {pattern!r}; known: {', '.join(module.pattern_names())}")
        return factory()
    raise PlanError(f"expected a Pattern (e.g. sparse_vdit.patterns.diagonal(1.0)) or a name, got {pattern!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _validate(plan: Plan) -> None:
    if not isinstance(plan.spec, ModelSpec):
        raise PlanError(f"plan.spec must be a ModelSpec, got {type(plan.spec).__name__}")
    for key in ("warmup_steps", "warmup_layers"):
        value = getattr(plan, key)
        if not _is_int(value) or value < 0:
            raise PlanError(f"{key} must be an int >= 0, got {value!r}")
    if plan.warmup_layers > plan.num_layers:
        raise PlanError(f"warmup_layers={plan.warmup_layers} exceeds the model's {plan.num_layers} layers")
    size = plan.block_size
    if not _is_int(size) or not MIN_BLOCK <= size <= MAX_BLOCK or size & (size - 1):
        raise PlanError(f"block_size must be a power of two in [{MIN_BLOCK}, {MAX_BLOCK}], got {size!r}")
    if plan.layout is not None and not isinstance(plan.layout, VideoLayout):
        raise PlanError(f"layout must be a VideoLayout or None, got {type(plan.layout).__name__}")
    if not isinstance(plan.made_by, dict):
        raise PlanError(f"made_by must be a dict, got {type(plan.made_by).__name__}")
    if not plan.schedule:
        raise PlanError("the plan has no step ranges")
    previous = -1
    for i, r in enumerate(plan.schedule):
        if not isinstance(r, StepRange):
            raise PlanError(f"schedule[{i}] must be a StepRange, got {type(r).__name__}")
        if not _is_int(r.start) or r.start <= previous or (i == 0 and r.start != 0):
            raise PlanError(f"schedule[{i}].start={r.start!r}: ranges must start at 0 and increase strictly")
        previous = r.start
        if len(r.layers) != plan.num_layers:
            raise PlanError(f"schedule[{i}] has {len(r.layers)} layers, but the plan's model has {plan.num_layers}")
        for layer, heads in enumerate(r.layers):
            if len(heads) != plan.num_heads:
                raise PlanError(
                    f"schedule[{i}] layer {layer} has {len(heads)} heads, but the plan's model has {plan.num_heads}"
                )
            for head, p in enumerate(heads):
                if not isinstance(p, Pattern):
                    raise PlanError(f"schedule[{i}] layer {layer} head {head}: not a Pattern: {p!r}")


def _from_dict(data: Any, source: str) -> Plan:
    fields = plan_fields(data, source)
    spec = ModelSpec(fields.family, fields.num_layers, fields.num_heads, fields.name)
    schedule = tuple(StepRange(start, layers) for start, layers in fields.schedule)
    try:
        return Plan(spec, schedule, fields.warmup_steps, fields.warmup_layers, fields.block_size, fields.layout,
                    fields.made_by)  # fmt: skip
    except PlanError as err:
        raise PlanError(f"{source}: {err}") from None


class ExpertPlans(Mapping):
    """One :class:`Plan` per denoising transformer of a pipeline, keyed by component name
    (``"transformer"``, ``"transformer_2"``), in the pipeline's order."""

    def __init__(self, plans: Mapping[str, Plan]) -> None:
        unknown = [name for name in plans if name not in EXPERT_COMPONENTS]
        if unknown or not plans:
            raise PlanError(f"expert plans are keyed by {', '.join(EXPERT_COMPONENTS)}; got {', '.join(map(str, plans))}")
        for name, plan in plans.items():
            if not isinstance(plan, Plan):
                raise TypeError(f"the plan of {name} must be a Plan, got {type(plan).__name__}")
        self._plans = {name: plans[name] for name in EXPERT_COMPONENTS if name in plans}

    def __getitem__(self, name: str) -> Plan:
        return self._plans[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._plans)

    def __len__(self) -> int:
        return len(self._plans)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExpertPlans) and self._plans == other._plans

    def __repr__(self) -> str:
        return f"ExpertPlans({', '.join(f'{k}: {p.spec.describe()}' for k, p in self._plans.items())})"

    def dumps(self) -> str:
        """The plans as one JSON document (each plan as :meth:`Plan.dumps` writes it)."""
        parts = []
        for name, plan in self._plans.items():
            body = plan.dumps().rstrip("\n").replace("\n", "\n    ")
            parts.append(f"    {json.dumps(name)}: {body}")
        return (f'{{\n  "format": {json.dumps(FORMAT)},\n  "version": {VERSION},\n  "experts": {{\n'
                + ",\n".join(parts) + "\n  }\n}\n")  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write every expert's plan in one file; :func:`load_plans` gives back equal plans."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.dumps())
        return path


def loads_plans(text: str, source: str = "plan") -> Plan | ExpertPlans:
    """Parse a plan file's text: a :class:`Plan`, or :class:`ExpertPlans` for a per-expert file."""
    data = parse_plan_json(text, source)
    documents = expert_documents(data, source)
    if documents is None:
        return _from_dict(data, source)
    return ExpertPlans({name: _from_dict(doc, f"{source}: experts.{name}") for name, doc in documents.items()})


def load_plans(path: str | Path) -> Plan | ExpertPlans:
    """Read a plan file of either kind (one plan, or one per expert); PlanError if it is invalid."""
    return loads_plans(read_plan_text(path), str(path))
