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
) -> None:
    """Build REPORT.md: one table per study (ours beside the paper, with deltas), CSV copies and figures."""
    from sasa_bench.report.document import write_report

    if not results.is_dir():
        raise SasaError(f"no results folder {results} (run `sasa-bench ablate NAME` first)")
    with err_console.status("building the report…"):
        path, tables = write_report(results, out or results)
    have = [t.name for t in tables if t.has_results]
    missing = [t.name for t in tables if not t.has_results]
    err_console.print(f"wrote {path} ({len(have)} studies with results" + (f"; missing: {', '.join(missing)}" if missing else "") + ")")
    print(path)
