"""TrainState: everything a run must carry over an interruption, and how it saves and restores
itself through :mod:`sasa_bench.train.checkpoint` (atomic writes, ``weights_only`` reads).

The objects (model, optimiser, LR scheduler, grad scaler, EMA) and the position (global step,
epoch, next step within the epoch, the epoch's running loss and time), the metrics rows so far,
the best headline metric, the ``--resume-override`` history and the wall time of earlier
sessions. Both training loops (classification and detection) keep their progress here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sasa_bench.errors import SasaError
from sasa_bench.spec import ModelSpec
from sasa_bench.train import checkpoint as ckpt
from sasa_bench.train.optim import EMA, WarmupCosine, apply_new_settings
from sasa_bench.train.recipes import NEUTRAL_FIELDS, TrainConfig

# A resumed run may also change where it stops (--max-steps), besides the neutral settings.
RESUME_NEUTRAL = NEUTRAL_FIELDS | {"max_steps"}


@dataclass
class TrainState:
    """A run's objects and position; ``best_key`` names the headline metric in the checkpoint
    (``best_top1`` for classification, ``best_map`` for detection)."""

    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    ema: EMA | None
    lr_lambda: WarmupCosine
    spec: ModelSpec
    cfg: TrainConfig
    best_key: str = "best_top1"
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    loss_sum: float = 0.0
    loss_n: int = 0
    epoch_time: float = 0.0
    prior_wall: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    resumed_from: Path | None = None
    t_start: float = field(default_factory=time.perf_counter)

    @property
    def eval_model(self) -> nn.Module:
        """What is evaluated: the EMA weights when EMA is on, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def models(self) -> list[nn.Module]:
        return [self.model] + ([self.ema.module] if self.ema is not None else [])

    def wall(self) -> float:
        return self.prior_wall + time.perf_counter() - self.t_start

    def end_epoch(self) -> None:
        """The next epoch starts: position and the running loss/time reset."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.loss_sum, self.loss_n, self.epoch_time = 0.0, 0, 0.0

    # ------------------------------------------------------------------ save / restore

    def payload(self, spe: int) -> dict[str, Any]:
        """What :func:`checkpoint.save` writes (a position at an epoch's end is the next one's start)."""
        ep, sie = self.epoch, self.step_in_epoch
        if sie >= spe:
            ep, sie = ep + 1, 0
        return {
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema is not None else None,
            "position": {"global_step": self.global_step, "epoch": ep, "step_in_epoch": sie,
                         "loss_sum": self.loss_sum, "loss_n": self.loss_n, "epoch_time": self.epoch_time},
            "metrics": self.rows, self.best_key: self.best, "wall_s": self.wall(),
            "spec": self.spec.to_dict(), "config": self.cfg.to_dict(), "config_history": self.history,
        }

    def save(self, path: Path, spe: int) -> None:
        """An atomic checkpoint (temp file + rename: a kill -9 leaves the previous one intact)."""
        ckpt.save(path, self.payload(spe))

    def restore(self, resume: str | Path | None, out_dir: Path, override: bool = False) -> None:
        """Nothing for a fresh run (``resume`` None, or ``"auto"`` without a checkpoint); else load
        the checkpoint: refuses changed settings unless ``override`` (then records them in the
        config history), loads every state and the RNGs."""
        src = ckpt.resolve_resume(str(resume) if resume is not None else None, out_dir)
        if src is None:
            return
        state = ckpt.load(src)
        changes = ckpt.check_compatible(state, self.spec.to_dict(), self.cfg.to_dict(), src, RESUME_NEUTRAL, override)
        self._load_states(state, src, changes)
        pos = state["position"]
        self.global_step, self.epoch, self.step_in_epoch = pos["global_step"], pos["epoch"], pos["step_in_epoch"]
        self.loss_sum, self.loss_n, self.epoch_time = pos["loss_sum"], pos["loss_n"], pos["epoch_time"]
        self.prior_wall = state.get("wall_s", 0.0)
        self.rows, self.history = list(state.get("metrics", [])), list(state.get("config_history", []))
        self.best, self.resumed_from = state.get(self.best_key), src
        ckpt.set_rng_state(state["rng"])
        if changes:
            self.history.append({"at_step": self.global_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                 "changed": {k: [a, b] for k, (a, b) in changes.items()}})

    def _load_states(self, state: dict[str, Any], src: Path, changes: dict) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if "precision" not in changes:
                self.scaler.load_state_dict(state["scaler"])
            if self.ema is not None:
                if state.get("ema") is not None:
                    self.ema.load_state_dict(state["ema"])
                elif changes:  # EMA switched on by the override: it starts from the loaded weights
                    self.ema = EMA(self.model, self.cfg.ema_decay)
                else:
                    raise SasaError(f"checkpoint {src} has no EMA weights but EMA is on")
            if changes:
                apply_new_settings(self.opt, self.sched, self.cfg, self.lr_lambda)
        except (RuntimeError, KeyError, ValueError) as e:
            raise SasaError(f"incompatible checkpoint {src}: {str(e).splitlines()[0][:200]}") from None
