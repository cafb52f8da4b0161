"""Detection training (Table 2): a RetinaNet preset on COCO-format data, evaluated with COCOeval.

The same run directory, checkpoints, resume rules, schedule, progress and torchrun support as
classification (:mod:`sasa_bench.train.loop`); the step is torchvision RetinaNet's loss (focal +
L1 box regression) on lists of images and targets, and the evaluation is pycocotools' COCOeval.
Writes ``config.yaml``, ``metrics.csv`` (mAP, AP50, AP75, APs/m/l per evaluation),
``checkpoint.pt`` and ``summary.json`` to the run directory; rank 0 only.

Recipes (``--task detection --recipe ...``). ``paper`` (Appendix A.3): batch 64, 150 epochs, LR
0 -> 0.12 linear over 1 epoch then cosine (0.12 scales linearly with the batch), multiscale
jitter + crop to 640 + flip 0.5. Not stated, our choice: SGD with momentum 0.9 (not Nesterov)
and weight decay 1e-4 on conv/linear weights (the TF RetinaNet's), no EMA, backbone BN trained
and synchronised across processes (``sync_bn``). ``short``: the generated COCO-format set of the
tests at 128 x 128, batch 4, 2 epochs. BN: with ``sync_bn`` off and a ``--backbone-checkpoint``,
the backbone's BN statistics stay frozen (torchvision's choice for a few images per process; the
affine still trains); from scratch they train.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sasa_bench.errors import SasaError
from sasa_bench.hardware import resolve_precision
from sasa_bench.models import build_model
from sasa_bench.models.detection import SasaRetinaNet, load_backbone
from sasa_bench.progress import TrainProgress
from sasa_bench.spec import DETECTION_DEFAULTS, ModelSpec
from sasa_bench.store import atomic_write_json
from sasa_bench.train import checkpoint as ckpt
from sasa_bench.train import distributed as D
from sasa_bench.train.coco import CocoData, coco_eval
from sasa_bench.train.data import eval_shard, steps_per_epoch, train_steps
from sasa_bench.train.loop import (
    _autocast,
    _set_determinism,
    _write_metrics,
    check_out_dir,
    checkpoint_payload,
    make_optimisation,
    optimizer_step,
    schedule_steps,
    start_or_resume,
    weights_digest,
    write_run_config,
)
from sasa_bench.train.recipes import TrainConfig

DETECTION_DATASETS = ("coco",)
MAP_KEYS = ("map", "map_50", "map_75", "map_s", "map_m", "map_l")
METRIC_COLUMNS = ["epoch", "step", "train_loss", *MAP_KEYS, "lr", "images_per_s", "epoch_time_s", "elapsed_s"]

_COMMON: dict[str, Any] = {
    "data": "coco", "nesterov": False, "momentum": 0.9, "weight_decay": 1e-4, "label_smoothing": 0.0,
    "ema_decay": 0.0, "bn_momentum": None, "schedule": "cosine",
}
DETECTION_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {**_COMMON, "epochs": 150, "batch_size": 64, "lr_base": 0.12, "lr_ref_batch": 64,
              "warmup_epochs": 1, "augment": True, "sync_bn": True, "workers": 8},
    "short": {**_COMMON, "epochs": 2, "batch_size": 4, "lr_base": 0.01, "lr_ref_batch": 4,
              "warmup_epochs": 0.25, "augment": False, "sync_bn": False, "workers": 0,
              "precision": "fp32", "eval_batch_size": 8, "model": {"image_size": 128}},
}


def load_detection_data(cfg: TrainConfig, spec: ModelSpec) -> tuple[CocoData, CocoData]:
    if cfg.data not in DETECTION_DATASETS:
        raise SasaError(f"unknown detection data {cfg.data!r} (choose from {', '.join(DETECTION_DATASETS)})")
    if not cfg.data_dir:
        raise SasaError("--data coco needs --data-dir ROOT (ROOT/train2017, ROOT/val2017, ROOT/annotations)")
    train = CocoData(Path(cfg.data_dir), "train", spec.image_size, spec.num_classes, cfg.augment, cfg.train_images)
    val = CocoData(Path(cfg.data_dir), "val", spec.image_size, spec.num_classes, False, cfg.eval_images)
    return train, val


def _batches(data: CocoData, index_batches: Iterator[tuple[int, torch.Tensor]], seed: int, epoch: int, workers: int):
    """(step, images, targets) per batch; ``workers`` > 0 decodes in DataLoader processes."""
    items = ((s, idx.tolist()) for s, idx in index_batches)

    def load(item: tuple[int, list[int]]) -> tuple[int, list, list]:
        s, idx = item
        got = [data.get(i, seed, epoch) for i in idx]
        return s, [g[0] for g in got], [g[1] for g in got]

    if workers <= 0:
        yield from (load(it) for it in items)
        return
    loader = torch.utils.data.DataLoader(list(items), batch_size=None, num_workers=workers, collate_fn=load)
    yield from loader


@torch.no_grad()
def evaluate_detection(model: nn.Module, data: CocoData, env: D.DistEnv, batch_size: int, precision: str) -> dict[str, Any]:
    """COCOeval of ``model`` on ``data`` (sharded over ranks; rank 0 evaluates, all get the result)."""
    was = model.training
    model.eval()
    results: list[dict[str, Any]] = []
    idx = eval_shard(len(data), env.rank, env.world).tolist()
    for lo in range(0, len(idx), batch_size):
        got = [data.get(i) for i in idx[lo : lo + batch_size]]
        with _autocast(env.device, precision):
            out = model([g[0].to(env.device) for g in got])
        for (_, _, image_id), det in zip(got, out, strict=True):
            for box, score, label in zip(det["boxes"].float().cpu().tolist(), det["scores"].float().cpu().tolist(),
                                         det["labels"].cpu().tolist(), strict=True):
                x1, y1, x2, y2 = box
                results.append({"image_id": image_id, "category_id": data.category_id(label),
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    model.train(was)
    gathered = D.all_gather_object(results, env)
    metrics = coco_eval(data.coco, [r for part in gathered for r in part], data.image_ids) if env.is_main else None
    metrics = D.broadcast_object(metrics, env)
    return {**metrics, "detections": sum(len(p) for p in gathered), "n": len(data)}


def check_backbone_checkpoint(path: Path, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """A classification checkpoint's weights for ``spec``'s backbone (one line if it is not one)."""
    state = ckpt.load(Path(path))
    saved = state.get("spec", {})
    ignore = {"name", "backend", "num_classes", "image_size", *DETECTION_DEFAULTS}
    now = {k: v for k, v in spec.to_dict().items() if k not in ignore}
    diff = sorted(k for k in now if k in saved and saved[k] != now[k])
    if saved.get("detector", "none") != "none" or diff:
        why = "a detector's" if saved.get("detector", "none") != "none" else f"differs in: {', '.join(diff)}"
        raise SasaError(f"--backbone-checkpoint {path} is not this backbone's classifier ({why})")
    return state["model"]


def run_detection_training(
    spec: ModelSpec,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool = True,
    resume: str | Path | None = None,
    backbone_checkpoint: Path | None = None,
    overwrite: bool = False,
    resume_override: bool = False,
    on_step: Any = None,
    on_log: Any = None,
) -> dict[str, Any]:
    """Train a ``retinanet_*`` spec with ``cfg`` (see :func:`sasa_bench.train.run_training` for
    the run-directory, resume and torchrun behaviour); return the summary dict."""
    if spec.detector == "none":
        raise SasaError(f"--task detection needs a detector (e.g. --model retinanet_resnet50), got {spec.name}")
    cfg.validate()
    env = D.setup()
    try:
        check_out_dir(Path(out_dir), resume, overwrite)
        return _run(spec, cfg, Path(out_dir), (progress and env.is_main, on_step, on_log), resume,
                    backbone_checkpoint, env, resume_override)
    finally:
        D.teardown(env)


def _run(spec: ModelSpec, cfg: TrainConfig, out_dir: Path, reporter: tuple, resume: Any, backbone_ckpt: Path | None,
         env: D.DistEnv, resume_override: bool) -> dict[str, Any]:
    progress, on_step, on_log = reporter
    t_start = time.perf_counter()
    cfg.precision = resolve_precision(cfg.precision, env.device, warn=env.is_main)
    _set_determinism(cfg)
    if cfg.batch_size % env.world:
        raise SasaError(f"batch size {cfg.batch_size} is not divisible by the {env.world} processes")
    train_data, eval_data = load_detection_data(cfg, spec)
    spe = steps_per_epoch(len(train_data), cfg.batch_size)
    if spe == 0:
        raise SasaError(f"the training set ({len(train_data)} images) is smaller than one batch of {cfg.batch_size}")
    warmup_steps, total_steps = schedule_steps(cfg, spe)
    n_epochs = math.ceil(total_steps / spe)
    stop_at = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps

    model: SasaRetinaNet = build_model(spec)
    # Frozen BN statistics only for a loaded backbone: from scratch they would freeze at the init's
    # (mean 0, var 1) and leave the ResNet unnormalised (NaN within a few dozen steps, measured).
    model.freeze_bn = backbone_ckpt is not None and not cfg.sync_bn
    if backbone_ckpt is not None:
        missing, _ = load_backbone(model, check_backbone_checkpoint(backbone_ckpt, spec))
        if missing:
            raise SasaError(f"--backbone-checkpoint {backbone_ckpt} lacks {len(missing)} backbone tensor(s) (e.g. {missing[0]})")
    if cfg.bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    model.to(env.device)
    n_params = sum(p.numel() for p in model.parameters())
    opt, sched, scaler, ema, lr_lambda = make_optimisation(model, cfg, env, warmup_steps, total_steps)

    ckpt_path = out_dir / ckpt.NAME
    cfg_dict = cfg.to_dict()
    at, ema = start_or_resume(resume, out_dir, spec, cfg, resume_override, (model, opt, sched, scaler, ema),
                              lr_lambda, "best_map")
    global_step, epoch, step_in_epoch, prior_wall = at.global_step, at.epoch, at.step_in_epoch, at.prior_wall
    loss_sum, loss_n, epoch_time = at.loss_sum, at.loss_n, at.epoch_time
    rows, history, best_map, src = at.rows, at.history, at.best, at.src

    train_model = D.wrap_model(model, env, cfg.sync_bn and env.enabled)
    write_run_config(out_dir, spec, cfg, history, env,
                     {"task": "detection", "backbone_checkpoint": str(backbone_ckpt) if backbone_ckpt else None})

    def save_checkpoint(ep: int, sie: int) -> None:
        if not env.is_main:
            return
        if sie >= spe:
            ep, sie = ep + 1, 0
        position = dict(global_step=global_step, epoch=ep, step_in_epoch=sie, loss_sum=loss_sum, loss_n=loss_n,
                        epoch_time=epoch_time)
        ckpt.save(ckpt_path, checkpoint_payload(
            (model, opt, sched, scaler, ema), position, metrics=rows, best_map=best_map,
            wall_s=prior_wall + time.perf_counter() - t_start, spec=spec.to_dict(), config=cfg_dict, config_history=history,
        ))

    eval_model = ema.module if ema is not None else model
    eval_bs = cfg.eval_batch_size or max(1, cfg.batch_size // env.world)

    def run_eval() -> dict[str, Any]:
        nonlocal best_map
        for m in (model, ema.module if ema is not None else None):  # BN statistics: per rank until here
            if m is not None:
                D.average_buffers(m, env)
        m = evaluate_detection(eval_model, eval_data, env, eval_bs, cfg.precision)
        best_map = max(best_map or 0.0, m["map"])
        return m

    last_eval: dict[str, Any] | None = None
    last_eval_step = -1
    final_loss = rows[-1]["train_loss"] if rows else None
    train_time, train_images = 0.0, 0
    bar = TrainProgress(progress, stop_at, spe, cfg.log_every, on_step, on_log)
    if progress:
        bar.log(f"{spec.name}: {n_params / 1e6:.2f} M params, coco {len(train_data)} train / {len(eval_data)} eval images"
                f" ({train_data.skipped_boxes + eval_data.skipped_boxes} degenerate boxes skipped), {stop_at} steps "
                f"({spe}/epoch, batch {cfg.batch_size} on {env.world} proc, {cfg.precision}) -> {out_dir}"
                + (f" (resumed at step {global_step})" if src is not None else ""))
    model.train()
    with bar:
        bar.start(global_step)
        while global_step < stop_at:
            steps_this_epoch = min(spe, total_steps - epoch * spe)
            bar.epoch(epoch, n_epochs, step_in_epoch, steps_this_epoch)
            index_batches = train_steps(len(train_data), cfg.seed, epoch, cfg.batch_size, env.rank, env.world, step_in_epoch)
            t_ep = time.perf_counter()
            workers = min(cfg.workers, os.cpu_count() or 1)
            for s, images, targets in _batches(train_data, index_batches, cfg.seed, epoch, workers):
                if s >= steps_this_epoch or global_step >= stop_at:
                    break
                images = [im.to(env.device) for im in images]
                targets = [{k: v.to(env.device) for k, v in t.items()} for t in targets]
                lr = opt.param_groups[0]["lr"]
                with _autocast(env.device, cfg.precision):
                    losses = train_model(images, targets)
                loss = sum(v.float() for v in losses.values())
                loss_v = optimizer_step(loss, (model, opt, sched, scaler, ema), cfg, env, ckpt_path,
                                        f"step {global_step + 1} (epoch {epoch + 1})")
                global_step, step_in_epoch = global_step + 1, s + 1
                loss_sum, loss_n = loss_sum + loss_v, loss_n + 1
                now = time.perf_counter()
                epoch_time, train_time, train_images, t_ep = epoch_time + now - t_ep, train_time + now - t_ep, train_images + cfg.batch_size, now
                bar.step(global_step, step_in_epoch, loss_v, lr, train_images / max(train_time, 1e-9))
                if (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0
                        and step_in_epoch < steps_this_epoch and global_step < stop_at):
                    save_checkpoint(epoch, step_in_epoch)
            final_loss = loss_sum / max(1, loss_n)
            if step_in_epoch < steps_this_epoch:  # stopped by max_steps mid-epoch
                break
            is_last = global_step >= stop_at
            row: dict[str, Any] = {
                "epoch": epoch + 1, "step": global_step, "train_loss": final_loss, "lr": opt.param_groups[0]["lr"],
                "images_per_s": loss_n * cfg.batch_size / max(epoch_time, 1e-9), "epoch_time_s": epoch_time,
                "elapsed_s": prior_wall + time.perf_counter() - t_start,
            }
            if (epoch + 1) % cfg.eval_every == 0 or is_last:
                last_eval, last_eval_step = run_eval(), global_step
                row.update({k: last_eval[k] for k in MAP_KEYS})
            rows.append(row)
            bar.log(f"epoch {epoch + 1}/{n_epochs}: train loss {final_loss:.4f}"
                    + (f", mAP {row['map']:.2f} AP50 {row['map_50']:.2f}" if "map" in row else "") + f", {epoch_time:.1f} s")
            epoch, step_in_epoch = epoch + 1, 0
            loss_sum, loss_n, epoch_time = 0.0, 0, 0.0
            save_checkpoint(epoch, 0)
            if env.is_main:
                _write_metrics(out_dir / "metrics.csv", rows, METRIC_COLUMNS)

    stopped_early = global_step < total_steps
    if last_eval_step != global_step:  # max_steps mid-run, or a resumed finished run
        last_eval = run_eval()
        if stopped_early:
            save_checkpoint(epoch, step_in_epoch)
    if env.is_main:
        _write_metrics(out_dir / "metrics.csv", rows, METRIC_COLUMNS)
    digests = D.all_gather_object(weights_digest(model), env)
    wall = prior_wall + time.perf_counter() - t_start
    summary = {
        "model": spec.name, "spec": spec.to_dict(), "task": "detection", "data": cfg.data, "recipe": cfg.recipe,
        **{k: last_eval[k] for k in MAP_KEYS}, "detections": last_eval["detections"], "eval_images": last_eval["n"],
        "best_map": best_map, "skipped_boxes": train_data.skipped_boxes + eval_data.skipped_boxes,
        "backbone_checkpoint": str(backbone_ckpt) if backbone_ckpt else None,
        "epochs": global_step / spe, "planned_epochs": cfg.epochs, "steps": global_step, "planned_steps": total_steps,
        "stopped_early": stopped_early, "wall_s": wall, "train_s": train_time,
        "train_images_per_s": train_images / train_time if train_time > 0 else None, "final_loss": final_loss,
        "params": n_params, "batch_size": cfg.batch_size, "world_size": env.world, "weights_sha256": digests[0],
        "ranks_in_sync": len(set(digests)) == 1, "device": str(env.device), "precision": cfg.precision,
        "threads": torch.get_num_threads(), "out_dir": str(out_dir), "checkpoint": str(ckpt_path),
        "resumed": src is not None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if env.is_main:
        atomic_write_json(out_dir / "summary.json", summary)
        bar.log(f"done: mAP {summary['map']:.2f} AP50 {summary['map_50']:.2f} AP75 {summary['map_75']:.2f}, "
                f"{global_step} steps in {wall:.1f} s -> {out_dir / 'summary.json'}")
    D.barrier(env)
    return summary
