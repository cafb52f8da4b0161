"""The results store: one JSON file per measurement or run, written atomically.

Layout: ``<results>/<kind>/<name>.json`` (kind = "latency", "flops", a study name, ...).
Every writer goes through :func:`atomic_write_text` / :func:`atomic_torch_save`: write to a
temp file in the same folder, fsync, then ``os.replace`` — a crash leaves the old file or the
new one, never half of one; SIGINT/SIGTERM arriving during a write are held until it is done;
a temp file left by a killed writer is removed by :func:`clean_stale_temps` at the next start.
JSON is always strict (non-finite floats are written as null).

Readers go through :func:`scan`: a file counts only if it parses and has the fields its kind
needs; everything else comes back as a :class:`Problem` (path + reason), never silently dropped.
A study result carries a ``key`` (:func:`result_key`) of everything that produced it, so a
changed setting makes it stale instead of silently reused.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
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


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM until the block is done (an atomic write finishes, then we stop)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[tuple[int, Any]] = []
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, lambda s, f: pending.append((s, f)))
        except (ValueError, OSError):  # pragma: no cover - not settable here
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig, frame in pending[:1]:
            handler = old.get(sig)
            if callable(handler):
                handler(sig, frame)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(sig)


# Temp names: ".<name>.<pid>.<random>.tmp", so a later start can tell a dead writer's leftovers.
_TMP = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?[^.]+\.tmp$")
STALE_TMP_AGE_S = 3600  # a temp without a live writer pid (or from another machine) this old is stale


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (one we may not signal counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files a killed writer left in ``folder`` (not recursive); returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    now = time.time()
    for p in folder.glob(".*.tmp"):
        m = _TMP.match(p.name)
        if m is None or not p.is_file():
            continue
        try:
            pid = int(m["pid"]) if m["pid"] else None
            dead = pid is not None and pid != os.getpid() and not pid_alive(pid)
            if dead or now - p.stat().st_mtime > STALE_TMP_AGE_S:
                p.unlink()
                removed.append(p)
        except OSError:
            continue
    return removed


def check_folder(path: str | os.PathLike[str], what: str) -> Path:
    """Before any work: ``path`` is, or can be made, a folder this process can write in."""
    p = Path(path)
    q = p
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise SasaError(f"{what} {p}: {q} is a file, not a folder")
    if not os.access(q, os.W_OK | os.X_OK):
        raise SasaError(f"{what} {p}: permission denied ({q} is not writable)")
    return p


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; an OS error names ``path`` (not the temp file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with signals_deferred():
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
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
    except OSError as e:
        where = e.filename if e.filename and not str(e.filename).endswith(".tmp") else path
        raise OSError(e.errno, e.strerror, str(where)) from None
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def strict(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (strict JSON has no NaN/Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    return obj


def json_text(obj: Any) -> str:
    """Strict, indented JSON (non-finite floats -> null; other objects -> str)."""
    return json.dumps(strict(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n"


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    return atomic_write_text(path, json_text(obj))


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


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class Problem:
    """A result file that does not count, and why (shown by `report` and `ablate`)."""

    path: Path
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


_NUM = (int, float)
# Study result files (written by the study runner): field -> accepted types (None = null ok).
STUDY_FIELDS: dict[str, tuple[type | None, ...]] = {
    "study": (str,),
    "variant": (str,),
    "index": (int,),
    "seed": (int,),
    "train": (str,),
    "spec": (dict,),
    "flops": (dict,),
    "latency": (dict, None),
    "training": (dict, None),
}
_FLOPS_FIELDS = ("params", "gflops")
_LATENCY_FIELDS = ("median_ms",)
_TRAINING_FIELDS = ("top1",)


def _type_ok(value: Any, types: tuple[type | None, ...]) -> bool:
    if value is None:
        return None in types
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, tuple(t for t in types if t is not None))


def _finite_number(value: Any) -> bool:
    return isinstance(value, _NUM) and not isinstance(value, bool) and math.isfinite(value)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-strict JSON value {name}")


_LIST = "a JSON list (rows saved from a command's --format json), not a result file"


def check_record(rec: Any) -> str | None:
    """Why a parsed result does not count (None = it does): schema, required fields, types."""
    if isinstance(rec, list):
        return _LIST
    if not isinstance(rec, dict):
        return f"expected a JSON object, got {type(rec).__name__}"
    if rec.get("schema") != SCHEMA_VERSION:
        return f"result schema {rec.get('schema')!r}, this version reads {SCHEMA_VERSION}"
    if not isinstance(rec.get("kind"), str):
        return "no 'kind'"
    if "study" not in rec and "variant" not in rec:
        return None  # latency / bench-layer files: their commands define their columns
    for name, types in STUDY_FIELDS.items():
        if name not in rec:
            return f"missing field {name!r}"
        if not _type_ok(rec[name], types):
            want = " or ".join("null" if t is None else {dict: "an object"}.get(t, t.__name__) for t in types)
            return f"{name!r} must be {want}, got {type(rec[name]).__name__}"
    for part, fields in (("flops", _FLOPS_FIELDS), ("latency", _LATENCY_FIELDS), ("training", _TRAINING_FIELDS)):
        sub = rec[part]
        for f in fields if sub is not None else ():
            if not _finite_number(sub.get(f)):
                return f"{part}.{f} must be a finite number, got {sub.get(f)!r}"
    if "key" in rec and not isinstance(rec["key"], dict):
        return f"'key' must be an object, got {type(rec['key']).__name__}"
    return None


def read_record(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) for a valid result file, else (None, reason)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        return None, f"unreadable ({e.strerror or e})"
    if not raw.strip():
        return None, "empty file"
    try:
        rec = json.loads(raw.decode(), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        return None, "not UTF-8 text"
    except json.JSONDecodeError as e:
        return None, f"not valid JSON (truncated?): {e.msg} at line {e.lineno} column {e.colno}"
    except ValueError as e:
        return None, str(e)
    reason = check_record(rec)
    return (None, reason) if reason else (rec, None)


def scan(results_dir: str | os.PathLike[str], kind: str | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Every valid result (of one kind, or all), each with ``_path``, and every file that is not.

    ``kind``-folders are ``<results>/<kind>/*.json``; files at the top (REPORT.md, tables/*.csv)
    are not results. The record's own ``kind`` must match its folder's.
    """
    root = Path(results_dir)
    pattern = f"{safe_name(kind)}/*.json" if kind else "*/*.json"
    valid, problems = [], []
    for p in sorted(root.glob(pattern)):
        if not p.is_file():
            continue
        rec, reason = read_record(p)
        if rec is None and reason == _LIST:
            continue  # a command's `--format json` rows saved beside the results: not a store record
        if rec is None:
            problems.append(Problem(p, reason or "invalid"))
            continue
        rec["_path"] = str(p)
        valid.append(rec)
    return valid, problems


