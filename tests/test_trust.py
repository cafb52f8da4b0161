"""Nothing lost, nothing silently wrong (issue 16): results count only when valid and current,
bad values are refused at the edge, resume keeps one run one run, OS errors and signals are one
line. Each test reproduces a way the tool used to give a wrong result (or a traceback)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from sasa_bench.cli.app import main
from sasa_bench.store import atomic_write_bytes, clean_stale_temps, json_text, scan

sys.path.insert(0, str(Path(__file__).parent))
from test_studies import TINY  # noqa: E402
from train_helpers import TINY_FLAGS  # noqa: E402

TINY_STUDY = TINY.replace('metric = "m"', 'metric = "m"\nlatency_vs = "base"')  # 3 variants of a 0.25-wide net
FAST_TRAIN = ["--data", "synthetic", "--recipe", "short", "--precision", "fp32", "--batch-size", "16", "-q"]


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code or 0, out.out, out.err


def error_line(err: str) -> str:
    """The one error line of a command that had started work (progress lines come before it)."""
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("sasa-bench: error:")]
    return line


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def study(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny study in its own studies folder (so `report` knows it too)."""
    d = tmp_path / "studies"
    d.mkdir()
    (d / "tiny.toml").write_text(TINY_STUDY)
    monkeypatch.setenv("SASA_BENCH_STUDIES", str(d))
    return d / "tiny.toml"


def ablate_args(res: Path, *extra: str) -> list[str]:
    return ["ablate", "tiny", "--train", "none", "--no-latency", "--image-size", "32", "--results", str(res), *extra]


# --------------------------------------------------------------------------- 1. the store


def test_truncated_or_empty_result_is_redone(study: Path, tmp_path: Path, capsys) -> None:
    res = tmp_path / "results"
    assert cli(ablate_args(res), capsys)[0] == 0
    k3, k5 = res / "tiny" / "k3__none__seed0.json", res / "tiny" / "k5__none__seed0.json"
    k3.write_text(k3.read_text()[:100])  # a writer killed by something that bypassed the atomic write
    k5.write_text("")
    code, _, err = cli(ablate_args(res), capsys)
    assert code == 0, err
    assert "k3__none__seed0: unreadable result (not valid JSON" in err and "redoing" in err
    assert "k5__none__seed0: unreadable result (empty file), redoing" in " ".join(err.split())
    assert "2 written" in err and "1 already done" in err
    records, problems = scan(res)
    assert len(records) == 3 and not problems


def test_changed_image_size_is_redone(study: Path, tmp_path: Path, capsys) -> None:
    res = tmp_path / "results"
    assert cli(ablate_args(res), capsys)[0] == 0
    args64 = [a if a != "32" else "64" for a in ablate_args(res)]
    code, _, err = cli(args64, capsys)
    assert code == 0, err
    assert "k3__none__seed0: image size 32 -> 64, redoing" in err
    assert "3 written" in err
    assert {r["spec"]["image_size"] for r in scan(res)[0]} == {64}
    assert "0 written, 3 already done" in cli(args64, capsys)[2]
    # a variant edited in the study file is redone as well
    study.write_text(TINY_STUDY.replace("{ k = 5 }", "{ k = 7 }"))
    err = cli(args64, capsys)[2]
    assert "k5__none__seed0: k 5 -> 7, redoing" in err and "1 written" in err


def test_report_lists_bad_and_stale_files_and_refuses_mixed_settings(study: Path, tmp_path: Path, capsys) -> None:
    res = tmp_path / "results"
    assert cli(ablate_args(res), capsys)[0] == 0
    bad = res / "tiny" / "conv__none__seed0.json"
    rec = json.loads(bad.read_text())
    bad.write_text(json.dumps({**rec, "latency": [1, 2]}))
    study.write_text(TINY_STUDY.replace("{ k = 5 }", "{ k = 7 }"))  # k5's result is now stale
    code, _, err = cli(["report", "--results", res], capsys)
    assert code == 0, err
    err = " ".join(err.split())
    assert f"{bad}: 'latency' must be an object or null, got list" in err
    assert "k5__none__seed0.json: stale: the study file now gives 'k5' k 5 -> 7" in err
    text = (res / "REPORT.md").read_text()
    assert "## Unreadable or stale result files" in text and "got list" in text and "stale" in text
    # results of one study at two image sizes: refused, unless asked
    study.write_text(TINY_STUDY)
    bad.unlink()
    assert cli([*[a if a != "32" else "64" for a in ablate_args(res)], "--shard", "1/3"], capsys)[0] == 0
    code, _, err = cli(["report", "--results", res], capsys)
    line = one_line(err)
    assert code == 2 and "mixes results made with different settings: image size 64 (k3/seed0), 32 (k5/seed0)" in line
    assert cli(["report", "--results", res, "--allow-mixed"], capsys)[0] == 0


