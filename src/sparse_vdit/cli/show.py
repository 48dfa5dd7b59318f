"""`sparse-vdit show`: a plan's text summary on stdout and, with ``--out``, its picture as PNG.

A file of one plan per expert (Wan2.2 A14B) shows every expert: a summary each, and one picture
each, ``OUT`` with the component name added (``plan-transformer.png``, ``plan-transformer_2.png``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..layout import VideoLayout
from ..plan import ExpertPlans, load_plans
from .common import CommandError, writable_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", type=Path, help="plan JSON file")
    parser.add_argument("--out", type=Path, help="write the picture here (PNG)")
    parser.add_argument("--layout", help="FRAMESxHEIGHTxWIDTH in tokens for the densities (default: the plan's)")


def parse_layout(text: str | None) -> VideoLayout | None:
    """``--layout FRAMESxHEIGHTxWIDTH`` as a VideoLayout (None when not given); CommandError when malformed."""
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
    plans = load_plans(args.plan)
    if not isinstance(plans, ExpertPlans):
        print(summary_text(plans, layout))
        if args.out is not None:
            print(f"wrote {draw_plan(plans, args.out, layout)}")
        return 0
    for name, plan in plans.items():
        print(f"{name}:\n{summary_text(plan, layout)}\n")
        if args.out is not None:
            print(f"wrote {draw_plan(plan, args.out.with_name(f'{args.out.stem}-{name}{args.out.suffix}'), layout)}")
    return 0
