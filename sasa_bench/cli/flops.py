"""`sasa-bench flops` and `sasa-bench models`: parameters, GMACs and the paper's GFLOPS."""

from typing import Annotated

import typer

from sasa_bench.choices import Format
from sasa_bench.cli.options import FormatOpt, ModelOptions, model_options
from sasa_bench.cli.output import check_format, emit, err_console, step_progress
from sasa_bench.errors import SasaError
from sasa_bench.measure.flops import count_flops, count_params, spec_flops
from sasa_bench.models import build_model
from sasa_bench.report.paper import TABLE1, TABLE2, TABLE2_IMAGE_SIZE
from sasa_bench.spec import PRESETS, TABLE1_MODELS, TABLE2_MODELS, ModelSpec


def flops_row(spec: ModelSpec, paper: bool = False, counter: str = "both") -> dict:
    """One row: the model's params and FLOPs (and the paper's Table 1 or 2 numbers, if asked)."""
    row = spec_flops(spec, counter)
    if paper and spec.detector != "none":
        ref2 = TABLE2.get(spec.name) if spec.image_size == TABLE2_IMAGE_SIZE else None
        row["paper_params_m"] = ref2[1] if ref2 else None
        row["paper_gflops"] = ref2[0] if ref2 else None
        row["paper_map"] = ref2[2] if ref2 else None
    elif paper:
        ref = TABLE1.get(spec.name) if spec.image_size == 224 else None
        row["paper_params_m"] = ref[1] if ref else None
        row["paper_gflops"] = ref[0] if ref else None
        row["paper_top1"] = ref[2] if ref else None
    return row


@model_options
def flops(
    model_opts: ModelOptions,
    paper: Annotated[bool, typer.Option("--paper", help="Show the paper's Table 1/2 numbers beside ours; with no --model, that table's models.")] = False,
    table: Annotated[int, typer.Option("--table", help="With --paper and no --model: 1 (ImageNet, 224x224) or 2 (COCO RetinaNet, 640x640, slow: minutes).")] = 1,
    fmt: FormatOpt = Format.TABLE,
) -> None:
    """Params (M), GMACs and GFLOPS (= 2 x multiply-adds, the paper's convention).

    fvcore and torch's FlopCounterMode both count every model and must agree.
    """
    fmt = check_format(fmt)
    if table not in (1, 2):
        raise SasaError(f"--table must be 1 or 2, got {table}")
    specs = model_opts.specs((TABLE1_MODELS if table == 1 else TABLE2_MODELS) if paper else None)
    rows = []
    with step_progress("counting FLOPs…") as progress:
        for i, spec in enumerate(specs):
            progress(f"counting FLOPs of {spec.name}", i, len(specs))
            rows.append(flops_row(spec, paper))
        progress("counted", len(specs), len(specs))
    cols = ["model", "params_m", "gmacs", "gflops"]
    if any(s.detector != "none" for s in specs):
        cols.append("image_size")
    if paper:
        cols += ["paper_params_m", "paper_gflops"]
        cols += [c for c in ("paper_top1", "paper_map") if any(c in r for r in rows)]
    headers = {
        "params_m": "params (M)",
        "gmacs": "GMACs",
        "gflops": "GFLOPS",
        "paper_params_m": "paper params",
        "paper_gflops": "paper GFLOPS",
        "paper_top1": "paper top-1",
        "paper_map": "paper mAP",
        "image_size": "input",
    }
    digits = {"paper_params_m": 1, "paper_gflops": 1, "paper_top1": 1, "paper_map": 1, "params_m": 2, "gflops": 2, "gmacs": 2}
    emit(rows, fmt, cols if fmt != "json" else None, title="FLOPs and parameters (1 image)", headers=headers, digits=digits)


