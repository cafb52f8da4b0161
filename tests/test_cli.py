"""The command line end to end, through ``python -m sasa_bench`` in a subprocess (so the exit codes
and stderr are exactly what a user sees)."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest

from sasa_bench import PRESETS, create_model
from sasa_bench.report.paper import TABLE1


def _popen(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sasa_bench", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    p = _popen(*args)
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def n_params(name: str, **kw) -> int:
    return sum(p.numel() for p in create_model(name, **kw).parameters())


# --------------------------------------------------------------------------------------------
# Bad input: exit 2, one line on stderr, no traceback. The processes start together (one
# interpreter start-up each), and each case is checked in its own test.
# --------------------------------------------------------------------------------------------

BAD = {
    "k-even": ["flops", "--k", "4", "--image-size", "64"],
    "k-zero": ["flops", "--k", "0", "--image-size", "64"],
    "heads-7": ["flops", "--heads", "7", "--image-size", "64"],
    "unknown-model": ["flops", "--model", "nope"],
    "unknown-stem": ["flops", "--stem", "foo", "--image-size", "64"],
    "unknown-pos": ["flops", "--pos", "foo", "--image-size", "64"],
    "image-size-100": ["flops", "--image-size", "100"],
    "attention-groups-5": ["flops", "--attention-groups", "5", "--image-size", "64"],
    "format-xml": ["flops", "--model", "resnet26", "--format", "xml", "--image-size", "64"],
    "models-format-xml": ["models", "--format", "xml"],
}


@pytest.fixture(scope="module")
def bad_runs() -> dict[str, tuple[int, str, str]]:
    procs = {name: _popen(*args) for name, args in BAD.items()}
    results = {}
    for name, p in procs.items():
        out, err = p.communicate(timeout=300)
        results[name] = (p.returncode, out, err)
    return results


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_exits_2_with_one_line(case: str, bad_runs: dict) -> None:
    rc, out, err = bad_runs[case]
    assert rc == 2, (case, rc, err)
    assert "Traceback" not in err and "Traceback" not in out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "error" in lines[0].lower()
    assert out == ""


def test_bad_input_messages_say_what_is_wrong(bad_runs: dict) -> None:
    assert "4" in bad_runs["k-even"][2]
    assert "nope" in bad_runs["unknown-model"][2]
    assert "foo" in bad_runs["unknown-stem"][2]
    assert "100" in bad_runs["image-size-100"][2]
    assert "xml" in bad_runs["format-xml"][2]


# --------------------------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------------------------


def test_flops_json() -> None:
    r = run("flops", "--model", "resnet26", "--format", "json", "--image-size", "64")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert row["model"].startswith("resnet26")
    assert isinstance(row["params"], int) and row["params"] == n_params("resnet26")
    assert isinstance(row["gmacs"], float) and isinstance(row["gflops"], float)
    assert row["gflops"] == pytest.approx(2 * row["gmacs"])
    # 64x64 is (64/224)^2 of the 224x224 work, give or take the classifier
    assert row["gflops"] == pytest.approx(TABLE1["resnet26"][0] * (64 / 224) ** 2, rel=0.05)


def test_flops_csv_several_models() -> None:
    r = run("flops", "--model", "resnet26", "--model", "sasa_resnet26", "--format", "csv", "--image-size", "64")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["model"].split("[")[0] for row in rows] == ["resnet26", "sasa_resnet26"]
    for row in rows:
        assert float(row["gflops"]) == pytest.approx(2 * float(row["gmacs"]), rel=1e-6)
        assert float(row["params_m"]) > 0


def test_flops_k7_heads8_is_the_default_model() -> None:
    """The design's example: with no --model the options alone define the model (conv stem,
    attention in all groups of a ResNet-50): the paper's conv-stem + attention ResNet-50."""
    r = run("flops", "--k", "7", "--heads", "8", "--format", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert row["params"] == n_params("sasa_resnet50_convstem")
    paper_gflops, paper_params, _ = TABLE1["sasa_resnet50_convstem"]
    assert abs(row["gflops"] - paper_gflops) <= 0.1
    assert abs(row["params"] / 1e6 - paper_params) <= 0.05


def test_flops_table_output() -> None:
    r = run("flops", "--model", "sasa_resnet26_convstem", "--k", "3", "--heads", "4", "--image-size", "64")
    assert r.returncode == 0, r.stderr
    assert "sasa_resnet26_convstem" in r.stdout and "GFLOPS" in r.stdout


def test_flops_overrides_reach_the_model() -> None:
    r = run("flops", "--model", "sasa_resnet26", "--pos", "absolute", "--logits", "qr", "--attention-groups", "3,4",
            "--width", "0.5", "--num-classes", "10", "--image-size", "64", "--format", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    expected = n_params("sasa_resnet26", pos="absolute", logits="qr", attention_groups="3,4", width=0.5, num_classes=10)
    assert row["params"] == expected
    assert row["image_size"] == 64


def test_flops_paper_column() -> None:
    r = run("flops", "--model", "resnet26", "--paper", "--format", "json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    assert (row["paper_gflops"], row["paper_params_m"]) == (TABLE1["resnet26"][0], TABLE1["resnet26"][1])
    assert abs(row["gflops"] - row["paper_gflops"]) <= 0.1


@pytest.mark.slow  # counts all twelve presets at 224x224, ResNet-101s included
def test_models_lists_every_preset() -> None:
    r = run("models", "--format", "json", timeout=300)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert sorted(row["model"] for row in rows) == sorted(PRESETS)
    assert len(rows) == 17  # 12 classifiers + the 5 Table 2 detectors
    for row in rows:
        assert isinstance(row["params"], int) and row["gflops"] > 0
    by_name = {row["model"]: row for row in rows}
    assert by_name["resnet50"]["params"] == 25_557_032


def test_backends_command() -> None:
    r = run("backends")
    assert r.returncode == 0, r.stderr
    assert "reference" in r.stdout and "auto" in r.stdout


def test_no_arguments_shows_help_not_a_traceback() -> None:
    r = run()
    assert "Traceback" not in r.stderr
    assert "flops" in (r.stdout + r.stderr)
