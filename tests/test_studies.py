"""Study files, expansion, sharding, the ablate runner (resume) and the ablate command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sasa_bench.cli.app import main
from sasa_bench.errors import SasaError
from sasa_bench.report import paper
from sasa_bench.spec import TABLE1_MODELS
from sasa_bench.studies import expand, find_studies, load_study, shard_units, units
from sasa_bench.studies import runner as runner_mod
from sasa_bench.studies.expand import parse_shard
from sasa_bench.studies.runner import RunOptions, run_study
from sasa_bench.studies.spec import parse_study

EXPECTED = {
    "main": 9,
    "stages": 8,
    "spatial-extent": 5,
    "positional-encoding": 3,
    "logits": 2,
    "stem": 4,
    "width": 8,
    "heads": 5,
    "border": 2,
}


def _variants(name: str):
    return expand(load_study(name))


def test_every_study_file_is_listed_and_parses() -> None:
    found = find_studies()
    assert set(EXPECTED) <= set(found)
    for name in found:
        study = load_study(name)
        assert study.title and study.paper_ref and study.metric
        assert len(expand(study)) == len(study.variants)
    for name, n in EXPECTED.items():
        assert len(_variants(name)) == n, name


def test_variant_fields() -> None:
    main_v = _variants("main")
    assert [v.spec.name for v in main_v] == TABLE1_MODELS
    assert all(v.vs.name == f"resnet{v.spec.depth}" for v in main_v)
    assert [v.spec.kernel_size for v in _variants("spatial-extent")] == [3, 5, 7, 9, 11]
    assert {v.spec.attention_groups for v in _variants("stages")} == {
        (1, 2, 3, 4), (2, 3, 4), (3, 4), (4,), (), (1,), (1, 2), (1, 2, 3)
    }
    assert all(v.spec.stem == "conv" for v in _variants("stages"))
    assert [v.spec.pos for v in _variants("positional-encoding")] == ["none", "absolute", "relative"]
    assert [v.spec.logits for v in _variants("logits")] == ["qr", "qk+qr"]
    assert [v.spec.stem for v in _variants("stem")] == ["attention-plain", "attention-conv-values", "attention", "conv"]
    assert [v.spec.heads for v in _variants("heads")] == [1, 2, 4, 8, 16]
    assert [v.spec.border for v in _variants("border")] == ["mask", "zeros"]
    width = _variants("width")
    assert sorted({v.spec.width for v in width}) == [0.5, 1.0, 1.5, 2.0]
    assert sum(not v.spec.uses_attention for v in width) == 4 and sum(v.spec.uses_attention for v in width) == 4
    # every ablation on ResNet-50 at the paper's scale; the latency baseline is built the same way
    for name in ("stages", "spatial-extent", "positional-encoding", "logits", "stem", "heads", "border"):
        for v in _variants(name):
            assert v.spec.depth == 50 and v.spec.image_size == 224 and v.vs is not None


def _paper_dict(row: tuple[float, float | None, float]) -> dict[str, float]:
    g, pm, t = row
    return {"gflops": g, **({"params_m": pm} if pm is not None else {}), "top1": t}


def test_paper_values_match_paper_module() -> None:
    for v in _variants("main"):
        assert v.paper == _paper_dict(paper.TABLE1[v.spec.name])
    for v in _variants("stages"):
        assert v.paper == _paper_dict(paper.TABLE3_STAGES[",".join(map(str, v.spec.attention_groups)) or "none"])
    for v in _variants("spatial-extent"):
        assert v.paper == _paper_dict(paper.TABLE4_K[v.spec.kernel_size])
    for v in _variants("positional-encoding"):
        assert v.paper == _paper_dict(paper.TABLE5_POS[v.spec.pos])
    for v in _variants("logits"):
        assert v.paper == _paper_dict(paper.TABLE6_LOGITS[v.spec.logits])
    for v in _variants("stem"):
        assert v.paper == _paper_dict(paper.TABLE7_STEM.get(v.spec.stem, paper.TABLE1["sasa_resnet50_convstem"]))
    for v in _variants("width"):
        if v.paper:
            assert v.spec.width == 1.0 and v.paper == _paper_dict(paper.TABLE1[v.model])
    assert not any(v.paper for n in ("heads", "border") for v in _variants(n))


GOOD = """
title = "t"
paper_ref = "none"
metric = "m"
[base]
model = "sasa_resnet26"
[[variant]]
name = "a"
set = { k = 3 }
"""


@pytest.mark.parametrize(
    "text, message",
    [
        (GOOD + "bogus = 1\n", "unknown key"),
        (GOOD.replace('"sasa_resnet26"', '"resnet9"'), "unknown model"),
        (GOOD.replace("k = 3", "kk = 3"), "unknown model field"),
        (GOOD.replace("k = 3", "k = 4"), "odd"),
        (GOOD + '[[variant]]\nname = "a"\n', "duplicate"),
        (GOOD + '[[variant]]\nname = "b"\npaper = { top1 = "x" }\n', "paper"),
        (GOOD.replace('title = "t"', ""), "title"),
        ("title = [", "invalid TOML"),
    ],
)
def test_bad_study_files_are_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "bad.toml"
    p.write_text(text)
    with pytest.raises(SasaError, match=message):
        expand(parse_study(p))


def test_user_study_file_by_path(tmp_path: Path) -> None:
    p = tmp_path / "mine.toml"
    p.write_text(GOOD)
    (v,) = expand(load_study(p))
    assert v.spec.kernel_size == 3 and v.spec.depth == 26 and v.vs.kernel_size == 7


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
def test_shards_cover_every_unit_exactly_once(n: int) -> None:
    all_units = units(_variants("stages"), seeds=3, train="short")
    assert len(all_units) == 24
    keys = [u.key for i in range(1, n + 1) for u in shard_units(all_units, i, n)]
    assert sorted(keys) == sorted(u.key for u in all_units)
    assert len(set(keys)) == len(keys)


def test_parse_shard() -> None:
    assert parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "x", "1/0"):
        with pytest.raises(SasaError):
            parse_shard(bad)


def test_no_training_means_one_unit_per_variant() -> None:
    assert len(units(_variants("logits"), seeds=3, train="none")) == 2


# --------------------------------------------------------------------------- runner (fakes)


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch):
    """Replace the expensive measurements with counters."""
    calls: dict[str, list] = {"count": [], "latency": [], "train": []}

    def count(spec):
        calls["count"].append(spec)
        return {"params": 1000, "params_m": 0.001, "gmacs": 0.5, "gflops": 1.0, "image_size": spec.image_size}

    def measure_latency(specs, opts, vs=None, progress=None):
        calls["latency"].append((specs, vs, opts))
        dev, warmup, iters = opts.resolved()
        return [{"model": specs[0].name, "vs_model": vs.name, "median_ms": 2.0, "vs_median_ms": 1.0, "time_ratio": 2.0,
                 "batch_size": opts.batch_size, "batch_size_requested": opts.batch_size, "device_name": "fake cpu",
                 "device": str(dev), "warmup": warmup, "iters": iters, "spec": specs[0].to_dict(), "vs_spec": vs.to_dict()}]

    def run_training(spec, cfg, out_dir, progress=True, resume=None, **_):
        calls["train"].append((spec, cfg, out_dir, resume))
        return {"model": spec.name, "top1": 80.0 + cfg.seed, "top5": 99.0, "wall_s": 1.0, "spec": spec.to_dict()}

    import sasa_bench.measure.latency as latency_mod
    import sasa_bench.train as train_mod

    monkeypatch.setattr(runner_mod, "count", count)
    monkeypatch.setattr(latency_mod, "measure_latency", measure_latency)
    monkeypatch.setattr(train_mod, "run_training", run_training)
    return calls


def test_runner_writes_one_file_per_unit_and_resumes(tmp_path: Path, fakes) -> None:
    study = load_study("positional-encoding")
    opts = RunOptions(train="short", seeds=2, results_dir=tmp_path / "r", runs_dir=tmp_path / "runs")
    first = tmp_path / "r" / "positional-encoding" / "none__short__seed0.json"
    # an interrupted earlier run finished exactly one unit
    r0 = run_study(study, RunOptions(**{**opts.__dict__, "shard": (1, 6)}))
    assert r0.written == [first]
    mtime = first.stat().st_mtime_ns
    n_count = len(fakes["count"])
    report = run_study(study, opts)
    assert len(report.written) == 5 and report.skipped == [first]
    assert first.stat().st_mtime_ns == mtime
    # the finished unit was not recomputed: 5 units x (variant + trained model) counts
    assert len(fakes["count"]) - n_count == 10
    assert len(fakes["train"]) == 6
    # latency once per variant (seed 0), against the study's base model
    assert len(fakes["latency"]) == 3
    assert all(vs.name == "sasa_resnet50_convstem" for _, vs, _ in fakes["latency"])
    rec = json.loads((tmp_path / "r" / "positional-encoding" / "absolute__short__seed1.json").read_text())
    assert rec["variant"] == "absolute" and rec["seed"] == 1 and rec["latency"] is None
    assert rec["training"]["top1"] == 81.0 and rec["training"]["dataset"] == "fashion-mnist"
    # the short recipe's model settings (width 0.25, 64x64, 10 classes) + the study's field
    assert rec["training"]["spec"]["width"] == 0.25 and rec["training"]["spec"]["num_classes"] == 10
    assert rec["training"]["spec"]["pos"] == "absolute"
    assert rec["spec"]["image_size"] == 224 and rec["paper"] == {"gflops": 6.9, "params_m": 18.0, "top1": 78.2}
    assert rec["env"]["torch"] and rec["env"]["cpu"]
    # width study: a variant's own width multiplies the recipe's (x2.0 -> 0.5)
    run_study(load_study("width"), RunOptions(train="short", results_dir=tmp_path / "w", runs_dir=tmp_path / "runs", shard=(4, 8)))
    assert fakes["train"][-1][0].width == 0.5
    # --force redoes a finished unit
    run_study(study, RunOptions(**{**opts.__dict__, "shard": (1, 6), "force": True}))
    assert first.stat().st_mtime_ns != mtime


def _run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def test_unknown_study_exits_2_with_the_known_list(capsys) -> None:
    code, _, err = _run_cli(["ablate", "no-such-study"], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1
    for name in EXPECTED:
        assert name in err


def test_list_and_dry_run(tmp_path: Path, capsys) -> None:
    code, out, _ = _run_cli(["ablate", "--list"], capsys)
    assert code == 0 and all(name in out for name in EXPECTED)
    assert len(out.strip().splitlines()) == len(find_studies())
    code, out, _ = _run_cli(["ablate", "spatial-extent", "--dry-run", "--seeds", "2", "--results", str(tmp_path)], capsys)
    assert code == 0
    assert "sasa-bench train --model sasa_resnet50_convstem --k 11 --recipe short --seed 1" in out
    assert "sasa-bench latency --model sasa_resnet50_convstem --k 3 --vs sasa_resnet50_convstem" in out
    assert not list(tmp_path.iterdir())


def test_ablate_train_none_writes_result_files(tmp_path: Path, capsys) -> None:
    res = tmp_path / "results"
    args = ["ablate", "logits", "--train", "none", "--no-latency", "--image-size", "32", "--results", str(res)]
    code, _, err = _run_cli(args, capsys)
    assert code == 0, err
    files = sorted((res / "logits").glob("*.json"))
    assert [f.name for f in files] == ["qk+qr__none__seed0.json", "qr__none__seed0.json"]
    qr = json.loads(files[1].read_text())
    full = json.loads(files[0].read_text())
    assert qr["spec"]["logits"] == "qr" and qr["spec"]["image_size"] == 32 and qr["training"] is None
    assert qr["flops"]["params"] < full["flops"]["params"]  # no W_K
    assert qr["command"].startswith("sasa-bench ablate logits")
    # resume: nothing left to do
    code, _, err = _run_cli(args, capsys)
    assert code == 0 and "0 written, 2 already done" in err


TINY = """
title = "tiny"
paper_ref = "none"
metric = "m"
[base]
model = "sasa_resnet26"
width = 0.25
[[variant]]
name = "k3"
set = { k = 3 }
[[variant]]
name = "k5"
set = { k = 5 }
[[variant]]
name = "conv"
model = "resnet26"
"""


def test_shard_option_runs_only_its_slice(tmp_path: Path, capsys) -> None:
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    res = tmp_path / "results"
    base = ["ablate", str(study), "--train", "none", "--no-latency", "--image-size", "32", "--results", str(res)]
    _run_cli([*base, "--shard", "2/2"], capsys)
    assert [f.name for f in (res / "tiny").glob("*.json")] == ["k5__none__seed0.json"]
    _run_cli([*base, "--shard", "1/2"], capsys)
    assert sorted(f.name for f in (res / "tiny").glob("*.json")) == [
        "conv__none__seed0.json", "k3__none__seed0.json", "k5__none__seed0.json"
    ]


@pytest.mark.slow
def test_ablate_with_real_latency_and_training(tmp_path: Path, capsys) -> None:
    """Real latency at 32x32 and two-step training runs on synthetic data, end to end."""
    res = tmp_path / "results"
    opts = RunOptions(
        train="short", results_dir=res, runs_dir=tmp_path / "runs", image_size=32, latency_iters=1,
        data="synthetic", train_overrides={"max_steps": 2, "batch_size": 8, "eval_batch_size": 64,
                                            "synthetic_train": 64, "synthetic_eval": 64},
    )
    study = tmp_path / "tiny.toml"
    study.write_text(TINY)
    report = run_study(load_study(study), opts)
    assert len(report.written) == 3
    rec = json.loads(report.written[0].read_text())
    assert rec["latency"]["time_ratio"] > 0 and rec["latency"]["vs_model"].startswith("sasa_resnet26")
    assert 0 <= rec["training"]["top1"] <= 100 and rec["training"]["spec"]["image_size"] == 32


def test_width_study_trains_at_the_recipe_width_times_the_variants() -> None:
    from sasa_bench.studies.runner import RunOptions, train_config, train_spec

    cfg = train_config(RunOptions(), 0)
    widths = {v.name: train_spec(v, cfg).width for v in _variants("width")}
    assert widths["resnet50_w0.5"] == 0.125 and widths["sasa_resnet50_w2.0"] == 0.5
    # every other study trains at the recipe's own width
    assert {train_spec(v, cfg).width for v in _variants("spatial-extent")} == {0.25}


def test_training_without_latency_is_done_when_its_variant_is_timed_apart(fakes, tmp_path: Path) -> None:
    """The usual way to run a study: train with --no-latency, time with --train none; a plain
    `ablate` afterwards must not retrain everything for the timing it already has."""
    study = load_study("logits")
    base = {"results_dir": tmp_path / "r", "runs_dir": tmp_path / "runs"}
    run_study(study, RunOptions(train="short", latency=False, **base))
    n_train = len(fakes["train"])
    run_study(study, RunOptions(train="none", **base))
    again = run_study(study, RunOptions(train="short", **base))
    assert len(fakes["train"]) == n_train and not again.written
    # without the timed unit the training units are stale (timing was asked for): redone
    for f in (tmp_path / "r" / "logits").glob("*__none__*.json"):
        f.unlink()
    redo = run_study(study, RunOptions(train="short", **base))
    assert len(redo.written) == 2 and len(fakes["train"]) == n_train + 2
