"""Which stored study results a report can use: valid (store.scan), made by this version's key,
and still describing what the study file says (a variant edited since is stale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError
from sasa_bench.store import KEY_VERSION, Problem, key_changes, scan
from sasa_bench.studies.expand import expand
from sasa_bench.studies.spec import find_studies, load_study


def check_results(results_dir: Path, studies_dir: Path | None = None) -> tuple[list[dict[str, Any]], list[Problem]]:
    """(current results, problems): every unreadable, invalid or stale file with its reason."""
    records, problems = scan(results_dir)
    known = find_studies(studies_dir)
    expanded: dict[tuple[str, Any, Any], dict[str, dict[str, Any]] | None] = {}
    current = []
    for rec in records:
        reason = _stale_reason(rec, known, expanded)
        if reason:
            problems.append(Problem(Path(rec["_path"]), reason))
        else:
            current.append(rec)
    return current, sorted(problems, key=lambda p: str(p.path))


def _stale_reason(rec: dict[str, Any], known: dict[str, Path], cache: dict) -> str | None:
    key = rec.get("key")
    if isinstance(key, dict) and key.get("version") != KEY_VERSION:
        return f"stale: made by another sasa-bench (result key v{key.get('version')}, this one reads v{KEY_VERSION}); rerun the study"
    if "study" not in rec or rec["study"] not in known:
        return None
    spec = rec["spec"]
    where = (rec["study"], spec.get("image_size"), spec.get("backend"))
    if where not in cache:
        try:
            variants = expand(load_study(known[rec["study"]]), {"image_size": where[1], "backend": where[2]})
            cache[where] = {v.name: v.spec.to_dict() for v in variants}
        except SasaError:
            cache[where] = None  # an invalid study file is reported by `ablate --list`, not here
    now = (cache[where] or {}).get(rec["variant"])
    if now is None:
        return None  # a variant no longer in the study file is still shown (as the report always did)
    changes = key_changes({"spec": _bare(spec)}, {"spec": _bare(now)})
    if changes:
        return f"stale: the study file now gives {rec['variant']!r} {', '.join(changes)}; rerun `sasa-bench ablate {rec['study']}`"
    return None


def _bare(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "name"}


def varied_fields(studies_dir: Path | None = None) -> dict[str, set[str]]:
    """Per study, the setting fields (image size, classes, backend) its own variants differ in:
    the peers study runs each model at its own input size on purpose, so the report does not
    call its results mixed. A study that cannot be expanded here (timm missing) varies nothing."""
    out: dict[str, set[str]] = {}
    for name, path in find_studies(studies_dir).items():
        try:
            specs = [v.spec for v in expand(load_study(path))]
        except SasaError:
            continue
        out[name] = {f for f in ("image_size", "num_classes", "backend") if len({getattr(s, f) for s in specs}) > 1}
    return out
