"""ModelSpec: every choice that defines a network, in one frozen dataclass, plus the presets.

Options from the CLI, a study file or Python all become a ModelSpec; the builder only ever sees
a validated spec, so every bad value is rejected here with one clear :class:`SasaError`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from sasa_bench.choices import Choice, Stem
from sasa_bench.errors import SasaError, check_types
from sasa_bench.layers.attention import check_attention_args

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

# Detection (Table 2): a RetinaNet on the ResNet (see sasa_bench/models/detection.py for why
# each default reproduces the paper's counts). detector="none" is a classifier.
DETECTOR_CHOICES = ("none", "retinanet")
FPN_CHOICES = ("conv", "attention")  # the FPN *and* the class/box heads
P6_CHOICES = ("p5", "c5")
HEAD_PREDICTOR_CHOICES = ("attention", "conv")
HEAD_NORM_CHOICES = ("none", "gn")
FPN_WIDTH = 256
# The detection fields, with the defaults a classifier carries (omitted from its to_dict, so
# classification result keys are unchanged).
DETECTION_DEFAULTS: dict[str, Any] = {
    "detector": "none",
    "fpn": "conv",
    "p6_from": "p5",
    "anchor_scales": 2,
    "head_predictor": "attention",
    "head_norm": "none",
}


@dataclass(frozen=True)
class ModelSpec:
    """A network, fully described. Field names are the CLI's (``--k`` -> ``kernel_size``)."""

    name: str = "custom"
    depth: int = 50
    stem: str = "conv"  # choices.Stem (as are pos, logits, border, scale below: choices.*)
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
    detector: str = "none"
    fpn: str = "conv"
    p6_from: str = "p5"
    anchor_scales: int = 2
    head_predictor: str = "attention"
    head_norm: str = "none"
    # A timm model (``timm:NAME`` on the command line): NAME, built by timm.create_model; then
    # only image_size, num_classes (and the name) describe it. "" = one of ours.
    timm: str = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # Choice members (Pos.ABSOLUTE...) are stored as their strings
            v = getattr(self, f.name)
            if isinstance(v, Choice):
                object.__setattr__(self, f.name, v.value)
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
        """Whether the network has *our* attention layers (a backend to run); False for timm models."""
        return not self.timm and (bool(self.attention_groups) or self.stem != "conv")

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["attention_groups"] = list(self.attention_groups)
        if self.detector == "none":
            for k in DETECTION_DEFAULTS:
                d.pop(k)
        if not self.timm:
            d.pop("timm")  # result keys of our models are unchanged by the field
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
        if text in ("none", "-"):
            return ()
        if text == "all":
            return (1, 2, 3, 4)
        items = [p.strip() for p in text.split(",")]
        if not text or "" in items:  # '' and '3,' are typos, not "none"
            raise SasaError(f"attention groups must be a comma list of 1..4 or 'none', got {value!r}")
    try:
        groups = tuple(sorted({int(p) for p in items}))
    except ValueError:
        raise SasaError(f"attention groups must be a comma list of 1..4 or 'none', got {value!r}") from None
    if any(g not in (1, 2, 3, 4) for g in groups):
        raise SasaError(f"attention groups must be among 1,2,3,4, got {value!r}")
    return groups


# Upper bounds that keep a typo from allocating the machine away (flops, latency and training all
# build the model): 16x ResNet-50's width is ~6 G parameters; 100k classes is 5x ImageNet-21k.
MAX_WIDTH = 16.0
MAX_CLASSES = 100_000
MAX_IMAGE_SIZE = 2048


