"""LocalSelfAttention2d: the paper's stand-alone self-attention layer.

    y_ij = sum_{(a,b) in N_k(i,j)} softmax_ab( q_ij . k_ab + q_ij . r_{a-i,b-j} ) v_ab

q, k, v are dense bias-free 1x1 projections d_in -> d_out split into ``heads`` heads; the
logits are per-head dot products; the softmax runs over the k x k window. The math of the window
lives in :mod:`sasa_bench.kernels` (one reference, several fast backends); this module owns the
parameters and the options.

Choices where the paper is silent (each an option where it plausibly matters):
- ``scale``: the paper's equation has no 1/sqrt(d); default ``"none"`` (logits unscaled),
  ``scale="rsqrt"`` multiplies q by 1/sqrt(d).
- ``border``: ``"mask"`` (default) keeps positions outside the image out of the softmax;
  ``"zeros"`` zero-pads keys/values, which then take softmax mass through q.r (public ports).
- relative embeddings shared across heads, N(0, 1/d) init; projections use PyTorch's default
  conv init (kaiming-uniform, a=sqrt(5)).
- ``pos="absolute"``: sinusoids of the key pixel's (a, b) added to the keys (q.(k + p)).
- ``logits="qr"`` (Table 6) drops W_K: with relative positions the logit is q.r alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sasa_bench.choices import Border, Logits, Pos, Scale
from sasa_bench.errors import SasaError
from sasa_bench.kernels import check_backend_name, local_attention
from sasa_bench.kernels.op import is_counting
from sasa_bench.layers.positional import RelativeEmbedding2d, absolute_sinusoid_2d

# Pixels per map from which the CPU projection runs as one GEMM per image (bmm) rather than one
# folded GEMM over the batch (matmul, which copies x to [C_in, B*H*W] and the output back): the
# copies cost more than the per-image GEMMs on large maps, and the per-image GEMMs are too narrow
# on small ones. Measured on Zen 4, AVX-512 and AVX2, batch 8, fwd+bwd: bmm 1.4x faster at 56²,
# 1.15x at 28², even at 14², 1.3x slower at 7².
_BMM_MIN_PIXELS = 512

# The choice sets live in sasa_bench.choices; these tuples are their values, for callers that list them.
POS_CHOICES = Pos.values()
LOGITS_CHOICES = Logits.values()
BORDER_CHOICES = Border.values()
SCALE_CHOICES = Scale.values()


def check_attention_args(
    out_channels: int,
    kernel_size: int,
    heads: int,
    pos: Pos | str,
    logits: Logits | str,
    border: Border | str,
    scale: Scale | str,
) -> None:
    """Raise SasaError for options the layer cannot take (shared with the model spec)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise SasaError(f"kernel size k must be an odd integer >= 1, got {kernel_size}")
    if heads < 1:
        raise SasaError(f"heads must be >= 1, got {heads}")
    if out_channels % heads:
        raise SasaError(f"heads={heads} does not divide the attention width {out_channels}")
    pos, logits = Pos.check(pos, "pos"), Logits.check(logits, "logits")
    Border.check(border, "border")
    Scale.check(scale, "scale")
    if pos == "none" and logits == "qr":
        raise SasaError("logits=qr with pos=none leaves no logit term (every window weight equal); use pos relative or absolute")


