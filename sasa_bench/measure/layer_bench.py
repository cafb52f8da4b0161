"""One attention layer against a 3x3 convolution of the same width, at ResNet-50's stage shapes.

:func:`measure_layers` is the API behind ``sasa-bench bench-layer`` (issue 4). For each stage
(64 ch @ 56², 128 @ 28², 256 @ 14², 512 @ 7² by default, batch 8) and each dtype it builds

- ``conv3x3``: ``nn.Conv2d(C, C, 3, padding=1, bias=False)``, the layer attention replaces, and
- one :class:`~sasa_bench.layers.attention.LocalSelfAttention2d` (C -> C, k=7, 8 heads, relative
  positions, masked border) per backend, all holding the same weights, so the time *includes*
  the Q/K/V 1x1 projections,

then times them **interleaved** (conv, backend A, backend B, …, conv, A, B, …) so that machine
noise hits all alike. Two steps are timed: ``fwd`` (forward under ``torch.no_grad``) and
``fwdbwd`` (forward, then backward of a fixed output gradient into the input and the weights).
Ratios to the conv (``*_vs_conv``) and to the ``reference`` backend (``*_speedup_vs_reference``)
are medians of the per-round ratios, so each pair of numbers comes from the same machine state.

Peak memory per candidate and step comes from :func:`sasa_bench.measure.memory.peak_memory`
(CUDA: max allocated; CPU: the process's RSS high-water mark above the level before the step),
measured once after the warm-up. Backends with a build step (``Backend.warm_up``) are built
before anything is timed; the build time is reported as ``build_s``.

dtypes run natively (modules and input cast to the dtype, no autocast); a backend may compute
internally in fp32 (``cpu_fused`` does for bf16). A bf16 request on a host without native bf16
(:func:`sasa_bench.hardware.native_bf16`) is measured in fp32, with one warning line: there
PyTorch's bf16 convolutions take a slow fallback, and timing that would say nothing about attention.

How close to the machine: for the conv and for each backend's attention core alone
(``core:<backend>`` rows: the window attention on fixed q, k, v, no projections) the rows give
the achieved forward GFLOP/s (the analytic FLOPs: 2 per multiply-add, the paper's count) and its
fraction of the host's fp32 peak, :func:`sasa_bench.hardware.fp32_peak_gflops` =
threads x 2 FMA pipes x fp32 lanes x 2 x the reported clock, for the ISA each one ran (PyTorch's
for the conv, the C++ kernel's for ``cpu_fused``).
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from sasa_bench import hardware
from sasa_bench.errors import SasaError
from sasa_bench.kernels.op import attention_macs
from sasa_bench.kernels.registry import (
    all_backends,
    available_backends,
    backend_that_runs,
    check_backend_name,
    kernel_facts,
)
from sasa_bench.measure.memory import peak_memory

# ResNet-50's four bottleneck stages: (width, feature-map side) at 224² input.
STAGES: dict[int, tuple[int, int]] = {1: (64, 56), 2: (128, 28), 3: (256, 14), 4: (512, 7)}
DTYPES: dict[str, torch.dtype] = hardware.DTYPES  # the one precision table
CONV = "conv3x3"
STEPS = ("fwd", "fwdbwd")

ProgressFn = Callable[[str, int, int], None]
_ISA_OF_ATEN = {"AVX512": "avx512", "AVX512_VNNI": "avx512", "AVX2": "avx2"}  # PyTorch's name -> ours


@dataclass
class LayerBenchOptions:
    stages: list[int] = field(default_factory=lambda: [1, 2, 3, 4])
    dtypes: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    backends: list[str] | None = None  # None: every backend available on the device
    batch_size: int = 8
    iters: int = 5
    warmup: int = 2
    threads: int | None = None
    device: str = "cpu"
    kernel_size: int = 7
    heads: int = 8
    memory: bool = True

    def validate(self) -> None:
        for s in self.stages:
            if s not in STAGES:
                raise SasaError(f"unknown stage {s} (choose from {', '.join(map(str, STAGES))})")
        for d in self.dtypes:
            if d not in DTYPES:
                raise SasaError(f"unknown dtype {d!r} (choose from {', '.join(DTYPES)})")
        if self.batch_size < 1 or self.iters < 1 or self.warmup < 0:
            raise SasaError("batch size and iters must be >= 1, warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise SasaError(f"threads must be >= 1, got {self.threads}")
        dev = self.torch_device()
        for b in self.backend_names():
            check_backend_name(b)
            if b != "auto":
                be = all_backends()[b]
                if dev.type not in be.devices or not be.is_available():
                    raise SasaError(f"attention backend {b!r} cannot run on {dev.type} on this machine")

    def torch_device(self) -> torch.device:
        return hardware.parse_device(self.device, allow_auto=False)  # the one device parser

    def backend_names(self) -> list[str]:
        if self.backends:
            return list(dict.fromkeys(self.backends))
        return [b for b in available_backends(self.torch_device().type) if b != "auto"]


def resolve_dtypes(names: list[str], device: torch.device) -> list[str]:
    """The dtypes to measure: bf16 becomes fp32 (one warning line) where bf16 is not native."""
    out: list[str] = []
    for d in names:
        if d == "bf16" and not hardware.native_bf16(device):
            warnings.warn(
                f"bf16 requested on a host without native bf16 ({hardware.cpu_model()}, "
                f"{hardware.aten_capability()}): measuring fp32 instead",
                stacklevel=2,
            )
            d = "fp32"
        if d not in out:
            out.append(d)
    return out


class _Core(nn.Module):
    """The attention core alone (no projections): the window attention on fixed q, k, v."""

    def __init__(self, layer: nn.Module, x: torch.Tensor) -> None:
        super().__init__()
        b, c, h, w = x.shape
        n, d, kk = layer.heads, layer.head_dim, layer.kernel_size
        gen = torch.Generator().manual_seed(1)

        def param(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.randn(*shape, generator=gen).to(x.device, x.dtype))

        self.q, self.k, self.v = param(b, n, d, h, w), param(b, n, d, h, w), param(b, n, d, h, w)
        self.rel_row, self.rel_col = param(kk, d // 2), param(kk, d - d // 2)
        self.kernel_size, self.backend = kk, layer.backend
        self.macs = attention_macs((b, n, d, h, w), True, (b, n, d, h, w), True, kk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sasa_bench.kernels import local_attention

        out = local_attention(self.q, self.k, self.v, self.rel_row, self.rel_col, self.kernel_size, True, self.backend)
        return out.reshape(x.shape)


class _Candidate:
    def __init__(
        self, name: str, module: nn.Module, x: torch.Tensor, grad: torch.Tensor, macs: int | None = None
    ) -> None:
        self.name, self.module, self.x, self.grad, self.macs = name, module, x, grad, macs
        self.times: dict[str, list[float]] = {s: [] for s in STEPS}
        self.mem: dict[str, float | None] = {s: None for s in STEPS}
        self.mem_method = "unavailable"

    def fwd(self) -> None:
        with torch.no_grad():
            self.module(self.x)

    def fwdbwd(self) -> None:
        self.module.zero_grad(set_to_none=True)
        self.x.grad = None
        self.module(self.x).backward(self.grad)

    def run(self, step: str) -> None:
        (self.fwd if step == "fwd" else self.fwdbwd)()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _median_ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def measure_layers(opts: LayerBenchOptions, progress: ProgressFn | None = None) -> list[dict[str, Any]]:
    """Rows: one per (stage, dtype, candidate), the conv first; see the module docstring."""
    from sasa_bench.layers.attention import LocalSelfAttention2d

    opts.validate()
    device = opts.torch_device()
    names = opts.backend_names()
    build_s: dict[str, float | None] = {}
    ran: dict[str, str] = {}  # requested -> the backend that runs (after the lazy build)
    for b in names:
        be = all_backends().get(b)
        ran[b] = backend_that_runs(b, device.type)
        build_s[b] = be.warm_up() if be is not None and be.warm_up is not None else None
    dtypes = resolve_dtypes(opts.dtypes, device)

    prev_threads = torch.get_num_threads()
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    rows: list[dict[str, Any]] = []
    total = len(opts.stages) * len(dtypes)
    done = 0
    try:
        for stage in opts.stages:
            width, size = STAGES[stage]
            for dname in dtypes:
                dtype = DTYPES[dname]
                if progress:
                    progress(f"stage {stage} ({width} ch @ {size}²) {dname}", done, total)
                gen = torch.Generator().manual_seed(0)
                x = torch.randn(opts.batch_size, width, size, size, generator=gen).to(device, dtype)
                grad = torch.randn(opts.batch_size, width, size, size, generator=gen).to(device, dtype)
                x.requires_grad_(True)
                conv = nn.Conv2d(width, width, 3, padding=1, bias=False).to(device, dtype)
                cands = [_Candidate(CONV, conv, x, grad, opts.batch_size * width * width * 9 * size * size)]
                cores = []
                state = None
                for b in names:
                    layer = LocalSelfAttention2d(width, width, opts.kernel_size, opts.heads, backend=b)
                    if state is None:
                        state = layer.state_dict()
                    else:  # the same weights whichever backend runs them
                        layer.load_state_dict(state)
                    cands.append(_Candidate(b, layer.to(device, dtype), x, grad))
                    if ran[b] != "reference":  # the core alone, for GFLOP/s (reference: too slow to matter)
                        core = _Core(layer, x)
                        cores.append(_Candidate(f"core:{b}", core, x, grad, core.macs))
                cands.extend(cores)
                for step in STEPS:
                    for c in cands:
                        for _ in range(opts.warmup):
                            c.run(step)
                    if opts.memory:
                        for c in cands:
                            pm = peak_memory(lambda c=c, step=step: c.run(step), device)
                            c.mem[step], c.mem_method = pm.mb, pm.method
                    for _ in range(opts.iters):
                        for c in cands:
                            c.times[step].append(_timed(lambda c=c, step=step: c.run(step), device))
                rows.extend(_rows(cands, stage, width, size, dname, opts, device, build_s, ran))
                done += 1
                if progress:
                    progress(f"stage {stage} {dname} done", done, total)
    finally:
        torch.set_num_threads(prev_threads)
    return rows


def _rows(
    cands: list[_Candidate],
    stage: int,
    width: int,
    size: int,
    dname: str,
    opts: LayerBenchOptions,
    device: torch.device,
    build_s: dict[str, float | None],
    ran: dict[str, str],
) -> list[dict[str, Any]]:
    conv = cands[0]
    facts = kernel_facts()
    threads = torch.get_num_threads()
    ref = next((c for c in cands if c.name == "reference"), None)
    out = []
    for c in cands:
        row: dict[str, Any] = {
            "stage": stage,
            "channels": width,
            "size": size,
            "batch_size": opts.batch_size,
            "dtype": dname,
            "layer": c.name,
            "backend": None if c is conv else ran[c.name.removeprefix("core:")],
        }
        for s in STEPS:
            row[f"{s}_ms"] = statistics.median(c.times[s]) * 1e3
            row[f"{s}_min_ms"] = min(c.times[s]) * 1e3
        for s in STEPS:
            row[f"{s}_vs_conv"] = _median_ratio(c.times[s], conv.times[s])
        for s in STEPS:
            row[f"{s}_speedup_vs_reference"] = (
                _median_ratio(ref.times[s], c.times[s]) if ref is not None and c is not conv and not c.macs else None
            )
        for s in STEPS:
            row[f"peak_mem_{s}_mb"] = c.mem[s]
        m, rm = c.mem["fwdbwd"], ref.mem["fwdbwd"] if ref is not None else None
        row["mem_fwdbwd_vs_reference"] = m / rm if (m is not None and rm and c is not conv and not c.macs) else None
        row["mem_method"] = c.mem_method
        row["build_s"] = build_s.get(c.name)
        # the ISA this candidate ran with: the C++ kernel's for cpu_fused, PyTorch's otherwise
        isa = facts["kernel_isa"] if row["backend"] == "cpu_fused" else _ISA_OF_ATEN.get(facts["aten_isa"], "portable")
        row["isa"] = isa
        row["fwd_gflops"] = 2 * c.macs / (statistics.median(c.times["fwd"]) * 1e9) if c.macs else None
        peak = hardware.fp32_peak_gflops(isa, threads) if device.type == "cpu" else None
        row["peak_gflops"] = peak
        row["fwd_peak_frac"] = row["fwd_gflops"] / peak if (row["fwd_gflops"] and peak) else None
        row.update(
            kernel_size=opts.kernel_size,
            heads=opts.heads,
            device=str(device),
            threads=threads,
            torch=torch.__version__,
            cpu=facts["cpu"],
            aten_isa=facts["aten_isa"],
            kernel_isa=facts["kernel_isa"],
            warmup=opts.warmup,
            iters=opts.iters,
        )
        out.append(row)
    return out
