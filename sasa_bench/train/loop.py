"""The training loop: :func:`run_training` (one spec, one config, one run directory).

Per step: autocast forward (fp32 | bf16 | fp16 + GradScaler), label-smoothed cross-entropy,
SGD (Nesterov), per-iteration LR schedule (linear warm-up then cosine to 0 over the *planned*
length; ``max_steps`` only stops early), EMA update. Per epoch (and every ``checkpoint_every``
steps): an atomic checkpoint. Every ``eval_every`` epochs and at the end: top-1/top-5 on the eval
split (of the EMA weights when EMA is on). Outputs in the run directory: ``config.yaml``,
``metrics.csv``, ``checkpoint.pt``, ``summary.json``. Only rank 0 writes or prints.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from sasa_bench.errors import SasaError
from sasa_bench.hardware import resolve_precision
from sasa_bench.models import build_model
from sasa_bench.models.resnet import zero_init_residual
from sasa_bench.progress import LogFn, ProgressFn, TrainProgress
from sasa_bench.spec import ModelSpec
from sasa_bench.store import atomic_write_json, atomic_write_text, check_folder, clean_stale_temps
from sasa_bench.train import checkpoint as ckpt
from sasa_bench.train import distributed as D
from sasa_bench.train.data import DataConfig, TrainData, eval_shard, load_data, steps_per_epoch, train_steps
from sasa_bench.train.recipes import NEUTRAL_FIELDS, TrainConfig

METRIC_COLUMNS = [
    "epoch", "step", "train_loss", "eval_top1", "eval_top5", "lr", "images_per_s", "epoch_time_s", "elapsed_s",
]


class NonFiniteLoss(SasaError):
    """The loss became NaN/inf: the run stops, the last good checkpoint stays."""


# A resumed run may also change where it stops (--max-steps), besides the neutral settings.
RESUME_NEUTRAL = NEUTRAL_FIELDS | {"max_steps"}


# --------------------------------------------------------------------------- schedule, EMA


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


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch_: int) -> float:
    """The LR the recipe prescribes for the update at global ``step`` (for tests and docs)."""
    warm, total = schedule_steps(cfg, steps_per_epoch_)
    return cfg.peak_lr() * WarmupCosine(warm, total, cfg.schedule)(step)


def schedule_steps(cfg: TrainConfig, spe: int) -> tuple[int, int]:
    total = max(1, round(cfg.epochs * spe))
    return min(round(cfg.warmup_epochs * spe), total), total


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
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if decay_norm_and_bias or p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: nn.Module, data: TrainData, env: D.DistEnv, batch_size: int, cfg: TrainConfig) -> dict[str, float]:
    """top-1/top-5 (%) and mean loss over the whole eval set, counts summed over the ranks."""
    was_training = model.training
    model.eval()
    idx = eval_shard(len(data), env.rank, env.world)
    chunks = [(i, idx[s : s + batch_size]) for i, s in enumerate(range(0, len(idx), batch_size))]
    k5 = min(5, data.num_classes)
    counts = torch.zeros(4, dtype=torch.float64)  # top1, top5, loss sum, n
    for _, (x, y) in data.batches(iter(chunks), train=False, seed=cfg.seed, epoch=0, rank=env.rank):
        x, y = _to_device(x, y, env.device, cfg.channels_last)
        with _autocast(env.device, cfg.precision):
            logits = model(x)
        logits = logits.float()
        hit = logits.topk(k5, dim=1).indices == y[:, None]
        counts += torch.tensor([
            hit[:, 0].sum().item(), hit.any(1).sum().item(),
            F.cross_entropy(logits, y, reduction="sum").item(), len(y),
        ], dtype=torch.float64)
    counts = D.all_reduce_sum(counts, env)
    model.train(was_training)
    n = max(1.0, counts[3].item())
    if not math.isfinite(counts[2].item()):
        raise NonFiniteLoss(f"eval loss became {counts[2].item() / n} (the weights diverged); stopping (try a lower --lr or --precision fp32)")
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n,
            "loss": counts[2].item() / n, "n": int(counts[3].item())}


# --------------------------------------------------------------------------- helpers


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


def _set_determinism(cfg: TrainConfig) -> None:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    import random

    import numpy as np

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    elif torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True


def _write_metrics(path: Path, rows: list[dict[str, Any]], columns: list[str] = METRIC_COLUMNS) -> None:
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


def weights_digest(model: nn.Module) -> str:
    """SHA-256 of the state dict (parameters and buffers): equal digests = bit-identical weights."""
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _backend_name(spec: ModelSpec, device: torch.device) -> str:
    if not spec.uses_attention:
        return "none"
    if spec.backend != "auto":
        return spec.backend
    try:
        from sasa_bench.kernels import resolve_backend

        return f"auto->{resolve_backend('auto', device.type).name}"
    except Exception:  # pragma: no cover - informational only
        return "auto"


# --------------------------------------------------------------------------- the loop


def run_training(
    spec: ModelSpec,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    resume: str | Path | None = None,
    on_step: ProgressFn | None = None,
    on_log: LogFn | None = None,
    overwrite: bool = False,
    resume_override: bool = False,
) -> dict[str, Any]:
    """Train ``spec`` with ``cfg``; write the run directory; return the summary dict.

    ``resume``: None (fresh: refused when ``out_dir`` already holds a run, unless ``overwrite``),
    ``"auto"`` (continue from ``out_dir/checkpoint.pt`` if present) or a checkpoint path. A resumed
    run refuses changed training settings unless ``resume_override`` (then recorded in
    ``config.yaml``'s ``config_history``). Works as is under
    torchrun (DDP; rank 0 writes). Raises SasaError (incl. :class:`NonFiniteLoss`) on bad input.
    Progress: with ``progress`` its own bars (terminal) or plain lines (stderr); ``on_step(message,
    step, total)`` / ``on_log(message)`` send it to the caller instead (a study's one display).
    """
    cfg.validate()
    env = D.setup()
    try:
        reporter = (progress and env.is_main, on_step, on_log)
        check_out_dir(Path(out_dir), resume, overwrite)
        return _run(spec, cfg, Path(out_dir), reporter, resume, env, resume_override)
    finally:
        D.teardown(env)


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


def _apply_new_settings(opt: torch.optim.Optimizer, sched: Any, cfg: TrainConfig, lr_lambda: WarmupCosine) -> None:
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


# (model, optimizer, scheduler, grad scaler, EMA or None): what a checkpoint saves besides the position.
Trainables = tuple[nn.Module, torch.optim.Optimizer, Any, Any, "EMA | None"]


def restore_states(state: dict[str, Any], src: Path, changes: dict, cfg: TrainConfig, objs: Trainables,
                   lr_lambda: WarmupCosine) -> EMA | None:
    """Load a checkpoint into the run's objects (one SasaError line if it does not fit); returns
    the EMA (new when the override switched EMA on). Shared by the classification and detection loops."""
    model, opt, sched, scaler, ema = objs
    try:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "precision" not in changes:
            scaler.load_state_dict(state["scaler"])
        if ema is not None:
            if state.get("ema") is not None:
                ema.load_state_dict(state["ema"])
            elif changes:  # EMA switched on by the override: it starts from the loaded weights
                ema = EMA(model, cfg.ema_decay)
            else:
                raise SasaError(f"checkpoint {src} has no EMA weights but EMA is on")
        if changes:
            _apply_new_settings(opt, sched, cfg, lr_lambda)
    except (RuntimeError, KeyError, ValueError) as e:
        raise SasaError(f"incompatible checkpoint {src}: {str(e).splitlines()[0][:200]}") from None
    return ema


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


def make_optimisation(model: nn.Module, cfg: TrainConfig, env: D.DistEnv, warmup_steps: int, total_steps: int):
    """SGD over the parameter groups, the warm-up + cosine schedule, the grad scaler and the EMA:
    built once here for every training loop. Returns (opt, sched, scaler, ema, lr_lambda)."""
    opt = torch.optim.SGD(
        param_groups(model, cfg.weight_decay, cfg.decay_norm_and_bias),
        lr=cfg.peak_lr(), momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0,
    )
    lr_lambda = WarmupCosine(warmup_steps, total_steps, cfg.schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.precision == "fp16")
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    return opt, sched, scaler, ema, lr_lambda


@dataclass
class RunPosition:
    """Where a run stands: zero for a fresh one, else what its checkpoint recorded."""

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    prior_wall: float = 0.0
    loss_sum: float = 0.0
    loss_n: int = 0
    epoch_time: float = 0.0
    rows: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    best: float | None = None
    src: Path | None = None


def start_or_resume(
    resume: str | Path | None, out_dir: Path, spec: ModelSpec, cfg: TrainConfig, resume_override: bool,
    objs: Trainables, lr_lambda: WarmupCosine, best_key: str,
) -> tuple[RunPosition, EMA | None]:
    """A fresh position, or the checkpoint's (``resume``): refuses changed settings unless
    ``resume_override`` (then records them in the config history), loads every state and the
    RNGs. Returns the position and the EMA (new when an override switched EMA on)."""
    ema = objs[4]
    src = ckpt.resolve_resume(str(resume) if resume is not None else None, out_dir)
    if src is None:
        return RunPosition(), ema
    state = ckpt.load(src)
    changes = ckpt.check_compatible(state, spec.to_dict(), cfg.to_dict(), src, RESUME_NEUTRAL, resume_override)
    ema = restore_states(state, src, changes, cfg, objs, lr_lambda)
    pos = state["position"]
    at = RunPosition(
        pos["global_step"], pos["epoch"], pos["step_in_epoch"], state.get("wall_s", 0.0),
        pos["loss_sum"], pos["loss_n"], pos["epoch_time"], list(state.get("metrics", [])),
        list(state.get("config_history", [])), state.get(best_key), src,
    )
    ckpt.set_rng_state(state["rng"])
    if changes:
        at.history.append({"at_step": at.global_step, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                           "changed": {k: [a, b] for k, (a, b) in changes.items()}})
    return at, ema


def optimizer_step(loss: torch.Tensor, objs: Trainables, cfg: TrainConfig, env: D.DistEnv, ckpt_path: Path, where: str) -> float:
    """Backward (scaled), optional clipping, the step, the schedule and the EMA; returns the loss
    averaged over ranks, after refusing a non-finite one (the last good checkpoint stays)."""
    model, opt, sched, scaler, ema = objs
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if cfg.grad_clip:
        scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    loss_v = (D.all_reduce_sum(loss.detach().float().reshape(1).cpu().double(), env) / env.world).item()
    if not math.isfinite(loss_v):
        last = f"; the last good checkpoint is {ckpt_path}" if ckpt_path.is_file() else ""
        raise NonFiniteLoss(f"loss became {loss_v} at {where}; stopping (try a lower --lr or --precision fp32){last}")
    scaler.step(opt)
    scaler.update()
    sched.step()
    if ema is not None:
        ema.update(model)
    return loss_v


def checkpoint_payload(objs: Trainables, position: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """What :func:`ckpt.save` writes: every state of ``objs``, the loop position, and ``extra``."""
    model, opt, sched, scaler, ema = objs
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(), "ema": ema.state_dict() if ema is not None else None,
        "position": position, **extra,
    }


def _run(
    spec: ModelSpec, cfg: TrainConfig, out_dir: Path, reporter: tuple, resume, env: D.DistEnv, resume_override: bool = False,
) -> dict[str, Any]:
    progress, on_step, on_log = reporter
    t_start = time.perf_counter()
    # "auto" becomes what runs here (bf16 only where native); the resolved value is what the
    # config, the summary and every result file record.
    cfg.precision = resolve_precision(cfg.precision, env.device, warn=env.is_main)
    _set_determinism(cfg)
    if cfg.batch_size % env.world:
        raise SasaError(f"batch size {cfg.batch_size} is not divisible by the {env.world} processes")
    local_bs = cfg.batch_size // env.world
    if local_bs < 2:
        raise SasaError(
            f"batch size {cfg.batch_size} over {env.world} processes is {local_bs} image per process; "
            "BatchNorm in training needs 2 or more"
        )

    train_data, eval_data = load_data(DataConfig(
        cfg.data, cfg.data_dir, spec.image_size, spec.num_classes, cfg.holdout, cfg.workers,
        cfg.synthetic_train, cfg.synthetic_eval, cfg.augment, cfg.train_images, cfg.eval_images,
    ))
    if train_data.num_classes > spec.num_classes:
        raise SasaError(f"{cfg.data} has {train_data.num_classes} classes but the model has {spec.num_classes} outputs (set --num-classes)")
    spe = steps_per_epoch(len(train_data), cfg.batch_size)
    if spe == 0:
        raise SasaError(f"the training set ({len(train_data)} images) is smaller than one batch of {cfg.batch_size}")
    warmup_steps, total_steps = schedule_steps(cfg, spe)
    n_epochs = math.ceil(total_steps / spe)
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    # model, optimiser, schedule, scaler, EMA
    model = build_model(spec)
    if cfg.zero_init_residual:
        zero_init_residual(model)
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    model.to(env.device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    n_params = sum(p.numel() for p in model.parameters())
    opt, sched, scaler, ema, lr_lambda = make_optimisation(model, cfg, env, warmup_steps, total_steps)

    # resume
    out_dir = Path(out_dir)
    ckpt_path = out_dir / ckpt.NAME
    cfg_dict = cfg.to_dict()
    at, ema = start_or_resume(resume, out_dir, spec, cfg, resume_override, (model, opt, sched, scaler, ema),
                              lr_lambda, "best_top1")
    global_step, epoch, step_in_epoch, prior_wall = at.global_step, at.epoch, at.step_in_epoch, at.prior_wall
    loss_sum, loss_n, epoch_time = at.loss_sum, at.loss_n, at.epoch_time
    rows, history, best_top1, src = at.rows, at.history, at.best, at.src

    train_model: nn.Module = D.wrap_model(model, env, cfg.sync_bn)
    if cfg.compile:
        train_model = torch.compile(train_model)

    write_run_config(out_dir, spec, cfg, history, env)

    def save_checkpoint(ep: int, sie: int) -> None:
        if not env.is_main:
            return
        if sie >= spe:
            ep, sie = ep + 1, 0
        ckpt.save(ckpt_path, checkpoint_payload(
            (model, opt, sched, scaler, ema),
            {"global_step": global_step, "epoch": ep, "step_in_epoch": sie,
             "loss_sum": loss_sum, "loss_n": loss_n, "epoch_time": epoch_time},
            metrics=rows, best_top1=best_top1, wall_s=prior_wall + time.perf_counter() - t_start,
            spec=spec.to_dict(), config=cfg_dict, config_history=history,
        ))

    eval_model = ema.module if ema is not None else model
    eval_bs = cfg.eval_batch_size or max(1, local_bs)
    last_eval: dict[str, float] | None = None
    last_eval_step = -1
    final_loss = rows[-1]["train_loss"] if rows else None
    train_time, train_images = 0.0, 0
    bar = TrainProgress(progress, stop_at, spe, cfg.log_every, on_step, on_log)
    if progress:
        bar.log(
            f"{spec.name}: {n_params / 1e6:.2f} M params, {cfg.data} {len(train_data)} train / {len(eval_data)} eval, "
            f"{stop_at} steps ({spe}/epoch, batch {cfg.batch_size} on {env.world} proc, {cfg.precision}, "
            f"backend {_backend_name(spec, env.device)}) -> {out_dir}"
            + (f" (resumed at step {global_step})" if src is not None else "")
        )
    model.train()
    with bar:
        bar.start(global_step)
        while global_step < stop_at:
            steps_this_epoch = min(spe, total_steps - epoch * spe)
            bar.epoch(epoch, n_epochs, step_in_epoch, steps_this_epoch)
            batches = train_data.batches(
                train_steps(len(train_data), cfg.seed, epoch, cfg.batch_size, env.rank, env.world, step_in_epoch),
                train=True, seed=cfg.seed, epoch=epoch, rank=env.rank,
            )
            t_ep = time.perf_counter()
            for s, (x, y) in batches:
                if s >= steps_this_epoch or global_step >= stop_at:
                    break
                x, y = _to_device(x, y, env.device, cfg.channels_last)
                lr = opt.param_groups[0]["lr"]
                with _autocast(env.device, cfg.precision):
                    logits = train_model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                loss_v = optimizer_step(loss, (model, opt, sched, scaler, ema), cfg, env, ckpt_path,
                                        f"step {global_step + 1} (epoch {epoch + 1})")
                global_step += 1
                step_in_epoch = s + 1
                loss_sum += loss_v
                loss_n += 1
                now = time.perf_counter()
                epoch_time += now - t_ep
                train_time += now - t_ep
                train_images += cfg.batch_size
                t_ep = now
                bar.step(global_step, step_in_epoch, loss_v, lr, train_images / max(train_time, 1e-9))
                if (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0
                        and step_in_epoch < steps_this_epoch and global_step < stop_at):
                    save_checkpoint(epoch, step_in_epoch)
            epoch_done = step_in_epoch >= steps_this_epoch
            final_loss = loss_sum / max(1, loss_n)
            if not epoch_done:  # stopped by max_steps mid-epoch
                break
            is_last = global_step >= stop_at
            for m in (model, ema.module if ema is not None else None):
                if m is not None:
                    D.average_buffers(m, env)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": global_step, "train_loss": final_loss,
                "lr": opt.param_groups[0]["lr"], "images_per_s": loss_n * cfg.batch_size / max(epoch_time, 1e-9),
                "epoch_time_s": epoch_time, "elapsed_s": prior_wall + time.perf_counter() - t_start,
                "eval_top1": None, "eval_top5": None,
            }
            if (epoch + 1) % cfg.eval_every == 0 or is_last:
                last_eval, last_eval_step = evaluate(eval_model, eval_data, env, eval_bs, cfg), global_step
                row["eval_top1"], row["eval_top5"] = last_eval["top1"], last_eval["top5"]
                best_top1 = max(best_top1 or 0.0, last_eval["top1"])
            rows.append(row)
            bar.log(
                f"epoch {epoch + 1}/{n_epochs}: train loss {final_loss:.4f}"
                + (f", eval top-1 {row['eval_top1']:.2f}% top-5 {row['eval_top5']:.2f}%" if row["eval_top1"] is not None else "")
                + f", {row['images_per_s']:.0f} img/s, {epoch_time:.1f} s"
            )
            epoch, step_in_epoch = epoch + 1, 0
            loss_sum, loss_n, epoch_time = 0.0, 0, 0.0
            save_checkpoint(epoch, 0)
            if env.is_main:
                _write_metrics(out_dir / "metrics.csv", rows)

    stopped_early = global_step < total_steps
    if last_eval_step != global_step:
        for m in (model, ema.module if ema is not None else None):
            if m is not None:
                D.average_buffers(m, env)
    if stopped_early and last_eval_step != global_step:
        # max_steps: evaluate where we stopped, keep a checkpoint to continue from
        last_eval = evaluate(eval_model, eval_data, env, eval_bs, cfg)
        best_top1 = max(best_top1 or 0.0, last_eval["top1"])
        save_checkpoint(epoch, step_in_epoch)
    elif last_eval is None:  # resumed a finished run
        last_eval = evaluate(eval_model, eval_data, env, eval_bs, cfg)
        best_top1 = max(best_top1 or 0.0, last_eval["top1"])
    if env.is_main:
        _write_metrics(out_dir / "metrics.csv", rows)

    digests = D.all_gather_object(weights_digest(model), env)
    wall = prior_wall + time.perf_counter() - t_start
    summary = {
        "model": spec.name,
        "spec": spec.to_dict(),
        "data": cfg.data,
        "recipe": cfg.recipe,
        "top1": last_eval["top1"],
        "top5": last_eval["top5"],
        "eval_loss": last_eval["loss"],
        "eval_images": last_eval["n"],
        "best_top1": best_top1,
        "eval_weights": "ema" if ema is not None else "model",
        "epochs": global_step / spe,
        "planned_epochs": cfg.epochs,
        "steps": global_step,
        "planned_steps": total_steps,
        "stopped_early": stopped_early,
        "wall_s": wall,
        "train_s": train_time,
        "train_images_per_s": train_images / train_time if train_time > 0 else None,
        "final_loss": final_loss,
        "params": n_params,
        "batch_size": cfg.batch_size,
        "world_size": env.world,
        "weights_sha256": digests[0],
        "ranks_in_sync": len(set(digests)) == 1,
        "device": str(env.device),
        "precision": cfg.precision,
        "backend": _backend_name(spec, env.device),
        "threads": torch.get_num_threads(),
        "out_dir": str(out_dir),
        "checkpoint": str(ckpt_path),
        "resumed": src is not None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if env.is_main:
        atomic_write_json(out_dir / "summary.json", summary)
        bar.log(
            f"done: top-1 {summary['top1']:.2f}% top-5 {summary['top5']:.2f}% ({summary['eval_weights']} weights), "
            f"{global_step} steps in {wall:.1f} s -> {out_dir / 'summary.json'}"
        )
    D.barrier(env)
    return summary
