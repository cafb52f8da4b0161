"""Run a study: for each (variant, seed) unit, count params/GFLOPS, time it against the study's
baseline (interleaved), train it if asked, and store one result file, atomically.

Result files: ``<results>/<study>/<variant>__<train>__seed<k>.json`` (see :data:`RESULT_FIELDS`).
A unit whose file exists is skipped, so an interrupted study resumes where it stopped; ``force``
redoes it. Latency does not depend on the seed, so it is measured in each variant's seed-0 unit
only (and once per process).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError
from sasa_bench.kernels import resolve_backend
from sasa_bench.spec import ModelSpec
from sasa_bench.store import (
    atomic_write_text,
    clean_stale_temps,
    key_changes,
    key_of_record,
    read_record,
    result_key,
    safe_name,
    write_result,
)
from sasa_bench.studies.claim import DEFAULT_TIMEOUT_S, Claims
from sasa_bench.studies.expand import Unit, Variant, expand, shard_units, units
from sasa_bench.studies.spec import Study

TRAIN_CHOICES = ("none", "short", "paper")
ENGINES = ("local", "ray")  # who runs the units: this process (default) | Ray tasks (studies/ray_engine.py)

# The keys of a result file (besides the store's schema/kind/written_at).
RESULT_FIELDS = {
    "study": "study name (the file name of ablations/<study>.toml)",
    "study_title": "the study's title",
    "paper_ref": "where in the paper (e.g. 'Table 4')",
    "paper_metric": "what the paper's accuracy is (e.g. 'ImageNet val top-1')",
    "variant": "variant name (unique within the study)",
    "label": "variant display name",
    "index": "variant's position in the study file",
    "seed": "training seed (0 without training)",
    "train": "none | short | paper",
    "spec": "the measured ModelSpec (dict)",
    "flops": "{params, params_m, gmacs, gflops, image_size} of `spec`, 1 image, 2 FLOPs per multiply-add",
    "latency": "null, or measure_latency's row for `spec` interleaved against `latency.vs_model` "
    "(median_ms, time_ratio = model/baseline, throughput_ratio, batch_size, device_name, ...)",
    "training": "null, or {recipe, dataset, spec (the trained model), config, top1, top5, ...summary}",
    "paper": "the paper's numbers for this variant: {top1?, gflops?, params_m?}",
    "note": "variant note from the study file",
    "env": "{cpu, gpu, torch, python, platform, threads}",
    "command": "the command line that produced the file",
    "elapsed_s": "seconds this unit took",
    "key": "everything that produced the result (store.result_key): a unit whose key differs is redone",
}


@dataclass
class RunOptions:
    train: str = "short"
    seeds: int = 1
    results_dir: Path = Path("results")
    runs_dir: Path = Path("runs")
    device: str = "auto"
    image_size: int | None = None
    batch_size: int | None = None  # latency and training batch; None: latency 2, training the recipe's
    backend: str | None = None
    data: str | None = None
    data_dir: str | None = None
    train_overrides: dict[str, Any] = field(default_factory=dict)  # extra TrainConfig keys (tests: max_steps)
    latency: bool = True
    latency_iters: int = 5
    latency_warmup: int = 2
    latency_batch: int = 2
    shard: tuple[int, int] = (1, 1)
    force: bool = False
    threads: int | None = None  # torch CPU threads for latency and training (None: torch's / the recipe's)
    lock_timeout: float = DEFAULT_TIMEOUT_S  # another host's unit lock untouched this long is stale
    command: str = ""

    def validate(self) -> RunOptions:
        if self.train not in TRAIN_CHOICES:
            raise SasaError(f"unknown --train {self.train!r} (choose from {', '.join(TRAIN_CHOICES)})")
        if self.latency_iters < 1:
            raise SasaError(f"--latency-iters must be >= 1, got {self.latency_iters}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SasaError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.threads is not None and self.threads < 1:
            raise SasaError(f"--threads must be >= 1, got {self.threads}")
        if not self.lock_timeout > 0:
            raise SasaError(f"--lock-timeout must be > 0 seconds, got {self.lock_timeout}")
        return self

    def model_overrides(self) -> dict[str, Any]:
        """What the options change in every measured spec (None = not given)."""
        return {k: v for k, v in {"image_size": self.image_size, "backend": self.backend}.items() if v is not None}


@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)
    redone: list[Path] = field(default_factory=list)  # written over an unreadable or stale result
    failed: list[tuple[str, str]] = field(default_factory=list)  # (unit key, why): engines that go on past a failure
    retried: list[str] = field(default_factory=list)  # units run again after their node or worker died


def plan(study: Study, opts: RunOptions) -> tuple[list[Variant], list[Unit]]:
    """The variants (validated) and this shard's units. Training specs are checked here too,
    so a variant the recipe cannot build fails before anything runs."""
    opts.validate()
    variants = expand(study, opts.model_overrides())
    mine = shard_units(units(variants, opts.seeds, opts.train), *opts.shard)
    if opts.latency:
        latency_options(opts).validate()  # e.g. --device cuda on a machine without one
        if opts.backend:
            resolve_backend(opts.backend, latency_options(opts).torch_device().type)
    if opts.train != "none" and any(v.spec.detector != "none" for v in variants):
        raise SasaError(f"study {study.name!r} holds detectors: run it with --train none (params, FLOPs, "
                        "latency); train one with `sasa-bench train --task detection`")
    if opts.train != "none" and any(v.spec.timm for v in variants):  # recipes narrow our models only
        raise SasaError(f"study {study.name!r} compares timm models: run it with --train none (params, FLOPs, latency, memory)")
    if opts.train != "none":
        cfg = train_config(opts, 0)
        check_training_data(cfg)
        if opts.backend:
            resolve_backend(opts.backend, _training_device().type)
        for v in variants:
            try:
                train_spec(v, cfg)
            except SasaError as e:
                raise SasaError(f"study {study.name!r}, variant {v.name!r} under --train {opts.train}: {e}") from None
    return variants, mine


def result_path(results_dir: Path, study: Study, unit: Unit) -> Path:
    return Path(results_dir) / safe_name(study.name) / f"{safe_name(unit.key)}.json"


def unit_key(unit: Unit, opts: RunOptions) -> dict[str, Any]:
    """The key the unit's result will carry when run with ``opts`` (see :func:`store.result_key`)."""
    from sasa_bench.train.recipes import NEUTRAL_FIELDS

    v = unit.variant
    cfg = tspec = None
    if unit.train != "none":
        c = train_config(opts, unit.seed)
        tspec = train_spec(v, c).to_dict()
        c.precision = _training_precision(c.precision)
        cfg = c.to_dict()
    latency = None
    if opts.latency and unit.seed == 0:
        lat = latency_options(opts)
        latency = {"vs": v.vs.to_dict() if v.vs else None, "batch_size": lat.batch_size, "iters": lat.iters,
                   "warmup": lat.warmup, "device": str(lat.torch_device())}
    return result_key(v.spec.to_dict(), unit.train, cfg, tspec, latency, NEUTRAL_FIELDS)


