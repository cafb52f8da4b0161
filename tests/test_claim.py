"""Unit claims (studies/claim.py): N processes on one results folder split a study by themselves."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sasa_bench.store import write_result
from sasa_bench.studies import claim as claim_mod
from sasa_bench.studies import runner as runner_mod
from sasa_bench.studies.claim import Busy, Claims, lock_path, read_lock
from sasa_bench.studies.runner import RunOptions, result_path, run_study
from sasa_bench.studies.spec import load_study

ROOT = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(result: Path, age_s: float = 0.0, **fields) -> Path:
    path = lock_path(result)
    path.parent.mkdir(parents=True, exist_ok=True)
    rec = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": claim_mod._boot_id(),
           "start_ticks": claim_mod._start_ticks(os.getpid()), "token": "someone-else", "time": time.time(), **fields}
    path.write_text(json.dumps(rec))
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_one_claim_wins_and_the_lock_says_who(tmp_path: Path) -> None:
    result = tmp_path / "study" / "k3__none__seed0.json"
    with Claims() as a, Claims() as b:
        assert a.claim(result) is True
        rec = read_lock(lock_path(result))
        assert rec["pid"] == os.getpid() and rec["host"] == socket.gethostname() and rec["token"] == a.token
        got = b.claim(result)  # a live holder (this very process, another Claims): busy
        assert isinstance(got, Busy) and got.holder["token"] == a.token
        assert a.claim(result) is True  # claiming twice is harmless
        b.release(result)  # not b's: stays
        assert lock_path(result).exists() and a.owns(result) and not b.owns(result)
        a.release(result)
        assert not lock_path(result).exists()
        assert b.claim(result) is True
    assert not lock_path(result).exists()  # leaving the block releases what is still held


@pytest.mark.parametrize(
    ("fields", "age", "stale"),
    [
        ({}, 0, False),  # a live process on this host
        ({"pid": "DEAD"}, 0, True),  # its process is gone
        ({"start_ticks": -1}, 0, True),  # the pid now names another process (reused)
        ({"boot_id": "another-boot"}, 0, True),  # the host rebooted since
        ({"host": "elsewhere", "pid": "DEAD"}, 0, False),  # another host: only the heartbeat's age counts
        ({"host": "elsewhere", "pid": "DEAD"}, 50, False),  # ... within --lock-timeout
        ({"host": "elsewhere"}, 200, True),  # ... past it
        ({}, 200, True),  # even on this host, a lock nobody touched for that long
    ],
)
def test_stale_locks_are_taken_over(tmp_path: Path, fields: dict, age: float, stale: bool) -> None:
    result = tmp_path / "study" / "u.json"
    if fields.get("pid") == "DEAD":
        fields = {**fields, "pid": _dead_pid()}
    _write_lock(result, age, **fields)
    logs: list[str] = []
    with Claims(timeout_s=100, log=logs.append) as c:
        got = c.claim(result)
        if stale:
            assert got is True and c.owns(result)
            assert len(logs) == 1 and "taking over the lock of" in logs[0]
        else:
            assert isinstance(got, Busy) and read_lock(lock_path(result))["token"] == "someone-else"
            assert not logs


def test_unreadable_lock_counts_as_held_until_the_timeout(tmp_path: Path) -> None:
    """A lock being written right now (empty) is not broken; an old damaged one is."""
    result = tmp_path / "u.json"
    lock_path(result).write_text("")
    with Claims(timeout_s=100) as c:
        assert isinstance(c.claim(result), Busy)
        t = time.time() - 500
        os.utime(lock_path(result), (t, t))
        assert c.claim(result) is True


def test_a_takeover_in_progress_is_not_doubled(tmp_path: Path) -> None:
    """Two takers of one stale lock: the one that holds the .break guard removes it; the other,
    finding the guard fresh and alive, leaves it alone (and then loses the O_EXCL race)."""
    result = tmp_path / "u.json"
    path = _write_lock(result, pid=_dead_pid())
    seen = read_lock(path)
    guard = path.with_name(path.name + ".break")
    guard.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": "t"}))
    assert claim_mod._break(path, seen, "me") is False and path.exists()
    guard.unlink()
    # the lock changed hands meanwhile (someone took it over): not ours to remove
    path.write_text(json.dumps({**seen, "token": "new-holder", "pid": os.getpid()}))
    assert claim_mod._break(path, seen, "me") is False and path.exists() and not guard.exists()
    # a guard left by a taker that died is cleared, so the next attempt succeeds
    path.write_text(json.dumps(seen))
    guard.write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))
    assert claim_mod._break(path, seen, "me") is False and not guard.exists()
    assert claim_mod._break(path, seen, "me") is True and not path.exists()


def test_heartbeat_keeps_a_held_lock_fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(claim_mod, "HEARTBEAT_S", 0.05)
    result = tmp_path / "u.json"
    with Claims() as c:
        assert c.claim(result) is True
        t = time.time() - 1000
        os.utime(lock_path(result), (t, t))
        deadline = time.time() + 5
        while time.time() - lock_path(result).stat().st_mtime > 100 and time.time() < deadline:
            time.sleep(0.02)
        assert time.time() - lock_path(result).stat().st_mtime < 100


TINY = """
title = "tiny"
paper_ref = "none"
metric = "m"
[base]
model = "sasa_resnet26"
width = 0.25
""" + "".join(f'[[variant]]\nname = "k{k}"\nset = {{ k = {k} }}\n' for k in (3, 5, 7, 9, 11, 13))


def _fake_count(spec):
    return {"params": 1, "params_m": 1e-6, "gmacs": 0.5, "gflops": 1.0, "image_size": spec.image_size}


def test_a_unit_held_elsewhere_is_waited_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing left to claim: the process waits for the units others hold and counts them done."""
    monkeypatch.setattr(runner_mod, "count", _fake_count)
    monkeypatch.setattr(runner_mod, "WAIT_S", 0.05)
    (tmp_path / "tiny.toml").write_text(TINY)
    study = load_study(str(tmp_path / "tiny.toml"))
    opts = RunOptions(train="none", latency=False, results_dir=tmp_path / "r", image_size=32)
    k7 = runner_mod.plan(study, opts)[1][2]
    held = result_path(opts.results_dir, study, k7)
    _write_lock(held)  # a live holder (this process, another token)
    logs: list[str] = []
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(r=run_study(study, opts, log=logs.append)))
    t.start()
    deadline = time.time() + 30
    while len(list(held.parent.glob("*.json"))) < 5 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert t.is_alive() and not held.exists()  # everything else done; still waiting for k7
    write_result(opts.results_dir, study.name, k7.key, runner_mod.run_unit(study, k7, opts))  # "the other process"
    lock_path(held).unlink()
    t.join(timeout=30)
    assert not t.is_alive()
    assert len(out["r"].written) == 5 and out["r"].skipped == [held]
    assert any("waiting for 1 unit(s)" in line and "k7__none__seed0" in line for line in logs)


