"""Result files -> one table per study: ours beside the paper's numbers, with deltas, intervals
and verdicts. Built from :func:`sasa_bench.results.load` (one DataFrame row per result file).

* params / GFLOPS / latency come from the variant's files at the largest input size measured
  (the paper's 224x224 when present); the paper deltas for GFLOPS and params are only given at
  224x224 with 1000 classes, where the two are comparable.
* accuracy is grouped by *source* = (training recipe, dataset): per variant the mean, std and a
  95% t-interval over seeds, and against the study's base variant the difference with its Welch
  95% interval and a verdict (:mod:`sasa_bench.report.stats`). A Fashion-MNIST short-run accuracy
  is never compared with the paper's ImageNet value; what is compared is the *ordering* (the
  paper's own difference against its base beside ours, and one ``Agreement with the paper:``
  line per study). A top-1 delta against the paper is only computed for ImageNet runs with the
  paper recipe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from sasa_bench.report import stats
from sasa_bench.results import family_of, frame
from sasa_bench.spec import make_spec
from sasa_bench.store import Problem, scan
from sasa_bench.studies.expand import expand
from sasa_bench.studies.spec import Study, find_studies, load_study

DATASET_NAMES = {"fashion-mnist": "Fashion-MNIST", "imagenet": "ImageNet", "synthetic": "synthetic"}
# Result folders that hold other kinds of results (commands' own files), not studies.
OTHER_KINDS = ("latency", "bench-layer", "gpu-check")


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
    """One variant's accuracy over seeds (one value per seed: the latest file of a seed wins)."""

    summary: stats.Summary
    values: list[float]
    seeds: list[int]
    top5: float | None
    params_m: float | None  # of the trained model
    gflops: float | None
    image_size: int | None
    width: float | None

    @property
    def mean(self) -> float:
        return self.summary.mean

    @property
    def std(self) -> float:
        return self.summary.std

    @property
    def n(self) -> int:
        return self.summary.n

    def text(self) -> str:
        if self.n == 1:
            return f"{self.mean:.2f} (n=1)"
        return f"{self.mean:.2f} ± {self.std:.2f} (n={self.n})"

    def interval_text(self) -> str:
        s = self.summary
        return "—" if s.low is None else f"[{s.low:.2f}, {s.high:.2f}]"


@dataclass
class StudyTable:
    study: Study | None
    name: str
    rows: list[dict[str, Any]]
    sources: list[Source]
    records: list[dict[str, Any]]
    frame: pd.DataFrame = field(default_factory=pd.DataFrame)
    base_variant: str | None = None

    @property
    def title(self) -> str:
        return self.study.title if self.study else self.name

    @property
    def has_results(self) -> bool:
        return bool(self.records)

    @property
    def main_source(self) -> Source | None:
        """The accuracy source the verdicts and the agreement line use (ImageNet/paper first)."""
        with_data = [s for s in self.sources if any(s.key in r["acc"] for r in self.rows)]
        return next((s for s in with_data if s.comparable_to_paper), with_data[0] if with_data else None)

    def agreement(self) -> stats.Agreement | None:
        s = self.main_source
        if s is None:
            return None
        ours = {r["variant"]: r["acc"][s.key].values for r in self.rows if s.key in r["acc"]}
        paper = {r["variant"]: r["paper_top1"] for r in self.rows if r.get("paper_top1") is not None}
        if not paper:
            return None
        return stats.agreement(ours, paper)


def family(spec: dict[str, Any]) -> str | None:
    """conv | convstem | full (see :func:`sasa_bench.results.family_of`)."""
    return family_of(spec)


@dataclass
class Tables:
    tables: list[StudyTable]
    problems: list[Problem]


