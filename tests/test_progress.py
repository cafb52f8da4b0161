"""Progress a user can see off a terminal: plain lines with ETA, at least every QUIET_S seconds."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sasa_bench import progress as P


def test_plain_lines_are_throttled_but_never_quiet(monkeypatch, capsys) -> None:  # noqa: ANN001
    now = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: now[0])
    line = P.PlainProgress("x: ", every=20.0)
    line("start", 0, 100)
    for step in range(1, 100):
        now[0] += 1.0  # one step a second
        line("working", step, 100)
    line("done", 100, 100)
    out = capsys.readouterr().err.splitlines()
    # the first call, one line every 20 s of the 99 s, and the last: never 20 s without a line
    assert 5 <= len(out) <= 8, out
    assert out[0].endswith("x: start [0/100]") and "[100/100, eta 0m00s]" in out[-1]
    assert any("eta 1m" in s for s in out[1:3])  # 1 s per step, ~80 steps left


def test_precision_auto_follows_the_native_bf16_probe(monkeypatch) -> None:  # noqa: ANN001
    from sasa_bench import hardware

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    assert hardware.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    assert hardware.resolve_precision("auto", "cpu") == "fp32"
    assert hardware.resolve_precision(None, "cpu") == "fp32"
    with pytest.warns(UserWarning, match="without native bf16"):
        assert hardware.resolve_precision("bf16", "cpu") == "bf16"  # forced: kept, with one warning
    assert hardware.resolve_precision("fp32", "cpu") == "fp32"


def test_native_bf16_needs_both_onednn_and_the_instructions(monkeypatch) -> None:  # noqa: ANN001
    import torch

    from sasa_bench import hardware

    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    assert not hardware.native_bf16("cpu")  # AVX-512 without AVX512-BF16 only emulates bf16
    monkeypatch.setattr(hardware, "cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert hardware.native_bf16("cpu")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False, raising=False)
    assert not hardware.native_bf16("cpu")  # e.g. ONEDNN_MAX_CPU_ISA=AVX2


@pytest.mark.slow
def test_a_study_training_off_a_terminal_prints_steps_with_eta(tmp_path: Path) -> None:
    study = tmp_path / "tiny.toml"
    study.write_text('title = "tiny"\npaper_ref = "none"\nmetric = "m"\n[base]\nmodel = "resnet26"\n[[variant]]\nname = "a"\n')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "sasa_bench", "ablate", str(study), "--train", "short", "--data", "synthetic",
         "--image-size", "32", "--no-latency", "--results", str(tmp_path / "r"), "--runs", str(tmp_path / "runs")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    steps = [line for line in out.stderr.splitlines() if "training:" in line]
    assert steps and all("img/s" in s for s in steps)
    assert any("eta" in s and "/64" in s for s in steps), out.stderr
    assert out.stdout == ""  # data only on stdout; an ablate run prints none


def test_latency_records_the_precision_that_ran(monkeypatch) -> None:  # noqa: ANN001
    from sasa_bench import hardware
    from sasa_bench.measure import latency as L
    from sasa_bench.spec import make_spec

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    spec = make_spec("resnet26", width=0.25, image_size=32, num_classes=10)
    (row,) = L.measure_latency([spec], L.LatencyOptions(device="cpu", precision="auto", batch_size=2, warmup=1, iters=1))
    assert row["precision"] == "fp32"
    with pytest.warns(UserWarning, match="without native bf16"):
        (row,) = L.measure_latency([spec], L.LatencyOptions(device="cpu", precision="bf16", batch_size=2, warmup=1, iters=1))
    assert row["precision"] == "bf16"
