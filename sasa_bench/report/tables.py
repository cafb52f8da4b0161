"""Result files -> one table per study: ours beside the paper's numbers, with the deltas.

Rows are aggregated per variant from ``<results>/<study>/*.json`` (written by the study runner):

* params / GFLOPS / latency come from the variant's files at the largest input size measured
  (the paper's 224x224 when present); the paper deltas for GFLOPS and params are only given at
  224x224 with 1000 classes, where the two are comparable.
* accuracy is grouped by *source* = (training recipe, dataset): mean ± std over seeds. A
  Fashion-MNIST short-run accuracy is never compared with the paper's ImageNet number; the
  top-1 delta is only computed for our ImageNet runs with the paper recipe.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sasa_bench.store import collect
from sasa_bench.studies.spec import Study, find_studies, load_study

DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "imagenet": "ImageNet", "synthetic": "synthetic"}


@dataclass(frozen=True)
class Source:
    """Where an accuracy comes from: a training recipe on a dataset."""

    recipe: str
    dataset: str

    @property
    def label(self) -> str:
        ds = DATASET_NAMES.get(self.dataset, self.dataset)
        return f"{ds} top-1 ({self.recipe} recipe)"

    @property
    def key(self) -> str:
        return f"{self.recipe}_{self.dataset}".replace("-", "_")

    @property
    def comparable_to_paper(self) -> bool:
        return self.dataset == "imagenet" and self.recipe == "paper"


@dataclass
class Acc:
    mean: float
    std: float
    n: int
    top5: float | None
    params_m: float | None  # of the trained model
    gflops: float | None
    image_size: int | None
    width: float | None
    seeds: list[int] = field(default_factory=list)

    def text(self) -> str:
        if self.n == 1:
            return f"{self.mean:.2f} (n=1)"
        return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n})"


@dataclass
class StudyTable:
    study: Study | None
    name: str
    rows: list[dict[str, Any]]
    sources: list[Source]
    records: list[dict[str, Any]]

    @property
    def title(self) -> str:
        return self.study.title if self.study else self.name

    @property
    def has_results(self) -> bool:
        return bool(self.records)


def family(spec: dict[str, Any]) -> str:
    """conv (no attention anywhere) or attention."""
    return "attention" if spec.get("attention_groups") or spec.get("stem", "conv") != "conv" else "conv"


def as_percent(x: float | None) -> float | None:
    """Accuracies are stored as percentages (run_training's summary)."""
    return None if x is None else float(x)


def study_records(results_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Study result files grouped by study name (other result kinds are ignored)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rec in collect(results_dir):
        if "study" in rec and "variant" in rec:
            out.setdefault(rec["study"], []).append(rec)
    return out


def build_tables(results_dir: Path, studies_dir: Path | None = None) -> list[StudyTable]:
    """One table per known study (in name order, empty when it has no results), then any study
    that has results but no file in ablations/."""
    by_study = study_records(Path(results_dir))
    tables = []
    known = find_studies(studies_dir)
    for name, path in known.items():
        tables.append(study_table(load_study(path), by_study.get(name, []), name))
    for name in sorted(set(by_study) - set(known)):
        tables.append(study_table(None, by_study[name], name))
    return tables


def _measure_pick(recs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The record whose params/FLOPs/latency represent the variant: largest input, latest."""
    if not recs:
        return None
    return max(recs, key=lambda r: (r.get("spec", {}).get("image_size", 0), r.get("latency") is not None, r.get("written_at", "")))


def study_table(study: Study | None, records: list[dict[str, Any]], name: str) -> StudyTable:
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    # Variant order: the study file's, then anything only found in results.
    order: list[tuple[str, str, dict[str, float], str]] = []
    if study is not None:
        order = [(v.name, v.label, dict(v.paper), v.note) for v in study.variants]
    listed = {o[0] for o in order}
    extra = sorted((n for n in by_variant if n not in listed), key=lambda n: (by_variant[n][0].get("index", 0), n))
    for n in extra:
        r0 = by_variant[n][0]
        order.append((n, r0.get("label", n), dict(r0.get("paper") or {}), r0.get("note", "")))

    sources: list[Source] = []
    for r in records:
        t = r.get("training")
        if t:
            s = Source(t.get("recipe", r.get("train", "?")), t.get("dataset") or "?")
            if s not in sources:
                sources.append(s)

    rows = []
    for vname, label, paper, note in order:
        recs = by_variant.get(vname, [])
        m = _measure_pick(recs)
        lat_rec = max(
            (r for r in recs if r.get("latency")),
            key=lambda r: (r.get("spec", {}).get("image_size", 0), r.get("written_at", "")),
            default=None,
        )
        spec = (m or {}).get("spec", {})
        fl = (m or {}).get("flops") or {}
        lat = (lat_rec or {}).get("latency") or {}
        row: dict[str, Any] = {
            "variant": vname,
            "label": label,
            "model": spec.get("name"),
            "family": family(spec) if spec else None,
            "image_size": spec.get("image_size"),
            "num_classes": spec.get("num_classes"),
            "params_m": fl.get("params_m"),
            "gflops": fl.get("gflops"),
            "latency_ms": lat.get("median_ms"),
            "vs_model": lat.get("vs_model"),
            "vs_latency_ms": lat.get("vs_median_ms"),
            "time_ratio": lat.get("time_ratio"),
            "latency_batch": lat.get("batch_size"),
            "latency_image_size": (lat_rec or {}).get("spec", {}).get("image_size") if lat else None,
            "latency_device": lat.get("device_name"),
            "paper_top1": paper.get("top1"),
            "paper_gflops": paper.get("gflops"),
            "paper_params_m": paper.get("params_m"),
            "note": note,
            "n_files": len(recs),
            "spec": spec,
        }
        if study is not None and study.vary and spec:
            val = spec.get(study.vary)
            row["vary"] = (",".join(map(str, val)) or "none") if isinstance(val, list) else val
        paper_scale = row["image_size"] == 224 and row["num_classes"] == 1000
        row["d_gflops"] = _delta(row["gflops"], row["paper_gflops"]) if paper_scale else None
        row["d_params_m"] = _delta(row["params_m"], row["paper_params_m"]) if row["num_classes"] == 1000 else None
        row["acc"] = {}
        for s in sources:
            acc = _accuracy([r for r in recs if r.get("training")], s)
            if acc is not None:
                row["acc"][s.key] = acc
                row[f"top1_{s.key}"] = acc.mean
                row[f"top1_std_{s.key}"] = acc.std
                row[f"n_{s.key}"] = acc.n
                if s.comparable_to_paper:
                    row["d_top1"] = _delta(acc.mean, row["paper_top1"])
        rows.append(row)
    return StudyTable(study=study, name=name, rows=rows, sources=sources, records=records)


def _delta(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _accuracy(recs: list[dict[str, Any]], s: Source) -> Acc | None:
    mine = [
        r for r in recs
        if r["training"].get("recipe", r.get("train")) == s.recipe and (r["training"].get("dataset") or "?") == s.dataset
    ]
    vals = [(r.get("seed", 0), as_percent(r["training"].get("top1")), r) for r in mine]
    vals = [(seed, v, r) for seed, v, r in vals if v is not None and not math.isnan(v)]
    if not vals:
        return None
    # One value per seed: the latest file wins (a --force re-run replaces, it does not add).
    per_seed: dict[int, tuple[float, dict[str, Any]]] = {}
    for seed, v, r in sorted(vals, key=lambda t: t[2].get("written_at", "")):
        per_seed[seed] = (v, r)
    xs = [v for v, _ in per_seed.values()]
    t5 = [as_percent(r["training"].get("top5")) for _, r in per_seed.values()]
    t5 = [x for x in t5 if x is not None]
    last = list(per_seed.values())[-1][1]["training"]
    tspec, tfl = last.get("spec") or {}, last.get("flops") or {}
    return Acc(
        mean=statistics.fmean(xs),
        std=statistics.stdev(xs) if len(xs) > 1 else 0.0,
        n=len(xs),
        top5=statistics.fmean(t5) if t5 else None,
        params_m=tfl.get("params_m"),
        gflops=tfl.get("gflops"),
        image_size=tspec.get("image_size"),
        width=tspec.get("width"),
        seeds=sorted(per_seed),
    )


# --------------------------------------------------------------------------- rendering


def _f(x: Any, digits: int = 2, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"
    return str(x)


def columns(t: StudyTable) -> list[tuple[str, str]]:
    """(key, header) of the table, in order."""
    cols = [("label", "variant"), ("model", "model")]
    cols += [("params_m", "params (M)"), ("paper_params_m", "paper params (M)"), ("d_params_m", "Δ params")]
    cols += [("gflops", "GFLOPS"), ("paper_gflops", "paper GFLOPS"), ("d_gflops", "Δ GFLOPS")]
    vs = {r.get("vs_model") for r in t.rows if r.get("time_ratio") is not None}
    cols += [("time_ratio", f"latency ratio vs {vs.pop()}" if len(vs) == 1 else "latency ratio vs baseline")]
    bs = {r.get("latency_batch") for r in t.rows if r.get("latency_ms") is not None}
    cols += [("latency_ms", f"latency (ms per batch of {bs.pop()})" if len(bs) == 1 else "latency (ms per batch)")]
    for s in t.sources:
        cols.append((f"acc:{s.key}", f"ours: {s.label}, mean ± std"))
    metric = t.study.metric if t.study else "top-1"
    cols.append(("paper_top1", f"paper: {metric}"))
    if any(s.comparable_to_paper for s in t.sources):
        cols.append(("d_top1", "Δ top-1"))
    return cols


def cell(row: dict[str, Any], key: str, one_baseline: bool = False) -> str:
    if key.startswith("acc:"):
        acc = row["acc"].get(key[4:])
        return acc.text() if acc else "—"
    v = row.get(key)
    if key.startswith("d_"):
        return _f(v, 2, signed=True)
    if key == "time_ratio":
        if v is None:
            return "—"
        return f"{v:.2f}×" if one_baseline else f"{v:.2f}× vs {row.get('vs_model')}"
    if key in ("paper_top1", "paper_gflops", "paper_params_m"):
        return _f(v, 1)
    if key == "latency_ms":
        return _f(v, 1)
    return _f(v)


def markdown(t: StudyTable) -> str:
    cols = columns(t)
    one = len({r.get("vs_model") for r in t.rows if r.get("time_ratio") is not None}) == 1
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in t.rows:
        lines.append("| " + " | ".join(cell(r, k, one).replace("|", "\\|") for k, _ in cols) + " |")
    return "\n".join(lines)


def to_csv(t: StudyTable) -> str:
    """Machine-readable copy: raw numbers (no formatting), one row per variant."""
    keys = [
        "variant", "label", "model", "family", "vary", "image_size", "num_classes", "params_m", "paper_params_m",
        "d_params_m", "gflops", "paper_gflops", "d_gflops", "latency_ms", "vs_model", "vs_latency_ms", "time_ratio",
        "latency_batch", "latency_image_size", "latency_device",
    ]
    for s in t.sources:
        keys += [f"top1_{s.key}", f"top1_std_{s.key}", f"n_{s.key}"]
    keys += ["paper_top1", "d_top1", "note", "n_files"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in t.rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in keys})
    return buf.getvalue()