def build_report_tables(
    results_dir: Path, studies_dir: Path | None = None, exclude: set[str] | None = None
) -> Tables:
    """Every known study's table (in name order, empty when it has no results), then any study
    that has results but no study file; and every result file that could not be used.
    ``exclude``: paths of files judged stale elsewhere (``studies.check``), left out of the tables."""
    records, problems = scan(Path(results_dir))  # each file read and validated once
    by_path = {r["_path"]: r for r in records}
    df = frame(records)
    if exclude and len(df):
        df = df[~df["path"].isin({str(p) for p in exclude})]
    known = find_studies(studies_dir)
    problems = [p for p in problems if p.path.parent.name not in OTHER_KINDS]
    by_study: dict[str, pd.DataFrame] = {}
    if len(df) and "study" in df:
        studies = df[df["study"].notna() & df["variant"].notna()]
        by_study = {str(name): g for name, g in studies.groupby("study", sort=True)}
    tables = []
    for name, path in known.items():
        tables.append(study_table(load_study(path), by_study.get(name, df.iloc[0:0]), name, by_path))
    for name in sorted(set(by_study) - set(known)):
        tables.append(study_table(None, by_study[name], name, by_path))
    return Tables(tables, problems)


def build_tables(results_dir: Path, studies_dir: Path | None = None, exclude: set[str] | None = None) -> list[StudyTable]:
    return build_report_tables(results_dir, studies_dir, exclude).tables


def base_variant(study: Study | None, variant_specs: dict[str, dict[str, Any]]) -> str | None:
    """The variant that *is* the study's base model (k = 7, relative, ...), else the first."""
    if study is None or not variant_specs:
        return next(iter(variant_specs), None)
    try:
        base = make_spec(study.base_model, **study.base_set).to_dict()
    except Exception:  # a study file that no longer builds still reports what it has
        return next(iter(variant_specs))
    return next((n for n, s in variant_specs.items() if s == base), next(iter(variant_specs)))


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def study_table(study: Study | None, g: pd.DataFrame, name: str, records_by_path: dict[str, dict[str, Any]]) -> StudyTable:
    """One study's table from its rows of the frame ``g`` (and the nested records behind them,
    for provenance and figures)."""
    records = [records_by_path[p] for p in g["path"]] if len(g) else []
    by_variant: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    # Variant order: the study file's, then anything only found in results.
    order: list[tuple[str, str, dict[str, float], str]] = []
    specs: dict[str, dict[str, Any]] = {}
    if study is not None:
        try:
            expanded = {v.name: v for v in expand(study, {})}
        except Exception:
            expanded = {}
        for v in study.variants:
            order.append((v.name, v.label or v.name, dict(v.paper), v.note))
            if v.name in expanded:
                specs[v.name] = expanded[v.name].spec.to_dict()
    listed = {o[0] for o in order}
    for n in sorted((n for n in by_variant if n not in listed), key=lambda n: (by_variant[n][0].get("index", 0), n)):
        r0 = by_variant[n][0]
        order.append((n, r0.get("label", n), dict(r0.get("paper") or {}), r0.get("note", "")))
    for n, recs in by_variant.items():
        specs.setdefault(n, recs[0].get("spec") or {})
    base = base_variant(study, {n: specs[n] for n, *_ in order if n in specs})

    trained = g[g["top1"].notna()] if len(g) and "top1" in g else g.iloc[0:0]
    sources = [Source(str(r), str(d)) for (r, d), _ in trained.groupby(["recipe", "dataset"], sort=False)] if len(trained) else []

    rows = []
    for vname, label, paper, note in order:
        recs = by_variant.get(vname, [])
        rows.append(_row(study, vname, label, paper, note, recs, trained, sources))
    for s in sources:
        base_row = next((r for r in rows if r["variant"] == base), None)
        base_acc = base_row["acc"].get(s.key) if base_row else None
        for r in rows:
            a = r["acc"].get(s.key)
            if a is not None and base_acc is not None and r["variant"] != base:
                r["diff"][s.key] = stats.difference(a.values, base_acc.values)
    base_paper = next((r.get("paper_top1") for r in rows if r["variant"] == base), None)
    for r in rows:
        r["is_base"] = r["variant"] == base
        r["paper_d_base"] = None if r["is_base"] or base_paper is None or r.get("paper_top1") is None else r["paper_top1"] - base_paper
    return StudyTable(study=study, name=name, rows=rows, sources=sources, records=records, frame=g,
                      base_variant=base)


