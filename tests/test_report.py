"""`sasa-bench report`: tables (ours beside the paper, deltas), CSVs and figures from fixture results."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib.image as mpimg
import pytest

from sasa_bench.cli.app import main
from sasa_bench.report.document import write_report
from sasa_bench.report.tables import build_tables, markdown
from sasa_bench.store import write_result
from sasa_bench.studies import expand, load_study
from sasa_bench.studies.expand import result_key

ENV = {"cpu": "Fixture CPU 9000", "gpu": None, "torch": "2.99.0", "python": "3.11", "platform": "Linux", "threads": 2}
SHORT_CFG = {"data": "fashion-mnist", "epochs": 3, "batch_size": 128, "lr": 0.2, "precision": "bf16", "max_steps": None}


def _record(study, v, seed, train, *, gflops, params_m, latency=None, top1=None):
    train_spec = v.spec.replace(width=0.25, image_size=64, num_classes=10).to_dict()
    return {
        "study": study.name, "study_title": study.title, "paper_ref": study.paper_ref, "paper_metric": study.metric,
        "variant": v.name, "label": v.label, "index": v.index, "seed": seed, "train": train,
        "spec": v.spec.to_dict(),
        "flops": {"params": int(params_m * 1e6), "params_m": params_m, "gmacs": gflops / 2, "gflops": gflops, "image_size": 224},
        "latency": None if latency is None else {
            "model": v.spec.name, "vs_model": v.vs.name, "median_ms": 100.0 * latency, "vs_median_ms": 100.0,
            "time_ratio": latency, "batch_size": 2, "device_name": "Fixture CPU 9000", "threads": 2,
        },
        "training": None if top1 is None else {
            "top1": top1, "top5": 99.0, "recipe": train, "dataset": "fashion-mnist", "spec": train_spec,
            "flops": {"params_m": params_m / 10, "gflops": gflops / 100}, "config": SHORT_CFG,
        },
        "paper": dict(v.paper), "note": v.note, "env": ENV, "command": f"sasa-bench ablate {study.name}", "elapsed_s": 1.0,
    }


@pytest.fixture
def results(tmp_path: Path) -> Path:
    res = tmp_path / "results"
    # spatial-extent: GFLOPS 7.1 + 0.01 k, params 18.0, latency 1.5, short training on 2 seeds
    st = load_study("spatial-extent")
    for v in expand(st):
        k = v.spec.kernel_size
        for seed in (0, 1):
            rec = _record(st, v, seed, "short", gflops=7.0 + 0.01 * k, params_m=18.0,
                          latency=1.0 + 0.1 * k if seed == 0 else None, top1=90.0 + 0.1 * k + seed)
            write_result(res, st.name, result_key(v.name, "short", seed), rec)
    # main: FLOPs and latency only; our numbers = the paper's - 0.2 GFLOPS
    st = load_study("main")
    for v in expand(st):
        rec = _record(st, v, 0, "none", gflops=v.paper["gflops"] - 0.2, params_m=v.paper["params_m"] + 0.05,
                      latency=1.0 if not v.spec.uses_attention else 3.0)
        write_result(res, st.name, result_key(v.name, "none", 0), rec)
    # width: short training, for the Figure 5 view
    st = load_study("width")
    for v in expand(st):
        att = v.spec.uses_attention
        rec = _record(st, v, 0, "short", gflops=8.0 * v.spec.width ** 2 * (0.9 if att else 1.0),
                      params_m=25.0 * v.spec.width ** 2 * (0.7 if att else 1.0), latency=2.0 if att else 1.0,
                      top1=88.0 + v.spec.width + (0.5 if att else 0.0))
        write_result(res, st.name, result_key(v.name, "short", 0), rec)
    # stages and stem: train none, only half of the stage layouts done
    for name in ("stages", "stem"):
        st = load_study(name)
        for v in expand(st)[: 4 if name == "stages" else None]:
            rec = _record(st, v, 0, "none", gflops=7.0, params_m=18.0, latency=2.5)
            write_result(res, st.name, result_key(v.name, "none", 0), rec)
    return res


def _nontrivial_png(path: Path) -> None:
    assert path.stat().st_size > 15_000, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.reshape(-1, img.shape[-1]).std(axis=0).max() > 0.05, path


def test_report_tables_figures_and_csv(results: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    report, tables = write_report(results, out)
    text = report.read_text()
    # missing studies listed, not dropped
    missing = text.split("## Missing studies", 1)[1].split("\n## ", 1)[0]
    for name in ("logits", "positional-encoding", "heads", "border"):
        assert f"`{name}`" in missing
    for name in ("main", "spatial-extent", "stages", "stem", "width"):
        assert f"`{name}`" not in missing
    # provenance: hardware, torch, recipe; Fashion-MNIST labelled as such
    assert "Fixture CPU 9000" in text and "torch 2.99.0" in text
    assert "Fashion-MNIST, 3 epochs, batch 128" in text
    assert "ours: Fashion-MNIST top-1 (short recipe), mean ± std" in text
    assert "not ImageNet numbers" in text
    # spatial-extent: k = 3 -> mean of 90.3 and 91.3 over two seeds, beside the paper's 76.4
    se = next(t for t in tables if t.name == "spatial-extent")
    k3 = se.rows[0]
    assert k3["top1_short_fashion_mnist"] == pytest.approx(90.8) and k3["n_short_fashion_mnist"] == 2
    assert k3["paper_top1"] == 76.4 and "d_top1" not in k3  # never compared with ImageNet
    md = markdown(se)
    assert "90.80 ± 0.71 (n=2)" in md and "| 76.4 |" in md and "1.30×" in md and "7.03" in md
    # the study's base is k = 7; its k = 3 -> 90.8 vs 91.2, seeds 1 point apart: within noise
    assert se.base_variant == "k7" and k3["diff"]["short_fashion_mnist"].verdict == "within noise"
    assert "ours − k = 7  (7×7) [95% interval]" in md and "| base |" in md
    # the paper's numbers beside ours for every column it prints, with its own difference to k = 7
    assert k3["paper_gflops"] == 6.6 and k3["paper_params_m"] == 18.0 and k3["paper_d_base"] == pytest.approx(-1.0)
    section = text.split("## Spatial extent", 1)[1].split("\n## ", 1)[0]
    assert "Agreement with the paper: Kendall's τ = " in section
    assert "Student's t" in section and "Welch" in section
    # main: deltas against Table 1 at 224x224
    mt = next(t for t in tables if t.name == "main")
    assert all(r["d_gflops"] == pytest.approx(-0.2) for r in mt.rows)
    assert all(r["d_params_m"] == pytest.approx(0.05) for r in mt.rows)
    assert "-0.20" in markdown(mt) and "3.00× vs resnet26" in markdown(mt)
    # stages: the variants without results are named
    assert "Variants without results: conv1234, conv234_att1, conv34_att12, conv4_att123." in text
    # CSV copies hold the numbers
    rows = list(csv.DictReader((out / "tables" / "spatial-extent.csv").open()))
    assert len(rows) == 5 and float(rows[0]["top1_short_fashion_mnist"]) == pytest.approx(90.8)
    assert float(rows[2]["gflops"]) == pytest.approx(7.07) and rows[2]["paper_top1"] == "77.4"
    assert (out / "tables" / "main.csv").exists() and not (out / "tables" / "logits.csv").exists()
    # figures: the ones each study asks for, linked from the report, non-trivial
    expected = {
        "main_pareto.png", "main_latency.png", "spatial-extent_sweep.png", "width_pareto.png",
        "stages_bars.png", "stem_bars.png",
        # a panel of the differences against the base, for each study with seeds on both sides
        "spatial-extent_deltas.png",
    }
    assert {p.name for p in (out / "figures").glob("*.png")} == expected
    for name in expected:
        _nontrivial_png(out / "figures" / name)
        assert f"(figures/{name})" in text


def test_report_command(results: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(results), "--out", str(tmp_path / "o")])
    assert e.value.code == 0
    assert (tmp_path / "o" / "REPORT.md").exists()
    with pytest.raises(SystemExit) as e:
        main(["report", "--results", str(tmp_path / "nothing")])
    assert e.value.code == 2


def test_empty_results_list_every_study_as_missing(tmp_path: Path) -> None:
    (tmp_path / "r").mkdir()
    report, tables = write_report(tmp_path / "r", tmp_path / "o")
    assert not any(t.has_results for t in tables)
    assert report.read_text().count("- `") >= 9


def test_results_of_a_study_without_a_file_are_still_shown(results: Path, tmp_path: Path) -> None:
    src = results / "logits"
    src.mkdir()
    rec = (results / "stem" / "conv__none__seed0.json").read_text().replace('"study": "stem"', '"study": "old-study"')
    (results / "old-study").mkdir()
    (results / "old-study" / "conv__none__seed0.json").write_text(rec)
    tables = build_tables(results)
    old = next(t for t in tables if t.name == "old-study")
    assert old.has_results and old.rows[0]["variant"] == "conv"


def test_atomic_writes_get_the_mode_open_would_give(tmp_path) -> None:  # noqa: ANN001
    import os

    from sasa_bench.store import atomic_write_text

    path = atomic_write_text(tmp_path / "r.json", "{}")
    plain = tmp_path / "plain"
    plain.write_text("{}")
    assert path.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_results_frame_has_one_flat_row_per_file(results: Path) -> None:
    import sasa_bench.results as R

    df = R.load(results)
    files = sorted(str(p) for p in results.glob("*/*.json"))
    assert sorted(df["path"]) == files
    for col in ("study", "variant", "seed", "train", "model", "family", "spec.kernel_size", "flops.gflops",
                "latency.time_ratio", "training.top1", "top1", "recipe", "dataset", "env.cpu"):
        assert col in df.columns, col
    assert set(df["family"].dropna()) <= set(R.FAMILIES)
    # the frame answers the table's question directly
    k3 = df[(df["study"] == "spatial-extent") & (df["variant"] == "k3")]
    assert k3["top1"].mean() == pytest.approx(90.8)


def test_unreadable_results_are_listed_not_dropped(results: Path, tmp_path: Path) -> None:
    bad = results / "spatial-extent" / "k3__short__seed1.json"
    bad.write_text(bad.read_text()[:50])
    (results / "spatial-extent" / "k5__short__seed1.json").write_text("")
    import sasa_bench.results as R

    df, problems = R.load_with_problems(results)
    assert {p.path.name for p in problems} >= {"k3__short__seed1.json", "k5__short__seed1.json"}
    assert str(bad) not in set(df["path"])
