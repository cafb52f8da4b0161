"""Latency, throughput and peak memory of built models, measured the way benchmarks are trusted.

:func:`measure_latency` is the API (the ``latency`` command and the ablation runner call it); it
prints nothing and reports through an optional ``progress`` callback.

How a model is timed:

1. Build it, count params and FLOPs (batch 1, the paper's convention: 2 FLOPs per multiply-add),
   move it to the device (optionally ``channels_last``), optionally ``torch.compile`` it.
2. With ``compile``, the first call (which compiles) is timed alone and reported as ``compile_s``;
   it is never part of the steady-state numbers.
3. ``warmup`` untimed steps, then one untimed step under :func:`~sasa_bench.measure.memory.peak_memory`
   (so the memory probe cannot disturb the timed loop; the step is identical to the timed ones).
4. ``iters`` timed steps: ``torch.cuda.synchronize`` before starting the clock and before reading
   it, ``time.perf_counter`` in between. A step is one batch: a forward under
   ``torch.inference_mode()`` (mode ``inference``), or forward, cross-entropy, backward and an SGD
   step (mode ``train``). Precision ``bf16``/``fp16`` runs under ``torch.autocast``; train mode
   with fp16 uses a ``GradScaler`` like real training.

With ``vs`` (a baseline model), the model and the baseline are warmed and timed **interleaved**,
A B A B …: each pair's ratio sees the same machine state, so noise from other processes
largely cancels. ``time_ratio`` is the median of the per-pair ratios model/baseline;
``throughput_ratio`` = 1 / ``time_ratio`` (the paper's "throughput relative to the baseline").
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sasa_bench.choices import Precision
from sasa_bench.errors import SasaError
from sasa_bench.hardware import AUTOCAST_DTYPES, device_name, parse_device, resolve_precision
from sasa_bench.kernels.registry import backend_that_runs, kernel_facts
from sasa_bench.measure.flops import FlopCount, count_flops
from sasa_bench.measure.memory import PeakMemory, peak_memory
from sasa_bench.spec import ModelSpec

MODES = ("inference", "train")
# Defaults when warmup/iters are None: a reference-backend SASA-ResNet-50 takes ~10 s per batch of
# 8 on a small CPU, so CPU runs stay short; GPU steps take milliseconds, so take more (as timm).
DEFAULT_WARMUP = {"cpu": 2, "cuda": 10}
DEFAULT_ITERS = {"cpu": 5, "cuda": 50}
TRAIN_LR = 0.01

# progress(message, done, total): steps (timed or not) done so far out of the planned total.
ProgressFn = Callable[[str, int, int], None]


@dataclass
class LatencyOptions:
    """How to measure. ``None`` warmup/iters pick per-device defaults (CPU 2/5, CUDA 10/50)."""

    device: str = "auto"  # auto (cuda if available, else cpu) | cpu | cuda | cuda:N (hardware.parse_device)
    threads: int | None = None  # torch.set_num_threads for the measurement (restored after)
    batch_size: int = 8
    precision: str = "fp32"  # choices.Precision: auto | fp32 | bf16 | fp16 (autocast)
    channels_last: bool = False
    compile: bool = False  # torch.compile; the compiling call is reported as compile_s
    mode: str = "inference"  # inference | train
    warmup: int | None = None
    iters: int | None = None
    retry_oom: bool = False  # on out-of-memory, halve the batch size and retry (as timm's benchmark)

    def validate(self) -> None:
        self.precision = Precision.check(self.precision, "precision")
        if self.mode not in MODES:
            raise SasaError(f"unknown mode {self.mode!r} (choose from {', '.join(MODES)})")
        if self.batch_size < 1:
            raise SasaError(f"batch size must be >= 1, got {self.batch_size}")
        if self.iters is not None and self.iters < 1:
            raise SasaError(f"iters must be >= 1, got {self.iters}")
        if self.warmup is not None and self.warmup < 0:
            raise SasaError(f"warmup must be >= 0, got {self.warmup}")
        if self.threads is not None and self.threads < 1:
            raise SasaError(f"threads must be >= 1, got {self.threads}")
        self.torch_device()

    def torch_device(self) -> torch.device:
        """The device to run on; a clear error for a device this machine does not have."""
        return parse_device(self.device)

    def resolved(self) -> tuple[torch.device, int, int]:
        dev = self.torch_device()
        warmup = DEFAULT_WARMUP[dev.type] if self.warmup is None else self.warmup
        iters = DEFAULT_ITERS[dev.type] if self.iters is None else self.iters
        return dev, warmup, iters


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    if isinstance(e, RuntimeError):
        msg = str(e).lower()
        return "out of memory" in msg or "can't allocate memory" in msg
    return False


# Params/FLOPs per spec, so an out-of-memory retry or a re-used baseline does not count again.
_COUNTS: dict[ModelSpec, FlopCount] = {}


def synthetic_targets(n: int, size: int, num_classes: int, gen: torch.Generator, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """Three random boxes (1/8 to 1/2 of the side) with random labels per image, for train steps."""
    wh = size * (0.125 + 0.375 * torch.rand(n, 3, 2, generator=gen))
    xy = (size - wh) * torch.rand(n, 3, 2, generator=gen)
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(0, num_classes, (n, 3), generator=gen)
    return [{"boxes": b.to(device), "labels": lab.to(device)} for b, lab in zip(boxes, labels, strict=True)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Workload:
    """One model ready to step on a device: inputs, optimizer (train mode), compiled or not."""

    def __init__(self, spec: ModelSpec, opts: LatencyOptions, device: torch.device, batch_size: int) -> None:
        from sasa_bench.models import build_model

        self.spec = spec
        self.device = device
        self.batch_size = batch_size
        self.train = opts.mode == "train"
        # The attention backend that runs (None: a plain ResNet has no attention to run).
        # Resolved after the lazy build, so a failed C++ build reports the fallback (shift) that ran.
        self.backend = backend_that_runs(spec.backend, device.type) if spec.uses_attention else None
        model = build_model(spec)
        counts = _COUNTS.get(spec)
        if counts is None:
            counts = _COUNTS[spec] = count_flops(model, spec.image_size, counter="torch")
        self.params, self.gflops = counts.params, counts.gflops
        memory_format = torch.channels_last if opts.channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=memory_format)
        self.model.train(self.train)
        gen = torch.Generator().manual_seed(0)
        s = spec.image_size
        x = torch.randn(batch_size, 3, s, s, generator=gen)
        self.x = x.to(device=device, memory_format=memory_format)
        self.y = torch.randint(0, spec.num_classes, (batch_size,), generator=gen).to(device)
        if spec.detector != "none":  # a detector steps on a list of images (+ synthetic boxes in train)
            self.x = list(x.sigmoid().to(device).unbind(0))  # images in [0, 1], as the detector expects
            self.y = synthetic_targets(batch_size, s, spec.num_classes, gen, device)
        self.fn: Callable[[torch.Tensor], torch.Tensor] = torch.compile(self.model) if opts.compile else self.model
        self.dtype = AUTOCAST_DTYPES[opts.precision]  # the one precision table (hardware.py)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=TRAIN_LR, momentum=0.9) if self.train else None
        self.scaler = torch.amp.GradScaler(device.type) if self.train and self.dtype == torch.float16 else None
        self.compile_s: float | None = None
        self.memory: PeakMemory | None = None
        self.times: list[float] = []

    def _autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None)

    def step(self) -> None:
        """One batch: a forward (inference) or forward + backward + optimizer step (train)."""
        if not self.train:
            with torch.inference_mode(), self._autocast():
                self.fn(self.x)
            return
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            if isinstance(self.x, list):  # detector: torchvision RetinaNet's focal + box losses
                loss = sum(v.float() for v in self.fn(self.x, self.y).values())
            else:
                loss = F.cross_entropy(self.fn(self.x).float(), self.y)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def timed_step(self) -> float:
        """Seconds for one step, with the device synchronised on both sides."""
        _sync(self.device)
        t0 = time.perf_counter()
        self.step()
        _sync(self.device)
        return time.perf_counter() - t0


def _stats(w: Workload, prefix: str = "") -> dict[str, Any]:
    ms = [t * 1e3 for t in w.times]
    median = statistics.median(ms)
    mem = w.memory or PeakMemory(None, "unavailable")
    return {
        f"{prefix}median_ms": median,
        f"{prefix}min_ms": min(ms),
        f"{prefix}max_ms": max(ms),
        f"{prefix}images_per_s": w.batch_size / (median / 1e3),
        f"{prefix}peak_mem_mb": mem.mb,
        f"{prefix}params": w.params,
        f"{prefix}gflops": w.gflops,
        f"{prefix}compile_s": w.compile_s,
        f"{prefix}backend": w.backend,
        f"{prefix}times_ms": ms,
    }


def _free(device: torch.device, collect: bool = True) -> None:
    if collect:
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Plan:
    """Progress accounting for the progress callback."""

    def __init__(self, progress: ProgressFn | None, total: int) -> None:
        self.progress, self.total, self.done = progress, total, 0

    def tick(self, message: str, n: int = 1) -> None:
        self.done += n
        if self.progress:
            self.progress(message, self.done, self.total)


def _measure_one(
    spec: ModelSpec,
    vs: Workload | None,
    opts: LatencyOptions,
    device: torch.device,
    batch_size: int,
    warmup: int,
    iters: int,
    plan: _Plan,
) -> tuple[Workload, list[float]]:
    """Warm up and time ``spec`` (interleaved with ``vs`` if given); returns it and the pair ratios."""
    plan.tick(f"building {spec.name}", 0)
    w = Workload(spec, opts, device, batch_size)
    group = [w] if vs is None else [w, vs]
    if vs is not None:
        vs.times = []
    if opts.compile:
        for x in group:
            if x.compile_s is None:
                plan.tick(f"compiling {x.spec.name}", 0)
                x.compile_s = x.timed_step()
    for i in range(warmup):
        for x in group:
            x.step()
            plan.tick(f"warm-up {i + 1}/{warmup}: {x.spec.name}")
    for x in group:
        if x.memory is None:
            plan.tick(f"peak memory: {x.spec.name}", 0)
            x.memory = peak_memory(x.step, device)
    for i in range(iters):
        for x in group:  # A B A B …
            x.times.append(x.timed_step())
            plan.tick(f"timing {i + 1}/{iters}: {x.spec.name}")
    ratios = [a / b for a, b in zip(w.times, vs.times, strict=True)] if vs is not None else []
    return w, ratios


def run_settings(opts: LatencyOptions, device: torch.device, warmup: int, iters: int) -> dict[str, Any]:
    """How this measurement ran (device, threads, precision, mode, warm-up, iterations) and the
    kernel facts (CPU model, PyTorch's ISA, the C++ kernel's ISA). The host's full description
    for a study result is :func:`sasa_bench.hardware.host_info` (``studies.runner.env_info``)."""
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": opts.precision,
        "mode": opts.mode,
        "channels_last": opts.channels_last,
        "compile": opts.compile,
        "warmup": warmup,
        "iters": iters,
        **kernel_facts(),  # CPU model, PyTorch's ISA, the ISA the C++ kernel was built for
    }


def measure_latency(
    specs: list[ModelSpec],
    opts: LatencyOptions,
    vs: ModelSpec | None = None,
    progress: ProgressFn | None = None,
) -> list[dict[str, Any]]:
    """Time each spec (interleaved with ``vs`` when given); one row per spec, in order.

    Row keys: ``model``, ``vs_model``; ``median_ms``, ``min_ms``, ``max_ms`` (per batch),
    ``images_per_s``, ``peak_mem_mb``, ``mem_method``, ``params``, ``gflops`` (per image, 2 per
    multiply-add), ``compile_s``, ``backend`` (the attention backend that ran, resolved from
    ``auto``; None for a model without attention), ``times_ms``; the same prefixed ``vs_``
    for the baseline (``None`` without ``vs``); ``time_ratio`` (median of per-pair
    model/baseline times), ``time_ratio_min``, ``time_ratio_max``, ``throughput_ratio``
    (1/time_ratio), ``pair_ratios``; the environment: ``device``, ``device_name``, ``torch``,
    ``threads``, ``precision``, ``mode``, ``channels_last``, ``compile``, ``warmup``, ``iters``,
    ``batch_size`` (the one that ran: smaller than asked after an out-of-memory retry),
    ``batch_size_requested``, ``image_size``, ``num_classes``; and ``spec``/``vs_spec`` (dicts).

    Raises :class:`SasaError` for bad options or when a batch does not fit in memory.
    """
    opts.validate()
    device, warmup, iters = opts.resolved()
    # auto -> bf16 only where native; a forced bf16 without it is timed as asked, with one warning
    opts = dataclasses.replace(opts, precision=resolve_precision(opts.precision, device))
    prev_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    try:
        per_model = (warmup + iters) * (2 if vs is not None else 1)
        plan = _Plan(progress, per_model * len(specs))
        rows = []
        vs_work: Workload | None = None
        for spec in specs:
            batch_size = opts.batch_size
            while True:
                oom = False
                try:
                    if vs is not None and (vs_work is None or vs_work.batch_size != batch_size):
                        vs_work = None
                        _free(device)
                        vs_work = Workload(vs, opts, device, batch_size)
                    w, ratios = _measure_one(spec, vs_work, opts, device, batch_size, warmup, iters, plan)
                except Exception as e:  # only out-of-memory is handled here
                    if not is_oom(e):
                        raise
                    oom = True
                if not oom:
                    break
                # Out of the except block, so the traceback no longer holds the failed tensors.
                vs_work = None
                _free(device)
                if not opts.retry_oom or batch_size == 1:
                    hint = " (--retry-oom halves it until it fits)" if not opts.retry_oom else ""
                    raise SasaError(
                        f"out of memory on {device} with batch size {batch_size} "
                        f"({spec.name}{f' vs {vs.name}' if vs is not None else ''}, {opts.mode}, {opts.precision}); "
                        f"try a smaller --batch-size{hint}"
                    )
                batch_size //= 2
                plan.tick(f"out of memory; retrying with batch size {batch_size}", 0)
            row: dict[str, Any] = {"model": spec.name, "vs_model": vs.name if vs is not None else None}
            row.update(_stats(w))
            row["mem_method"] = (w.memory or PeakMemory(None, "unavailable")).method
            if vs_work is not None:
                row.update(_stats(vs_work, "vs_"))
                row["time_ratio"] = statistics.median(ratios)
                row["time_ratio_min"] = min(ratios)
                row["time_ratio_max"] = max(ratios)
                row["throughput_ratio"] = 1.0 / row["time_ratio"]
                row["pair_ratios"] = ratios
            else:
                row.update({k: None for k in _stats_keys("vs_")})
                row.update(time_ratio=None, time_ratio_min=None, time_ratio_max=None, throughput_ratio=None, pair_ratios=None)
            row.update(run_settings(opts, device, warmup, iters))
            row.update(
                batch_size=batch_size,
                batch_size_requested=opts.batch_size,
                image_size=spec.image_size,
                vs_image_size=vs.image_size if vs is not None else None,  # timm baselines keep their own
                num_classes=spec.num_classes,
                spec=spec.to_dict(),
                vs_spec=vs.to_dict() if vs is not None else None,
            )
            rows.append(row)
            del w
            _free(device, collect=False)  # reference counting frees the model; gc.collect is slow
        return rows
    finally:
        torch.set_num_threads(prev_threads)


def _stats_keys(prefix: str) -> list[str]:
    keys = ["median_ms", "min_ms", "max_ms", "images_per_s", "peak_mem_mb", "params", "gflops"]
    return [prefix + k for k in (*keys, "compile_s", "backend", "times_ms")]


def result_name(row: dict[str, Any]) -> str:
    """A descriptive, unique-per-measurement file name for a row (the store sanitises it)."""
    parts = [
        row["model"],
        row["device"].replace(":", ""),
        row["backend"] or "no-attention",
        row["precision"],
        row["mode"],
        f"bs{row['batch_size']}",
    ]
    if row["channels_last"]:
        parts.append("cl")
    if row["compile"]:
        parts.append("compiled")
    if row.get("vs_model"):
        parts.append(f"vs_{row['vs_model']}")
    parts.append(time.strftime("%Y%m%d-%H%M%S"))
    return "__".join(parts)
