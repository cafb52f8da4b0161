"""Shared tiny settings for the training tests (not a test module)."""

from __future__ import annotations

from typing import Any

from sasa_bench.spec import make_spec
from sasa_bench.train import resolve_config

TINY_MODEL = {"width": 0.125, "image_size": 32, "num_classes": 10}
TINY_FLAGS = ["--threads", "1", "--model", "resnet26", "--width", "0.125", "--image-size", "32", "--num-classes", "10"]


def tiny_spec(name: str = "resnet26"):
    return make_spec(name, **TINY_MODEL)


def tiny_cfg(**over: Any):
    base = dict(
        data="synthetic", synthetic_train=128, synthetic_eval=64, batch_size=16, epochs=2, lr=0.05,
        warmup_epochs=0.25, precision="fp32", eval_batch_size=64, deterministic=True, ema_decay=0.0, threads=1,
        grad_clip=0.0,  # explicit: these tests must not depend on the short recipe's clipping choice
    )
    base.update(over)
    return resolve_config("short", None, base)
