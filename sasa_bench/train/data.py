"""Training data: ImageNet (ImageFolder), Fashion-MNIST (IDX files) and a synthetic task.

Every dataset is served the same way: :func:`train_steps` cuts a seeded permutation of the
training set into global batches (a pure function of ``seed`` and ``epoch``, so a resumed run
can restart mid-epoch on exactly the batch it stopped at), each global batch is split into
equal per-rank slices (DistributedSampler-like, but exact: the concatenation of the ranks'
slices is the single-process batch), and evaluation shards the eval set without padding
(``indices[rank::world]``), so summed correct/total counts are exact.

Augmentation randomness never touches the global RNGs: in-memory sets (Fashion-MNIST,
synthetic) augment each batch with a generator seeded by (seed, epoch, step, rank); ImageFolder
transforms run with the torch RNG seeded per sample by (seed, epoch, index). A resumed run thus
sees exactly the images an uninterrupted run would have seen.

Fashion-MNIST and synthetic images stay small in memory (28x28 / 8x8) and are resized to the
model's input size per batch with ``F.interpolate`` (cheap next to the network).
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sasa_bench.errors import SasaError

DATASETS = ("imagenet", "fashion-mnist", "synthetic")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
HOLDOUT_FRACTION = 0.04  # the paper's held-out share of the ImageNet train set
HOLDOUT_SEED = 0  # fixed, so runs with different --seed share one held-out split

Batch = tuple[torch.Tensor, torch.Tensor]


def mix_seed(*parts: int) -> int:
    """A well-spread 63-bit seed from a tuple of ints (stable across processes and runs)."""
    return zlib.crc32(np.asarray(parts, dtype=np.int64).tobytes()) * 2654435761 % (2**63 - 1)


# --------------------------------------------------------------------------- sampling


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(mix_seed(seed, epoch, 1))
    return torch.randperm(n, generator=g)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches per epoch (the ragged tail is dropped, as in the paper's TPU input)."""
    return n // global_batch


def train_steps(
    n: int, seed: int, epoch: int, global_batch: int, rank: int = 0, world: int = 1, start_step: int = 0
) -> Iterator[tuple[int, torch.Tensor]]:
    """(step_in_epoch, this rank's indices) for every global batch of ``epoch`` from ``start_step``."""
    if global_batch % world:
        raise SasaError(f"batch size {global_batch} is not divisible by the {world} processes")
    local = global_batch // world
    perm = epoch_permutation(n, seed, epoch)
    for s in range(start_step, steps_per_epoch(n, global_batch)):
        lo = s * global_batch + rank * local
        yield s, perm[lo : lo + local]


