"""A fused C++ kernel for the attention stem's block attention (CPU), with a hand-written backward.

One pass per 4x4 block of the image, everything in thread-local scratch (no full-resolution
intermediate but the output): gather the block's pixels x [C_in, 16], project them to the
spatially aware values with per-position weights (unless the values come from a precomputed
map), then per head logits ``q_p . (k_j + R[p, j])``, a 16-way softmax and the weighted sum of
values, written straight into ``y [B, C, H, W]`` -- or, at inference, through the eval-mode BN
affine and the 4x4 max-pool into ``[B, C, H/4, W/4]`` (the blocks are the pool's windows).
The forward never forms q or k: with C_in = 3 input channels, ``q_p . k_j = x_p^T (W_Q^T W_K) x_j``
and ``q_p . R[p, j] = x_p . (W_Q^T R[p, j])``, so a logit costs 2 C_in multiply-adds instead of
2 D (the algebra is exact; the rounding differs from the direct form by ~1e-7 relative). Every inner loop runs along
the 16 query positions of the block (simd.h's wvec: 1, 2 or 4 registers by ISA), the softmax included (a
vectorisable Cephes-style ``expf``, ~1 ulp; fp64 uses ``std::exp``).
Backward recomputes the block (cheap: 16x16 per head) and writes ``dx`` (and ``dv`` for a value
map); the weight and relative-table gradients are reduced over per-thread accumulators.

The C++ is ``sasa_bench/csrc/stem.cpp`` (on the shared ``simd.h``), built with the attention
kernel by :mod:`sasa_bench.kernels.cpp_build`. It is exposed as ``torch.library`` ops
(``sasa::stem_attention`` with a fake kernel and registered autograd, ``sasa::stem_attention_pooled``
for inference), so ``torch.compile`` keeps the stem in one graph. If no compiler is found or the
build fails, one warning is printed and ``is_available()`` returns False from then on; callers
then use their pure-PyTorch path.
"""

from __future__ import annotations

from types import ModuleType

import torch

from sasa_bench.kernels import cpp_build

FALLBACK = "the PyTorch attention-stem path"


def _load() -> ModuleType | None:
    return cpp_build.load(fallback=FALLBACK)


def is_available() -> bool:
    """True if the kernel is built or (cheap probe, no build) a compiler is on PATH and no build failed."""
    return cpp_build.extension().is_available()


@torch._dynamo.assume_constant_result
def load() -> bool:
    """Build or load the kernel now (warns once on failure); True if it is usable. A constant to
    torch.compile."""
    return _load() is not None


