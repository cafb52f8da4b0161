"""timm interop, both ways: any timm model as a ``timm:NAME`` baseline, and our presets in timm.

**timm -> us.** ``timm:NAME`` wherever a model is taken (``flops``, ``latency --model/--vs``,
study variants and baselines) becomes a :class:`~sasa_bench.spec.ModelSpec` with ``timm=NAME``;
:func:`create_timm_model` builds it with ``timm.create_model(NAME, pretrained=False,
num_classes=...)`` at timm's default input size (its ``pretrained_cfg['input_size']``) unless an
image size is given. Nothing downloads: no pretrained weights, ever.

**us -> timm.** Importing timm after or before ``sasa_bench`` registers our attention presets
(``sasa_resnet{26,38,50,101}`` and ``..._convstem``) in timm's registry with a
``pretrained_cfg`` (input size, mean/std, crop pct, interpolation; no weights, no URL), so
``timm.create_model("sasa_resnet50", num_classes=10)`` builds exactly
``sasa_bench.create_model("sasa_resnet50", num_classes=10)`` and timm's data config,
``benchmark.py`` and ``validate.py``-style code work on it. The conv baselines
(``resnet26/38/50/101``) are not registered: timm has its own ``resnet26/50/101`` and a second
registration would overwrite them (our ``resnet50`` is torchvision's, state dict for state dict,
which timm's ``resnet50`` is too up to key names).

timm is an optional extra (``pip install 'sasa-bench[timm]'``); without it, a ``timm:`` name is
one :class:`SasaError` line. The registration costs nothing when timm is never imported: a
post-import hook (:func:`install_timm_hook`) registers the presets the moment timm finishes
importing, so ``import sasa_bench`` does not import timm (~1-3 s).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.machinery  # noqa: F401 - ModuleSpec in the annotations
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from sasa_bench.errors import SasaError

PREFIX = "timm:"
INSTALL_HINT = "pip install 'sasa-bench[timm]'"

# Peer families (one colour and marker each in the figures): by timm name prefix, first match.
# How each family's attention differs from exact SASA is written in ablations/peers.toml.
FAMILY_PREFIXES: tuple[tuple[str, str], ...] = (
    ("halo2botnet", "halonet"),
    ("lamhalobotnet", "halonet"),
    ("halonet", "halonet"),
    ("sehalonet", "halonet"),
    ("eca_halonext", "halonet"),
    ("haloregnet", "halonet"),
    ("botnet", "botnet"),
    ("sebotnet", "botnet"),
    ("eca_botnext", "botnet"),
    ("lambda_resnet", "lambda"),
    ("swin", "swin"),
    ("resnet", "conv"),
)


def is_timm(name: str | None) -> bool:
    return isinstance(name, str) and name.startswith(PREFIX)


def strip_prefix(name: str) -> str:
    return name[len(PREFIX):] if is_timm(name) else name


def require_timm() -> Any:
    """The ``timm`` module, or one clear line saying how to install it."""
    try:
        import timm
    except ImportError:
        raise SasaError(f"timm models need timm, which is not installed: {INSTALL_HINT}") from None
    return timm


def check_timm_name(name: str) -> str:
    """``NAME`` (without the prefix) if timm has it; else one line with the nearest names."""
    timm = require_timm()
    name = strip_prefix(name)
    if not name or not timm.is_model(name):
        near = timm.list_models(f"*{name[:6]}*")[:5] if name else []
        hint = f" (e.g. {', '.join(near)})" if near else ""
        raise SasaError(f"timm has no model {name!r}{hint}; `sasa-bench models --timm PATTERN` lists them")
    return name


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's default pretrained_cfg of ``name`` as a dict (input size, crop, interpolation...)."""
    timm = require_timm()
    cfg = timm.models.get_pretrained_cfg(check_timm_name(name))
    return cfg.to_dict() if cfg is not None else {}


def default_image_size(name: str) -> int:
    """The input side timm builds ``name`` for (``pretrained_cfg['input_size']``), 224 if none."""
    size = pretrained_cfg(name).get("input_size") or (3, 224, 224)
    return int(size[-1])


def family(name: str) -> str:
    """The peer family of a timm model name (``halonet``, ``botnet``, ``lambda``, ``swin``,
    ``conv`` for ResNets), else ``timm``."""
    name = strip_prefix(name)
    return next((fam for prefix, fam in FAMILY_PREFIXES if name.startswith(prefix)), "timm")


def create_timm_model(name: str, num_classes: int = 1000, image_size: int | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained=False, num_classes=...)``; models whose layers are
    sized by the input (``fixed_input_size``: BoTNet, Swin) also get ``img_size``."""
    timm = require_timm()
    name = check_timm_name(name)
    kwargs: dict[str, Any] = {}
    if image_size is not None and pretrained_cfg(name).get("fixed_input_size"):
        kwargs["img_size"] = image_size
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
        except (AssertionError, ValueError, TypeError, RuntimeError) as e:
            at = f" at {image_size}x{image_size}" if image_size is not None else ""
            raise SasaError(f"timm:{name} cannot be built{at}: {e or type(e).__name__}") from None


@contextmanager
def explicit_attention(model: nn.Module) -> Iterator[None]:
    """Run timm's attention as explicit matmuls (``fused_attn = False``) for FLOP counting: both
    counters see q.k and the weighted sum as matrix products, as they see ours. PyTorch's fused
    ``scaled_dot_product_attention`` would be invisible to fvcore. Restored on exit."""
    changed = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
    for m in changed:
        m.fused_attn = False
    try:
        yield
    finally:
        for m in changed:
            m.fused_attn = True


def list_timm_models(pattern: str = "*") -> list[str]:
    """timm's model names matching a shell-style pattern (``halonet*``, ``*botnet*``)."""
    return list(require_timm().list_models(pattern or "*"))


