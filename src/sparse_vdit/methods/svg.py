"""Sparse VideoGen (SVG), the online method: spatial or temporal, decided per head every step.

At every sparse step and layer, :class:`SVG` samples a few query rows spread over all frames,
computes their exact attention and the same rows under the ``spatial(w_s)`` and the
``temporal(w_t)`` band, and gives each head the band whose output is closer to the exact one
(:func:`sampled_errors`). Temporal heads run token-major; the layer's mixed table goes to
:func:`~sparse_vdit.sparse_attention` in one launch. ``density`` fixes both widths so that either
band computes that share of blocks, text included (:func:`band_widths`).

Design choices (ours; the paper gives none of these):

- **Error measure**: mean squared error of the sampled rows' *outputs* against the exact outputs
  (``error="output"``, SVG's own choice). It is what the next layer sees: keys left out whose
  values resemble the kept ones cost little, which an attention-only measure cannot know.
  ``error="mass"`` (attention mass outside the mask, half the L1 distance of the attention rows)
  is offered for comparison.
- **Rows**: stratified over the video tokens (one row drawn uniformly in each of ``sampled_rows``
  equal slices of the video), so every frame and every region is seen; text rows are never
  sampled (they attend to everything in both bands, so they cannot tell them apart). Rows are a
  function of ``(seed, step, layer)`` only, the same on every device.
- **Masks**: never materialised per head or on the host: the key blocks of a sampled row are read
  from the band table's row of its query block (token-major positions for the temporal band, by
  index arithmetic), compared with each key's block index on the device: ``rows x keys`` booleans.
- **Cost**: on a GPU one fused Triton pass over the keys computes the exact and both masked
  outputs of the sampled rows without storing scores (reads K and V once); the torch path (CPU,
  reference) holds scores ``rows x keys`` for a chunk of heads at a time, never ``N x N``. One
  extra host sync per layer (the choice must be known on the host to pick the table). The
  classification is timed on its own (:meth:`SVG.profile_seconds`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ..block_table import DEFAULT_BLOCK, is_power_of_two, num_blocks, valid_block_size
from ..layout import VideoLayout
from ..patterns import Pattern, compile_layer, dense, head_ranges, spatial, temporal
from ..plan import ModelSpec, Plan, StepRange, as_spec
from ..timing import clock, seconds_per_step

logger = logging.getLogger("sparse_vdit")

ERRORS = ("output", "mass")
DEFAULT_WARMUP_FRACTION = 0.25  # of the steps, when their number is known
WARMUP_STEPS_UNKNOWN = 12  # 25% of the usual 50 steps, when it is not
DEFAULT_CHUNK = 1 << 24  # score elements (samples x heads x rows x keys) computed at once


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


# --- sampled rows and their masks ------------------------------------------------------------


def sample_rows(layout: VideoLayout, count: int, step: int, layer: int, seed: int = 0) -> torch.Tensor:
    """``count`` distinct query positions (int64, CPU, ascending), one per equal slice of the video.

    A function of ``(seed, step, layer)`` only. All video tokens if ``count`` exceeds them.
    """
    video = layout.video_tokens
    if count >= video:
        return torch.arange(video) + layout.video_start
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) * 10_007 + layer)
    edges = torch.arange(count + 1, dtype=torch.float64) * (video / count)
    u = torch.rand(count, generator=g, dtype=torch.float64)
    rows = torch.floor(edges[:-1] + u * (edges[1:] - edges[:-1])).long().clamp(max=video - 1)
    return rows + layout.video_start


def token_major_positions(pos: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """Where sequence positions ``pos`` (frame-major) sit in the token-major order; text stays.

    Index arithmetic equal to ``layout.frame_major_order()[pos]``: video token ``f * S + p`` goes
    to ``p * F + f``.
    """
    v0, s, f = layout.video_start, layout.frame_tokens, layout.frames
    i = pos - v0
    video = (i >= 0) & (i < layout.video_tokens)
    return torch.where(video, v0 + (i % s) * f + torch.div(i, s, rounding_mode="floor"), pos)


@lru_cache(maxsize=32)
def _key_blocks(layout: VideoLayout, block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Block index of every key ``[0, kv_len)`` in frame-major and in token-major order."""
    keys = torch.arange(layout.kv_len, device=device)
    return keys // block, token_major_positions(keys, layout) // block


