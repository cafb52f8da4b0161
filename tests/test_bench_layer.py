"""bench-layer: the measurement rows (interleaved conv vs backends) and the command's outputs."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from sasa_bench.cli.bench_layer import bench_layer
from sasa_bench.errors import SasaError
from sasa_bench.measure.layer_bench import LayerBenchOptions, measure_layers

QUICK = dict(stages=[4], dtypes=["fp32"], batch_size=1, iters=1, warmup=0)


def test_rows_have_ratios_against_conv_and_reference():
    rows = measure_layers(LayerBenchOptions(backends=["reference", "shift"], **QUICK))
    # the attention core alone is timed for every backend but reference (for its GFLOP/s)
    assert [r["layer"] for r in rows] == ["conv3x3", "reference", "shift", "core:shift"]
    conv, ref, shift, core = rows
    assert core["backend"] == "shift" and core["fwd_speedup_vs_reference"] is None
    # 2 FLOPs per multiply-add of the analytic count (k=7, 8 heads of 64 channels, 7x7 map)
    assert core["fwd_gflops"] == pytest.approx(2 * 1 * 8 * 49 * 49 * (64 + 64 + 64) / (core["fwd_ms"] * 1e6))
    assert conv["fwd_gflops"] == pytest.approx(2 * 512 * 512 * 9 * 49 / (conv["fwd_ms"] * 1e6))
    assert shift["fwd_gflops"] is None and conv["isa"] and conv["aten_isa"]
    if conv["peak_gflops"]:
        assert conv["fwd_peak_frac"] == pytest.approx(conv["fwd_gflops"] / conv["peak_gflops"])
    assert conv["fwd_vs_conv"] == 1.0 and conv["backend"] is None
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and (r["channels"], r["size"]) == (512, 7)
    assert ref["fwd_speedup_vs_reference"] == 1.0
    assert shift["fwdbwd_speedup_vs_reference"] > 0
    if shift["peak_mem_fwdbwd_mb"] is not None and ref["peak_mem_fwdbwd_mb"]:
        assert shift["mem_fwdbwd_vs_reference"] == pytest.approx(
            shift["peak_mem_fwdbwd_mb"] / ref["peak_mem_fwdbwd_mb"]
        )


def test_auto_and_bf16():
    rows = measure_layers(LayerBenchOptions(backends=["auto"], memory=False, **{**QUICK, "dtypes": ["bf16"]}))
    assert rows[1]["layer"] == "auto" and rows[1]["backend"] in ("cpu_fused", "shift")
    assert rows[1]["fwd_speedup_vs_reference"] is None and rows[1]["peak_mem_fwd_mb"] is None


@pytest.mark.parametrize(
    "kw, msg",
    [({"stages": [5]}, "unknown stage"), ({"dtypes": ["fp8"]}, "unknown dtype"), ({"backends": ["nope"]}, "unknown attention backend"),
     ({"backends": ["triton"]}, "cannot run on cpu"), ({"iters": 0}, "iters")],
)  # fmt: skip
def test_bad_options_are_sasa_errors(kw, msg):  # noqa: ANN001
    with pytest.raises(SasaError, match=msg):
        LayerBenchOptions(**{**QUICK, **kw}).validate()


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command()(bench_layer)
    return app


def test_cli_json_and_csv():
    args = [
        "--stages",
        "4",
        "--dtypes",
        "fp32",
        "--backends",
        "shift",
        "--batch-size",
        "1",
        "--iters",
        "1",
        "--warmup",
        "0",
        "--no-memory",
    ]
    res = CliRunner().invoke(_app(), [*args, "--format", "json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert [r["layer"] for r in rows] == ["conv3x3", "shift", "core:shift"]
    res = CliRunner().invoke(_app(), [*args, "--format", "csv"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("stage,channels,size")


def test_cli_bad_stage_raises_sasa_error():
    res = CliRunner().invoke(_app(), ["--stages", "x"])
    assert isinstance(res.exception, SasaError)


def test_bf16_without_native_bf16_is_measured_in_fp32_with_one_warning(monkeypatch):  # noqa: ANN001
    import warnings

    import torch

    from sasa_bench import hardware
    from sasa_bench.measure.layer_bench import resolve_dtypes

    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve_dtypes(["fp32", "bf16"], torch.device("cpu")) == ["fp32"]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "fp32" in msgs[0] and "\n" not in msgs[0]
    monkeypatch.setattr(hardware, "native_bf16", lambda device="cpu": True)
    assert resolve_dtypes(["bf16"], torch.device("cpu")) == ["bf16"]