_WORKER = r"""
import json, sys, time
from pathlib import Path
from sasa_bench.studies import runner
from sasa_bench.studies.runner import RunOptions, run_study
from sasa_bench.studies.spec import load_study

def count(spec):
    time.sleep(0.3)  # a unit that takes a while, so the two processes overlap
    return {"params": 1, "params_m": 1e-6, "gmacs": 0.5, "gflops": 1.0, "image_size": spec.image_size}

runner.count = count
study_file, results, go = sys.argv[1:4]
while not Path(go).exists():
    time.sleep(0.01)
force = len(sys.argv) > 4
report = run_study(load_study(study_file), RunOptions(train="none", latency=False, results_dir=Path(results), force=force))
print(json.dumps([Path(p).name for p in report.written]))
"""


@pytest.mark.parametrize("force", [False, True])
def test_two_processes_split_a_study(tmp_path: Path, force: bool) -> None:
    """Two real processes on one results folder, no --shard: every unit is written exactly once,
    and both did part of the work (with --force too: a result the other process wrote in this
    round is not redone)."""
    (tmp_path / "tiny.toml").write_text(TINY)
    results, go = tmp_path / "r", tmp_path / "go"
    if force:  # an earlier round's results, all to be redone
        for k in (3, 5, 7, 9, 11, 13):
            path = results / "tiny" / f"k{k}__none__seed0.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("{}")
            os.utime(path, (time.time() - 100, time.time() - 100))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-c", _WORKER, str(tmp_path / "tiny.toml"), str(results), str(go)] + (["--force"] if force else [])
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    written = [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]
    assert sorted(written[0] + written[1]) == sorted(f"k{k}__none__seed0.json" for k in (3, 5, 7, 9, 11, 13))
    assert written[0] and written[1]
    assert not list((results / "tiny").glob(".*"))  # no lock left behind
    for f in (results / "tiny").glob("*.json"):
        assert json.loads(f.read_text())["flops"]["gflops"] == 1.0
