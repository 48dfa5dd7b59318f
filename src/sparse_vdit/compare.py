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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .integrations.diffusers import apply, remove
from .layout import VideoLayout
from .metrics import psnr, ssim
from .plan import Plan
from .timing import clock, seconds_between


@dataclass(frozen=True)
class Method:
    """One way to compute attention: ``kind`` is ``"dense"``, ``"plan"`` or ``"svg"``."""

    name: str
    kind: str
    plan: Plan | None = None
    svg: dict = field(default_factory=dict)  # options of apply(method="svg"), e.g. {"density": 0.3}
    note: str = ""
    info: dict = field(default_factory=dict)  # recorded beside the method's scores (e.g. search time)

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "plan", "svg"):
            raise ValueError(f"method kind must be 'dense', 'plan' or 'svg', got {self.kind!r}")
        if self.kind == "plan" and self.plan is None:
            raise ValueError(f"method {self.name!r}: kind 'plan' needs a plan")


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
    else:
        plan = method.plan if method.kind == "plan" else Plan.dense(transformer, block_size=block_size)
        state = apply(transformer, plan, backend=backend)
    state.timing = True
    layout, param = layout_of(spec), transformer.patch_embedding.weight
    outs, densities, seconds = [], [], 0.0
    try:
        for caption, seed in tqdm(videos, desc=method.name, disable=not progress, leave=False):
            start = clock(param)
            outs.append(sample(transformer, [caption], seed=seed, steps=steps, spec=spec, progress=False).cpu())
            seconds += seconds_between(start, clock(param))
            densities.append(_density(method, state, layout, steps))
        attention = sum(state.attention_seconds().values())
    finally:
        remove(transformer)
    return Run(method, torch.cat(outs), seconds, attention, sum(densities) / len(densities))


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


def side_by_side(runs: Sequence[Run], path, index: int = 0, scale: int = 3, fps: float = 4.0):
    """Write video ``index`` of each run side by side (left to right, white gaps) as a looping
    GIF, or an mp4 if ``path`` ends in ``.mp4`` (imageio-ffmpeg)."""
    import imageio.v2 as imageio
    import numpy as np

    tiles = []
    for run in runs:
        v = ((run.videos[index].clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        tiles += [v.repeat(scale, 1).repeat(scale, 2), np.full((v.shape[0], v.shape[1] * scale, 4, 3), 255, np.uint8)]
    frames = np.concatenate(tiles[:-1], axis=2)
    if str(path).endswith(".mp4"):  # pad to the codec's 16-pixel blocks
        pad = [(0, 0), (0, -frames.shape[1] % 16), (0, -frames.shape[2] % 16), (0, 0)]
        imageio.mimsave(path, list(np.pad(frames, pad, constant_values=255)), fps=fps, macro_block_size=16)
    else:
        imageio.mimsave(path, list(frames), duration=1000 / fps, loop=0)
    return path


__all__ = ["Method", "Run", "layout_of", "run_method", "score", "search_plan", "side_by_side"]
