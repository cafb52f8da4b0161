"""Multi-process runs: 2-process gloo DDP through torchrun, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import TINY_FLAGS, tiny_spec  # noqa: E402

RUN = [*TINY_FLAGS, "--data", "synthetic", "--recipe", "short", "--precision", "fp32", "--batch-size", "16",
       "--lr", "0.05", "--deterministic", "-q"]


@pytest.fixture(autouse=True)
def small_synthetic(tmp_path, monkeypatch):
    """128 training images (8 steps of 16) through --config, which the flags then extend."""
    (tmp_path / "small.yaml").write_text("synthetic_train: 128\nsynthetic_eval: 64\n")
    RUN_EXTRA[:] = ["--config", str(tmp_path / "small.yaml")]


RUN_EXTRA: list[str] = []


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], nproc: int = 1) -> dict:
    args = [*args, *RUN_EXTRA]
    if nproc == 1:
        cmd = [sys.executable, "-m", "sasa_bench", "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(_free_port()), "-m", "sasa_bench", "train", *args]
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout[p.stdout.index("{"):])


def _model(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def _emulate_two_ranks(cfg_file: Path, steps: int) -> dict[str, torch.Tensor]:
    """What 2-process DDP must compute, in one process: each step, the mean of the gradients of
    the two half-batches (BatchNorm statistics per half, as per process), then the same SGD."""
    import torch.nn.functional as F

    from sasa_bench.models import build_model
    from sasa_bench.models.resnet import zero_init_residual
    from sasa_bench.train import resolve_config
    from sasa_bench.train.data import DataConfig, load_data, train_steps
    from sasa_bench.train.optim import WarmupCosine, param_groups, schedule_steps

    torch.set_num_threads(1)
    cfg = resolve_config("short", cfg_file, {"data": "synthetic", "precision": "fp32", "batch_size": 64,
                                             "lr": 0.05, "epochs": 2, "deterministic": True})
    spec = tiny_spec()
    torch.manual_seed(cfg.seed)
    model = build_model(spec)
    if cfg.zero_init_residual:
        zero_init_residual(model)
    train, _ = load_data(DataConfig("synthetic", None, 32, 10, synthetic_train=cfg.synthetic_train,
                                    synthetic_eval=cfg.synthetic_eval, augment=cfg.augment))
    opt = torch.optim.SGD(param_groups(model, cfg.weight_decay, False), lr=cfg.peak_lr(),
                          momentum=cfg.momentum, nesterov=cfg.nesterov)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(*schedule_steps(cfg, len(train) // 64)))
    for _, (x, y) in train.batches(train_steps(len(train), cfg.seed, 0, 64), False, cfg.seed, 0, 0):
        if sched.last_epoch == steps:
            break
        opt.zero_grad()
        for h in (slice(0, 32), slice(32, 64)):
            (F.cross_entropy(model(x[h]), y[h]) / 2).backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
    return model.state_dict()


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path):
    args = [*RUN, "--batch-size", "64", "--epochs", "2", "--max-steps", "2"]
    ddp = _train([*args, "--out", str(tmp_path / "ddp")], nproc=2)
    single = _train([*args, "--out", str(tmp_path / "one")])
    assert ddp["world_size"] == 2 and ddp["ranks_in_sync"]  # bit-identical weights on both ranks
    assert ddp["eval_images"] == single["eval_images"] == 64  # exact sharded eval, no padding
    assert ddp["steps"] == single["steps"] == 2
    # Same samples and global batch as one process; BatchNorm statistics are per process (our
    # choice, as on the paper's TPUs), so DDP equals one process that averages the gradients of
    # the two half-batches -- up to float summation order.
    want = _emulate_two_ranks(Path(RUN_EXTRA[1]), 2)
    got = _model(tmp_path / "ddp")
    for k, v in want.items():
        if v.is_floating_point() and "running" not in k:
            assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-5), k
    # and against the plain single-process run (BN over all 64 images): close, not equal
    assert abs(ddp["final_loss"] - single["final_loss"]) < 0.1 * single["final_loss"]


@pytest.mark.slow
def test_resume_after_kill_is_bit_exact(tmp_path):
    args = [*RUN, "--epochs", "2", "--checkpoint-every", "3"]
    _train([*args, "--out", str(tmp_path / "full")])
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "sasa_bench", "train", *args, *RUN_EXTRA, "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    ck = out / "checkpoint.pt"
    deadline = time.time() + 120
    while not ck.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    step = torch.load(ck, weights_only=True)["position"]["global_step"]
    assert 0 < step < 16
    resumed = _train([*args, "--out", str(out), "--resume", "auto"])
    assert resumed["resumed"] and resumed["steps"] == 16
    a, b = _model(tmp_path / "full"), _model(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 epochs, none duplicated
