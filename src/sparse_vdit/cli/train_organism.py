"""`sparse-vdit train-organism`: train the small video DiT (its own arguments: `--help`).

The training script owns its parser (``sparse_vdit.organism.train.parse_args``); this command runs
it so that a parse error is one line, then checks every value (ranges, device, ``--init`` /
``--resume`` folders, a writable ``--out``) before any model is built, as the other commands do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import shlex
from pathlib import Path

from .common import CommandError, device, writable_folder

PROG = "sparse-vdit train-organism"

# option -> (test the value must pass, what it must be); options left at None are not checked
VALUE_RULES = {
    "steps": (lambda v: v >= 1, ">= 1"),
    "minutes": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (0: no limit)"),
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a finite number > 0"),
    "warmup": (lambda v: v >= 0, ">= 0"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "ema": (lambda v: 0 <= v < 1, "in [0, 1) (0: no EMA)"),
    "p_uncond": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "seed": (lambda v: v >= 0, ">= 0"),
    "data_seed": (lambda v: v >= 0, ">= 0"),
    "workers": (lambda v: v >= 0, ">= 0"),
    "log_every": (lambda v: v >= 1, ">= 1"),
    "sample_steps": (lambda v: v >= 1, ">= 1"),
    "samples": (lambda v: v >= 1, ">= 1"),
    "frames": (lambda v: v >= 1, ">= 1"),
    "size": (lambda v: v >= 4 and v % 4 == 0, "a multiple of 4 pixels (autoencoder 2 x patch 2)"),
    "height": (lambda v: v >= 4 and v % 4 == 0, "a multiple of 4 pixels (autoencoder 2 x patch 2)"),
    "width": (lambda v: v >= 4 and v % 4 == 0, "a multiple of 4 pixels (autoencoder 2 x patch 2)"),
    "detail": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0"),
    "layers": (lambda v: v >= 1, ">= 1"),
    "heads": (lambda v: v >= 1, ">= 1"),
    "ffn_dim": (lambda v: v >= 1, ">= 1"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Listed in `sparse-vdit --help`; the arguments are parsed by the training script itself."""


def parse(argv: list[str]) -> argparse.Namespace:
    """The training script's arguments; a parse error becomes ``SystemExit("sparse-vdit train-organism: ...")``."""
    from ..organism.train import parse_args

    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return parse_args(argv, prog=PROG)
    except SystemExit as exit_:
        if exit_.code in (0, None):  # --help
            raise
        lines = [line for line in errors.getvalue().splitlines() if line.strip()]
        cause = lines[-1].split(": error: ", 1)[-1] if lines else f"bad arguments (exit {exit_.code})"
        raise SystemExit(f"{PROG}: {cause}") from None


def check(args: argparse.Namespace) -> None:
    """Every value checked before the work starts; :class:`CommandError` naming the option otherwise."""
    for dest, (ok, wanted) in VALUE_RULES.items():
        value = getattr(args, dest)
        if value is not None and not ok(value):
            raise CommandError(f"argument --{dest.replace('_', '-')}: must be {wanted}, got {value}")
    if args.device is not None:
        try:
            device(args.device)
        except argparse.ArgumentTypeError as err:
            raise CommandError(f"argument --device: {err}") from None
    if args.init is not None:
        from ..organism.model import WEIGHTS_FILE

        missing = [name for name in ("config.json", WEIGHTS_FILE) if not (Path(args.init) / name).is_file()]
        if missing:
            raise CommandError(f"argument --init: no organism weights in {args.init} (missing {', '.join(missing)})")
    if args.resume is not None:
        from ..organism.train import CHECKPOINT

        if not (Path(args.resume) / CHECKPOINT).is_file():
            raise CommandError(f"argument --resume: no {CHECKPOINT} in {args.resume}")
    writable_folder(Path(args.out))


def main(argv: list[str]) -> int:
    from ..organism.train import train

    args = parse(argv)
    check(args)
    train(args, shlex.join([*shlex.split(PROG), *argv]))
    return 0