def collect(results_dir: str | os.PathLike[str], kind: str | None = None) -> list[dict[str, Any]]:
    """Every valid stored result (of one kind, or all), each with ``_path`` (see :func:`scan`)."""
    return scan(results_dir, kind)[0]


# --------------------------------------------------------------------------- result keys

KEY_VERSION = 1  # of the result key below; a new version makes every older key stale
_NO_KEY = ("name",)  # spec fields that do not change a result (the name is derived)


def _spec_key(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    if spec is None:
        return None
    out = {k: v for k, v in spec.items() if k not in _NO_KEY}
    if isinstance(out.get("attention_groups"), tuple):
        out["attention_groups"] = list(out["attention_groups"])
    return out


def result_key(
    spec: dict[str, Any],
    train: str,
    train_config: dict[str, Any] | None = None,
    train_spec: dict[str, Any] | None = None,
    latency: dict[str, Any] | None = None,
    neutral: frozenset[str] | set[str] = frozenset(),
) -> dict[str, Any]:
    """Everything that produced a study result: the measured spec (with backend), the recipe and
    its resolved config (without ``neutral`` fields: threads, folders, logging), the trained
    spec, and the latency settings ``{vs, batch_size, iters, warmup, device}`` (None = not timed)."""
    cfg = None if train_config is None else {k: v for k, v in train_config.items() if k not in neutral}
    return strict({
        "version": KEY_VERSION,
        "schema": SCHEMA_VERSION,
        "spec": _spec_key(spec),
        "train": train,
        "train_config": cfg,
        "train_spec": _spec_key(train_spec),
        "latency": None if latency is None else {**latency, "vs": _spec_key(latency.get("vs"))},
    })


def key_of_record(rec: dict[str, Any], neutral: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """A study result's key: the stored one, or (files written before keys) rebuilt from the
    fields every result has, which hold the same values."""
    if isinstance(rec.get("key"), dict):
        return rec["key"]
    tr, lat = rec.get("training") or None, rec.get("latency") or None
    latency = None
    if lat is not None:
        latency = {
            "vs": lat.get("vs_spec"), "batch_size": lat.get("batch_size_requested", lat.get("batch_size")),
            "iters": lat.get("iters"), "warmup": lat.get("warmup"), "device": lat.get("device"),
        }
    return result_key(
        rec.get("spec") or {}, rec.get("train", "none"), tr.get("config") if tr else None,
        tr.get("spec") if tr else None, latency, neutral,
    )


_LABELS = {"kernel_size": "k"}
# Where a setting sits in a key -> how its name is shown when the bare name is ambiguous.
_SECTIONS = (("latency.vs.", "baseline "), ("latency.", "latency "), ("train_spec.", "trained model "),
             ("train_config.model.", "recipe model "), ("train_config.", ""), ("spec.", ""))


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def _show(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(map(str, v)) or "none"
    if v is None:
        return "none"
    return str(v)


def key_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between two keys, in words ("image size 32 -> 64"), one entry per change.

    A change seen in several places (the measured and the trained spec) is named once;
    ``latency: None`` in ``new`` (not timing now) accepts any stored latency.
    """
    if new.get("latency") is None:
        old = {**old, "latency": None}
    out: list[str] = []
    plain: set[str] = set()
    whole = {"latency": ("not timed", "timed"), "train_config": ("no training", "training"),
             "train_spec": ("no trained model", "a trained model")}
    skip = set()
    for top, (absent, present) in whole.items():
        if (old.get(top) is None) != (new.get(top) is None):
            skip.add(top)
            words = (absent, present) if old.get(top) is None else (present, absent)
            out.append(f"{words[0]} -> {words[1]}")
    a = _flat({k: v for k, v in old.items() if k not in skip})
    b = _flat({k: v for k, v in new.items() if k not in skip})
    for path in sorted(set(a) | set(b), key=lambda p: (p.count("."), p)):
        va, vb = a.get(path), b.get(path)  # a setting one key lacks (added later) counts as None
        if va == vb:
            continue
        leaf = path.rsplit(".", 1)[-1]
        text = f"{_LABELS.get(leaf, leaf).replace('_', ' ')} {_show(va)} -> {_show(vb)}"
        if text in plain:
            continue
        plain.add(text)
        out.append(next((p for sec, p in _SECTIONS if path.startswith(sec)), "") + text)
    return out


def _run_settings(rec: dict[str, Any], neutral: frozenset[str] | set[str]) -> dict[str, Any]:
    """The settings every result of one study run shares (not what the variants vary)."""
    key = key_of_record(rec, neutral)
    spec = key.get("spec") or {}
    out = {f"{k.replace('_', ' ')}": spec.get(k) for k in ("image_size", "num_classes", "backend")}
    cfg = {k: v for k, v in (key.get("train_config") or {}).items() if k != "seed"}
    out.update({f"training {k}": v for k, v in _flat(cfg).items()})
    lat = {k: v for k, v in (key.get("latency") or {}).items() if k != "vs"}
    out.update({f"latency {k.replace('_', ' ')}": v for k, v in lat.items()})
    return out


def mixed_settings(
    records: list[dict[str, Any]],
    neutral: frozenset[str] | set[str] = frozenset(),
    varied: dict[str, set[str]] | None = None,
) -> list[str]:
    """One line per study (and recipe) whose results were made with different shared settings
    (e.g. some at image size 32, some at 64): such a table would compare unlike with unlike.
    ``varied``: per study, the spec fields its variants differ in on purpose (the peers study's
    input sizes), which are not counted as mixed."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if "study" in r and "variant" in r:
            groups.setdefault((r["study"], r.get("train", "none")), []).append(r)
    out = []
    for (study, train), recs in sorted(groups.items()):
        seen: dict[str, dict[str, list[str]]] = {}
        meant = {f.replace("_", " ") for f in (varied or {}).get(study, set())}
        for r in recs:
            for name, v in _run_settings(r, neutral).items():
                if name in meant:
                    continue
                seen.setdefault(name, {}).setdefault(_show(v), []).append(f"{r['variant']}/seed{r.get('seed', 0)}")
        diffs = [
            f"{name} " + ", ".join(f"{v} ({', '.join(w[:3])}{', ...' if len(w) > 3 else ''})" for v, w in vals.items())
            for name, vals in seen.items() if len(vals) > 1
        ]
        if diffs:
            out.append(f"study {study!r} (train {train}) mixes results made with different settings: {'; '.join(diffs)}")
    return out
