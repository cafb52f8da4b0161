"""`sasa-bench bench-layer`: each attention backend (with its projections) against a 3x3 conv.

The measuring is :func:`sasa_bench.measure.layer_bench.measure_layers`; this module turns flags
into its options, shows progress on stderr and prints the rows (data on stdout).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from sasa_bench.choices import Format
from sasa_bench.cli.options import FormatOpt, device_option
from sasa_bench.cli.output import check_format, emit, emit_machine, step_progress
from sasa_bench.errors import SasaError
from sasa_bench.measure.layer_bench import LayerBenchOptions, measure_layers

CSV_COLUMNS = [
    "stage", "channels", "size", "batch_size", "dtype", "layer", "backend", "fwd_ms", "fwd_min_ms",
    "fwdbwd_ms", "fwdbwd_min_ms", "fwd_vs_conv", "fwdbwd_vs_conv", "fwd_speedup_vs_reference",
    "fwdbwd_speedup_vs_reference", "peak_mem_fwd_mb", "peak_mem_fwdbwd_mb", "mem_fwdbwd_vs_reference",
    "mem_method", "build_s", "isa", "fwd_gflops", "peak_gflops", "fwd_peak_frac", "kernel_size", "heads",
    "device", "threads", "torch", "cpu", "aten_isa", "kernel_isa", "warmup", "iters",
]  # fmt: skip


def _int_list(text: str, what: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",")]  # '' and '1,,2' are typos: rejected, not "nothing"
    except ValueError:
        raise SasaError(f"--{what}: expected comma-separated integers, got {text!r}") from None


def _str_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [s.strip() for s in text.split(",") if s.strip()] or None


def bench_layer(
    stages: Annotated[
        str, typer.Option(help="ResNet-50 stages: 1=64ch@56², 2=128@28², 3=256@14², 4=512@7².")
    ] = "1,2,3,4",
    dtypes: Annotated[str, typer.Option(help="Comma-separated: fp32, bf16, fp16.")] = "fp32,bf16",
    backends: Annotated[
        str | None, typer.Option(help="Comma-separated attention backends (default: all available here).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.")] = 8,
    iters: Annotated[
        int, typer.Option(help="Timed rounds (each times every candidate once, interleaved).")
    ] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps per candidate first.")] = 2,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads (torch.set_num_threads); recorded either way.")
    ] = None,
    device: Annotated[str, device_option(auto=False)] = "cpu",
    k: Annotated[int, typer.Option("--k", help="Attention window k.")] = 7,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 8,
    memory: Annotated[
        bool, typer.Option("--memory/--no-memory", help="Measure peak memory per step.")
    ] = True,
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Time attention backends (Q/K/V projections included) against a 3x3 conv of the same width.

    Forward and forward+backward, interleaved rounds; ratios are medians of per-round ratios.
    """
    fmt = check_format(fmt)
    opts = LayerBenchOptions(
        stages=_int_list(stages, "stages"),
        dtypes=_str_list(dtypes) or [],
        backends=_str_list(backends),
        batch_size=batch_size,
        iters=iters,
        warmup=warmup,
        threads=threads,
        device=device,
        kernel_size=k,
        heads=heads,
        memory=memory,
    )
    opts.validate()
    with step_progress("building backends…") as progress:
        rows = measure_layers(opts, progress=progress)
    if emit_machine(rows, fmt, CSV_COLUMNS):
        return
    r0 = rows[0]
    title = (
        f"Attention layer (k={r0['kernel_size']}, {r0['heads']} heads, projections included) vs 3x3 conv — "
        f"batch {r0['batch_size']}, {r0['device']}, {r0['threads']} threads, torch {r0['torch']}, "
        f"{r0['warmup']} warm-up + {r0['iters']} interleaved rounds; {r0['cpu']}, PyTorch ISA {r0['aten_isa']}, "
        f"C++ kernel ISA {r0['kernel_isa'] or 'not loaded'}. GFLOP/s: forward, analytic FLOPs; peak = threads x 2 FMA "
        "pipes x fp32 lanes of the ISA x 2 x reported clock (an assumption; core:* rows time the attention alone)"
    )
    cols = ["stage", "channels", "size", "dtype", "layer", "fwd_ms", "fwdbwd_ms", "fwd_vs_conv", "fwdbwd_vs_conv",
            "fwd_speedup_vs_reference", "fwdbwd_speedup_vs_reference", "peak_mem_fwdbwd_mb", "mem_fwdbwd_vs_reference",
            "isa", "fwd_gflops", "fwd_peak_frac"]  # fmt: skip
    headers = {
        "fwd_ms": "fwd ms", "fwdbwd_ms": "fwd+bwd ms", "fwd_vs_conv": "fwd ×conv", "fwdbwd_vs_conv": "f+b ×conv",
        "fwd_speedup_vs_reference": "fwd ref/x", "fwdbwd_speedup_vs_reference": "f+b ref/x",
        "peak_mem_fwdbwd_mb": f"f+b peak MB ({r0['mem_method']})", "mem_fwdbwd_vs_reference": "mem ×ref",
        "fwd_gflops": "fwd GFLOP/s", "fwd_peak_frac": "of peak",
    }  # fmt: skip
    digits: dict[str, Any] = {"fwd_ms": 1, "fwdbwd_ms": 1, "fwd_vs_conv": 2, "fwdbwd_vs_conv": 2,
                              "fwd_speedup_vs_reference": 1, "fwdbwd_speedup_vs_reference": 1,
                              "peak_mem_fwdbwd_mb": 1, "mem_fwdbwd_vs_reference": 3, "fwd_gflops": 1,
                              "fwd_peak_frac": 2}  # fmt: skip
    emit(rows, fmt, cols, title=title, headers=headers, digits=digits)
