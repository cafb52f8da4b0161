"""The model options every model-building command shares, declared once.

``@model_options`` adds ``--model`` and the ModelSpec overrides to a Typer command's signature
and hands the command a :class:`ModelOptions`; so ``flops``, ``latency``, ``train`` and
``ablate`` accept exactly the same flags with the same meaning.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from sasa_bench.choices import (
    DEVICE_COMPLETIONS,
    DEVICE_HELP,
    Border,
    Format,
    Logits,
    Pos,
    Scale,
    Stem,
    plain,
)
from sasa_bench.errors import SasaError
from sasa_bench.spec import ModelSpec, make_spec

_PANEL = "Model"
_DET = "Detector"

# name -> (annotation, default). Defaults are None = "not given": the preset (or ModelSpec's
# defaults when no --model) decides.
_MODEL_PARAMS: dict[str, tuple[Any, Any]] = {
    "model": (
        Annotated[
            list[str] | None,
            typer.Option("--model", "-m", help="Preset name (repeat for several; see `sasa-bench models`) or timm:NAME (any timm model, at its default input size; `sasa-bench models --timm PATTERN`).", rich_help_panel=_PANEL),
        ],
        None,
    ),
    "depth": (Annotated[int | None, typer.Option(help="ResNet depth: 26, 38, 50 or 101. (default: 50)", rich_help_panel=_PANEL)], None),
    "stem": (
        Annotated[
            Stem | None,
            typer.Option(help="The stem: conv (torchvision's) or the paper's attention stem (Table 7 variants). (default: conv)", rich_help_panel=_PANEL, show_default=False),
        ],
        None,
    ),
    "attention_groups": (
        Annotated[
            str | None,
            typer.Option(help="Residual groups using attention: e.g. 1,2,3,4 or 3,4 or none. (default: 1,2,3,4)", rich_help_panel=_PANEL),
        ],
        None,
    ),
    "k": (Annotated[int | None, typer.Option("--k", help="Spatial extent k (odd). (default: 7)", rich_help_panel=_PANEL)], None),
    "heads": (Annotated[int | None, typer.Option(help="Attention heads. (default: 8)", rich_help_panel=_PANEL)], None),
    "pos": (Annotated[Pos | None, typer.Option(help="Positional term of the logits (Table 5). (default: relative)", rich_help_panel=_PANEL, show_default=False)], None),
    "logits": (Annotated[Logits | None, typer.Option(help="Logit terms; qr drops W_K (Table 6). (default: qk+qr)", rich_help_panel=_PANEL, show_default=False)], None),
    "border": (Annotated[Border | None, typer.Option(help="mask: outside keys get no softmax mass; zeros: zero-padded keys/values (public ports). (default: mask)", rich_help_panel=_PANEL, show_default=False)], None),
    "scale": (Annotated[Scale | None, typer.Option(help="Logit scaling: none (the paper) or rsqrt (1/sqrt(d)). (default: none)", rich_help_panel=_PANEL, show_default=False)], None),
    "width": (Annotated[float | None, typer.Option(help="Width multiplier. (default: 1.0)", rich_help_panel=_PANEL)], None),
    "image_size": (Annotated[int | None, typer.Option(help="Input size (multiple of 32). (default: 224)", rich_help_panel=_PANEL)], None),
    "num_classes": (Annotated[int | None, typer.Option(help="Classifier outputs. (default: 1000)", rich_help_panel=_PANEL)], None),
    "stem_mixtures": (Annotated[int | None, typer.Option(help="Value mixtures m of the attention stem. (default: 4)", rich_help_panel=_PANEL)], None),
    "backend": (Annotated[str | None, typer.Option(help="Attention backend (see `sasa-bench backends`). (default: auto)", rich_help_panel=_PANEL)], None),
    # Detectors (retinanet_* presets, Table 2).
    "fpn": (Annotated[str | None, typer.Option(help="Detector FPN and heads: conv | attention. (default: the preset's)", rich_help_panel=_DET)], None),
    "p6_from": (Annotated[str | None, typer.Option(help="Detector P6 from p5 (reproduces Table 2) | c5. (default: p5)", rich_help_panel=_DET)], None),
    "anchor_scales": (Annotated[int | None, typer.Option(help="Anchor sizes per octave; x 3 aspect ratios = anchors per location. (default: 2)", rich_help_panel=_DET)], None),
    "head_predictor": (Annotated[str | None, typer.Option(help="Attention heads' last layer: attention (+1x1) | conv (1x1 + 3x3 conv). (default: attention)", rich_help_panel=_DET)], None),
    "head_norm": (Annotated[str | None, typer.Option(help="Detector head norm: none | gn. (default: none)", rich_help_panel=_DET)], None),
}

# CLI name -> ModelSpec field where they differ.
_FIELD = {"k": "kernel_size"}
# The fields that describe the setting rather than the network: a baseline (`latency --vs`) gets them too.
SHARED_FIELDS = ("width", "image_size", "num_classes", "backend")


@dataclass(frozen=True)
class ModelOptions:
    """The model flags as given (None = not given)."""

    values: dict[str, Any]

    @property
    def models(self) -> list[str]:
        return list(self.values.get("model") or [])

    def overrides(self) -> dict[str, Any]:
        return {
            _FIELD.get(k, k): plain(v) for k, v in self.values.items() if k != "model" and v is not None
        }

    def specs(self, default_models: list[str] | None = None) -> list[ModelSpec]:
        """One spec per ``--model`` (or per default model), each with the overrides applied."""
        names = self.models or default_models or [None]
        return [make_spec(name, **self.overrides()) for name in names]

    def spec(self) -> ModelSpec:
        specs = self.specs()
        if len(specs) != 1:
            raise SasaError("this command takes one --model")
        return specs[0]


def _inject(func: Callable[..., Any], params: dict[str, tuple[Any, Any]], target: str,
            make: Callable[[dict[str, Any]], Any]) -> Callable[..., Any]:
    """Add ``params`` (name -> (annotation, default)) to ``func``'s Typer signature; the command
    receives them gathered as ``target=make(values)``. Stackable (each adds its own group)."""
    sig = inspect.signature(func)
    own = [p for name, p in sig.parameters.items() if name != target]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in params.items()
    ]
    own_kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in params}
        return func(*args, **{target: make(values)}, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own_kw + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{k: v for k, v in func.__annotations__.items() if k != target},
        **{name: ann for name, (ann, _) in params.items()},
    }
    return wrapper


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: add the shared model flags to a command; it receives ``model_opts``."""
    return _inject(func, _MODEL_PARAMS, "model_opts", ModelOptions)


