"""Rows out: a rich table on a terminal, JSON or CSV for machines (data on stdout only)."""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sasa_bench.choices import Format
from sasa_bench.progress import err_console, step_progress  # noqa: F401 - re-exported: the one console and step bar

FORMATS = Format.values()  # the choice set: sasa_bench.choices.Format



def check_format(fmt: Format | str) -> str:
    """The format as its plain string (Typer already rejects others; Python callers too)."""
    return Format.check(fmt, "format")


def _cell(v: Any, digits: int = 3) -> str:
    """Table text for a value; escaped, since names like ``resnet26[k=9]`` look like rich markup."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return escape(str(v))


def emit_machine(rows: Sequence[dict[str, Any]], fmt: str, csv_columns: Sequence[str] | None = None) -> bool:
    """Print ``rows`` as JSON or CSV if ``fmt`` asks for one; False means: the caller draws a table."""
    if fmt not in ("json", "csv"):
        return False
    emit(rows, fmt, csv_columns if fmt == "csv" else None)
    return True


def emit(
    rows: Sequence[dict[str, Any]],
    fmt: str,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    digits: dict[str, int] | None = None,
) -> None:
    """Print ``rows``; ``columns`` picks and orders the table/CSV columns (JSON keeps every key)."""
    fmt = check_format(fmt)
    cols = list(columns) if columns else list(dict.fromkeys(k for r in rows for k in r))
    if fmt == "json":
        sys.stdout.write(json.dumps(list(rows), indent=2, default=str) + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for r in rows:
            writer.writerow({c: _csv_cell(r.get(c)) for c in cols})
        sys.stdout.write(buf.getvalue())
    else:
        table = Table(title=title)
        for c in cols:
            left = c in ("model", "variant", "name")
            table.add_column((headers or {}).get(c, c), justify="left" if left else "right", no_wrap=left)
        for r in rows:
            table.add_row(*(_cell(r.get(c), (digits or {}).get(c, 3)) for c in cols))
        # Off a terminal rich assumes 80 columns; let wide tables keep their model names.
        Console(width=None if sys.stdout.isatty() else 240).print(table)


def _csv_cell(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v))
    return "" if v is None else v