def test_non_finite_numbers_are_never_written_or_read() -> None:
    assert json.loads(json_text({"loss": float("nan"), "x": [float("inf"), 1.5]})) == {"loss": None, "x": [None, 1.5]}


def test_result_with_nan_is_a_problem(tmp_path: Path) -> None:
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "a.json").write_text('{"schema": 1, "kind": "k", "x": NaN}')
    records, problems = scan(tmp_path)
    assert not records and "non-strict JSON value NaN" in problems[0].reason


# --------------------------------------------------------------------------- 2. validation


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--grad-clip", "-1"], "grad clip"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--lr", "inf"], "finite"),
        (["--lr", "-1"], "lr must be > 0"),
        (["--momentum", "-1"], "momentum must be in [0, 1)"),
        (["--weight-decay", "-1"], "weight decay must be >= 0"),
        (["--epochs", "inf"], "epochs must be a finite number"),
        (["--batch-size", "1"], "BatchNorm"),
        (["--attention-groups", ""], "attention groups"),
    ],
)
def test_bad_training_values_exit_2_with_one_line(flags: list[str], words: str, tmp_path: Path, capsys) -> None:
    code, _, err = cli(["train", *TINY_FLAGS, *FAST_TRAIN, "--max-steps", "1", "--out", tmp_path / "run", *flags], capsys)
    assert code == 2 and words in one_line(err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("text, words", [("epochs = true", "epochs must be a number"),
                                         ('batch_size = "lots"', "batch size must be an integer"),
                                         ('[model]\nheads = "many"', "model heads must be an integer")])
def test_bad_config_values_exit_2_with_one_line(text: str, words: str, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text + "\n")
    code, _, err = cli(["train", *TINY_FLAGS, "--data", "synthetic", "--max-steps", "1", "--config", cfg, "--out", tmp_path / "run"], capsys)
    assert code == 2 and words in one_line(err)


@pytest.mark.parametrize("flags", [["--width", "inf"], ["--width", "1e30"], ["--num-classes", "99999999999"],
                                   ["--image-size", "3200000"], ["--k", "abc"], ["--depth", "2.5"]])
def test_flops_bad_sizes_exit_2_with_one_line(flags: list[str], capsys) -> None:
    code, _, err = cli(["flops", *flags], capsys)
    assert code == 2
    one_line(err)


def test_study_set_values_are_type_checked(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY_STUDY.replace("{ k = 3 }", '{ kernel_size = "seven" }'))
    code, _, err = cli(["ablate", bad, "--dry-run"], capsys)
    assert code == 2 and "kernel size must be an integer" in one_line(err)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--train", "short", "--data", "cifar"], "unknown dataset 'cifar'"),
        (["--train", "paper"], "--data-dir"),
        (["--train", "none", "--backend", "nosuch"], "unknown attention backend"),
        (["--train", "none", "--device", "tpu"], "device"),
    ],
)
@pytest.mark.parametrize("dry", [True, False])
def test_ablate_options_are_checked_before_the_first_unit(flags, words, dry, study: Path, tmp_path: Path, capsys) -> None:
    res = tmp_path / "results"
    code, _, err = cli(["ablate", "tiny", "--image-size", "32", "--results", res, *flags, *(["--dry-run"] if dry else [])], capsys)
    assert code == 2 and words in one_line(err)
    assert not res.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_ablate_device_cuda_without_cuda_exits_2_before_work(study: Path, tmp_path: Path, capsys) -> None:
    code, _, err = cli(["ablate", "tiny", "--train", "none", "--device", "cuda", "--dry-run", "--results", tmp_path], capsys)
    assert code == 2 and "CUDA is not available" in one_line(err)


