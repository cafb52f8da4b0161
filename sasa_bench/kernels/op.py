"""The single entry point the layer calls: dispatch to a backend, or count FLOPs.

FLOP counting must not depend on which backend runs the model, and both counters we use (fvcore,
which traces with ``torch.jit.trace``, and ``torch.utils.flop_counter.FlopCounterMode``) must see
the same thing. So while :func:`counting_flops` is active the layer calls one opaque custom op,
``sasa::local_attention``, whose cost is given by :func:`attention_macs` to both counters;
otherwise it calls the chosen backend. The same op is the fused backends' entry point
(``cpu_fused`` on the CPU, ``triton`` on CUDA): a real ``torch.library`` op with a fake
(meta) kernel and a registered autograd formula, so ``torch.compile`` keeps it in one graph.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from sasa_bench.kernels.registry import all_backends, resolve_backend

_state = threading.local()


@contextlib.contextmanager
def counting_flops() -> Iterator[None]:
    """Route attention through the countable custom op (forward only, reference math)."""
    prev = getattr(_state, "counting", False)
    _state.counting = True
    try:
        yield
    finally:
        _state.counting = prev


def is_counting() -> bool:
    if torch.compiler.is_compiling():  # compiled code never counts (and a thread-local would break the graph)
        return False
    return getattr(_state, "counting", False)


def attention_macs(
    q_shape: tuple[int, ...], has_k: bool, v_shape: tuple[int, ...], has_rel: bool, kernel_size: int
) -> int:
    """Multiply-adds of the attention core, the paper's way (projections are counted as convs).

    Per pixel, per head: K*K dot products of D for q.k, K*K of D for q.r (the paper's
    r_{a-i,b-j} is one D-vector per window position), and K*K*Dv for the weighted sum of
    values. Softmax and masking are not counted (neither counter counts elementwise ops).
    Border positions count like any other: the nominal cost does not depend on ``border``.
    """
    b, n, d, h, w = q_shape
    dv = v_shape[2]
    kk = kernel_size * kernel_size
    per_pixel = kk * (d * int(has_k) + d * int(has_rel) + dv)
    return b * n * h * w * per_pixel


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    """The kernels compute in fp32 (fp64 for fp64 inputs); bf16/fp16 inputs are cast up."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _cast(dtype: torch.dtype, *ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.to(dtype) for t in ts]


def _empty_if_none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return like.new_empty(0) if t is None else t


# ---- the fused op: sasa::local_attention -> (out, lse), sasa::local_attention_backward -------
#
# One op for every fused kernel: its CPU kernel is the C++ operator (cpu_fused), its CUDA kernel
# the Triton one; the default kernel (any device, and whenever the fused one is unavailable) is
# the portable shift math, so the op always computes the same operator. torch.compile sees it as
# one opaque node (register_fake gives the shapes), autograd through register_autograd, the FLOP
# counters through the formula below / the fvcore handle in measure/flops.py.


@torch.library.custom_op("sasa::local_attention", mutates_args=())
def local_attention_op(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused local attention: (out [B,N,Dv,H,W] in v's dtype, lse [B,N,H,W] in the compute dtype)."""
    return fallback_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border)


def fallback_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """The op's portable kernel (shift math, no autograd needed): (out, lse)."""
    from sasa_bench.kernels.shift import shift_forward

    dt = _compute_dtype(q)
    out, _, lse, _, _ = shift_forward(*_cast(dt, q, k, v, rel_row, rel_col), kernel_size, mask_border)
    return out.to(v.dtype).contiguous(), lse.to(dt).contiguous()


def fallback_backward(grad, q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """The backward op's portable kernel: recompute the shift forward, then its backward."""
    from sasa_bench.kernels.shift import shift_backward, shift_forward

    dt = _compute_dtype(q)
    qc, kc, vc, rr, rc = _cast(dt, q, k, v, rel_row, rel_col)
    _, probs, _, kp, vp = shift_forward(qc, kc, vc, rr, rc, kernel_size, mask_border)
    grads = shift_backward(grad.to(dt), qc, kp, vp, rr, rc, probs, kernel_size)
    return backward_outputs(grads, q, k, v, rel_row, rel_col)


@local_attention_op.register_fake
def _(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN202
    b, n, _, h, w = q.shape
    return q.new_empty(b, n, v.shape[2], h, w, dtype=v.dtype), q.new_empty(b, n, h, w, dtype=_compute_dtype(q))


@torch.library.custom_op("sasa::local_attention_backward", mutates_args=())
def local_attention_backward_op(
    grad: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    kernel_size: int,
    mask_border: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, d_rel_row, d_rel_col), each in its input's dtype; empty for absent inputs."""
    return fallback_backward(grad, q, k, v, rel_row, rel_col, kernel_size, mask_border)


def backward_outputs(grads, q, k, v, rel_row, rel_col):  # noqa: ANN001, ANN201
    """The backward op's 5 outputs from (dq, dk, dv, drr, drc): input dtypes, contiguous (what
    the fake kernel promises, whatever the inputs' strides), empty for None."""
    like = (q, k, v, rel_row, rel_col)
    return tuple(
        q.new_empty(0) if src is None else g.to(src.dtype).contiguous() for g, src in zip(grads, like, strict=True)
    )


@local_attention_backward_op.register_fake
def _(grad, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border):  # noqa: ANN001, ANN202
    return tuple(t.new_empty(t.shape) if t is not None else q.new_empty(0) for t in (q, k, v, rel_row, rel_col))


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    q, k, v, rel_row, rel_col, kernel_size, mask_border = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rel_row, rel_col, out, lse)
    ctx.meta = (kernel_size, mask_border)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, _grad_lse):  # noqa: ANN001, ANN202
    q, k, v, rel_row, rel_col, out, lse = ctx.saved_tensors
    kernel_size, mask_border = ctx.meta
    grads = torch.ops.sasa.local_attention_backward(
        grad_out, q, k, v, rel_row, rel_col, out, lse, kernel_size, mask_border
    )
    present = (q, k, v, rel_row, rel_col)
    return (*(g if t is not None else None for g, t in zip(grads, present, strict=True)), None, None)


local_attention_op.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formula() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.sasa.local_attention)
    def _flops(q, k, v, rel_row, rel_col, kernel_size, mask_border, *args, out_shape=None, **kw):  # noqa: ANN001, ANN202
        # FlopCounterMode counts 2 FLOPs per multiply-add.
        return 2 * attention_macs(q, k is not None, v, rel_row is not None, kernel_size)

    @register_flop_formula(torch.ops.sasa.local_attention_backward)
    def _bwd_flops(grad, q, k, v, rel_row, rel_col, *args, out_shape=None, **kw):  # noqa: ANN001, ANN202
        # backward: the logits again, dP = g.v, dq, dk, dv and the embeddings' sums (~2.5x)
        return 5 * attention_macs(q, k is not None, v, rel_row is not None, args[2])


_register_flop_formula()


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """Run local self-attention with the named backend (see ``reference.py`` for the math)."""
    if is_counting():
        if rel_row is None or rel_col is None:
            rel_row = rel_col = None
        return torch.ops.sasa.local_attention(q, k, v, rel_row, rel_col, kernel_size, mask_border)[0]
    fn = all_backends()[_resolved_name(backend, q.device.type)].fn
    return fn(q, k, v, rel_row, rel_col, kernel_size, mask_border)


@torch._dynamo.assume_constant_result
def _resolved_name(backend: str, device_type: str) -> str:
    """The backend that runs; a constant to torch.compile (resolved at trace time, no graph break)."""
    return resolve_backend(backend, device_type).name
