"""A tiny generated COCO-layout set (synthetic shapes with boxes): the whole detection path
(data checks, training, COCOeval) without COCO. Used by the tests and the short recipe.

Each image holds 1-3 filled shapes on a dim noisy background: squares (category 1, "square"),
discs (category 2, "disc") and horizontal bars (category 3, "bar"), each in its own colour; the
box is the shape's extent. COCO's layout: ROOT/{train2017,val2017}/*.png and
ROOT/annotations/instances_{train,val}2017.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CATEGORIES = [{"id": 1, "name": "square"}, {"id": 2, "name": "disc"}, {"id": 3, "name": "bar"}]
_COLOURS = {1: (0.9, 0.2, 0.2), 2: (0.2, 0.9, 0.2), 3: (0.2, 0.3, 0.95)}


def _draw(img: torch.Tensor, cat: int, x: int, y: int, w: int, h: int) -> None:
    colour = torch.tensor(_COLOURS[cat]).view(3, 1, 1)
    if cat == 2:
        yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        inside = ((xx + 0.5 - w / 2) / (w / 2)) ** 2 + ((yy + 0.5 - h / 2) / (h / 2)) ** 2 <= 1
        region = img[:, y : y + h, x : x + w]
        img[:, y : y + h, x : x + w] = torch.where(inside, colour, region)
    else:
        img[:, y : y + h, x : x + w] = colour


def make_synthetic_coco(root: Path, n_train: int = 16, n_val: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write the set under ``root``; returns ``root``."""
    from PIL import Image

    root = Path(root)
    g = torch.Generator().manual_seed(seed)
    ann_id = 1
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n, first_id in (("train2017", n_train, 1), ("val2017", n_val, 10_001)):
        (root / split).mkdir(exist_ok=True)
        images, anns = [], []
        for j in range(n):
            image_id = first_id + j
            h = size - int(torch.randint(0, size // 4, (1,), generator=g)) // 8 * 8  # a few non-square images
            w = size
            img = 0.1 + 0.05 * torch.rand(3, h, w, generator=g)
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                cat = int(torch.randint(1, 4, (1,), generator=g))
                bw = int(torch.randint(size // 6, size // 2, (1,), generator=g))
                bh = bw if cat != 3 else max(4, bw // 3)
                x = int(torch.randint(0, w - bw, (1,), generator=g))
                y = int(torch.randint(0, h - bh, (1,), generator=g))
                _draw(img, cat, x, y, bw, bh)
                anns.append({"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": [x, y, bw, bh],
                             "area": bw * bh, "iscrowd": 0})
                ann_id += 1
            name = f"{image_id:012d}.png"
            pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(root / split / name)
            images.append({"id": image_id, "file_name": name, "width": w, "height": h})
        data = {"images": images, "annotations": anns, "categories": CATEGORIES}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(data))
    return root
