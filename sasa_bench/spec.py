"""ModelSpec: every choice that defines a network, in one frozen dataclass, plus the presets.

Options from the CLI, a study file or Python all become a ModelSpec; the builder only ever sees
a validated spec, so every bad value is rejected here with one clear :class:`SasaError`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sasa_bench.errors import SasaError
from sasa_bench.layers.attention import check_attention_args
from sasa_bench.layers.stems import STEM_CHOICES

# Bottleneck blocks per residual group (the paper's ResNet-26/38/50, plus torchvision's 101).
DEPTHS: dict[int, tuple[int, int, int, int]] = {
    26: (1, 2, 4, 1),
    38: (2, 3, 5, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
}
BASE_WIDTHS = (64, 128, 256, 512)  # bottleneck widths; the output of each block is 4x this
STEM_WIDTH = 64
EXPANSION = 4


@dataclass(frozen=True)
class ModelSpec:
    """A network, fully described. Field names are the CLI's (``--k`` -> ``kernel_size``)."""

    name: str = "custom"
    depth: int = 50
    stem: str = "conv"
    attention_groups: tuple[int, ...] = (1, 2, 3, 4)
    kernel_size: int = 7
    heads: int = 8
    pos: str = "relative"
    logits: str = "qk+qr"
    border: str = "mask"
    scale: str = "none"
    width: float = 1.0
    image_size: int = 224
    num_classes: int = 1000
    stem_heads: int = 4
    stem_mixtures: int = 4
    backend: str = "auto"

    def __post_init__(self) -> None:
        validate(self)

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        return DEPTHS[self.depth]

    def group_widths(self) -> tuple[int, ...]:
        return tuple(scaled_width(w, self.width) for w in BASE_WIDTHS)

    def stem_width(self) -> int:
        return scaled_width(STEM_WIDTH, self.width)

    @property
    def uses_attention(self) -> bool:
        return bool(self.attention_groups) or self.stem != "conv"

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_groups"] = list(self.attention_groups)
        return d


def scaled_width(base: int, mult: float) -> int:
    """A width multiplier applied like timm/torchvision: round to the nearest integer, >= 1."""
    return max(1, int(round(base * mult)))


def parse_groups(value: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"1,2,3,4"`` / ``"3,4"`` / ``"none"`` -> sorted tuple of residual groups using attention."""
    if isinstance(value, (list, tuple)):
        items = [str(v) for v in value]
    else:
        text = value.strip().lower()
        if text in ("none", "", "-"):
            return ()
        if text == "all":
            return (1, 2, 3, 4)
        items = [p.strip() for p in text.split(",") if p.strip()]
    try:
        groups = tuple(sorted({int(p) for p in items}))
    except ValueError:
        raise SasaError(f"attention groups must be a comma list of 1..4 or 'none', got {value!r}") from None
    if any(g not in (1, 2, 3, 4) for g in groups):
        raise SasaError(f"attention groups must be among 1,2,3,4, got {value!r}")
    return groups


def validate(spec: ModelSpec) -> None:
    """Reject anything the builder could not build, with one line saying what and why."""
    if spec.depth not in DEPTHS:
        raise SasaError(f"unknown depth {spec.depth} (choose from {', '.join(map(str, DEPTHS))})")
    if spec.stem not in STEM_CHOICES:
        raise SasaError(f"unknown stem {spec.stem!r} (choose from {', '.join(STEM_CHOICES)})")
    if not isinstance(spec.attention_groups, tuple) or any(
        g not in (1, 2, 3, 4) for g in spec.attention_groups
    ):
        raise SasaError(f"attention groups must be among 1,2,3,4, got {spec.attention_groups!r}")
    if not spec.width > 0:
        raise SasaError(f"width multiplier must be > 0, got {spec.width}")
    if spec.num_classes < 1:
        raise SasaError(f"num classes must be >= 1, got {spec.num_classes}")
    if spec.image_size < 32 or spec.image_size % 32:
        raise SasaError(
            f"image size must be a positive multiple of 32 (the network downsamples 32x), got {spec.image_size}"
        )
    for w in (scaled_width(b, spec.width) for b in BASE_WIDTHS):
        check_attention_args(w, spec.kernel_size, spec.heads, spec.pos, spec.logits, spec.border, spec.scale)
    if spec.stem != "conv":
        sw = scaled_width(STEM_WIDTH, spec.width)
        if spec.stem_heads < 1 or sw % spec.stem_heads:
            raise SasaError(f"stem heads={spec.stem_heads} does not divide the stem width {sw}")
        if spec.stem_mixtures < 1:
            raise SasaError(f"stem mixtures must be >= 1, got {spec.stem_mixtures}")
    from sasa_bench.kernels import check_backend_name

    check_backend_name(spec.backend)


def _presets() -> dict[str, ModelSpec]:
    out: dict[str, ModelSpec] = {}
    for depth in DEPTHS:
        out[f"resnet{depth}"] = ModelSpec(name=f"resnet{depth}", depth=depth, attention_groups=())
        out[f"sasa_resnet{depth}_convstem"] = ModelSpec(name=f"sasa_resnet{depth}_convstem", depth=depth)
        out[f"sasa_resnet{depth}"] = ModelSpec(name=f"sasa_resnet{depth}", depth=depth, stem="attention")
    return out


PRESETS: dict[str, ModelSpec] = _presets()
# The nine models of the paper's Table 1, in its order.
TABLE1_MODELS = [
    f"{prefix}{d}{suffix}"
    for d in (26, 38, 50)
    for prefix, suffix in (("resnet", ""), ("sasa_resnet", "_convstem"), ("sasa_resnet", ""))
]

SPEC_FIELDS = {f.name for f in dataclasses.fields(ModelSpec)}


def get_preset(name: str) -> ModelSpec:
    try:
        return PRESETS[name]
    except KeyError:
        raise SasaError(f"unknown model {name!r} (see `sasa-bench models`; e.g. {', '.join(TABLE1_MODELS[:3])})") from None


def make_spec(model: str | None = None, **overrides: Any) -> ModelSpec:
    """A preset (or the defaults) with the given fields replaced; ``None`` values are ignored."""
    base = get_preset(model) if model else ModelSpec()
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - SPEC_FIELDS
    if unknown:
        raise SasaError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    if "attention_groups" in changes:
        changes["attention_groups"] = parse_groups(changes["attention_groups"])
    spec = base.replace(**changes)
    if "name" not in changes and (changes or not model):
        spec = spec.replace(name=auto_name(spec))
    return spec


def auto_name(spec: ModelSpec) -> str:
    """A readable name: the nearest preset, plus the fields that differ from it."""
    if not spec.attention_groups and spec.stem == "conv":
        base = f"resnet{spec.depth}"
    elif spec.stem == "conv":
        base = f"sasa_resnet{spec.depth}_convstem"
    else:
        base = f"sasa_resnet{spec.depth}"
    ref = PRESETS[base].to_dict()
    diffs = [
        f"{k}={_short(v)}"
        for k, v in spec.to_dict().items()
        if k not in ("name", "backend") and v != ref[k] and not (k == "attention_groups" and not v and not ref[k])
    ]
    return base + (f"[{' '.join(diffs)}]" if diffs else "")


def _short(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) or "none"
    return str(v)
