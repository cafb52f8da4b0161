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


def model_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator: add the shared model flags to a command; it receives ``model_opts``."""
    sig = inspect.signature(func)
    own = [p for name, p in sig.parameters.items() if name != "model_opts"]
    extra = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann)
        for name, (ann, default) in _MODEL_PARAMS.items()
    ]
    own_kw = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        values = {name: kwargs.pop(name, None) for name in _MODEL_PARAMS}
        return func(*args, model_opts=ModelOptions(values), **kwargs)

    wrapper.__signature__ = sig.replace(parameters=own_kw + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {
        **{k: v for k, v in func.__annotations__.items() if k != "model_opts"},
        **{name: ann for name, (ann, _) in _MODEL_PARAMS.items()},
    }
    return wrapper


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
