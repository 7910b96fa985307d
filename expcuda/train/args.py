"""The flags of ``expcuda train`` (and ``python -m expcuda.train``): each overrides the preset."""

from __future__ import annotations

import argparse

from expcuda import decay, models
from expcuda.nn import block, quantizers
from expcuda.train.config import OPTIMIZERS, TrainConfig
from expcuda.train.errors import EXIT_CODES_HELP
from expcuda.train.presets import PRESETS

DECAY_HELP = ("decay length: whole epochs ('30'), or a fraction of training ('0.25' or '25%%'); "
              "for exponential decay, the width of one stair")


def add_train_flags(p: argparse.ArgumentParser, modes: bool = True) -> None:
    p.add_argument("--preset", choices=tuple(PRESETS), default="fmnist",
                   help="the recipe the other flags override (default: fmnist)")
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=models.ARCHS)
    g.add_argument("--width", type=float, help="channel multiplier (the paper's 1, 0.5, 0.25, 0.125)")
    g.add_argument("--w-quant", choices=quantizers.W_QUANTS)
    g.add_argument("--w-bits", type=int)
    g.add_argument("--a-quant", choices=quantizers.A_QUANTS)
    g.add_argument("--a-bits", type=int)
    g.add_argument("--scheme", type=int, choices=block.SCHEMES)
    g.add_argument("--combine", choices=block.COMBINES)
    g.add_argument("--fp-ratio", type=float, help="FP branch width / out_channels (concat only; Cat*x = 1/x)")
    g.add_argument("--fp-activation", choices=[a for a in quantizers.FP_ACTIVATIONS if a is not None])
    g.add_argument("--expand-layers", help="LP layers to expand, from 1: 'all', '456', '10,11,12'")
    if modes:
        mode = g.add_mutually_exclusive_group()
        mode.add_argument("--baseline", action="store_true", help="train the plain low-precision network")
        mode.add_argument("--full-precision", action="store_true", help="train the full-precision network")
    g = p.add_argument_group("decay of f")
    g.add_argument("--decay", choices=decay.SCHEDULES)
    g.add_argument("--decay-steps", help=DECAY_HELP)
    g.add_argument("--decay-rate", type=float, help="exponential decay's rate (default 0.5)")
    g.add_argument("--decay-threshold", type=float, help="exponential decay: f below this becomes 0 (0.001)")
    g.add_argument("--async-decay", help="comma list of decay lengths for the last expanded layers, e.g. 30,50,80")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", choices=OPTIMIZERS)
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--epochs", type=int)
    g.add_argument("--batch-size", type=int, help="global batch size (split over DDP ranks)")
    g.add_argument("--seed", type=int)
    g.add_argument("--nesterov", action="store_true", default=None, help="SGD with Nesterov momentum")
    add_method_flags(p)
    g = p.add_argument_group("data and run")
    g.add_argument("--data-dir", help="data folder (default for fmnist: Debian's dataset-fashion-mnist)")
    g.add_argument("--limit-train", type=int, metavar="N", help="train on the first N images only")
    g.add_argument("--limit-test", type=int, metavar="N", help="test on the first N images only")
    g.add_argument("--out", help="run folder (default runs/<preset>-<mode>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--threads", type=int, help="torch CPU threads")
    g.add_argument("--workers", type=int, help="image-decoding processes (ImageNet folders)")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (log lines stay)")
    g.add_argument("--no-sync-bn", action="store_true",
                   help="DDP: BatchNorm statistics per rank (the fused kernels) instead of the global batch's")
    g.add_argument("--bind-cores", action="store_true",
                   help="DDP: pin each rank of this machine to its own CPUs (--threads of them, or an equal share)")


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """Zhuang et al.'s three methods (expcuda.methods); each combines with EXP-Net and --baseline."""
    g = p.add_argument_group("progressive quantization (Zhuang et al.)")
    g.add_argument("--progressive", metavar="two-stage|bits:32,8,4,2",
                   help="two-stage: quantized weights with FP activations, then both; bits:LIST: a strictly "
                        "descending staircase of bit-widths ending at --w-bits/--a-bits (32 = full precision, "
                        "W/A entries such as 2/1 allowed), each stage from the previous one's weights")
    g.add_argument("--stage-epochs", help="split (default: --epochs divided among the stages), full (every "
                                          "stage runs --epochs), or epochs per stage such as 2,4")
    g.add_argument("--stage-lr", choices=("restart", "continue"),
                   help="restart (default): a fresh optimizer and LR schedule per stage; continue: one for the run")
    g.add_argument("--stage-scales", choices=("reinit", "carry"),
                   help="LSQ/SYQ scales at a stage change: reinit (default) from the weights, or carry over")
    g = p.add_argument_group("stochastic precision (Zhuang et al.)")
    g.add_argument("--stochastic-precision", type=float, metavar="P0",
                   help="quantize a random fraction of the units each step, growing from P0 to 1")
    g.add_argument("--sp-unit", choices=("layer", "block"), help="what is sampled (default layer)")
    g.add_argument("--sp-weighting", choices=("uniform", "error"),
                   help="uniform (default), or weighted by 1 / relative quantization error (Dong et al.)")
    g.add_argument("--sp-reach", type=float, help="fraction of training at which every unit is quantized (0.5)")
    g = p.add_argument_group("joint knowledge distillation (Zhuang et al.)")
    g.add_argument("--distill", choices=("kl", "mse"), help="train a full-precision twin alongside")
    g.add_argument("--distill-t", type=float, help="temperature T (default 1)")
    g.add_argument("--distill-lt", type=float, help="twin's cross-entropy weight (default 1)")
    g.add_argument("--distill-ls", type=float, help="low-precision cross-entropy weight (default 0.7)")
    g.add_argument("--distill-ltl", type=float, help="twin's mimicry weight (default 0.5)")
    g.add_argument("--distill-lsl", type=float, help="low-precision mimicry weight (default 0.7)")
    g.add_argument("--twin", choices=("relu", "clip"),
                   help="the twin's activation: relu (default, expcuda's FP network) or clip (the authors' [0, 1])")
    g.add_argument("--twin-lr", type=float, help="the twin's learning rate (default --lr)")
    g.add_argument("--teacher", metavar="RUN_DIR",
                   help="a finished --full-precision run folder: a frozen teacher instead of a twin")
    g.add_argument("--init-from", metavar="PATH",
                   help="start the model (and the twin) from full-precision weights: a --full-precision run "
                        "folder or its fp_model.safetensors (the authors' ImageNet runs start pretrained)")


