"""Does the input pipeline keep up with the model? (``sasa-bench bench-data``)

Two rates in one run: images/s of the training pipeline (read + decode + augmentation +
collation into batches, exactly what ``sasa-bench train`` iterates, with its ``workers``) and
images/s of the model's training step (forward + backward, :func:`measure_latency` in ``train``
mode, a few iterations at the same batch). The pipeline keeps up when its rate is at least the
model's; the ratio says by how much.

GPU decode (``decode="gpu"``, CUDA only): the workers only read the JPEG bytes; the batch is
decoded on the GPU with ``torchvision.io.decode_jpeg(device="cuda")`` (nvJPEG) and augmented
there (RandomResizedCrop + flip + normalise, the CPU path's transforms on tensors), as DALI-style
pipelines do when CPU decoding is the bottleneck. Augmentation randomness there comes from one
seeded generator, not the per-sample seeds of the CPU path: a throughput measurement, not the
training pipeline's exact images.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from sasa_bench.errors import SasaError
from sasa_bench.progress import ProgressFn
from sasa_bench.spec import ModelSpec
from sasa_bench.train.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataConfig,
    FolderData,
    TrainData,
    load_train_data,
    steps_per_epoch,
    train_steps,
)

DECODES = ("cpu", "gpu")


@dataclass
class DataBenchOptions:
    data: str = "imagenet"
    data_dir: str | None = None
    workers: int = 4
    batch_size: int = 64  # per process: what one training step consumes
    batches: int = 20  # timed batches of the pipeline
    warmup: int = 2  # untimed first batches (worker start-up, file cache)
    decode: str = "cpu"  # cpu | gpu (nvJPEG)
    device: str = "auto"  # where the model's training step is timed
    precision: str = "fp32"
    channels_last: bool = False
    model_iters: int = 5
    threads: int | None = None

    def validate(self) -> None:
        if self.decode not in DECODES:
            raise SasaError(f"unknown decode {self.decode!r} (choose from {', '.join(DECODES)})")
        if self.decode == "gpu":
            if not torch.cuda.is_available():
                raise SasaError("--decode gpu needs CUDA (torchvision.io.decode_jpeg on the GPU); none is available here")
            if self.data != "imagenet":
                raise SasaError("--decode gpu applies to --data imagenet (JPEG files)")
        for name in ("batch_size", "batches", "model_iters"):
            if getattr(self, name) < 1:
                raise SasaError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.workers < 0:
            raise SasaError(f"warmup and workers must be >= 0, got {self.warmup} and {self.workers}")


def _index_batches(n: int, batch: int, count: int) -> Iterator[tuple[int, torch.Tensor]]:
    """``count`` training batches (epochs repeat when the set is small), as ``train`` cuts them."""
    spe = steps_per_epoch(n, batch)
    if spe == 0:
        raise SasaError(f"the training set ({n} images) is smaller than one batch of {batch}")
    done, epoch = 0, 0
    while done < count:
        for s, idx in train_steps(n, 0, epoch, batch):
            if done >= count:
                return
            yield epoch * spe + s, idx
            done += 1
        epoch += 1


def _time_batches(batches: Iterator[Any], warmup: int, count: int, progress: ProgressFn | None,
                  sync: torch.device | None = None) -> tuple[float, int]:
    """Seconds and images over the batches after ``warmup``."""
    t0, images = None, 0
    for i, batch in enumerate(batches):
        if sync is not None and sync.type == "cuda":
            torch.cuda.synchronize(sync)
        if i == warmup:
            t0 = time.perf_counter()
        elif i > warmup:
            images += len(batch)
        if progress:
            progress("data pipeline", i + 1, warmup + count + 1)
    if t0 is None or images == 0:
        raise SasaError("too few batches to time (raise --batches)")
    return time.perf_counter() - t0, images


class _JpegBytes(torch.utils.data.Dataset):
    """The raw file bytes of an ImageFolder's samples (decoding happens on the GPU)."""

    def __init__(self, folder: FolderData) -> None:
        self.ds = folder.ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int):
        from torchvision.io import read_file

        j = int(self.ds.indices[i]) if self.ds.indices is not None else i
        path, target = self.ds.folder.samples[j]
        return read_file(path), target


