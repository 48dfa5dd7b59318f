"""Generate organism videos under several attention methods and compare them with dense.

The shared core of ``sparse-vdit demo`` and ``bench/fidelity.py``. A :class:`Method` is dense,
a fixed :class:`~sparse_vdit.Plan` (searched, uniform window, skip-only) or SVG (decided online);
:func:`run_method` generates one video per (caption, seed) through the diffusers integration
(dense too, so attention is timed the same way on every row) and :func:`score` compares a run's
videos with the dense ones (:mod:`sparse_vdit.metrics`).

Attention density is the computed share of (head, query block, key block) pairs averaged over
all steps, warm-up included: the attention FLOPs relative to dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .block_table import BlockTable
from .integrations.diffusers import apply, remove
from .layout import VideoLayout
from .methods.protocol import PatternSource
from .metrics import psnr, ssim
from .patterns import compile_layer
from .plan import Plan
from .timing import clock, seconds_between


@dataclass(frozen=True)
class Method:
    """One way to compute attention: ``kind`` is ``"dense"``, ``"plan"``, ``"svg"`` or ``"source"``
    (``source()`` makes a fresh pattern source for the run, e.g. an oracle of
    :mod:`sparse_vdit.methods.oracle`)."""

    name: str
    kind: str
    plan: Plan | None = None
    svg: dict = field(default_factory=dict)  # options of apply(method="svg"), e.g. {"density": 0.3}
    source: Callable[[], PatternSource] | None = None
    note: str = ""
    info: dict = field(default_factory=dict)  # recorded beside the method's scores (e.g. search time)

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "plan", "svg", "source"):
            raise ValueError(f"method kind must be 'dense', 'plan', 'svg' or 'source', got {self.kind!r}")
        if self.kind == "plan" and self.plan is None:
            raise ValueError(f"method {self.name!r}: kind 'plan' needs a plan")
        if self.kind == "source" and self.source is None:
            raise ValueError(f"method {self.name!r}: kind 'source' needs a source")


@dataclass
class Run:
    """The videos of one method (``(n, frames, 3, H, W)``, CPU float32) and what they cost."""

    method: Method
    videos: torch.Tensor
    seconds: float  # wall time of all generations
    attention_seconds: float  # inside the self-attention calls (SVG profiling included)
    density: float  # attention FLOPs / dense, all steps



def organism_sampler(transformer: Any, spec: Any = None, **kwargs):
    """A sampler for :func:`sparse_vdit.search`: :func:`sparse_vdit.organism.sample` on one caption."""
    from .organism.model import sample

    def run(prompt, seed: int, steps: int):
        return sample(transformer, [prompt], seed=seed, steps=steps, spec=spec, progress=False, **kwargs)

    return run

def layout_of(spec: Any) -> VideoLayout:
    """The organism's self-attention layout (video tokens only; text enters by cross-attention)."""
    return VideoLayout(*spec.token_grid)


def run_method(
    transformer: Any,
    method: Method,
    videos: Sequence[tuple[str, int]],
    *,
    steps: int,
    spec: Any,
    backend: str = "auto",
    block_size: int = 64,
    progress: bool = True,
) -> Run:
    """Generate one video per ``(caption, seed)`` with ``method`` installed on the organism."""
    from .organism.model import sample

    if method.kind == "svg":
        options = {"num_steps": steps, **method.svg}  # the bare transformer has no scheduler to ask
        state = apply(transformer, method="svg", backend=backend, block_size=block_size, record=True, **options)
    elif method.kind == "source":
        state = apply(transformer, pattern_source=method.source(), backend=backend, block_size=block_size)
        counted = _CallDensity(block_size)
        state.observers.append(counted)
    else:
        plan = method.plan if method.kind == "plan" else Plan.dense(transformer, block_size=block_size)
        state = apply(transformer, plan, backend=backend)
    state.timing = True
    layout, param = layout_of(spec), transformer.patch_embedding.weight
    outs, densities, seconds = [], [], 0.0
    try:
        for n, (caption, seed) in enumerate(videos):
            label = method.name if len(videos) == 1 else f"{method.name} ({n + 1}/{len(videos)})"
            with tqdm(total=steps, desc=label, unit="step", disable=not progress, leave=False) as bar:
                start = clock(param)
                video = sample(transformer, [caption], seed=seed, steps=steps, spec=spec, progress=False,
                               callback=lambda i, t: bar.update(1) if i else None)  # fmt: skip
                outs.append(video.cpu())
                seconds += seconds_between(start, clock(param))
                bar.update(steps - bar.n)
            densities.append(counted.pop() if method.kind == "source" else _density(method, state, layout, steps))
        attention = sum(state.attention_seconds().values())
    finally:
        remove(transformer)
    return Run(method, torch.cat(outs), seconds, attention, sum(densities) / len(densities))


