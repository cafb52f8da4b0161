"""Evaluate a training run's checkpoint (``sasa-bench eval``, timm's validate.py for our runs).

The model is rebuilt from the checkpoint's saved spec (no model flags needed), its weights are
the EMA's when the run kept an EMA (``use_ema=False``: the raw weights), and it is evaluated on
the run's own eval split by default — the same data settings (dataset, held-out split, fixed
eval subset), eval batch size and resolved precision as the run's last evaluation, so the top-1
equals the run's final ``top1``. Any of them can be changed (another dataset, the whole split).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from sasa_bench.errors import SasaError
from sasa_bench.hardware import resolve_precision
from sasa_bench.spec import make_spec
from sasa_bench.train import checkpoint as ckpt
from sasa_bench.train import distributed as D
from sasa_bench.train.data import load_eval_data
from sasa_bench.train.engine import set_determinism
from sasa_bench.train.loop import build_network, data_config, evaluate
from sasa_bench.train.recipes import FIELDS, TrainConfig

KEEP = object()  # "as the run had it"


def split_name(data: str, holdout: bool) -> str:
    return {"imagenet": "holdout" if holdout else "val", "fashion-mnist": "test"}.get(data, "eval")


def evaluate_checkpoint(
    path: Path,
    data: str | None = None,
    data_dir: str | None = None,
    holdout: bool | None = None,
    eval_images: Any = KEEP,
    use_ema: bool = True,
    batch_size: int | None = None,
    precision: str | None = None,
    workers: int | None = None,
    backend: str | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """One row: the checkpoint's model on an eval split (top-1/top-5 in %, mean loss, images,
    params, image size, which weights). ``eval_images``: KEEP = the run's subset when the data
    is the run's own (else the whole split), None = the whole split, N = a fixed subset of N."""
    path = Path(path)
    if path.is_dir():
        path = path / ckpt.NAME
    state = ckpt.load(path)
    saved_spec, saved_cfg = state.get("spec"), state.get("config")
    if not isinstance(saved_spec, dict) or not isinstance(saved_cfg, dict):
        raise SasaError(f"{path} has no saved model spec and config (not a training run's checkpoint)")
    if saved_spec.get("detector", "none") != "none":
        raise SasaError(f"{path} is a detector's checkpoint; eval takes a classification run's (detection runs "
                        "report COCO mAP in their summary.json)")
    overrides: dict[str, Any] = {"backend": backend} if backend else {}
    spec = make_spec(None, **{**saved_spec, **overrides})
    cfg = TrainConfig(**{k: v for k, v in saved_cfg.items() if k in FIELDS})
    own_data = data is None or data == cfg.data
    cfg.data = data or cfg.data
    cfg.data_dir = data_dir if data_dir is not None else cfg.data_dir
    cfg.holdout = holdout if holdout is not None else (cfg.holdout if own_data else False)
    cfg.eval_images = (cfg.eval_images if own_data else None) if eval_images is KEEP else eval_images
    cfg.workers = workers if workers is not None else cfg.workers
    cfg.threads = threads if threads is not None else cfg.threads
    if batch_size is not None:
        cfg.eval_batch_size = batch_size
    cfg.validate()

    env = D.setup()
    try:
        cfg.precision = resolve_precision(precision or cfg.precision, env.device, warn=env.is_main)
        set_determinism(cfg)
        eval_data = load_eval_data(data_config(cfg, spec))
        if eval_data.num_classes > spec.num_classes:
            raise SasaError(f"{cfg.data} has {eval_data.num_classes} classes but the model has {spec.num_classes} outputs")
        model = build_network(spec, cfg, env.device)
        ema = state.get("ema")
        weights = "ema" if use_ema and ema is not None else "model"
        try:
            model.load_state_dict(ema["module"] if weights == "ema" else state["model"])
        except (RuntimeError, KeyError, TypeError) as e:
            raise SasaError(f"incompatible checkpoint {path}: {str(e).splitlines()[0][:200]}") from None
        # the run's eval batch: the same batches give the same floating-point sums
        eval_bs = cfg.eval_batch_size or max(1, cfg.batch_size // env.world)
        m = evaluate(model, eval_data, env, eval_bs, cfg)
    finally:
        D.teardown(env)
    return {
        "model": spec.name,
        "checkpoint": str(path),
        "step": state.get("position", {}).get("global_step"),
        "data": cfg.data,
        "split": split_name(cfg.data, cfg.holdout),
        "weights": weights,
        "images": m["n"],
        "top1": m["top1"],
        "top5": m["top5"],
        "loss": m["loss"],
        "params": sum(p.numel() for p in model.parameters()),
        "image_size": spec.image_size,
        "precision": cfg.precision,
        "device": str(env.device),
        "threads": torch.get_num_threads(),
        "spec": spec.to_dict(),
        "eval_config": {k: v for k, v in dataclasses.asdict(cfg).items() if k in (
            "data", "data_dir", "holdout", "eval_images", "eval_batch_size", "synthetic_eval", "precision")},
    }
