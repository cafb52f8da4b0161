"""`sasa-bench ablate NAME`: run one of the paper's ablations (a study file in ablations/)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from sasa_bench.cli.options import device_option
from sasa_bench.cli.output import err_console
from sasa_bench.errors import SasaError
from sasa_bench.store import check_folder
from sasa_bench.studies.claim import DEFAULT_TIMEOUT_S

_RUN = "Run"
_SPEED = "Speed"
_ENGINE = "Engine (where units run)"


def ablate(
    name: Annotated[str | None, typer.Argument(help="Study name (see --list) or a path to a study .toml file.", show_default=False)] = None,
    train: Annotated[str, typer.Option(help="none (params/FLOPs/latency only) | short (Fashion-MNIST, minutes per variant on CPU) | paper (the paper's ImageNet recipe).", rich_help_panel=_RUN)] = "short",
    data: Annotated[str | None, typer.Option(help="Dataset: fashion-mnist | imagenet | synthetic. (default: the recipe's)", rich_help_panel=_RUN)] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Dataset folder (ImageNet root; Fashion-MNIST IDX files).", rich_help_panel=_RUN)] = None,
    device: Annotated[str, device_option("Latency device (training uses CUDA when available, as `sasa-bench train`): ", _RUN)] = "auto",
    seeds: Annotated[int, typer.Option(help="Training seeds per variant (0..N-1); without training there is one unit per variant.", rich_help_panel=_RUN)] = 1,
    list_: Annotated[bool, typer.Option("--list", help="List the studies, one line each, and exit.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the variants and the equivalent single commands; run nothing.")] = False,
    results: Annotated[Path, typer.Option(help="Results folder; each unit writes <results>/<study>/<variant>__<train>__seed<k>.json.", rich_help_panel=_RUN)] = Path("results"),
    runs: Annotated[Path, typer.Option(help="Folder for training runs (checkpoints, logs).", rich_help_panel=_RUN)] = Path("runs"),
    shard: Annotated[str | None, typer.Option(help="I/N: run only the I-th of N interleaved slices of variants x seeds (for N machines).", rich_help_panel=_RUN)] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo units whose result file exists (default: skip them, i.e. resume).", rich_help_panel=_RUN)] = False,
    image_size: Annotated[int | None, typer.Option(help="Input size for every variant (multiple of 32): FLOPs, latency and training. (default: 224; training: the recipe's)", rich_help_panel=_SPEED)] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size for latency and training. (default: latency 2, training the recipe's)", rich_help_panel=_SPEED)] = None,
    backend: Annotated[str | None, typer.Option(help="Attention backend (see `sasa-bench backends`). (default: auto)", rich_help_panel=_SPEED)] = None,
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Time each variant interleaved against the study's baseline.", rich_help_panel=_SPEED)] = True,
    latency_iters: Annotated[int, typer.Option(help="Timed batches per model (after 2 warm-up batches).", rich_help_panel=_SPEED)] = 5,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads for latency and training. (default: latency torch's, training the recipe's)", rich_help_panel=_SPEED)] = None,
    engine: Annotated[str, typer.Option(help="local (this process; N processes on one results folder split the study) | ray (each unit a Ray task: pip install 'sasa-bench[ray]').", rich_help_panel=_ENGINE)] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: a running cluster's address (e.g. HEAD:6379, or 'auto'). (default: start a local Ray instance)", rich_help_panel=_ENGINE, show_default=False)] = None,
    gpus_per_unit: Annotated[float, typer.Option(help="--engine ray: GPUs per unit; above 1, the unit trains with DDP on one node.", rich_help_panel=_ENGINE)] = 0.0,
    cpus_per_unit: Annotated[float, typer.Option(help="--engine ray: CPUs per unit.", rich_help_panel=_ENGINE)] = 1.0,
    lock_timeout: Annotated[float, typer.Option(help="Seconds after which a unit lock of a process on another host, not touched by its heartbeat, is taken over.", rich_help_panel=_ENGINE)] = DEFAULT_TIMEOUT_S,
) -> None:
    """Run a study: params, GFLOPS, latency vs the study's baseline and (with --train) accuracy for
    every variant, one result file per variant and seed. Re-running resumes: a unit whose result
    file is unreadable, or was made with other settings, is redone (saying why)."""
    from sasa_bench.studies import find_studies, load_study
    from sasa_bench.studies.expand import parse_shard
    from sasa_bench.studies.runner import ENGINES, RunOptions, plan, run_study
    from sasa_bench.studies.spec import studies_dir

    if list_:
        if not find_studies():
            raise SasaError(f"no study files (*.toml) in {studies_dir()} (set SASA_BENCH_STUDIES to a folder of them)")
        for study_name, path in find_studies().items():
            try:
                line = load_study(path).summary
            except SasaError as e:
                line = f"(invalid: {e})"
            print(f"{study_name:22s} {line}")
        return
    if name is None:
        known = ", ".join(find_studies()) or "none"
        raise SasaError(f"name a study (known: {known}); `sasa-bench ablate --list` describes them")

    if engine not in ENGINES:
        raise SasaError(f"unknown --engine {engine!r} (choose from {', '.join(ENGINES)})")
    ray_opts = None
    if engine == "ray":
        from sasa_bench.studies.ray_engine import RayOptions, import_ray

        ray_opts = RayOptions(address=address, gpus_per_unit=gpus_per_unit, cpus_per_unit=cpus_per_unit).validate()
        import_ray()  # without Ray: one line, exit 2, before anything else
    else:
        given = [f for f, v, d in (("--address", address, None), ("--gpus-per-unit", gpus_per_unit, 0.0),
                                   ("--cpus-per-unit", cpus_per_unit, 1.0)) if v != d]
        if given:
            raise SasaError(f"{', '.join(given)} only apply to --engine ray")

    study = load_study(name)
    opts = RunOptions(
        train=train,
        seeds=seeds,
        results_dir=results,
        runs_dir=runs,
        device=device,
        image_size=image_size,
        batch_size=batch_size,
        backend=backend,
        data=data,
        data_dir=str(data_dir) if data_dir else None,
        latency=latency,
        latency_iters=latency_iters,
        shard=parse_shard(shard),
        force=force,
        threads=threads,
        lock_timeout=lock_timeout,
        command=_command(
            name, train=train, seeds=seeds, data=data, data_dir=data_dir, device=device, results=results,
            image_size=image_size, batch_size=batch_size, backend=backend, latency_iters=latency_iters,
            threads=threads,
        ) + ("" if latency else " --no-latency"),
    )
    variants, todo = plan(study, opts)  # every option checked here, before any unit (and --dry-run)
    check_folder(results, "--results")
    if train != "none":
        check_folder(runs, "--runs")

    if dry_run:
        _print_plan(study, opts, variants, todo)
        return

    from rich.markup import escape

    from sasa_bench.progress import StudyDisplay

    where = "" if ray_opts is None else f", on Ray {address or '(local instance)'}"
    err_console.print(
        f"[bold]{escape(study.name)}[/]: {escape(study.title)} — {len(todo)} unit(s) "
        f"(train={train}, shard {opts.shard[0]}/{opts.shard[1]}{escape(where)}) -> {results / study.name}"
    )
    with StudyDisplay(study.name, len(todo)) as display:
        if ray_opts is None:
            report = run_study(study, opts, progress=display.progress, log=display.log, step_progress=display.step)
        else:
            from sasa_bench.studies.ray_engine import run_study_ray

            report = run_study_ray(study, opts, ray_opts, progress=display.progress, log=display.log)
    redone = f" ({len(report.redone)} redone: unreadable or stale)" if report.redone else ""
    retried = f", {len(report.retried)} retried after a node or worker died" if report.retried else ""
    err_console.print(
        f"{len(report.written)} written{redone}, {len(report.skipped)} already done (skipped){retried}; "
        f"`sasa-bench report --results {results}` builds the tables"
    )
    if report.failed:
        for key, why in report.failed:
            err_console.print(f"failed: {escape(key)}: {escape(why)}", highlight=False)
        raise typer.Exit(1)


def _print_plan(study: Any, opts: Any, variants: list[Any], todo: list[Any]) -> None:
    """--dry-run: each unit's status and the single commands that do its work (they run as pasted)."""
    from sasa_bench.cli.options import SHARED_FIELDS
    from sasa_bench.spec import make_spec
    from sasa_bench.studies.expand import spec_flags
    from sasa_bench.studies.runner import train_config, train_overrides, unit_status

    q = shlex.quote
    print(f"# {study.name}: {study.title} ({study.paper_ref}); {len(variants)} variants, {len(todo)} units in this shard")
    for u in todo:
        v = u.variant
        status, why = ("todo", "") if opts.force else unit_status(study, u, opts)
        mark = {"todo": "", "done": "  (done)"}.get(status, f"  ({status}: {why}; will redo)")
        paper = ", ".join(f"{k}={x:g}" for k, x in v.paper.items()) or "—"
        print(f"\n## {u.key}  [{v.label}]  {v.spec.name}  paper: {paper}{mark}")
        flags = spec_flags(v.model, v.overrides)
        print(f"sasa-bench flops {flags}")
        if opts.latency and u.seed == 0 and v.vs is not None:
            lat = f"--batch-size {opts.batch_size or opts.latency_batch} --iters {opts.latency_iters} --device {q(opts.device)}"
            lat += f" --threads {opts.threads}" if opts.threads else ""
            shared = {k: x for k, x in v.overrides.items() if k in SHARED_FIELDS}
            if make_spec(v.vs_model, **shared).to_dict() | {"name": ""} == v.vs.to_dict() | {"name": ""}:
                print(f"sasa-bench latency {flags} --vs {q(v.vs_model)} {lat}")
            else:  # --vs gives the baseline only the shared options: time the two apart
                print(f"sasa-bench latency {flags} {lat}")
                print(f"sasa-bench latency {spec_flags(v.vs_model, v.vs_overrides)} {lat}  # the baseline")
        if u.train != "none":
            extra = "".join(
                f" --{k.replace('_', '-')} {q(str(x))}"
                for k, x in (("data", opts.data), ("data_dir", opts.data_dir), ("batch_size", opts.batch_size), ("threads", opts.threads))
                if x
            )
            tflags = spec_flags(v.model, train_overrides(v, train_config(opts, u.seed)))
            print(f"sasa-bench train {tflags} --recipe {u.train} --seed {u.seed}{extra}")


def _command(name: str, **options: object) -> str:
    """The ablate command line that reproduces a unit (the shard is left out: it does not matter)."""
    defaults = {"train": "short", "seeds": 1, "device": "auto", "results": Path("results"), "latency_iters": 5}
    parts = ["sasa-bench", "ablate", shlex.quote(name)]
    for k, v in options.items():
        if v is not None and v != defaults.get(k):
            parts += [f"--{k.replace('_', '-')}", shlex.quote(str(v))]
    return " ".join(parts)
