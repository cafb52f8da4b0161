"""`sasa-bench latency`: time per batch, images/s and peak memory, optionally against a baseline.

The measuring is :func:`sasa_bench.measure.latency.measure_latency`; this module only turns flags
into its options, shows progress on stderr and prints/saves the rows.
"""

from pathlib import Path
from typing import Annotated, Any

import typer

from sasa_bench.choices import Format, Precision, plain
from sasa_bench.cli.options import SHARED_FIELDS, FormatOpt, ModelOptions, device_option, model_options
from sasa_bench.cli.output import check_format, emit, emit_machine, err_console, step_progress
from sasa_bench.measure.latency import LatencyOptions, measure_latency, result_name
from sasa_bench.models.timm_models import is_timm
from sasa_bench.spec import make_spec
from sasa_bench.store import check_folder, write_result

_PANEL = "Measurement"

# CSV gets the flat fields (not the per-iteration lists or the spec dicts; JSON has everything).
CSV_COLUMNS = [
    "model", "vs_model", "backend", "median_ms", "min_ms", "max_ms", "images_per_s", "peak_mem_mb",
    "mem_method", "params", "gflops", "compile_s", "vs_backend", "vs_median_ms", "vs_min_ms", "vs_max_ms",
    "vs_images_per_s", "vs_peak_mem_mb", "vs_params", "vs_gflops", "vs_compile_s", "time_ratio",
    "time_ratio_min", "time_ratio_max", "throughput_ratio", "device", "device_name", "torch", "threads",
    "precision", "mode", "channels_last", "compile", "warmup", "iters", "batch_size",
    "batch_size_requested", "image_size", "vs_image_size", "num_classes",
]  # fmt: skip


def _table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as shown: each model, followed by its baseline (measured in the same interleaved run)."""
    out = []
    for r in rows:
        # Auto names like "x[width=0.25]" would be read as rich markup by the table.
        out.append({**r, "model": r["model"], "params_m": r["params"] / 1e6})
        if r["vs_model"] is not None:
            base = {k[3:]: v for k, v in r.items() if k.startswith("vs_") and k != "vs_model"}
            base.update(model=f"  vs {r['vs_model']}", params_m=base["params"] / 1e6, time_ratio=1.0, throughput_ratio=1.0)
            out.append(base)
    return out


@model_options
def latency(
    model_opts: ModelOptions,
    device: Annotated[str, device_option(panel=_PANEL)] = "auto",
    threads: Annotated[int | None, typer.Option(help="CPU threads (torch.set_num_threads); recorded either way.", rich_help_panel=_PANEL)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per batch.", rich_help_panel=_PANEL)] = 8,
    precision: Annotated[Precision, typer.Option(help="torch.autocast precision; auto = bf16 only where the device computes it natively.", rich_help_panel=_PANEL)] = Precision.FP32,
    channels_last: Annotated[bool, typer.Option("--channels-last", help="Model and input in channels_last.", rich_help_panel=_PANEL)] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile; compile time is reported apart (compile_s).", rich_help_panel=_PANEL)] = False,
    mode: Annotated[str, typer.Option(help="inference (forward, inference_mode) | train (forward, backward, SGD step).", rich_help_panel=_PANEL)] = "inference",
    warmup: Annotated[int | None, typer.Option(help="Untimed steps first (default: 2 on CPU, 10 on CUDA).", rich_help_panel=_PANEL)] = None,
    iters: Annotated[int | None, typer.Option(help="Timed steps (default: 5 on CPU, 50 on CUDA).", rich_help_panel=_PANEL)] = None,
    vs: Annotated[str | None, typer.Option("--vs", help="Baseline timed interleaved with each model (A B A B …): a preset (e.g. resnet50) or timm:NAME; gets --width, --image-size, --num-classes and --backend (the other model flags describe the measured model only; a timm baseline takes only --image-size and --num-classes, else its own input size).", rich_help_panel=_PANEL)] = None,
    retry_oom: Annotated[bool, typer.Option("--retry-oom", help="On out-of-memory, halve the batch size and retry.", rich_help_panel=_PANEL)] = False,
    save: Annotated[bool, typer.Option("--save", help="Write one result file per model under RESULTS/latency/.", rich_help_panel=_PANEL)] = False,
    results: Annotated[Path, typer.Option(help="Results folder for --save.", rich_help_panel=_PANEL)] = Path("results"),
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Time per batch (median, min, max), images/s and peak memory; with --vs, the ratio to a baseline.

    Warm-up is excluded, CUDA is synchronised around every timed step, and with --vs the two models alternate step by step so machine noise cancels in the per-pair ratio.
    """
    fmt = check_format(fmt)
    opts = LatencyOptions(
        device=device,
        threads=threads,
        batch_size=batch_size,
        precision=plain(precision),
        channels_last=channels_last,
        compile=compile_,
        mode=mode,
        warmup=warmup,
        iters=iters,
        retry_oom=retry_oom,
    )
    opts.validate()
    if save:
        check_folder(results, "--results")
    specs = model_opts.specs()
    overrides = model_opts.overrides()
    vs_spec = None
    if vs is not None:
        shared = [k for k in SHARED_FIELDS if not (is_timm(vs) and k == "width")]  # timm's model has no width
        vs_spec = make_spec(vs, **{k: overrides.get(k) for k in shared})

    with step_progress("preparing…") as progress:
        rows = measure_latency(specs, opts, vs=vs_spec, progress=progress)

    if save:
        for r in rows:
            path = write_result(results, "latency", result_name(r), r)
            err_console.print(f"saved {path}", markup=False, highlight=False, soft_wrap=True)

    if emit_machine(rows, fmt, CSV_COLUMNS):
        return
    r0 = rows[0]
    title = (
        f"Latency per batch of {r0['batch_size']} — {r0['mode']}, {r0['precision']}"
        f"{', channels_last' if r0['channels_last'] else ''}{', compiled' if r0['compile'] else ''} — "
        f"{r0['device']} ({r0['device_name']}), {r0['threads']} threads, torch {r0['torch']}, "
        f"{r0['warmup']} warm-up + {r0['iters']} timed steps"
    )
    cols = ["model", "backend", "median_ms", "min_ms", "max_ms", "images_per_s", "peak_mem_mb", "params_m", "gflops"]
    if r0["compile"]:
        cols.append("compile_s")
    if any(r["vs_model"] for r in rows):
        cols += ["time_ratio", "throughput_ratio"]
    if any(r.get("vs_image_size") not in (None, r["image_size"]) for r in rows):
        cols.append("image_size")  # e.g. a timm baseline at its own input size
    if any(r["batch_size"] != r["batch_size_requested"] for r in rows):
        cols.append("batch_size")
    headers = {
        "median_ms": "median ms",
        "min_ms": "min ms",
        "max_ms": "max ms",
        "images_per_s": "images/s",
        "peak_mem_mb": f"peak MB ({r0['mem_method']})",
        "params_m": "params (M)",
        "gflops": "GFLOPS",
        "compile_s": "compile s",
        "time_ratio": "time ×base",
        "throughput_ratio": "throughput ×base",
        "batch_size": "batch",
        "image_size": "input",
    }
    digits = {"median_ms": 1, "min_ms": 1, "max_ms": 1, "images_per_s": 2, "peak_mem_mb": 1, "params_m": 2, "gflops": 2, "compile_s": 1, "time_ratio": 2, "throughput_ratio": 2}
    emit(_table_rows(rows), fmt, cols, title=title, headers=headers, digits=digits)
