"""`sparse-vdit` command line: one subcommand per module of this package.

Every failure ends in one line ``sparse-vdit <command>: <cause>`` on stderr and a non-zero exit
(1); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .._version import __version__
from .common import CommandError, HelpFormatter, Parser, describe

# subcommand -> (module under sparse_vdit.cli, one-line help)
SUBCOMMANDS = {
    "demo": ("demo", "the main job: what sparse-vdit does, end to end, on this machine"),
    "check": ("check", "every pattern through every available backend, checked against the reference"),
    "generate": ("generate", "a video from a local diffusers pipeline or organism folder with a plan applied"),
    "search": ("search", "find a plan by the Sparse-vDiT offline search (paper setting or ours)"),
    "finetune": ("finetune", "train a LoRA with a plan applied, by distillation from the dense model, on your data"),
    "show": ("show", "a plan's summary, and its picture with --out"),
    "train-organism": ("train_organism", "train the small video DiT the demo and fidelity benchmark use"),
}

PASS_THROUGH = {"train-organism": "train_organism"}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sparse-vdit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sparse-vdit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for name, (module, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=HelpFormatter)  # fmt: skip
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                             help="show the traceback of a failure")  # fmt: skip
        importlib.import_module(f"sparse_vdit.cli.{module}").add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASS_THROUGH:  # commands with a parser of their own
        command, rest = argv[0], [a for a in argv[1:] if a != "--debug"]
        module = importlib.import_module(f"sparse_vdit.cli.{PASS_THROUGH[command]}")
        return _guarded(command, "--debug" in argv, lambda: module.main(rest))
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module = importlib.import_module(f"sparse_vdit.cli.{SUBCOMMANDS[args.command][0]}")
    return _guarded(args.command, args.debug, lambda: module.run(args))


def _guarded(command: str, debug: bool, work) -> int:
    """Run ``work``; any failure becomes ``SystemExit("sparse-vdit <command>: <cause>")`` (exit 1)."""
    try:
        return work() or 0
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug:
            raise
        raise SystemExit(f"sparse-vdit {command}: interrupted") from None
    except Exception as err:
        if debug:
            raise
        hint = "" if isinstance(err, (CommandError, ValueError, OSError)) else " (--debug shows where)"
        raise SystemExit(f"sparse-vdit {command}: {describe(err)}{hint}") from None


if __name__ == "__main__":
    sys.exit(main())
