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

# Fast backends (registered after ``reference``; ``auto`` takes the first available per device).
from sasa_bench.kernels import cpu_fused as _cpu_fused  # noqa: E402
from sasa_bench.kernels import shift as _shift  # noqa: E402

register_backend(
    Backend(
        name="cpu_fused",
        fn=_cpu_fused.local_attention_cpu_fused,
        devices=("cpu",),
        is_available=_cpu_fused.is_available,
        description="C++/OpenMP SIMD kernel (AVX-512/AVX2/portable), built on first use and cached (needs a C++ compiler)",
        warm_up=_cpu_fused.warm_up,
    ),
    auto_rank={"cpu": 0},
)
register_backend(
    Backend(
        name="shift",
        fn=_shift.local_attention_shift,
        devices=("cpu", "cuda"),
        is_available=lambda: True,
        description="K*K shifted views in plain PyTorch, memory-lean custom backward (portable)",
    ),
    auto_rank={"cpu": 1, "cuda": 1},
)

from sasa_bench.kernels import triton_fused as _triton_fused  # noqa: E402

register_backend(
    Backend(
        name="triton",
        fn=_triton_fused.local_attention_triton,
        devices=("cuda",),
        is_available=_triton_fused.is_available,
        description="fused Triton kernel: online softmax over the window, recomputing backward (GPU)",
    ),
    auto_rank={"cuda": 0},
)

from sasa_bench.kernels import flex as _flex  # noqa: E402

register_backend(
    Backend(
        name="flex",
        fn=_flex.local_attention_flex,
        devices=("cuda",),  # flex has no CPU backward; its CPU forward is tested directly
        is_available=_flex.is_available,
        description="torch.nn.attention.flex_attention with a k x k block mask over tiled tokens (GPU)",
    ),
    auto_rank={"cuda": 1},
)
