"""Attention backends: the reference math and the fast kernels, behind one registry."""

from sasa_bench.kernels.op import counting_flops, local_attention
from sasa_bench.kernels.reference import local_attention_reference
from sasa_bench.kernels.registry import (
    Backend,
    available_backends,
    check_backend_name,
    register_backend,
    resolve_backend,
)

register_backend(
    Backend(
        name="reference",
        fn=local_attention_reference,
        devices=("cpu", "cuda"),
        is_available=lambda: True,
        description="readable window-copy math; the ground truth for every other backend",
    )
)

__all__ = [
    "Backend",
    "available_backends",
    "check_backend_name",
    "counting_flops",
    "local_attention",
    "local_attention_reference",
    "register_backend",
    "resolve_backend",
]
