"""create_model: a preset name (or a ModelSpec) plus overrides -> an nn.Module, like timm's."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Any

from torch import nn

from sasa_bench.models.resnet import ResNet
from sasa_bench.spec import PRESETS, ModelSpec, make_spec


def build_model(spec: ModelSpec) -> nn.Module:
    """The network a spec describes: a ResNet variant, a RetinaNet on one (``spec.detector``),
    or timm's model for a ``timm:NAME`` spec (``spec.timm``)."""
    if spec.timm:
        from sasa_bench.models.timm_models import create_timm_model

        return create_timm_model(spec.timm, spec.num_classes, spec.image_size)
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


def list_models(filter: str | Iterable[str] = "", exclude_filters: str | Iterable[str] = ()) -> list[str]:
    """Our preset names matching shell-style patterns, sorted, like ``timm.list_models``:
    ``list_models("sasa_*")``, ``list_models(["*50*", "*26*"], exclude_filters="retinanet*")``."""
    include = [filter] if isinstance(filter, str) else list(filter)
    exclude = [exclude_filters] if isinstance(exclude_filters, str) else list(exclude_filters)
    names = [n for n in PRESETS if not any(include) or any(fnmatch.fnmatch(n, p) for p in include if p)]
    return sorted(n for n in names if not any(fnmatch.fnmatch(n, p) for p in exclude))
