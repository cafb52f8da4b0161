"""COCO-format detection data: the standard layout, checked up front, and the paper's augmentation.

``ROOT/train2017``, ``ROOT/val2017`` and ``ROOT/annotations/instances_{train,val}2017.json``.
Checks, before any training: a missing folder or annotation file, an unreadable annotation file,
and annotations of image ids the file does not list are one :class:`SasaError` line (exit 2).
Boxes with no area (w or h <= 0, non-finite) are skipped and counted; ``iscrowd`` boxes are left
out of training (as torchvision's reference does) and kept for COCOeval, which ignores them.

Labels: the dataset's category ids in sorted order -> 0..C-1 (COCO's 80 categories fill the
first 80 of the model's 90 slots); :meth:`CocoData.category_id` maps back for COCOeval.

Training augmentation (``augment``), the paper's "multiscale jitter, crop to a maximum dimension
of 640, flip 0.5": resize so the longer side is ``S * U(0.8, 1.2)`` (the jitter range is our
choice; the paper gives none), take a random ``S x S`` crop (boxes clipped, boxes left with no
area dropped), flip horizontally with p = 0.5. Without it: the longer side resized to ``S``.
The randomness of a sample is a function of (seed, epoch, index), so a resumed run sees the
same images as an uninterrupted one. Evaluation images go in at their own size (the detector
resizes them to longer side ``S`` and maps its boxes back).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sasa_bench.errors import SasaError

JITTER = (0.8, 1.2)
FLIP_P = 0.5
SPLITS = {"train": "train2017", "val": "val2017"}


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{SPLITS[split]}.json"


def _require_pycocotools() -> Any:
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise SasaError("COCO data needs pycocotools: pip install 'sasa-bench[detection]'") from None
    return COCO


def load_coco(path: Path) -> Any:
    """pycocotools' COCO index of an annotation file, its prints kept off stdout."""
    COCO = _require_pycocotools()
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise SasaError(f"cannot read COCO annotations {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise SasaError(f"bad COCO annotation file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) or not isinstance(data.get("categories"), list):
        raise SasaError(f"bad COCO annotation file {path}: expected 'images' and 'categories' lists")
    data.setdefault("annotations", [])
    try:
        ids = {int(im["id"]) for im in data["images"]}
        bad = sorted({int(a["image_id"]) for a in data["annotations"]} - ids)
        for a in data["annotations"]:
            a["bbox"] = [float(v) for v in a["bbox"]]
            if len(a["bbox"]) != 4:
                raise ValueError("a bbox is not [x, y, w, h]")
        if not data["categories"]:
            raise ValueError("no categories")
        for c in data["categories"]:
            int(c["id"])
    except (KeyError, TypeError, ValueError) as e:
        raise SasaError(f"bad COCO annotation file {path}: {e}") from None
    if bad:
        raise SasaError(f"{path}: annotations of {len(bad)} image id(s) the file does not list (e.g. {bad[0]})")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass
class Sample:
    image_id: int
    file: Path
    boxes: torch.Tensor  # [n, 4] x1 y1 x2 y2, pixels
    labels: torch.Tensor  # [n] int64