def _row(
    study: Study | None, vname: str, label: str, paper: dict[str, float], note: str,
    recs: list[dict[str, Any]], trained: pd.DataFrame, sources: list[Source],
) -> dict[str, Any]:
    m = max(recs, key=lambda r: (r.get("spec", {}).get("image_size", 0), r.get("latency") is not None, r.get("written_at", "")), default=None)
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
        "peak_mem_mb": lat.get("peak_mem_mb"),
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
        "acc": {},
        "diff": {},
    }
    if study is not None and study.vary and spec:
        val = spec.get(study.vary)
        row["vary"] = (",".join(map(str, val)) or "none") if isinstance(val, list) else val
    # the paper's counting scale: ImageNet 224x224 / 1000 classes; detectors (Table 2) 640x640 / 90 slots
    scale = (640, 90) if spec and spec.get("detector", "none") != "none" else (224, 1000)
    paper_scale = (row["image_size"], row["num_classes"]) == scale
    row["d_gflops"] = _delta(row["gflops"], row["paper_gflops"]) if paper_scale else None
    row["d_params_m"] = _delta(row["params_m"], row["paper_params_m"]) if row["num_classes"] == scale[1] else None
    mine = trained[trained["variant"] == vname] if len(trained) else trained
    for s in sources:
        acc = _accuracy(mine[(mine["recipe"] == s.recipe) & (mine["dataset"] == s.dataset)])
        if acc is None:
            continue
        row["acc"][s.key] = acc
        row[f"top1_{s.key}"] = acc.mean
        row[f"top1_std_{s.key}"] = acc.std
        row[f"top1_low_{s.key}"] = acc.summary.low
        row[f"top1_high_{s.key}"] = acc.summary.high
        row[f"n_{s.key}"] = acc.n
        if s.comparable_to_paper:
            row["d_top1"] = _delta(acc.mean, row["paper_top1"])
    return row