# Shared option types: one definition each, so every command validates, completes and documents
# them the same way.
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output: a table, or JSON / CSV (data on stdout).")]


def complete_device(incomplete: str) -> list[str]:
    """Shell completion for --device: auto, cpu, cuda and cuda:N for the GPUs visible here."""
    import torch

    names = [*DEVICE_COMPLETIONS, *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    return [n for n in names if n.startswith(incomplete)]


def device_option(help_prefix: str = "", panel: str | None = None, auto: bool = True) -> Any:
    """The --device option (free text: cuda:N is open-ended; parsed by hardware.parse_device)."""
    text = DEVICE_HELP if auto else DEVICE_HELP.replace("auto (cuda if available) | ", "")
    return typer.Option(help=f"{help_prefix}{text}", rich_help_panel=panel, autocompletion=complete_device)


# --------------------------------------------------------------------------- training flags

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def train_params() -> dict[str, tuple[Any, Any]]:
    """One flag per :class:`TrainConfig` field (metadata ``cli`` not False), generated from the
    field's type (or its metadata's ``choices``, a :class:`~sasa_bench.choices.Choice` set) and
    its metadata's help and panel; default None = "not given" (the recipe, then ``--config``,
    decide). Booleans get ``--x/--no-x``."""
    import dataclasses

    from sasa_bench.train.recipes import TrainConfig

    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(TrainConfig):
        if not f.metadata.get("cli", True):
            continue
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kinds = [p.strip() for p in ann.split("|") if p.strip() != "None"]
        if len(kinds) != 1 or kinds[0] not in _SCALARS:
            raise TypeError(f"TrainConfig.{f.name}: no flag for type {ann}")  # a programming error
        flag = "--" + f.name.replace("_", "-")
        names = [f"{flag}/--no-{flag[2:]}"] if kinds[0] == "bool" else [flag]
        option = typer.Option(*names, help=f.metadata.get("help", ""), rich_help_panel=f.metadata.get("panel", "Training"))
        kind = f.metadata.get("choices") or _SCALARS[kinds[0]]
        out[f.name] = (Annotated[kind | None, option], None)
    return out


def train_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: add a flag per training setting; the command receives ``train_overrides``, a
    dict of the given ones (``None`` = not given; choices as plain strings) for
    :func:`~sasa_bench.train.resolve_config`."""
    return _inject(func, train_params(), "train_overrides", lambda values: {k: plain(v) for k, v in values.items()})
