"""sasa-bench: exact, fast Stand-Alone Self-Attention (Ramachandran et al. 2019) to build,
count, time, train and ablate."""

from sasa_bench.errors import SasaError
from sasa_bench.kernels import available_backends
from sasa_bench.layers.attention import LocalSelfAttention2d
from sasa_bench.models import create_model, list_models
from sasa_bench.models.timm_models import install_timm_hook
from sasa_bench.spec import PRESETS, ModelSpec, make_spec

__version__ = "0.1.0"

# Our attention presets in timm's registry, as soon as timm is imported (never imports it itself).
install_timm_hook()

__all__ = [
    "PRESETS",
    "LocalSelfAttention2d",
    "ModelSpec",
    "SasaError",
    "available_backends",
    "create_model",
    "list_models",
    "make_spec",
]
