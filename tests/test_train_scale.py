"""Training at scale (issue 14): gradient accumulation, `eval --checkpoint`, TensorBoard events,
`bench-data`, and the train flags generated from TrainConfig."""

from __future__ import annotations

import csv
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from sasa_bench.cli.app import main
from sasa_bench.progress import TrainProgress
from sasa_bench.train import distributed as D
from sasa_bench.train import run_training
from sasa_bench.train.engine import Plan, Trainer
from sasa_bench.train.loop import ClassificationTask
from sasa_bench.train.optim import make_optimisation
from sasa_bench.train.recipes import TrainConfig
from sasa_bench.train.state import TrainState
from sasa_bench.train.tensorboard import NoLog

sys.path.insert(0, str(Path(__file__).parent))
from test_train_data import make_image_folder  # noqa: E402
from train_helpers import TINY_FLAGS, tiny_cfg, tiny_spec  # noqa: E402


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    got = capsys.readouterr()
    return e.value.code or 0, got.out, got.err


class BNFree(nn.Module):
    """A small conv net without BatchNorm: per-sample independent, so accumulation is exact."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                                  nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


# --------------------------------------------------------------------------- accumulation


def _grads_after_one_step(n: int, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = BNFree()
    cfg = tiny_cfg(grad_accum_steps=n, label_smoothing=0.1)
    env = D.DistEnv()
    opt, sched, scaler, ema, lam = make_optimisation(model, cfg, env.device, 1, 10)
    st = TrainState(model, opt, sched, scaler, ema, lam, tiny_spec(), cfg)
    task = ClassificationTask(None, None, cfg, env)  # type: ignore[arg-type] - only the loss is used
    tr = Trainer(st, task, Plan(10, 1, 10, 10), env, Path("/nonexistent"), model, TrainProgress(False, 10, 10), NoLog())
    tr.optimizer_step((x, y))
    return {k: p.grad.clone() for k, p in model.named_parameters()}


def test_micro_batches_give_the_batch_gradient():
    """N micro-batches (loss / N each, gradients summed) = one backward over the whole batch."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    one = _grads_after_one_step(1, x, y)
    # the reference: a plain backward of the whole batch's mean loss
    torch.manual_seed(0)
    ref_model = BNFree()
    nn.functional.cross_entropy(ref_model(x), y, label_smoothing=0.1).backward()
    for k, p in ref_model.named_parameters():
        assert torch.equal(one[k], p.grad), k  # N = 1 is the plain step, bit for bit
    for n in (2, 4, 8):
        acc = _grads_after_one_step(n, x, y)
        for k in one:
            assert torch.allclose(acc[k], one[k], rtol=1e-5, atol=1e-7), (n, k)
            assert not torch.equal(acc[k], torch.zeros_like(acc[k]))


def test_accumulated_run_equals_the_plain_run_on_a_bn_free_model(tmp_path, monkeypatch):
    """The whole run (schedule, LR, data order, steps) is the same with --grad-accum-steps: on a
    BN-free model the weights end equal up to float summation order."""
    monkeypatch.setattr("sasa_bench.train.loop.build_model", lambda spec: BNFree(spec.num_classes))
    runs = {}
    for n in (1, 2, 4):
        cfg = tiny_cfg(grad_accum_steps=n, zero_init_residual=False, ema_decay=0.9, tensorboard=False)
        runs[n] = run_training(tiny_spec(), cfg, tmp_path / str(n), progress=False)
    w = {n: torch.load(tmp_path / str(n) / "checkpoint.pt", weights_only=True)["model"] for n in runs}
    for n in (2, 4):
        assert runs[n]["steps"] == runs[1]["steps"] == 16 and runs[n]["grad_accum_steps"] == n
        assert runs[n]["micro_batch_size"] == 16 // n and runs[n]["batch_size"] == 16
        for k in w[1]:
            assert torch.allclose(w[n][k], w[1][k], rtol=1e-4, atol=1e-6), (n, k)
        lrs = [[r["lr"] for r in csv.DictReader(open(tmp_path / str(m) / "metrics.csv"))] for m in (1, n)]
        assert lrs[0] == lrs[1]  # the LR follows the global batch, not the micro-batch
        assert runs[n]["final_loss"] == pytest.approx(runs[1]["final_loss"], rel=1e-4)
    assert yaml.safe_load((tmp_path / "2" / "config.yaml").read_text())["grad_accum_steps"] == 2
    assert yaml.safe_load((tmp_path / "1" / "config.yaml").read_text())["grad_accum_steps"] is None  # 1 = unset


