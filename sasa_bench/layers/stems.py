"""Stems: the standard ResNet conv stem and the paper's attention stem (plus Table 7's variants).

The attention stem (paper, Sec. 3.2 / Table 7): self-attention inside each non-overlapping 4x4
block of the image (the receptive field of the 4x4 max-pool that follows), BatchNorm, 4x4
max-pool: 224 -> 56, like the conv stem. Values are *spatially aware*:

    v_ab = (sum_m p(a, b, m) W_V^m) x_ab,   p(a, b, m) = softmax_m((emb_row(a) + emb_col(b)) . nu_m)

with (a, b) the position inside the 4x4 block and p shared across the stem's heads.

Choices where the paper is silent: m = 4 mixtures (``mixtures``), width 64, 4 heads, logits
q.k + q.r with relative offset embeddings inside the block (offsets -3..3 per axis), no 1/sqrt(d),
embedding width = stem width, no ReLU between the BatchNorm and the max-pool (the paper names
only BN and the pool). Table 7's alternatives: ``values="plain"`` (v = W_V x) and
``values="conv"`` (v = a 3x3 "same" convolution of the input, our reading of "spatial
convolution for the values").

FLOPs vs runtime: the FLOP count (``sasa_bench.kernels.op.counting_flops()``) follows the paper's
formulation, which :meth:`AttentionStem._attend_paper` runs verbatim: m full-resolution value
projections W_V^m x then their mixture, and matmul-based block attention. Outside counting the
stem runs an algebraically equal, cheaper formulation: the mixture is folded into 16 effective
per-position matrices W_eff(a, b) = sum_m p(a, b, m) W_V^m (one C-channel value map instead of
m C), q, k and the values come from one stacked per-position projection, and on the CPU the whole
block attention runs in a fused C++ kernel (:mod:`sasa_bench.kernels.stem_cpu`, forward and a
hand-written backward, one pass per 4x4 block) -- or, without a compiler / on other devices, in
pure PyTorch on a ``pixel_unshuffle`` block layout (:meth:`AttentionStem._attend_torch`). All
three agree to rounding (tests/test_stems.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sasa_bench.choices import Stem
from sasa_bench.errors import SasaError
from sasa_bench.kernels import check_backend_name, stem_cpu
from sasa_bench.kernels.op import is_counting
from sasa_bench.layers.positional import split_head_dim

STEM_CHOICES = Stem.values()  # the choice set: sasa_bench.choices.Stem
BLOCK = 4


class ConvStem(nn.Module):
    """torchvision's ResNet stem: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool."""

    def __init__(self, in_channels: int = 3, out_channels: int = 64) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


def _to_blocks(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, heads, H/4, W/4, 16, C/heads]: one row per pixel of each 4x4 block."""
    b, c, h, w = t.shape
    t = t.view(b, heads, c // heads, h // BLOCK, BLOCK, w // BLOCK, BLOCK)
    return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, heads, h // BLOCK, w // BLOCK, BLOCK * BLOCK, -1)


def _from_blocks(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`_to_blocks`."""
    b, n, hb, wb, _, d = t.shape
    t = t.view(b, n, hb, wb, BLOCK, BLOCK, d).permute(0, 1, 6, 2, 4, 3, 5)
    return t.reshape(b, n * d, h, w)


