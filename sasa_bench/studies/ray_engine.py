"""``ablate --engine ray``: every (variant, seed) unit as a Ray task.

The driver (the ``ablate`` process) plans the study exactly as the local engine does, claims each
unit it submits (the same lock files, so a Ray driver and local processes can share a results
folder), and submits one task per unit with ``num_cpus=C, num_gpus=G`` on a local Ray instance or
on a running cluster (``address``). A task runs :func:`runner.run_unit` on its node and returns the
payload; the driver writes the result file, so the results folder need not be shared. Training
runs write their checkpoints to ``<runs>/<study>/<unit>/``: put ``--runs`` on storage every node
sees, so a task whose node died and that Ray retries (``max_retries``) resumes there; on a
node-local folder a retry trains again from the start (the result is the same, the time is not).

G > 1: the unit trains with DDP inside its task, through the project's own torchrun path
(:mod:`launch`): Ray places the task on one node with its G GPUs, the task starts G processes
with a rendezvous on that node. So a unit spans one node; units, not ranks, spread over the
cluster. (Ray Train's ``TorchTrainer`` would start its own worker group from inside the task,
needing G more GPUs than the task holds, with its own failure handling competing with the
task's retries; see the README.)

Progress: units done / running / failed with an ETA through the caller's ``progress`` callback;
a small actor on the driver's node hears when each task starts (and so sees retries).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError
from sasa_bench.store import clean_stale_temps, safe_name, write_result
from sasa_bench.studies.claim import Claims
from sasa_bench.studies.expand import Unit
from sasa_bench.studies.runner import (
    RunOptions,
    RunReport,
    claim_units,
    plan,
    result_path,
    run_unit,
    say_waiting,
)
from sasa_bench.studies.spec import Study

MAX_RETRIES = 3  # a unit whose node or worker dies is run again this many times
POLL_S = 1.0
NO_RAY = "--engine ray needs Ray: pip install 'sasa-bench[ray]'"


@dataclass(frozen=True)
class RayOptions:
    address: str | None = None  # None: start a local Ray instance; else ray.init(address=...)
    gpus_per_unit: float = 0.0
    cpus_per_unit: float = 1.0
    max_retries: int = MAX_RETRIES

    def validate(self) -> RayOptions:
        if self.gpus_per_unit < 0:
            raise SasaError(f"--gpus-per-unit must be >= 0, got {self.gpus_per_unit:g}")
        if self.gpus_per_unit > 1 and self.gpus_per_unit != int(self.gpus_per_unit):
            raise SasaError(f"--gpus-per-unit above 1 must be whole GPUs (one DDP process each), got {self.gpus_per_unit:g}")
        if self.cpus_per_unit <= 0:
            raise SasaError(f"--cpus-per-unit must be > 0, got {self.cpus_per_unit:g}")
        return self


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise SasaError(NO_RAY) from None
    return ray


def _unit_task(study: Study, unit: Unit, opts: RunOptions, gpus: float, tracker: Any, attempt: str) -> dict[str, Any]:
    """The body of one unit's Ray task (runs on a worker node)."""
    import ray

    from sasa_bench.studies.launch import ddp_trainer

    try:
        tracker.started.remote(unit.key, socket.gethostname(), ray.get_runtime_context().get_node_id())
    except Exception:  # noqa: BLE001 - progress only: never fail a unit for it
        pass
    trainer = ddp_trainer(int(gpus)) if gpus > 1 else None
    return run_unit(study, unit, opts, trainer=trainer, attempt=attempt)