def unit_status(study: Study, unit: Unit, opts: RunOptions) -> tuple[str, str]:
    """("todo" | "done" | "stale" | "invalid", why): whether the unit's stored result counts."""
    from sasa_bench.train.recipes import NEUTRAL_FIELDS

    path = result_path(opts.results_dir, study, unit)
    if not path.exists():
        return "todo", ""
    rec, reason = read_record(path)
    if rec is None:
        return "invalid", f"unreadable result ({reason})"
    old, new = key_of_record(rec, NEUTRAL_FIELDS), unit_key(unit, opts)
    if old.get("latency") is None and new.get("latency") is not None and _timed_elsewhere(study, unit, opts, new):
        old = {**old, "latency": new["latency"]}  # a training run without latency: its variant's
        # current `--train none` unit holds the timing, so the training is not redone for it
    changes = key_changes(old, new)
    if changes:
        return "stale", ", ".join(changes)
    return "done", ""


def _timed_elsewhere(study: Study, unit: Unit, opts: RunOptions, new: dict[str, Any]) -> bool:
    """Whether the variant's `--train none` result exists, is valid and was timed as ``opts`` asks
    (studies are often trained with --no-latency and timed apart, on a quiet machine)."""
    from sasa_bench.train.recipes import NEUTRAL_FIELDS

    if unit.train == "none":
        return False
    rec, _ = read_record(result_path(opts.results_dir, study, Unit(unit.variant, 0, "none")))
    return rec is not None and key_of_record(rec, NEUTRAL_FIELDS).get("latency") == new["latency"]


