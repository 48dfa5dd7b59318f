"""`sparse-vdit show`: a plan's text summary on stdout and, with ``--out``, its picture as PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..layout import VideoLayout
from ..plan import Plan
from .common import CommandError, writable_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", type=Path, help="plan JSON file")
    parser.add_argument("--out", type=Path, help="write the picture here (PNG)")
    parser.add_argument("--layout", help="FRAMESxHEIGHTxWIDTH in tokens for the densities (default: the plan's)")


def parse_layout(text: str | None) -> VideoLayout | None:
    if text is None:
        return None
    try:
        frames, height, width = (int(x) for x in text.lower().split("x"))
        return VideoLayout(frames, height, width)
    except ValueError:
        raise CommandError(f"--layout must look like 21x30x52 (frames x height x width), got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    from ..plan_view import draw_plan, summary_text

    layout = parse_layout(args.layout)
    if args.out is not None:
        writable_file(args.out)
    plan = Plan.load(args.plan)
    print(summary_text(plan, layout))
    if args.out is not None:
        print(f"wrote {draw_plan(plan, args.out, layout)}")
    return 0
