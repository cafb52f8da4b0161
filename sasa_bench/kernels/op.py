"""The single entry point the layer calls: dispatch to a backend, or count FLOPs.

FLOP counting must not depend on which backend runs the model, and both counters we use (fvcore,
which traces with ``torch.jit.trace``, and ``torch.utils.flop_counter.FlopCounterMode``) must see
the same thing. So while :func:`counting_flops` is active the layer calls one opaque custom op,
``sasa::local_attention``, whose cost is given by :func:`attention_macs` to both counters;
otherwise it calls the chosen backend directly (with its own autograd).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from sasa_bench.kernels.reference import local_attention_reference
from sasa_bench.kernels.registry import resolve_backend

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


@torch.library.custom_op("sasa::local_attention", mutates_args=())
def _counted_op(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool,
) -> torch.Tensor:
    return local_attention_reference(q, k, v, rel_row, rel_col, kernel_size, mask_border)


@_counted_op.register_fake
def _(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN202
    b, n, _, h, w = q.shape
    return q.new_empty(b, n, v.shape[2], h, w)


def _register_flop_formula() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.sasa.local_attention)
    def _flops(q, k, v, rel_row, rel_col, kernel_size, mask_border, *args, out_shape=None, **kw):  # noqa: ANN001, ANN202
        # FlopCounterMode counts 2 FLOPs per multiply-add.
        return 2 * attention_macs(q, k is not None, v, rel_row is not None, kernel_size)


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
        return torch.ops.sasa.local_attention(q, k, v, rel_row, rel_col, kernel_size, mask_border)
    fn = resolve_backend(backend, q.device.type).fn
    return fn(q, k, v, rel_row, rel_col, kernel_size, mask_border)
