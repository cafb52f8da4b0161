"""One study file -> a validated :class:`Study`.

A study is a TOML file in ``ablations/`` (the file name, without ``.toml``, is the study's name)::

    title = "Spatial extent k (ResNet-50, conv stem + attention)"
    paper_ref = "Table 4"                 # where in the paper, or "none (...)"
    description = "..."                   # what is varied and why
    metric = "ImageNet val top-1"         # what the paper's accuracy numbers are
    vary = "kernel_size"                  # optional: the ModelSpec field the variants vary (x axis)
    plots = ["sweep"]                     # optional: sweep | bars | pareto | latency | latency_gflops
    latency_vs = "base"                   # "base" (the base model), a preset name or timm:NAME

    [base]
    model = "sasa_resnet50_convstem"      # a preset (`sasa-bench models`)
    # ...any ModelSpec field as an override, e.g. heads = 8

    [[variant]]
    name = "k3"                           # file-safe id (result files are named after it)
    label = "k = 3"                       # optional display name (default: name)
    model = "resnet50"                    # optional: another preset than the base's, or timm:NAME
    set = { kernel_size = 3 }             # optional: ModelSpec overrides on top of [base]
    paper = { top1 = 76.4 }               # optional: the paper's numbers (top1, gflops, params_m)
    note = "..."                          # optional: e.g. where a paper number comes from
    latency_vs = "resnet26"               # optional: this variant's latency baseline

The paper's numbers live in the study file, next to the variant they belong to; a test checks
them against :mod:`sasa_bench.report.paper` so the two cannot drift apart.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from sasa_bench.errors import SasaError
from sasa_bench.spec import PRESETS, SPEC_FIELDS

PLOTS = ("sweep", "bars", "pareto", "latency", "latency_gflops")
PAPER_KEYS = ("top1", "gflops", "params_m")
_TOP_KEYS = {"title", "paper_ref", "description", "metric", "vary", "plots", "latency_vs", "base", "variant"}
_VARIANT_KEYS = {"name", "label", "model", "set", "paper", "note", "latency_vs"}
_ALIASES = {"k": "kernel_size"}  # the CLI's spelling is accepted too
_NAME_RE = re.compile(r"^[A-Za-z0-9_.=,+-]+$")


@dataclass(frozen=True)
class VariantDef:
    """One variant as written in the study file (not yet a ModelSpec)."""

    name: str
    label: str
    model: str | None = None
    set: dict[str, Any] = field(default_factory=dict)
    paper: dict[str, float] = field(default_factory=dict)
    note: str = ""
    latency_vs: str | None = None


@dataclass(frozen=True)
class Study:
    name: str
    title: str
    paper_ref: str
    description: str
    metric: str
    base_model: str
    base_set: dict[str, Any]
    variants: tuple[VariantDef, ...]
    vary: str | None = None
    plots: tuple[str, ...] = ("bars",)
    latency_vs: str = "base"
    path: Path | None = None

    @property
    def summary(self) -> str:
        """One line for ``ablate --list``."""
        return f"{self.title} [{self.paper_ref}; {len(self.variants)} variants]"


def studies_dir() -> Path:
    """Where study files live: ``$SASA_BENCH_STUDIES``; else the checkout's top-level
    ``ablations/`` (the source of truth, for a clone or an editable install); else the copy a
    wheel ships as ``sasa_bench/ablations/`` (pyproject maps the top-level folder there)."""
    env = os.environ.get("SASA_BENCH_STUDIES")
    if env:
        return Path(env)
    package = Path(__file__).resolve().parents[1]
    checkout = package.parent / "ablations"
    return checkout if checkout.is_dir() else package / "ablations"


def find_studies(directory: Path | None = None) -> dict[str, Path]:
    """Study name -> file, sorted by name."""
    d = directory or studies_dir()
    return {p.stem: p for p in sorted(d.glob("*.toml"))} if d.is_dir() else {}


def load_study(name_or_path: str | Path, directory: Path | None = None) -> Study:
    """A study by name (``ablations/<name>.toml``) or by path to a ``.toml`` file."""
    p = Path(name_or_path)
    if p.suffix == ".toml" and p.is_file():
        return parse_study(p)
    known = find_studies(directory)
    if str(name_or_path) not in known:
        listing = ", ".join(known) or f"none found in {directory or studies_dir()}"
        raise SasaError(f"unknown study {str(name_or_path)!r} (known: {listing})")
    return parse_study(known[str(name_or_path)])


def parse_study(path: Path) -> Study:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise SasaError(f"cannot read study file {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise SasaError(f"study file {path}: invalid TOML: {e}") from None
    return study_from_dict(data, name=Path(path).stem, path=Path(path))


def study_from_dict(data: dict[str, Any], name: str, path: Path | None = None) -> Study:
    where = f"study {name!r}" + (f" ({path})" if path else "")

    def fail(msg: str) -> SasaError:
        return SasaError(f"{where}: {msg}")

    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(f"unknown key(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(_TOP_KEYS))})")
    for key in ("title", "paper_ref", "metric"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise fail(f"needs a non-empty string {key!r}")
    base = data.get("base")
    if not isinstance(base, dict) or "model" not in base:
        raise fail("needs a [base] table with a preset `model`")
    base = dict(base)
    base_model = _preset(base.pop("model"), fail)
    base_set = _overrides(base, fail, "[base]")

    vary = data.get("vary")
    if vary is not None:
        vary = _ALIASES.get(vary, vary)
        if vary not in SPEC_FIELDS:
            raise fail(f"vary={vary!r} is not a model field")
    plots = data.get("plots", ["bars"])
    if not isinstance(plots, list) or any(p not in PLOTS for p in plots):
        raise fail(f"plots must be a list among {', '.join(PLOTS)}, got {plots!r}")
    if "sweep" in plots and vary is None:
        raise fail("a 'sweep' plot needs `vary` (the field on the x axis)")
    latency_vs = data.get("latency_vs", "base")
    if latency_vs != "base":
        _preset(latency_vs, fail)

    raw = data.get("variant")
    if not isinstance(raw, list) or not raw:
        raise fail("needs at least one [[variant]]")
    variants = []
    seen: set[str] = set()
    for i, v in enumerate(raw, 1):
        if not isinstance(v, dict):
            raise fail(f"variant #{i} must be a table")
        vname = v.get("name")
        vwhere = f"variant {vname!r}" if vname else f"variant #{i}"
        if not isinstance(vname, str) or not _NAME_RE.match(vname):
            raise fail(f"{vwhere}: needs a `name` of letters, digits and _.=,+- only")
        if "__" in vname:
            raise fail(f"{vwhere}: `name` may not contain '__' (it separates name and seed in file names)")
        if vname in seen:
            raise fail(f"{vwhere}: duplicate name")
        seen.add(vname)
        extra = set(v) - _VARIANT_KEYS
        if extra:
            raise fail(f"{vwhere}: unknown key(s) {', '.join(sorted(extra))} (allowed: {', '.join(sorted(_VARIANT_KEYS))})")
        vset = v.get("set", {})
        if not isinstance(vset, dict):
            raise fail(f"{vwhere}: `set` must be a table of model fields")
        paper = v.get("paper", {})
        if not isinstance(paper, dict) or any(
            k not in PAPER_KEYS or isinstance(x, bool) or not isinstance(x, (int, float)) for k, x in paper.items()
        ):
            raise fail(f"{vwhere}: `paper` must map {', '.join(PAPER_KEYS)} to numbers, got {paper!r}")
        vs = v.get("latency_vs")
        if vs is not None and vs != "base":
            _preset(vs, fail)
        variants.append(
            VariantDef(
                name=vname,
                label=str(v.get("label", vname)),
                model=_preset(v["model"], fail) if "model" in v else None,
                set=_overrides(vset, fail, vwhere),
                paper={k: float(x) for k, x in paper.items()},
                note=str(v.get("note", "")),
                latency_vs=vs,
            )
        )
    return Study(
        name=name,
        title=data["title"].strip(),
        paper_ref=data["paper_ref"].strip(),
        description=" ".join(str(data.get("description", "")).split()),
        metric=data["metric"].strip(),
        base_model=base_model,
        base_set=base_set,
        variants=tuple(variants),
        vary=vary,
        plots=tuple(plots),
        latency_vs=latency_vs,
        path=path,
    )


_TIMM_RE = re.compile(r"^timm:[A-Za-z0-9_.-]+$")


def _preset(name: Any, fail: Any) -> str:
    """A preset, or ``timm:NAME`` (checked against timm's registry when the study is expanded,
    so ``ablate --list`` works without timm installed)."""
    if isinstance(name, str) and _TIMM_RE.match(name):
        return name
    if not isinstance(name, str) or name not in PRESETS:
        raise fail(f"unknown model {name!r} (presets: {', '.join(PRESETS)}, or timm:NAME)")
    return name


def _overrides(d: dict[str, Any], fail: Any, where: str) -> dict[str, Any]:
    out = {_ALIASES.get(k, k): v for k, v in d.items()}
    bad = set(out) - SPEC_FIELDS - {"name"} or ({"name"} & set(out))
    if bad:
        raise fail(f"{where}: unknown model field(s) {', '.join(sorted(bad))} (fields: {', '.join(sorted(SPEC_FIELDS - {'name'}))})")
    return out
