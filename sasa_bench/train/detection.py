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
from sasa_bench.train import checkpoint as ckpt
from sasa_bench.train import distributed as D
from sasa_bench.train import tensorboard
from sasa_bench.train.coco import CocoData, coco_eval
from sasa_bench.train.data import eval_shard, steps_per_epoch, train_steps
from sasa_bench.train.engine import (
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
        with autocast(env.device, precision):
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


class DetectionTask(Task):
    columns = METRIC_COLUMNS
    headline = "map"

    def batches(self, epoch: int, start_step: int) -> Iterator[tuple[int, tuple]]:
        cfg, env = self.cfg, self.env
        index_batches = train_steps(len(self.train_data), cfg.seed, epoch, cfg.batch_size, env.rank, env.world, start_step)
        workers = min(cfg.workers, os.cpu_count() or 1)
        for s, images, targets in _batches(self.train_data, index_batches, cfg.seed, epoch, workers):
            yield s, (images, targets)

    def loss(self, model: nn.Module, batch: tuple) -> torch.Tensor:
        device = self.env.device
        images = [im.to(device) for im in batch[0]]
        targets = [{k: v.to(device) for k, v in t.items()} for t in batch[1]]
        with autocast(device, self.cfg.precision):
            losses = model(images, targets)
        return sum(v.float() for v in losses.values())

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        return evaluate_detection(model, self.eval_data, self.env, self.eval_bs, self.cfg.precision)

    def eval_row(self, metrics: dict[str, Any]) -> dict[str, Any]:
        return {k: metrics.get(k) for k in MAP_KEYS}

    def eval_words(self, metrics: dict[str, Any]) -> str:
        return f"mAP {metrics['map']:.2f} AP50 {metrics['map_50']:.2f}"


def _run(spec: ModelSpec, cfg: TrainConfig, out_dir: Path, reporter: tuple, resume: Any, backbone_ckpt: Path | None,
         env: D.DistEnv, resume_override: bool) -> dict[str, Any]:
    progress, on_step, on_log = reporter
    cfg.precision = resolve_precision(cfg.precision, env.device, warn=env.is_main)
    set_determinism(cfg)
    micro_batch_size(cfg, env.world)  # one line if the batch does not split
    tb_on = tensorboard.enabled(cfg.tensorboard)
    train_data, eval_data = load_detection_data(cfg, spec)
    spe = steps_per_epoch(len(train_data), cfg.batch_size)
    if spe == 0:
        raise SasaError(f"the training set ({len(train_data)} images) is smaller than one batch of {cfg.batch_size}")
    warmup_steps, total_steps = schedule_steps(cfg, spe)
    plan = Plan(spe, warmup_steps, total_steps, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps)

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
    opt, sched, scaler, ema, lr_lambda = make_optimisation(model, cfg, env.device, warmup_steps, total_steps)
    st = TrainState(model, opt, sched, scaler, ema, lr_lambda, spec, cfg, best_key="best_map")
    st.restore(resume, out_dir, resume_override)

    train_model = D.wrap_model(model, env, cfg.sync_bn and env.enabled)
    write_run_config(out_dir, spec, cfg, st.history, env,
                     {"task": "detection", "backbone_checkpoint": str(backbone_ckpt) if backbone_ckpt else None})
    bar = TrainProgress(progress, plan.stop_at, spe, cfg.log_every, on_step, on_log)
    tb = tensorboard.open_log(tb_on, out_dir, env.is_main,
                              st.global_step if st.resumed_from is not None else None)
    if progress:
        bar.log(f"{spec.name}: {n_params / 1e6:.2f} M params, coco {len(train_data)} train / {len(eval_data)} eval images"
                f" ({train_data.skipped_boxes + eval_data.skipped_boxes} degenerate boxes skipped), {plan.stop_at} steps "
                f"({spe}/epoch, batch {cfg.batch_size} on {env.world} proc, {cfg.precision}) -> {out_dir}"
                + (f" (resumed at step {st.global_step})" if st.resumed_from is not None else ""))
    trainer = Trainer(st, DetectionTask(train_data, eval_data, cfg, env), plan, env, out_dir, train_model, bar, tb)
    try:
        last = trainer.fit()
    finally:
        tb.close()
    summary = {
        "model": spec.name, "spec": spec.to_dict(), "task": "detection", "data": cfg.data, "recipe": cfg.recipe,
        **{k: last[k] for k in MAP_KEYS}, "detections": last["detections"], "eval_images": last["n"],
        "best_map": st.best, "skipped_boxes": train_data.skipped_boxes + eval_data.skipped_boxes,
        "backbone_checkpoint": str(backbone_ckpt) if backbone_ckpt else None,
        **trainer.summary(n_params),
        "threads": torch.get_num_threads(), "tensorboard": str(out_dir / tensorboard.SUBDIR) if tb_on else None,
        "out_dir": str(out_dir), "checkpoint": str(trainer.ckpt_path),
        "resumed": st.resumed_from is not None, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    trainer.write_summary(summary, f"mAP {summary['map']:.2f} AP50 {summary['map_50']:.2f} AP75 {summary['map_75']:.2f}")
    return summary