class _CallDensity:
    """Observer: the mean computed share of blocks over the layer calls since the last :meth:`pop`."""

    def __init__(self, block: int) -> None:
        self.block, self.shares = block, []

    def __call__(self, call, patterns, out) -> None:
        table = getattr(patterns, "table", patterns)  # a method's runner (methods.cluster.PermutedTable) holds one
        if patterns is None:
            self.shares.append(1.0)
        elif isinstance(table, BlockTable):  # left on the device: read once the run is over, not in every call
            cells = table.num_heads * table.num_q_blocks * table.num_kv_blocks
            self.shares.append(table.kv_num_blocks.sum(dtype=torch.float64) / cells)
        else:
            self.shares.append(compile_layer(tuple(patterns), call.layout, self.block).density)

    def pop(self) -> float:
        shares, self.shares = self.shares, []
        return sum(float(s) for s in shares) / len(shares) if shares else 1.0


def _density(method: Method, state, layout: VideoLayout, steps: int) -> float:
    if method.kind == "dense":
        return 1.0
    if method.kind == "plan":
        return method.plan.density(layout, steps)
    try:
        return state.svg.to_plan().density(layout, steps)
    except ValueError:  # every step was warm-up
        return 1.0


def score(run: Run, reference: Run) -> dict:
    """Mean PSNR (dB) and SSIM of ``run``'s videos against ``reference``'s, and per video."""
    p, s = psnr(run.videos, reference.videos), ssim(run.videos, reference.videos)
    finite = [x for x in p if math.isfinite(x)]
    mean_psnr = sum(finite) / len(finite) if len(finite) == len(p) else math.inf
    return {"psnr": mean_psnr, "ssim": sum(s) / len(s), "psnr_per_video": p, "ssim_per_video": s}


def search_plan(
    transformer: Any,
    spec: Any,
    captions: Sequence[str],
    *,
    steps: int,
    seeds: Sequence[int] = (0,),
    block_size: int = 64,
    backend: str = "auto",
    progress: bool = True,
    **settings: Any,
) -> Plan:
    """Sparse-vDiT offline search on the organism (``settings``: epsilon, lam, candidates, ...)."""
    from .integrations.diffusers.search import search

    return search(transformer, list(captions), steps=steps, seeds=seeds, sampler=organism_sampler(transformer, spec),
                  block_size=block_size, backend=backend, progress=progress, **settings)  # fmt: skip


def oracle_mass(
    transformer: Any,
    spec: Any,
    captions: Sequence[str],
    *,
    steps: int,
    seeds: Sequence[int] = (0,),
    block_size: int = 64,
    from_step: int = 0,
    progress: bool = True,
) -> dict[int, torch.Tensor]:
    """Attention block mass per layer ``{layer: [H, Qb, Kb]}`` summed over dense generations of
    every caption x seed (steps from ``from_step``): the calibration of a
    :class:`~sparse_vdit.methods.oracle.StaticOracle`."""
    from .methods.oracle import MassRecorder
    from .organism.model import sample

    recorder = MassRecorder(block_size, from_step)
    apply(transformer, pattern_source=recorder, backend="reference", block_size=block_size)
    try:
        runs = [(c, s) for c in captions for s in seeds]
        for caption, seed in tqdm(runs, desc="oracle calibration", unit="video", disable=not progress, leave=False):
            sample(transformer, [caption], seed=seed, steps=steps, spec=spec, progress=False)
    finally:
        remove(transformer)
    return recorder.mass


def side_by_side(runs: Sequence[Run], path, index: int = 0, scale: int = 3, fps: float = 4.0,
                 labels: Sequence[str] | None = None):  # fmt: skip
    """Write video ``index`` of each run side by side (left to right, white gaps), each panel under a
    caption (``labels``, default the methods' names), as a looping GIF, or an mp4 if ``path`` ends
    in ``.mp4`` (imageio-ffmpeg)."""
    import imageio.v2 as imageio
    import numpy as np

    labels = [r.method.name for r in runs] if labels is None else list(labels)
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} videos")
    tiles = []
    for run, label in zip(runs, labels):
        v = ((run.videos[index].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        v = v.repeat(scale, 1).repeat(scale, 2)
        strip = _caption(label, v.shape[2])
        caption = np.broadcast_to(strip, (v.shape[0], *strip.shape))
        tiles += [np.concatenate([caption, v], axis=1), np.full((v.shape[0], v.shape[1] + caption.shape[1], 4, 3), 255, np.uint8)]
    frames = np.concatenate(tiles[:-1], axis=2)
    if str(path).endswith(".mp4"):  # pad to the codec's 16-pixel blocks
        pad = [(0, 0), (0, -frames.shape[1] % 16), (0, -frames.shape[2] % 16), (0, 0)]
        imageio.mimsave(path, list(np.pad(frames, pad, constant_values=255)), fps=fps, macro_block_size=16)
    else:
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    return path


def _caption(text: str, width: int, height: int = 22):
    """A white strip ``(height, width, 3)`` uint8 with ``text`` centred in black."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    strip = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(strip)
    size = 14
    font = ImageFont.load_default(size=size)
    while draw.textlength(text, font=font) > width - 4 and size > 6:
        size -= 1
        font = ImageFont.load_default(size=size)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text(((width - (right - left)) / 2 - left, (height - (bottom - top)) / 2 - top), text, fill="black", font=font)
    return np.asarray(strip)


__all__ = ["Method", "Run", "layout_of", "oracle_mass", "run_method", "score", "search_plan", "side_by_side"]
