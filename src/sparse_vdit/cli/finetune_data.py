"""`sparse-vdit finetune`'s data: a folder of captioned videos or latents, read, resized and cached.

A data folder holds videos (``.mp4``, ``.gif``, ``.webm``, ``.mov``, ``.mkv``: read with imageio) or
latents already encoded (``.pt`` / ``.safetensors``: one tensor ``(C, f, h, w)``, or ``(1, C, f, h,
w)``, under the key ``latents`` or alone), the latents the pipeline's denoising loop works on (as
``output_type="latent"`` returns them). Each has a caption: ``NAME.txt`` beside it, or an entry in
one captions file (``--captions``, else ``captions.json``, ``captions.jsonl`` or ``metadata.jsonl``
in the folder): a JSON object ``{file name or stem: caption}``, or JSON lines with ``file_name``
and ``text`` (or ``caption`` / ``prompt``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..files import written_whole
from .common import CommandError

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".mkv", ".avi")
LATENT_SUFFIXES = (".pt", ".safetensors")
CAPTION_FILES = ("captions.json", "captions.jsonl", "metadata.jsonl")


@dataclass(frozen=True)
class Sample:
    """One training example of a data folder: a video or a latent file, and its caption."""

    path: Path
    caption: str

    @property
    def is_latent(self) -> bool:
        return self.path.suffix.lower() in LATENT_SUFFIXES


def read_samples(folder: Path, captions: Path | None = None) -> list[Sample]:
    """The captioned videos or latents of ``folder`` (sorted by name); CommandError when there are
    none, when videos and latents are mixed, or when one has no caption."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CommandError(f"data folder {folder} does not exist" if not folder.exists() else f"{folder} is not a folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES + LATENT_SUFFIXES)
    if not files:
        raise CommandError(f"no videos ({', '.join(VIDEO_SUFFIXES)}) or latents (.pt, .safetensors) in {folder}")
    kinds = {p.suffix.lower() in LATENT_SUFFIXES for p in files}
    if len(kinds) > 1:
        raise CommandError(f"{folder} mixes videos and latent files; give one kind")
    if captions is None:
        captions = next((folder / n for n in CAPTION_FILES if (folder / n).is_file()), None)
    table = _caption_table(captions) if captions is not None else {}
    samples = []
    for path in files:
        beside = path.with_suffix(".txt")
        if beside.is_file():
            caption = beside.read_text(encoding="utf-8").strip()
        else:
            caption = table.get(path.name, table.get(path.stem))
        if not caption:
            where = f"{beside.name} beside it" if captions is None else f"{beside.name} or an entry in {captions}"
            raise CommandError(f"{path.name} has no caption: write {where}")
        samples.append(Sample(path, caption))
    return samples


def _caption_table(path: Path) -> dict[str, str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as err:
        raise CommandError(f"cannot read the captions file {path}: {err.strerror or err}") from None
    try:
        if Path(path).suffix == ".jsonl":
            table = {}
            for line in filter(str.strip, text.splitlines()):
                row = json.loads(line)
                name = row.get("file_name") or row.get("file")
                caption = next((row[k] for k in ("text", "caption", "prompt") if k in row), None)
                if not isinstance(name, str) or not isinstance(caption, str):
                    raise CommandError(f"{path}: each line needs file_name and text, got {line.strip()[:80]}")
                table[name] = caption
            return table
        table = json.loads(text)
    except json.JSONDecodeError as err:
        raise CommandError(f"{path} is not valid JSON (line {err.lineno}: {err.msg})") from None
    if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
        raise CommandError(f"{path} must hold a JSON object {{file name: caption}}")
    return table


def read_video(path: Path, height: int, width: int, frames: int) -> torch.Tensor:
    """The first ``frames`` frames of a video, scaled to cover ``height x width`` and centre-cropped:
    ``(3, frames, height, width)`` float32 in [-1, 1]."""
    import imageio.v3 as iio
    import numpy as np

    try:  # only the frames needed are decoded
        data = np.stack([np.asarray(f) for f, _ in zip(iio.imiter(path), range(frames))])
    except Exception as err:  # imageio raises many kinds
        raise CommandError(f"cannot read the video {path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if data.ndim == 3:  # grey frames
        data = np.repeat(data[..., None], 3, axis=-1)
    if data.ndim != 4 or data.shape[0] < frames:
        have = data.shape[0] if data.ndim == 4 else 1
        raise CommandError(f"{path.name} has {have} frame(s); --frames {frames} needs at least {frames}")
    clip = torch.from_numpy(np.ascontiguousarray(data[:frames, ..., :3])).float().permute(0, 3, 1, 2)  # F, 3, H, W
    scale = max(height / clip.shape[2], width / clip.shape[3])
    size = (max(height, round(clip.shape[2] * scale)), max(width, round(clip.shape[3] * scale)))
    if size != tuple(clip.shape[2:]):
        clip = torch.nn.functional.interpolate(clip, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    clip = clip[:, :, top : top + height, left : left + width]
    return (clip / 127.5 - 1.0).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()


def read_latents(path: Path) -> torch.Tensor:
    """One latent file as ``(C, f, h, w)`` float32."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CommandError(f"cannot read the latents {path.name}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if isinstance(data, dict):
        data = data.get("latents", next(iter(data.values())) if len(data) == 1 else None)
    if not isinstance(data, torch.Tensor):
        raise CommandError(f"{path.name} holds no tensor (a tensor, or a dict with 'latents')")
    if data.ndim == 5 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 4:
        raise CommandError(f"{path.name}: latents must be (C, frames, height, width), got {tuple(data.shape)}")
    return data.float()


def fingerprint(samples: list[Sample]) -> list[list]:
    """What identifies the data (name, size, modification time, caption) for the encoding cache."""
    rows = []
    for s in samples:
        stat = s.path.stat()
        rows.append([s.path.name, stat.st_size, stat.st_mtime_ns, s.caption])
    return rows


def load_cache(path: Path, key: dict) -> dict | None:
    """The cached encodings at ``path`` if they were made for ``key``, else None."""
    if not path.is_file():
        return None
    try:
        cached = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    return cached if isinstance(cached, dict) and cached.get("key") == key else None


def save_cache(path: Path, key: dict, latents: list | None, text: list[dict]) -> None:
    """Write the encoded latents and text under ``key`` (atomically: a stopped run leaves no half file)."""
    with written_whole(path) as tmp:
        torch.save({"key": key, "latents": latents, "text": text}, tmp)
