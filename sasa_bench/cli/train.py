"""`sasa-bench train`: train one model (single process, or DDP under torchrun).

The training flags are generated from :class:`~sasa_bench.train.recipes.TrainConfig`'s fields
(``@train_options``), as the model flags are from the model options (``@model_options``).
Flags left out take their value from ``--config`` if given, else from the ``--recipe``.
"""

import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from sasa_bench.cli.options import ModelOptions, model_options, train_options

_T = "Training"
_R = "Run control"


def _opt(help: str, panel: str = _T, *names: str):
    return typer.Option(*names, help=help, rich_help_panel=panel)


@model_options
@train_options
def train(
    model_opts: ModelOptions,
    train_overrides: dict[str, Any],
    task: Annotated[str, _opt("classification | detection (a retinanet_* model on COCO-format data, Table 2).")] = "classification",
    backbone_checkpoint: Annotated[Path | None, _opt("Detection: start the backbone from this classification checkpoint.")] = None,
    recipe: Annotated[str, _opt("paper (the appendix, ImageNet) | short (minutes on CPU, Fashion-MNIST).")] = "paper",
    config: Annotated[Path | None, _opt("TOML/YAML file of training settings (defaults; flags win).")] = None,
    resume: Annotated[str | None, _opt("auto (OUT/checkpoint.pt if present) | PATH. Without it, an --out that holds a run is refused.", _R)] = None,
    resume_override: Annotated[bool, typer.Option("--resume-override", help="Resume even though training settings changed (LR, weight decay, precision, ...); the changes are recorded in config.yaml.", rich_help_panel=_R)] = False,
    out: Annotated[Path | None, _opt("Run directory. (default: runs/<model>-<timestamp>)", _R)] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress output.", rich_help_panel=_R)] = False,
) -> None:
    """Train a model; writes config.yaml, metrics.csv, checkpoint.pt, summary.json (and
    tensorboard/) to --out.

    Multi-GPU / multi-process: ``torchrun --nproc-per-node N -m sasa_bench train ...``.
    Prints the summary JSON on stdout.
    """
    from sasa_bench.errors import SasaError
    from sasa_bench.store import json_text, safe_name
    from sasa_bench.train import distributed as D
    from sasa_bench.train import resolve_config, run_training, spec_for

    if task not in ("classification", "detection"):
        raise SasaError(f"unknown task {task!r} (choose from classification, detection)")
    detection = task == "detection"
    if detection:
        from sasa_bench.train.detection import DETECTION_RECIPES, run_detection_training
    elif backbone_checkpoint is not None:
        raise SasaError("--backbone-checkpoint is for --task detection")
    cfg = resolve_config(recipe, config, train_overrides, DETECTION_RECIPES if detection else None)
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