def _delta(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _accuracy(g: pd.DataFrame) -> Acc | None:
    g = g[g["top1"].map(lambda x: _num(x) is not None)]
    if not len(g):
        return None
    # One value per seed: the latest file wins (a --force re-run replaces, it does not add).
    last = g.sort_values("written_at").groupby("seed", sort=True).tail(1).sort_values("seed")
    values = [float(x) for x in last["top1"]]
    t5 = [float(x) for x in last["top5"] if _num(x) is not None]
    newest = last.sort_values("written_at").iloc[-1]

    def col(name: str) -> Any:
        return _num(newest[name]) if name in newest else None

    image_size = col("training.spec.image_size")
    return Acc(
        summary=stats.summarize(values),
        values=values,
        seeds=[int(s) for s in last["seed"]],
        top5=sum(t5) / len(t5) if t5 else None,
        params_m=col("training.flops.params_m"),
        gflops=col("training.flops.gflops"),
        image_size=int(image_size) if image_size is not None else None,
        width=col("training.spec.width"),
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
    peers = any((r.get("spec") or {}).get("timm") for r in t.rows)  # timm models: cost only, not in the paper
    cols = [("label", "variant"), ("model", "model")]
    if peers:
        cols += [("family", "family"), ("params_m", "params (M)"), ("gflops", "GFLOPS")]
    else:
        cols += [("params_m", "params (M)"), ("paper_params_m", "paper params (M)"), ("d_params_m", "Δ params")]
        cols += [("gflops", "GFLOPS"), ("paper_gflops", "paper GFLOPS"), ("d_gflops", "Δ GFLOPS")]
    if len({r.get("image_size") for r in t.rows if r.get("image_size")}) > 1:
        cols.insert(2, ("image_size", "input"))  # e.g. the peers study: each model at its own size
    if peers:  # absolute cost, not only ratios
        cols += [("latency_ms", "latency (ms/batch)"), ("peak_mem_mb", "peak memory (MB)")]
    vs = {r.get("vs_model") for r in t.rows if r.get("time_ratio") is not None}
    cols += [("time_ratio", f"latency ratio vs {vs.pop()}" if len(vs) == 1 else "latency ratio vs baseline")]
    base = next((r["label"] for r in t.rows if r["is_base"]), t.base_variant)
    for s in t.sources:
        cols.append((f"acc:{s.key}", f"ours: {s.label}, mean ± std"))
        cols.append((f"ci:{s.key}", "95% interval"))
        cols.append((f"diff:{s.key}", f"ours − {base} [95% interval]"))
        cols.append((f"verdict:{s.key}", "verdict"))
    metric = t.study.metric if t.study else "top-1"
    if peers and not any(r.get("paper_top1") is not None for r in t.rows):
        return cols
    cols.append(("paper_top1", f"paper: {metric}"))
    if any(r.get("paper_d_base") is not None for r in t.rows):
        cols.append(("paper_d_base", f"paper − {base}"))
    if any(s.comparable_to_paper for s in t.sources):
        cols.append(("d_top1", "Δ top-1 (ours − paper)"))
    return cols


def cell(row: dict[str, Any], key: str, one_baseline: bool = False) -> str:
    kind, _, skey = key.partition(":")
    if kind == "acc" and skey:
        acc = row["acc"].get(skey)
        return acc.text() if acc else "—"
    if kind == "ci" and skey:
        acc = row["acc"].get(skey)
        return acc.interval_text() if acc else "—"
    if kind in ("diff", "verdict") and skey:
        if row.get("is_base") and skey in row["acc"]:
            return "base" if kind == "diff" else "—"
        d = row["diff"].get(skey)
        if d is None:
            return "—"
        if kind == "verdict":
            return d.verdict
        return f"{d.delta:+.2f}" + ("" if d.low is None else f" [{d.low:+.2f}, {d.high:+.2f}]")
    v = row.get(key)
    if key.startswith("d_") or key == "paper_d_base":
        return _f(v, 2 if key.startswith("d_") else 1, signed=True)
    if key == "time_ratio":
        if v is None:
            return "—"
        return f"{v:.2f}×" if one_baseline else f"{v:.2f}× vs {row.get('vs_model')}"
    if key in ("paper_top1", "paper_gflops", "paper_params_m"):
        return _f(v, 1)
    if key in ("latency_ms", "peak_mem_mb"):
        return _f(v, 1)
    if key == "image_size":
        return "—" if v is None else f"{v}²"
    return _f(v)


def markdown(t: StudyTable) -> str:
    cols = columns(t)
    one = len({r.get("vs_model") for r in t.rows if r.get("time_ratio") is not None}) == 1
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in t.rows:
        lines.append("| " + " | ".join(cell(r, k, one).replace("|", "\\|") for k, _ in cols) + " |")
    return "\n".join(lines)


CSV_KEYS = [
    "variant", "label", "model", "family", "vary", "image_size", "num_classes", "params_m", "paper_params_m",
    "d_params_m", "gflops", "paper_gflops", "d_gflops", "latency_ms", "vs_model", "vs_latency_ms", "time_ratio",
    "latency_batch", "latency_image_size", "latency_device", "peak_mem_mb",
]


def frame_of(t: StudyTable) -> pd.DataFrame:
    """The table as a DataFrame of raw numbers (no formatting), one row per variant."""
    keys = list(CSV_KEYS)
    for s in t.sources:
        keys += [f"top1_{s.key}", f"top1_std_{s.key}", f"top1_low_{s.key}", f"top1_high_{s.key}", f"n_{s.key}",
                 f"d_base_{s.key}", f"d_base_low_{s.key}", f"d_base_high_{s.key}", f"verdict_{s.key}"]
    keys += ["paper_top1", "paper_d_base", "d_top1", "is_base", "note", "n_files"]
    flat = []
    for r in t.rows:
        row = {k: r.get(k) for k in keys}
        for s in t.sources:
            d = r["diff"].get(s.key)
            if d is not None:
                row.update({f"d_base_{s.key}": d.delta, f"d_base_low_{s.key}": d.low,
                            f"d_base_high_{s.key}": d.high, f"verdict_{s.key}": d.verdict})
        flat.append(row)
    return pd.DataFrame(flat, columns=keys)


def to_csv(t: StudyTable) -> str:
    """Machine-readable copy of the table (see :func:`frame_of`)."""
    return frame_of(t).to_csv(index=False, lineterminator="\n")
