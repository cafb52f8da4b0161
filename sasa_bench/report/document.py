"""Assemble ``REPORT.md``: provenance, missing studies, then one section per study with its
table (ours beside the paper), a CSV copy and its figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sasa_bench.report import stats
from sasa_bench.report.figures import make_figures
from sasa_bench.report.tables import DATASET_NAMES, StudyTable, build_tables, markdown, to_csv
from sasa_bench.store import atomic_write_text


def write_report(
    results_dir: Path, out_dir: Path, studies_dir: Path | None = None, problems: list[Any] | None = None,
    notes: list[str] | None = None,
) -> tuple[Path, list[StudyTable]]:
    """Write ``out_dir/REPORT.md``, ``out_dir/tables/<study>.csv`` and ``out_dir/figures/*.png``.

    ``problems``: result files that do not count (``store.Problem``: unreadable, or stale against
    the study file), listed before any table and left out of the tables; ``notes``: warnings
    (e.g. a study mixing settings under ``--allow-mixed``)."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    # files listed as problems (unreadable, stale against the study file) stay out of the tables
    tables = build_tables(results_dir, studies_dir, exclude={str(p.path) for p in problems or []})
    lines = [
        "# sasa-bench report: Stand-Alone Self-Attention (Ramachandran et al. 2019), regenerated",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `sasa-bench report` from `{results_dir}` "
        f"({sum(len(t.records) for t in tables)} result files).",
        "",
    ]
    if problems or notes:
        lines += ["## Unreadable or stale result files, and warnings", ""]
        lines += [f"- {n}" for n in notes or []]
        lines += [f"- `{p.path}`: {p.reason}" for p in problems or []]
        lines.append("")
    lines += provenance(tables)
    missing = [t for t in tables if not t.has_results]
    if missing:
        lines += ["## Missing studies", "", "No result files yet (run `sasa-bench ablate NAME`):", ""]
        lines += [f"- `{t.name}` — {t.title}" + (f" — paper: {t.study.paper_ref}" if t.study else "") for t in missing]
        lines.append("")
    for t in tables:
        if not t.has_results:
            continue
        csv_path = atomic_write_text(out_dir / "tables" / f"{t.name}.csv", to_csv(t))
        figs = make_figures(t, out_dir / "figures")
        lines += section(t, csv_path.relative_to(out_dir), [f.relative_to(out_dir) for f in figs])
    report = atomic_write_text(out_dir / "REPORT.md", "\n".join(lines).rstrip() + "\n")
    return report, tables


def _recipe_text(cfg: dict[str, Any], spec: dict[str, Any]) -> str:
    ds = DATASET_NAMES.get(cfg.get("data"), cfg.get("data"))
    parts = [
        f"{ds}",
        f"{cfg.get('epochs')} epochs" + (f" (max {cfg['max_steps']} steps)" if cfg.get("max_steps") else "")
        + (f" over a fixed {cfg['train_images']}-image subset" if cfg.get("train_images") else ""),
        *([f"eval on a fixed {cfg['eval_images']}-image subset"] if cfg.get("eval_images") else []),
        f"batch {cfg.get('batch_size')}",
        f"lr {cfg.get('lr') if cfg.get('lr') is not None else cfg.get('lr_base')}",
        f"{cfg.get('precision')}",
        "augmentation " + ("on" if cfg.get("augment", True) else "off"),
        *(["zero-init residual"] if cfg.get("zero_init_residual") else []),
        *([f"grad-norm clip {cfg['grad_clip']}"] if cfg.get("grad_clip") else []),
        f"{cfg.get('threads')} thread(s)" if cfg.get("threads") else "torch's default threads",
        f"models at {spec.get('image_size')}×{spec.get('image_size')}, width ×{spec.get('width')}, {spec.get('num_classes')} classes",
    ]
    return ", ".join(str(p) for p in parts)


def provenance(tables: list[StudyTable]) -> list[str]:
    recs = [r for t in tables for r in t.records]
    lines = ["## Where the numbers come from", ""]
    if not recs:
        return lines + ["No results yet.", ""]
    envs = sorted({(r.get("env", {}).get("cpu"), r.get("env", {}).get("gpu"), r.get("env", {}).get("torch")) for r in recs}, key=str)
    lines.append("**Hardware and software** (from the result files):")
    lines.append("")
    for cpu, gpu, torch_v in envs:
        lines.append(f"- CPU {cpu or '?'}" + (f", GPU {gpu}" if gpu else "") + f", torch {torch_v or '?'}")
    lat_dev = sorted({(r["latency"].get("device_name"), r["latency"].get("threads"), r["latency"].get("batch_size")) for r in recs if r.get("latency")}, key=str)
    for dev, threads, bs in lat_dev:
        lines.append(f"- latency measured on {dev}" + (f" with {threads} thread(s)" if threads else "") + f", batch {bs}, fp32 inference")
    lines.append("")
    lines.append("**Training recipes** behind the accuracy columns:")
    lines.append("")
    seen = set()
    for r in recs:
        tr = r.get("training")
        if not tr:
            continue
        text = _recipe_text(tr.get("config") or {}, tr.get("spec") or {})
        key = (tr.get("recipe"), text)
        if key not in seen:
            seen.add(key)
            lines.append(f"- `{tr.get('recipe')}`: {text}")
    if not seen:
        lines.append("- none: no study has been trained yet; the tables show params, GFLOPS and latency only.")
    lines += [
        "",
        "**Read with care.**",
        "",
        "- *Fashion-MNIST accuracies from the `short` recipe are not ImageNet numbers.* They come from small, "
        "narrow models trained for minutes on a 10-class grayscale task; compare their trend across variants "
        "with the paper's, never their values. A top-1 delta against the paper is only computed for ImageNet "
        "runs with the `paper` recipe.",
        "- GFLOPS = 2 × multiply-adds for one image (the paper's convention), counted by PyTorch's FLOP counter "
        "on the model as built; the Δ columns are ours − paper and are shown only at the paper's 224×224, "
        "1000 classes.",
        "- Latency ratio = median over interleaved (model, baseline) pairs of the model's time per batch divided "
        "by the baseline's; > 1 means slower than the baseline. Measured on the hardware above, not the paper's "
        "(which reports no latency).",
        "- Some tables use the paper's held-out split (4% of ImageNet train, ~3 points above val); the paper "
        "column header names the metric.",
        "",
    ]
    return lines


def section(t: StudyTable, csv_rel: Path, figs: list[Path]) -> list[str]:
    s = t.study
    lines = [f"## {t.title}", ""]
    if s is not None:
        lines += [f"Study `{t.name}` (`ablations/{t.name}.toml`) · paper: {s.paper_ref} · paper metric: {s.metric}", ""]
        if s.description:
            lines += [s.description, ""]
    else:
        lines += [f"Study `{t.name}` (no study file in ablations/; shown from its results).", ""]
    sizes = sorted({r["image_size"] for r in t.rows if r.get("image_size")})
    recipes = sorted({r.get("train", "?") for r in t.records})
    lines.append(
        f"Ours: params/GFLOPS at {', '.join(f'{x}×{x}' for x in sizes) or '?'} input; "
        f"runs: {', '.join(f'`--train {x}`' for x in recipes)}; {len(t.records)} result files."
    )
    done = [r for r in t.rows if r["n_files"]]
    if len(done) < len(t.rows):
        lines.append(f"Variants without results: {', '.join(r['variant'] for r in t.rows if not r['n_files'])}.")
    lines += [""] + study_provenance(t) + ["", markdown(t), ""]
    if any(r["acc"] for r in t.rows):
        lines += [f"*Statistics.* {stats.METHOD}", ""]
    agreement = t.agreement() if s is not None and s.paper_ref and s.paper_ref != "—" else None
    if agreement is not None:
        labels = {r["variant"]: r["label"] for r in t.rows}
        lines += [agreement.sentence(labels), ""]
    elif any(r.get("paper_top1") is not None for r in t.rows):  # a paper study we have not trained
        lines += ["Agreement with the paper: not assessable yet: no accuracy of ours for this study "
                  f"(`sasa-bench ablate {t.name}` with training produces it).", ""]
    notes = [f"- {r['label']}: {r['note']}" for r in t.rows if r.get("note")]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines.append(f"CSV: [`{csv_rel}`]({csv_rel})")
    lines.append("")
    for f in figs:
        lines += [f"![{t.name}: {f.stem}]({f})", ""]
    return lines


def _hosts(recs: list[dict[str, Any]]) -> str:
    seen = []
    for r in recs:
        e = r.get("env") or {}
        h = f"{e.get('cpu') or '?'} ({e.get('cpu_isa') or 'ISA not recorded'})" + (f", GPU {e['gpu']}" if e.get("gpu") else "")
        h += f", torch {e.get('torch') or '?'}"
        if h not in seen:
            seen.append(h)
    return "; ".join(seen) or "?"


def study_provenance(t: StudyTable) -> list[str]:
    """Where this study's numbers come from: host (CPU, ISA, threads), torch, recipe, precision."""
    lines = []
    lat = [r for r in t.records if r.get("latency")]
    if lat:
        l0 = lat[0]["latency"]
        threads = sorted({str(r["latency"].get("threads")) for r in lat})
        precisions = sorted({str(r["latency"].get("precision", "fp32")) for r in lat})
        # models without attention layers (timm peers, conv baselines) record no backend
        backends = sorted({str(b) for r in lat if (b := r["latency"].get("backend"))})
        lines.append(
            f"- Latency: {_hosts(lat)}; {'/'.join(threads)} thread(s), batch {l0.get('batch_size')}, "
            f"{'/'.join(precisions)} {l0.get('mode', 'inference')}"
            + (f", attention backend {'/'.join(backends)}." if backends else ".")
        )
    tr = [r for r in t.records if r.get("training")]
    if tr:
        t0 = tr[0]["training"]
        precisions = sorted({str(r["training"].get("precision") or (r["training"].get("config") or {}).get("precision")) for r in tr})
        threads = sorted({str(r["training"].get("threads")) for r in tr})
        walls = [r["training"].get("wall_s") for r in tr if r["training"].get("wall_s")]
        wall = f", {min(walls):.0f}–{max(walls):.0f} s per run" if walls else ""
        lines.append(
            f"- Training: recipe `{t0.get('recipe')}` on {DATASET_NAMES.get(t0.get('dataset'), t0.get('dataset'))}, "
            f"precision {'/'.join(precisions)}, {'/'.join(threads)} thread(s){wall}; {_hosts(tr)}; "
            f"{len(tr)} runs, seeds {', '.join(map(str, sorted({r.get('seed') for r in tr})))}."
        )
    return lines
