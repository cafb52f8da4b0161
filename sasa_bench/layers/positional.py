"""Positional terms of the attention logits: relative offset embeddings and absolute sinusoids."""

from __future__ import annotations

import math

import torch
from torch import nn


def split_head_dim(dim: int) -> tuple[int, int]:
    """Row / column share of a head's channels: half each (the row half gets the floor if odd)."""
    return dim // 2, dim - dim // 2


class RelativeEmbedding2d(nn.Module):
    """r_{a-i,b-j} = concat(r_row(a-i), r_col(b-j)), one vector per window offset (the paper's).

    Choices the paper leaves open: the embeddings are shared across heads (each head's query
    reads the same table) and initialised N(0, 1/D) so that q.r starts on the scale of q.k.
    """

    def __init__(self, kernel_size: int, head_dim: int) -> None:
        super().__init__()
        dr, dc = split_head_dim(head_dim)
        std = head_dim**-0.5
        self.row = nn.Parameter(torch.randn(kernel_size, dr) * std)
        self.col = nn.Parameter(torch.randn(kernel_size, dc) * std)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.row, self.col


def sinusoid_1d(positions: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Transformer sinusoids [len(positions), dim]: sin on even channels, cos on odd ones."""
    if dtype not in (torch.float32, torch.float64):
        return sinusoid_1d(positions, dim).to(dtype)  # low precision: compute in fp32, then cast
    if dim == 0:
        return torch.zeros(len(positions), 0, dtype=dtype, device=positions.device)
    freq = torch.exp(
        torch.arange(0, dim, 2, dtype=dtype, device=positions.device) * (-math.log(10000.0) / dim)
    )
    ang = positions.to(dtype)[:, None] * freq[None, :]
    out = torch.zeros(len(positions), dim, dtype=dtype, device=positions.device)
    out[:, 0::2] = torch.sin(ang)
    out[:, 1::2] = torch.cos(ang[:, : dim // 2])
    return out


def absolute_sinusoid_2d(
    h: int, w: int, head_dim: int, device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[D, H, W]: the first half of the channels encodes the row i, the second half the column j.

    Used for Table 5's "absolute" row: the logit becomes q_ij . (k_ab + p_ab), i.e. the key of
    position (a, b) carries the sinusoid of (a, b).
    """
    dr, dc = split_head_dim(head_dim)
    rows = sinusoid_1d(torch.arange(h, device=device), dr, dtype)  # [H, Dr]
    cols = sinusoid_1d(torch.arange(w, device=device), dc, dtype)  # [W, Dc]
    pr = rows.t()[:, :, None].expand(dr, h, w)
    pc = cols.t()[:, None, :].expand(dc, h, w)
    return torch.cat([pr, pc], dim=0)
