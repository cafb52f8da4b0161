"""Detection training on a generated COCO-layout set: the data checks, the augmentation, COCOeval,
a few steps + evaluation through the CLI, resume after kill -9, and backbone checkpoints."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("pycocotools")

from sasa_bench import create_model  # noqa: E402
from sasa_bench.errors import SasaError  # noqa: E402
from sasa_bench.models.detection import load_backbone  # noqa: E402
from sasa_bench.spec import make_spec  # noqa: E402
from sasa_bench.train import checkpoint as ckpt  # noqa: E402
from sasa_bench.train.coco import CocoData, coco_eval, jitter_crop_flip  # noqa: E402
from sasa_bench.train.coco_synthetic import make_synthetic_coco  # noqa: E402
from sasa_bench.train.detection import check_backbone_checkpoint  # noqa: E402

TINY = ["--model", "retinanet_sasa_resnet50_attnfpn", "--depth", "26", "--width", "0.25", "--k", "3",
        "--image-size", "128", "--threads", "1"]


@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    return make_synthetic_coco(tmp_path / "coco", n_train=8, n_val=4, size=128)


def _edit(root: Path, split: str, fn) -> None:
    p = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def test_data_reads_the_layout_and_maps_categories(coco: Path) -> None:
    d = CocoData(coco, "train", 128, 90, augment=False)
    assert len(d) == 8 and d.skipped_boxes == 0
    img, target, image_id = d.get(0)
    assert img.shape[0] == 3 and 0 <= img.min() and img.max() <= 1
    ann = [a for a in d.coco.dataset["annotations"] if a["image_id"] == image_id]
    x, y, w, h = ann[0]["bbox"]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h]
    assert d.category_id(int(target["labels"][0])) == ann[0]["category_id"]


def test_bad_annotations_are_one_line_or_skipped(coco: Path) -> None:
    _edit(coco, "train", lambda d: d["annotations"].extend([
        {"id": 900, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 10], "iscrowd": 0},  # no width
        {"id": 901, "image_id": 1, "category_id": 2, "bbox": [5, 5, 10, -3], "iscrowd": 0},  # negative height
    ]))
    d = CocoData(coco, "train", 128, 90, augment=False)
    assert d.skipped_boxes == 2
    _edit(coco, "train", lambda d: d["annotations"].append({"id": 902, "image_id": 424242, "category_id": 1, "bbox": [1, 1, 2, 2]}))
    with pytest.raises(SasaError, match="image id.*424242"):
        CocoData(coco, "train", 128, 90, augment=False)
    (coco / "annotations" / "instances_val2017.json").unlink()
    with pytest.raises(SasaError, match="no COCO annotation file"):
        CocoData(coco, "val", 128, 90, augment=False)


def test_missing_image_file_and_too_many_categories(coco: Path) -> None:
    with pytest.raises(SasaError, match="3 categories but the model has 2"):
        CocoData(coco, "val", 128, 2, augment=False)
    next((coco / "val2017").iterdir()).unlink()
    with pytest.raises(SasaError, match="not in"):
        CocoData(coco, "val", 128, 90, augment=False)


def test_jitter_crop_flip_keeps_boxes_on_their_pixels() -> None:
    img = torch.zeros(3, 100, 160)
    img[:, 20:50, 30:90] = 1.0  # one white box
    boxes, labels = torch.tensor([[30.0, 20.0, 90.0, 50.0]]), torch.tensor([1])
    for seed in range(20):
        out, b, lab = jitter_crop_flip(img, boxes, labels, 128, torch.Generator().manual_seed(seed))
        assert out.shape[1] <= 128 and out.shape[2] <= 128
        if len(b):
            x1, y1, x2, y2 = b[0].round().int().tolist()
            inside = out[0, y1 + 2 : y2 - 2, x1 + 2 : x2 - 2]
            assert inside.numel() == 0 or inside.min() > 0.9  # the box still covers the white pixels
            assert out[0].sum() <= (x2 - x1 + 2) * (y2 - y1 + 2) + 1
        a = jitter_crop_flip(img, boxes, labels, 128, torch.Generator().manual_seed(seed))
        assert torch.equal(a[0], out) and torch.equal(a[1], b)  # a function of the seed alone


def test_coco_eval_perfect_and_empty(coco: Path) -> None:
    d = CocoData(coco, "val", 128, 90, augment=False)
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in d.coco.dataset["annotations"]]
    m = coco_eval(d.coco, perfect, d.image_ids)
    assert m["map"] == pytest.approx(100.0) and m["map_50"] == pytest.approx(100.0)
    assert coco_eval(d.coco, [], d.image_ids)["map"] == 0.0


def test_backbone_checkpoint_loads_a_classifier(tmp_path: Path) -> None:
    clf_spec = make_spec("sasa_resnet26", width=0.25, kernel_size=3, num_classes=10, image_size=64)
    clf = create_model(clf_spec)
    ckpt.save(tmp_path / "clf.pt", {"model": clf.state_dict(), "spec": clf_spec.to_dict()})
    det_spec = make_spec("retinanet_sasa_resnet50_attnfpn", depth=26, width=0.25, kernel_size=3, image_size=128)
    det = create_model(det_spec)
    missing, unexpected = load_backbone(det, check_backbone_checkpoint(tmp_path / "clf.pt", det_spec))
    assert not missing and not unexpected
    assert torch.equal(det.backbone.body.layer3[1].conv2.query.weight, clf.layer3[1].conv2.query.weight)
    with pytest.raises(SasaError, match="differs in: kernel_size"):
        check_backbone_checkpoint(tmp_path / "clf.pt", det_spec.replace(kernel_size=5))


# --------------------------------------------------------------------------- runs (slow)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _train(*args: str, nproc: int = 1) -> dict:
    launch = [sys.executable, "-m", "sasa_bench"]
    if nproc > 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                  "--master-port", str(port), "-m", "sasa_bench"]
    cmd = [*launch, "train", "--task", "detection", "--data", "coco", *TINY, *args, "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout[p.stdout.index("{"):])


@pytest.mark.slow
def test_few_steps_and_coco_eval_give_finite_map(coco: Path, tmp_path: Path) -> None:
    s = _train("--recipe", "short", "--data-dir", str(coco), "--batch-size", "2", "--max-steps", "2", "--out", str(tmp_path / "run"))
    assert s["steps"] == 2 and s["stopped_early"] and s["eval_images"] == 4
    for k in ("map", "map_50", "map_75"):
        assert math.isfinite(s[k]) and 0 <= s[k] <= 100
    assert (tmp_path / "run" / "checkpoint.pt").is_file()
    header = next(csv.reader((tmp_path / "run" / "metrics.csv").open()))
    assert {"map", "map_50", "map_75", "map_s", "map_m", "map_l"} <= set(header)


@pytest.mark.slow
def test_resume_after_kill_equals_an_uninterrupted_run(coco: Path, tmp_path: Path) -> None:
    args = ["--recipe", "short", "--data-dir", str(coco), "--batch-size", "2", "--epochs", "1",
            "--checkpoint-every", "1", "--deterministic", "--augment"]
    full = _train(*args, "--out", str(tmp_path / "full"))
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "sasa_bench", "train", "--task", "detection", "--data", "coco", *TINY, *args, "-q", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    ck = out / "checkpoint.pt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ck.exists() and torch.load(ck, weights_only=True)["position"]["global_step"] >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(ck, weights_only=True)["position"]["global_step"]
    assert 0 < step < 4
    resumed = _train(*args, "--out", str(out), "--resume", "auto")
    assert resumed["resumed"] and resumed["steps"] == full["steps"] == 4
    assert resumed["weights_sha256"] == full["weights_sha256"]
    assert resumed["map"] == full["map"]


@pytest.mark.slow
def test_two_process_ddp_run_stays_in_sync(coco: Path, tmp_path: Path) -> None:
    s = _train("--recipe", "short", "--data-dir", str(coco), "--batch-size", "4", "--max-steps", "2",
               "--out", str(tmp_path / "ddp"), nproc=2)
    assert s["world_size"] == 2 and s["ranks_in_sync"]  # weights and BN statistics equal on both ranks
    assert s["eval_images"] == 4 and math.isfinite(s["map"])  # the sharded eval saw every image once