class CocoData:
    """One split: its images' boxes and labels, and the COCO index COCOeval needs."""

    def __init__(self, root: Path, split: str, image_size: int, num_classes: int, augment: bool, limit: int | None = None) -> None:
        root = Path(root)
        folder = root / SPLITS[split]
        ann = annotation_path(root, split)
        if not ann.is_file():
            raise SasaError(f"no COCO annotation file {ann} (expected ROOT/annotations/instances_{SPLITS[split]}.json)")
        if not folder.is_dir():
            raise SasaError(f"no COCO image folder {folder}")
        self.coco = load_coco(ann)
        self.cat_ids = sorted(int(c["id"]) for c in self.coco.dataset["categories"])
        if len(self.cat_ids) > num_classes:
            raise SasaError(f"{ann} has {len(self.cat_ids)} categories but the model has {num_classes} class slots (set --num-classes)")
        label_of = {c: i for i, c in enumerate(self.cat_ids)}
        self.image_size, self.augment, self.split = image_size, augment, split
        self.skipped_boxes = 0
        self.samples: list[Sample] = []
        images = sorted(self.coco.dataset["images"], key=lambda im: int(im["id"]))
        if limit is not None:
            images = images[:limit]
        missing = [im["file_name"] for im in images if not (folder / str(im.get("file_name", ""))).is_file()]
        if missing:
            raise SasaError(f"{len(missing)} image file(s) listed in {ann} are not in {folder} (e.g. {missing[0]})")
        for im in images:
            boxes, labels = [], []
            for a in self.coco.imgToAnns.get(int(im["id"]), []):
                x, y, w, h = a["bbox"]
                if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0 or int(a["category_id"]) not in label_of:
                    self.skipped_boxes += 1
                    continue
                if a.get("iscrowd", 0):
                    continue
                boxes.append([x, y, x + w, y + h])
                labels.append(label_of[int(a["category_id"])])
            self.samples.append(Sample(
                int(im["id"]), folder / im["file_name"],
                torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(labels, dtype=torch.int64),
            ))
        if not self.samples:
            raise SasaError(f"{ann} lists no images")
        self.image_ids = [s.image_id for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def category_id(self, label: int) -> int:
        return self.cat_ids[label]

    def get(self, i: int, seed: int = 0, epoch: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        """(image [3, H, W] in [0, 1], {"boxes", "labels"}, image id) of sample ``i``."""
        s = self.samples[i]
        img = read_image(s.file)
        boxes, labels = s.boxes.clone(), s.labels.clone()
        if self.augment:
            g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 10_000_019 + i)
            img, boxes, labels = jitter_crop_flip(img, boxes, labels, self.image_size, g)
        return img, {"boxes": boxes, "labels": labels}, s.image_id


def read_image(path: Path) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0
    except (OSError, ValueError) as e:
        raise SasaError(f"cannot read image {path}: {str(e).splitlines()[0][:120]}") from None


def jitter_crop_flip(
    img: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, size: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Longer side -> size * U(JITTER), random size x size crop, horizontal flip p = FLIP_P."""
    _, h, w = img.shape
    u = torch.rand(4, generator=g).tolist()
    scale = size * (JITTER[0] + (JITTER[1] - JITTER[0]) * u[0]) / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
    boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
    y0 = int(u[1] * (nh - size + 1)) if nh > size else 0
    x0 = int(u[2] * (nw - size + 1)) if nw > size else 0
    img = img[:, y0 : y0 + size, x0 : x0 + size]
    ch, cw = img.shape[1:]
    boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, cw)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, ch)
    keep = (boxes[:, 2] - boxes[:, 0] >= 1) & (boxes[:, 3] - boxes[:, 1] >= 1)
    boxes, labels = boxes[keep], labels[keep]
    if u[3] < FLIP_P:
        img = img.flip(-1)
        boxes = torch.stack([cw - boxes[:, 2], boxes[:, 1], cw - boxes[:, 0], boxes[:, 3]], dim=1)
    return img.contiguous(), boxes, labels


def coco_eval(gt: Any, results: list[dict[str, Any]], image_ids: list[int]) -> dict[str, float | None]:
    """COCOeval (bbox) of ``results`` on ``image_ids``: mAP, AP50, AP75, AP small/medium/large
    in %. No detections at all is mAP 0; a size with no ground truth is None (COCOeval's -1)."""
    from pycocotools.cocoeval import COCOeval

    names = ("map", "map_50", "map_75", "map_s", "map_m", "map_l")
    if not results:
        return dict.fromkeys(names, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.params.imgIds = sorted(image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {n: (float(v) * 100 if v >= 0 else None) for n, v in zip(names, ev.stats[:6], strict=True)}
