"""`ablate --engine ray`: the same result files as the local engine, on a local two-node Ray cluster,
also when a worker node dies mid-study; the DDP launcher a unit with G > 1 GPUs trains through."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sasa_bench.cli.app import main
from sasa_bench.studies.runner import RunOptions, run_study
from sasa_bench.studies.spec import load_study

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import tiny_cfg, tiny_spec  # noqa: E402

TINY = """
title = "tiny"
paper_ref = "none"
metric = "m"
[base]
model = "resnet26"
width = 0.125
[[variant]]
name = "r26"
[[variant]]
name = "r38"
model = "resnet38"
"""
# Enough steps (100 epochs of 16; max_steps only stops early) that a checkpoint exists well before
# the end (every 50 steps), small enough for 1 core.
TRAIN = {"epochs": 100, "max_steps": 1500, "batch_size": 8, "eval_batch_size": 64, "synthetic_train": 128, "synthetic_eval": 64,
         "checkpoint_every": 50, "precision": "fp32", "deterministic": True}
SAME = ("top1", "top5", "final_loss", "eval_loss", "weights_sha256", "steps", "params")


def _run_cli(args: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as e:
        main(args)
    return e.value.code or 0, capsys.readouterr().err


def test_engine_ray_without_ray_is_one_line_exit_2(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    code, err = _run_cli(["ablate", "logits", "--train", "none", "--engine", "ray"], capsys)
    assert code == 2 and err.strip() == "sasa-bench: error: --engine ray needs Ray: pip install 'sasa-bench[ray]'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--engine", "spark"], "unknown --engine 'spark' (choose from local, ray)"),
        (["--address", "head:6379"], "--address only apply to --engine ray"),
        (["--gpus-per-unit", "2", "--cpus-per-unit", "4"], "--gpus-per-unit, --cpus-per-unit only apply to --engine ray"),
        (["--engine", "ray", "--gpus-per-unit", "1.5"], "--gpus-per-unit above 1 must be whole GPUs"),
        (["--engine", "ray", "--cpus-per-unit", "0"], "--cpus-per-unit must be > 0"),
        (["--lock-timeout", "0"], "--lock-timeout must be > 0 seconds"),
    ],
)
def test_engine_options_bad_input(capsys, args: list[str], message: str) -> None:
    code, err = _run_cli(["ablate", "logits", "--train", "none", *args], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err


def _opts(root: Path, name: str) -> RunOptions:
    return RunOptions(train="short", data="synthetic", image_size=32, latency=False, threads=1,
                      results_dir=root / name / "results", runs_dir=root / name / "runs", train_overrides=dict(TRAIN))


def _records(results: Path) -> dict[str, dict]:
    return {p.name: json.loads(p.read_text()) for p in sorted((results / "tiny").glob("*.json"))}


@pytest.mark.slow
def test_ray_engine_matches_local_and_survives_a_lost_node(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from sasa_bench.studies.ray_engine import RayOptions, run_study_ray

    (tmp_path / "tiny.toml").write_text(TINY)
    study = load_study(str(tmp_path / "tiny.toml"))
    local = run_study(study, _opts(tmp_path, "local"))
    assert len(local.written) == 2

    # The head takes no units; two workers with 1 CPU each run one unit each. Once a unit has a
    # checkpoint, its worker is removed (its processes killed): Ray must retry the unit on the
    # other worker, which resumes it from the checkpoint.
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        cluster.wait_for_nodes()
        opts = _opts(tmp_path, "ray")
        logs: list[str] = []
        removed: dict[str, str] = {}

        def kill_worker_mid_unit() -> None:
            deadline = time.time() + 1200
            while time.time() < deadline:
                for line in list(logs):
                    m = re.match(r"(\S+): started on \S+ \(node ([0-9a-f]+)\)", line)
                    node = next((w for w in workers if m and w.node_id.startswith(m[2])), None)
                    if node is not None and (opts.runs_dir / "tiny" / m[1] / "checkpoint.pt").exists():
                        removed["unit"] = m[1]
                        cluster.remove_node(node, allow_graceful=False)  # a crash: no draining
                        return
                time.sleep(0.05)

        killer = threading.Thread(target=kill_worker_mid_unit, daemon=True)
        killer.start()
        report = run_study_ray(study, opts, RayOptions(), log=logs.append)
        killer.join(timeout=5)
    finally:
        ray.shutdown()
        cluster.shutdown()

    assert not report.failed, report.failed
    assert removed, f"no unit reached a checkpoint on the first worker: {logs}"
    assert report.retried == [removed["unit"]], logs
    want, got = _records(tmp_path / "local" / "results"), _records(opts.results_dir)
    assert sorted(got) == sorted(want) == ["r26__short__seed0.json", "r38__short__seed0.json"]
    for name, rec in got.items():
        ref = want[name]
        for part in ("spec", "flops", "key", "command", "variant", "seed"):
            assert rec[part] == ref[part], (name, part)
        for k in SAME:  # the same training, bit for bit, also where it resumed on another node
            assert rec["training"][k] == ref["training"][k], (name, k)
    # the retried unit continued from the checkpoint the dead node left
    assert got[f"{removed['unit']}.json"]["training"]["resumed"] is True
    assert not list((opts.results_dir / "tiny").glob(".*"))  # no lock left behind


@pytest.mark.slow
def test_ddp_launcher_equals_torchrun(tmp_path: Path) -> None:
    """A unit with G > 1 GPUs trains through studies/launch.py: the same weights as torchrun."""
    from sasa_bench.studies.launch import free_port, run_ddp

    cfg = tiny_cfg(max_steps=2, batch_size=32)
    ours = run_ddp(2, tiny_spec(), cfg, tmp_path / "ours")
    assert ours["world_size"] == 2 and ours["ranks_in_sync"] and ours["steps"] == 2
    cfg_file = tmp_path / "cfg.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump({k: v for k, v in cfg.to_dict().items() if k not in ("model", "recipe")}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
           "-m", "sasa_bench", "train", "--model", "resnet26", "--width", "0.125", "--image-size", "32",
           "--num-classes", "10", "--recipe", "short", "--config", str(cfg_file), "--out", str(tmp_path / "torchrun"), "-q"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = json.loads(p.stdout[p.stdout.index("{"):])
    assert theirs["world_size"] == 2 and ours["weights_sha256"] == theirs["weights_sha256"]
    # a failing rank is one line, not a hang
    with pytest.raises(Exception, match=r"DDP rank \d of 2 failed"):
        run_ddp(2, tiny_spec(), tiny_cfg(max_steps=2, batch_size=31), tmp_path / "bad")