def run_study(
    study: Study,
    opts: RunOptions,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    step_progress: Callable[[str, int, int], None] | None = None,
) -> RunReport:
    """Run this shard's units that have no valid, current result yet (an unreadable or stale
    one is redone, saying why through ``log``). ``progress(message, done, total)`` counts units;
    ``step_progress`` the steps inside the current unit (latency timing, training).

    Each unit is claimed first (:mod:`sasa_bench.studies.claim`): a unit another live process
    holds is left to it and checked again later, so N processes on one results folder split the
    study; this returns when every unit has its result (or raises on the first error)."""
    _, todo = plan(study, opts)
    report = RunReport()
    latency_cache: dict[str, dict[str, Any] | None] = {}
    total, done = len(todo), 0
    started = time.time()
    clean_stale_temps(Path(opts.results_dir) / safe_name(study.name))
    pending, waiting_on = list(todo), ""
    with Claims(opts.lock_timeout, log, opts.command) as claims:
        while pending:
            busy: list[tuple[Unit, str]] = []
            for unit, path, mine in claim_units(study, opts, pending, claims, started, report, busy, log):
                if not mine:
                    done += 1
                    if progress:
                        progress(f"{unit.key}: done already", done, total)
                    continue
                try:
                    if progress:
                        progress(f"{unit.key}", done, total)
                    payload = run_unit(study, unit, opts, latency_cache, log, step_progress)
                    report.written.append(write_result(opts.results_dir, study.name, unit.key, payload))
                    done += 1
                    if progress:
                        progress(f"{unit.key}", done, total)
                finally:
                    claims.release(path)
            pending = [u for u, _ in busy]
            if pending:
                waiting_on = say_waiting(busy, waiting_on, log)
                if progress:
                    progress(f"waiting for {len(busy)} unit(s) held elsewhere", done, total)
                time.sleep(WAIT_S)
    return report


def claim_units(
    study: Study,
    opts: RunOptions,
    pending: list[Unit],
    claims: Claims,
    started: float,
    report: RunReport,
    busy: list[tuple[Unit, str]],
    log: Callable[[str], None] | None = None,
) -> Iterator[tuple[Unit, Path, bool]]:
    """Walk ``pending`` lazily (each engine claims as it goes): yield ``(unit, result path, True)``
    for a unit this process now holds (the caller runs it, then releases it), ``(unit, path,
    False)`` for one already done (counted as skipped), and add ``(unit, holder)`` to ``busy`` for
    one another live process holds. The status is checked again once the lock is held, so a unit
    another process finished meanwhile is not redone; a stale or unreadable result is logged."""
    for unit in pending:
        path = result_path(opts.results_dir, study, unit)
        status, why = current_status(study, unit, opts, started)
        if status != "done":
            got = claims.claim(path)
            if got is not True:
                busy.append((unit, str(got)))
                continue
            status, why = current_status(study, unit, opts, started)
            if status == "done":
                claims.release(path)
        if status == "done":
            report.skipped.append(path)
            yield unit, path, False
            continue
        if status in ("stale", "invalid"):
            report.redone.append(path)
            if log:
                log(f"{unit.key}: {why}, redoing")
        yield unit, path, True


def say_waiting(busy: list[tuple[Unit, str]], said: str, log: Callable[[str], None] | None) -> str:
    """Log which units other processes hold (when that changed); returns what was said."""
    holders = ", ".join(f"{u.key} ({who})" for u, who in busy)
    if busy and log and holders != said:
        log(f"waiting for {len(busy)} unit(s) that other processes are running: {holders}")
    return holders


WAIT_S = 5.0  # how often a process that has nothing left to claim looks at the units others hold


