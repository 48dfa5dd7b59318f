"""Sparse VideoGen (SVG), the online method: spatial or temporal, decided per head every step.

At every sparse step and layer, :class:`SVG` samples a few query rows, computes their exact
attention and the same rows under a spatial and a temporal mask, and gives each head the mask
whose output is closer to the exact one. Temporal heads run token-major; the layer runs in one
launch.

``mode="reference"`` (the default) follows the authors' code choice by choice
(:mod:`~sparse_vdit.methods.svg_reference` names the source of each): their executed band from
their sparsity-to-width rule, with the first-frame sink on Wan (in each head's own order); their
fixed profile masks (a two-frame block band plus the sink on Wan, 1.5 frames plus text on
HunyuanVideo); 64 rows drawn with replacement from the first 10,000 positions; the choice per
(sample, head); their dense warm-up per model and task (Wan T2V 30% of the steps, I2V 35%,
HunyuanVideo 10%; 3% of the layers, rounded down). ``mode="ours"`` is the variant this package ran
before; each difference is also a named option (a mode only sets their defaults):

- ``widths``: ``"reference"`` (``sparsity_to_width``) or ``"fitted"`` (both bands fitted to compute
  ``density`` of the blocks, text included: :func:`band_widths`).
- ``sink``: the first frame's worth of keys in each head's order added to both masks (reference on
  Wan) or not.
- ``profile_masks``: ``"reference"`` (their fixed masks) or ``"executed"`` (the bands that will run).
- ``row_sampling``: ``"replacement"`` (theirs) or ``"stratified"`` (one row in each of
  ``sampled_rows`` equal slices of the video, so every frame is seen; text rows never sampled).
- ``choice``: ``"per_sample"`` (theirs: one choice per batch sample and head) or ``"batch_mean"``
  (errors averaged over the batch: one table for the batch).

Other choices, ours in both modes: the error is the mean squared error of the sampled rows'
outputs (``error="output"``, SVG's own; ``"mass"``, the attention mass outside the mask, is offered
for comparison); rows are a function of ``(seed, step, layer)``; masks are never materialised
(:mod:`~sparse_vdit.methods.svg_profile`); on a GPU one fused Triton pass computes the exact and both
masked outputs of the rows.

**One device-decided layer call** launches four kernels: the profiling pass, the merge of its key
splits, the errors and choice (``errors_and_choice``), the attention reading the choice. Everything
that depends on (layout, density) is built once and kept resident: the candidate and profile
tables, each query position's key-block ranges under the profile masks (``position_ranges``), the
kernels' work order and flags; the sampled rows are kept on the device per (step, layer), so only
the first generation draws and sends them (one small queued copy).

**No host sync** (``decide``): on a backend that reads the choice on the device (its declaration's
``selects_on_device``: Triton) the source returns a :class:`~sparse_vdit.patterns.HeadChoice` (both
candidate tables resident; the kernel reads each head's choice and token order). FlashAttention-4
and FlexAttention need each head's table and the token-major heads permuted in memory: there the
choice is copied back once per layer and the tables picked on the host (``decide="host"``, as with
``record=True``), unless ``sparse_vdit.kernels.fa4.SELECT_ON_DEVICE`` is set: FA4 then takes
per-(sample, head) block tensors gathered on the device and the heads are permuted by a kernel that
reads the choice (opt-in until measured on a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..block_table import DEFAULT_BLOCK, num_blocks, valid_block_size
from ..layout import VideoLayout
from ..patterns import HeadChoice, Pattern, dense, head_ranges, spatial, temporal, with_sink
from ..plan import ModelSpec, Plan, StepRange, as_spec
from ..timing import clock, seconds_per_step
from . import svg_reference as ref
from .svg_profile import (
    DEFAULT_CHUNK,
    ERRORS,
    PROFILE_BACKENDS,
    _triton_ok,
    errors_and_choice,
    fused_inputs,
    row_masks,
    row_ranges,
    sample_rows,
    sampled_errors,
    sampled_outputs,
    token_major_positions,
)

logger = logging.getLogger("sparse_vdit")

DEFAULT_WARMUP_FRACTION = 0.25  # of the steps, when their number is known (mode "ours")
WARMUP_STEPS_UNKNOWN = 12  # 25% of the usual 50 steps, when it is not
REFERENCE_STEPS_UNKNOWN = 50  # the reference scripts' step count, when ours is not known
MODES = ("reference", "ours")
VARIANTS = {  # option -> (reference, ours): every option a mode sets
    "widths": ("reference", "fitted"),
    "sink": (None, False),  # None: as the reference for the model (on Wan)
    "profile_masks": ("reference", "executed"),
    "row_sampling": ("replacement", "stratified"),
    "choice": ("per_sample", "batch_mean"),
}
CHOICES = {name: values for name, values in VARIANTS.items() if name != "sink"}
CHOICES["decide"] = ("auto", "device", "host")


# --- widths ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Widths:
    """Band widths for one layout and target density, and the densities they give."""

    spatial: float  # frames (see patterns.spatial)
    temporal: float  # fraction of the video (see patterns.temporal)
    spatial_density: float
    temporal_density: float

    def patterns(self) -> tuple[Pattern, Pattern]:
        return spatial(self.spatial), temporal(self.temporal)


def _table_density(pattern: Pattern, layout: VideoLayout, block: int) -> float:
    # the uncached builder: a bisection must not fill the shared range cache
    starts, ends = head_ranges.__wrapped__(pattern, layout, block)
    kv_blocks = num_blocks(layout.kv_len, block)
    return float((ends - starts).sum()) / (starts.shape[0] * kv_blocks)


def _fit(
    make: Callable[[float], Pattern], top: float, token: float, layout: VideoLayout, target: float, block: int
) -> tuple[float, float]:
    """The width in ``[0, top]`` whose table density is closest to ``target`` (density rises with width).

    Density steps where the band's half-width (in tokens) crosses a distance between block
    centres, a multiple of half a token; the result is moved ``0.25`` token (``token`` in width
    units) into its step, so that rounding cannot change the table.
    """
    low_d = _table_density(make(0.0), layout, block)
    if low_d >= target:
        return 0.0, low_d
    top_d = _table_density(make(top), layout, block)
    if top_d <= target:
        return top, top_d
    lo, hi, hi_d = 0.0, top, top_d  # invariant: d(lo) < target <= d(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        d = _table_density(make(mid), layout, block)
        if d < target:
            lo, low_d = mid, d
        else:
            hi, hi_d = mid, d
    # d is a step function: lo sits just below the step that reaches the target, hi on it
    if hi_d - target <= target - low_d:
        return _tidy(make, hi + 0.25 * token, layout, block), hi_d
    return _tidy(make, max(0.0, lo - 0.25 * token), layout, block), low_d


def _tidy(make: Callable[[float], Pattern], width: float, layout: VideoLayout, block: int) -> float:
    """The shortest decimal rounding of ``width`` that gives the same table (plans stay readable)."""
    starts, ends = head_ranges.__wrapped__(make(width), layout, block)
    for digits in range(1, 12):
        candidate = round(width, digits)
        s, e = head_ranges.__wrapped__(make(candidate), layout, block)
        if torch.equal(s, starts) and torch.equal(e, ends):
            return candidate
    return width


@lru_cache(maxsize=256)
def band_widths(layout: VideoLayout, density: float, block: int = DEFAULT_BLOCK) -> Widths:
    """Widths of ``spatial`` and ``temporal`` whose tables compute ``density`` of the blocks.

    Text rows and columns count (as :attr:`BlockTable.density` counts them). Density is a step
    function of the width (a band grows by whole key blocks), so each table lands within about
    one key block per row of the target: ``|d - density| <= 1 / key_blocks`` away from the ends;
    below the floor (own block + text) the narrowest band is used and a warning logged.
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must lie in (0, 1], got {density!r}")
    ws, ds = _fit(spatial, float(layout.frames), 1 / layout.frame_tokens, layout, density, block)
    wt, dt = _fit(temporal, 1.0, 1 / layout.video_tokens, layout, density, block)
    floor = max(_table_density(spatial(0.0), layout, block), _table_density(temporal(0.0), layout, block))
    if floor > density + 1e-9:
        logger.warning("sparse-vdit svg: density %.3f is below the narrowest band at %s (%.3f); using that",
                       density, layout.describe(), floor)  # fmt: skip
    return Widths(ws, wt, ds, dt)


