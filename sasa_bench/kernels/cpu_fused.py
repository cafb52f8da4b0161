"""``cpu_fused``: the C++ (OpenMP, SIMD) local-attention kernel as the CPU kernel of ``sasa::local_attention``.

The sources are ``sasa_bench/csrc/attention.cpp`` (+ the shared ``simd.h``), built on first use
for this host's ISA and cached (:mod:`sasa_bench.kernels.cpp_build`; ``SASA_BENCH_CPU_ISA``
selects another). ``is_available`` is a cheap probe (a compiler on PATH); the build happens on
the first call (or ``warm_up()``), ~1 min on a 2-core machine, once per source/ISA/torch
version. If it fails, one warning is printed, ``shift`` runs instead, and the backend reports
itself unavailable from then on, so ``auto`` picks ``shift``.

Forward returns the output and one log-sum-exp per pixel; backward recomputes the softmax from
q, k and the lse. No K*K-fold copy of keys or values, and no K*K-sized tensor, is ever stored.
Inputs in bf16/fp16 are computed in fp32 (outputs and gradients are cast back); float64 runs in
float64.
"""

from __future__ import annotations

import torch

from sasa_bench.kernels import cpp_build
from sasa_bench.kernels.op import (
    _cast,
    _compute_dtype,
    _empty_if_none,
    backward_outputs,
    fallback_backward,
    fallback_forward,
    local_attention_op,
)

FALLBACK = "backend 'shift'"


def is_available() -> bool:
    """Cheap probe (no build): a C++ compiler is on PATH and no build has failed."""
    return cpp_build.extension().is_available()


def warm_up() -> float | None:
    """Build or load the operator now; returns the seconds it took (None if unavailable)."""
    ext = cpp_build.extension()
    return ext.build_seconds if ext.load(FALLBACK) is not None else None


@torch._dynamo.assume_constant_result
def kernel_ready() -> bool:
    """Built (or buildable now); a constant to torch.compile."""
    return cpp_build.load(fallback=FALLBACK) is not None


def kernel_isa() -> str | None:
    """The ISA the loaded kernel was compiled for (None if not loaded)."""
    ext = cpp_build.extension()
    return ext.module.isa() if ext.module is not None else None


def forward(module, q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """(out, lse) from one built extension ``module`` (any ISA variant): the op's CPU kernel."""
    dt = _compute_dtype(q)
    qc, kc, vc, rr, rc = _cast(dt, q, k, v, rel_row, rel_col)
    has_k, has_rel = kc is not None, rr is not None
    empty = qc.new_empty(0)
    out, lse = module.attention_forward(
        qc, _empty_if_none(kc, empty), vc, rr.contiguous() if has_rel else empty,
        rc.contiguous() if has_rel else empty, kernel_size, has_k, has_rel, mask_border,
    )  # fmt: skip
    return out.to(v.dtype), lse


def backward(module, grad, q, k, v, rel_row, rel_col, lse, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """(dq, dk, dv, drr, drc) in the inputs' dtypes (None for absent inputs)."""
    dt = _compute_dtype(q)
    qc, kc, vc, rr, rc = _cast(dt, q, k, v, rel_row, rel_col)
    has_k, has_rel = kc is not None, rr is not None
    empty = qc.new_empty(0)
    dq, dk, dv, drel = module.attention_backward(
        grad.to(dt).contiguous(), qc, _empty_if_none(kc, empty), vc,
        rr.contiguous() if has_rel else empty, rc.contiguous() if has_rel else empty,
        lse.to(dt), kernel_size, has_k, has_rel, mask_border,
    )  # fmt: skip
    d_rr = d_rc = None
    if has_rel:  # drel [K, D]: the row embedding's gradient, then the column one's
        d_rr, d_rc = drel[:, : rr.shape[1]].clone(), drel[:, rr.shape[1] :].clone()  # no aliasing
    return dq, (dk if has_k else None), dv, d_rr, d_rc


@local_attention_op.register_kernel("cpu")
def _cpu_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN202
    module = cpp_build.load(fallback=FALLBACK)
    if module is None:  # the op's portable default kernel
        return fallback_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border)
    return forward(module, q, k, v, rel_row, rel_col, kernel_size, mask_border)


@torch.library.register_kernel("sasa::local_attention_backward", "cpu")
def _cpu_backward(grad, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border):  # noqa: ANN001, ANN202
    module = cpp_build.load(fallback=FALLBACK)
    if module is None:
        return fallback_backward(grad, q, k, v, rel_row, rel_col, kernel_size, mask_border)
    grads = backward(module, grad, q, k, v, rel_row, rel_col, lse, kernel_size, mask_border)
    return backward_outputs(grads, q, k, v, rel_row, rel_col)


def local_attention_cpu_fused(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool = True,
) -> torch.Tensor:
    """Same operator as :func:`~sasa_bench.kernels.reference.local_attention_reference`."""
    if not kernel_ready():  # build failed: warned once; stay exact with the portable path
        from sasa_bench.kernels.shift import local_attention_shift

        return local_attention_shift(q, k, v, rel_row, rel_col, kernel_size, mask_border)
    return torch.ops.sasa.local_attention(q, k, v, rel_row, rel_col, kernel_size, mask_border)[0]
