"""Zhuang et al.'s methods inside a training run: progressive stages, stochastic precision, the twin.

``check(cfg)`` refuses, naming the flag, every option that cannot work,
before anything is trained or written; ``RunMethods`` is what the loop
calls at each step, epoch, checkpoint and at the end. With none of the
methods asked for it does exactly what the loop did before (the same ops in
the same order), so the baseline is unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch.nn.functional as F
from torch import nn

from expcuda import models
from expcuda.methods import DistillLoss, ProgressiveSchedule, StochasticPrecision, distill_step, set_quantized
from expcuda.methods.distill import check_options as check_distill
from expcuda.methods.pretrained import load_full_precision
from expcuda.methods.stochastic import check_options as check_sp
from expcuda.methods.units import UNITS
from expcuda.train import build, checkpoint

RESIDUAL = ("preresnet20", "resnet18")
TWINS = ("relu", "clip")
TEACHER_FILES = ("fp_model.json", "fp_model.safetensors")


def schedule_of(cfg) -> ProgressiveSchedule | None:
    if cfg.progressive is None:
        return None
    return ProgressiveSchedule(cfg.progressive, w_quant=cfg.w_quant, w_bits=cfg.w_bits, a_quant=cfg.a_quant,
                               a_bits=cfg.a_bits, epochs=cfg.epochs, stage_epochs=cfg.stage_epochs,
                               scales=cfg.stage_scales)


def check(cfg) -> None:
    """Every method option of ``cfg`` that cannot work, as a ValueError naming the flag."""
    used = [flag for flag, on in (("--progressive", cfg.progressive is not None),
                                  ("--stochastic-precision", cfg.stochastic_precision is not None),
                                  ("--distill", cfg.distill is not None)) if on]
    if used and cfg.mode == "fp":
        raise ValueError(f"{' and '.join(used)} train a low-precision network; --full-precision has no "
                         f"quantizers to apply them to")
    if cfg.progressive is not None and cfg.stochastic_precision is not None:
        raise ValueError("--progressive and --stochastic-precision are two ways to reach full quantization "
                         "gradually (stages, or a random quantized subset per step); pick one")
    if cfg.progressive is None:
        for name, default in (("stage_epochs", "split"), ("stage_lr", "restart"), ("stage_scales", "reinit")):
            if getattr(cfg, name) != default:
                raise ValueError(f"--{name.replace('_', '-')} needs --progressive")
    else:
        if cfg.stage_lr not in ("restart", "continue"):
            raise ValueError(f"--stage-lr must be 'restart' or 'continue', got {cfg.stage_lr!r}")
        schedule_of(cfg)
    if cfg.stochastic_precision is not None:
        check_sp(cfg.stochastic_precision, cfg.sp_reach, cfg.sp_weighting)
        if cfg.sp_unit not in UNITS:
            raise ValueError(f"--sp-unit must be one of {', '.join(UNITS)}, got {cfg.sp_unit!r}")
        if cfg.sp_unit == "block" and cfg.model not in RESIDUAL:
            raise ValueError(f"--sp-unit block needs a model with residual blocks ({', '.join(RESIDUAL)}); "
                             f"{cfg.model} has none: use --sp-unit layer")
    if cfg.distill is not None:
        check_distill(cfg.distill, cfg.distill_t, lt=cfg.distill_lt, ls=cfg.distill_ls, ltl=cfg.distill_ltl,
                      lsl=cfg.distill_lsl)
        if cfg.twin not in TWINS:
            raise ValueError(f"--twin must be one of {', '.join(TWINS)}, got {cfg.twin!r}")
        if cfg.twin_lr is not None and not cfg.twin_lr > 0:
            raise ValueError(f"--twin-lr must be positive, got {cfg.twin_lr!r}")
    if cfg.init_from is not None and not os.path.isfile(init_path(cfg.init_from)):
        raise ValueError(f"--init-from {cfg.init_from}: no such file (give fp_model.safetensors or the "
                         f"--full-precision run folder holding it)")
    if cfg.teacher is not None:
        if cfg.distill is None:
            raise ValueError("--teacher needs --distill kl or mse (how the student learns from it)")
        teacher_config(cfg)


def init_path(path: str) -> str:
    """A run folder stands for its fp_model.safetensors."""
    return os.path.join(path, "fp_model.safetensors") if os.path.isdir(path) else path


def teacher_config(cfg) -> models.ModelConfig:
    """The teacher run folder's model config, checked against this run's architecture."""
    folder = cfg.teacher
    missing = [f for f in TEACHER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(f"--teacher {folder}: not a finished full-precision run folder (no "
                         f"{', '.join(missing)}); train one with `expcuda train --full-precision --out {folder}`")
    try:
        with open(os.path.join(folder, "fp_model.json")) as fh:
            tcfg = models.ModelConfig.from_json(fh.read())
    except (ValueError, TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--teacher {folder}: fp_model.json is corrupt ({exc})") from None
    ours = cfg.model_config(tcfg.num_classes, tcfg.in_channels)
    if (tcfg.arch, tcfg.width) != (ours.arch, ours.width) or tcfg.mode != "fp":
        raise ValueError(f"--teacher {folder}: holds a {tcfg.mode} {tcfg.arch} x{tcfg.width}, this run trains "
                         f"{ours.arch} x{ours.width}; the teacher must be the same architecture in full precision")
    return tcfg


class RunMethods:
    """The methods of one run, built from its config; attributes are None for methods not used."""

    def __init__(self, run):
        self.cfg = cfg = run.cfg
        self.run = run
        if cfg.init_from is not None:
            load_full_precision(run.model, run.model_cfg, init_path(cfg.init_from))
        self.schedule = schedule_of(cfg)
        self.total_epochs = self.schedule.total_epochs if self.schedule else cfg.epochs
        self.entered = 0
        if self.schedule is not None:
            self.schedule.apply(run.model, self.schedule.stages[0])
        self.sp = None
        if cfg.stochastic_precision is not None:
            self.sp = StochasticPrecision(run.model, cfg.stochastic_precision, self.total_epochs * run.steps_per_epoch,
                                          reach=cfg.sp_reach, unit=cfg.sp_unit, weighting=cfg.sp_weighting,
                                          seed=cfg.seed)
        self.twin = self.twin_net = self.twin_optimizer = self.twin_scheduler = self.loss = None
        if cfg.distill is not None:
            self.loss = DistillLoss(cfg.distill, cfg.distill_t, cfg.distill_lt, cfg.distill_ls, cfg.distill_ltl,
                                    cfg.distill_lsl)
            self.twin = self._teacher() if cfg.teacher else self._twin()
            self.twin_net = self.twin
        self.stage_log = None

    # ------------------------------------------------------------------ set-up
    def _twin(self) -> nn.Module:
        run, cfg = self.run, self.cfg
        if cfg.twin == "relu":
            twin = models.build(run.model_cfg.replace(mode="fp"))
        else:  # the authors' twin: the low-precision network's topology, every quantizer off ([0, 1] clips)
            twin = set_quantized(models.build(run.model_cfg.replace(mode="lp")), False, False)
        if cfg.init_from is not None:
            load_full_precision(twin, run.model_cfg, init_path(cfg.init_from))
        twin = twin.to(run.d.device)
        if run.d.enabled and cfg.sync_bn:
            from expcuda.nn import sync_bn
            twin = (nn.SyncBatchNorm.convert_sync_batchnorm(twin) if run.d.device.type == "cuda"
                    else sync_bn.convert(twin))
        self.twin_optimizer = build.make_optimizer(dataclasses.replace(cfg, lr=cfg.twin_lr or cfg.lr), twin)
        self.twin_scheduler = build.make_lr_scheduler(self.run_config(), self.twin_optimizer)
        return twin

    def _teacher(self) -> nn.Module:
        from expcuda.train import export
        cfg, run = self.cfg, self.run
        tcfg = teacher_config(cfg)
        if (tcfg.num_classes, tcfg.in_channels) != (run.model_cfg.num_classes, run.model_cfg.in_channels):
            raise ValueError(f"--teacher {cfg.teacher}: has {tcfg.num_classes} classes and {tcfg.in_channels} "
                             f"input channels, the data has {run.model_cfg.num_classes} and "
                             f"{run.model_cfg.in_channels}")
        folder = cfg.teacher
        try:
            teacher = export.load(os.path.join(folder, "fp_model.safetensors"), os.path.join(folder, "fp_model.json"))
        except Exception as exc:  # safetensors raises several types for a damaged file
            raise ValueError(f"--teacher {folder}: fp_model.safetensors is corrupt or does not fit "
                             f"fp_model.json ({type(exc).__name__}: {exc})") from None
        for p in teacher.parameters():
            p.requires_grad_(False)
        return teacher.to(run.d.device).eval()

    def run_config(self):
        """The run's config with ``epochs`` the run's total (more than --epochs with --stage-epochs full)."""
        return dataclasses.replace(self.cfg, epochs=self.total_epochs)

    def lr_config(self):
        """The config the student's LR schedule is built from: one stage's with --stage-lr restart."""
        if self.schedule is not None and self.cfg.stage_lr == "restart":
            return dataclasses.replace(self.cfg, epochs=self.schedule.stages[self.entered].epochs)
        return self.run_config()

    def trains_twin(self) -> bool:
        return self.twin_optimizer is not None

    def unused_parameters(self) -> bool:
        """Whether some parameters may get no gradient in a step (DDP must look for them): learned
        quantizer scales while their unit runs in full precision."""
        if self.sp is None and self.schedule is None:
            return False
        from expcuda.nn.quantizers import ActivationQuantizer, WeightQuantizer
        return any(any(True for _ in m.parameters()) for m in self.run.model.modules()
                   if isinstance(m, (WeightQuantizer, ActivationQuantizer)))

    def wrap(self, ddp) -> None:
        """The twin under DDP too, when it trains."""
        if self.trains_twin() and self.run.d.enabled:
            self.twin_net = ddp(self.twin)

    # ------------------------------------------------------------------ training
    def begin_epoch(self) -> None:
        """Train mode for the twin; at a stage's first epoch, convert the model (and restart the LR)."""
        if self.trains_twin():
            self.twin_net.train()
        if self.schedule is None:
            return
        stage = self.schedule.stage_at(self.run.epoch)
        if stage.index == self.entered:
            return
        self.schedule.apply(self.run.model, stage)
        self.entered = stage.index
        if self.cfg.stage_lr == "restart":
            self.run.optimizer = build.make_optimizer(self.cfg, self.run.model)
            self.run.lr_scheduler = build.make_lr_scheduler(self.lr_config(), self.run.optimizer)
        self.run.progress.log(f"stage {stage.index + 1}/{len(self.schedule.stages)}: {stage.label()} for "
                            f"{stage.epochs} epoch(s), from the previous stage's weights")

    def train_step(self, net, optimizer, x, y):
        """One optimizer step (two with a twin); the student's logits and loss."""
        if self.twin is None:
            logits = net(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            return logits, loss
        out = distill_step(net, self.twin_net, x, y, self.loss, optimizer, self.twin_optimizer)
        return out.q_logits, out.q_loss

    def after_step(self) -> None:
        if self.sp is not None:
            self.sp.step()

    def epoch_columns(self) -> dict:
        """metrics.csv's method columns for the epoch that just ended (the twin evaluated now)."""
        from expcuda.train.evaluate import evaluate
        row = {}
        if self.schedule is not None:
            row["stage"] = self.entered + 1
        if self.sp is not None:
            row["sp_fraction"] = self.sp.fraction()
        if self.twin is not None:
            result = evaluate(self.twin, self.run.test_loader, self.run.d)
            row.update(twin_test_acc=result["acc"], twin_test_loss=result["loss"])
            if self.trains_twin():
                self.twin_net.train()
        return row

    def end_epoch_lr(self) -> None:
        if self.twin_scheduler is not None:
            self.twin_scheduler.step()

    def describe(self, row: dict) -> str | None:
        parts = []
        if "twin_test_acc" in row:
            parts.append(f"{'teacher' if self.cfg.teacher else 'FP twin'} test {row['twin_test_acc']:.2f}%")
        if "stage" in row:
            s = self.schedule.stages[row["stage"] - 1]
            parts.append(f"stage {row['stage']}/{len(self.schedule.stages)} {s.label()}")
        if "sp_fraction" in row:
            parts.append(f"quantized fraction {row['sp_fraction']:.3f}")
        return "  " + " | ".join(parts) if parts else None

    def stage_checkpoint(self, state_fn) -> None:
        """At the end of a stage, keep its checkpoint as checkpoint-stage<N>.pt."""
        if self.schedule is None or not self.run.d.main:
            return
        stage = self.schedule.stage_at(self.run.epoch - 1)
        if self.run.epoch == stage.end:
            checkpoint.save(os.path.join(self.cfg.out, f"checkpoint-stage{stage.index + 1}.pt"), state_fn())

    # ------------------------------------------------------------------ checkpoints and the end
    def state_dict(self) -> dict:
        state = {"entered": self.entered, "sp": self.sp.state_dict() if self.sp is not None else None}
        if self.trains_twin():
            state.update(twin=self.twin.state_dict(), twin_optimizer=self.twin_optimizer.state_dict(),
                         twin_lr_scheduler=self.twin_scheduler.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.schedule is not None:
            self.entered = int(state["entered"])
            self.schedule.apply(self.run.model, self.schedule.stages[self.entered], reinit=False)
        if self.sp is not None:
            self.sp.load_state_dict(state["sp"])
        if self.trains_twin():
            try:
                self.twin.load_state_dict(state["twin"])
                self.twin_optimizer.load_state_dict(state["twin_optimizer"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise checkpoint.CheckpointError(f"the checkpoint's full-precision twin does not fit: {exc}") from None
            self.twin_scheduler.load_state_dict(state["twin_lr_scheduler"])

    def finish(self, summary: dict) -> None:
        """Summary entries; the trained twin exported as fp_model (a --teacher for later runs)."""
        if self.sp is not None:
            self.sp.remove()
        if self.twin is None:
            return
        summary["final_twin_test_acc"] = self.run.history[-1]["twin_test_acc"]
        if self.trains_twin() and self.cfg.twin == "relu" and self.run.d.main:
            from expcuda.train import export
            weights, config = export.export(self.twin, self.run.model_cfg.replace(mode="fp"), self.cfg.out, "fp_model")
            summary.update(twin_weights=weights, twin_config=config)