def row_ranges(
    rows: torch.Tensor, layout: VideoLayout, patterns: Sequence[Pattern], block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 ``[len(patterns), rows, ranges]``: each sampled row's key-block ranges under each pattern.

    The rows of the patterns' block tables for the rows' query blocks, in each pattern's own
    token order (token-major block numbers for ``temporal``); unused slots are empty ranges.
    """
    starts, ends = [], []
    for pattern in patterns:
        table = compile_layer([pattern], layout, block, rows.device)
        position = token_major_positions(rows, layout) if pattern.token_major else rows
        starts.append(table.range_starts[0, position // block])
        ends.append(table.range_ends[0, position // block])
    width = max(x.shape[1] for x in starts)
    pad = lambda x: torch.nn.functional.pad(x, (0, width - x.shape[1]))  # noqa: E731
    return torch.stack([pad(x) for x in starts]), torch.stack([pad(x) for x in ends])


def row_masks(rows: torch.Tensor, layout: VideoLayout, patterns: Sequence[Pattern], block: int) -> torch.Tensor:
    """Bool ``[len(patterns), rows, kv_len]``: the keys each sampled row visits under each pattern.

    :func:`row_ranges` compared with every key's block index (frame-major or token-major), on
    ``rows.device``: no ``N x N`` mask and no per-head mask.
    """
    starts, ends = row_ranges(rows, layout, patterns, block)
    frame_kb, token_kb = _key_blocks(layout, block, rows.device)
    out = []
    for i, pattern in enumerate(patterns):
        kb = token_kb if pattern.token_major else frame_kb
        out.append(((kb >= starts[i, ..., None]) & (kb < ends[i, ..., None])).any(1))
    return torch.stack(out)


def fused_inputs(
    rows: torch.Tensor, layout: VideoLayout, patterns: Sequence[Pattern], block: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused kernel's rows (int32 ``[R]``) and ranges (int32 ``[2, NR, R]``) on ``device``,
    computed on the CPU and sent in one copy (a few host operations instead of a dozen launches)."""
    rows = rows.cpu()
    starts, ends = (x.transpose(1, 2) for x in row_ranges(rows, layout, patterns, block))
    packed = torch.cat([rows.to(torch.int32), starts.flatten(), ends.flatten()])  # tables are int32
    packed = packed.to(device, non_blocking=True)
    r, size = rows.numel(), starts.numel()
    return packed[:r], packed[r : r + size].view(starts.shape), packed[r + size :].view(ends.shape)


PROFILE_BACKENDS = ("auto", "torch", "triton")
_TRITON_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _triton_ok(q: torch.Tensor, patterns: Sequence[Pattern]) -> bool:
    dim = q.shape[-1]
    if len(patterns) != 2 or dim < 16 or dim > 256 or not is_power_of_two(dim) or q.dtype not in _TRITON_DTYPES:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def sampled_outputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rows: torch.Tensor,
    layout: VideoLayout,
    patterns: Sequence[Pattern],
    block: int,
    *,
    softmax_scale: float | None = None,
    backend: str = "torch",
    chunk: int = DEFAULT_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of the sampled ``rows`` and the same rows under each pattern's mask.

    Args:
        q, k, v: ``(batch, seq, heads, dim)`` at ``layout`` (keys beyond ``layout.kv_len`` unused).
        rows: int64 ``[R]`` query positions, on the CPU (cheapest for ``"triton"``) or q's device.
        backend: ``"torch"``: scores ``[heads_per_chunk, R, kv_len]`` for a chunk of heads at a
            time (``chunk`` elements), masks from :func:`row_masks`; memory
            ``O(chunk + patterns x R x kv_len)``. ``"triton"``: one fused pass over the keys
            (:mod:`sparse_vdit.kernels.triton.sampled`, two patterns), scores never stored.
            Matmuls in q's dtype (float32 accumulation), softmax and sums in float32.

    Returns:
        outputs float32 ``[B, H, 1 + M, R, D]`` (exact first, each renormalised over its own keys)
        and the attention mass each keeps, float32 ``[B, H, 1 + M, R]`` (the exact one is 1).
    """
    if backend not in ("torch", "triton"):
        raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
    batch, _, heads, dim = q.shape
    kv_len = layout.kv_len
    scale = dim**-0.5 if softmax_scale is None else softmax_scale
    if backend == "triton":
        from ..kernels.triton.sampled import sampled_outputs as fused

        rows, starts, ends = fused_inputs(rows, layout, patterns, block, q.device)
        geometry = (layout.frames, layout.frame_tokens, layout.video_start, layout.video_tokens)
        return fused(q, k, v, rows, starts, ends, tuple(p.token_major for p in patterns),
                     kv_len=kv_len, softmax_scale=scale, block_size=block, layout=geometry)  # fmt: skip
    rows = rows.to(q.device)
    m, r = len(patterns), rows.numel()
    masks = row_masks(rows, layout, patterns, block)
    keep = torch.cat([masks.new_ones(1, r, kv_len), masks]).view(1, m + 1, r, kv_len)
    q_rows = q.index_select(1, rows) * scale  # [B, R, H, D]
    outputs = torch.empty(batch, heads, m + 1, r, dim, dtype=torch.float32, device=q.device)
    masses = torch.empty(batch, heads, m + 1, r, dtype=torch.float32, device=q.device)
    group = max(1, min(heads, chunk // max(1, r * kv_len)))
    for b in range(batch):
        for h0 in range(0, heads, group):
            h1 = min(heads, h0 + group)
            qc = q_rows[b, :, h0:h1].transpose(0, 1)  # [h, R, D]
            kc = k[b, :kv_len, h0:h1].transpose(0, 1)  # [h, kv, D], a strided view
            vc = v[b, :kv_len, h0:h1].transpose(0, 1)
            probs = torch.softmax(torch.bmm(qc, kc.transpose(1, 2)), dim=-1)  # float32 inside
            kept = torch.where(keep, probs[:, None], 0).view(h1 - h0, (m + 1) * r, kv_len)
            mass = kept.sum(-1, dtype=torch.float32).view(h1 - h0, m + 1, r)
            o = torch.bmm(kept, vc).float().view(h1 - h0, m + 1, r, dim)
            outputs[b, h0:h1] = o / mass.clamp_min(1e-30)[..., None]
            masses[b, h0:h1] = mass / mass[:, :1].clamp_min(1e-30)
    return outputs, masses


def sampled_errors(outputs: torch.Tensor, masses: torch.Tensor, error: str = "output") -> torch.Tensor:
    """float32 ``[M, heads]``: how far each mask's rows are from the exact rows (:func:`sampled_outputs`).

    ``"output"``: mean squared error of the outputs over rows, dims and batch; ``"mass"``:
    exact attention mass outside the mask, mean over rows and batch.
    """
    if error not in ERRORS:
        raise ValueError(f"error must be one of {ERRORS}, got {error!r}")
    if error == "mass":
        return (1 - masses[:, :, 1:]).mean((0, -1)).T.contiguous()
    return (outputs[:, :, 1:] - outputs[:, :, :1]).square().mean((0, -1, -2)).T.contiguous()


# --- the pattern source ----------------------------------------------------------------------


class SVG:
    """SVG as a pattern source: ``source(call) -> patterns | None`` (see the diffusers integration).

    Args:
        density: computed share of blocks of every sparse layer, text included, in (0, 1];
            1 means dense.
        warmup_steps: dense steps first: an int, or a fraction of the steps (default 0.25) when
            their number is known (``num_steps``, or the pipeline's scheduler through ``apply``),
            else ``WARMUP_STEPS_UNKNOWN`` steps.
        warmup_layers: dense layers first (default 1).
        sampled_rows: query rows profiled per layer call (default 64).
        error: ``"output"`` (default) or ``"mass"``; see the module docstring.
        record: keep every sparse decision (and its errors) for :meth:`to_plan`.
        seed: varies the sampled rows.
        num_steps: steps of a generation, or a callable giving it (None if unknown).
        block_size: of the tables (the integration's; default 128).
        profile_backend: ``"auto"`` (the fused Triton pass on CUDA, else torch), ``"torch"`` or
            ``"triton"`` (see :func:`sampled_outputs`); ``auto`` falls back to torch, with a
            warning, if the Triton kernel fails.
        chunk: score elements computed at once by the torch path.

    After a call, ``last_errors`` holds ``[2, heads]`` (spatial, temporal) on the CPU. With
    ``timing = True`` the classification of every call is timed (CUDA events on a GPU).
    """

    def __init__(
        self,
        density: float = 0.3,
        *,
        warmup_steps: int | float | None = None,
        warmup_layers: int = 1,
        sampled_rows: int = 64,
        error: str = "output",
        record: bool = False,
        seed: int = 0,
        num_steps: int | Callable[[], int | None] | None = None,
        block_size: int = DEFAULT_BLOCK,
        profile_backend: str = "auto",
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0.0 < density <= 1.0:
            raise ValueError(f"svg: density must lie in (0, 1], got {density!r}")
        if warmup_steps is None:
            warmup_steps = DEFAULT_WARMUP_FRACTION
        if isinstance(warmup_steps, bool) or not (
            (isinstance(warmup_steps, int) and warmup_steps >= 0)
            or (isinstance(warmup_steps, float) and 0.0 <= warmup_steps < 1.0)
        ):
            raise ValueError(f"svg: warmup_steps must be an int >= 0 or a fraction in [0, 1), got {warmup_steps!r}")
        for name, value, low in (("warmup_layers", warmup_layers, 0), ("sampled_rows", sampled_rows, 1),
                                 ("seed", seed, 0), ("chunk", chunk, 1)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"svg: {name} must be an int >= {low}, got {value!r}")
        if error not in ERRORS:
            raise ValueError(f"svg: error must be one of {ERRORS}, got {error!r}")
        if not valid_block_size(block_size):
            raise ValueError(f"svg: block_size must be a power of two >= 16, got {block_size!r}")
        if profile_backend not in PROFILE_BACKENDS:
            raise ValueError(f"svg: profile_backend must be one of {PROFILE_BACKENDS}, got {profile_backend!r}")
        self.density, self.warmup_steps, self.warmup_layers = float(density), warmup_steps, warmup_layers
        self.sampled_rows, self.error, self.record, self.seed = sampled_rows, error, record, seed
        self.num_steps, self.block_size, self.chunk = num_steps, block_size, chunk
        self.profile_backend = profile_backend
        self.last_profile_backend: str | None = None  # what the last classification ran on
        self.spec: ModelSpec | None = None  # set by the integration; used by to_plan
        self.timing = False
        self.last_errors: torch.Tensor | None = None
        self._timings: list[tuple[int, Any, Any]] = []
        self._heads: dict[tuple, tuple[Pattern, ...]] = {}  # one tuple object per choice (memo-friendly)
        self._last_step = -1
        self.generations: list[dict] = []  # per generation: {"layout", "warmup", "steps": {step: {layer: ...}}}
        self.disagreements = 0  # later calls of a recorded (step, layer) that chose otherwise

    # --- configuration ------------------------------------------------------------------------

    def steps_known(self) -> int | None:
        n = self.num_steps() if callable(self.num_steps) else self.num_steps
        return n if n else None

    def warmup_steps_now(self) -> int:
        """Dense warm-up steps of the current generation."""
        if isinstance(self.warmup_steps, int):
            return self.warmup_steps
        n = self.steps_known()
        return WARMUP_STEPS_UNKNOWN if n is None else round(self.warmup_steps * n)

    def widths(self, layout: VideoLayout) -> Widths:
        return band_widths(layout, self.density, self.block_size)

    # --- deciding -----------------------------------------------------------------------------

    def __call__(self, call) -> tuple[Pattern, ...] | None:
        step, layer, layout = call.step, call.layer, call.layout
        if step < self._last_step or not self.generations:
            self._new_generation()
        self._last_step = step
        warmup = self.warmup_steps_now()
        if self.density >= 1.0 or step < warmup or layer < self.warmup_layers:
            return None
        start = clock(call.q) if self.timing else None
        errors = self.classify(call.q, call.k, call.v, layout, step, layer)
        if start is not None:
            self._timings.append((step, start, clock(call.q)))
        errors = errors.cpu()  # the one sync: the table is chosen on the host
        temporal_heads = tuple((errors[1] < errors[0]).tolist())
        patterns = self._patterns(layout, temporal_heads)
        self.last_errors = errors
        if self.record:
            self._remember(step, layer, layout, warmup, patterns, errors)
        return patterns

    def classify(self, q, k, v, layout: VideoLayout, step: int, layer: int) -> torch.Tensor:
        """float32 ``[2, heads]`` errors of the spatial and the temporal band for this call."""
        rows = sample_rows(layout, self.sampled_rows, step, layer, self.seed)  # CPU; moved where needed
        patterns = self.widths(layout).patterns()
        backend = self.profile_backend
        if backend == "auto":
            backend = "triton" if q.is_cuda and _triton_ok(q, patterns) else "torch"
        args = (q, k, v, rows, layout, patterns, self.block_size)
        try:
            outputs, masses = sampled_outputs(*args, backend=backend, chunk=self.chunk)
        except Exception as err:  # noqa: BLE001 - only where "auto" chose triton
            if self.profile_backend != "auto" or backend != "triton":
                raise
            logger.warning("sparse-vdit svg: the fused Triton profiling failed (%s: %s); using torch from now on",
                           type(err).__name__, err)  # fmt: skip
            self.profile_backend = backend = "torch"
            outputs, masses = sampled_outputs(*args, backend=backend, chunk=self.chunk)
        self.last_profile_backend = backend
        return sampled_errors(outputs, masses, self.error)

    def _patterns(self, layout: VideoLayout, temporal_heads: tuple[bool, ...]) -> tuple[Pattern, ...]:
        key = (layout, temporal_heads)
        hit = self._heads.get(key)
        if hit is None:
            s, t = self.widths(layout).patterns()
            hit = tuple(t if is_t else s for is_t in temporal_heads)
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
        separate classifier-free-guidance pass) keeps its first call's choice. Needs
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
        widths = self.widths(gen["layout"])
        made_by = {"method": "svg", "density": self.density, "widths": {"spatial": widths.spatial, "temporal":
                   widths.temporal}, "sampled_rows": self.sampled_rows, "error": self.error, "seed": self.seed,
                   "steps_recorded": len(gen["steps"])}  # fmt: skip
        return Plan(spec, tuple(ranges), gen["warmup"], min(self.warmup_layers, spec.num_layers), self.block_size,
                    gen["layout"], made_by)  # fmt: skip

    def errors(self, generation: int = -1) -> dict[tuple[int, int], torch.Tensor]:
        """Recorded ``[2, heads]`` errors (spatial, temporal) by (step, layer)."""
        gen = [g for g in self.generations if g["steps"]][generation]
        return {(s, layer): e for s, layers in gen["steps"].items() for layer, (_, e) in layers.items()}

    # --- timing -------------------------------------------------------------------------------

    def profile_seconds(self) -> dict[int, float]:
        """Seconds spent classifying, per step, since :meth:`reset_timings` (needs ``timing``; synchronises)."""
        return seconds_per_step(self._timings)

    def reset_timings(self) -> None:
        self._timings.clear()

    def __repr__(self) -> str:
        return (f"SVG(density={self.density:g}, warmup_steps={self.warmup_steps!r}, warmup_layers="
                f"{self.warmup_layers}, sampled_rows={self.sampled_rows}, error={self.error!r})")  # fmt: skip


__all__ = ["ERRORS", "SVG", "Widths", "band_widths", "fused_inputs", "row_masks", "row_ranges", "sample_rows",
           "sampled_errors", "sampled_outputs", "token_major_positions"]  # fmt: skip
