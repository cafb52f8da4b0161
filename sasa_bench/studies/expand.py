"""A study -> its variants (one validated ModelSpec each) -> (variant, seed) units -> shards.

Two specs per variant:
  * ``spec``: the model the study describes, at the paper's scale (224x224, 1000 classes) unless
    the caller overrides fields; its params/GFLOPS are what is compared with the paper.
  * ``vs``: the model its latency is measured against (the study's base model or a preset).
The runner derives the spec it times/trains from ``spec`` (e.g. a smaller --image-size).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sasa_bench.errors import SasaError
from sasa_bench.spec import ModelSpec, make_spec
from sasa_bench.studies.spec import Study


@dataclass(frozen=True)
class Variant:
    name: str
    spec: ModelSpec
    label: str = ""
    vs: ModelSpec | None = None
    paper: dict[str, float] = field(default_factory=dict)
    note: str = ""
    index: int = 0  # position in the study file (the report keeps the paper's order)
    model: str = ""  # the preset ``spec`` starts from
    overrides: dict[str, Any] = field(default_factory=dict)  # ... and the fields set on top of it
    vs_model: str = ""  # the preset ``vs`` starts from
    vs_overrides: dict[str, Any] = field(default_factory=dict)  # ... and its fields on top
    varied: tuple[str, ...] = ()  # the fields the variant itself sets (its `set`), not the base's


@dataclass(frozen=True)
class Unit:
    """One result file's worth of work: a variant, a seed and the training recipe."""

    variant: Variant
    seed: int
    train: str = "none"

    @property
    def key(self) -> str:
        """The result file's name (without .json) inside ``<results>/<study>/``."""
        return result_key(self.variant.name, self.train, self.seed)


def result_key(variant: str, train: str, seed: int) -> str:
    return f"{variant}__{train}__seed{seed}"


def expand(study: Study, overrides: dict[str, Any] | None = None) -> list[Variant]:
    """Every variant of ``study`` as a validated ModelSpec; ``overrides`` apply to all (and to vs)."""
    extra = {k: v for k, v in (overrides or {}).items() if v is not None}
    out = []
    for i, v in enumerate(study.variants):
        try:
            preset = v.model or study.base_model
            fields = {**study.base_set, **v.set, **extra}
            spec = make_spec(preset, **fields)
            vs_name = v.latency_vs or study.latency_vs
            if vs_name == "base":
                vs_model, vs_fields = study.base_model, {**study.base_set, **extra}
            else:
                vs_model, vs_fields = vs_name, dict(extra)
            vs = make_spec(vs_model, **vs_fields)
        except SasaError as e:
            raise SasaError(f"study {study.name!r}, variant {v.name!r}: {e}") from None
        out.append(
            Variant(
                name=v.name, spec=spec, label=v.label, vs=vs, paper=dict(v.paper), note=v.note, index=i,
                model=preset, overrides=fields, vs_model=vs_model, vs_overrides=vs_fields, varied=tuple(v.set),
            )
        )
    return out


def units(variants: list[Variant], seeds: int = 1, train: str = "none") -> list[Unit]:
    """variants x seeds, variant-major. Without training a seed changes nothing: one unit each."""
    if seeds < 1:
        raise SasaError(f"--seeds must be >= 1, got {seeds}")
    n = 1 if train == "none" else seeds
    return [Unit(v, s, train) for v in variants for s in range(n)]


def parse_shard(text: str | None) -> tuple[int, int]:
    """``"I/N"`` (1-based) -> (I, N); None -> (1, 1)."""
    if text is None:
        return 1, 1
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise SasaError(f"--shard must look like I/N (e.g. 1/4), got {text!r}") from None
    if not (n >= 1 and 1 <= i <= n):
        raise SasaError(f"--shard I/N needs 1 <= I <= N, got {text!r}")
    return i, n


def shard_units(all_units: list[Unit], index: int, count: int) -> list[Unit]:
    """Shard ``index`` of ``count`` (1-based): every count-th unit, so shards stay balanced
    and the N shards together cover every unit exactly once."""
    return [u for j, u in enumerate(all_units) if j % count == index - 1]


# ModelSpec field -> CLI flag (fields without a flag are left out of printed commands).
_FLAGS = {
    "stem": "--stem",
    "attention_groups": "--attention-groups",
    "kernel_size": "--k",
    "heads": "--heads",
    "pos": "--pos",
    "logits": "--logits",
    "border": "--border",
    "scale": "--scale",
    "width": "--width",
    "image_size": "--image-size",
    "num_classes": "--num-classes",
    "stem_mixtures": "--stem-mixtures",
    "backend": "--backend",
}


def spec_flags(preset: str, overrides: dict[str, Any]) -> str:
    """``--model PRESET --flag value ...`` for a preset and the fields set on top of it,
    shell-quoted (a printed command runs when pasted)."""
    import shlex

    parts = ["--model", shlex.quote(preset)]
    for k, v in overrides.items():
        if k in _FLAGS:
            if isinstance(v, (list, tuple)):
                v = ",".join(map(str, v)) or "none"
            parts += [_FLAGS[k], shlex.quote(str(v))]
    return " ".join(parts)
