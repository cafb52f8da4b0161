"""RetinaNet on the (attention) ResNets: the paper's Table 2, on torchvision's detection stack.

torchvision supplies the detector: ``RetinaNet`` (transform, anchor matching, focal and L1 box
losses, box coder, post-processing), ``AnchorGenerator``, ``RetinaNetHead`` and
``ops.FeaturePyramidNetwork`` with ``LastLevelP6P7``. We supply the backbone (our ResNet, its
classifier removed) and, for ``fpn="attention"``, swap the FPN's and heads' 3x3 convs for
:class:`LocalSelfAttention2d` (Appendix A.3).

The reading that reproduces Table 2 (arithmetic in the README, "Object detection (Table 2)"):

- 640 x 640 input for FLOPs (the recipe's maximum dimension); params do not depend on it.
- P6 from P5 (``p6_from="p5"``, torchvision's ``LastLevelP6P7(256, 256)`` and the TF/TPU
  RetinaNet's); ``"c5"`` (the RetinaNet paper's) adds 4.1 M params to the conv baseline.
- 90 class slots (COCO's category ids, TF RetinaNet) and **6 anchors** per location (2 scales per
  octave x 3 aspect ratios, ``anchor_scales=2``). With torchvision's 9 anchors the baseline has
  34.0 M params / 194 GFLOPS; with 6 it has 33.40 M / 182.4, the paper's 33.4 / 182.
- no norms in the heads (``head_norm="none"``, RetinaNet's; ``"gn"``: torchvision v2's).
- attention heads (``head_predictor="attention"``): each head is 4 attention layers + ReLU, then
  its final 3x3 conv too becomes attention (d_out = 256), then the added pointwise conv mixes the
  attention heads into the class / box outputs. ``"conv"``: 4 attention layers, a 256->256
  pointwise conv, then the 3x3 conv predictor. Neither reading reproduces both printed columns
  (see the README): the default is within 5% of the FLOPS and meets the paper's relative claims.
- strided convs (P6, P7) become attention at the input resolution, then a 2x2 average pool with
  stride 2 (``ceil_mode`` so odd sizes give the conv's output size).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from sasa_bench.layers.attention import LocalSelfAttention2d
from sasa_bench.models.resnet import ResNet
from sasa_bench.spec import EXPANSION, FPN_WIDTH, ModelSpec

IMAGE_MEAN, IMAGE_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the classifier's
ASPECT_RATIOS = (0.5, 1.0, 2.0)
ANCHOR_BASE = (32, 64, 128, 256, 512)  # 4 x the stride of P3..P7 (RetinaNet's anchor scale 4)
HEAD_INIT_STD = 0.01  # RetinaNet's head init; A.3: the attention heads' W_V too
PRIOR_PROB = 0.01


def num_anchors(spec: ModelSpec) -> int:
    return spec.anchor_scales * len(ASPECT_RATIOS)


def anchor_generator(spec: ModelSpec) -> AnchorGenerator:
    """``anchor_scales`` sizes per octave (2^(i/n)) x 3 aspect ratios on each of P3..P7."""
    n = spec.anchor_scales
    sizes = tuple(tuple(int(round(b * 2 ** (i / n))) for i in range(n)) for b in ANCHOR_BASE)
    return AnchorGenerator(sizes, (ASPECT_RATIOS,) * len(sizes))


def attention(spec: ModelSpec, in_ch: int, out_ch: int = FPN_WIDTH) -> LocalSelfAttention2d:
    return LocalSelfAttention2d(
        in_ch, out_ch, kernel_size=spec.kernel_size, heads=spec.heads, pos=spec.pos,
        logits=spec.logits, border=spec.border, scale=spec.scale, backend=spec.backend,
    )


def attention_down(spec: ModelSpec, in_ch: int) -> nn.Sequential:
    """A.3's replacement for a stride-2 3x3 conv: attention, then a 2x2 average pool, stride 2."""
    return nn.Sequential(attention(spec, in_ch), nn.AvgPool2d(2, 2, ceil_mode=True))


