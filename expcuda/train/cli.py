"""Entry points of ``expcuda train``: flags -> TrainConfig -> run, with exit codes for each failure."""

from __future__ import annotations

import sys

from expcuda.data import DataError
from expcuda.train.args import config_from_args, parser
from expcuda.train.checkpoint import CheckpointError
from expcuda.train.export import CollapseMismatch
from expcuda.train.stop import Interrupted

EXIT_INTERRUPTED = 130
EXIT_COLLAPSE = 3


def main_train(argv=None, prog: str = "expcuda train") -> int:
    ns = parser(prog).parse_args(argv)
    try:
        cfg = config_from_args(ns)
        from expcuda.train.loop import train
        train(cfg)
    except Interrupted as exc:
        print(f"\n{exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except CollapseMismatch as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_COLLAPSE
    except (DataError, CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