# --------------------------------------------------------------------------- us -> timm
# The presets registered in timm: the attention models (timm has its own conv ResNets).
def registered_presets() -> list[str]:
    from sasa_bench.spec import PRESETS

    return [n for n, s in PRESETS.items() if s.detector == "none" and s.uses_attention]


def preset_pretrained_cfg(name: str) -> dict[str, Any]:
    """Our presets' data config in timm's terms. No weights (``url`` empty, no hub id): these are
    architectures. The values are what ``sasa-bench train --recipe paper`` evaluates with: 224
    input, resize 256 then center crop 224 (crop_pct 0.875), bilinear, ImageNet mean/std."""
    from sasa_bench.spec import PRESETS

    spec = PRESETS[name]
    size = spec.image_size
    return {
        "url": "",
        "num_classes": spec.num_classes,
        "input_size": (3, size, size),
        "pool_size": (size // 32, size // 32),
        "crop_pct": 0.875,
        "interpolation": "bilinear",
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "stem.conv1" if spec.stem == "conv" else "stem.query",
        "classifier": "fc",
        "paper_ids": "arXiv:1906.05909",
        "paper_name": "Stand-Alone Self-Attention in Vision Models",
    }


def _from_timm_kwargs(variant: str, **kwargs: Any) -> nn.Module:
    """Our model from the keyword arguments timm hands a model class: ``num_classes``,
    ``in_chans`` (3 only), ``img_size`` (-> image_size), ``global_pool`` ('avg' only), zero
    drop rates, and any ModelSpec field (``kernel_size=9``, ``attention_groups="3,4"``...)."""
    from sasa_bench.models.factory import create_model

    in_chans = kwargs.pop("in_chans", 3)
    if in_chans != 3:
        raise SasaError(f"{variant}: in_chans={in_chans} is not supported (the stems take RGB)")
    pool = kwargs.pop("global_pool", "avg")
    if pool not in ("avg", "", None):
        raise SasaError(f"{variant}: global_pool={pool!r} is not supported (average pooling only)")
    for rate in ("drop_rate", "drop_path_rate"):
        if kwargs.pop(rate, 0.0):
            raise SasaError(f"{variant}: {rate} is not supported (the paper's models have no dropout)")
    img = kwargs.pop("img_size", None)
    if img is not None:
        kwargs["image_size"] = img if isinstance(img, int) else int(img[-1])
    return create_model(variant, **kwargs)


def _entrypoint(variant: str) -> Any:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        from timm.models import build_model_with_cfg

        if pretrained:
            raise SasaError(f"{variant}: sasa-bench ships no pretrained weights (create it with pretrained=False)")
        return build_model_with_cfg(functools.partial(_from_timm_kwargs, variant), variant, False, **kwargs)

    entry.__name__ = entry.__qualname__ = variant
    entry.__module__ = __name__
    entry.__doc__ = f"sasa-bench's {variant} (Ramachandran et al. 2019), exactly as sasa_bench.create_model builds it."
    return entry


_registered = False


def register_presets() -> list[str]:
    """Register our attention presets in timm's model registry (idempotent); returns the names."""
    global _registered
    names = registered_presets()
    if _registered:
        return names
    timm = require_timm()
    from timm.models import generate_default_cfgs, register_model

    module = sys.modules[__name__]
    module.default_cfgs = generate_default_cfgs({n: preset_pretrained_cfg(n) for n in names})  # type: ignore[attr-defined]
    for n in names:
        if timm.is_model(n) and timm.models.model_entrypoint(n).__module__ != __name__:
            warnings.warn(f"timm already has a model named {n}; not registering sasa-bench's", stacklevel=2)
            continue
        fn = _entrypoint(n)
        setattr(module, n, fn)
        register_model(fn)
    _registered = True
    return names


class _TimmHook(importlib.abc.MetaPathFinder):
    """Registers our presets right after ``import timm`` finishes (wherever it is imported)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)  # one shot; the other finders (site-packages, editable installs) locate timm
        spec = None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            try:
                register_presets()
            except Exception as e:  # noqa: BLE001 - never break `import timm`
                warnings.warn(f"sasa-bench: could not register its models in timm: {e}", stacklevel=2)

        loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install_timm_hook() -> None:
    """Register now if timm is imported already, else as soon as it is (see the module doc)."""
    if "timm" in sys.modules:
        try:
            register_presets()
        except Exception as e:  # noqa: BLE001
            warnings.warn(f"sasa-bench: could not register its models in timm: {e}", stacklevel=2)
    elif not any(isinstance(f, _TimmHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _TimmHook())
