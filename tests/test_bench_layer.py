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
    assert [r["layer"] for r in rows] == ["conv3x3", "reference", "shift"]
    conv, ref, shift = rows
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
    assert [r["layer"] for r in rows] == ["conv3x3", "shift"]
    res = CliRunner().invoke(_app(), [*args, "--format", "csv"])
    assert res.exit_code == 0 and res.stdout.splitlines()[0].startswith("stage,channels,size")


def test_cli_bad_stage_raises_sasa_error():
    res = CliRunner().invoke(_app(), ["--stages", "x"])
    assert isinstance(res.exception, SasaError)
