"""Classification training: :func:`run_training` (one spec, one config, one run directory).

Per step: autocast forward (fp32 | bf16 | fp16 + GradScaler), label-smoothed cross-entropy,
SGD (Nesterov), per-iteration LR schedule (linear warm-up then cosine to 0 over the *planned*
length; ``max_steps`` only stops early), EMA update; ``grad_accum_steps`` micro-batches per step.
Per epoch (and every ``checkpoint_every`` steps): an atomic checkpoint. Every ``eval_every``
epochs and at the end: top-1/top-5 on the eval split (of the EMA weights when EMA is on).
Outputs in the run directory: ``config.yaml``, ``metrics.csv``, ``checkpoint.pt``,
``summary.json`` and (when on) ``tensorboard/``. Only rank 0 writes or prints.

The pieces: :func:`build` (data, model, optimisation, state), :func:`evaluate` (also what
``sasa-bench eval`` runs), :class:`ClassificationTask` (batches, loss, evaluation for the shared
:class:`~sasa_bench.train.engine.Trainer`), :class:`~sasa_bench.train.state.TrainState`
(saves/restores itself) and :mod:`sasa_bench.train.optim` (schedule, EMA, parameter groups).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sasa_bench.errors import SasaError
from sasa_bench.hardware import resolve_precision
from sasa_bench.models import build_model
from sasa_bench.models.resnet import zero_init_residual
from sasa_bench.progress import LogFn, ProgressFn, TrainProgress
from sasa_bench.spec import ModelSpec
from sasa_bench.train import distributed as D
from sasa_bench.train import tensorboard
from sasa_bench.train.data import DataConfig, TrainData, eval_shard, load_data, steps_per_epoch, train_steps
from sasa_bench.train.engine import (
    NonFiniteLoss,
    Plan,
    Task,
    Trainer,
    autocast,
    check_out_dir,
    micro_batch_size,
    set_determinism,
    write_run_config,
)
from sasa_bench.train.optim import make_optimisation, schedule_steps
from sasa_bench.train.recipes import TrainConfig
from sasa_bench.train.state import TrainState

METRIC_COLUMNS = [
    "epoch", "step", "train_loss", "eval_top1", "eval_top5", "lr", "images_per_s", "epoch_time_s", "elapsed_s",
]

__all__ = ["METRIC_COLUMNS", "NonFiniteLoss", "build", "build_network", "evaluate", "run_training"]


# --------------------------------------------------------------------------- evaluation


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool):
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=True)


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
        x, y = to_device(x, y, env.device, cfg.channels_last)
        with autocast(env.device, cfg.precision):
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


# --------------------------------------------------------------------------- build


def backend_name(spec: ModelSpec, device: torch.device) -> str:
    if not spec.uses_attention:
        return "none"
    if spec.backend != "auto":
        return spec.backend
    try:
        from sasa_bench.kernels import resolve_backend

        return f"auto->{resolve_backend('auto', device.type).name}"
    except Exception:  # pragma: no cover - informational only
        return "auto"


def data_config(cfg: TrainConfig, spec: ModelSpec) -> DataConfig:
    return DataConfig(
        cfg.data, cfg.data_dir, spec.image_size, spec.num_classes, cfg.holdout, cfg.workers,
        cfg.synthetic_train, cfg.synthetic_eval, cfg.augment, cfg.train_images, cfg.eval_images,
    )


def build_network(spec: ModelSpec, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The model as the recipe trains it (zero-init residuals, BN momentum, memory format)."""
    model = build_model(spec)
    if cfg.zero_init_residual:
        zero_init_residual(model)
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


@dataclass
class Built:
    """What :func:`build` makes: the data, the plan and a fresh state (not yet resumed)."""

    train_data: TrainData
    eval_data: TrainData
    plan: Plan
    state: TrainState
    n_params: int


