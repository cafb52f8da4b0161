"""create_model: a preset name (or a ModelSpec) plus overrides -> an nn.Module, like timm's."""

from __future__ import annotations

from typing import Any

from torch import nn

from sasa_bench.models.resnet import ResNet
from sasa_bench.spec import ModelSpec, make_spec


def build_model(spec: ModelSpec) -> nn.Module:
    """The network a spec describes: a ResNet variant, or a RetinaNet on one (``spec.detector``)."""
    if spec.detector == "retinanet":
        from sasa_bench.models.detection import SasaRetinaNet

        return SasaRetinaNet(spec)
    return ResNet(spec)


def create_model(name: str | ModelSpec | None = None, **overrides: Any) -> nn.Module:
    """Build a preset (``resnet50``, ``sasa_resnet50_convstem``, ``sasa_resnet50``, ...).

    Overrides are ModelSpec fields (``kernel_size=9``, ``attention_groups="3,4"``, ...).
    """
    if isinstance(name, ModelSpec):
        spec = name.replace(**overrides) if overrides else name
    else:
        spec = make_spec(name, **overrides)
    return build_model(spec)
