"""One training under N local processes with DDP: how a study unit given G > 1 GPUs trains.

This is the project's own torchrun path (``train.distributed.setup`` reads RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), started here instead of by torchrun: the engine (Ray)
has already placed the unit on one node with its G GPUs (``CUDA_VISIBLE_DEVICES``), so the
rendezvous is that node's loopback and a free port. Each rank is a fresh interpreter
(``python -m sasa_bench.studies.launch JOB``), not a fork of the engine's worker process. Rank
0's summary comes back; a rank that fails stops the others and raises one line.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_trainer(nprocs: int) -> Callable[..., dict[str, Any]]:
    """A drop-in for ``run_training`` that trains with ``nprocs`` DDP processes on this node."""

    def train(spec: Any, cfg: Any, out_dir: Path, resume: str | None = None, overwrite: bool = False,
              **_: Any) -> dict[str, Any]:
        return run_ddp(nprocs, spec, cfg, out_dir, resume, overwrite)

    return train


def run_ddp(nprocs: int, spec: Any, cfg: Any, out_dir: Path, resume: str | None = None,
            overwrite: bool = False) -> dict[str, Any]:
    """Train ``spec`` with ``cfg`` in ``out_dir`` on ``nprocs`` processes; rank 0's summary."""
    with tempfile.TemporaryDirectory(prefix="sasa-ddp-") as tmp:
        job = Path(tmp) / "job.pkl"
        job.write_bytes(pickle.dumps({"spec": spec, "cfg": cfg, "out_dir": str(out_dir), "resume": resume,
                                      "overwrite": overwrite, "summary": str(Path(tmp) / "summary.pkl")}))
        port = free_port()
        procs, logs = [], []
        for rank in range(nprocs):
            env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                   "LOCAL_WORLD_SIZE": str(nprocs), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            log = open(Path(tmp) / f"rank{rank}.log", "w+b")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, "-m", "sasa_bench.studies.launch", str(job)],
                                          env=env, stdout=log, stderr=subprocess.STDOUT))
        try:
            failed = _wait(procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failed is not None:
            logs[failed].seek(0)
            lines = [x for x in logs[failed].read().decode(errors="replace").splitlines() if x.strip()]
            last = lines[-1] if lines else "no output"
            for log in logs:
                log.close()
            raise SasaError(f"DDP rank {failed} of {nprocs} failed (exit {procs[failed].returncode}): {last}")
        for log in logs:
            log.close()
        return pickle.loads((Path(tmp) / "summary.pkl").read_bytes())


def _wait(procs: list[subprocess.Popen]) -> int | None:
    """Wait for every rank; the first that fails (its index) stops the others."""
    while True:
        codes = [p.poll() for p in procs]
        for i, c in enumerate(codes):
            if c not in (None, 0):
                for p in procs:
                    if p.poll() is None:
                        p.send_signal(signal.SIGTERM)
                return i
        if all(c == 0 for c in codes):
            return None
        time.sleep(0.2)


def main(job_file: str) -> None:
    from sasa_bench.train import run_training

    job = pickle.loads(Path(job_file).read_bytes())
    summary = run_training(job["spec"], job["cfg"], Path(job["out_dir"]), progress=False, resume=job["resume"],
                           overwrite=job["overwrite"])
    if os.environ.get("RANK") == "0":
        Path(job["summary"]).write_bytes(pickle.dumps(summary))


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except SasaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
