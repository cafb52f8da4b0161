"""Figures (PNG, matplotlib Agg) from the study tables; each returns the files it wrote.

* ``pareto``  — the paper's Figure 5 view: accuracy against GFLOPS and against params, conv vs
  attention; one row per accuracy source (ours per recipe/dataset, the paper's ImageNet), and
  params against GFLOPS (ours) so a study without accuracies still shows its trade-off.
* ``sweep``   — GFLOPS/params, latency and accuracy against the varied field (e.g. k).
* ``bars``    — per variant: GFLOPS, params, latency ratio and accuracy (stage layouts, stems...).
* ``latency`` — measured latency of each model beside its conv baseline.
* ``latency_gflops`` — latency against GFLOPS, one marker per family (the peers study).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sasa_bench.report.tables import StudyTable  # noqa: E402

# One colour and marker per model family in every figure (sasa_bench.results.FAMILIES).
SERIES = {"conv": ("convolution", "tab:blue", "o"), "convstem": ("self-attention, conv stem", "tab:orange", "s"),
          "full": ("full attention (attention stem)", "tab:red", "^"),
          # timm's peers (the peers study)
          "halonet": ("HaloNet (blocked local attention)", "tab:purple", "D"),
          "botnet": ("BoTNet (global attention)", "tab:brown", "v"),
          "lambda": ("LambdaNet (lambda layers)", "tab:olive", "P"),
          "swin": ("Swin (shifted windows)", "tab:cyan", "X"),
          "timm": ("other timm model", "tab:gray", "*")}
COLORS = {k: c for k, (_, c, _) in SERIES.items()} | {None: "tab:gray"}
VERDICT_COLORS = {"better": "tab:green", "worse": "tab:red", "within noise": "tab:gray", "n too small": "tab:gray"}


def series(row: dict[str, Any]) -> str:
    return row.get("family") or "convstem"


def _err(a: Any) -> float:
    """Error bar of an accuracy: the half-width of its 95% t-interval (0 for one seed)."""
    hw = a.summary.half_width
    return 0.0 if hw is None else hw


def place_labels(ax: Any, pts: list[tuple[float, float, str]], fontsize: float = 7) -> None:
    """Annotate points without overlapping labels: start each label up-right of its point, push
    colliding labels apart (in pixels, a few passes) and draw a leader line to any label that
    moved away from its point."""
    if not pts:
        return
    fig = ax.figure
    fig.canvas.draw()
    to_px = ax.transData.transform
    char_w, h = fontsize * 0.6, fontsize * 1.5
    boxes = []
    for x, y, text in pts:
        px, py = to_px((x, y))
        boxes.append([px + 4, py + 4, char_w * len(text), h])
    for _ in range(60):
        moved = False
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]:
                    push = (min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])) / 2 + 1
                    lo, hi = (a, b) if a[1] <= b[1] else (b, a)
                    lo[1] -= push
                    hi[1] += push
                    moved = True
        if not moved:
            break
    for (x, y, text), (bx, by, _, _) in zip(pts, boxes, strict=True):
        px, py = to_px((x, y))
        dx, dy = bx - px, by - py
        far = abs(dy - 4) > h
        ax.annotate(text, (x, y), xytext=(dx * 72 / fig.dpi, dy * 72 / fig.dpi), textcoords="offset points",
                    fontsize=fontsize, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5} if far else None)
PAPER_COLOR = "tab:green"
DPI = 110


def make_figures(t: StudyTable, out_dir: Path) -> list[Path]:
    """Every figure the study asks for (its ``plots``), for a study with results."""
    if not t.has_results:
        return []
    kinds = t.study.plots if t.study else ("bars",)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for kind in kinds:
        fn = {"pareto": pareto, "sweep": sweep, "bars": bars, "latency": latency, "latency_gflops": latency_gflops}[kind]
        path = fn(t, out_dir / f"{t.name}_{kind}.png")
        if path is not None:
            files.append(path)
    path = deltas(t, out_dir / f"{t.name}_deltas.png")
    if path is not None:
        files.append(path)
    return files


def deltas(t: StudyTable, path: Path) -> Path | None:
    """Each variant's accuracy minus the base variant's, with its Welch 95% interval, coloured
    by verdict; the paper's own difference beside it (its scale is ImageNet points)."""
    s = t.main_source
    if s is None:
        return None
    rows = [r for r in t.rows if s.key in r["diff"]]
    if not any(r["diff"][s.key].low is not None for r in rows):
        return None  # one seed somewhere: no interval to draw
    base = next((r["label"] for r in t.rows if r.get("is_base")), t.base_variant)
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(rows) + 1.8))
    ys = list(range(len(rows)))
    for y, r in zip(ys, rows, strict=True):
        d = r["diff"][s.key]
        lo = d.delta - d.low if d.low is not None else 0.0
        hi = d.high - d.delta if d.high is not None else 0.0
        ax.errorbar([d.delta], [y], xerr=[[lo], [hi]], fmt=SERIES.get(series(r), SERIES["convstem"])[2],
                    color=VERDICT_COLORS[d.verdict], capsize=4, ms=7)
        ax.text(d.high if d.high is not None else d.delta, y, f"  {d.verdict}", va="center", fontsize=7)
        if r.get("paper_d_base") is not None:
            ax.plot([r["paper_d_base"]], [y + 0.25], "D", color=PAPER_COLOR, ms=5)
    ax.axvline(0.0, color="0.3", lw=0.8)
    ax.set_yticks(ys)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"top-1 difference vs {base} (points): ours (95% Welch interval), paper ◆")
    ax.set_title(f"{t.title}\nours: {s.label}; paper: {_metric(t)}", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _size_note(t: StudyTable) -> str:
    sizes = sorted({r["image_size"] for r in t.rows if r.get("image_size")})
    return f"{'/'.join(map(str, sizes))}×{'/'.join(map(str, sizes))} input" if sizes else ""


def _metric(t: StudyTable) -> str:
    return t.study.metric if t.study else "top-1"


def pareto(t: StudyTable, path: Path) -> Path | None:
    rows = [r for r in t.rows if r.get("gflops") is not None or r.get("paper_top1") is not None]
    if not rows:
        return None
    # Accuracy sources: ours (x = the trained model's cost), then the paper's (x = its printed cost).
    panels: list[tuple[str, list[tuple[dict[str, Any], float, float | None, float | None, float]]]] = []
    for s in t.sources:
        pts = []
        for r in rows:
            a = r["acc"].get(s.key)
            if a is not None:
                pts.append((r, a.mean, a.gflops if a.gflops is not None else r["gflops"], a.params_m if a.params_m is not None else r["params_m"], _err(a)))
        if pts:
            a0 = next(r["acc"][s.key] for r in rows if s.key in r["acc"])
            ws = sorted({r["acc"][s.key].width for r in rows if s.key in r["acc"] and r["acc"][s.key].width})
            wtext = f"width ×{ws[0]:g}" if len(ws) == 1 else f"widths ×{ws[0]:g}–{ws[-1]:g}"
            size = f", {a0.image_size}×{a0.image_size}, {wtext}" if a0.image_size and ws else ""
            panels.append((f"ours: {s.label}{size}", pts))
    ppts = [
        (r, r["paper_top1"], r["paper_gflops"], r["paper_params_m"], 0.0)
        for r in rows
        if r.get("paper_top1") is not None and (r.get("paper_gflops") is not None or r.get("paper_params_m") is not None)
    ]
    if ppts:
        panels.append((f"paper: {_metric(t)} (printed GFLOPS/params)", ppts))
    nrows = len(panels) + 1
    fig, axes = plt.subplots(nrows, 2, figsize=(11, 3.8 * nrows), squeeze=False)
    labels: list[tuple[Any, list[tuple[float, float, str]]]] = []
    for i, (title, pts) in enumerate(panels):
        for j, (xi, xlabel) in enumerate(((2, "GFLOPS per image (2 × multiply-adds)"), (3, "parameters (M)"))):
            ax = axes[i][j]
            for key, (name, color, marker) in SERIES.items():
                sel = [p for p in pts if series(p[0]) == key and p[xi] is not None]
                sel.sort(key=lambda p: p[xi])
                if not sel:
                    continue
                ax.errorbar([p[xi] for p in sel], [p[1] for p in sel], yerr=[p[4] for p in sel],
                            fmt="-" + marker, color=color, capsize=3, label=name)
            labels.append((ax, [(p[xi], p[1], p[0]["label"]) for p in pts if p[xi] is not None]))
            ax.set_xlabel(xlabel)
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            ax.margins(x=0.25, y=0.12)  # room for labels; one legend for the figure
    ax = axes[-1][0]
    for key, (name, color, marker) in SERIES.items():
        sel = [r for r in rows if series(r) == key and r.get("gflops") is not None]
        if sel:
            ax.scatter([r["gflops"] for r in sel], [r["params_m"] for r in sel], color=color, marker=marker, label=name)
    labels.append((ax, [(r["gflops"], r["params_m"], r["label"]) for r in rows if r.get("gflops") is not None]))
    ax.set_xlabel(f"GFLOPS per image, ours ({_size_note(t)})")
    ax.set_ylabel("parameters (M), ours")
    ax.set_title("cost: parameters vs compute (ours)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.margins(x=0.25, y=0.12)

    axes[-1][1].axis("off")
    fig.suptitle(f"{t.title} — accuracy vs compute and parameters (conv vs attention)", fontsize=11)
    handles = [plt.Line2D([], [], color=c, marker=m, label=n) for f, (n, c, m) in SERIES.items()
               if any(series(r) == f for r in rows)]
    fig.legend(handles=handles, loc="lower right", fontsize=9, frameon=True)
    fig.tight_layout()
    for ax, pts in labels:
        place_labels(ax, pts)
    return _save(fig, path)


def _x(t: StudyTable) -> tuple[list[Any], str]:
    field = t.study.vary if t.study and t.study.vary else "variant"
    names = {"kernel_size": "spatial extent k (k×k window)", "heads": "attention heads N", "width": "width multiplier"}
    return [r.get("vary", r["label"]) for r in t.rows], names.get(field, field)


def sweep(t: StudyTable, path: Path) -> Path | None:
    xs, xlabel = _x(t)
    rows = t.rows
    panels = ["cost", "latency"] + [s.key for s in t.sources if any(s.key in r["acc"] for r in rows)]
    if any(r.get("paper_top1") is not None for r in rows):
        panels.append("paper")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        if p == "cost":
            sel = [(x, r) for x, r in zip(xs, rows, strict=True) if r.get("gflops") is not None]
            ax.plot([x for x, _ in sel], [r["gflops"] for _, r in sel], "-o", color="tab:blue", label="GFLOPS")
            ax.set_ylabel(f"GFLOPS per image ({_size_note(t)})", color="tab:blue")
            ax2 = ax.twinx()
            ax2.plot([x for x, _ in sel], [r["params_m"] for _, r in sel], "--s", color="tab:red", label="params")
            ax2.set_ylabel("parameters (M)", color="tab:red")
            ax2.set_ylim(0, max(r["params_m"] for _, r in sel) * 1.15)
            ax.ticklabel_format(axis="y", useOffset=False)
            ax.set_title("compute and parameters", fontsize=9)
        elif p == "latency":
            sel = [(x, r) for x, r in zip(xs, rows, strict=True) if r.get("time_ratio") is not None]
            if sel:
                ax.plot([x for x, _ in sel], [r["time_ratio"] for _, r in sel], "-o", color="tab:purple")
                ax.axhline(1.0, color="gray", lw=0.8, ls=":")
                vs = sel[0][1]["vs_model"]
                dev = sel[0][1].get("latency_device") or ""
                ax.set_title(f"latency relative to {vs}\n({dev}, batch {sel[0][1]['latency_batch']})", fontsize=8)
            else:
                ax.text(0.5, 0.5, "latency not measured", ha="center", va="center", transform=ax.transAxes)
                ax.set_title("latency", fontsize=9)
            ax.set_ylabel("time per batch ÷ baseline's")
        elif p == "paper":
            sel = [(x, r) for x, r in zip(xs, rows, strict=True) if r.get("paper_top1") is not None]
            ax.plot([x for x, _ in sel], [r["paper_top1"] for _, r in sel], "-o", color=PAPER_COLOR)
            ax.set_ylabel("top-1 accuracy (%)")
            ax.set_title(f"paper: {_metric(t)}", fontsize=9)
        else:
            s = next(s for s in t.sources if s.key == p)
            sel = [(x, r["acc"][p]) for x, r in zip(xs, rows, strict=True) if p in r["acc"]]
            ax.errorbar([x for x, _ in sel], [a.mean for _, a in sel], yerr=[_err(a) for _, a in sel], fmt="-o",
                        color=COLORS[series(rows[0])], capsize=3)
            ax.set_ylabel("top-1 accuracy (%), mean and 95% interval")
            ax.set_title(f"ours: {s.label}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if all(isinstance(x, (int, float)) for x in xs):
            ax.set_xticks(xs)
    fig.suptitle(t.title, fontsize=11)
    return _save(fig, path)


def bars(t: StudyTable, path: Path) -> Path | None:
    rows = t.rows
    labels = [r["label"] for r in rows]
    panels: list[tuple[str, list[float | None], list[float] | None, str]] = [
        ("GFLOPS per image", [r.get("gflops") for r in rows], None, f"compute ({_size_note(t)})"),
        ("parameters (M)", [r.get("params_m") for r in rows], None, "parameters"),
    ]
    if any(r.get("time_ratio") is not None for r in rows):
        r0 = next(r for r in rows if r.get("time_ratio") is not None)
        panels.append(("time per batch ÷ baseline's", [r.get("time_ratio") for r in rows], None,
                       f"latency vs {r0['vs_model']}\n({r0.get('latency_device') or ''}, batch {r0.get('latency_batch')})"))
    for s in t.sources:
        accs = [r["acc"].get(s.key) for r in rows]
        if any(accs):
            panels.append(("top-1 (%), mean, 95% interval", [a.mean if a else None for a in accs], [_err(a) if a else 0.0 for a in accs], f"ours: {s.label}"))
    if any(r.get("paper_top1") is not None for r in rows):
        panels.append(("top-1 (%)", [r.get("paper_top1") for r in rows], None, f"paper: {_metric(t)}"))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 2.0, 0.45 * len(rows) + 2.2), squeeze=False, sharey=True)
    ys = list(range(len(rows)))
    for ax, (xlabel, vals, err, title) in zip(axes[0], panels, strict=True):
        colors = [PAPER_COLOR if title.startswith("paper") else COLORS[r.get("family")] for r in rows]
        v = [x if x is not None else 0.0 for x in vals]
        ax.barh(ys, v, xerr=err, color=colors, capsize=3)
        for y, x in zip(ys, vals, strict=True):
            ax.text(x if x is not None else 0.0, y, f" {x:.2f}" if x is not None else " n/a", va="center", fontsize=7)
        present = [x for x in vals if x is not None]
        if present and title.startswith(("ours", "paper")) and "top-1" in xlabel:
            lo, hi = min(present), max(present)
            pad = max(1.0, (hi - lo) * 0.5)
            ax.set_xlim(max(0.0, lo - pad), min(100.0, hi + pad))
        if "baseline" in xlabel:
            ax.axvline(1.0, color="gray", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_title(title, fontsize=8)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(ys)
    axes[0][0].set_yticklabels(labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fams = [f for f in SERIES if any(r.get("family") == f for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[f]) for f in fams] + [plt.Rectangle((0, 0), 1, 1, color=PAPER_COLOR)]
    fig.legend(handles, [f"ours: {SERIES[f][0]}" for f in fams] + ["paper"], loc="lower center", ncol=len(fams) + 1, fontsize=8)
    fig.suptitle(t.title, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def latency(t: StudyTable, path: Path) -> Path | None:
    rows = [r for r in t.rows if r.get("latency_ms") is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    xs = list(range(len(rows)))
    ax = axes[0]
    ax.bar(xs, [r["latency_ms"] for r in rows], color=[COLORS[r["family"]] for r in rows])
    ax.set_xticks(xs)
    ax.set_xticklabels([r["label"] for r in rows], rotation=35, ha="right", fontsize=8)
    r0 = rows[0]
    ax.set_ylabel(f"median time per batch of {r0.get('latency_batch')} (ms)")
    ax.set_title(f"latency at {r0.get('latency_image_size')}×{r0.get('latency_image_size')} on {r0.get('latency_device') or '?'}", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax = axes[1]
    ratios = [r.get("time_ratio") for r in rows]
    ax.bar(xs, [x if x is not None else 0.0 for x in ratios], color=[COLORS[r["family"]] for r in rows])
    for x, r in zip(xs, rows, strict=True):
        if r.get("time_ratio") is not None:
            ax.text(x, r["time_ratio"], f"{r['time_ratio']:.2f}×", ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="gray", lw=0.8, ls=":")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['label']}\nvs {r.get('vs_model')}" for r in rows], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("time ÷ baseline's (median of pairs)")
    ax.set_title("latency relative to each model's baseline", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fams = [f for f in SERIES if any(r.get("family") == f for r in rows)]
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS[f]) for f in fams]
    axes[0].legend(handles, [SERIES[f][0] for f in fams], loc="upper left", fontsize=8)
    fig.suptitle(f"{t.title} — latency, conv vs attention", fontsize=11)
    return _save(fig, path)


def latency_gflops(t: StudyTable, path: Path) -> Path | None:
    """Measured latency against GFLOPS, one marker and colour per family, filled at 224x224 and
    hollow at other input sizes; left: ms per batch, right: time relative to the baseline."""
    rows = [r for r in t.rows if r.get("latency_ms") is not None and r.get("gflops") is not None]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, key, ylabel in (
        (axes[0], "latency_ms", f"median time per batch of {rows[0].get('latency_batch')} (ms)"),
        (axes[1], "time_ratio", f"time ÷ {rows[0].get('vs_model')}'s (median of interleaved pairs)"),
    ):
        pts = []
        for r in rows:
            if r.get(key) is None:
                continue
            _, color, marker = SERIES.get(r.get("family") or "timm", SERIES["timm"])
            filled = r.get("image_size") == 224
            ax.plot([r["gflops"]], [r[key]], marker=marker, ms=9, ls="", color=color,
                    markerfacecolor=color if filled else "white", markeredgewidth=1.5)
            pts.append((r["gflops"], r[key], r["label"]))
        place_labels(ax, pts, fontsize=6.5)
        ax.set_xlabel("GFLOPS per image (2 per multiply-add), at the row's input size")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="gray", lw=0.8, ls=":")
    fams = [f for f in SERIES if any(r.get("family") == f for r in rows)]
    handles = [plt.Line2D([], [], marker=SERIES[f][2], color=SERIES[f][1], ls="", ms=8) for f in fams]
    handles.append(plt.Line2D([], [], marker="o", color="0.3", markerfacecolor="white", ls="", ms=8))
    axes[0].legend(handles, [SERIES[f][0] for f in fams] + ["hollow: input other than 224x224"], fontsize=7, loc="upper left")
    r0 = rows[0]
    fig.suptitle(f"{t.title}\nlatency on {r0.get('latency_device') or '?'} against GFLOPS", fontsize=10)
    return _save(fig, path)