class ResNetFPN(nn.Module):
    """Our ResNet's C3, C4, C5 -> torchvision's FPN (P3..P5) + P6, P7: an OrderedDict of maps."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.body = ResNet(spec)
        del self.body.fc, self.body.avgpool  # the classifier is not part of the detector
        c_in = [w * EXPANSION for w in spec.group_widths()[1:]]
        p6_in = FPN_WIDTH if spec.p6_from == "p5" else c_in[-1]
        extra = LastLevelP6P7(p6_in, FPN_WIDTH)
        self.fpn = FeaturePyramidNetwork(c_in, FPN_WIDTH, extra_blocks=extra)
        if spec.fpn == "attention":
            for i in range(len(self.fpn.layer_blocks)):
                self.fpn.layer_blocks[i] = attention(spec, FPN_WIDTH)
            extra.p6, extra.p7 = attention_down(spec, p6_in), attention_down(spec, FPN_WIDTH)
        self.out_channels = FPN_WIDTH

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        b = self.body
        c2 = b.layer1(b.stem(x))
        c3 = b.layer2(c2)
        c4 = b.layer3(c3)
        c5 = b.layer4(c4)
        return self.fpn(OrderedDict([("c3", c3), ("c4", c4), ("c5", c5)]))


def _act(spec: ModelSpec, layer: nn.Module) -> nn.Sequential:
    parts = [layer]
    if spec.head_norm == "gn":
        parts.append(nn.GroupNorm(32, FPN_WIDTH))
    return nn.Sequential(*parts, nn.ReLU())  # not in place: attention backends keep their output for backward


def _pointwise(in_ch: int, out_ch: int, bias: float = 0.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_ch, out_ch, 1)
    nn.init.normal_(conv.weight, std=HEAD_INIT_STD)
    nn.init.constant_(conv.bias, bias)
    return conv


def _predictor(spec: ModelSpec, old: nn.Conv2d, bias: float) -> nn.Sequential:
    """The head's last 3x3 conv, per ``head_predictor`` (see the module docstring)."""
    out_ch = old.out_channels
    if spec.head_predictor == "attention":
        return nn.Sequential(attention(spec, FPN_WIDTH), _pointwise(FPN_WIDTH, out_ch, bias))
    return nn.Sequential(_pointwise(FPN_WIDTH, FPN_WIDTH), old)


def make_head(spec: ModelSpec) -> RetinaNetHead:
    """torchvision's RetinaNetHead (shared across levels); attention towers for ``fpn="attention"``."""
    norm = (lambda c: nn.GroupNorm(32, c)) if spec.head_norm == "gn" else None
    head = RetinaNetHead(FPN_WIDTH, num_anchors(spec), spec.num_classes, norm_layer=norm)
    if spec.fpn == "conv":
        return head
    cls, reg = head.classification_head, head.regression_head
    for h in (cls, reg):
        h.conv = nn.Sequential(*[_act(spec, attention(spec, FPN_WIDTH)) for _ in range(len(h.conv))])
    cls.cls_logits = _predictor(spec, cls.cls_logits, -math.log((1 - PRIOR_PROB) / PRIOR_PROB))  # RetinaNet's prior
    reg.bbox_reg = _predictor(spec, reg.bbox_reg, 0.0)
    for m in head.modules():
        if isinstance(m, LocalSelfAttention2d):
            nn.init.normal_(m.value.weight, std=HEAD_INIT_STD)
    return head


class DetectionCore(nn.Module):
    """Backbone + FPN + heads: the part the paper's FLOPs count (no resize, anchors or NMS)."""

    def __init__(self, backbone: ResNetFPN, head: RetinaNetHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(list(self.backbone(x).values()))
        return out["cls_logits"], out["bbox_regression"]


class SasaRetinaNet(RetinaNet):
    """torchvision's RetinaNet with our backbone and heads; ``spec`` says which.

    Images are resized so the longer side is ``spec.image_size`` (the recipe's maximum dimension)
    and padded to a multiple of 32; ``freeze_bn`` keeps the backbone's BN statistics fixed in
    training (torchvision's FrozenBatchNorm choice for small batches; the affine stays trainable).
    """

    def __init__(self, spec: ModelSpec, freeze_bn: bool = False) -> None:
        super().__init__(
            ResNetFPN(spec), spec.num_classes, min_size=spec.image_size, max_size=spec.image_size,
            image_mean=IMAGE_MEAN, image_std=IMAGE_STD, anchor_generator=anchor_generator(spec),
            head=make_head(spec),
        )
        self.spec, self.freeze_bn = spec, freeze_bn

    def counted(self) -> DetectionCore:
        """The module FLOPs are counted on (shares this model's parameters)."""
        return DetectionCore(self.backbone, self.head)

    def train(self, mode: bool = True) -> SasaRetinaNet:
        super().train(mode)
        if mode and self.freeze_bn:
            for m in self.backbone.body.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


def load_backbone(model: SasaRetinaNet, state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """Load a classifier's state dict into the backbone; returns (missing, unexpected) keys.

    The classifier's ``fc`` is dropped; everything else must match the backbone's shapes."""
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith("fc.")}
    result = model.backbone.body.load_state_dict(state, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