def validate(spec: ModelSpec) -> None:
    """Reject anything the builder could not build, with one line saying what and why."""
    check_types(spec, "model")
    if spec.timm:
        _validate_timm(spec)
        return
    if spec.depth not in DEPTHS:
        raise SasaError(f"unknown depth {spec.depth} (choose from {', '.join(map(str, DEPTHS))})")
    Stem.check(spec.stem, "stem")
    if not isinstance(spec.attention_groups, tuple) or any(
        g not in (1, 2, 3, 4) for g in spec.attention_groups
    ):
        raise SasaError(f"attention groups must be among 1,2,3,4, got {spec.attention_groups!r}")
    if not 0 < spec.width <= MAX_WIDTH:
        raise SasaError(f"width multiplier must be in (0, {MAX_WIDTH:g}], got {spec.width}")
    if not 1 <= spec.num_classes <= MAX_CLASSES:
        raise SasaError(f"num classes must be in 1..{MAX_CLASSES}, got {spec.num_classes}")
    if spec.image_size < 32 or spec.image_size % 32 or spec.image_size > MAX_IMAGE_SIZE:
        raise SasaError(
            f"image size must be a multiple of 32 (the network downsamples 32x) in 32..{MAX_IMAGE_SIZE}, got {spec.image_size}"
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
    _validate_detection(spec)


# What a timm spec holds besides its name, image size and classes (and the neutral backend).
TIMM_FIELDS = ("image_size", "num_classes", "backend")


def _timm_base(name: str, image_size: int = 224) -> ModelSpec:
    return ModelSpec(name=f"timm:{name}", timm=name, attention_groups=(), image_size=image_size)


def _validate_timm(spec: ModelSpec) -> None:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", spec.timm):
        raise SasaError(f"not a timm model name: {spec.timm!r}")
    neutral = {f.name: f.default for f in dataclasses.fields(ModelSpec)} | {"attention_groups": ()}
    other = [f for f, v in neutral.items() if f not in (*TIMM_FIELDS, "name", "timm") and getattr(spec, f) != v]
    if other:
        raise SasaError(
            f"timm:{spec.timm} is timm's model: only --image-size and --num-classes apply to it "
            f"(got {', '.join(o.replace('_', ' ') for o in other)})"
        )
    if not 1 <= spec.num_classes <= MAX_CLASSES:
        raise SasaError(f"num classes must be in 1..{MAX_CLASSES}, got {spec.num_classes}")
    if not 16 <= spec.image_size <= MAX_IMAGE_SIZE:
        raise SasaError(f"image size must be in 16..{MAX_IMAGE_SIZE}, got {spec.image_size}")


def timm_spec(model: str, **overrides: Any) -> ModelSpec:
    """``timm:NAME`` (+ image_size / num_classes) -> its ModelSpec, at timm's default input size."""
    from sasa_bench.models.timm_models import check_timm_name, default_image_size

    name = check_timm_name(model)
    base = _timm_base(name, default_image_size(name))
    changes = {k: v for k, v in overrides.items() if v is not None}
    unknown = set(changes) - SPEC_FIELDS
    if unknown:
        raise SasaError(f"unknown model option(s): {', '.join(sorted(unknown))}")
    other = sorted(set(changes) - {*TIMM_FIELDS, "name"})
    if other:
        flags = ", ".join("--" + ("k" if o == "kernel_size" else o.replace("_", "-")) for o in other)
        raise SasaError(f"{model} is timm's model: only --image-size and --num-classes apply to it (got {flags})")
    spec = base.replace(**changes)
    if "name" not in changes and spec != base:
        diffs = [f"{k}={v}" for k in ("image_size", "num_classes") if (v := getattr(spec, k)) != getattr(base, k)]
        spec = spec.replace(name=base.name + (f"[{' '.join(diffs)}]" if diffs else ""))
    return spec


def _validate_detection(spec: ModelSpec) -> None:
    for name, choices in (
        ("detector", DETECTOR_CHOICES),
        ("fpn", FPN_CHOICES),
        ("p6_from", P6_CHOICES),
        ("head_predictor", HEAD_PREDICTOR_CHOICES),
        ("head_norm", HEAD_NORM_CHOICES),
    ):
        if getattr(spec, name) not in choices:
            raise SasaError(f"unknown {name.replace('_', ' ')} {getattr(spec, name)!r} (choose from {', '.join(choices)})")
    if spec.detector == "none":
        changed = [k for k, v in DETECTION_DEFAULTS.items() if getattr(spec, k) != v]
        if changed:
            raise SasaError(f"{', '.join(changed)} only apply to a detector (e.g. --model retinanet_resnet50)")
        return
    if not 1 <= spec.anchor_scales <= 4:
        raise SasaError(f"anchor scales must be 1..4 per octave, got {spec.anchor_scales}")
    if spec.image_size < 128:
        raise SasaError(f"a RetinaNet needs image size >= 128 (P7 is 1/128 of the input), got {spec.image_size}")
    if spec.fpn == "attention":
        check_attention_args(FPN_WIDTH, spec.kernel_size, spec.heads, spec.pos, spec.logits, spec.border, spec.scale)


def _presets() -> dict[str, ModelSpec]:
    out: dict[str, ModelSpec] = {}
    for depth in DEPTHS:
        out[f"resnet{depth}"] = ModelSpec(name=f"resnet{depth}", depth=depth, attention_groups=())
        out[f"sasa_resnet{depth}_convstem"] = ModelSpec(name=f"sasa_resnet{depth}_convstem", depth=depth)
        out[f"sasa_resnet{depth}"] = ModelSpec(name=f"sasa_resnet{depth}", depth=depth, stem="attention")
    for name in TABLE2_MODELS:
        out[name] = _retinanet(name, {c.name: c for c in out.values()})
    return out


# The five detectors of the paper's Table 2, in its order.
TABLE2_MODELS = [
    "retinanet_resnet50",
    "retinanet_sasa_resnet50_convstem",
    "retinanet_sasa_resnet50",
    "retinanet_sasa_resnet50_convstem_attnfpn",
    "retinanet_sasa_resnet50_attnfpn",
]
# COCO at the paper's counting size: 90 class slots (COCO's category ids 1..90, as in the
# TF/TPU RetinaNet) and a 640 x 640 input (the recipe's maximum dimension).
DETECTION_CLASSES = 90
DETECTION_IMAGE_SIZE = 640


def _retinanet(name: str, classifiers: dict[str, ModelSpec]) -> ModelSpec:
    backbone = name.removeprefix("retinanet_").removesuffix("_attnfpn")
    return classifiers[backbone].replace(
        name=name,
        detector="retinanet",
        fpn="attention" if name.endswith("_attnfpn") else "conv",
        num_classes=DETECTION_CLASSES,
        image_size=DETECTION_IMAGE_SIZE,
    )


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
    """A preset (or the defaults, or ``timm:NAME``) with the given fields replaced; ``None``
    values are ignored."""
    if model and model.startswith("timm:"):
        return timm_spec(model, **overrides)
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
    ref_name = base
    if spec.detector != "none":
        suffix = "_attnfpn" if spec.fpn == "attention" else ""
        base = f"retinanet_{base}{suffix}"
        ref_name = base if base in PRESETS else f"retinanet_{re.sub(r'resnet[0-9]+', 'resnet50', ref_name)}{suffix}"
    ref = PRESETS[ref_name].to_dict()
    ref["depth"] = spec.depth  # a depth with no detector preset: named after the depth-50 one
    diffs = [
        f"{k}={_short(v)}"
        for k, v in spec.to_dict().items()
        if k not in ("name", "backend") and v != ref.get(k) and not (k == "attention_groups" and not v and not ref[k])
    ]
    return base + (f"[{' '.join(diffs)}]" if diffs else "")


def _short(v: Any) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) or "none"
    return str(v)
