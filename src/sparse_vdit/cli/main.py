"""`sparse-vdit` command line: one subcommand per module of this package."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# subcommand -> (module under sparse_vdit.cli, one-line help)
SUBCOMMANDS = {
    "demo": ("demo", "the main job: what sparse-vdit does, end to end, on this machine"),
    "check": ("check", "every pattern through every available backend, checked against the reference"),
    "generate": ("generate", "a video from a diffusers pipeline with a sparse-attention plan applied"),
    "search": ("search", "find a plan by the Sparse-vDiT offline search (paper setting or ours)"),
    "show": ("show", "a plan's summary, and its picture with --out"),
    "train-organism": ("train_organism", "train the small video DiT the demo and fidelity benchmark use"),
}

PASS_THROUGH = {"train-organism": "train_organism"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:  # commands with a parser of their own
        return importlib.import_module(f"sparse_vdit.cli.{PASS_THROUGH[argv[0]]}").main(argv[1:]) or 0
    parser = argparse.ArgumentParser(prog="sparse-vdit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        importlib.import_module(f"sparse_vdit.cli.{module}").add_arguments(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    return importlib.import_module(f"sparse_vdit.cli.{SUBCOMMANDS[args.command][0]}").run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
