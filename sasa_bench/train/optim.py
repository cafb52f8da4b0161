"""The optimisation pieces every training loop shares: the LR schedule, the EMA of the weights,
the parameter groups (no weight decay on norms and biases) and the SGD/schedule/scaler/EMA build.

Classification (:mod:`sasa_bench.train.loop`) and detection (:mod:`sasa_bench.train.detection`)
build them here, once, so a recipe means the same thing in both.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import nn

from sasa_bench.train.recipes import TrainConfig


class WarmupCosine:
    """LR multiplier at step s: (s+1)/W during W warm-up steps, then cosine from 1 to 0 at T."""

    def __init__(self, warmup_steps: int, total_steps: int, schedule: str = "cosine") -> None:
        self.warmup_steps, self.total_steps, self.schedule = warmup_steps, total_steps, schedule

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * t))


def schedule_steps(cfg: TrainConfig, spe: int) -> tuple[int, int]:
    """(warm-up steps, total steps) of ``cfg`` at ``spe`` optimiser steps per epoch."""
    total = max(1, round(cfg.epochs * spe))
    return min(round(cfg.warmup_epochs * spe), total), total


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch_: int) -> float:
    """The LR the recipe prescribes for the update at global ``step`` (for tests and docs)."""
    warm, total = schedule_steps(cfg, steps_per_epoch_)
    return cfg.peak_lr() * WarmupCosine(warm, total, cfg.schedule)(step)


class EMA:
    """Exponential moving average of the weights and BN buffers, TF-style warm-up of the decay."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.updates = decay, 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1 - d)
            else:
                v.copy_(src[k])

    def state_dict(self) -> dict[str, Any]:
        return {"module": self.module.state_dict(), "updates": self.updates, "decay": self.decay}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = state["updates"]


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict[str, Any]]:
    """Weight decay on conv/linear weights only (1-D parameters: norms and biases go without),
    unless ``decay_norm_and_bias``."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_norm_and_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def make_optimisation(model: nn.Module, cfg: TrainConfig, device: torch.device, warmup_steps: int, total_steps: int):
    """SGD over the parameter groups, the warm-up + cosine schedule, the grad scaler and the EMA:
    built once here for every training loop. Returns (opt, sched, scaler, ema, lr_lambda)."""
    opt = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias),
        lr=cfg.peak_lr(), momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    lr_lambda = WarmupCosine(warmup_steps, total_steps, cfg.schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return opt, sched, scaler, ema, lr_lambda


def apply_new_settings(opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, lr_lambda: WarmupCosine) -> None:
    """--resume-override: the loaded optimiser/scheduler states carry the old LR, momentum, weight
    decay and schedule; put the new ones in, at the current step."""
    sched.lr_lambdas = [lr_lambda] * len(opt.param_groups)
    sched.base_lrs = [cfg.peak_lr()] * len(opt.param_groups)
    for i, g in enumerate(opt.param_groups):
        g["initial_lr"] = cfg.peak_lr()
        g["lr"] = cfg.peak_lr() * lr_lambda(sched.last_epoch)
        g["momentum"], g["nesterov"] = cfg.momentum, cfg.nesterov and cfg.momentum > 0
        if i == 0:
            g["weight_decay"] = cfg.weight_decay
