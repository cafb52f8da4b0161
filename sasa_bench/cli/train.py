"""`sasa-bench train`: train one model (single process, or DDP under torchrun).

Flags left out take their value from ``--config`` if given, else from the ``--recipe``.
"""

import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from sasa_bench.choices import Precision, plain
from sasa_bench.cli.options import ModelOptions, model_options

_T = "Training"
_R = "Run control"
_S = "Speed"


def _opt(help: str, panel: str = _T, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel)


@model_options
def train(
    model_opts: ModelOptions,
    task: Annotated[str, _opt("classification | detection (a retinanet_* model on COCO-format data, Table 2).")] = "classification",
    data: Annotated[str | None, _opt("imagenet | fashion-mnist | synthetic; detection: coco. (recipe: paper=imagenet, short=fashion-mnist)")] = None,
    data_dir: Annotated[Path | None, _opt("Dataset root (imagenet: ROOT/train, ROOT/val; fashion-mnist: the IDX files; coco: ROOT/train2017, ROOT/val2017, ROOT/annotations).")] = None,
    backbone_checkpoint: Annotated[Path | None, _opt("Detection: start the backbone from this classification checkpoint.")] = None,
    holdout: Annotated[bool | None, _opt("Evaluate on a 4% held-out split of ImageNet train (fixed), as Tables 3 and 5.", _T, "--holdout/--no-holdout")] = None,
    augment: Annotated[bool | None, _opt("Training augmentation (random crop + flip). (recipe: paper=on, short=off)", _T, "--augment/--no-augment")] = None,
    recipe: Annotated[str, _opt("paper (the appendix, ImageNet) | short (minutes on CPU, Fashion-MNIST).")] = "paper",
    config: Annotated[Path | None, _opt("TOML/YAML file of training settings (defaults; flags win).")] = None,
    epochs: Annotated[float | None, _opt("Epochs (the schedule's length).")] = None,
    max_steps: Annotated[int | None, _opt("Stop after this many steps without changing the schedule.", _R)] = None,
    batch_size: Annotated[int | None, _opt("Global batch size (split over torchrun processes).")] = None,
    lr: Annotated[float | None, _opt("Peak LR. (default: 1.6 x batch/4096)")] = None,
    weight_decay: Annotated[float | None, _opt("Weight decay (not on BN/bias).")] = None,
    momentum: Annotated[float | None, _opt("SGD (Nesterov) momentum.")] = None,
    label_smoothing: Annotated[float | None, _opt("Label smoothing.")] = None,
    grad_clip: Annotated[float | None, _opt("Clip the gradient norm to this (0 = off).")] = None,
    zero_init_residual: Annotated[bool | None, _opt("Start each residual block's last BN at gamma = 0 (torchvision's flag).", _T, "--zero-init-residual/--no-zero-init-residual")] = None,
    warmup_epochs: Annotated[float | None, _opt("Linear warm-up epochs before the cosine decay.")] = None,
    ema_decay: Annotated[float | None, _opt("EMA decay of the weights (0 = off; evaluated when on).")] = None,
    bn_momentum: Annotated[float | None, _opt("BatchNorm momentum, PyTorch convention (paper: 1e-4 = TF decay 0.9999).")] = None,
    precision: Annotated[Precision | None, _opt("Autocast precision (fp16 with a grad scaler); auto = bf16 where native.", _S)] = None,
    channels_last: Annotated[bool | None, _opt("Channels-last memory format.", _S, "--channels-last/--no-channels-last")] = None,
    compile: Annotated[bool | None, _opt("torch.compile the model.", _S, "--compile/--no-compile")] = None,
    workers: Annotated[int | None, _opt("DataLoader worker processes (ImageFolder).", _S)] = None,
    threads: Annotated[int | None, _opt("torch CPU threads per process. (default: torch's)", _S)] = None,
    seed: Annotated[int | None, _opt("Seed (init, data order, augmentation).", _R)] = None,
    deterministic: Annotated[bool | None, _opt("Deterministic algorithms (bit-exact resume on CPU).", _R, "--deterministic/--no-deterministic")] = None,
    eval_every: Annotated[int | None, _opt("Evaluate every N epochs (and at the end).", _R)] = None,
    checkpoint_every: Annotated[int | None, _opt("Also checkpoint every N steps (always: every epoch).", _R)] = None,
    resume: Annotated[str | None, _opt("auto (OUT/checkpoint.pt if present) | PATH. Without it, an --out that holds a run is refused.", _R)] = None,
    resume_override: Annotated[bool, typer.Option("--resume-override", help="Resume even though training settings changed (LR, weight decay, precision, ...); the changes are recorded in config.yaml.", rich_help_panel=_R)] = False,
    out: Annotated[Path | None, _opt("Run directory. (default: runs/<model>-<timestamp>)", _R)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=_R)] = False,
) -> None:
    """Train a model; writes config.yaml, metrics.csv, checkpoint.pt and summary.json to --out.

    Multi-GPU / multi-process: ``torchrun --nproc-per-node N -m sasa_bench train ...``.
    Prints the summary JSON on stdout.
    """
    from sasa_bench.store import json_text, safe_name
    from sasa_bench.train import distributed as D
    from sasa_bench.train import resolve_config, run_training, spec_for

    overrides = {
        "data": data, "data_dir": str(data_dir) if data_dir else None, "holdout": holdout, "augment": augment, "epochs": epochs,
        "max_steps": max_steps, "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay,
        "momentum": momentum, "label_smoothing": label_smoothing, "grad_clip": grad_clip,
        "zero_init_residual": zero_init_residual,
        "warmup_epochs": warmup_epochs,
        "ema_decay": ema_decay, "bn_momentum": bn_momentum, "precision": plain(precision),
        "channels_last": channels_last, "compile": compile, "workers": workers, "threads": threads, "seed": seed,
        "deterministic": deterministic, "eval_every": eval_every, "checkpoint_every": checkpoint_every,
    }
    from sasa_bench.errors import SasaError

    if task not in ("classification", "detection"):
        raise SasaError(f"unknown task {task!r} (choose from classification, detection)")
    detection = task == "detection"
    if detection:
        from sasa_bench.train.detection import DETECTION_RECIPES, run_detection_training
    elif backbone_checkpoint is not None:
        raise SasaError("--backbone-checkpoint is for --task detection")
    cfg = resolve_config(recipe, config, overrides, DETECTION_RECIPES if detection else None)
    models = model_opts.models
    if len(models) > 1:
        raise SasaError("train takes one --model")
    spec = spec_for(cfg, models[0] if models else ("retinanet_resnet50" if detection else None), model_opts.overrides())
    if detection != (spec.detector != "none"):
        raise SasaError(f"{spec.name} is {'not ' if detection else ''}a detector: "
                        + ("use a retinanet_* model" if detection else "add --task detection"))
    env = D.setup()  # under torchrun: join the group now, so every rank agrees on the run directory
    try:
        if out is None:
            out = Path("runs") / f"{safe_name(spec.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
            out = Path(D.broadcast_object(str(out), env))
        if detection:
            summary = run_detection_training(spec, cfg, out, progress=not quiet, resume=resume,
                                             backbone_checkpoint=backbone_checkpoint, resume_override=resume_override)
        else:
            summary = run_training(spec, cfg, out, progress=not quiet, resume=resume, resume_override=resume_override)
        if env.is_main:
            sys.stdout.write(json_text(summary))
    finally:
        D.teardown(env)