class LocalSelfAttention2d(nn.Module):
    """[B, C_in, H, W] -> [B, C_out, H, W] self-attention over each pixel's k x k window.

    Args:
        in_channels: C_in, the channels of the input map (d_in of the paper).
        out_channels: C_out (d_out): the width of q, k and v and of the output; split evenly
            over the heads, so it must be divisible by ``heads``.
        kernel_size: k, the spatial extent: each pixel attends to the k x k window centred on it
            (odd, >= 1; Table 4 varies it). The output keeps the input's H x W (stride 1).
        heads: attention heads N; each attends with d = C_out / N channels.
        pos: the positional term of the logits (Table 5): ``"relative"`` q.r with
            r = concat(r_row(a-i), r_col(b-j)), ``"absolute"`` sinusoids of the key pixel added
            to the keys, ``"none"``. A :class:`~sasa_bench.choices.Pos` or its string.
        logits: ``"qk+qr"`` (the paper's q.k + q.r) or ``"qr"`` (Table 6: no W_K, the logit is
            q.r alone; needs a positional term).
        border: window positions outside the image: ``"mask"`` takes them out of the softmax,
            ``"zeros"`` zero-pads keys and values (they keep softmax mass through q.r).
        scale: ``"none"`` (the paper's equation: no 1/sqrt(d)) or ``"rsqrt"`` (q times 1/sqrt(d)).
        backend: who computes the window attention (``sasa-bench backends``): ``"auto"`` picks
            the fastest exact one for the input's device; every backend computes the same
            operator, and the parameters and state dict do not depend on it.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 7,
        heads: int = 8,
        pos: Pos | str = Pos.RELATIVE,
        logits: Logits | str = Logits.QK_QR,
        border: Border | str = Border.MASK,
        scale: Scale | str = Scale.NONE,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        check_attention_args(out_channels, kernel_size, heads, pos, logits, border, scale)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.heads = kernel_size, heads
        self.head_dim = out_channels // heads
        # Stored as the plain strings (repr, comparisons and pickles do not depend on the Enum).
        self.pos, self.logits = Pos.check(pos, "pos"), Logits.check(logits, "logits")
        self.border, self.scale = Border.check(border, "border"), Scale.check(scale, "scale")
        self.backend = check_backend_name(backend)
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False) if logits == "qk+qr" else None
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.rel = RelativeEmbedding2d(kernel_size, self.head_dim) if pos == "relative" else None

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"heads={self.heads}, pos={self.pos}, logits={self.logits}, border={self.border}, "
            f"scale={self.scale}, backend={self.backend}"
        )

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, _, h, w = t.shape
        return t.view(b, self.heads, -1, h, w)

    def _stacked_weight(self) -> torch.Tensor:
        """[W_Q; W_K; W_V] as one tensor. Without autograd (inference) the concatenation is kept
        until a weight changes: it is a parallel region of its own, and on a busy machine every
        parallel region costs a scheduling delay (measured: ~20-40 ms on the 2-core host at load 9)."""
        convs = [self.query, self.value] if self.key is None else [self.query, self.key, self.value]
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return torch.cat([c.weight for c in convs])
        key = tuple((c.weight.data_ptr(), c.weight._version, c.weight.dtype, c.weight.device) for c in convs)
        cached = self.__dict__.get("_weight_cache")
        if cached is None or cached[0] != key:
            cached = (key, torch.cat([c.weight for c in convs]))
            self.__dict__["_weight_cache"] = cached
        return cached[1]

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """q, k (None for ``logits="qr"``) and v from one 1x1 conv with the stacked weights.

        One convolution reads x once (three read it three times); q, k, v are channel slices of
        its output, which the fused CPU kernel reads in place. The parameters stay three
        separate convs, so state dicts are unchanged; the FLOPs are the same.

        On a contiguous (NCHW) CPU input the 1x1 conv runs as a matrix product
        ``W [3C, C_in] @ x [B, C_in, H*W]`` (see ``_BMM_MIN_PIXELS``), which yields NCHW directly:
        oneDNN's NCHW 1x1 conv reorders to its blocked layout and back and was measured 3-6x slower
        (AVX-512 and AVX2, batch 8 at 56²). Same math and FLOPs; the FLOP counters still see the conv."""
        weight = self._stacked_weight()
        if x.device.type == "cpu" and x.is_contiguous() and not is_counting():
            b, cin, h, w = x.shape
            if h * w >= _BMM_MIN_PIXELS:  # one GEMM per image, NCHW in and out: no copies
                qkv = torch.bmm(weight.view(1, -1, cin).expand(b, -1, -1), x.view(b, cin, h * w))
            else:  # small maps: one folded GEMM (matmul copies x and the output, cheap here)
                qkv = torch.matmul(weight.view(weight.shape[0], cin), x.view(b, cin, h * w))
            qkv = qkv.view(b, -1, h, w)
        else:
            qkv = F.conv2d(x, weight)
        parts = qkv.split(self.out_channels, dim=1)
        return parts[0], (parts[1] if self.key is not None else None), parts[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = self._project(x)
        q = self._heads(q)
        if self.scale == "rsqrt":
            q = q * self.head_dim**-0.5
        k = self._heads(k) if k is not None else None
        if self.pos == "absolute":
            p = absolute_sinusoid_2d(h, w, self.head_dim, x.device, q.dtype)
            p = p.expand(b, self.heads, -1, h, w)
            k = p if k is None else k + p
        v = self._heads(v)
        rel_row, rel_col = self.rel() if self.rel is not None else (None, None)
        out = local_attention(
            q, k, v, rel_row, rel_col, self.kernel_size, self.border == "mask", self.backend
        )
        return out.reshape(b, self.out_channels, h, w)