def current_status(study: Study, unit: Unit, opts: RunOptions, started: float) -> tuple[str, str]:
    """:func:`unit_status`, except that under ``--force`` every result is redone unless it was
    written after ``started`` (by a process sharing this folder, in this same round of work)."""
    if not opts.force:
        return unit_status(study, unit, opts)
    path = result_path(opts.results_dir, study, unit)
    try:
        fresh = path.stat().st_mtime >= started and read_record(path)[0] is not None
    except FileNotFoundError:
        fresh = False
    return ("done", "") if fresh else ("todo", "")


def run_unit(
    study: Study,
    unit: Unit,
    opts: RunOptions,
    latency_cache: dict[str, dict[str, Any] | None] | None = None,
    log: Callable[[str], None] | None = None,
    step_progress: Callable[[str, int, int], None] | None = None,
    trainer: Callable[..., dict[str, Any]] | None = None,
    attempt: str | None = None,
) -> dict[str, Any]:
    """Measure one unit and return its result payload (not yet written). ``trainer`` replaces
    ``run_training`` (e.g. :func:`launch.ddp_trainer`); ``attempt`` see :func:`train_unit`."""
    t0 = time.perf_counter()
    v = unit.variant
    flops = count(v.spec)
    latency = None
    if opts.latency and unit.seed == 0:
        cache = latency_cache if latency_cache is not None else {}
        if v.name not in cache:
            if log:
                log(f"timing {v.spec.name} vs {v.vs.name if v.vs else '—'}")
            cache[v.name] = time_variant(v, opts, step_progress)
        latency = cache[v.name]
    training = None
    if unit.train != "none":
        training = train_unit(study, unit, opts, step_progress, log, trainer, attempt)
    payload = {
        "study": study.name,
        "study_title": study.title,
        "paper_ref": study.paper_ref,
        "paper_metric": study.metric,
        "variant": v.name,
        "label": v.label,
        "index": v.index,
        "seed": unit.seed,
        "train": unit.train,
        "spec": v.spec.to_dict(),
        "flops": flops,
        "latency": latency,
        "training": training,
        "paper": dict(v.paper),
        "note": v.note,
        "env": env_info(opts.device),
        "command": opts.command,
        "elapsed_s": time.perf_counter() - t0,
    }
    from sasa_bench.train.recipes import NEUTRAL_FIELDS

    # The key of what actually ran (the same function rebuilds it for files written before keys).
    payload["key"] = key_of_record(payload, NEUTRAL_FIELDS)
    return payload


# --------------------------------------------------------------------------- measurements
# Each goes through one small function so tests can replace it.


def count(spec: ModelSpec) -> dict[str, Any]:
    from sasa_bench.measure.flops import spec_flops

    row = spec_flops(spec, counter="torch")
    return {k: row[k] for k in ("params", "params_m", "gmacs", "gflops", "image_size")}


def latency_options(opts: RunOptions) -> Any:
    from sasa_bench.measure.latency import LatencyOptions

    return LatencyOptions(
        device=opts.device,
        batch_size=opts.batch_size or opts.latency_batch,
        warmup=opts.latency_warmup,
        iters=opts.latency_iters,
        threads=opts.threads,
    )


