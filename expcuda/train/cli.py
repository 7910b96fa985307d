"""Entry points of ``expcuda train``: flags -> TrainConfig -> run, with exit codes for each failure."""

from __future__ import annotations

import sys

from expcuda.train import errors
from expcuda.train.args import config_from_args, parser
from expcuda.train.stop import Interrupted

EXIT_INTERRUPTED = errors.EXIT_INTERRUPTED
EXIT_COLLAPSE = errors.EXIT_COLLAPSE


def main_train(argv=None, prog: str = "expcuda train") -> int:
    """Exit codes: see ``errors.EXIT_CODES_HELP`` (also in ``--help``)."""
    ns = parser(prog).parse_args(argv)
    try:
        cfg = config_from_args(ns)
        from expcuda.train.loop import train
        train(cfg)
    except Interrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except errors.foreseeable() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return errors.exit_code(exc)
    return 0