def eval_shard(n: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """This rank's share of the eval set: every world-th sample, no padding, no duplicates."""
    return torch.arange(rank, n, world)


# --------------------------------------------------------------------------- datasets


class TrainData:
    """What the loop needs from a dataset split."""

    name: str
    num_classes: int

    def __len__(self) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def batches(
        self, steps: Iterator[tuple[int, torch.Tensor]], train: bool, seed: int, epoch: int, rank: int
    ) -> Iterator[tuple[int, Batch]]:  # pragma: no cover - interface
        raise NotImplementedError


class InMemoryData(TrainData):
    """Small images held as one tensor ``[N, C, h, w]`` (uint8 or float), resized per batch."""

    def __init__(
        self,
        name: str,
        images: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        image_size: int,
        mean: float | tuple[float, ...],
        std: float | tuple[float, ...],
        augment: bool,
        scale: float = 1.0,
    ) -> None:
        self.name, self.images, self.labels = name, images, labels.long()
        self.num_classes, self.image_size, self.augment = num_classes, image_size, augment
        self.scale = scale  # uint8 -> [0, 1]
        self.mean = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def make_batch(self, idx: torch.Tensor, gen: torch.Generator | None) -> Batch:
        x = self.images[idx].float() * self.scale
        x = (x - self.mean) / self.std
        if gen is not None:
            x = random_crop_flip(x, gen)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return x.contiguous(), self.labels[idx]

    def batches(self, steps, train, seed, epoch, rank):
        for s, idx in steps:
            gen = None
            if train and self.augment:
                gen = torch.Generator().manual_seed(mix_seed(seed, epoch, s, rank, 2))
            yield s, self.make_batch(idx, gen)


def random_crop_flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop after zero padding (h/8 pixels; 0 = the mean after normalising) + h-flip."""
    b, _, h, w = x.shape
    pad = max(1, round(h / 8))
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h)[None, :])  # [b, h]
    cols = dx[:, None] + torch.arange(w)[None, :]  # [b, w]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    bi = torch.arange(b)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # [b, h, w, c]
    return out.permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- Fashion-MNIST

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path, expect_dims: int) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array, with its header checked."""
    if not path.is_file():
        gz = path if path.suffix == ".gz" else path.with_name(path.name + ".gz")
        plain = path.with_suffix("") if path.suffix == ".gz" else path
        path = gz if gz.is_file() else plain
        if not path.is_file():
            raise SasaError(f"missing data file {gz} (expected the IDX files of the dataset)")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise SasaError(f"corrupt data file {path}: {e}") from None
    if len(raw) < 4 + 4 * expect_dims:
        raise SasaError(f"corrupt data file {path}: too short for an IDX header")
    zero, dtype, ndim = raw[0] * 256 + raw[1], raw[2], raw[3]
    if zero != 0 or dtype != 0x08 or ndim != expect_dims:
        raise SasaError(
            f"corrupt data file {path}: bad IDX magic {raw[:4].hex()} (expected 0000080{expect_dims}, uint8 with {expect_dims} dims)"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim :]
    if len(body) != math.prod(shape):
        raise SasaError(f"corrupt data file {path}: header says {shape} = {math.prod(shape)} bytes, found {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_fashion_mnist(root: Path, split: str, image_size: int, augment: bool) -> InMemoryData:
    if not root.is_dir():
        raise SasaError(
            f"Fashion-MNIST directory {root} not found (install Debian's dataset-fashion-mnist or pass --data-dir)"
        )
    img_name, lab_name = _IDX_FILES[split]
    images = read_idx(root / img_name, 3)
    labels = read_idx(root / lab_name, 1)
    if len(images) != len(labels):
        raise SasaError(f"corrupt Fashion-MNIST in {root}: {len(images)} {split} images but {len(labels)} labels")
    if len(labels) == 0:
        raise SasaError(f"empty Fashion-MNIST {split} split in {root}")
    if labels.max() >= 10:
        raise SasaError(f"corrupt Fashion-MNIST labels in {root}: label {labels.max()} >= 10")
    return InMemoryData(
        "fashion-mnist",
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        10,
        image_size,
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
        augment,
        scale=1 / 255,
    )


# --------------------------------------------------------------------------- synthetic

SYNTH_RES = 8  # stored resolution; upsampled to the model's input per batch


def make_synthetic(n: int, num_classes: int, image_size: int, split_seed: int, noise: float = 1.0) -> InMemoryData:
    """A learnable task: each class owns a fixed random 8x8 RGB template; an image is its class's
    template plus Gaussian noise (per sample, fixed), upsampled. Templates depend only on
    ``num_classes``, so train and eval splits (different ``split_seed``) share the rule."""
    tg = torch.Generator().manual_seed(mix_seed(num_classes, 7))
    templates = torch.randn(num_classes, 3, SYNTH_RES, SYNTH_RES, generator=tg)
    g = torch.Generator().manual_seed(mix_seed(split_seed, 11))
    labels = torch.randint(0, num_classes, (n,), generator=g)
    images = templates[labels] + noise * torch.randn(n, 3, SYNTH_RES, SYNTH_RES, generator=g)
    return InMemoryData("synthetic", images, labels, num_classes, image_size, 0.0, 1.0, augment=False)


# --------------------------------------------------------------------------- ImageNet (ImageFolder)


class _SeededFolder(torch.utils.data.Dataset):
    """An ImageFolder subset whose items are fetched as (index, sample_seed): the transform runs
    under ``torch.manual_seed(sample_seed)`` in a forked RNG, so crops are reproducible."""

    def __init__(self, folder, indices: torch.Tensor | None, transform) -> None:
        self.folder, self.indices, self.transform = folder, indices, transform

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.folder)

    def __getitem__(self, item: tuple[int, int]):
        i, sample_seed = item
        j = int(self.indices[i]) if self.indices is not None else i
        path, target = self.folder.samples[j]
        try:
            img = self.folder.loader(path)
        except Exception as e:  # PIL raises many types for broken files
            raise SasaError(f"corrupt image {path}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.transform(img), target


class FolderData(TrainData):
    def __init__(self, folder, indices, transform, num_classes: int, workers: int) -> None:
        self.name = "imagenet"
        self.ds = _SeededFolder(folder, indices, transform)
        self.num_classes, self.workers = num_classes, workers

    def __len__(self) -> int:
        return len(self.ds)

    def batches(self, steps, train, seed, epoch, rank):
        steps = list(steps)
        batch_sampler = [[(int(i), mix_seed(seed, epoch, int(i), 3)) for i in idx] for _, idx in steps]
        loader = torch.utils.data.DataLoader(
            self.ds,
            batch_sampler=batch_sampler,
            num_workers=self.workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=False,
        )
        for (s, _), batch in zip(steps, loader, strict=True):
            yield s, (batch[0], batch[1])


def _image_folder(path: Path):
    from torchvision.datasets import ImageFolder

    if not path.is_dir():
        raise SasaError(f"ImageNet split directory {path} not found (expected ROOT/train and ROOT/val class folders)")
    try:
        return ImageFolder(str(path))
    except FileNotFoundError as e:
        raise SasaError(f"bad ImageFolder layout in {path}: {e}") from None


def imagenet_transforms(image_size: int):
    """(train, eval) transforms: RandomResizedCrop + flip; resize to 256/224 of the input, center crop."""
    from torchvision import transforms as T

    norm = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    eval_tf = T.Compose(
        [T.Resize(int(round(image_size * 256 / 224))), T.CenterCrop(image_size), T.ToTensor(), norm]
    )
    return train_tf, eval_tf


def load_imagenet(
    root: Path, image_size: int, holdout: bool, workers: int
) -> tuple[FolderData, FolderData]:
    if not root.is_dir():
        raise SasaError(f"ImageNet directory {root} not found")
    train_tf, eval_tf = imagenet_transforms(image_size)
    train = _image_folder(root / "train")
    n_cls = len(train.classes)
    if holdout:
        n = len(train)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        n_hold = max(1, round(n * HOLDOUT_FRACTION))
        if n_hold >= n:
            raise SasaError(f"train split of {root} is too small for a {HOLDOUT_FRACTION:.0%} held-out split")
        hold_idx, train_idx = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        return (
            FolderData(train, train_idx, train_tf, n_cls, workers),
            FolderData(train, hold_idx, eval_tf, n_cls, workers),
        )
    val = _image_folder(root / "val")
    if val.classes != train.classes:
        raise SasaError(f"bad ImageFolder layout in {root}: val classes differ from train classes")
    return FolderData(train, None, train_tf, n_cls, workers), FolderData(val, None, eval_tf, n_cls, workers)


# --------------------------------------------------------------------------- entry point


@dataclass(frozen=True)
class DataConfig:
    data: str
    data_dir: str | None
    image_size: int
    num_classes: int
    holdout: bool = False
    workers: int = 0
    synthetic_train: int = 2048
    synthetic_eval: int = 512
    augment: bool = True
    train_images: int | None = None  # a fixed subset of this many training images (None = all)
    eval_images: int | None = None  # likewise for the eval split


SUBSET_SEED = 0  # subsets are fixed, like the held-out split: every --seed trains on the same images


def subset_indices(n: int, keep: int | None) -> torch.Tensor | None:
    """The sorted indices of a fixed random subset of ``keep`` of ``n`` items (None: all of them)."""
    if keep is None or keep >= n:
        return None
    gen = torch.Generator().manual_seed(mix_seed(SUBSET_SEED, n, keep))
    return torch.randperm(n, generator=gen)[:keep].sort().values


def take(data: TrainData, keep: int | None) -> TrainData:
    """``data`` restricted to its fixed subset of ``keep`` items (the short recipe's budget)."""
    idx = subset_indices(len(data), keep)
    if idx is None:
        return data
    if isinstance(data, InMemoryData):
        data.images, data.labels = data.images[idx], data.labels[idx]
    elif isinstance(data, FolderData):
        data.ds.indices = data.ds.indices[idx] if data.ds.indices is not None else idx
    else:  # pragma: no cover - every dataset above is one of the two
        raise SasaError(f"cannot take a subset of {type(data).__name__}")
    return data


def load_data(cfg: DataConfig) -> tuple[TrainData, TrainData]:
    """(train, eval) splits for ``cfg.data``, cut to ``train_images`` / ``eval_images``."""
    train, evaluation = _load_splits(cfg)
    return take(train, cfg.train_images), take(evaluation, cfg.eval_images)


def load_train_data(cfg: DataConfig) -> TrainData:
    """The training split alone (``bench-data``: an ImageNet root needs no val folder for it)."""
    if cfg.data == "imagenet" and cfg.data_dir and not cfg.holdout:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise SasaError(f"ImageNet directory {root} not found")
        train = _image_folder(root / "train")
        tf = imagenet_transforms(cfg.image_size)[0]
        return take(FolderData(train, None, tf, len(train.classes), cfg.workers), cfg.train_images)
    return load_data(cfg)[0]


def load_eval_data(cfg: DataConfig) -> TrainData:
    """The eval split alone, cut to ``eval_images`` (what :func:`load_data` evaluates on), without
    scanning ImageNet's training folder unless the held-out split needs it."""
    if cfg.data == "imagenet" and not cfg.holdout and cfg.data_dir:
        root = Path(cfg.data_dir)
        if not root.is_dir():
            raise SasaError(f"ImageNet directory {root} not found")
        val = _image_folder(root / "val")
        return take(FolderData(val, None, imagenet_transforms(cfg.image_size)[1], len(val.classes), cfg.workers),
                    cfg.eval_images)
    if cfg.data == "fashion-mnist" and not cfg.holdout:
        root = Path(cfg.data_dir) if cfg.data_dir else FASHION_MNIST_DIR
        return take(load_fashion_mnist(root, "test", cfg.image_size, False), cfg.eval_images)
    if cfg.data == "synthetic":
        return take(make_synthetic(cfg.synthetic_eval, cfg.num_classes, cfg.image_size, 2), cfg.eval_images)
    return take(_load_splits(cfg)[1], cfg.eval_images)


def _load_splits(cfg: DataConfig) -> tuple[TrainData, TrainData]:
    """(train, eval) splits for ``cfg.data``; every problem is one SasaError line."""
    if cfg.data == "fashion-mnist":
        root = Path(cfg.data_dir) if cfg.data_dir else FASHION_MNIST_DIR
        if cfg.holdout:
            raise SasaError("--holdout applies to --data imagenet (Fashion-MNIST evaluates on its test split)")
        return (
            load_fashion_mnist(root, "train", cfg.image_size, cfg.augment),
            load_fashion_mnist(root, "test", cfg.image_size, False),
        )
    if cfg.data == "synthetic":
        return (
            make_synthetic(cfg.synthetic_train, cfg.num_classes, cfg.image_size, 1),
            make_synthetic(cfg.synthetic_eval, cfg.num_classes, cfg.image_size, 2),
        )
    if cfg.data == "imagenet":
        if not cfg.data_dir:
            raise SasaError("--data imagenet needs --data-dir ROOT (with ROOT/train and ROOT/val)")
        return load_imagenet(Path(cfg.data_dir), cfg.image_size, cfg.holdout, cfg.workers)
    raise SasaError(f"unknown dataset {cfg.data!r} (choose from {', '.join(DATASETS)})")
