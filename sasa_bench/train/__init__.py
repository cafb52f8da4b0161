"""Training: data, recipes, the loop, checkpoints, torchrun support.

The API the study runner uses::

    from sasa_bench.train import resolve_config, run_training, spec_for
    cfg = resolve_config("short", None, {"epochs": 2})
    summary = run_training(spec_for(cfg, "sasa_resnet26"), cfg, Path("runs/x"))
"""

from sasa_bench.train.loop import NonFiniteLoss, run_training
from sasa_bench.train.recipes import RECIPES, TrainConfig, resolve_config, spec_for

__all__ = ["RECIPES", "NonFiniteLoss", "TrainConfig", "resolve_config", "run_training", "spec_for"]