METHOD_KEYS = ("nesterov", "progressive", "stage_epochs", "stage_lr", "stage_scales", "stochastic_precision",
               "sp_unit", "sp_weighting", "sp_reach", "distill", "distill_t", "distill_lt", "distill_ls",
               "distill_ltl", "distill_lsl", "twin", "twin_lr", "teacher", "init_from")


def overrides(ns: argparse.Namespace, skip=()) -> dict:
    """The flags given, as TrainConfig fields (None for the ones left to the preset)."""
    keys = ("model", "width", "w_quant", "w_bits", "a_quant", "a_bits", "scheme", "combine", "fp_ratio",
            "fp_activation", "expand_layers", "decay", "decay_steps", "decay_rate", "decay_threshold",
            "optimizer", "lr", "momentum", "weight_decay", "epochs", "batch_size", "seed", "data_dir",
            "limit_train", "limit_test", "out", "threads", "workers") + METHOD_KEYS
    values = {k: getattr(ns, k, None) for k in keys if k not in skip}
    if getattr(ns, "async_decay", None):
        values["async_decay"] = [s.strip() for s in ns.async_decay.split(",") if s.strip()]
    if getattr(ns, "baseline", False):
        values["mode"] = "lp"
    if getattr(ns, "full_precision", False):
        values["mode"] = "fp"
    values["resume"] = bool(getattr(ns, "resume", False))
    values["progress"] = not getattr(ns, "no_progress", False)
    values["sync_bn"] = not getattr(ns, "no_sync_bn", False)
    values["bind_cores"] = bool(getattr(ns, "bind_cores", False))
    return values


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    values = overrides(ns)
    mode = values.get("mode") or PRESETS[ns.preset].get("mode", "exp")
    if values.get("out") is None:
        values["out"] = f"runs/{ns.preset}-{mode}"
    return TrainConfig.from_preset(ns.preset, **values)


def parser(prog: str = "expcuda train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Train a low-precision CNN, EXP-Net by default, "
                                "with a preset recipe every flag can override.", epilog=EXIT_CODES_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_flags(p)
    return p
