"""Training data: IDX reading, ImageFolder, synthetic, sampling/sharding, clear errors."""

from __future__ import annotations

import gzip
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sasa_bench.cli.app import main
from sasa_bench.errors import SasaError
from sasa_bench.train.data import (
    FASHION_MNIST_DIR,
    DataConfig,
    eval_shard,
    load_data,
    read_idx,
    steps_per_epoch,
    train_steps,
)

sys.path.insert(0, str(Path(__file__).parent))


def write_idx(path: Path, arr: np.ndarray, gz: bool = True, magic: bytes | None = None) -> None:
    head = magic if magic is not None else bytes([0, 0, 8, arr.ndim])
    raw = head + b"".join(struct.pack(">I", d) for d in arr.shape) + arr.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def fake_fashion(root: Path, n_train: int = 40, n_test: int = 20) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return root


def fm_cfg(root: Path, size: int = 32) -> DataConfig:
    return DataConfig("fashion-mnist", str(root), size, 10)


def test_fashion_mnist_fake_idx(tmp_path):
    train, test = load_data(fm_cfg(fake_fashion(tmp_path / "fm"), 64))
    assert (len(train), len(test), train.num_classes) == (40, 20, 10)
    steps = train_steps(len(train), 0, 0, 8)
    batches = list(train.batches(steps, train=True, seed=0, epoch=0, rank=0))
    x, y = batches[0][1]
    assert x.shape == (8, 3, 64, 64) and y.dtype == torch.long
    assert len(batches) == steps_per_epoch(40, 8) == 5
    assert abs(x.mean().item()) < 2  # normalised
    (_, (x2, _)), = test.batches(iter([(0, torch.arange(4))]), train=False, seed=0, epoch=0, rank=0)
    assert torch.equal(x2[:, 0], x2[:, 2])  # gray -> 3 equal channels


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(SasaError, match="not found"):
        load_data(fm_cfg(tmp_path / "missing"))
    root = fake_fashion(tmp_path / "fm")
    (root / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(SasaError, match="missing data file"):
        load_data(fm_cfg(root))
    write_idx(root / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10, magic=b"\x00\x00\x08\x03")
    with pytest.raises(SasaError, match="magic"):
        load_data(fm_cfg(root))
    (root / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(SasaError, match="corrupt"):
        load_data(fm_cfg(root))
    raw = gzip.decompress((root / "train-images-idx3-ubyte.gz").read_bytes())
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(SasaError, match="corrupt"):
        read_idx(root / "train-images-idx3-ubyte.gz", 3)


@pytest.mark.skipif(not FASHION_MNIST_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_real():
    train, test = load_data(DataConfig("fashion-mnist", None, 64, 10))
    assert (len(train), len(test)) == (60000, 10000)
    assert sorted(set(train.labels.tolist())) == list(range(10))


def test_sampling_is_deterministic_and_sharded():
    n, g = 103, 12
    a = [idx for _, idx in train_steps(n, 5, 3, g)]
    b = [idx for _, idx in train_steps(n, 5, 3, g)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and len(a) == n // g
    c = [idx for _, idx in train_steps(n, 5, 4, g)]
    assert not torch.equal(a[0], c[0])  # a new order each epoch
    # ranks' slices concatenate to the single-process global batch
    r0 = [idx for _, idx in train_steps(n, 5, 3, g, rank=0, world=3)]
    r1 = [idx for _, idx in train_steps(n, 5, 3, g, rank=1, world=3)]
    r2 = [idx for _, idx in train_steps(n, 5, 3, g, rank=2, world=3)]
    assert all(torch.equal(torch.cat(p), q) for p, q in zip(zip(r0, r1, r2, strict=True), a, strict=True))
    # resume mid-epoch: the remaining batches are the same
    tail = [idx for _, idx in train_steps(n, 5, 3, g, start_step=4)]
    assert all(torch.equal(x, y) for x, y in zip(tail, a[4:], strict=True))
    # eval shards: every sample exactly once, no padding
    shards = torch.cat([eval_shard(n, r, 4) for r in range(4)])
    assert sorted(shards.tolist()) == list(range(n))
    with pytest.raises(SasaError, match="divisible"):
        next(train_steps(n, 0, 0, 10, world=3))


def test_synthetic_is_learnable_and_fixed():
    tr, ev = load_data(DataConfig("synthetic", None, 32, 4, synthetic_train=64, synthetic_eval=32))
    tr2, _ = load_data(DataConfig("synthetic", None, 32, 4, synthetic_train=64, synthetic_eval=32))
    assert torch.equal(tr.images, tr2.images) and torch.equal(tr.labels, tr2.labels)
    # nearest class mean on the 8x8 images classifies the eval split well: the rule is learnable
    means = torch.stack([tr.images[tr.labels == c].mean(0) for c in range(4)]).flatten(1)
    pred = torch.cdist(ev.images.flatten(1), means).argmin(1)
    assert (pred == ev.labels).float().mean() > 0.8


def make_image_folder(root: Path, classes=("cat", "dog"), n_train: int = 6, n_val: int = 3) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i}.png")
    return root


def test_image_folder_and_holdout(tmp_path):
    root = make_image_folder(tmp_path / "inet", n_train=25)
    train, val = load_data(DataConfig("imagenet", str(root), 32, 2))
    assert (len(train), len(val), train.num_classes) == (50, 6, 2)
    steps = list(train_steps(len(train), 0, 0, 4))[:2]
    out = list(train.batches(iter(steps), train=True, seed=0, epoch=0, rank=0))
    again = list(train.batches(iter(steps), train=True, seed=0, epoch=0, rank=0))
    assert out[0][1][0].shape == (4, 3, 32, 32)
    assert torch.equal(out[1][1][0], again[1][1][0])  # augmentation seeded per (seed, epoch, sample)
    tr, ho = load_data(DataConfig("imagenet", str(root), 32, 2, holdout=True))
    assert (len(tr), len(ho)) == (48, 2)
    assert not set(tr.ds.indices.tolist()) & set(ho.ds.indices.tolist())
    tr_again, ho_again = load_data(DataConfig("imagenet", str(root), 32, 2, holdout=True))
    assert torch.equal(ho.ds.indices, ho_again.ds.indices)  # fixed split


def test_image_folder_errors(tmp_path):
    with pytest.raises(SasaError, match="needs --data-dir"):
        load_data(DataConfig("imagenet", None, 32, 2))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(SasaError, match="layout"):
        load_data(DataConfig("imagenet", str(tmp_path / "empty"), 32, 2))
    root = make_image_folder(tmp_path / "inet")
    (root / "train" / "cat" / "0.png").write_bytes(b"broken png")
    train, _ = load_data(DataConfig("imagenet", str(root), 32, 2))
    with pytest.raises(SasaError, match="corrupt image"):
        list(train.batches(iter([(0, torch.arange(12))]), train=True, seed=0, epoch=0, rank=0))
    with pytest.raises(SasaError, match="unknown dataset"):
        load_data(DataConfig("cifar", None, 32, 2))


def test_paper_recipe_on_image_folder(tmp_path, capsys):
    import json

    root = make_image_folder(tmp_path / "inet", n_train=8)
    argv = ["train", "--threads", "1", "--model", "resnet26", "--width", "0.125", "--image-size", "32",
            "--num-classes", "2", "--recipe", "paper", "--data", "imagenet", "--data-dir", str(root),
            "--batch-size", "4", "--max-steps", "3", "--workers", "1", "--out", str(tmp_path / "run"), "-q"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    s = json.loads(capsys.readouterr().out)
    assert s["steps"] == 3 and s["eval_weights"] == "ema" and s["eval_images"] == 6 and s["recipe"] == "paper"