def build(spec: ModelSpec, cfg: TrainConfig, env: D.DistEnv) -> Built:
    """Data, model, optimiser, schedule, scaler and EMA for ``cfg`` on this process (one
    SasaError line when the batch does not split or the data does not fit the model)."""
    micro = micro_batch_size(cfg, env.world)
    if micro < 2:
        raise SasaError(
            f"batch size {cfg.batch_size} over {env.world} process(es) and {cfg.grad_accum_steps or 1} accumulation "
            f"step(s) is {micro} image per forward pass; BatchNorm in training needs 2 or more"
        )
    train_data, eval_data = load_data(data_config(cfg, spec))
    if train_data.num_classes > spec.num_classes:
        raise SasaError(f"{cfg.data} has {train_data.num_classes} classes but the model has {spec.num_classes} outputs (set --num-classes)")
    spe = steps_per_epoch(len(train_data), cfg.batch_size)
    if spe == 0:
        raise SasaError(f"the training set ({len(train_data)} images) is smaller than one batch of {cfg.batch_size}")
    warmup_steps, total_steps = schedule_steps(cfg, spe)
    plan = Plan(spe, warmup_steps, total_steps, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps)
    model = build_network(spec, cfg, env.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt, sched, scaler, ema, lr_lambda = make_optimisation(model, cfg, env.device, warmup_steps, total_steps)
    state = TrainState(model, opt, sched, scaler, ema, lr_lambda, spec, cfg, best_key="best_top1")
    return Built(train_data, eval_data, plan, state, n_params)


class ClassificationTask(Task):
    columns = METRIC_COLUMNS
    headline = "top1"

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, tuple]]:
        cfg, env = self.cfg, self.env
        return self.train_data.batches(
            train_steps(len(self.train_data), cfg.seed, epoch, cfg.batch_size, env.rank, env.world, start_step),
            train=True, seed=cfg.seed, epoch=epoch, rank=env.rank,
        )

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        x, y = to_device(batch[0], batch[1], self.env.device, self.cfg.channels_last)
        with autocast(self.env.device, self.cfg.precision):
            logits = model(x)
        return F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return evaluate(model, self.eval_data, self.env, self.eval_bs, self.cfg)

    def eval_row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {"eval_top1": metrics.get("top1"), "eval_top5": metrics.get("top5")}

    def eval_words(self, metrics: dict[str, Any]) -> str:
        return f"eval top-1 {metrics['top1']:.2f}% top-5 {metrics['top5']:.2f}%"


# --------------------------------------------------------------------------- the run


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
        check_out_dir(Path(out_dir), resume, overwrite)
        return _run(spec, cfg, Path(out_dir), (progress and env.is_main, on_step, on_log), resume, env, resume_override)
    finally:
        D.teardown(env)


def _run(spec: ModelSpec, cfg: TrainConfig, out_dir: Path, reporter: tuple, resume: Any, env: D.DistEnv,
         resume_override: bool = False) -> dict[str, Any]:
    progress, on_step, on_log = reporter
    # "auto" becomes what runs here (bf16 only where native); the resolved value is what the
    # config, the summary and every result file record.
    cfg.precision = resolve_precision(cfg.precision, env.device, warn=env.is_main)
    set_determinism(cfg)
    tb_on = tensorboard.enabled(cfg.tensorboard)
    b = build(spec, cfg, env)
    st, plan = b.state, b.plan
    st.restore(resume, out_dir, resume_override)
    train_model: nn.Module = D.wrap_model(st.model, env, cfg.sync_bn)
    if cfg.compile:
        train_model = torch.compile(train_model)
    write_run_config(out_dir, spec, cfg, st.history, env)

    bar = TrainProgress(progress, plan.stop_at, plan.spe, cfg.log_every, on_step, on_log)
    tb = tensorboard.open_log(tb_on, out_dir, env.is_main,
                              st.global_step if st.resumed_from is not None else None)
    if progress:
        accum = f", {cfg.grad_accum_steps} accumulation steps" if (cfg.grad_accum_steps or 1) > 1 else ""
        bar.log(
            f"{spec.name}: {b.n_params / 1e6:.2f} M params, {cfg.data} {len(b.train_data)} train / {len(b.eval_data)} eval, "
            f"{plan.stop_at} steps ({plan.spe}/epoch, batch {cfg.batch_size} on {env.world} proc{accum}, {cfg.precision}, "
            f"backend {backend_name(spec, env.device)}) -> {out_dir}"
            + (f" (resumed at step {st.global_step})" if st.resumed_from is not None else "")
        )
    trainer = Trainer(st, ClassificationTask(b.train_data, b.eval_data, cfg, env), plan, env, out_dir, train_model, bar, tb)
    try:
        last = trainer.fit()
    finally:
        tb.close()
    summary = {
        "model": spec.name,
        "spec": spec.to_dict(),
        "data": cfg.data,
        "recipe": cfg.recipe,
        "top1": last["top1"],
        "top5": last["top5"],
        "eval_loss": last["loss"],
        "eval_images": last["n"],
        "best_top1": st.best,
        "eval_weights": "ema" if st.ema is not None else "model",
        **trainer.summary(b.n_params),
        "backend": backend_name(spec, env.device),
        "threads": torch.get_num_threads(),
        "tensorboard": str(out_dir / tensorboard.SUBDIR) if tb_on else None,
        "out_dir": str(out_dir),
        "checkpoint": str(trainer.ckpt_path),
        "resumed": st.resumed_from is not None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    trainer.write_summary(summary, f"top-1 {summary['top1']:.2f}% top-5 {summary['top5']:.2f}% ({summary['eval_weights']} weights)")
    return summary