def test_grad_accum_cli_and_errors(tmp_path, capsys):
    base = ["train", *TINY_FLAGS, "--data", "synthetic", "--recipe", "short", "--precision", "fp32", "--synthetic-train",
            "64", "--synthetic-eval", "32", "--batch-size", "16", "-q", "--no-tensorboard"]
    code, _, err = _cli([*base, "--grad-accum-steps", "3", "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "divisible" in err
    code, _, err = _cli([*base, "--grad-accum-steps", "16", "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "BatchNorm" in err  # micro-batch of 1
    code, out, err = _cli([*base, "--grad-accum-steps", "2", "--max-steps", "2", "--out", str(tmp_path / "c")], capsys)
    assert code == 0, err
    s = json.loads(out)
    assert (s["grad_accum_steps"], s["micro_batch_size"], s["steps"]) == (2, 8, 2)
    cfg = TrainConfig(batch_size=4096, grad_accum_steps=8).validate()
    assert cfg.peak_lr() == TrainConfig(batch_size=4096).peak_lr() == pytest.approx(1.6)


# --------------------------------------------------------------------------- eval


def test_eval_reproduces_the_runs_top1(tmp_path, capsys):
    out = tmp_path / "run"
    s = run_training(tiny_spec(), tiny_cfg(ema_decay=0.9, tensorboard=False), out, progress=False)
    code, text, err = _cli(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--threads", "1", "--format", "json"], capsys)
    assert code == 0, err
    row = json.loads(text)[0]
    assert row["top1"] == s["top1"] and row["top5"] == s["top5"] and row["loss"] == s["eval_loss"]
    assert (row["weights"], row["images"], row["params"], row["image_size"]) == ("ema", s["eval_images"], s["params"], 32)
    code, text, _ = _cli(["eval", "--checkpoint", str(out), "--no-ema", "--format", "csv", "--threads", "1"], capsys)
    rows = list(csv.DictReader(text.splitlines()))
    assert code == 0 and rows[0]["weights"] == "model" and rows[0]["split"] == "eval"
    code, text, _ = _cli(["eval", "--checkpoint", str(out), "--eval-images", "10", "--format", "json", "--threads", "1"], capsys)
    assert code == 0 and json.loads(text)[0]["images"] == 10
    code, _, err = _cli(["eval", "--checkpoint", str(tmp_path / "none.pt")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "no checkpoint" in err


def test_eval_on_an_image_folder_and_its_holdout(tmp_path, capsys):
    root = make_image_folder(tmp_path / "inet", n_train=13)
    argv = ["train", "--threads", "1", "--model", "resnet26", "--width", "0.125", "--image-size", "32",
            "--num-classes", "2", "--recipe", "paper", "--data", "imagenet", "--data-dir", str(root), "--holdout",
            "--batch-size", "4", "--max-steps", "2", "--workers", "0", "--out", str(tmp_path / "run"), "-q"]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    s = json.loads(out)
    code, text, err = _cli(["eval", "--checkpoint", str(tmp_path / "run"), "--format", "json", "--threads", "1"], capsys)
    assert code == 0, err
    row = json.loads(text)[0]
    assert row["split"] == "holdout" and row["top1"] == s["top1"] and row["images"] == s["eval_images"] == 1
    code, text, err = _cli(["eval", "--checkpoint", str(tmp_path / "run"), "--no-holdout", "--format", "json"], capsys)
    assert code == 0, err
    assert json.loads(text)[0]["split"] == "val" and json.loads(text)[0]["images"] == 6


# --------------------------------------------------------------------------- TensorBoard


def test_tensorboard_holds_the_metrics_csv_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    s = run_training(tiny_spec(), tiny_cfg(epochs=2), tmp_path, progress=False)
    assert s["tensorboard"] == str(tmp_path / "tensorboard")  # on by default when installed
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    for col in ("train_loss", "lr", "eval_top1", "eval_top5", "images_per_s"):
        events = acc.Scalars(f"epoch/{col}")
        assert [e.step for e in events] == [int(r["step"]) for r in rows], col
        for e, r in zip(events, rows, strict=True):
            assert e.value == pytest.approx(float(r[col]), rel=1e-5, abs=1e-6), col
    losses = acc.Scalars("step/loss")
    assert [e.step for e in losses] == list(range(1, s["steps"] + 1))
    assert {"step/lr", "step/images_per_s"} <= set(acc.Tags()["scalars"])


def test_resumed_run_has_no_doubled_tensorboard_steps(tmp_path):
    """A run resumed from an older checkpoint re-trains steps it had logged: those events go."""
    pytest.importorskip("tensorboard")
    import shutil
    import time

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # TensorBoard orders event files by name (their creation second, then a per-process counter
    # that sorts as text): real resumes are separate processes, seconds apart; so are these.
    run_training(tiny_spec(), tiny_cfg(max_steps=3), tmp_path, progress=False)
    shutil.copy(tmp_path / "checkpoint.pt", tmp_path / "at3.pt")
    time.sleep(1.1)
    run_training(tiny_spec(), tiny_cfg(max_steps=6), tmp_path, progress=False, resume="auto")
    shutil.copy(tmp_path / "at3.pt", tmp_path / "checkpoint.pt")  # as if steps 4-6 were lost
    time.sleep(1.1)
    s = run_training(tiny_spec(), tiny_cfg(), tmp_path, progress=False, resume="auto")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("step/loss")] == list(range(1, s["steps"] + 1))
    assert [e.step for e in acc.Scalars("epoch/train_loss")] == [8, 16]


def test_no_tensorboard_writes_none(tmp_path):
    s = run_training(tiny_spec(), tiny_cfg(max_steps=1, tensorboard=False), tmp_path, progress=False)
    assert s["tensorboard"] is None and not (tmp_path / "tensorboard").exists()


# --------------------------------------------------------------------------- bench-data


def _jpeg_folder(root: Path, n: int = 12) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        d = root / "train" / c
        d.mkdir(parents=True)
        for i in range(n):
            arr = torch.randint(0, 256, (48 + i, 40, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.jpg", quality=90)
    return root


def test_bench_data_reports_both_rates(tmp_path, capsys):
    root = _jpeg_folder(tmp_path / "jpeg")
    argv = ["bench-data", "--data", "imagenet", "--data-dir", str(root), "--workers", "0", "--batch-size", "4",
            "--batches", "3", "--warmup", "1", "--model", "resnet26", "--width", "0.125", "--image-size", "32",
            "--model-iters", "1", "--threads", "1", "--device", "cpu", "--format", "json"]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    row = json.loads(out)[0]
    assert row["data_images_per_s"] > 0 and row["model_images_per_s"] > 0 and row["images"] == 24
    assert row["ratio"] == pytest.approx(row["data_images_per_s"] / row["model_images_per_s"])
    assert row["keeps_up"] == (row["ratio"] >= 1)
    if not torch.cuda.is_available():
        code, _, err = _cli([*argv, "--decode", "gpu"], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "CUDA" in err


# --------------------------------------------------------------------------- generated flags


def test_every_train_setting_has_a_flag(capsys, monkeypatch):
    from sasa_bench.cli.options import train_params

    params = train_params()
    want = {f.name for f in dataclasses.fields(TrainConfig) if f.name not in ("recipe", "model")}
    assert set(params) == want
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = _cli(["train", "--help"], capsys)
    text = " ".join(out.split())
    for flag in ("--grad-accum-steps", "--tensorboard", "--no-tensorboard", "--synthetic-train", "--lr-base"):
        assert flag in text, flag
