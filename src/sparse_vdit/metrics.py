"""Video fidelity against a reference: PSNR and SSIM for videos in [-1, 1].

Videos are ``(frames, 3, H, W)`` or batches ``(n, frames, 3, H, W)`` (torch tensors or numpy
arrays), values in [-1, 1] (the organism's and the diffusers pipelines' range before uint8
conversion), so the data range is 2. Batched inputs give one value per video.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DATA_RANGE = 2.0  # [-1, 1]


def _as_batch(video) -> np.ndarray:
    x = video.detach().float().cpu().numpy() if isinstance(video, torch.Tensor) else np.asarray(video, np.float32)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[2] != 3:
        raise ValueError(f"expected a video (frames, 3, H, W) or a batch (n, frames, 3, H, W), got shape {x.shape}")
    return x.astype(np.float64)


def _pair(video, reference) -> tuple[np.ndarray, np.ndarray]:
    a, b = _as_batch(video), _as_batch(reference)
    if a.shape != b.shape:
        raise ValueError(f"video {a.shape} and reference {b.shape} differ in shape")
    return a, b


def psnr(video, reference) -> list[float]:
    """Peak signal-to-noise ratio in dB of each video against its reference (whole video, all frames).

    ``inf`` where they are identical.
    """
    a, b = _pair(video, reference)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(1)
    return [math.inf if m == 0 else 10 * math.log10(DATA_RANGE**2 / m) for m in mse]


def ssim(video, reference) -> list[float]:
    """Structural similarity of each video against its reference: the mean over frames of
    scikit-image's ``structural_similarity`` (colour channels together, data range 2)."""
    try:
        from skimage.metrics import structural_similarity
    except ImportError as err:
        raise ImportError("SSIM needs scikit-image: pip install scikit-image") from err
    a, b = _pair(video, reference)
    side = min(a.shape[-2:])
    win = min(7, side - (side + 1) % 2)  # odd, at most the frame side
    out = []
    for va, vb in zip(a, b):
        frames = [
            structural_similarity(fa.transpose(1, 2, 0), fb.transpose(1, 2, 0), data_range=DATA_RANGE,
                                  channel_axis=-1, win_size=win)  # fmt: skip
            for fa, fb in zip(va, vb)
        ]
        out.append(float(np.mean(frames)))
    return out


__all__ = ["DATA_RANGE", "psnr", "ssim"]
