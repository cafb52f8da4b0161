"""The ResNet builder: bottleneck ResNets whose spatial convs may be the SASA layer.

Follows torchvision's ``models/resnet.py`` (ResNet v1.5: the stride sits on the block's spatial
layer, 1x1-conv + BN shortcut), so the baseline ``resnet50`` has torchvision's exact parameters
and FLOPs and loads its state dict after :func:`torchvision_key`. In an attention group the 3x3
conv of every bottleneck becomes :class:`LocalSelfAttention2d`; where the block downsamples, a
2x2 average pool with stride 2 follows the attention (the attention runs at the input
resolution, as the paper's FLOP counts require).
"""

from __future__ import annotations

import torch
from torch import nn

from sasa_bench.layers.attention import LocalSelfAttention2d
from sasa_bench.layers.stems import AttentionStem, make_stem
from sasa_bench.spec import EXPANSION, ModelSpec


def spatial_layer(width: int, stride: int, attention: bool, spec: ModelSpec) -> nn.Module:
    """The block's middle layer: a 3x3 conv, or attention (+ 2x2 avg-pool when it downsamples)."""
    if not attention:
        return nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
    attn = LocalSelfAttention2d(
        width,
        width,
        kernel_size=spec.kernel_size,
        heads=spec.heads,
        pos=spec.pos,
        logits=spec.logits,
        border=spec.border,
        scale=spec.scale,
        backend=spec.backend,
    )
    if stride == 1:
        return attn
    return nn.Sequential(attn, nn.AvgPool2d(kernel_size=stride, stride=stride))


class Bottleneck(nn.Module):
    """1x1 -> spatial (3x3 conv or attention) -> 1x1, each with BN; residual; ReLU."""

    def __init__(self, in_ch: int, width: int, stride: int, attention: bool, spec: ModelSpec) -> None:
        super().__init__()
        out_ch = width * EXPANSION
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # Named conv2 even when it is attention: torchvision's name for the block's spatial layer,
        # so a conv ResNet's state dict loads into ours (torchvision_key) and checkpoints of the
        # attention models keep their keys. Do not rename (state-dict compatibility).
        self.conv2 = spatial_layer(width, stride, attention, spec)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """Stem -> four residual groups -> global average pool -> linear classifier."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        stem_w = spec.stem_width()
        self.stem = make_stem(spec.stem, 3, stem_w, spec.stem_heads, spec.stem_mixtures, spec.backend)
        in_ch = stem_w
        groups = []
        for g, (n_blocks, width) in enumerate(zip(spec.blocks, spec.group_widths(), strict=True), start=1):
            attention = g in spec.attention_groups
            blocks = []
            for i in range(n_blocks):
                stride = 2 if (g > 1 and i == 0) else 1
                blocks.append(Bottleneck(in_ch, width, stride, attention, spec))
                in_ch = width * EXPANSION
            groups.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = groups
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch  # timm's name for the pooled feature width
        self.fc = nn.Linear(in_ch, spec.num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's initialisation for convs and BN. Attention projections keep PyTorch's
        # default (kaiming-uniform, a=sqrt(5)): with no 1/sqrt(d) in the logits, the fan-out
        # init would start the softmax nearly one-hot (logit std ~ 4*sqrt(d)).
        skip = {
            id(p) for m in self.modules() if isinstance(m, (LocalSelfAttention2d, AttentionStem))
            for p in m.parameters()
        }
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and id(m.weight) not in skip:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        return self.layer4(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pool and classify the features (timm's split of forward: features, then head)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # timm's model API, so timm's tools (benchmark.py, validate.py, train.py) can drive our models.
    @property
    def num_classes(self) -> int:
        return self.fc.out_features if isinstance(self.fc, nn.Linear) else 0

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        """A new, freshly initialised classifier (``num_classes=0``: none, features out)."""
        if global_pool not in ("avg", ""):
            raise ValueError(f"only average pooling, got global_pool={global_pool!r}")
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()


def zero_init_residual(model: nn.Module) -> None:
    """Start every bottleneck's last BN at gamma = 0, so each block begins as the identity.

    torchvision's ``zero_init_residual`` (Goyal et al., 2017): a training-time choice, off in the
    paper recipe, that steadies the early steps of short, high-LR runs.
    """
    for m in model.modules():
        if isinstance(m, Bottleneck):
            nn.init.zeros_(m.bn3.weight)


def torchvision_key(key: str) -> str:
    """Our state-dict key for a torchvision ResNet key (only the stem is nested differently)."""
    for name in ("conv1.", "bn1."):
        if key.startswith(name):
            return "stem." + key
    return key
