"""The results store: one JSON file per measurement or run, written atomically.

Layout: ``<results>/<kind>/<name>.json`` (kind = "latency", "flops", a study name, ...).
Every writer goes through :func:`atomic_write_text` / :func:`atomic_torch_save`: write to a
temp file in the same folder, fsync, then ``os.replace`` — a crash leaves the old file or the
new one, never half of one. The report collects whatever files exist.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError

SCHEMA_VERSION = 1


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import
    os.umask(mask)
    return mask


# 0o666 minus the umask: the mode ``open()`` gives a new file (mkstemp's own is 0600)
FILE_MODE = 0o666 & ~_read_umask()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, FILE_MODE)  # results are meant to be shared, like any file open() creates
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> Path:
    """``torch.save`` through a temp file + rename (checkpoints)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def safe_name(text: str) -> str:
    """A file-name-safe version of a model/variant name."""
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", text).strip("_") or "unnamed"


def write_result(results_dir: str | os.PathLike[str], kind: str, name: str, payload: dict[str, Any]) -> Path:
    """Store one result as ``<results_dir>/<kind>/<name>.json`` (atomic), stamped with time/schema."""
    record = {"schema": SCHEMA_VERSION, "kind": kind, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **payload}
    return atomic_write_json(Path(results_dir) / safe_name(kind) / f"{safe_name(name)}.json", record)


def read_json(path: str | os.PathLike[str]) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SasaError(f"no such file: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SasaError(f"corrupt result file {path}: {e}") from None


def collect(results_dir: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """Every stored result (of one kind, or all), each with ``_path``; unreadable files are skipped."""
    root = Path(results_dir)
    pattern = f"{safe_name(kind)}/*.json" if kind else "*/*.json"
    out = []
    for p in sorted(root.glob(pattern)):
        try:
            rec = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError, OSError):
            continue
        if isinstance(rec, dict):
            rec["_path"] = str(p)
            out.append(rec)
    return out