# --------------------------------------------------------------------------- 3. resume


def _train(out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    return cli(["train", *TINY_FLAGS, *FAST_TRAIN, "--out", out, *extra], capsys)


def test_resume_refuses_changed_settings_unless_overridden(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(out, capsys, "--max-steps", "2", "--lr", "0.05")[0] == 0
    before = (out / "config.yaml").read_text()
    code, _, err = _train(out, capsys, "--max-steps", "4", "--lr", "5.0", "--weight-decay", "0.001", "--resume", "auto")
    line = one_line(err)
    assert code == 2 and "lr 0.05 -> 5.0" in line and "weight decay" in line and "--resume-override" in line
    assert (out / "config.yaml").read_text() == before
    # on purpose: the new LR is the one used from here on, and the change is on record
    code, out_json, err = _train(out, capsys, "--max-steps", "4", "--lr", "5.0", "--resume", "auto", "--resume-override")
    assert code == 0, err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 5.0 and saved["config_history"][0]["changed"]["lr"] == [0.05, 5.0]
    assert saved["config_history"][0]["at_step"] == 2
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["optimizer"]["param_groups"][0]["initial_lr"] == 5.0
    # a config.yaml with its history is still a valid --config
    assert _train(tmp_path / "again", capsys, "--config", out / "config.yaml", "--max-steps", "1")[0] == 0


def test_out_of_an_existing_run_without_resume_is_refused(tmp_path: Path, capsys) -> None:
    out = tmp_path / "run"
    assert _train(out, capsys, "--max-steps", "2")[0] == 0
    def files() -> dict[Path, bytes]:  # every file, the tensorboard/ events included
        return {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    before = files()
    code, _, err = _train(out, capsys, "--max-steps", "2")
    assert code == 2 and "already holds a run" in one_line(err) and "--resume auto" in err
    assert files() == before


# --------------------------------------------------------------------------- 4. OS errors, signals


def test_unwritable_or_file_valued_folders_are_one_line(study: Path, tmp_path: Path, capsys) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    code, _, err = cli(ablate_args(afile), capsys)
    assert code == 2 and str(afile) in one_line(err)
    code, _, err = _train(afile, capsys, "--max-steps", "1")
    assert code == 2 and "is a file, not a folder" in one_line(err)
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        code, _, err = cli(ablate_args(ro), capsys)
        assert code == 2 and "permission denied" in one_line(err)


@pytest.fixture
def tiny_tmpfs(tmp_path: Path):
    mnt = tmp_path / "full"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,nr_inodes=64", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_disk_full_is_one_line_and_leaves_nothing_half_written(study: Path, tiny_tmpfs: Path, capsys) -> None:
    (tiny_tmpfs / "results" / "tiny").mkdir(parents=True)
    with open(tiny_tmpfs / "filler", "wb", buffering=0) as f:  # fill the disk
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    code, _, err = cli(ablate_args(tiny_tmpfs / "results"), capsys)
    line = error_line(err)
    assert code == 1 and "no space left on device" in line and str(tiny_tmpfs / "results" / "tiny") in line
    assert not [p for p in (tiny_tmpfs / "results" / "tiny").iterdir()]


def test_a_signal_during_an_atomic_write_waits_for_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stop(BaseException):
        pass

    def handler(signum, frame):  # noqa: ANN001
        raise Stop

    old = signal.signal(signal.SIGINT, handler)
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (os.kill(os.getpid(), signal.SIGINT), real_fsync(fd)))
    try:
        with pytest.raises(Stop):
            atomic_write_bytes(tmp_path / "r.json", b"complete")
    finally:
        signal.signal(signal.SIGINT, old)
    assert (tmp_path / "r.json").read_bytes() == b"complete"
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    left = tmp_path / f".checkpoint.pt.{dead.pid}.abc123.tmp"
    left.write_bytes(b"half")
    live = tmp_path / f".checkpoint.pt.{os.getpid()}.def456.tmp"
    live.write_bytes(b"being written")
    assert clean_stale_temps(tmp_path) == [left]
    assert live.exists() and not left.exists()


@pytest.mark.slow
def test_sigint_during_training_says_how_to_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sasa_bench", "train", *TINY_FLAGS, *FAST_TRAIN, "--epochs", "50",
           "--checkpoint-every", "1", "--out", str(out)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    import time

    t0 = time.time()
    while not (out / "checkpoint.pt").exists() and time.time() - t0 < 120:
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err.decode()
    assert not list(out.glob("*.tmp"))
    # and the same command (with --resume auto) continues
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["position"]["global_step"] >= 1


# --------------------------------------------------------------------------- 5. smaller


def test_version_and_usage_errors(capsys) -> None:
    code, out, _ = cli(["--version"], capsys)
    assert code == 0 and out.startswith("sasa-bench ")
    code, _, err = cli(["flops", "--k", "abc"], capsys)
    assert code == 2 and "'--k'" in one_line(err)


def test_models_counts_on_the_meta_device_like_the_real_model() -> None:
    from sasa_bench.cli.flops import flops_row, meta_count
    from sasa_bench.spec import make_spec

    for name in ("resnet26", "sasa_resnet26", "sasa_resnet26_convstem"):
        spec = make_spec(name, width=0.25, image_size=64)
        row = flops_row(spec, counter="torch")
        assert meta_count(spec) == (row["params"], pytest.approx(row["gflops"], rel=1e-12))


def test_latency_vs_gets_the_shared_overrides(capsys) -> None:
    code, out, err = cli(["latency", "--model", "sasa_resnet26", "--width", "0.25", "--image-size", "32", "--num-classes", "10",
                          "--vs", "resnet26", "--device", "cpu", "--batch-size", "2", "--iters", "1", "--warmup", "0", "-f", "json"], capsys)
    assert code == 0, err
    row = json.loads(out)[0]
    assert row["vs_spec"]["width"] == 0.25 and row["vs_spec"]["image_size"] == 32 and row["vs_spec"]["num_classes"] == 10


def test_pasted_dry_run_commands_run(study: Path, tmp_path: Path, capsys) -> None:
    def commands(*args: str) -> list[str]:
        code, out, _ = cli(["ablate", "tiny", "--image-size", "32", "--latency-iters", "1", "--threads", "1",
                            "--dry-run", "--results", tmp_path, *args], capsys)
        assert code == 0
        return [line for line in out.splitlines() if line.startswith("sasa-bench ")]

    latency = next(c for c in commands("--train", "none") if c.startswith("sasa-bench latency") and "--k 3" in c)
    assert "[" not in latency and "--vs sasa_resnet26 " in latency
    # split as a POSIX shell splits it
    assert cli([*shlex.split(latency)[1:], "--warmup", "0", "-f", "json"], capsys)[0] == 0
    study.write_text(TINY_STUDY.replace("width = 0.25", ""))  # the short recipe narrows it itself
    train = next(c for c in commands("--train", "short") if c.startswith("sasa-bench train") and "--k 3" in c)
    extra = ["--data", "synthetic", "--max-steps", "1", "--batch-size", "8", "--out", tmp_path / "run", "-q"]
    code, _, err = cli([*shlex.split(train)[1:], *extra], capsys)
    assert code == 0, err


@pytest.mark.slow
def test_pasted_dry_run_command_runs_in_a_shell(study: Path, tmp_path: Path, capsys) -> None:
    code, out, _ = cli(["ablate", "tiny", "--train", "none", "--image-size", "32", "--dry-run", "--results", tmp_path], capsys)
    flops = next(line for line in out.splitlines() if line.startswith("sasa-bench flops") and "--k 5" in line)
    bindir = Path(sys.executable).parent
    r = subprocess.run(["bash", "-c", flops + " -f json"], capture_output=True, text=True,
                       env={**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)[0]["image_size"] == 32


def test_ablate_list_with_a_missing_studies_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setenv("SASA_BENCH_STUDIES", str(tmp_path / "nope"))
    code, _, err = cli(["ablate", "--list"], capsys)
    assert code == 2 and str(tmp_path / "nope") in one_line(err)
