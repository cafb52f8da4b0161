"""`sasa-bench eval --checkpoint RUN/checkpoint.pt`: evaluate a training run's checkpoint
(timm's validate.py for our runs); the model comes from the checkpoint's saved config."""

import os
from pathlib import Path
from typing import Annotated

import typer

from sasa_bench.choices import Format, Precision, plain
from sasa_bench.cli.options import FormatOpt
from sasa_bench.cli.output import emit

COLUMNS = ["model", "data", "split", "weights", "images", "top1", "top5", "loss", "params", "image_size", "step"]


def eval_checkpoint(
    checkpoint: Annotated[Path, typer.Option(help="A run's checkpoint.pt (or its run directory).")],
    data: Annotated[str | None, typer.Option(help="imagenet | fashion-mnist | synthetic. (default: the run's)")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Dataset root. (default: the run's)")] = None,
    holdout: Annotated[bool | None, typer.Option("--holdout/--no-holdout", help="ImageNet: the 4% held-out split of train instead of val. (default: the run's)")] = None,
    eval_images: Annotated[int | None, typer.Option(help="A fixed random subset of this many images. (default: the run's subset on its own data, else all)")] = None,
    all_images: Annotated[bool, typer.Option("--all-images", help="The whole eval split, even if the run evaluated a subset.")] = False,
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="The EMA weights when the run kept them (--no-ema: the raw weights).")] = True,
    batch_size: Annotated[int | None, typer.Option(help="Eval batch size per process. (default: the run's)")] = None,
    precision: Annotated[Precision | None, typer.Option(help="Autocast precision; auto = bf16 where native. (default: the run's)")] = None,
    workers: Annotated[int | None, typer.Option(help="DataLoader worker processes (ImageFolder).")] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    backend: Annotated[str | None, typer.Option(help="Attention backend. (default: the run's)")] = None,
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Top-1/top-5 (%), loss, params and image size of a checkpoint's model on an eval split.

    By default the run's own eval split, eval batch and precision: the top-1 equals the run's
    final evaluation. Works under torchrun (the eval set is sharded, counts summed).
    """
    from sasa_bench.cli.output import check_format
    from sasa_bench.errors import SasaError
    from sasa_bench.train.evaluation import KEEP, evaluate_checkpoint

    format = check_format(fmt)
    if all_images and eval_images is not None:
        raise SasaError("--all-images and --eval-images exclude each other")
    row = evaluate_checkpoint(
        checkpoint, data=data, data_dir=data_dir, holdout=holdout,
        eval_images=None if all_images else (eval_images if eval_images is not None else KEEP),
        use_ema=ema, batch_size=batch_size, precision=plain(precision), workers=workers, backend=backend, threads=threads,
    )
    if os.environ.get("RANK", "0") != "0":  # under torchrun: rank 0 prints
        return
    emit([row], format, None if format == "json" else COLUMNS, title=str(checkpoint),
         headers={"top1": "top-1 %", "top5": "top-5 %", "image_size": "image size"},
         digits={"top1": 2, "top5": 2, "loss": 4})