class _Tracker:
    """Collects "unit started on host" events from tasks (a Ray actor on the driver's node)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str]] = []

    def started(self, key: str, host: str, node: str) -> None:
        self.events.append((key, host, node))

    def since(self, i: int) -> list[tuple[str, str, str]]:
        return self.events[i:]


def connect(ray: Any, ray_opts: RayOptions) -> None:
    """ray.init: the cluster at ``address``, or a local instance (this machine's CPUs/GPUs)."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": False, "configure_logging": True}
    try:
        if ray_opts.address:
            ray.init(address=ray_opts.address, **kwargs)
        else:
            ray.init(include_dashboard=False, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = ray_opts.address or "a local Ray instance"
        raise SasaError(f"cannot connect to {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_fits(ray: Any, ray_opts: RayOptions) -> None:
    """Refuse units no node can ever hold (Ray would leave them pending forever)."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    best_cpu = max((n["Resources"].get("CPU", 0) for n in nodes), default=0)
    best_gpu = max((n["Resources"].get("GPU", 0) for n in nodes), default=0)
    if ray_opts.cpus_per_unit > best_cpu:
        raise SasaError(f"--cpus-per-unit {ray_opts.cpus_per_unit:g}: no Ray node has that many CPUs (largest: {best_cpu:g})")
    if ray_opts.gpus_per_unit > best_gpu:
        raise SasaError(f"--gpus-per-unit {ray_opts.gpus_per_unit:g}: no Ray node has that many GPUs (largest: {best_gpu:g}); "
                        "a unit's DDP processes share one node")


def run_study_ray(
    study: Study,
    opts: RunOptions,
    ray_opts: RayOptions,
    progress: Callable[[str, int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> RunReport:
    """Run the study's units as Ray tasks; the same result files as :func:`runner.run_study`.
    A unit that fails (its error, or its node dying more than ``max_retries`` times) is listed in
    ``RunReport.failed``; the others go on."""
    ray = import_ray()
    ray_opts.validate()
    _, todo = plan(study, opts)
    connect(ray, ray_opts)
    check_fits(ray, ray_opts)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    tracker = ray.remote(num_cpus=0)(_Tracker).options(scheduling_strategy=here).remote()
    task = ray.remote(_unit_task).options(
        num_cpus=ray_opts.cpus_per_unit, num_gpus=ray_opts.gpus_per_unit, max_retries=ray_opts.max_retries,
        retry_exceptions=False,
    )

    report = RunReport()
    total, started = len(todo), time.time()
    clean_stale_temps(Path(opts.results_dir) / safe_name(study.name))
    running: dict[Any, Unit] = {}  # task ref -> unit
    where: dict[str, str] = {}  # unit key -> host it runs on now
    attempts: dict[str, int] = {}
    pending, n_events, waiting_on, last = list(todo), 0, "", ""
    done_n = failed_n = 0

    def show(message: str = "") -> None:
        nonlocal last
        line = f"{done_n} done, {len(where)} running, {failed_n} failed" + (f"; {message}" if message else "")
        if progress and (line != last or message):
            progress(line, done_n + failed_n, total)
        last = line

    with Claims(opts.lock_timeout, log, opts.command) as claims:
        while pending or running:
            busy: list[tuple[Unit, str]] = []
            for unit, _path, mine in claim_units(study, opts, pending, claims, started, report, busy, log):
                if not mine:
                    done_n += 1
                    continue
                running[task.remote(study, unit, opts, ray_opts.gpus_per_unit, tracker, claims.token)] = unit
            pending = [u for u, _ in busy]
            waiting_on = say_waiting(busy, waiting_on, log)
            show()

            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_S) if running else ([], [])
            if not running:
                time.sleep(POLL_S)
            try:
                events = ray.get(tracker.since.remote(n_events), timeout=30)
            except Exception:  # noqa: BLE001 - progress only
                events = []
            n_events += len(events)
            for key, host, node in events:
                attempts[key] = attempts.get(key, 0) + 1
                where[key] = host
                if log:
                    again = f" (attempt {attempts[key]}: its previous node or worker died)" if attempts[key] > 1 else ""
                    log(f"{key}: started on {host} (node {node[:12]}){again}")
                if attempts[key] == 2:
                    report.retried.append(key)
            for ref in ready:
                unit = running.pop(ref)
                path = result_path(opts.results_dir, study, unit)
                where.pop(unit.key, None)
                try:
                    payload = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a unit's failure is reported, the others go on
                    failed_n += 1
                    reason = _reason(e)
                    report.failed.append((unit.key, reason))
                    if log:
                        log(f"{unit.key}: failed: {reason}")
                else:
                    report.written.append(write_result(opts.results_dir, study.name, unit.key, payload))
                    done_n += 1
                    if log:
                        log(f"{unit.key}: done in {payload.get('elapsed_s', 0):.0f} s")
                finally:
                    claims.release(path)
                show()
    show()
    return report


def _reason(e: BaseException) -> str:
    """One line for a unit's failure: the task's own error (a SasaError's message) or Ray's."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, SasaError):
        return str(cause)
    if cause is not None:
        return f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
