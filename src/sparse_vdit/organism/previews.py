"""Pictures of a training run: the loss curve, data over samples, and a GIF of the samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_loss_plot(losses: list[float], path: Path, run_starts: list[int] | None = None) -> None:
    """Per-step losses (log scale) with a running mean; dotted lines where resumed runs began."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    y = np.asarray(losses)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.arange(1, len(y) + 1), y, lw=0.5, alpha=0.4, label="step")
    if len(y) > 1:
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid")
        ax.plot(np.arange(k, len(y) + 1), smooth, lw=1.5, label=f"mean of {k}")
    for i, s in enumerate(run_starts or []):
        if s > 0:
            ax.axvline(s, color="grey", ls=":", lw=1, label="run start" if i == 1 else None)
    ax.set(xlabel="step", ylabel="flow-matching MSE", title="organism training loss")
    if (y > 0).any():
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _to_uint8(video: torch.Tensor) -> np.ndarray:
    """``(T, 3, H, W)`` in [-1, 1] -> ``(T, H, W, 3)`` uint8."""
    return ((video.float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()


def save_sample_strip(
    videos: torch.Tensor, references: torch.Tensor, captions: list[str], path: Path, scale: int = 3
) -> None:
    """For each caption a row of training-data frames over a row of sampled frames, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, t, _, h, w = videos.shape
    gap, head = 2, 14  # pixels between frames; caption band above each pair of rows (screen pixels)
    rows = []
    for i in range(n):
        for vid in (references[i], videos[i]):
            frames = _to_uint8(vid).repeat(scale, axis=1).repeat(scale, axis=2)
            pad = np.full((t, h * scale, gap, 3), 255, np.uint8)
            rows.append(np.concatenate([np.concatenate([f, p], axis=1) for f, p in zip(frames, pad)], axis=1))
    blank = np.full((head, rows[0].shape[1], 3), 255, np.uint8)
    sep = np.full((gap, rows[0].shape[1], 3), 255, np.uint8)
    grid = np.concatenate(sum(([blank, rows[2 * i], sep, rows[2 * i + 1]] for i in range(n)), []), axis=0)
    dpi = 100
    fig = plt.figure(figsize=((grid.shape[1] + 60) / dpi, grid.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes([60 / (grid.shape[1] + 60), 0, grid.shape[1] / (grid.shape[1] + 60), 1])
    ax.imshow(grid, interpolation="nearest")
    ax.axis("off")
    pair = head + 2 * h * scale + gap
    for i, caption in enumerate(captions):
        top = i * pair
        ax.text(0, top + head - 3, caption, fontsize=8, va="bottom")
        for j, tag in enumerate(("data", "sample")):
            y = top + head + j * (h * scale + gap) + h * scale / 2
            ax.text(-6, y, tag, fontsize=8, ha="right", va="center")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def save_sample_gif(videos: torch.Tensor, path: Path, scale: int = 2) -> bool:
    """Tile the sample videos side by side into a looping GIF; False if imageio is missing."""
    try:
        import imageio.v2 as imageio
    except ImportError:
        return False
    tiles = np.concatenate([_to_uint8(v) for v in videos], axis=2)  # (T, H, n*W, 3)
    tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)
    imageio.mimsave(path, list(tiles), duration=0.25, loop=0)
    return True