def time_variant(v: Variant, opts: RunOptions, progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    from sasa_bench.measure.latency import measure_latency

    rows = measure_latency([v.spec], latency_options(opts), vs=v.vs, progress=progress)
    row = dict(rows[0])
    row.pop("spec", None)  # the result file has it already
    return row


def train_config(opts: RunOptions, seed: int) -> Any:
    from sasa_bench.train import resolve_config

    overrides = {
        "seed": seed,
        "data": opts.data,
        "data_dir": str(opts.data_dir) if opts.data_dir else None,
        "batch_size": opts.batch_size,
        "threads": opts.threads,
        **opts.train_overrides,
    }
    return resolve_config(opts.train, None, overrides)


def _training_precision(requested: str) -> str:
    """The precision a training run records for ``requested`` here ("auto" resolves per device)."""
    from sasa_bench.hardware import resolve_precision

    return resolve_precision(requested, _training_device(), warn=False)


def _training_device() -> Any:
    """Where `sasa-bench train` (and so a study's training) runs: CUDA when available."""
    from sasa_bench.hardware import parse_device

    return parse_device("auto")


def check_training_data(cfg: Any) -> None:
    """Dataset name and folder, checked before the first unit (loading waits for the unit)."""
    from sasa_bench.train.data import DATASETS

    if cfg.data not in DATASETS:
        raise SasaError(f"unknown dataset {cfg.data!r} (choose from {', '.join(DATASETS)})")
    if cfg.data == "imagenet" and not cfg.data_dir:
        raise SasaError(f"--train {cfg.recipe} uses ImageNet: give --data-dir ROOT (with ROOT/train and ROOT/val)")
    if cfg.data_dir and not Path(cfg.data_dir).is_dir():
        raise SasaError(f"--data-dir {cfg.data_dir}: no such folder")


def train_spec(v: Variant, cfg: Any) -> ModelSpec:
    """The trained model: the variant's preset, then the recipe's model settings (e.g. the short
    recipe's width 0.25, 64x64, 10 classes), then the study's and the command line's fields."""
    from sasa_bench.train import spec_for

    return spec_for(cfg, v.model, train_overrides(v, cfg))


def train_overrides(v: Variant, cfg: Any) -> dict[str, Any]:
    """The variant's model fields as trained: a recipe that narrows every model (short: 0.25)
    keeps a width study's ratios, so a width the variant itself sets multiplies the recipe's
    (0.5 -> 0.125, ..., 2.0 -> 0.5); a width set in the study's base is taken as is."""
    overrides = dict(v.overrides)
    if "width" in v.varied and "width" in cfg.model:
        overrides["width"] = overrides["width"] * cfg.model["width"]
    return overrides


def train_unit(
    study: Study,
    unit: Unit,
    opts: RunOptions,
    on_step: Callable[[str, int, int], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    trainer: Callable[..., dict[str, Any]] | None = None,
    attempt: str | None = None,
) -> dict[str, Any]:
    """Train the unit in ``<runs>/<study>/<unit>/``. ``attempt`` names one round of work across
    retries (an engine that re-runs a unit whose node died passes the same name): under --force
    the first try starts afresh and a retry of the same attempt resumes its checkpoint."""
    from sasa_bench.train import run_training

    cfg = train_config(opts, unit.seed)
    spec = train_spec(unit.variant, cfg)
    out_dir = Path(opts.runs_dir) / safe_name(study.name) / safe_name(unit.key)
    # resume="auto": an interrupted training run continues from its last checkpoint; one made with
    # other settings (the unit's result is stale) starts afresh; --force always starts afresh.
    from sasa_bench.train.checkpoint import ResumeMismatch

    def train(resume: str | None) -> dict[str, Any]:
        return (trainer or run_training)(
            spec, cfg, out_dir, progress=on_step is not None, resume=resume, on_step=on_step, on_log=on_log,
            overwrite=resume is None,
        )

    fresh = opts.force
    if opts.force and attempt:
        marker = out_dir / ".forced-attempt"
        fresh = not (marker.exists() and marker.read_text() == attempt)
        if fresh:
            atomic_write_text(marker, attempt)
    try:
        summary = train(None if fresh else "auto")
    except ResumeMismatch as e:
        if on_log:
            on_log(f"{unit.key}: not resuming ({e}); training afresh")
        summary = train(None)
    return {
        **{k: v for k, v in summary.items() if k not in ("spec", "config")},
        "recipe": unit.train,
        "dataset": cfg.data,
        "spec": spec.to_dict(),
        "flops": count(spec),
        "config": {**cfg.to_dict(), "precision": _training_precision(cfg.precision)},  # "auto" as resolved
        "run_dir": str(out_dir),
    }


def env_info(device: str = "auto") -> dict[str, Any]:
    """The host behind a result (hardware.host_info: CPU model and ISA, native bf16, GPU, versions)."""
    from sasa_bench.errors import SasaError
    from sasa_bench.hardware import host_info, parse_device

    try:
        return host_info(parse_device(device))
    except SasaError:  # only latency runs on --device (checked by plan); training falls back to the CPU
        return host_info("cpu")