def meta_count(spec: ModelSpec) -> tuple[int, float | None]:
    """(params, GFLOPS) of a model built on the meta device: shapes only, no weights allocated or
    initialised and no arithmetic, so every preset counts in well under a second (the counters are
    the same dispatch-level ones as `flops`; a test checks they agree). GFLOPS is None where a
    layer cannot run on meta (then only params, counted on meta too)."""
    import torch

    try:
        with torch.device("meta"):
            model = build_model(spec)
    except (NotImplementedError, RuntimeError):  # a builder that reads weight values: build for real
        model = build_model(spec).to("meta")
    try:
        with torch.device("meta"):
            c = count_flops(model, spec.image_size, counter="torch")
        return c.params, c.gflops
    except (NotImplementedError, RuntimeError):
        return count_params(model), None


# `models --timm PATTERN` counts at most this many matches (each builds a model: ~1 s); more are
# listed by name and input size only.
TIMM_COUNT_LIMIT = 40


def models(
    fmt: FormatOpt = Format.TABLE,
    timm: Annotated[str | None, typer.Option("--timm", help="List timm's models matching this pattern (e.g. 'halonet*', '*botnet*'), usable as timm:NAME; needs sasa-bench[timm].", show_default=False)] = None,
) -> None:
    """List the presets with their params and GFLOPS (224x224, 1000 classes; detectors 640x640).

    Counted on PyTorch's meta device (shapes only): seconds for every preset. With --timm, timm's
    models instead, each at its default input size."""
    fmt = check_format(fmt)
    if timm is not None:
        _timm_models(timm, fmt)
        return
    rows = []
    with err_console.status("counting FLOPs…"):
        for spec in PRESETS.values():
            n, gflops = meta_count(spec)
            r = {"model": spec.name, "params": n, "params_m": n / 1e6, "gflops": gflops, "image_size": spec.image_size}
            r["depth"], r["stem"] = spec.depth, spec.stem
            r["attention_groups"] = list(spec.attention_groups)
            rows.append(r)
    emit(
        rows,
        fmt,
        ["model", "depth", "stem", "attention_groups", "params_m", "gflops"] if fmt != "json" else None,
        title="Presets",
        headers={"params_m": "params (M)", "gflops": "GFLOPS", "attention_groups": "attention groups"},
    )


def _timm_models(pattern: str, fmt: str) -> None:
    """`models --timm PATTERN`: timm's names (as timm:NAME), input size, crop, params, GFLOPS."""
    from sasa_bench.models.timm_models import list_timm_models, pretrained_cfg
    from sasa_bench.spec import make_spec

    names = list_timm_models(pattern)
    if not names:
        raise SasaError(f"no timm model matches {pattern!r} (patterns are shell-style: 'halonet*', '*botnet*')")
    count = len(names) <= TIMM_COUNT_LIMIT
    if not count:
        err_console.print(f"{len(names)} models match: not counting them (at most {TIMM_COUNT_LIMIT}; narrow the pattern)")
    rows = []
    with step_progress("counting timm models…") as progress:
        for i, name in enumerate(names):
            progress(f"counting timm:{name}", i, len(names))
            cfg = pretrained_cfg(name)
            r = {"model": f"timm:{name}", "image_size": int((cfg.get("input_size") or (3, 224, 224))[-1]),
                 "crop_pct": cfg.get("crop_pct"), "interpolation": cfg.get("interpolation"),
                 "params": None, "params_m": None, "gflops": None}
            if count:
                n, gflops = meta_count(make_spec(f"timm:{name}"))
                r.update(params=n, params_m=n / 1e6, gflops=gflops)
            rows.append(r)
        progress("counted", len(names), len(names))
    emit(rows, fmt, ["model", "image_size", "crop_pct", "interpolation", "params_m", "gflops"] if fmt != "json" else None,
         title=f"timm models matching {pattern!r}",
         headers={"params_m": "params (M)", "gflops": "GFLOPS", "image_size": "input", "crop_pct": "crop"},
         digits={"params_m": 2, "gflops": 2})
