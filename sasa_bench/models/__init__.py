"""Model builders: the ResNet family (conv, conv-stem + attention, full attention)."""

from sasa_bench.models.factory import build_model, create_model, list_models
from sasa_bench.models.resnet import ResNet

__all__ = ["ResNet", "build_model", "create_model", "list_models"]
