"""Run a study: for each (variant, seed) unit, count params/GFLOPS, time it against the study's
baseline (interleaved), train it if asked, and store one result file, atomically.

Result files: ``<results>/<study>/<variant>__<train>__seed<k>.json`` (see :data:`RESULT_FIELDS`).
A unit whose file exists is skipped, so an interrupted study resumes where it stopped; ``force``
redoes it. Latency does not depend on the seed, so it is measured in each variant's seed-0 unit
only (and once per process).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError
from sasa_bench.spec import ModelSpec
from sasa_bench.store import safe_name, write_result
from sasa_bench.studies.expand import Unit, Variant, expand, shard_units, units
from sasa_bench.studies.spec import Study

TRAIN_CHOICES = ("none", "short", "paper")

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
    command: str = ""

    def validate(self) -> RunOptions:
        if self.train not in TRAIN_CHOICES:
            raise SasaError(f"unknown --train {self.train!r} (choose from {', '.join(TRAIN_CHOICES)})")
        if self.latency_iters < 1:
            raise SasaError(f"--latency-iters must be >= 1, got {self.latency_iters}")
        if self.batch_size is not None and self.batch_size < 1:
            raise SasaError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self

    def model_overrides(self) -> dict[str, Any]:
        """What the options change in every measured spec (None = not given)."""
        return {k: v for k, v in {"image_size": self.image_size, "backend": self.backend}.items() if v is not None}


@dataclass
class RunReport:
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def plan(study: Study, opts: RunOptions) -> tuple[list[Variant], list[Unit]]:
    """The variants (validated) and this shard's units. Training specs are checked here too,
    so a variant the recipe cannot build fails before anything runs."""
    opts.validate()
    variants = expand(study, opts.model_overrides())
    mine = shard_units(units(variants, opts.seeds, opts.train), *opts.shard)
    if opts.train != "none":
        cfg = train_config(opts, 0)
        for v in variants:
            try:
                train_spec(v, cfg)
            except SasaError as e:
                raise SasaError(f"study {study.name!r}, variant {v.name!r} under --train {opts.train}: {e}") from None
    return variants, mine


def result_path(results_dir: Path, study: Study, unit: Unit) -> Path:
    return Path(results_dir) / safe_name(study.name) / f"{safe_name(unit.key)}.json"


def run_study(
    study: Study,
    opts: RunOptions,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunReport:
    """Run this shard's units that have no result file yet. ``progress(message, done, total)``."""
    _, todo = plan(study, opts)
    report = RunReport()
    latency_cache: dict[str, dict[str, Any] | None] = {}
    total = len(todo)
    for i, unit in enumerate(todo):
        path = result_path(opts.results_dir, study, unit)
        if path.exists() and not opts.force:
            report.skipped.append(path)
            if progress:
                progress(f"{unit.key}: done already", i + 1, total)
            continue
        if progress:
            progress(f"{unit.key}", i, total)
        payload = run_unit(study, unit, opts, latency_cache, log)
        report.written.append(write_result(opts.results_dir, study.name, unit.key, payload))
        if progress:
            progress(f"{unit.key}", i + 1, total)
    return report


def run_unit(
    study: Study,
    unit: Unit,
    opts: RunOptions,
    latency_cache: dict[str, dict[str, Any] | None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure one unit and return its result payload (not yet written)."""
    t0 = time.perf_counter()
    v = unit.variant
    flops = count(v.spec)
    latency = None
    if opts.latency and unit.seed == 0:
        cache = latency_cache if latency_cache is not None else {}
        if v.name not in cache:
            if log:
                log(f"timing {v.spec.name} vs {v.vs.name if v.vs else '—'}")
            cache[v.name] = time_variant(v, opts)
        latency = cache[v.name]
    training = None
    if unit.train != "none":
        training = train_unit(study, unit, opts)
    return {
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


# --------------------------------------------------------------------------- measurements
# Each goes through one small function so tests can replace it.


def count(spec: ModelSpec) -> dict[str, Any]:
    from sasa_bench.cli.flops import flops_row

    row = flops_row(spec, counter="torch")
    return {k: row[k] for k in ("params", "params_m", "gmacs", "gflops", "image_size")}


def time_variant(v: Variant, opts: RunOptions) -> dict[str, Any]:
    from sasa_bench.measure.latency import LatencyOptions, measure_latency

    lat = LatencyOptions(
        device=opts.device,
        batch_size=opts.batch_size or opts.latency_batch,
        warmup=opts.latency_warmup,
        iters=opts.latency_iters,
    )
    rows = measure_latency([v.spec], lat, vs=v.vs)
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
        **opts.train_overrides,
    }
    return resolve_config(opts.train, None, overrides)


def train_spec(v: Variant, cfg: Any) -> ModelSpec:
    """The trained model: the variant's preset, then the recipe's model settings (e.g. the short
    recipe's width 0.25, 64x64, 10 classes), then the study's and the command line's fields."""
    from sasa_bench.train import spec_for

    return spec_for(cfg, v.model, v.overrides)


def train_unit(study: Study, unit: Unit, opts: RunOptions) -> dict[str, Any]:
    from sasa_bench.train import run_training

    cfg = train_config(opts, unit.seed)
    spec = train_spec(unit.variant, cfg)
    out_dir = Path(opts.runs_dir) / safe_name(study.name) / safe_name(unit.key)
    # resume="auto": an interrupted training run continues from its last checkpoint.
    summary = run_training(spec, cfg, out_dir, progress=False, resume=None if opts.force else "auto")
    return {
        **{k: v for k, v in summary.items() if k not in ("spec", "config")},
        "recipe": unit.train,
        "dataset": cfg.data,
        "spec": spec.to_dict(),
        "flops": count(spec),
        "config": cfg.to_dict(),
        "run_dir": str(out_dir),
    }


def env_info(device: str = "auto") -> dict[str, Any]:
    import torch

    from sasa_bench.measure.latency import device_name

    gpu = None
    if device != "cpu" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {
        "cpu": device_name(torch.device("cpu")),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "threads": torch.get_num_threads(),
    }