def _folded(wc: torch.Tensor, rc: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The forward kernel's operands from the kernel-layout weights wc [O, C_in, 16] and relative
    table rc [16 (key), D, 16 (query)]: the value rows Wv [C, C_in, 16] (empty when O = 2C),
    A [heads, C_in, C_in] = W_Q,h^T W_K,h and G [heads, 16 (key), C_in, 16 (query)] = W_Q,h^T R."""
    d = rc.shape[1]
    c = d * heads
    wq = wc[:c, :, 0]
    qk = wc[:2 * c]
    if not torch.allclose(qk, qk[:, :, :1].expand_as(qk), rtol=0, atol=0, equal_nan=True):
        raise ValueError("the stem kernel needs position-independent query and key weights")
    wq_h, wk_h = wq.view(heads, d, -1), wc[c:2 * c, :, 0].view(heads, d, -1)
    with torch.autocast(wc.device.type, enabled=False):  # in the kernel's dtype, also under autocast
        a = torch.einsum("hdc,hde->hce", wq_h, wk_h).contiguous()
        g = torch.einsum("hdc,jdp->hjcp", wq_h, rc).contiguous()
    wv = wc[2 * c:].contiguous() if wc.shape[0] == 3 * c else wc.new_empty(0)
    return wv, a, g


def _dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def _c(t: torch.Tensor | None, dtype: torch.dtype, like: torch.Tensor) -> torch.Tensor:
    """Contiguous in the kernel's dtype; an empty tensor for None."""
    return like.new_empty(0, dtype=dtype) if t is None else t.to(dtype).contiguous()


def _module() -> ModuleType:
    module = _load()
    if module is None:
        raise RuntimeError(f"the fused attention-stem kernel is unavailable: {cpp_build.extension().failed}")
    return module


def _forward(x, weight_t, rel_t, vmap, heads, bn_scale=None, bn_shift=None):  # noqa: ANN001, ANN202
    dt = _dtype(x)
    xc, wc, rc = _c(x, dt, x), _c(weight_t, dt, x), _c(rel_t, dt, x)
    sc, sh = _c(bn_scale, dt, x), _c(bn_shift, dt, x)
    y = _module().stem_forward(xc, *_folded(wc, rc, heads), _c(vmap, dt, x), heads, rc.shape[1] * heads, sc, sh)
    return y.to(x.dtype)


@torch.library.custom_op("sasa::stem_attention", mutates_args=(), device_types="cpu")
def stem_attention_op(
    x: torch.Tensor, weight_t: torch.Tensor, rel_t: torch.Tensor, vmap: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """Block attention of the stem: x [B,C_in,H,W], weight_t [O,C_in,16], rel_t [16 (key),D,16
    (query)], vmap [B,C,H,W] or None -> [B,C,H,W] in x's dtype."""
    return _forward(x, weight_t, rel_t, vmap, heads)


@stem_attention_op.register_fake
def _(x, weight_t, rel_t, vmap, heads):  # noqa: ANN001, ANN202
    b, _, h, w = x.shape
    return x.new_empty(b, rel_t.shape[1] * heads, h, w)


@torch.library.custom_op("sasa::stem_attention_backward", mutates_args=(), device_types="cpu")
def stem_attention_backward_op(
    x: torch.Tensor, weight_t: torch.Tensor, rel_t: torch.Tensor, vmap: torch.Tensor | None,
    gy: torch.Tensor, heads: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gx, g_weight_t, g_rel_t, g_vmap (empty without vmap)) in the inputs' dtypes."""
    dt = _dtype(x)
    gx, gw, gr, gv = _module().stem_backward(
        _c(x, dt, x), _c(weight_t, dt, x), _c(rel_t, dt, x), _c(vmap, dt, x), _c(gy, dt, x), heads
    )
    return gx.to(x.dtype), gw.to(weight_t.dtype), gr.to(rel_t.dtype), (gv.to(vmap.dtype) if vmap is not None else gv)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    """What the kernels return: a fresh contiguous tensor of t's shape and dtype (whatever t's strides)."""
    return t.new_empty(t.shape)


@stem_attention_backward_op.register_fake
def _(x, weight_t, rel_t, vmap, gy, heads):  # noqa: ANN001, ANN202
    gv = _contiguous_like(vmap) if vmap is not None else x.new_empty(0)
    return _contiguous_like(x), _contiguous_like(weight_t), _contiguous_like(rel_t), gv


def _setup_context(ctx, inputs, output) -> None:  # noqa: ANN001
    x, weight_t, rel_t, vmap, heads = inputs
    ctx.save_for_backward(x, weight_t, rel_t, vmap)
    ctx.heads = heads


def _backward(ctx, gy):  # noqa: ANN001, ANN202
    x, weight_t, rel_t, vmap = ctx.saved_tensors
    gx, gw, gr, gv = torch.ops.sasa.stem_attention_backward(x, weight_t, rel_t, vmap, gy, ctx.heads)
    return gx, gw, gr, (gv if vmap is not None else None), None


stem_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sasa::stem_attention_pooled", mutates_args=(), device_types="cpu")
def stem_attention_pooled_op(
    x: torch.Tensor, weight_t: torch.Tensor, rel_t: torch.Tensor, vmap: torch.Tensor | None, heads: int,
    bn_scale: torch.Tensor, bn_shift: torch.Tensor,
) -> torch.Tensor:
    """Inference only: ``maxpool4x4(bn_scale * attn + bn_shift)`` -> [B, C, H/4, W/4]."""
    return _forward(x, weight_t, rel_t, vmap, heads, bn_scale, bn_shift)


@stem_attention_pooled_op.register_fake
def _(x, weight_t, rel_t, vmap, heads, bn_scale, bn_shift):  # noqa: ANN001, ANN202
    b, _, h, w = x.shape
    return x.new_empty(b, rel_t.shape[1] * heads, h // 4, w // 4)


def stem_block_attention(
    x: torch.Tensor, weight: torch.Tensor, rel: torch.Tensor, vmap: torch.Tensor | None, heads: int
) -> torch.Tensor:
    """Block attention of the stem in one fused pass.

    x [B, C_in, H, W] (H, W multiples of 4); weight [16, O, C_in]: per block position the stacked
    query, key and (when ``vmap`` is None) value projections, O = 3C (2C with ``vmap``); the query
    and key rows must not depend on the position (the forward folds them, see the C++ source);
    rel [16 (query), 16 (key), D]: the relative logit table, shared by the heads;
    vmap [B, C, H, W] or None: precomputed values. Returns [B, C, H, W] in x's dtype (computed
    in fp32, fp64 for fp64 inputs). Raises RuntimeError if the kernel is unavailable.
    """
    # the kernel's layouts put the query position last (one vector per row): [O, C_in, 16], [16, D, 16]
    return torch.ops.sasa.stem_attention(x, weight.permute(1, 2, 0), rel.permute(1, 2, 0), vmap, heads)


def stem_block_attention_pooled(
    x: torch.Tensor,
    weight: torch.Tensor,
    rel: torch.Tensor,
    vmap: torch.Tensor | None,
    heads: int,
    bn_scale: torch.Tensor,
    bn_shift: torch.Tensor,
) -> torch.Tensor:
    """Inference only (no autograd): ``maxpool4x4(bn_scale * attn + bn_shift)`` in one pass.

    Same arguments as :func:`stem_block_attention` plus the eval-mode BatchNorm folded to a
    per-channel affine [C]; returns [B, C, H/4, W/4]. The full-resolution map is never written.
    """
    return torch.ops.sasa.stem_attention_pooled(
        x, weight.permute(1, 2, 0), rel.permute(1, 2, 0), vmap, heads, bn_scale, bn_shift
    )