class AttentionStem(nn.Module):
    """Self-attention inside 4x4 blocks with spatially aware values, BN, 4x4 max-pool."""

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 64,
        heads: int = 4,
        mixtures: int = 4,
        values: str = "mixture",
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.backend = check_backend_name(backend)
        if out_channels % heads:
            raise SasaError(f"stem heads={heads} does not divide the stem width {out_channels}")
        if mixtures < 1:
            raise SasaError(f"stem mixtures must be >= 1, got {mixtures}")
        if values not in ("mixture", "plain", "conv"):
            raise SasaError(f"unknown stem values {values!r} (choose from mixture, plain, conv)")
        self.heads, self.values, self.mixtures = heads, values, mixtures
        self.head_dim = out_channels // heads
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        if values == "mixture":
            self.value = nn.Conv2d(in_channels, out_channels * mixtures, 1, bias=False)
            self.emb_row = nn.Parameter(torch.randn(BLOCK, out_channels) * out_channels**-0.5)
            self.emb_col = nn.Parameter(torch.randn(BLOCK, out_channels) * out_channels**-0.5)
            self.mix = nn.Parameter(torch.randn(mixtures, out_channels) * out_channels**-0.5)
        elif values == "plain":
            self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        else:
            self.value = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        dr, dc = split_head_dim(self.head_dim)
        std = self.head_dim**-0.5
        self.rel_row = nn.Parameter(torch.randn(2 * BLOCK - 1, dr) * std)
        self.rel_col = nn.Parameter(torch.randn(2 * BLOCK - 1, dc) * std)
        self.bn = nn.BatchNorm2d(out_channels)
        self.pool = nn.MaxPool2d(BLOCK, BLOCK)

    def mixture_weights(self) -> torch.Tensor:
        """p(a, b, m) as [m, 4, 4]: softmax over mixtures of (emb_row(a) + emb_col(b)) . nu_m."""
        emb = self.emb_row[:, None, :] + self.emb_col[None, :, :]  # [4, 4, E]
        return torch.softmax(torch.einsum("abe,me->mab", emb, self.mix), dim=0)

    def _values(self, x: torch.Tensor) -> torch.Tensor:
        v = self.value(x)
        if self.values != "mixture":
            return v
        b, _, h, w = x.shape
        v = v.view(b, self.mixtures, -1, h, w)
        p = self.mixture_weights().repeat(1, h // BLOCK, w // BLOCK)  # [m, H, W]
        return (v * p[None, :, None]).sum(1)

    def _relative_table(self) -> torch.Tensor:
        """R[query, key, :] = concat(rel_row[a_k - a_q], rel_col[b_k - b_q]) for the 16x16 pairs."""
        idx = torch.arange(BLOCK, device=self.rel_row.device)
        off = idx[None, :] - idx[:, None] + BLOCK - 1  # [4 (query), 4 (key)]
        row = self.rel_row[off][:, None, :, None, :].expand(-1, BLOCK, -1, BLOCK, -1)
        col = self.rel_col[off][None, :, None, :, :].expand(BLOCK, -1, BLOCK, -1, -1)
        n = BLOCK * BLOCK
        return torch.cat([row, col], dim=-1).reshape(n, n, self.head_dim)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        """The fused CPU kernel runs for backend ``auto`` / ``cpu_fused`` on the CPU, when built."""
        return self.backend in ("auto", "cpu_fused") and x.device.type == "cpu" and stem_cpu.load()

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The stem's attention before BN and pooling: [B, C_in, H, W] -> [B, C_out, H, W].

        While FLOPs are counted, and for backend ``reference``, the paper's formulation
        (:meth:`_attend_paper`); for ``auto`` / ``cpu_fused`` the fused CPU kernel where it is
        available; otherwise (``shift``, ``flex``, ``triton``, other devices) :meth:`_attend_torch`
        (same math)."""
        _, _, h, w = x.shape
        if h % BLOCK or w % BLOCK:
            raise SasaError(f"the attention stem needs an image size divisible by {BLOCK}, got {h}x{w}")
        if is_counting() or self.backend == "reference":
            return self._attend_paper(x)
        if self._use_kernel(x):  # builds once; warns once if it cannot
            return self._attend_kernel(x)
        return self._attend_torch(x)

    def _attend_paper(self, x: torch.Tensor) -> torch.Tensor:
        """The paper's formulation, op for op (what the FLOP counters see)."""
        _, _, h, w = x.shape
        q = _to_blocks(self.query(x), self.heads)
        k = _to_blocks(self.key(x), self.heads)
        v = _to_blocks(self._values(x), self.heads)
        logits = torch.matmul(q, k.transpose(-1, -2))
        rel = self._relative_table()  # [16, 16, D]
        logits = logits + torch.matmul(q.unsqueeze(-2), rel.transpose(-1, -2)).squeeze(-2)
        out = torch.matmul(torch.softmax(logits, dim=-1), v)
        return _from_blocks(out, h, w)

    def position_weights(self) -> torch.Tensor:
        """Per block position (a, b) the stacked 1x1 projections [W_Q; W_K; W_eff(a, b)] as
        [16, 3C, C_in], W_eff(a, b) = sum_m p(a, b, m) W_V^m (mixture) or W_V (plain); [16, 2C, C_in]
        (no values) for ``values="conv"``."""
        wq, wk = self.query.weight[:, :, 0, 0], self.key.weight[:, :, 0, 0]
        n = BLOCK * BLOCK
        mats = [wq.expand(n, -1, -1), wk.expand(n, -1, -1)]
        if self.values == "mixture":
            c, cin = wq.shape
            wv = self.value.weight[:, :, 0, 0].view(self.mixtures, c, cin)
            p = self.mixture_weights().reshape(self.mixtures, n)
            mats.append(torch.einsum("mp,moc->poc", p, wv))
        elif self.values == "plain":
            mats.append(self.value.weight[:, :, 0, 0].expand(n, -1, -1))
        return torch.cat(mats, dim=1)

    def _attend_kernel(self, x: torch.Tensor) -> torch.Tensor:
        """The fused CPU kernel (:mod:`sasa_bench.kernels.stem_cpu`)."""
        vmap = self.value(x) if self.values == "conv" else None
        return stem_cpu.stem_block_attention(x, self.position_weights(), self._relative_table(), vmap, self.heads)

    def _attend_torch(self, x: torch.Tensor) -> torch.Tensor:
        """Pure PyTorch, on the ``pixel_unshuffle`` block layout with one stacked projection."""
        b, cin, h, w = x.shape
        n, d = self.heads, self.head_dim
        hb, wb = h // BLOCK, w // BLOCK
        nb, nn_ = b * hb * wb, BLOCK * BLOCK
        xp = F.pixel_unshuffle(x, BLOCK).view(b, cin, nn_, hb * wb)
        xp = xp.permute(2, 0, 3, 1).reshape(nn_, nb, cin)  # [16, blocks, C_in]
        proj = torch.bmm(xp, self.position_weights().transpose(1, 2))  # [16, blocks, O]
        proj = proj.view(nn_, nb, -1, n, d).permute(2, 1, 3, 0, 4)  # [q/k/v, blocks, N, 16, D]
        q, k = proj[0].reshape(nb * n, nn_, d), proj[1].reshape(nb * n, nn_, d)
        if self.values == "conv":
            v = F.pixel_unshuffle(self.value(x), BLOCK).view(b, n, d, nn_, hb * wb).permute(0, 4, 1, 3, 2)
        else:
            v = proj[2]
        v = v.reshape(nb * n, nn_, d)
        rel = torch.einsum("gpd,pjd->gpj", q, self._relative_table().to(q.dtype))
        logits = torch.baddbmm(rel, q, k.transpose(1, 2))
        out = torch.bmm(torch.softmax(logits, dim=-1), v)  # [blocks * N, 16, D]
        out = out.view(b, hb * wb, n, nn_, d).permute(0, 2, 4, 3, 1)  # [B, N, D, 16, blocks]
        return F.pixel_shuffle(out.reshape(b, n * d * nn_, hb, wb), BLOCK)

    def _fused_inference_ok(self, x: torch.Tensor) -> bool:
        """Eval-mode BN with running statistics, no autograd, CPU kernel available, not counting."""
        bn = self.bn
        return (
            not torch.is_grad_enabled() and not bn.training and bn.running_mean is not None
            and x.device.type == "cpu" and not is_counting()
            and x.shape[-2] % BLOCK == 0 and x.shape[-1] % BLOCK == 0 and self._use_kernel(x)
        )

    def _forward_fused_inference(self, x: torch.Tensor) -> torch.Tensor:
        """BN (eval: a per-channel affine) and the 4x4 max-pool fused into the block kernel: the
        blocks are the pool's windows, so each block yields one pooled value per channel."""
        bn = self.bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps) if bn.affine else torch.rsqrt(bn.running_var + bn.eps)
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        vmap = self.value(x) if self.values == "conv" else None
        return stem_cpu.stem_block_attention_pooled(
            x, self.position_weights(), self._relative_table(), vmap, self.heads, scale, shift
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused_inference_ok(x):
            return self._forward_fused_inference(x)
        return self.pool(self.bn(self.attend(x)))


def make_stem(
    kind: Stem | str, in_channels: int, out_channels: int, heads: int = 4, mixtures: int = 4, backend: str = "auto"
) -> nn.Module:
    """Build a stem by its CLI name (see ``STEM_CHOICES``); ``backend`` as for the attention layers."""
    kind = Stem.check(kind, "stem")
    if kind == Stem.CONV:
        return ConvStem(in_channels, out_channels)
    values = {Stem.ATTENTION: "mixture", Stem.ATTENTION_PLAIN: "plain", Stem.ATTENTION_CONV_VALUES: "conv"}
    return AttentionStem(in_channels, out_channels, heads, mixtures, values[Stem(kind)], backend)