def _gpu_batches(folder: FolderData, opts: DataBenchOptions, image_size: int, count: int) -> Iterator[torch.Tensor]:
    """Batches decoded by nvJPEG and augmented on the GPU (RandomResizedCrop + flip + normalise)."""
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms import RandomResizedCrop
    from torchvision.transforms.functional import resized_crop

    device = torch.device("cuda")
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    sampler = [idx.tolist() for _, idx in _index_batches(len(folder), opts.batch_size, count)]
    loader = torch.utils.data.DataLoader(_JpegBytes(folder), batch_sampler=sampler, num_workers=opts.workers,
                                         collate_fn=_as_list)
    torch.manual_seed(0)
    for items in loader:
        try:
            images = decode_jpeg([b for b, _ in items], mode=ImageReadMode.RGB, device=device)
        except RuntimeError as e:
            raise SasaError(f"GPU decode failed (are the files JPEGs?): {str(e).splitlines()[0][:160]}") from None
        out = []
        for img in images:
            i, j, h, w = RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3])
            x = resized_crop(img, i, j, h, w, [image_size, image_size], antialias=True)
            out.append(x.flip(-1) if torch.rand(()) < 0.5 else x)
        yield (torch.stack(out).float() / 255 - mean) / std


def _as_list(items: list) -> list:
    return items


def _cpu_batches(data: TrainData, batch: int, count: int) -> Iterator[torch.Tensor]:
    """The training pipeline as ``train`` runs it (seeded per-sample augmentation, workers)."""
    for _, (x, _y) in data.batches(_index_batches(len(data), batch, count), train=True, seed=0, epoch=0, rank=0):
        yield x


def bench_data(spec: ModelSpec, opts: DataBenchOptions, progress: ProgressFn | None = None) -> dict[str, Any]:
    """One row: the pipeline's images/s, the model's training images/s, their ratio and whether
    the pipeline keeps up (ratio >= 1)."""
    from sasa_bench.measure.latency import LatencyOptions, measure_latency

    opts.validate()
    prev = torch.get_num_threads()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        train = load_train_data(DataConfig(opts.data, opts.data_dir, spec.image_size, spec.num_classes,
                                        workers=opts.workers, augment=True))
        count = opts.warmup + opts.batches + 1
        if opts.decode == "gpu":
            if not isinstance(train, FolderData):  # validate() allows gpu only for imagenet
                raise SasaError("--decode gpu applies to --data imagenet")
            batches = _gpu_batches(train, opts, spec.image_size, count)
            sync: torch.device | None = torch.device("cuda")
        else:
            batches, sync = _cpu_batches(train, opts.batch_size, count), None
        seconds, images = _time_batches(batches, opts.warmup, opts.batches, progress, sync)
        data_rate = images / seconds
        lat = measure_latency([spec], LatencyOptions(
            device=opts.device, threads=opts.threads, batch_size=opts.batch_size, precision=opts.precision,
            channels_last=opts.channels_last, mode="train", warmup=1, iters=opts.model_iters,
        ), progress=progress)[0]
    finally:
        torch.set_num_threads(prev)
    model_rate = lat["images_per_s"]
    return {
        "model": spec.name,
        "data": opts.data,
        "data_dir": opts.data_dir,
        "images": len(train),
        "workers": opts.workers,
        "decode": opts.decode,
        "batch_size": opts.batch_size,
        "image_size": spec.image_size,
        "data_images_per_s": data_rate,
        "model_images_per_s": model_rate,
        "ratio": data_rate / model_rate if model_rate else None,
        "keeps_up": bool(model_rate and data_rate >= model_rate),
        "timed_batches": opts.batches,
        "model_device": lat["device"],
        "precision": lat["precision"],
        "threads": lat["threads"],
        "spec": spec.to_dict(),
    }
