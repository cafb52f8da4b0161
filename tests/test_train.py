"""The training loop: learning, exact resume, schedule, outputs, failures."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sasa_bench.cli.app import main
from sasa_bench.errors import SasaError
from sasa_bench.train import NonFiniteLoss, resolve_config, run_training, spec_for
from sasa_bench.train.data import InMemoryData
from sasa_bench.train.optim import WarmupCosine, lr_at

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import TINY_FLAGS, tiny_cfg, tiny_spec  # noqa: E402


def _weights(path: Path, key: str = "model") -> dict[str, torch.Tensor]:
    state = torch.load(path / "checkpoint.pt", weights_only=True)
    return state[key] if key == "model" else state[key]["module"]


def test_loss_decreases_and_outputs(tmp_path):
    cfg = tiny_cfg(epochs=3)
    s = run_training(tiny_spec(), cfg, tmp_path, progress=False)
    for key in ("model", "top1", "top5", "best_top1", "epochs", "steps", "wall_s", "train_images_per_s",
                "final_loss", "params", "out_dir", "eval_weights"):
        assert key in s
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0] * 0.7, losses
    assert s["top1"] > 40  # 10 classes: chance is 10%
    assert s["steps"] == 24 and s["epochs"] == 3 and not s["stopped_early"]
    assert json.loads((tmp_path / "summary.json").read_text())["top1"] == s["top1"]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["model"]["width"] == 0.125 and saved["batch_size"] == 16


def test_resume_is_bit_exact(tmp_path):
    """Stop mid-epoch (max_steps), resume to the end: same weights, EMA and metrics as one go."""
    cfg = tiny_cfg(ema_decay=0.9, checkpoint_every=3)
    full = run_training(tiny_spec(), cfg, tmp_path / "full", progress=False)
    part = run_training(tiny_spec(), tiny_cfg(ema_decay=0.9, checkpoint_every=3, max_steps=5), tmp_path / "cut", progress=False)
    assert part["stopped_early"] and part["steps"] == 5
    resumed = run_training(tiny_spec(), cfg, tmp_path / "cut", progress=False, resume="auto")
    assert resumed["steps"] == full["steps"] and resumed["resumed"]
    for key in ("model", "ema"):
        a, b = _weights(tmp_path / "full", key), _weights(tmp_path / "cut", key)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), key
    assert resumed["top1"] == full["top1"] and resumed["eval_weights"] == "ema"
    assert resumed["final_loss"] == pytest.approx(full["final_loss"], rel=0, abs=0)


def test_lr_schedule_matches_recipe():
    cfg = resolve_config("paper", None, {"batch_size": 256})
    spe = 100  # steps per epoch
    peak = 1.6 * 256 / 4096
    assert cfg.peak_lr() == pytest.approx(peak)
    assert lr_at(cfg, 0, spe) == pytest.approx(peak / 1000)  # warm-up starts near 0 (10 epochs = 1000 steps)
    assert lr_at(cfg, 499, spe) == pytest.approx(peak / 2)
    assert lr_at(cfg, 999, spe) == pytest.approx(peak)  # warm-up ends at the peak
    assert lr_at(cfg, 1000, spe) == pytest.approx(peak)  # cosine starts at the peak
    mid = 1000 + (13000 - 1000) // 2
    assert lr_at(cfg, mid, spe) == pytest.approx(peak / 2)  # cosine midpoint
    assert lr_at(cfg, 12999, spe) == pytest.approx(0, abs=1e-6 * peak)
    # the optimiser sees the same values through LambdaLR
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(1000, 13000))
    seen = []
    for _ in range(mid + 1):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    for s in (0, 499, 999, 1000, mid):
        assert seen[s] == pytest.approx(lr_at(cfg, s, spe))


def test_paper_recipe_values():
    c = resolve_config("paper")
    assert (c.epochs, c.nesterov, c.momentum, c.warmup_epochs, c.ema_decay, c.bn_momentum) == (130, True, 0.9, 10, 0.9999, 1e-4)
    assert c.peak_lr() == pytest.approx(1.6) and c.data == "imagenet"
    s = resolve_config("short")
    spec = spec_for(s, "sasa_resnet26")
    assert spec.image_size == 64 and spec.num_classes == 10 and spec.image_size // 4 > 11  # 16x16 > k=11
    assert spec_for(s, "sasa_resnet26", {"width": 0.5}).width == 0.5  # the user's flag wins


def test_config_file_then_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('epochs = 7\nlr = 0.3\nlabel-smoothing = 0.2\n[model]\nwidth = 0.5\n')
    c = resolve_config("short", toml, {"lr": 0.1})
    assert (c.epochs, c.lr, c.label_smoothing, c.model["width"]) == (7, 0.1, 0.2, 0.5)
    yml = tmp_path / "c.yaml"
    yml.write_text("epochs: 2\nprecision: fp16\n")
    assert resolve_config("paper", yml).precision == "fp16"
    bad = tmp_path / "bad.yaml"
    bad.write_text("nonsense_key: 1\n")
    with pytest.raises(SasaError, match="nonsense_key"):
        resolve_config("short", bad)
    with pytest.raises(SasaError, match="precision"):
        resolve_config("short", None, {"precision": "fp8"})


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path, monkeypatch):
    orig = InMemoryData.make_batch
    calls = {"n": 0}

    def poisoned(self, idx, gen):
        x, y = orig(self, idx, gen)
        if gen is None and len(idx) == 16:  # training batches (no augmentation on synthetic)
            calls["n"] += 1
            if calls["n"] == 5:
                x = x * float("nan")
        return x, y

    monkeypatch.setattr(InMemoryData, "make_batch", poisoned)
    with pytest.raises(NonFiniteLoss, match="non-finite|nan") as e:
        run_training(tiny_spec(), tiny_cfg(checkpoint_every=2), tmp_path, progress=False)
    assert "checkpoint" in str(e.value)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["position"]["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def _cli(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    return e.value.code, capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    code, err = _cli(["train", *TINY_FLAGS, "--data", "fashion-mnist", "--data-dir", str(tmp_path / "nope"), "--recipe", "short"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "not found" in err
    code, err = _cli(["train", *TINY_FLAGS, "--data", "imagenet", "--data-dir", str(tmp_path), "--max-steps", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "train" in err
    bad = tmp_path / "run"
    bad.mkdir()
    (bad / "checkpoint.pt").write_bytes(b"\x00garbage" * 100)
    code, err = _cli(["train", *TINY_FLAGS, "--data", "synthetic", "--recipe", "short", "--out", str(bad), "--resume", "auto"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "corrupt checkpoint" in err
    code, err = _cli(["train", *TINY_FLAGS, "--data", "synthetic", "--recipe", "short", "--resume", str(tmp_path / "missing.pt")], capsys)
    assert code == 2 and "no checkpoint" in err


def test_cli_trains_and_rejects_other_model_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", *TINY_FLAGS, "--data", "synthetic", "--recipe", "short", "--precision", "fp32",
            "--batch-size", "16", "--max-steps", "2", "--out", str(out), "-q"]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code in (0, None)
    summary = json.loads(capsys.readouterr().out)
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"]) and (out / "checkpoint.pt").is_file()
    other = [a if a != "0.125" else "0.25" for a in argv]  # width 0.25: a different network
    code, err = _cli([*other, "--resume", "auto"], capsys)
    assert code == 2 and "different model" in err
