"""`sasa-bench bench-data`: does the training input pipeline keep up with the model?"""

from typing import Annotated

import typer

from sasa_bench.choices import Format, Precision, plain
from sasa_bench.cli.options import FormatOpt, ModelOptions, device_option, model_options

COLUMNS = ["model", "data", "workers", "decode", "batch_size", "image_size", "data_images_per_s",
           "model_images_per_s", "ratio", "keeps_up"]


@model_options
def bench_data(
    model_opts: ModelOptions,
    data: Annotated[str, typer.Option(help="imagenet | fashion-mnist | synthetic.")] = "imagenet",
    data_dir: Annotated[str | None, typer.Option(help="Dataset root (imagenet: ROOT/train class folders).")] = None,
    workers: Annotated[int, typer.Option(help="DataLoader worker processes, as `train --workers`.")] = 4,
    batch_size: Annotated[int, typer.Option(help="Images per batch (one process's share of a training step).")] = 64,
    batches: Annotated[int, typer.Option(help="Timed pipeline batches.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed first batches (worker start-up).")] = 2,
    decode: Annotated[str, typer.Option(help="cpu (PIL, as train) | gpu (nvJPEG decode_jpeg + augmentation on CUDA).")] = "cpu",
    device: Annotated[str, device_option("Where the model's training step is timed: ")] = "auto",
    precision: Annotated[Precision, typer.Option(help="The model step's autocast precision; auto = bf16 where native.")] = Precision.FP32,
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="Channels-last model step.")] = False,
    model_iters: Annotated[int, typer.Option(help="Timed training steps of the model.")] = 5,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads. (default: torch's)")] = None,
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Images/s of the training pipeline (decode + augmentation) against the model's training
    images/s, measured in the same run: the loader keeps up when its rate is the higher."""
    from sasa_bench.cli.output import check_format, emit, step_progress
    from sasa_bench.measure.data_bench import DataBenchOptions, bench_data

    format = check_format(fmt)
    spec = model_opts.spec()
    opts = DataBenchOptions(data=data, data_dir=data_dir, workers=workers, batch_size=batch_size, batches=batches,
                            warmup=warmup, decode=decode, device=device, precision=plain(precision),
                            channels_last=channels_last, model_iters=model_iters, threads=threads)
    opts.validate()  # bad options: one line, before any progress line
    with step_progress("data pipeline") as progress:
        row = bench_data(spec, opts, progress)
    emit([row], format, None if format == "json" else COLUMNS,
         headers={"data_images_per_s": "data img/s", "model_images_per_s": "model img/s", "keeps_up": "keeps up"},
         digits={"data_images_per_s": 1, "model_images_per_s": 1, "ratio": 2})
