"""``flex``: local attention on PyTorch's ``torch.nn.attention.flex_attention`` (a GPU path PyTorch maintains).

The image becomes a token sequence in a *tiled* 2D order (``TILE`` x ``TILE`` pixel tiles, each
contiguous), so flex's 128-token blocks are spatially compact and the k x k window is a sparse
block mask (most block pairs are skipped). Per token, tables give its row and column; then

- ``mask_mod``: key (a, b) is in query (i, j)'s window iff |a - i| <= r and |b - j| <= r;
- ``score_mod``: adds q.r as ``qr_row[b, h, q, a - i + r] + qr_col[b, h, q, b - j + r]``, two
  [B, N, L, K] tables computed once from q and the embeddings (q.k is flex's own dot product,
  with ``scale=1``: the paper's logits have no 1/sqrt(d); the layer applies ``scale`` to q);
- ``border="zeros"`` (no masking): keys and values are zero-padded by r, so the padded
  positions are real (zero) keys that still take softmax mass through q.r.

No keys (``logits="qr"``): zero keys. On CUDA flex_attention is compiled (``torch.compile``,
cached); on the CPU it runs eagerly (forward only in this torch: the CPU backward is not
supported by flex, so this backend is a GPU backend; its CPU forward is what the tests check).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

TILE = 8  # pixels per side of a token tile


def is_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _tiled_order(h: int, w: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(perm, rows, cols): token t is pixel perm[t] (row-major index) at (rows[t], cols[t])."""
    i = torch.arange(h).repeat_interleave(w)
    j = torch.arange(w).repeat(h)
    tiles_per_row = (w + TILE - 1) // TILE
    key = ((i // TILE) * tiles_per_row + j // TILE) * TILE * TILE + (i % TILE) * TILE + j % TILE
    perm = torch.argsort(key)
    return perm.to(device), i[perm].to(device), j[perm].to(device)


@functools.cache
def _block_mask(h: int, w: int, r: int, pad: int, device: str):  # noqa: ANN202
    from torch.nn.attention.flex_attention import create_block_mask

    _, qr, qc = _tiled_order(h, w, device)
    _, kr, kc = _tiled_order(h + 2 * pad, w + 2 * pad, device)
    kr, kc = kr - pad, kc - pad

    def in_window(b, hd, qi, ki):  # noqa: ANN001, ANN202
        return ((kr[ki] - qr[qi]).abs() <= r) & ((kc[ki] - qc[qi]).abs() <= r)

    return create_block_mask(in_window, None, None, h * w, (h + 2 * pad) * (w + 2 * pad), device=device)


@functools.cache
def _compiled_flex():  # noqa: ANN202
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _tokens(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """[B, N, C, H, W] -> [B, N, H*W, C] in the tiled order."""
    b, n, c, h, w = x.shape
    return x.reshape(b, n, c, h * w)[..., perm].transpose(2, 3)


def local_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor,
    rel_row: torch.Tensor | None,
    rel_col: torch.Tensor | None,
    kernel_size: int,
    mask_border: bool = True,
) -> torch.Tensor:
    """Same operator as :func:`~sasa_bench.kernels.reference.local_attention_reference`."""
    from torch.nn.attention.flex_attention import flex_attention

    b, n, d, h, w = q.shape
    r = kernel_size // 2
    pad = 0 if mask_border else r
    dev = str(q.device)
    if k is None:
        k = torch.zeros_like(q)
    if pad:
        k, v = F.pad(k, (pad, pad, pad, pad)), F.pad(v, (pad, pad, pad, pad))
    perm, qrow, qcol = _tiled_order(h, w, dev)
    kperm, krow, kcol = _tiled_order(h + 2 * pad, w + 2 * pad, dev)
    krow, kcol = krow - pad, kcol - pad
    qt = _tokens(q, perm)
    kt, vt = _tokens(k.to(q.dtype), kperm), _tokens(v, kperm)
    score_mod = None
    if rel_row is not None and rel_col is not None:
        dr = rel_row.shape[1]
        qr_row = torch.einsum("bnld,td->bnlt", qt[..., :dr], rel_row.to(q.dtype))  # [B, N, L, K]
        qr_col = torch.einsum("bnld,ud->bnlu", qt[..., dr:], rel_col.to(q.dtype))
        last = kernel_size - 1

        def score_mod(score, bi, hi, qi, ki):  # noqa: ANN001, ANN202
            t = (krow[ki] - qrow[qi] + r).clamp(0, last)
            u = (kcol[ki] - qcol[qi] + r).clamp(0, last)
            return score + qr_row[bi, hi, qi, t] + qr_col[bi, hi, qi, u]

    mask = _block_mask(h, w, r, pad, dev)
    if q.is_cuda:
        out = _compiled_flex()(qt, kt, vt, score_mod=score_mod, block_mask=mask, scale=1.0)
    else:  # eager (unfused) on the CPU: flex warns that it is not compiled; we know
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
            out = flex_attention(qt, kt, vt, score_mod=score_mod, block_mask=mask, scale=1.0)
    # [B, N, L, Dv] in the tiled order -> [B, N, Dv, H, W]
    res = torch.empty(b, n, h * w, v.shape[2], dtype=out.dtype, device=out.device)
    res[:, :, perm] = out
    return res.transpose(2, 3).reshape(b, n, v.shape[2], h, w)
