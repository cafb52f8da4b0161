"""Assemble ``REPORT.md``: provenance, missing studies, then one section per study with its
table (ours beside the paper), a CSV copy and its figures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sasa_bench.report.figures import make_figures
from sasa_bench.report.tables import DATASET_NAMES, StudyTable, build_tables, markdown, to_csv
from sasa_bench.store import atomic_write_text


def write_report(results_dir: Path, out_dir: Path, studies_dir: Path | None = None) -> tuple[Path, list[StudyTable]]:
    """Write ``out_dir/REPORT.md``, ``out_dir/tables/<study>.csv`` and ``out_dir/figures/*.png``."""
    results_dir, out_dir = Path(results_dir), Path(out_dir)
    tables = build_tables(results_dir, studies_dir)
    lines = [
        "# sasa-bench report: Stand-Alone Self-Attention (Ramachandran et al. 2019), regenerated",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M')} by `sasa-bench report` from `{results_dir}` "
        f"({sum(len(t.records) for t in tables)} result files).",
        "",
    ]
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
        f"{cfg.get('epochs')} epochs" + (f" (max {cfg['max_steps']} steps)" if cfg.get("max_steps") else ""),
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
    lines += ["", markdown(t), ""]
    notes = [f"- {r['label']}: {r['note']}" for r in t.rows if r.get("note")]
    if notes:
        lines += ["Notes:", "", *notes, ""]
    lines.append(f"CSV: [`{csv_rel}`]({csv_rel})")
    lines.append("")
    for f in figs:
        lines += [f"![{t.name}: {f.stem}]({f})", ""]
    return lines
