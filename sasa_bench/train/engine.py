"""The training engine both loops share: the epoch loop, the optimiser step (with gradient
accumulation), end-of-epoch rows, evaluation, checkpoints, metrics and the common summary.

A loop (classification in :mod:`sasa_bench.train.loop`, detection in
:mod:`sasa_bench.train.detection`) builds its model, data and :class:`TrainState`, and hands a
:class:`Task` (its batches, its loss, its evaluation) to :class:`Trainer`. Progress goes through
:class:`sasa_bench.progress.TrainProgress` (the caller's callbacks, or its own rendering);
nothing here imports from ``cli/``. Only rank 0 writes or prints.

Gradient accumulation (``grad_accum_steps`` N): each rank's share of a global batch
(``batch_size / processes`` images) is cut into N equal micro-batches, run forward and backward
one at a time with the loss divided by N (DDP's gradient all-reduce only on the last one), then
one optimiser step: the same update as the whole batch at once, except that BatchNorm sees the
micro-batches' statistics (as in timm and every accumulation scheme). The schedule, the LR scaling
rule and the data order follow the global batch, so they do not depend on N.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from sasa_bench.errors import SasaError
from sasa_bench.hardware import AUTOCAST_DTYPES
from sasa_bench.progress import TrainProgress
from sasa_bench.spec import ModelSpec
from sasa_bench.store import atomic_write_json, atomic_write_text, check_folder, clean_stale_temps
from sasa_bench.train import checkpoint as ckpt
from sasa_bench.train import distributed as D
from sasa_bench.train.recipes import TrainConfig
from sasa_bench.train.state import TrainState
from sasa_bench.train.tensorboard import TensorBoardLog


class NonFiniteLoss(SasaError):
    """The loss became NaN/inf: the run stops, the last good checkpoint stays."""


# --------------------------------------------------------------------------- small pieces


def autocast(device: torch.device, precision: str):
    dtype = AUTOCAST_DTYPES[precision]  # the one precision table (hardware.py)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def set_determinism(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def write_metrics(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else (round(r[k], 6) if isinstance(r[k], float) else r[k]))
                    for k in columns})
    atomic_write_text(path, buf.getvalue())


def resolved_config_dict(spec: ModelSpec, cfg: TrainConfig) -> dict[str, Any]:
    """The config as saved (reusable with --config: ``model`` carries the full spec)."""
    d = cfg.to_dict()
    d["model"] = spec.to_dict()
    return d


def write_run_config(
    out_dir: Path, spec: ModelSpec, cfg: TrainConfig, history: list[dict[str, Any]], env: D.DistEnv,
    extra: dict[str, Any] | None = None,
) -> None:
    """``out_dir/config.yaml`` (rank 0; every rank waits): the resolved config, reusable with
    ``--config``, plus ``extra`` fields and, after ``--resume-override``, what changed at which
    step (``config_history``, which read_config_file ignores)."""
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        saved = {**resolved_config_dict(spec, cfg), **(extra or {})}
        if history:
            saved["config_history"] = history
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(saved, sort_keys=False))
    D.barrier(env)


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the state dict (parameters and buffers): equal digests = bit-identical weights."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def check_out_dir(out_dir: Path, resume: str | Path | None, overwrite: bool) -> None:
    """Before any work: ``out_dir`` can be a run directory, and a fresh run does not silently
    replace a run that is already there. Temp files a killed writer left there are removed."""
    check_folder(out_dir, "--out")
    if resume is None and not overwrite:
        held = [n for n in (ckpt.NAME, "summary.json") if (out_dir / n).exists()]
        if held:
            raise SasaError(
                f"{out_dir} already holds a run ({', '.join(held)}); add --resume auto to continue it, "
                "or choose another --out"
            )
    clean_stale_temps(out_dir)


def accum_steps(cfg: TrainConfig) -> int:
    return cfg.grad_accum_steps or 1


def micro_batch_size(cfg: TrainConfig, world: int) -> int:
    """Images per forward pass on one process: batch / processes / accumulation steps (one
    error line when they do not divide)."""
    n = accum_steps(cfg)
    if cfg.batch_size % (world * n):
        raise SasaError(
            f"batch size {cfg.batch_size} is not divisible by {world} process(es) x {n} accumulation step(s)"
        )
    return cfg.batch_size // (world * n)


def split_batch(batch: tuple, n: int) -> list[tuple]:
    """``n`` equal micro-batches of a batch whose parts (tensors or lists) share their length."""
    if n == 1:
        return [batch]
    size = len(batch[0]) // n
    return [tuple(part[i * size : (i + 1) * size] for part in batch) for i in range(n)]


# --------------------------------------------------------------------------- the task interface


class Task:
    """What differs between the loops: the data, the loss of a (micro-)batch, the evaluation."""

    columns: list[str]  # metrics.csv columns
    headline: str  # the eval metric whose best is kept (checkpoint key ``best_<headline>``)

    def __init__(self, train_data: Any, eval_data: Any, cfg: Any, env: Any) -> None:
        self.train_data, self.eval_data, self.cfg, self.env = train_data, eval_data, cfg, env
        self.eval_bs = cfg.eval_batch_size or max(1, cfg.batch_size // env.world)  # per rank

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, tuple]]:  # pragma: no cover
        """(step within the epoch, this rank's share of the global batch) from ``start_step``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:  # pragma: no cover
        """The mean loss of one (micro-)batch, as a float32 scalar that backpropagates."""
        raise NotImplementedError

    def evaluate(self, model: nn.Module) -> dict[str, Any]:  # pragma: no cover
        """The eval metrics of ``model`` over the whole eval split (every rank gets them)."""
        raise NotImplementedError

    def eval_row(self, metrics: dict[str, Any]) -> dict[str, Any]:  # pragma: no cover
        """The metrics.csv columns an evaluation fills (None when the epoch was not evaluated)."""
        raise NotImplementedError

    def eval_words(self, metrics: dict[str, Any]) -> str:  # pragma: no cover
        raise NotImplementedError


@dataclass
class Plan:
    """A run's length: steps per epoch, warm-up, the schedule's total, where it stops."""

    spe: int
    warmup_steps: int
    total_steps: int
    stop_at: int

    @property
    def n_epochs(self) -> int:
        return math.ceil(self.total_steps / self.spe)


# --------------------------------------------------------------------------- the trainer


class Trainer:
    """Runs a :class:`Task` on a :class:`TrainState` to the plan's end (or ``max_steps``)."""

    def __init__(self, state: TrainState, task: Task, plan: Plan, env: D.DistEnv, out_dir: Path,
                 train_model: nn.Module, bar: TrainProgress, tb: TensorBoardLog) -> None:
        self.st, self.task, self.plan, self.env, self.out_dir = state, task, plan, env, Path(out_dir)
        self.train_model, self.bar, self.tb = train_model, bar, tb
        self.ckpt_path = self.out_dir / ckpt.NAME
        self.accum = accum_steps(state.cfg)
        self.train_time, self.train_images = 0.0, 0  # this session's, for its images/s
        self.final_loss: float | None = state.rows[-1]["train_loss"] if state.rows else None
        self.last_eval: dict[str, Any] | None = None
        self.last_eval_step = -1

    # ------------------------------------------------------------------ one step

    def optimizer_step(self, batch: tuple) -> float:
        """Forward/backward over the batch's micro-batches (scaled; DDP syncs on the last), optional
        clipping, the step, the schedule and the EMA; returns the loss averaged over ranks, after
        refusing a non-finite one (the last good checkpoint stays)."""
        st, env, n = self.st, self.env, self.accum
        st.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        micro = split_batch(batch, n)
        for i, mb in enumerate(micro):
            no_sync = getattr(self.train_model, "no_sync", None)
            ctx = no_sync() if (no_sync is not None and i < n - 1) else contextlib.nullcontext()
            with ctx:
                loss = self.task.loss(self.train_model, mb)
                st.scaler.scale(loss / n if n > 1 else loss).backward()
            total = total + loss.detach().float().reshape(()).cpu().double()
        if st.cfg.grad_clip:
            st.scaler.unscale_(st.opt)
            nn.utils.clip_grad_norm_(st.model.parameters(), st.cfg.grad_clip)
        loss_v = (D.all_reduce_sum((total / n).reshape(1), env) / env.world).item()
        if not math.isfinite(loss_v):
            last = f"; the last good checkpoint is {self.ckpt_path}" if self.ckpt_path.is_file() else ""
            raise NonFiniteLoss(
                f"loss became {loss_v} at step {st.global_step + 1} (epoch {st.epoch + 1}); stopping "
                f"(try a lower --lr or --precision fp32){last}"
            )
        st.scaler.step(st.opt)
        st.scaler.update()
        st.sched.step()
        if st.ema is not None:
            st.ema.update(st.model)
        return loss_v

    # ------------------------------------------------------------------ one epoch

    def train_one_epoch(self) -> bool:
        """Train from the state's position to the epoch's end (or the stop); True if the epoch ended."""
        st, plan, cfg = self.st, self.plan, self.st.cfg
        steps_this_epoch = min(plan.spe, plan.total_steps - st.epoch * plan.spe)
        self.bar.epoch(st.epoch, plan.n_epochs, st.step_in_epoch, steps_this_epoch)
        t_ep = time.perf_counter()
        for s, batch in self.task.batches(st.epoch, st.step_in_epoch):
            if s >= steps_this_epoch or st.global_step >= plan.stop_at:
                break
            lr = st.opt.param_groups[0]["lr"]
            loss_v = self.optimizer_step(batch)
            st.global_step += 1
            st.step_in_epoch = s + 1
            st.loss_sum += loss_v
            st.loss_n += 1
            now = time.perf_counter()
            st.epoch_time += now - t_ep
            self.train_time += now - t_ep
            self.train_images += cfg.batch_size
            t_ep = now
            img_s = self.train_images / max(self.train_time, 1e-9)
            self.bar.step(st.global_step, st.step_in_epoch, loss_v, lr, img_s)
            self.tb.step(st.global_step, loss_v, lr, img_s)
            if (cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0
                    and st.step_in_epoch < steps_this_epoch and st.global_step < plan.stop_at):
                self.save()
        self.final_loss = st.loss_sum / max(1, st.loss_n)
        return st.step_in_epoch >= steps_this_epoch

    def evaluate(self) -> dict[str, Any]:
        """BN statistics averaged over the ranks, then the task's evaluation of the eval model;
        the best headline metric is kept."""
        self.average_buffers()
        m = self.task.evaluate(self.st.eval_model)
        self.st.best = max(self.st.best or 0.0, m[self.task.headline])
        self.last_eval, self.last_eval_step = m, self.st.global_step
        return m

    def average_buffers(self) -> None:
        for m in self.st.models():
            D.average_buffers(m, self.env)

    def end_epoch(self) -> None:
        """The epoch's metrics row (evaluated every ``eval_every`` epochs and at the end), its
        log line, the next epoch's start, a checkpoint and metrics.csv."""
        st, cfg = self.st, self.st.cfg
        is_last = st.global_step >= self.plan.stop_at
        evaluated = (st.epoch + 1) % cfg.eval_every == 0 or is_last
        if not evaluated:  # evaluate() averages them itself (averaging twice can move the last bit)
            self.average_buffers()
        row: dict[str, Any] = {
            "epoch": st.epoch + 1, "step": st.global_step, "train_loss": self.final_loss,
            "lr": st.opt.param_groups[0]["lr"], "images_per_s": st.loss_n * cfg.batch_size / max(st.epoch_time, 1e-9),
            "epoch_time_s": st.epoch_time, "elapsed_s": st.wall(), **self.task.eval_row({}),
        }
        if evaluated:
            row.update(self.task.eval_row(self.evaluate()))
        st.rows.append(row)
        self.bar.log(
            f"epoch {st.epoch + 1}/{self.plan.n_epochs}: train loss {self.final_loss:.4f}"
            + (f", {self.task.eval_words(self.last_eval)}" if evaluated else "")
            + f", {row['images_per_s']:.0f} img/s, {st.epoch_time:.1f} s"
        )
        self.tb.row(row, self.task.columns)
        st.end_epoch()
        self.save()
        if self.env.is_main:
            write_metrics(self.out_dir / "metrics.csv", st.rows, self.task.columns)

    def save(self) -> None:
        if self.env.is_main:
            self.st.save(self.ckpt_path, self.plan.spe)

    # ------------------------------------------------------------------ the whole run

    def fit(self) -> dict[str, Any]:
        """Train to the stop, evaluate where it stopped; returns the last evaluation."""
        st = self.st
        st.model.train()
        with self.bar:
            self.bar.start(st.global_step)
            while st.global_step < self.plan.stop_at:
                if not self.train_one_epoch():  # stopped by max_steps mid-epoch
                    break
                self.end_epoch()
        if self.last_eval_step != st.global_step:  # max_steps mid-run, or a resumed finished run
            self.evaluate()
            if self.stopped_early:  # keep a checkpoint to continue from
                self.save()
        if self.env.is_main:
            write_metrics(self.out_dir / "metrics.csv", st.rows, self.task.columns)
        self.tb.close()
        assert self.last_eval is not None
        return self.last_eval

    @property
    def stopped_early(self) -> bool:
        return self.st.global_step < self.plan.total_steps

    def summary(self, n_params: int) -> dict[str, Any]:
        """The fields every task's summary has (the task adds its metrics)."""
        st, cfg, env = self.st, self.st.cfg, self.env
        digests = D.all_gather_object(weights_digest(st.model), env)
        return {
            "epochs": st.global_step / self.plan.spe,
            "planned_epochs": cfg.epochs,
            "steps": st.global_step,
            "planned_steps": self.plan.total_steps,
            "stopped_early": self.stopped_early,
            "wall_s": st.wall(),
            "train_s": self.train_time,
            "train_images_per_s": self.train_images / self.train_time if self.train_time > 0 else None,
            "final_loss": self.final_loss,
            "params": n_params,
            "batch_size": cfg.batch_size,
            "grad_accum_steps": self.accum,
            "micro_batch_size": cfg.batch_size // (env.world * self.accum),
            "world_size": env.world,
            "weights_sha256": digests[0],
            "ranks_in_sync": len(set(digests)) == 1,
            "device": str(env.device),
            "precision": cfg.precision,
        }

    def write_summary(self, summary: dict[str, Any], done_words: str) -> None:
        if self.env.is_main:
            atomic_write_json(self.out_dir / "summary.json", summary)
            self.bar.log(f"done: {done_words}, {self.st.global_step} steps in {summary['wall_s']:.1f} s "
                         f"-> {self.out_dir / 'summary.json'}")
        D.barrier(self.env)
