"""sasa-bench: exact, fast Stand-Alone Self-Attention (Ramachandran et al. 2019) to build,
count, time, train and ablate."""

from sasa_bench.errors import SasaError
from sasa_bench.kernels import available_backends
from sasa_bench.layers.attention import LocalSelfAttention2d
from sasa_bench.models import create_model
from sasa_bench.spec import PRESETS, ModelSpec, make_spec

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "LocalSelfAttention2d",
    "ModelSpec",
    "SasaError",
    "available_backends",
    "create_model",
    "make_spec",
]
