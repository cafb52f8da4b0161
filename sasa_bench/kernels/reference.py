"""The readable reference for local self-attention: every other backend is checked against it.

Shapes (one convention for every backend):

    q      [B, N, D,  H, W]   queries, N heads of D channels
    k      [B, N, D,  H, W]   keys, or None (Table 6's "qr only": no content logits)
    v      [B, N, Dv, H, W]   values
    rel_row [K, Dr], rel_col [K, Dc] with Dr + Dc = D: row / column offset embeddings, or None
    out    [B, N, Dv, H, W]

    y_ij = sum_{(a,b) in N_K(i,j)} softmax_ab( q_ij . k_ab + q_ij[:Dr] . rel_row[a-i]
                                                        + q_ij[Dr:] . rel_col[b-j] ) v_ab

Window index ``t`` along an axis means offset ``t - K//2``; ``rel_row[t]`` embeds that offset.
Border: with ``mask_border`` the positions outside the image are excluded from the softmax; without
it they are zero keys/values that still take softmax mass through the q.r term (what the public
ports do, by zero-padding before ``F.unfold``).

This implementation materialises the K*K-fold window copy of keys and values: it is meant to be
obviously right, not fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_valid_mask(h: int, w: int, kernel_size: int, device: torch.device) -> torch.Tensor:
    """Bool [H, W, K, K]: True where window position (t, u) of pixel (i, j) lies inside the image."""
    r = kernel_size // 2
    off = torch.arange(kernel_size, device=device) - r
    rows = torch.arange(h, device=device)[:, None] + off[None, :]  # [H, K]
    cols = torch.arange(w, device=device)[:, None] + off[None, :]  # [W, K]
    row_ok = (rows >= 0) & (rows < h)
    col_ok = (cols >= 0) & (cols < w)
    return row_ok[:, None, :, None] & col_ok[None, :, None, :]


def _windows(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """[B, N, C, H, W] -> [B, N, C, H, W, K, K] zero-padded sliding windows (a strided view)."""
    r = kernel_size // 2
    xp = F.pad(x, (r, r, r, r))
    return xp.unfold(3, kernel_size, 1).unfold(4, kernel_size, 1)


def relative_logits(q: torch.Tensor, rel_row: torch.Tensor, rel_col: torch.Tensor) -> torch.Tensor:
    """q . r for every window offset: [B, N, H, W, K, K] (row part + column part, broadcast)."""
    dr = rel_row.shape[-1]
    row = torch.einsum("bndhw,td->bnhwt", q[:, :, :dr], rel_row)
    col = torch.einsum("bndhw,ud->bnhwu", q[:, :, dr:], rel_col)
    return row[..., :, None] + col[..., None, :]


def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool = True,
) -> torch.Tensor:
    """Local self-attention over a K x K window, the paper's equation (see module docstring)."""
    b, n, d, h, w = q.shape
    kk = kernel_size
    logits = q.new_zeros(b, n, h, w, kk, kk)
    if k is not None:
        logits = logits + torch.einsum("bndhw,bndhwtu->bnhwtu", q, _windows(k, kk))
    if rel_row is not None and rel_col is not None:
        logits = logits + relative_logits(q, rel_row, rel_col)
    if mask_border:
        valid = window_valid_mask(h, w, kk, q.device)
        logits = logits.masked_fill(~valid, float("-inf"))
    attn = torch.softmax(logits.reshape(b, n, h, w, kk * kk), dim=-1).reshape(b, n, h, w, kk, kk)
    return torch.einsum("bnhwtu,bndhwtu->bndhw", attn, _windows(v, kk))
