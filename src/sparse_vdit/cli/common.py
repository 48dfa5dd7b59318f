"""What the `sparse-vdit` commands share: one-line failures, checked argument types, shared defaults.

A command raises :class:`CommandError` (or lets a :class:`~sparse_vdit.PlanError` / ``OSError``
through); ``main`` turns every failure into one line ``sparse-vdit <command>: <cause>`` and a
non-zero exit, with the traceback only under ``--debug``. Argument types here fail at parse time,
before any work starts.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch

from ..kernels.registry import DTYPE_NAMES

PIPELINE_STEPS = 50  # denoising steps on a diffusers pipeline (generate and search alike: a plan's
# step ranges are step indices, so search with the steps you generate with)
ORGANISM_STEPS = 12  # denoising steps on the organism (the setting its plan was searched at)
PIPELINE_BLOCK = 128  # block size of the tables on real models
ORGANISM_BLOCK = 64  # the organism's 2,048 tokens make 32 blocks of 64
FIDELITY_STEPS, FIDELITY_BLOCK = 20, 128  # the fidelity organism (9,216 tokens), as bench/fidelity.py runs it
BACKEND_CHOICES = ("auto", "reference", "flex", "fa4", "triton")


class CommandError(Exception):
    """A failure a command explains in one line; ``main`` prefixes ``sparse-vdit <command>:``."""


def describe(err: BaseException) -> str:
    """One line for an exception: its message, with the file for OS errors."""
    if isinstance(err, OSError) and err.strerror:
        where = f" ({err.filename})" if err.filename else ""
        return f"{err.strerror}{where}"
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, (CommandError, ValueError)):
        return text
    return f"{type(err).__name__}: {text}"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (``sparse-vdit demo: argument --x: ...``), exit 1."""

    def error(self, message: str):
        raise SystemExit(f"{self.prog}: {message}")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after each option's help, unless the help already says its default
    or there is none to show (None, False)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or action.option_strings == []:
            return text
        return super()._get_help_string(action)


# --- argument types (argparse calls them while parsing) ---------------------------------------


def fraction(text: str) -> float:
    """A float in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def positive_int(text: str) -> int:
    """An int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def block_size(text: str) -> int:
    """A power of two in [16, 1024]."""
    value = positive_int(text)
    if value < 16 or value > 1024 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"must be a power of two from 16 to 1024, got {value}")
    return value


def device(text: str) -> str:
    """A torch device that exists here (``cpu``, ``cuda``, ``cuda:1``)."""
    try:
        parsed = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:0)") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: no CUDA GPU here")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    elif parsed.type != "cpu":
        raise argparse.ArgumentTypeError(f"device {text!r} not supported; use cpu or cuda[:N]")
    return text


def default_device() -> str:
    """``cuda`` where a CUDA GPU is visible, else ``cpu``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_backend(parser) -> None:
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="sparse kernel; auto: the fastest available (fa4, triton, flex, reference)")  # fmt: skip


def add_device(parser) -> None:
    parser.add_argument("--device", type=device, default=default_device(), help="torch device")


def add_dtype(parser, what: str = "") -> None:
    """``--dtype bf16|fp16|fp32`` (``what``: what it is the dtype of, for the help); see :func:`dtype_of`."""
    parser.add_argument("--dtype", choices=tuple(DTYPE_NAMES), help=f"{what}default: bf16 on CUDA, fp32 on the CPU")


def dtype_of(name: str | None, device: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` value; without one bf16 on CUDA, float32 on the CPU."""
    if name is not None:
        return DTYPE_NAMES[name]
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def add_threads(parser) -> None:
    parser.add_argument("--threads", type=positive_int, help="CPU threads for torch (default: the physical cores, "
                        "at most 8; 1 on a machine of 2 cores or fewer)")  # fmt: skip


def default_threads() -> int:
    """Physical cores (logical / 2 where SMT is likely), at most 8; 1 on a machine of <= 2 cores.

    torch's default (every logical core) oversubscribes a busy small machine: the CPU demo took
    5x longer with it than with one thread on a shared 2-core machine (DESIGN.md).
    """
    try:
        logical = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        logical = os.cpu_count() or 1
    if logical <= 2:
        return 1
    return max(1, min(8, logical // 2))


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (``threads`` or :func:`default_threads`); returns the count."""
    count = threads or default_threads()
    torch.set_num_threads(count)
    return count


# --- output places, checked before the work -----------------------------------------------------


def writable_folder(path: Path) -> Path:
    """Create ``path`` if needed and make sure files can be written in it; CommandError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(f"output folder {path} is a file")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".sparse-vdit-write-test-"):
            pass
    except OSError as err:
        raise CommandError(f"cannot write to the output folder {path}: {err.strerror or err}") from None
    return path


def writable_file(path: Path) -> Path:
    """Make sure ``path`` can be written (its folder created if needed); CommandError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"output {path} is a folder; give a file name")
    writable_folder(path.parent if str(path.parent) else Path("."))
    if path.exists() and not os.access(path, os.W_OK):
        raise CommandError(f"cannot write {path}: permission denied")
    return path


def write_video(frames, path: Path, fps: int) -> Path:
    """Write ``(frames, height, width, 3)`` floats in [0, 1] (or uint8) as an H.264 mp4."""
    import imageio
    import numpy as np

    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=1)
    return path
