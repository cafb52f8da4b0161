"""`sasa-bench report`: every study's results -> REPORT.md, CSV tables and PNG figures."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sasa_bench.cli.output import err_console
from sasa_bench.errors import SasaError


def report(
    results: Annotated[Path, typer.Option(help="Results folder written by `sasa-bench ablate`.")] = Path("results"),
    out: Annotated[Path | None, typer.Option(help="Where REPORT.md, tables/ and figures/ go. (default: the results folder)")] = None,
    allow_mixed: Annotated[bool, typer.Option("--allow-mixed", help="Build a study's table even when its results were made with different settings (image size, recipe, ...).")] = False,
) -> None:
    """Build REPORT.md: one table per study (ours beside the paper, with deltas), CSV copies and figures.

    Every unreadable or stale result file is listed (stderr and REPORT.md) with its reason."""
    from sasa_bench.report.document import write_report
    from sasa_bench.store import check_folder, mixed_settings
    from sasa_bench.studies.check import check_results, varied_fields
    from sasa_bench.train.recipes import NEUTRAL_FIELDS

    if not results.is_dir():
        raise SasaError(f"no results folder {results} (run `sasa-bench ablate NAME` first)")
    check_folder(out or results, "--out")
    current, problems = check_results(results)
    mixed = mixed_settings(current, NEUTRAL_FIELDS, varied_fields())
    if mixed and not allow_mixed:
        raise SasaError(f"{mixed[0]}; rerun the study with one setting (ablate redoes stale units) or pass --allow-mixed")
    for p in problems:
        err_console.print(f"warning: {p.path}: {p.reason}", markup=False, highlight=False, soft_wrap=True)
    with err_console.status("building the report…"):
        path, tables = write_report(results, out or results, problems=problems, notes=mixed)
    have = [t.name for t in tables if t.has_results]
    missing = [t.name for t in tables if not t.has_results]
    err_console.print(f"wrote {path} ({len(have)} studies with results" + (f"; missing: {', '.join(missing)}" if missing else "") + ")")
    print(path)
