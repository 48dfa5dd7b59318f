"""`sparse-vdit train-organism`: train the small video DiT (its own arguments: `--help`)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Listed in `sparse-vdit --help`; the arguments are parsed by the training script itself."""


def main(argv: list[str]) -> int:
    from ..organism.train import main as train

    train(argv, prog="sparse-vdit train-organism")
    return 0
