"""`sasa-bench latency` and measure_latency on tiny models: fields, ratios, train mode, errors.

No assertion looks at an absolute time: the machine is shared and noisy.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from sasa_bench.cli.app import main
from sasa_bench.errors import SasaError
from sasa_bench.measure import latency as lat
from sasa_bench.measure.latency import LatencyOptions, Workload, measure_latency
from sasa_bench.measure.memory import peak_memory
from sasa_bench.spec import make_spec

# The reference backend: these tests are about measuring, not about the fast kernels (tested apart).
TINY = ["--depth", "26", "--image-size", "32", "--width", "0.25", "--num-classes", "10", "--backend", "reference"]
FAST = ["--device", "cpu", "--batch-size", "2", "--iters", "2", "--warmup", "1"]


def tiny(name: str = "sasa_resnet26"):
    return make_spec(name, image_size=32, width=0.25, num_classes=10, backend="reference")


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["latency", *args])
    out, err = capsys.readouterr()
    return exc.value.code or 0, out, err


def check_timing(row: dict, prefix: str = "") -> None:
    lo, med, hi = (row[f"{prefix}{k}_ms"] for k in ("min", "median", "max"))
    assert 0 < lo <= med <= hi
    assert row[f"{prefix}images_per_s"] > 0
    assert row[f"{prefix}params"] > 0 and row[f"{prefix}gflops"] > 0
    assert row[f"{prefix}backend"] == ("reference" if "sasa" in row[f"{prefix}model"] else None)


def test_json_fields_and_vs_ratio(capsys):
    code, out, _ = run_cli(capsys, "-m", "sasa_resnet26", *TINY, *FAST, "--vs", "resnet26", "-f", "json")
    assert code == 0
    (row,) = json.loads(out)
    check_timing(row)
    check_timing(row, "vs_")
    assert row["model"].startswith("sasa_resnet26") and row["vs_model"].startswith("resnet26")
    assert row["peak_mem_mb"] is not None and row["peak_mem_mb"] >= 0
    assert row["mem_method"] in ("rss_hwm_delta", "rss_sampled_delta")
    assert len(row["times_ms"]) == len(row["vs_times_ms"]) == len(row["pair_ratios"]) == 2
    assert row["time_ratio"] == pytest.approx(statistics.median(row["pair_ratios"]))
    assert row["time_ratio_min"] <= row["time_ratio"] <= row["time_ratio_max"]
    assert row["throughput_ratio"] == pytest.approx(1 / row["time_ratio"])
    for key in ("device", "device_name", "torch", "threads", "precision", "mode", "batch_size"):
        assert row[key] not in (None, "")
    assert row["device"] == "cpu" and row["torch"] == torch.__version__
    assert row["threads"] >= 1 and row["batch_size"] == 2 and row["mode"] == "inference"
    assert row["compile_s"] is None


def test_several_models_one_table_and_save(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "-m", "resnet26", "-m", "sasa_resnet26_convstem", *TINY, *FAST, "--threads", "1",
        "--save", "--results", str(tmp_path),
    )  # fmt: skip
    assert code == 0
    assert "resnet26[" in out and "sasa_resnet26_convstem[" in out  # names not eaten as markup
    files = sorted((tmp_path / "latency").glob("*.json"))
    assert len(files) == 2
    rec = json.loads(files[0].read_text())
    assert rec["kind"] == "latency" and rec["threads"] == 1 and rec["vs_model"] is None
    check_timing(rec)


def test_csv_train_bf16(capsys):
    args = ["--warmup", "0", "--iters", "1", "--mode", "train", "--precision", "bf16", "-f", "csv"]
    code, out, _ = run_cli(capsys, "-m", "resnet26", *TINY, *FAST, *args)
    assert code == 0
    header, line = out.strip().splitlines()
    row = dict(zip(header.split(","), line.split(","), strict=True))
    assert row["precision"] == "bf16" and row["mode"] == "train" and row["time_ratio"] == ""
    assert 0 < float(row["min_ms"]) <= float(row["median_ms"]) <= float(row["max_ms"])


def test_train_mode_updates_parameters():
    opts = LatencyOptions(device="cpu", batch_size=2, mode="train")
    w = Workload(tiny(), opts, torch.device("cpu"), batch_size=2)
    assert w.model.training
    before = [p.detach().clone() for p in w.model.parameters()]
    w.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, w.model.parameters(), strict=True)]
    assert all(p.grad is not None for p in w.model.parameters())
    assert sum(changed) == len(changed)  # every weight, attention embeddings included, got a step


def test_inference_leaves_weights_alone():
    w = Workload(tiny(), LatencyOptions(device="cpu"), torch.device("cpu"), batch_size=2)
    assert not w.model.training
    before = [p.detach().clone() for p in w.model.parameters()]
    w.step()
    assert all(torch.equal(a, p) for a, p in zip(before, w.model.parameters(), strict=True))


def test_peak_memory_sees_a_big_allocation():
    def step() -> None:
        x = torch.ones(16 * 2**20)  # 64 MiB, touched
        del x

    mem = peak_memory(step, torch.device("cpu"))
    assert mem.method in ("rss_hwm_delta", "rss_sampled_delta")
    assert 56 <= mem.mb < 200


def test_oom_names_the_batch_size_and_can_retry(monkeypatch):
    real_step = Workload.step

    def step(self):
        if self.batch_size > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        real_step(self)

    monkeypatch.setattr(lat.Workload, "step", step)
    opts = LatencyOptions(device="cpu", batch_size=8, warmup=0, iters=1)
    with pytest.raises(SasaError, match="batch size 8"):
        measure_latency([tiny("resnet26")], opts)
    opts.retry_oom = True
    (row,) = measure_latency([tiny("resnet26")], opts, vs=tiny("resnet26"))
    assert row["batch_size"] == 2 and row["batch_size_requested"] == 8
    assert row["time_ratio"] > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--precision", "fp8"], "precision"),
        (["--iters", "0"], "iters"),
        (["--batch-size", "0"], "batch size"),
        (["--warmup", "-1"], "warmup"),
        (["--mode", "eval"], "mode"),
        (["--device", "tpu"], "device"),
        (["--vs", "resnet51"], "resnet51"),
        (["--threads", "0"], "threads"),
        (["--format", "xml"], "format"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, words):
    code, out, err = run_cli(capsys, "-m", "resnet26", "--device", "cpu", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sasa-bench: error:") and words in lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error(capsys):
    code, out, err = run_cli(capsys, "-m", "resnet26", "--device", "cuda")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "CUDA is not available" in err and "--device cpu" in err
