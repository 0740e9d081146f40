"""``run_training``: the epoch loop behind ``pcfast train`` and the experiments.

Per epoch it writes a metrics row (JSON lines), the curves (PNG) and an atomic checkpoint; with
``resume`` it continues from the last complete checkpoint and keeps the metrics that led to it.
A non-finite loss or energy stops the run with :class:`TrainingDiverged`, leaving the last good
checkpoint intact.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pcfast import distributed as pdist
from pcfast.data.pipeline import build_data, data_label
from pcfast.models import build_model, count_parameters
from pcfast.train.checkpoint import (
    load_checkpoint,
    read_metrics,
    save_checkpoint,
    write_json,
    write_metrics,
)
from pcfast.train.config import TrainConfig
from pcfast.train.plots import plot_curves
from pcfast.train.rules import Rule, build_optimizer, build_rule
from pcfast.train.schedule import LRSchedule

SYNC_EVERY = 20  # optimizer steps between host syncs (progress bar, divergence check)


# Measured on a CPU (reference path): one PC inference step of Res-DualNet on a batch of 256
# images takes about 1.0 s, so the seed set-up (T=100) takes about 100 s per batch.
CPU_PC_STEP_SECONDS_PER_256 = {"resdualnet": 1.0}
SLOW_EPOCH_SECONDS = 600.0  # a CPU estimate above this gets a line pointing to --preset demo


# The metric-row fields that measure time (they differ between two runs of one command).
TIMING_FIELDS = ("epoch_seconds", "images_per_s", "cpu_busy")


def cpu_threads_note(old: int, new: int) -> str:
    """The line a CPU resume prints when the checkpoint was written with another thread count."""
    return (f"--resume: the checkpoint was trained with {old} CPU threads, this process has "
            f"{new}. The run continues, but not bit for bit as an uninterrupted {old}-thread run "
            f"would (CPU kernels split their sums by thread count); for that, run with "
            f"OMP_NUM_THREADS={old}.")


def estimate_cpu_epoch_seconds(cfg: TrainConfig, batches: int) -> float | None:
    """Estimated seconds per training epoch of a PC run on the CPU, or None without a figure.

    Scales the measured time per inference step (``CPU_PC_STEP_SECONDS_PER_256``) by ``cfg.T``,
    the batch size relative to 256 and the ``batches`` per epoch. An estimate: the CPU, its
    load and the schedule change it.
    """
    per_step = CPU_PC_STEP_SECONDS_PER_256.get(cfg.model)
    if cfg.rule != "pc" or per_step is None:
        return None
    return per_step * cfg.T * (cfg.batch_size / 256) * batches


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:.0f} s"


def cpu_time_note(cfg: TrainConfig, batches: int) -> str | None:
    """One line for a slow CPU run (the seed ``seed-pc`` set-up, say): the estimated time per
    epoch and the preset to use instead. None when the estimate is short or unknown."""
    seconds = estimate_cpu_epoch_seconds(cfg, batches)
    if seconds is None or seconds < SLOW_EPOCH_SECONDS:
        return None
    per_step = CPU_PC_STEP_SECONDS_PER_256[cfg.model]
    return (f"Estimated time on a CPU: about {_duration(seconds)} per epoch ({batches} batches of "
            f"{cfg.batch_size}, T={cfg.T}, at ~{per_step:g} s per inference step per batch of 256, "
            "an estimate from a measured figure). This set-up is meant for a GPU; for a run of a "
            "few minutes on a CPU use --preset demo.")


class TrainingDiverged(RuntimeError):
    """The loss or the PC energy became NaN or infinite."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for but CUDA is not available; use --device cpu")
    return device


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader, num_classes: int = 10,
             reduce: Callable[..., list[torch.Tensor]] | None = None) -> dict[str, Any]:
    """Mean cross-entropy, accuracy and per-class accuracy of ``model`` on ``loader``.

    ``reduce`` sums the loss and the per-class counts over the ranks
    (:meth:`pcfast.distributed.DistContext.all_reduce_sum`): with each rank holding a block of
    the set, the metrics are those of the whole set.
    """
    was_training = model.training
    model.eval()
    loss = torch.zeros((), device=loader.device)
    correct = torch.zeros(num_classes, device=loader.device)
    total = torch.zeros(num_classes, device=loader.device)
    for x, y in loader:
        logits = model(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        hit = (logits.argmax(1) == y).float()
        correct += torch.bincount(y, weights=hit, minlength=num_classes)[:num_classes]
        total += torch.bincount(y, minlength=num_classes)[:num_classes].float()
    model.train(was_training)
    if reduce is not None:
        loss, correct, total = reduce(loss, correct, total)
    n = total.sum().item()
    per_class = (correct / total.clamp(min=1)).tolist()
    return {"loss": loss.item() / max(n, 1), "acc": correct.sum().item() / max(n, 1),
            "acc_per_class": per_class}


def _apply_init(model: torch.nn.Module, init: str) -> None:
    if init == "default":
        return
    from pcfast.models.init import apply_init

    apply_init(model, init)


class _Run:
    """State of one run; ``run_training`` drives it."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None]) -> None:
        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir)
        self.ckpt_path = self.out / "checkpoint.pt"
        self.metrics_path = self.out / "metrics.jsonl"
        # One process, or this rank of a torchrun job (pcfast.distributed): only rank 0 logs.
        self.dist = pdist.init_distributed(cfg.device)
        self.device = self.dist.device
        self.log = log = pdist.rank_zero(log, self.dist)
        pdist.check_config(cfg, self.dist)
        torch.manual_seed(cfg.seed)
        # Model, rule and optimizer first: a bad option fails before any data is read.
        self.model = build_model(cfg.model, **cfg.model_kwargs).to(self.device)
        _apply_init(self.model, cfg.init)
        if cfg.sync_bn:
            self.model = pdist.prepare_sync_bn(self.model, self.dist, log)
        self.rule: Rule = build_rule(self.model, cfg)
        self.optimizer = build_optimizer(self.rule.parameter_groups(), cfg)
        self.schedule = LRSchedule(self.optimizer, cfg)
        # Several ranks: rank 0's weights everywhere; BP through DDP, PC and DTP average their
        # own gradients (pcfast.distributed.distribute_rule).
        self.dist.broadcast_module(self.model)
        pdist.distribute_rule(self.rule, self.dist)
        # Then the data: a missing or corrupt copy fails before anything is written.
        self.data = self.dist.main_first(lambda: build_data(cfg, self.device, log))
        self.full_test = self.data.test  # the whole test set, for the rule's own metrics
        self.data = pdist.shard_data(self.data, self.dist)  # this rank's part of each batch
        self.out.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        self.epoch = 0
        self.step = 0
        self.train_error: float | None = None

    # ----------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "config": self.cfg.to_dict(),
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "rule": self.rule.state_dict() if hasattr(self.rule, "state_dict") else {},
            "world_size": self.dist.world_size,
            "cpu_threads": torch.get_num_threads(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def restore(self) -> None:
        # Rank 0 reads it and sends it to the other ranks (their machines may not hold it).
        where = "cpu" if self.dist.enabled else self.device
        ckpt = self.dist.from_main(lambda: load_checkpoint(self.ckpt_path, where))
        old = ckpt["config"]
        for key in ("model", "rule", "model_kwargs"):
            if old.get(key) != getattr(self.cfg, key):
                raise ValueError(
                    f"--resume: the checkpoint in {self.out} was trained with {key}={old.get(key)!r}, "
                    f"not {getattr(self.cfg, key)!r}; use another --out-dir or the same options"
                )
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["schedule"])
        if ckpt.get("rule") and hasattr(self.rule, "load_state_dict"):
            self.rule.load_state_dict(ckpt["rule"])
        torch.set_rng_state(ckpt["rng_cpu"])
        if ckpt.get("rng_cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(ckpt["rng_cuda"])
        self.epoch, self.step = ckpt["epoch"] + 1, ckpt["step"]
        self.rows = [r for r in read_metrics(self.metrics_path) if r["epoch"] <= ckpt["epoch"] + 1]
        if self.dist.is_main:
            write_metrics(self.metrics_path, self.rows)
        if ckpt.get("world_size", 1) != self.dist.world_size:
            self.log(pdist.world_size_note(ckpt.get("world_size", 1), self.dist.world_size,
                                           self.cfg))
        threads = ckpt.get("cpu_threads")
        if self.device.type == "cpu" and threads not in (None, torch.get_num_threads()):
            self.log(cpu_threads_note(threads, torch.get_num_threads()))
        self.log(f"Resuming {self.out} after epoch {ckpt['epoch'] + 1} (step {self.step}).")

    # ---------------------------------------------------------------------- epochs
    def num_epochs(self) -> int:
        if self.cfg.iterations:
            return math.ceil(self.cfg.iterations / len(self.data.train))
        return self.cfg.epochs

    def train_epoch(self, total_epochs: int) -> dict[str, float]:
        cfg, loader = self.cfg, self.data.train
        loader.set_epoch(self.epoch)
        self.dist.seed_epoch(cfg.seed, self.epoch)
        self.schedule.on_epoch_start(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        means: dict[str, float] = {}
        bar = tqdm(total=len(loader), desc=f"epoch {self.epoch + 1}/{total_epochs}",
                   disable=not cfg.progress or not self.dist.is_main, leave=False,
                   dynamic_ncols=True)
        start, cpu_start = time.perf_counter(), time.process_time()
        for i, (x, y) in enumerate(loader):
            if cfg.iterations and self.step >= cfg.iterations:
                break
            self.schedule.on_iteration(self.step, self.train_error)
            out = self.rule.train_step(x, y, self.optimizer)
            for k, v in out.items():
                sums[k] = sums.get(k, 0) + v.detach().float() * x.shape[0]
            seen += x.shape[0]
            self.step += 1
            bar.update()
            if (i + 1) % SYNC_EVERY == 0:
                means = self._sync(sums, seen, i + 1)
                bar.set_postfix({k: f"{v:.4g}" for k, v in means.items()}, refresh=False)
        means = self._sync(sums, seen, len(loader)) if seen else {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - start
        cpu_seconds = time.process_time() - cpu_start
        bar.close()
        means.update(seconds=seconds, cpu_seconds=cpu_seconds,
                     images=seen * self.dist.world_size)  # equal local batches
        return means

    def _sync(self, sums: dict[str, torch.Tensor], seen: int, batch: int) -> dict[str, float]:
        # Over all ranks: a NaN on any rank reaches every rank here, and they stop together.
        sums, seen = self.dist.reduce_sums(sums, seen)
        means = {k: (v / seen).item() for k, v in sums.items()}
        bad = {k: v for k, v in means.items() if not math.isfinite(v)}
        if bad:
            last = f"epoch {self.epoch}" if self.ckpt_path.exists() else "none was written yet"
            raise TrainingDiverged(
                f"training diverged at epoch {self.epoch + 1}, batch {batch}: "
                + ", ".join(f"{k}={v}" for k, v in bad.items())
                + f". The last good checkpoint ({self.ckpt_path}, {last}) is intact; lower --lr "
                "or --rate, or set --error-clamp / --grad-clip, then run again with --resume"
            )
        if "accuracy" in means:
            self.train_error = 1.0 - means["accuracy"]
        return means

    def end_epoch(self, train: dict[str, float]) -> dict[str, Any]:
        self.dist.broadcast_module(self.model, buffers_only=True)  # rank 0's BN statistics
        test = evaluate(self.model, self.data.test, reduce=self.dist.all_reduce_sum)
        row: dict[str, Any] = {
            "epoch": self.epoch + 1, "step": self.step, "data": self.data.source,
            "lr": self.schedule.current_lr(),
            "train_loss": train.get("loss"), "train_acc": train.get("accuracy"),
            "train_error": None if "accuracy" not in train else 1.0 - train["accuracy"],
            "test_loss": test["loss"], "test_acc": test["acc"],
            "test_acc_per_class": test["acc_per_class"],
            "epoch_seconds": train["seconds"],
            "images_per_s": train["images"] / max(train["seconds"], 1e-9),
            "cpu_threads": torch.get_num_threads(),
        }
        if self.device.type == "cpu":
            # The share of its threads' time the epoch's training got: ~1 when the run had its
            # cores to itself (it is compute-bound), ~0.5 when a job of its size shared them.
            row["cpu_busy"] = train["cpu_seconds"] / max(train["seconds"] * row["cpu_threads"],
                                                         1e-9)
        for k, v in train.items():
            if k not in ("loss", "accuracy", "seconds", "cpu_seconds", "images"):
                row[k] = v
        eval_error = 1.0 - test["acc"]
        if self.data.val is not None:
            val = evaluate(self.model, self.data.val, reduce=self.dist.all_reduce_sum)
            row.update(val_loss=val["loss"], val_acc=val["acc"])
            eval_error = 1.0 - val["acc"]
        row.update(self.rule.epoch_metrics(self.full_test))
        row["best_test_acc"] = max([r["test_acc"] for r in self.rows] + [test["acc"]])
        self.schedule.on_epoch_end(eval_error)
        return row


def run_training(cfg: TrainConfig, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Train as ``cfg`` says; returns the per-epoch metric rows (also in ``metrics.jsonl``).

    Example::

        rows = run_training(TrainConfig(rule="bp", epochs=1, train_subset=512, out_dir="runs/x"))
        rows[-1]["test_acc"]
    """
    run = _Run(cfg, log)
    log, main = run.log, run.dist.is_main  # under torchrun only rank 0 logs and writes files
    if cfg.resume and run.dist.from_main(run.ckpt_path.exists):
        run.restore()
    elif cfg.resume:
        log(f"--resume: no checkpoint in {run.out} yet, starting afresh.")
    # "data" records where the images came from ("synthetic" or "cifar10:<path>").
    if main:
        write_json(run.out / "config.json", {**cfg.to_dict(), "data": run.data.source})
    total = run.num_epochs()
    if run.epoch == 0:
        if main:
            write_metrics(run.metrics_path, [])
        where = (f"{run.device}" if not run.dist.enabled else f"{run.dist.world_size} ranks "
                 f"({run.device.type}, {cfg.batch_size // run.dist.world_size} images each)")
        log(f"{cfg.model} ({count_parameters(run.model):,} parameters), rule {cfg.rule}, "
            f"{total} epochs of {len(run.data.train)} batches on {where}; data: "
            f"{run.data.source}; writing to {run.out}")
    if run.device.type == "cpu":
        note = cpu_time_note(cfg, len(run.data.train))
        if note:
            log(note)
    title = f"{cfg.model} / {cfg.rule} / {data_label(run.data.source)}"
    while run.epoch < total and not (cfg.iterations and run.step >= cfg.iterations):
        train = run.train_epoch(total)
        row = run.end_epoch(train)
        run.rows.append(row)
        if main:
            write_metrics(run.metrics_path, run.rows)
            save_checkpoint(run.ckpt_path, run.state())
            plot_curves(run.rows, run.out / "curves.png", title=title)
        log(f"epoch {row['epoch']}/{total}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.4f} | test loss {row['test_loss']:.4f} "
            f"acc {row['test_acc']:.4f} | {row['epoch_seconds']:.1f} s, "
            f"{row['images_per_s']:.0f} img/s")
        run.epoch += 1
    run.dist.close()
    return run.rows