# --- the pattern source ----------------------------------------------------------------------


@lru_cache(maxsize=256)
def _candidates(
    widths: str, sink: float, config: ref.ReferenceConfig, layout: VideoLayout, density: float, block: int
) -> tuple[Pattern, Pattern]:
    if widths == "reference":
        s, t = ref.executed_patterns(config, layout, density, block)
    else:
        s, t = band_widths(layout, density, block).patterns()
    return with_sink(s, sink), with_sink(t, sink)


@lru_cache(maxsize=256)
def _profile(config: ref.ReferenceConfig, layout: VideoLayout, block: int, sink: float) -> tuple[Pattern, Pattern]:
    s, t = ref.profile_patterns(config, layout, block)
    return with_sink(s, sink), with_sink(t, sink)


class SVG:
    """SVG as a pattern source: ``source(call) -> patterns | HeadChoice | None`` (diffusers integration).

    Args:
        density: computed share of blocks of every sparse layer (the reference's ``sparsity``), in
            (0, 1]; 1 means dense. Default: the reference's for the model (0.25; Wan I2V 0.3) in
            mode ``"reference"``, 0.3 in mode ``"ours"``.
        mode: ``"reference"`` (the authors' code) or ``"ours"``; sets the defaults of ``widths``,
            ``sink``, ``profile_masks``, ``row_sampling``, ``choice`` and the warm-up (see the
            module docstring), each of which may also be given.
        warmup_steps: dense steps first: an int, or a fraction of the steps. Default: the
            reference's per model and task, rounded down (mode ``"reference"``), or 0.25 rounded
            (``"ours"``); with an unknown step count, of 50 steps (reference) or 12 steps (ours).
        warmup_layers: dense layers first. Default: ``floor(0.03 * layers)`` (reference; 1 when
            the model is unknown) or 1 (ours).
        sampled_rows: query rows profiled per layer call (default 64).
        error: ``"output"`` (default) or ``"mass"``.
        decide: ``"auto"`` (on the device when the call's backend reads the choice there, i.e.
            Triton, and nothing is recorded; else on the host), ``"device"`` or ``"host"``.
        record: keep every sparse decision (and its errors) for :meth:`to_plan` (decides on the host).
        seed: varies the sampled rows.
        num_steps: steps of a generation, or a callable giving it (None if unknown).
        block_size: of the tables (the integration's; default 128; the reference's 128-token
            rounding uses it).
        profile_backend: ``"auto"`` (the fused Triton pass on CUDA, else torch), ``"torch"`` or
            ``"triton"``; ``auto`` falls back to torch, with a warning, if the Triton kernel fails.
        chunk: score elements computed at once by the torch path.

    After a call, ``last_errors`` holds the errors (spatial, temporal) ``[2, heads]``, or
    ``[2, batch, heads]`` with ``choice="per_sample"``, where they were computed (the device when
    decided there). With ``timing = True`` the classification of every call is timed.
    """

    def __init__(
        self,
        density: float | None = None,
        *,
        mode: str = "reference",
        warmup_steps: int | float | None = None,
        warmup_layers: int | None = None,
        sampled_rows: int = 64,
        error: str = "output",
        widths: str | None = None,
        sink: bool | None = None,
        profile_masks: str | None = None,
        row_sampling: str | None = None,
        choice: str | None = None,
        decide: str = "auto",
        record: bool = False,
        seed: int = 0,
        num_steps: int | Callable[[], int | None] | None = None,
        block_size: int = DEFAULT_BLOCK,
        profile_backend: str = "auto",
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"svg: mode must be one of {MODES}, got {mode!r}")
        if density is not None and (isinstance(density, bool) or not isinstance(density, (int, float))
                                    or not 0.0 < density <= 1.0):  # fmt: skip
            raise ValueError(f"svg: density must lie in (0, 1], got {density!r}")
        if warmup_steps is not None and (isinstance(warmup_steps, bool) or not (
            (isinstance(warmup_steps, int) and warmup_steps >= 0)
            or (isinstance(warmup_steps, float) and 0.0 <= warmup_steps < 1.0)
        )):  # fmt: skip
            raise ValueError(f"svg: warmup_steps must be an int >= 0 or a fraction in [0, 1), got {warmup_steps!r}")
        for name, value, low in (("warmup_layers", warmup_layers, 0), ("sampled_rows", sampled_rows, 1),
                                 ("seed", seed, 0), ("chunk", chunk, 1)):  # fmt: skip
            if value is None and name == "warmup_layers":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"svg: {name} must be an int >= {low}, got {value!r}")
        if error not in ERRORS:
            raise ValueError(f"svg: error must be one of {ERRORS}, got {error!r}")
        if not valid_block_size(block_size):
            raise ValueError(f"svg: block_size must be a power of two >= 16, got {block_size!r}")
        if profile_backend not in PROFILE_BACKENDS:
            raise ValueError(f"svg: profile_backend must be one of {PROFILE_BACKENDS}, got {profile_backend!r}")
        given = dict(widths=widths, sink=sink, profile_masks=profile_masks, row_sampling=row_sampling, choice=choice)
        at = MODES.index(mode)
        for name, value in given.items():
            if value is None:
                value = VARIANTS[name][at]
            elif name == "sink" and not isinstance(value, bool):
                raise ValueError(f"svg: sink must be True, False or None, got {value!r}")
            elif name != "sink" and value not in CHOICES[name]:
                raise ValueError(f"svg: {name} must be one of {CHOICES[name]}, got {value!r}")
            setattr(self, name, value)
        if decide not in CHOICES["decide"]:
            raise ValueError(f"svg: decide must be one of {CHOICES['decide']}, got {decide!r}")
        self.mode, self.decide = mode, decide
        self.density = None if density is None else float(density)
        self.warmup_steps, self.warmup_layers = warmup_steps, warmup_layers
        self.sampled_rows, self.error, self.record, self.seed = sampled_rows, error, record, seed
        self.num_steps, self.block_size, self.chunk = num_steps, block_size, chunk
        self.profile_backend = profile_backend
        self.last_profile_backend: str | None = None  # what the last classification ran on
        self.last_decided_on: str | None = None  # "device" or "host"
        self.spec: ModelSpec | None = None  # set by the integration; used by to_plan and the reference settings
        self.timing = False
        self.last_errors: torch.Tensor | None = None
        self._timings: list[tuple[int, Any, Any]] = []
        self._heads: dict[tuple, tuple[Pattern, ...]] = {}  # one tuple object per choice (memo-friendly)
        self._rows: dict[tuple, torch.Tensor] = {}  # the fused kernel's rows per (layout, step, layer, device)
        self._last_step = -1
        self.generations: list[dict] = []  # per generation: {"layout", "warmup", "steps": {step: {layer: ...}}}
        self.disagreements = 0  # later calls of a recorded (step, layer) that chose otherwise

    # --- configuration ------------------------------------------------------------------------

    def steps_known(self) -> int | None:
        n = self.num_steps() if callable(self.num_steps) else self.num_steps
        return n if n else None

    def reference(self, layout: VideoLayout) -> ref.ReferenceConfig:
        """The reference's settings for this model (from ``spec``; else guessed from ``layout``)."""
        spec = self.spec
        return ref.reference_config(spec.family if spec else None, spec.name if spec else None, layout)

    def density_for(self, layout: VideoLayout) -> float:
        if self.density is not None:
            return self.density
        return self.reference(layout).density if self.mode == "reference" else 0.3

    def warmup_steps_now(self, layout: VideoLayout | None = None) -> int:
        """Dense warm-up steps of the current generation."""
        if isinstance(self.warmup_steps, int):
            return self.warmup_steps
        n = self.steps_known()
        if self.warmup_steps is None and self.mode == "reference":
            config = self.reference(layout or VideoLayout(1, 1, 1))
            return config.warmup_steps(n or REFERENCE_STEPS_UNKNOWN)
        fraction = DEFAULT_WARMUP_FRACTION if self.warmup_steps is None else self.warmup_steps
        return WARMUP_STEPS_UNKNOWN if n is None else round(fraction * n)

    def warmup_layers_now(self, layout: VideoLayout | None = None) -> int:
        if self.warmup_layers is not None:
            return self.warmup_layers
        if self.mode == "reference" and self.spec is not None:
            return self.reference(layout or VideoLayout(1, 1, 1)).warmup_layers(self.spec.num_layers)
        return 1

    def sink_frames(self, layout: VideoLayout) -> float:
        on = self.reference(layout).sink if self.sink is None else self.sink
        return 1.0 if on else 0.0

    def widths(self, layout: VideoLayout) -> Widths:
        """Fitted band widths (``widths="fitted"``) at this layout's density."""
        return band_widths(layout, self.density_for(layout), self.block_size)

    def candidates(self, layout: VideoLayout) -> tuple[Pattern, Pattern]:
        """(spatial, temporal) patterns the heads run."""
        return _candidates(self.widths, self.sink_frames(layout), self.reference(layout), layout,
                           self.density_for(layout), self.block_size)  # fmt: skip

    def profile_patterns(self, layout: VideoLayout) -> tuple[Pattern, Pattern]:
        """(spatial, temporal) masks the heads are profiled against."""
        if self.profile_masks == "executed":
            return self.candidates(layout)
        return _profile(self.reference(layout), layout, self.block_size, self.sink_frames(layout))

    def rows(self, layout: VideoLayout, step: int, layer: int) -> torch.Tensor:
        """The sampled query positions of a call (int64, CPU)."""
        if self.row_sampling == "stratified":
            return sample_rows(layout, self.sampled_rows, step, layer, self.seed)
        return ref.reference_rows(layout, self.sampled_rows, self.reference(layout).max_row, step, layer, self.seed)

    # --- deciding -----------------------------------------------------------------------------

    def __call__(self, call) -> tuple[Pattern, ...] | HeadChoice | None:
        step, layer, layout = call.step, call.layer, call.layout
        if step < self._last_step or not self.generations:
            self._new_generation()
        self._last_step = step
        warmup = self.warmup_steps_now(layout)
        if self.density_for(layout) >= 1.0 or step < warmup or layer < self.warmup_layers_now(layout):
            return None
        start = clock(call.q) if self.timing else None
        outputs, masses = self._sampled(call.q, call.k, call.v, layout, step, layer)
        per_sample = self.choice == "per_sample"
        if self._on_device(call):  # errors and choice on the device (one launch on CUDA): no host sync
            errors, selected = errors_and_choice(outputs, masses, self.error, per_sample)  # ties: spatial
            if start is not None:
                self._timings.append((step, start, clock(call.q)))
            self.last_errors, self.last_decided_on = errors, "device"
            return HeadChoice(self.candidates(layout), selected)
        errors = sampled_errors(outputs, masses, self.error, per_sample=per_sample)
        if start is not None:
            self._timings.append((step, start, clock(call.q)))
        self.last_decided_on = "host"
        errors = self.last_errors = errors.cpu()  # the host path's one sync
        selected = errors.argmin(0).to(torch.int32)
        patterns = self._patterns(layout, tuple(selected.reshape(-1, selected.shape[-1])[0].tolist()))
        if self.record:  # the first sample's choice (a plan has one pattern per head)
            self._remember(step, layer, layout, warmup, patterns, errors)
        if selected.dim() == 2 and bool((selected != selected[:1]).any()):
            return HeadChoice(self.candidates(layout), selected)  # samples disagree: one launch per group
        return patterns

    def _on_device(self, call) -> bool:
        if self.record or self.decide == "host":
            return False
        if self.decide == "device":
            return True
        state = getattr(call, "state", None)
        if state is None:
            return False
        from ..kernels.api import resolve_backend
        from ..kernels.select import decides_on_device

        return decides_on_device(resolve_backend(state.backend, call.q))

    def classify(self, q, k, v, layout: VideoLayout, step: int, layer: int) -> torch.Tensor:
        """float32 errors of the spatial and the temporal mask for this call: ``[2, heads]``, or
        ``[2, batch, heads]`` with ``choice="per_sample"``."""
        outputs, masses = self._sampled(q, k, v, layout, step, layer)
        return sampled_errors(outputs, masses, self.error, per_sample=self.choice == "per_sample")

    def _sampled(self, q, k, v, layout: VideoLayout, step: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`sampled_outputs` of this call's rows under the profile masks (the fused Triton pass
        where it runs; ``auto`` falls back to torch once, with a warning, if it fails)."""
        patterns = self.profile_patterns(layout)
        backend = self.profile_backend
        if backend == "auto":
            backend = "triton" if q.is_cuda and _triton_ok(q, patterns) else "torch"
        args = (q, k, v, layout, patterns, self.block_size)
        try:
            rows = self._kernel_rows(layout, step, layer, q.device) if backend == "triton" else self.rows(layout, step, layer)
            outputs, masses = sampled_outputs(*args[:3], rows, *args[3:], backend=backend, chunk=self.chunk)
        except Exception as err:  # noqa: BLE001 - only where "auto" chose triton
            if self.profile_backend != "auto" or backend != "triton":
                raise
            logger.warning("sparse-vdit svg: the fused Triton profiling failed (%s: %s); using torch from now on",
                           type(err).__name__, err)  # fmt: skip
            self.profile_backend = backend = "torch"
            outputs, masses = sampled_outputs(*args[:3], self.rows(layout, step, layer), *args[3:], backend=backend,
                                              chunk=self.chunk)  # fmt: skip
        self.last_profile_backend = backend
        return outputs, masses

    def _kernel_rows(self, layout: VideoLayout, step: int, layer: int, device: torch.device) -> torch.Tensor:
        """:meth:`rows` as the fused kernel reads them (int32 on ``device``), kept per (layout, step,
        layer): a later generation (same seed, same rows) sends nothing, and a captured step copies nothing."""
        settings = (self.seed, self.sampled_rows, self.row_sampling, self.reference(layout).max_row)  # may be reset
        key = (layout, step, layer, device, settings)
        hit = self._rows.get(key)
        if hit is None:
            if len(self._rows) > 8192:
                self._rows.clear()
            rows = self.rows(layout, step, layer).to(torch.int32)
            if device.type == "cuda":  # pinned: the copy is queued without waiting for anything (no host sync)
                rows = rows.pin_memory()
            hit = self._rows[key] = rows.to(device, non_blocking=True)
        return hit

    def _patterns(self, layout: VideoLayout, selected: tuple[int, ...]) -> tuple[Pattern, ...]:
        key = (layout, selected)
        hit = self._heads.get(key)
        if hit is None:
            candidates = self.candidates(layout)
            hit = tuple(candidates[i] for i in selected)
            if len(self._heads) > 4096:
                self._heads.clear()
            self._heads[key] = hit
        return hit

    # --- recording ----------------------------------------------------------------------------

    def _new_generation(self) -> None:
        if self.record or not self.generations:
            self.generations.append({"layout": None, "warmup": None, "steps": {}})
        else:  # without recording keep only the current one
            self.generations[-1] = {"layout": None, "warmup": None, "steps": {}}

    def _remember(self, step, layer, layout, warmup, patterns, errors) -> None:
        gen = self.generations[-1]
        gen["layout"] = gen["layout"] or layout
        gen["warmup"] = warmup
        layers = gen["steps"].setdefault(step, {})
        if layer in layers:
            self.disagreements += layers[layer][0] != patterns
            return
        layers[layer] = (patterns, errors)

    def to_plan(self, model: Any = None, generation: int = -1) -> Plan:
        """The recorded decisions of one generation (default: the last) as a :class:`Plan`.

        One step range per run of steps with the same choices (a dense range for the warm-up);
        the warm-up is also set as the plan's warm-up. A (step, layer) seen more than once (a
        separate classifier-free-guidance pass) keeps its first call's choice, and with
        ``choice="per_sample"`` the first sample's choice is recorded. Needs
        ``record=True`` and the model (``model=`` or set by ``sparse_vdit.apply``).
        """
        spec = as_spec(model) if model is not None else self.spec
        if spec is None:
            raise ValueError("svg.to_plan needs the model: pass model= (a ModelSpec, name or model)")
        if not self.record:
            raise ValueError("svg.to_plan needs record=True (nothing was recorded)")
        recorded = [g for g in self.generations if g["steps"]]
        if not recorded:
            raise ValueError("svg.to_plan: no sparse step recorded yet (run a generation past the warm-up)")
        gen = recorded[generation]
        dense_layer = (dense(),) * spec.num_heads
        ranges: list[StepRange] = [StepRange(0, (dense_layer,) * spec.num_layers)] if gen["warmup"] else []
        for step in sorted(gen["steps"]):
            layers = gen["steps"][step]
            if any(len(p) != spec.num_heads for p, _ in layers.values()) or max(layers) >= spec.num_layers:
                raise ValueError(f"svg.to_plan: the recorded layers and heads do not fit {spec.describe()}")
            rows = tuple(layers[i][0] if i in layers else dense_layer for i in range(spec.num_layers))
            if ranges and ranges[-1].layers == rows:
                continue
            ranges.append(StepRange(0 if not ranges else step, rows))
        layout = gen["layout"]
        s, t = self.candidates(layout)
        made_by = {"method": "svg", "mode": self.mode, "density": self.density_for(layout),
                   "widths": {"spatial": s.width, "temporal": t.width}, "sink": s.sink,
                   "variant": {name: getattr(self, name) for name in VARIANTS}, "sampled_rows": self.sampled_rows,
                   "error": self.error, "seed": self.seed, "steps_recorded": len(gen["steps"])}  # fmt: skip
        layers = min(self.warmup_layers_now(layout), spec.num_layers)
        return Plan(spec, tuple(ranges), gen["warmup"], layers, self.block_size, layout, made_by)

    def errors(self, generation: int = -1) -> dict[tuple[int, int], torch.Tensor]:
        """Recorded errors (spatial, temporal; ``[2, heads]`` or ``[2, batch, heads]``) by (step, layer)."""
        gen = [g for g in self.generations if g["steps"]][generation]
        return {(s, layer): e for s, layers in gen["steps"].items() for layer, (_, e) in layers.items()}

    # --- timing -------------------------------------------------------------------------------

    def profile_seconds(self) -> dict[int, float]:
        """Seconds spent classifying, per step, since :meth:`reset_timings` (needs ``timing``; synchronises)."""
        return seconds_per_step(self._timings)

    def reset_timings(self) -> None:
        self._timings.clear()

    def __repr__(self) -> str:
        variant = ", ".join(f"{name}={getattr(self, name)!r}" for name in VARIANTS)
        return (f"SVG(density={self.density!r}, mode={self.mode!r}, warmup_steps={self.warmup_steps!r}, "
                f"warmup_layers={self.warmup_layers!r}, sampled_rows={self.sampled_rows}, error={self.error!r}, "
                f"{variant}, decide={self.decide!r})")  # fmt: skip


__all__ = ["ERRORS", "MODES", "SVG", "VARIANTS", "Widths", "band_widths", "errors_and_choice", "fused_inputs", "row_masks", "row_ranges", "sample_rows",
           "sampled_errors", "sampled_outputs", "token_major_positions"]  # fmt: skip
