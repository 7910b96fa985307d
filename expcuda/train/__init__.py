"""The training tool: presets, the loop, checkpoints, metrics, plots, DDP and ``compare``.

``train(TrainConfig.from_preset("fmnist", epochs=1))`` trains and exports;
``python -m expcuda.train`` / ``expcuda train`` is the command line.
"""

from expcuda.train.checkpoint import CheckpointError
from expcuda.train.config import TrainConfig
from expcuda.train.errors import Diverged, FolderBusy, RunFolderError, WriteError
from expcuda.train.export import CollapseMismatch
from expcuda.train.presets import PRESETS
from expcuda.train.stop import Interrupted


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Train per ``cfg``; returns the summary (also written to ``cfg.out``/summary.json)."""
    from expcuda.train.loop import train as _train
    return _train(cfg, on_step)


__all__ = ["train", "TrainConfig", "PRESETS", "CheckpointError", "CollapseMismatch", "Interrupted", "Diverged",
           "FolderBusy", "RunFolderError", "WriteError"]
