"""Random texture detail: what makes the fidelity organism's attention local.

A caption fixes what is in a video (shapes, colours, motion), not its fine texture. With
``detail > 0`` every background and every object also carries a random colour texture (a fine
and a coarse random grid, bicubic-interpolated) that moves with it: with the camera for the
background, with the object (rotation included) for objects. Predicting such a texture needs the
token's neighbours in space and the same surface point in other frames, which is the structure
real video DiTs show and sparse attention relies on; a global summary of the video does not help.

The fields are drawn from ``numpy.random.default_rng([seed, index, 1])``, a stream apart from the
scene's own, so turning detail on leaves every scene's layout, motion and caption unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FINE_CELL, COARSE_CELL = 0.05, 0.15  # grid spacing in frame heights
MARGIN = 0.5  # the background field reaches this far (frame heights) beyond the frame: pans and scrolls
OBJECT_CELLS = 8  # an object's field spans [-2 size, 2 size] in its own frame
LUMA, CHROMA = 0.8, 0.35  # mix of one shared and three per-channel random fields
FINE, COARSE = 0.75, 0.55  # weights of the two scales


@dataclass(frozen=True, eq=False)
class Detail:
    """The random texture fields of one scene (colour channels first)."""

    background: np.ndarray  # (3, H, W) fine grid over the frame plus MARGIN
    background_coarse: np.ndarray  # (3, Hc, Wc) coarse grid over the same area
    objects: np.ndarray  # (n_objects, 3, OBJECT_CELLS, OBJECT_CELLS)


def _field(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(3, h, w) float32: a shared luminance field plus weaker per-channel ones."""
    luma = rng.standard_normal((1, h, w))
    chroma = rng.standard_normal((3, h, w))
    return (LUMA * luma + CHROMA * chroma).astype(np.float32)


def background_grid(aspect: float, cell: float) -> tuple[int, int]:
    """Rows and columns of the background field at grid spacing ``cell``."""
    return round((1 + 2 * MARGIN) / cell) + 1, round((aspect + 2 * MARGIN) / cell) + 1


def sample_detail(seed: int, index: int, objects: int, aspect: float) -> Detail:
    """The texture fields of scene ``index`` of ``seed`` (independent of the scene's own draws)."""
    rng = np.random.default_rng([seed, index, 1])
    return Detail(
        background=_field(rng, *background_grid(aspect, FINE_CELL)),
        background_coarse=_field(rng, *background_grid(aspect, COARSE_CELL)),
        objects=np.stack([_field(rng, OBJECT_CELLS, OBJECT_CELLS) for _ in range(objects)])
        if objects
        else np.zeros((0, 3, OBJECT_CELLS, OBJECT_CELLS), np.float32),
    )


def detail_params(details: list[Detail], slots: int, amplitude: float) -> dict[str, torch.Tensor]:
    """Pack fields for :func:`render` (``slots`` object fields per scene, unused ones zero)."""
    b = len(details)
    objects = torch.zeros(b, slots, 3, OBJECT_CELLS, OBJECT_CELLS)
    for i, d in enumerate(details):
        objects[i, : len(d.objects)] = torch.from_numpy(d.objects)
    return {
        "detail": torch.full((b,), float(amplitude)),
        "detail_bg": torch.from_numpy(np.stack([d.background for d in details])),
        "detail_bg_coarse": torch.from_numpy(np.stack([d.background_coarse for d in details])),
        "detail_objects": objects,
    }


def _sample(field: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Bicubic look-up of ``field`` (B, 3, h, w) at normalised coordinates ``gx, gy`` (B, T, H, W).

    Returns (B, T, 3, H, W).
    """
    b, t, h, w = gx.shape
    grid = torch.stack([gx, gy], -1).reshape(b, t * h, w, 2)
    out = F.grid_sample(field, grid, mode="bicubic", padding_mode="reflection", align_corners=True)
    return out.reshape(b, 3, t, h, w).transpose(1, 2)


def background_detail(params: dict[str, torch.Tensor], bx: torch.Tensor, by: torch.Tensor, aspect: float) -> torch.Tensor:
    """Texture (B, T, 3, H, W) of the background at pattern coordinates ``bx, by`` (B, T, H, W)."""
    bx, by = torch.broadcast_tensors(bx, by)
    gx = (bx + MARGIN) / (aspect + 2 * MARGIN) * 2 - 1
    gy = (by + MARGIN) / (1 + 2 * MARGIN) * 2 - 1
    fine = _sample(params["detail_bg"], gx, gy)
    coarse = _sample(params["detail_bg_coarse"], gx, gy)
    return (FINE * fine + COARSE * coarse) * params["detail"].view(-1, 1, 1, 1, 1)


def object_detail(params: dict[str, torch.Tensor], slot: int, u: torch.Tensor, v: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Texture (B, T, 3, H, W) of object ``slot`` at its own coordinates ``u, v`` (B, T, H, W)."""
    scale = 1 / (2 * size)  # [-2 size, 2 size] -> [-1, 1]
    return _sample(params["detail_objects"][:, slot], u * scale, v * scale) * params["detail"].view(-1, 1, 1, 1, 1)
