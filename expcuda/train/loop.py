"""The training loop: epochs of steps, evaluation, metrics, checkpoints, resume, DDP, the final export.

Every random draw is a function of (seed, epoch, sample): the shuffling
(DistributedSampler), the augmentation table and the model's
initialisation.  So a run resumed from any step boundary repeats the
uninterrupted run exactly, and a DDP run sees the same global batches as a
single process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
import warnings

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from expcuda import models
from expcuda.nn import sync_bn
from expcuda.train import build, checkpoint, distributed, export, methods, metrics, plots, preflight
from expcuda.train.atomic import write_text
from expcuda.train.config import TrainConfig
from expcuda.train.errors import Diverged, FolderBusy, RunFolderError, WriteError
from expcuda.train.evaluate import evaluate_both
from expcuda.train.progress import Progress, epoch_line
from expcuda.train.stop import Interrupted, StopRequest

EVAL_BATCH = 500


class Run:
    """One training run's state; ``fit()`` trains to the end (or to a stop signal) and exports."""

    def __init__(self, cfg: TrainConfig, d: distributed.Dist, on_step=None):
        self.cfg, self.d, self.on_step = cfg, d, on_step
        self.ckpt_path = os.path.join(cfg.out, checkpoint.NAME)
        saved = self._checkpoint_to_resume()  # before anything is built or written
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.batch_size % d.world:
            raise ValueError(f"batch_size {cfg.batch_size} (global) must divide by the {d.world} DDP ranks")
        torch.manual_seed(cfg.seed)
        self.bundle, self.model_cfg = build.load_data(cfg)
        self.model = models.build(self.model_cfg).to(d.device)
        preflight.check_expand_layers(self.model_cfg, self.model)
        if d.enabled and cfg.sync_bn:  # the statistics of the global batch, as one process has them
            self.model = (nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if d.device.type == "cuda"
                          else sync_bn.convert(self.model))
        self.train_loader = self.bundle.loader("train", cfg.batch_size // d.world, seed=cfg.seed, rank=d.rank,
                                               world=d.world, workers=cfg.workers)
        self.test_loader = self.bundle.loader("test", EVAL_BATCH, rank=d.rank, world=d.world, workers=cfg.workers)
        self.steps_per_epoch = len(self.train_loader)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.bundle.train)} training images make no full batch of {cfg.batch_size}; "
                             f"raise --limit-train or lower --batch-size")
        self.methods = methods.RunMethods(self)  # Zhuang et al.'s, when asked for; a no-op otherwise
        self.epochs = self.methods.total_epochs  # cfg.epochs, or more with --stage-epochs full
        self.optimizer = build.make_optimizer(cfg, self.model)
        self.lr_scheduler = build.make_lr_scheduler(self.methods.lr_config(), self.optimizer)
        self.decay = build.make_decay(self.methods.run_config(), self.model, self.steps_per_epoch)
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self.partial = [0.0, 0.0, 0.0, 0.0, 0.0]  # loss sum, correct, images, data wait s, train s
        self.history: list[dict] = []
        self.step_loss: list[float] = []
        if saved is not None:
            self._restore(saved)
        self.net = self.model
        if d.enabled:  # f == 0 skips the FP branches: their parameters then get no gradient
            # a 1-input-channel conv's grad has size-1-dim strides DDP warns about, harmlessly
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.net = DistributedDataParallel(self.model, find_unused_parameters=self.decay is not None
                                               or self.methods.unused_parameters())
            self.methods.wrap(DistributedDataParallel)
        self.progress = Progress(d.main, cfg.progress)

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_to_resume(self):
        cfg = self.cfg
        if cfg.resume:
            state = checkpoint.load(self.ckpt_path)
            # a field added to TrainConfig after the checkpoint was written counts as its default
            saved_identity = {**dataclasses.asdict(TrainConfig()), **state["train_config"]}
            saved_identity = {k: v for k, v in saved_identity.items() if k in cfg.identity()}
            checkpoint.check_same_run(self.ckpt_path, saved_identity, cfg.identity())
            if state["world"] != self.d.world:
                raise checkpoint.CheckpointError(
                    f"{self.ckpt_path} was written by {state['world']} process(es), this run has {self.d.world}; "
                    "resume with the same number of processes")
            return state
        if os.path.exists(self.ckpt_path):
            raise checkpoint.CheckpointError(f"{cfg.out} already holds a run's checkpoint; pass --resume to "
                                             f"continue it or pick another --out (nothing was overwritten)")
        return None

    def state(self) -> dict:
        return {"train_config": self.cfg.identity(), "model_config": self.model_cfg.to_dict(),
                "world": self.d.world, "epoch": self.epoch, "batch": self.batch, "global_step": self.global_step,
                "partial": list(self.partial), "history": self.history, "step_loss": self.step_loss,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "decay": self.decay.state_dict() if self.decay is not None else None,
                "methods": self.methods.state_dict(),
                "torch_rng": torch.get_rng_state()}

    def _restore(self, s: dict) -> None:
        try:
            self.model.load_state_dict(s["model"])
            self.optimizer.load_state_dict(s["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise checkpoint.CheckpointError(f"{self.ckpt_path} does not fit this model: {exc}") from None
        self.lr_scheduler.load_state_dict(s["lr_scheduler"])
        if self.decay is not None:
            self.decay.load_state_dict(s["decay"])
        if "methods" in s:
            self.methods.load_state_dict(s["methods"])
        self.epoch, self.batch, self.global_step = s["epoch"], s["batch"], s["global_step"]
        self.partial = list(s["partial"])  # global sums (each step's are all-reduced)
        self.history, self.step_loss = list(s["history"]), [tuple(v) for v in s["step_loss"]]
        torch.set_rng_state(s["torch_rng"])

    def save(self) -> None:
        if self.d.main:
            checkpoint.save(self.ckpt_path, self.state())
        distributed.barrier(self.d)

    # ------------------------------------------------------------------ training
    def fit(self) -> dict:
        cfg = self.cfg
        if self.d.main:
            os.makedirs(cfg.out, exist_ok=True)
        self.progress.log(f"{cfg.preset}: {cfg.model} x{cfg.width} {self.model_cfg.mode} on {cfg.dataset} "
                          f"({len(self.bundle.train)} train / {len(self.bundle.test)} test images), "
                          f"{self.epochs} epochs x {self.steps_per_epoch} steps, global batch {cfg.batch_size}"
                          f"{f', {self.d.world} ranks' if self.d.enabled else ''} -> {cfg.out}")
        if self.history and self.d.main:  # resumed: the reports as of the checkpoint (trims any row ahead of it)
            self.write_reports()
        with StopRequest() as stop:
            while self.epoch < self.epochs:
                self.methods.begin_epoch()
                self.train_epoch(stop)
                self.end_epoch()
        return self.finish()

    def train_epoch(self, stop: StopRequest) -> None:
        loader = self.train_loader
        loader.set_epoch(self.epoch)
        self.net.train()
        sums = self.partial
        shown, tick = self.batch, time.perf_counter()
        self.progress.start(self.epoch, self.epochs, self.steps_per_epoch, self.batch)
        waited = time.perf_counter()
        for x, y in loader.iterate(self.batch):
            got = time.perf_counter()
            x, y = x.to(self.d.device, non_blocking=True), y.to(self.d.device, non_blocking=True)
            logits, loss = self.methods.train_step(self.net, self.optimizer, x, y)
            if self.decay is not None:
                self.decay.step()
            self.methods.after_step()
            local = [loss.item() * y.numel(), (logits.argmax(1) == y).sum().item(), y.numel()]
            flag = float(stop.signum)
            step_sum = distributed.all_sum(self.d, local + [flag]) if self.d.enabled else local + [flag]
            if not math.isfinite(step_sum[0]):  # every rank sees the global sum: all stop together
                self.progress.close()
                raise Diverged(f"the training loss is {step_sum[0] / step_sum[2]}", self.epoch + 1,
                               self.batch + 1, self.ckpt_path)
            self.step_loss.append((step_sum[0] / step_sum[2], build.current_f(self.model)))
            for i in range(3):
                sums[i] += step_sum[i]
            sums[3] += got - waited
            self.batch += 1
            self.global_step += 1
            if self.on_step is not None:
                self.on_step(self)
            now = time.perf_counter()
            sums[4] += now - waited
            if now - tick > 0.5 or self.batch == self.steps_per_epoch:
                self.progress.update(self.batch - shown, sums[0] / sums[2], 100 * sums[1] / sums[2],
                                     build.current_f(self.model), sums[2] / max(sums[4], 1e-9))
                shown, tick = self.batch, now
            if step_sum[3] or stop.signum:
                self.progress.close()
                self.save()
                raise Interrupted(stop.signum, self.ckpt_path)  # 0: the signal reached another rank
            waited = time.perf_counter()
        self.progress.close()

    def end_epoch(self) -> None:
        sums = self.partial
        train_s = distributed.all_sum(self.d, [sums[4]])[0] / self.d.world  # mean over ranks
        row = {"epoch": self.epoch + 1, "train_loss": sums[0] / sums[2], "train_acc": 100 * sums[1] / sums[2],
               "f": build.current_f(self.model), "lr": self.optimizer.param_groups[0]["lr"],
               "images_per_s": sums[2] / max(train_s, 1e-9), "data_wait": sums[3] / max(sums[4], 1e-9)}
        # at f = 0 the expanded model is the LP one: one evaluation serves both columns
        row.update(evaluate_both(self.model, self.test_loader, self.d, self.decay is not None and row["f"] > 0))
        row.update(self.methods.epoch_columns())
        if not all(math.isfinite(row[k]) for k in ("test_loss", "test_loss_lp")):
            raise Diverged(f"the test loss is {row['test_loss']} (LP alone {row['test_loss_lp']})", self.epoch + 1,
                           self.steps_per_epoch, self.ckpt_path)
        row["epoch_time"] = sums[4]
        if self.d.enabled:  # every rank must hold the same f and the same weights
            checksum = sum(float(p.detach().double().sum()) for p in self.model.parameters())
            spread = distributed.spread(self.d, [row["f"], checksum])
            if spread != 0:
                raise RuntimeError(f"DDP ranks disagree on f or the weights (spread {spread}) after epoch "
                                   f"{self.epoch + 1}")
        self.history.append(row)
        with warnings.catch_warnings():  # resumed at an epoch's end: no optimizer.step() in this process yet
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()` before"))
            self.lr_scheduler.step()
            self.methods.end_epoch_lr()
        self.epoch, self.batch, self.partial = self.epoch + 1, 0, [0.0] * 5
        self.progress.log(epoch_line(row, self.epochs, self.decay is not None))
        if self.methods.describe(row):
            self.progress.log(self.methods.describe(row))
        self.save()  # first: the reports are never ahead of the checkpoint, even when a write fails
        self.methods.stage_checkpoint(self.state)
        if self.d.main:
            self.write_reports()

    def write_reports(self) -> None:
        out = self.cfg.out
        metrics.write_csv(os.path.join(out, "metrics.csv"), self.history)
        lines = "step,loss,f\n" + "".join(f"{i + 1},{loss!r},{f!r}\n" for i, (loss, f) in enumerate(self.step_loss))
        write_text(os.path.join(out, "steps.csv"), lines)
        plots.run_curves(os.path.join(out, "curves.png"), self.history, self.step_loss, self.steps_per_epoch,
                         f"{self.cfg.model} x{self.cfg.width} {self.model_cfg.mode} on {self.cfg.dataset}")

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        cfg, last = self.cfg, self.history[-1]
        summary = {"mode": self.model_cfg.mode, "epochs": self.epochs, "seed": cfg.seed,
                   "final_test_acc": last["test_acc_lp"], "final_test_top5": last["test_top5_lp"],
                   "final_test_acc_expanded": last["test_acc"], "best_test_acc": max(r["test_acc_lp"] for r in self.history),
                   "final_train_loss": last["train_loss"],
                   "mean_epoch_time": sum(r["epoch_time"] for r in self.history) / len(self.history),
                   "mean_images_per_s": sum(r["images_per_s"] for r in self.history) / len(self.history),
                   "mean_data_wait": sum(r["data_wait"] for r in self.history) / len(self.history),
                   "parameters_trained": sum(p.numel() for p in self.model.parameters()),
                   "config": cfg.to_dict()}
        shipped, shipped_cfg = self.model, self.model_cfg
        if self.decay is not None:
            if build.current_f(self.model) != 0.0:
                raise RuntimeError(f"training ended with f = {build.current_f(self.model)}, not 0: cannot collapse")
            shipped, result = export.collapse_checked(self.model, self.test_loader, self.d)
            shipped_cfg = self.model_cfg.replace(mode="lp")
            summary["collapsed_test_acc"] = result["acc"]
            self.progress.log(f"collapsed: {result['acc']:.2f}% test accuracy, equal to the expanded model at f = 0")
        self.methods.finish(summary)
        stem = "fp_model" if shipped_cfg.mode == "fp" else "lp_model"
        summary["parameters_shipped"] = sum(p.numel() for p in shipped.parameters())
        if self.d.main:
            weights, config = export.export(shipped, shipped_cfg, cfg.out, stem)
            summary.update(model_weights=weights, model_config=config, metrics=os.path.join(cfg.out, "metrics.csv"),
                           curves=os.path.join(cfg.out, "curves.png"))
            metrics.write_json(os.path.join(cfg.out, "summary.json"), summary)
            self.progress.log(f"done: {summary['final_test_acc']:.2f}% test accuracy; model {weights} + {config}")
        distributed.barrier(self.d)
        return summary


def train(cfg: TrainConfig, on_step=None) -> dict:
    """Train per ``cfg`` (joining torchrun's process group when launched by it); the summary dict."""
    d = distributed.setup(cfg.bind_cores, cfg.threads)
    held = None
    try:
        refused = None
        if d.main:  # the folder is checked and locked before anything is loaded or written
            try:
                held = preflight.open_run_folder(cfg.out, "expcuda train")
            except (RunFolderError, FolderBusy, WriteError) as exc:
                refused = exc
        if distributed.any_rank(d, refused is not None):
            raise refused or FolderBusy(f"{cfg.out}: rank 0 could not take the run folder")
        return Run(cfg, d, on_step).fit()
    finally:
        if held is not None:
            held.release()
        distributed.teardown(d)
