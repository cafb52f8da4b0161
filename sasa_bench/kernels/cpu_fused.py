"""``cpu_fused``: a C++ (OpenMP, vectorised) local-attention operator for the CPU.

The operator is compiled on first use with :func:`torch.utils.cpp_extension.load_inline` and
cached in torch's extension directory (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``), so later processes only load it. The cache key includes the
source, the flags and this CPU's instruction-set flags (the build uses ``-march=native``).
``is_available`` is a cheap probe (a compiler on PATH); the build happens on the first call (or
``warm_up()``), taking ~20-60 s on a 2-core machine, once per source/CPU/torch version. If it
fails, one one-line warning is printed, that call runs the portable ``shift`` backend, and the
backend reports itself unavailable from then on, so ``auto`` picks ``shift``.

Forward saves the (padded) q, k, v and one log-sum-exp per pixel; backward recomputes the
softmax from them. No K*K-fold copy of keys or values, and no K*K-sized tensor, is ever stored.
See :mod:`sasa_bench.kernels._cpu_source` for the loop structure. Inputs in bf16/fp16 are
computed in fp32 (outputs and gradients are cast back); float64 runs in float64.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sasa_bench.kernels._cpu_source import CPP_DECLS, CPP_SOURCE
from sasa_bench.kernels.cpp_build import InlineExtension

EXTENSION = InlineExtension(
    "sasa_cpu_fused", CPP_DECLS, CPP_SOURCE, ["sasa_forward", "sasa_backward"], fallback="backend 'shift'"
)


def _load() -> ModuleType | None:
    return EXTENSION.load()


def is_available() -> bool:
    """Cheap probe (no build): a C++ compiler is on PATH and no build has failed."""
    return EXTENSION.is_available()


def warm_up() -> float | None:
    """Build or load the operator now; returns the seconds it took (None if unavailable)."""
    return EXTENSION.build_seconds if EXTENSION.load() is not None else None


def _packed(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if every dim after the batch is packed (the kernel reads batch-strided
    slices, such as q of a fused q/k/v projection, in place), else a contiguous copy."""
    expect = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:]), strict=True):
        if size != 1 and stride != expect:
            return t.contiguous()
        expect *= size
    return t if t.shape[0] == 1 or t.stride(0) >= expect else t.contiguous()


class _LocalAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN205
        ext = _load()
        has_k, has_rel = k is not None, rel_row is not None and rel_col is not None
        dtype = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
        empty = q.new_empty(0, dtype=dtype)
        qc, vc = _packed(q.to(dtype)), _packed(v.to(dtype))
        kc = _packed(k.to(dtype)) if has_k else empty
        rr = rel_row.to(dtype).contiguous() if has_rel else empty
        rc = rel_col.to(dtype).contiguous() if has_rel else empty
        out, lse, qp, kp, vp = ext.sasa_forward(qc, kc, vc, rr, rc, kernel_size, has_k, has_rel, mask_border)
        ctx.save_for_backward(qp, kp, vp, rr, rc, lse)
        ctx.meta = (kernel_size, has_k, has_rel, mask_border, q.shape[-1])
        ctx.dtypes = (
            q.dtype,
            k.dtype if has_k else None,
            v.dtype,
            rel_row.dtype if has_rel else None,
            rel_col.dtype if has_rel else None,
        )
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        qp, kp, vp, rr, rc, lse = ctx.saved_tensors
        kernel_size, has_k, has_rel, mask_border, _ = ctx.meta
        q_dt, k_dt, v_dt, rr_dt, rc_dt = ctx.dtypes
        g = grad.to(qp.dtype).contiguous()
        dq, dk, dv, drel = _load().sasa_backward(
            g, qp, kp, vp, rr, rc, lse, kernel_size, has_k, has_rel, mask_border
        )
        d_rr = d_rc = None
        if has_rel:  # drel [K, D]: the row embedding's gradient, then the column one's
            dr = rr.shape[1]
            d_rr, d_rc = drel[:, :dr].to(rr_dt), drel[:, dr:].to(rc_dt)
        return (
            dq.to(q_dt),
            dk.to(k_dt) if has_k else None,
            dv.to(v_dt),
            d_rr,
            d_rc,
            None,
            None,
        )


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
    if _load() is None:  # build failed: warned once in _load; stay exact with the portable path
        from sasa_bench.kernels.shift import local_attention_shift

        return local_attention_shift(q, k, v, rel_row, rel_col, kernel_size, mask_border)
    return _LocalAttentionCPU.apply(q, k, v, rel_row, rel_col, kernel_size, mask_border)
