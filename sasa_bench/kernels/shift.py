"""``shift``: local attention as K*K shifted multiply-adds in plain PyTorch (any device).

Keys and values are zero-padded once (a 1x copy); each window offset (t, u) is then a strided
*view* of the padded tensor, so no K*K-fold copy is ever made. The only K*K-sized tensors are the
logits / probabilities [B, N, K*K, H, W] (D times smaller than a window copy of the values). A
custom backward loops over the offsets again, saving just q, the padded k/v and the
probabilities, so autograd does not keep one product per offset.

Portable and exact; slower than ``cpu_fused`` (one small kernel launch per offset) and the
fallback where the C++ operator cannot be built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sasa_bench.kernels.reference import window_valid_mask


def _rel_logits(q: torch.Tensor, rel_row: torch.Tensor, rel_col: torch.Tensor) -> tuple:
    dr = rel_row.shape[1]
    row = torch.einsum("bndhw,td->bnthw", q[:, :, :dr], rel_row)
    col = torch.einsum("bndhw,ud->bnuhw", q[:, :, dr:], rel_col)
    return row, col


def shift_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN201
    """Forward math without autograd: (out, probs [B,N,K,K,H,W], lse [B,N,H,W], kp, vp)."""
    b, n, d, h, w = q.shape
    kk, r = kernel_size, kernel_size // 2
    has_k, has_rel = k is not None, rel_row is not None
    kp = F.pad(k, (r, r, r, r)) if has_k else None
    vp = F.pad(v, (r, r, r, r))
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    logits = q.new_zeros(b, n, kk, kk, h, w, dtype=acc_dtype)
    if has_rel:
        row, col = _rel_logits(q, rel_row, rel_col)
        logits += row[:, :, :, None].to(logits.dtype) + col[:, :, None, :].to(logits.dtype)
    if has_k:
        for t in range(kk):
            for u in range(kk):
                logits[:, :, t, u] += (q * kp[..., t : t + h, u : u + w]).sum(2)
    if mask_border:
        valid = window_valid_mask(h, w, kk, q.device).permute(2, 3, 0, 1)
        logits.masked_fill_(~valid, float("-inf"))
    flat = logits.view(b, n, kk * kk, h, w)
    lse = torch.logsumexp(flat, dim=2)
    probs = torch.exp(flat - lse[:, :, None]).view(b, n, kk, kk, h, w)
    pc = probs.to(v.dtype)
    out = torch.zeros_like(v)
    for t in range(kk):
        for u in range(kk):
            out += pc[:, :, t, u, None] * vp[..., t : t + h, u : u + w]
    return out, probs, lse, kp, vp


def shift_backward(g, q, kp, vp, rel_row, rel_col, probs, kernel_size):  # noqa: ANN001, ANN201
    """Backward math without autograd: (dq, dk or None, dv, d_rel_row or None, d_rel_col or None)."""
    kk, has_k, has_rel = kernel_size, kp is not None, rel_row is not None
    b, n, d, h, w = q.shape
    r = kk // 2
    dp = torch.empty_like(probs)
    gvp = torch.zeros_like(vp)
    for t in range(kk):
        for u in range(kk):
            dp[:, :, t, u] = (g * vp[..., t : t + h, u : u + w]).sum(2).to(dp.dtype)
            gvp[..., t : t + h, u : u + w] += probs[:, :, t, u, None].to(g.dtype) * g
    ds = probs * (dp - (probs * dp).sum((2, 3), keepdim=True))
    dsc = ds.to(q.dtype)
    dq = torch.zeros_like(q)
    dkp = torch.zeros_like(kp) if has_k else None
    if has_k:
        for t in range(kk):
            for u in range(kk):
                s = dsc[:, :, t, u, None]
                dq += s * kp[..., t : t + h, u : u + w]
                dkp[..., t : t + h, u : u + w] += s * q
    d_rr = d_rc = None
    if has_rel:
        dr = rel_row.shape[1]
        rs, cs = dsc.sum(3), dsc.sum(2)  # [B,N,K,H,W]
        dq[:, :, :dr] += torch.einsum("bnthw,td->bndhw", rs, rel_row.to(q.dtype))
        dq[:, :, dr:] += torch.einsum("bnuhw,ud->bndhw", cs, rel_col.to(q.dtype))
        d_rr = torch.einsum("bnthw,bndhw->td", rs, q[:, :, :dr]).to(rel_row.dtype)
        d_rc = torch.einsum("bnuhw,bndhw->ud", cs, q[:, :, dr:]).to(rel_col.dtype)
    dk = dkp[..., r : r + h, r : r + w] if has_k else None
    dv = gvp[..., r : r + h, r : r + w]
    return dq, dk, dv, d_rr, d_rc


class _ShiftAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, rel_row, rel_col, kernel_size, mask_border):  # noqa: ANN001, ANN205
        out, probs, _, kp, vp = shift_forward(q, k, v, rel_row, rel_col, kernel_size, mask_border)
        ctx.save_for_backward(q, kp, vp, rel_row, rel_col, probs)
        ctx.kernel_size = kernel_size
        return out

    @staticmethod
    def backward(ctx, g):  # noqa: ANN001, ANN205
        q, kp, vp, rel_row, rel_col, probs = ctx.saved_tensors
        return (*shift_backward(g, q, kp, vp, rel_row, rel_col, probs, ctx.kernel_size), None, None)


def local_attention_shift(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool = True,
) -> torch.Tensor:
    """Same operator as :func:`~sasa_bench.kernels.reference.local_attention_reference`."""
    return _ShiftAttention.apply(q, k, v, rel_row, rel_col, kernel_size, mask_border)
