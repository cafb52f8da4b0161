"""What this host is and can do fast: CPU model and ISA, native bf16, precision by capability.

One home for the facts every benchmark and training records (``host_info``) and for the choice
of precision: a default of ``auto`` means bf16 only where the device computes bf16 natively and
fp32 elsewhere, because on a CPU without native bf16 PyTorch runs bf16 convolutions through
``slow_conv2d`` (3-4x slower than fp32 on an AVX2 host, measured). ``--precision bf16`` still
forces it, with one warning line.
"""

from __future__ import annotations

import functools
import os
import platform
import warnings
from typing import Any

import torch

from sasa_bench.choices import DEVICE_HELP, Precision

# The one precision table (the choice set itself: sasa_bench.choices.Precision).
PRECISION_CHOICES: tuple[str, ...] = Precision.values()  # what a user may ask for (auto + the rest)
PRECISIONS: tuple[str, ...] = tuple(p for p in PRECISION_CHOICES if p != "auto")  # what runs
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# CPU flags (as /proc/cpuinfo spells them) that mean bf16 arithmetic in hardware.
_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX512-BF16, x86 AMX, aarch64 FEAT_BF16


_ID_KEYS = ("cpu family", "model", "stepping")


@functools.cache
def _cpuinfo() -> tuple[str, frozenset[str], str]:
    """(model name, flags, "family F model M stepping S") of the first CPU in /proc/cpuinfo."""
    model, flags, ident = "", "", {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip().lower()
                if key == "model name" and not model:
                    model = val.strip()
                elif key in ("flags", "features") and not flags:
                    flags = val
                elif key in _ID_KEYS and key not in ident:
                    ident[key] = val.strip()
    except OSError:
        pass
    id_text = " ".join(f"{k.replace('cpu ', '')} {ident[k]}" for k in _ID_KEYS if k in ident) or "unknown"
    return model or platform.processor() or platform.machine() or "cpu", frozenset(flags.split()), id_text


def cpu_model() -> str:
    """The CPU's model name (e.g. "AMD EPYC"), from /proc/cpuinfo, else platform's answer."""
    return _cpuinfo()[0]


def cpu_id() -> str:
    """Family / model / stepping (e.g. "family 25 model 17 stepping 1", a Zen 4): cloud VMs often
    report only "AMD EPYC", which names neither the generation nor its ISA."""
    return _cpuinfo()[2]


def cpu_flags() -> frozenset[str]:
    return _cpuinfo()[1]


def aten_capability() -> str:
    """The vector ISA PyTorch's own CPU kernels run with (``AVX512``, ``AVX2``, ``DEFAULT``, ...);
    honours ``ATEN_CPU_CAPABILITY``."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch
        return "unknown"


KERNEL_ISAS: tuple[str, ...] = ("avx512", "avx2", "portable")  # SASA_BENCH_CPU_ISA choices
# /proc/cpuinfo flags each kernel ISA needs: x86-64-v4 (AVX-512 F/BW/CD/DQ/VL) and x86-64-v3
# (AVX2, FMA, BMI1/2, F16C, LZCNT, MOVBE); the portable path runs anywhere.
_ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx512": ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx2", "fma"),
    "avx2": ("avx2", "fma", "bmi1", "bmi2", "f16c", "abm", "movbe"),
    "portable": (),
}
_LANES = {"avx512": 16, "avx2": 8, "portable": 4}  # fp32 lanes per vector register


def kernel_isa_supported(isa: str) -> str | None:
    """None if this host can run the C++ kernels built for ``isa``, else why not (one line)."""
    if isa not in _ISA_FLAGS:
        return f"unknown kernel ISA {isa!r} (choose from {', '.join(KERNEL_ISAS)})"
    if isa != "portable" and platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{isa} is an x86 ISA; this is {platform.machine()}"
    missing = [f for f in _ISA_FLAGS[isa] if f not in cpu_flags()]
    return f"this CPU lacks {', '.join(missing)}" if missing else None


def kernel_isa() -> str:
    """The ISA the C++ kernels are built for: ``SASA_BENCH_CPU_ISA`` (avx512 | avx2 | portable)
    if set, else the best one this host runs. Raises SasaError for an unknown or unrunnable one."""
    from sasa_bench.errors import SasaError

    want = os.environ.get("SASA_BENCH_CPU_ISA", "").strip().lower()
    if want in ("", "auto", "native"):
        return next(i for i in KERNEL_ISAS if kernel_isa_supported(i) is None)
    problem = kernel_isa_supported(want)
    if problem is not None:
        raise SasaError(f"SASA_BENCH_CPU_ISA={want}: {problem}")
    return want


def cpu_clock_ghz() -> float | None:
    """The clock /proc/cpuinfo reports (on a VM, usually the nominal one), in GHz."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1]) / 1000.0
    except (OSError, ValueError):
        pass
    return None


FMA_PORTS = 2  # assumed FMA pipes per core (Intel since Haswell, AMD since Zen 2 for 256 bits)


def fp32_peak_gflops(isa: str, threads: int | None = None) -> float | None:
    """threads x FMA_PORTS x fp32 lanes(isa) x 2 FLOPs x clock: the host's fp32 peak for code of
    that ISA. Assumes full-width FMA pipes at the reported clock (no turbo); on a CPU that splits
    512-bit FMAs into two halves (AMD Zen 4) the real AVX-512 peak is the AVX2 one."""
    ghz = cpu_clock_ghz()
    if ghz is None or isa not in _LANES:
        return None
    threads = threads or torch.get_num_threads()
    return threads * FMA_PORTS * _LANES[isa] * 2 * ghz


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bf16 convolutions natively (not through a slow fallback).

    CPU: oneDNN must support bf16 on this CPU (``_is_mkldnn_bf16_supported``, which honours
    ``ONEDNN_MAX_CPU_ISA``) *and* the CPU must have bf16 instructions: AVX-512 without
    AVX512-BF16 passes oneDNN's check but only emulates bf16. CUDA: ``is_bf16_supported``.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    try:
        onednn = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        onednn = False
    return onednn and any(f in cpu_flags() for f in _BF16_FLAGS)


def parse_device(name: Any, allow_auto: bool = True) -> torch.device:
    """The one device parser: ``auto`` (CUDA if available, else CPU) | ``cpu`` | ``cuda`` |
    ``cuda:N``, checked against this machine; every bad or absent device is one SasaError line."""
    from sasa_bench.errors import SasaError

    text = str(name).strip().lower()
    choices = DEVICE_HELP if allow_auto else DEVICE_HELP.replace("auto (cuda if available) | ", "")
    if text == "auto" and allow_auto:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise SasaError(f"unknown device {name!r} (choose from {choices})") from None
    if dev.type not in ("cpu", "cuda"):
        raise SasaError(f"unsupported device {name!r} (choose from {choices})")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = f"CUDA {torch.version.cuda}" if torch.version.cuda else "no CUDA"
            raise SasaError(
                f"--device {name}: CUDA is not available on this machine "
                f"(torch {torch.__version__}, built with {built}, no GPU visible); use --device cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SasaError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    return dev


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model (/proc/cpuinfo, else platform's answer)."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def resolve_precision(requested: str | None, device: torch.device | str = "cpu", warn: bool = True) -> str:
    """``auto``/``None`` -> bf16 where native, else fp32; an explicit choice is kept (bf16 on a
    host without native bf16 warns once, in one line, that it will be slow)."""
    device = torch.device(device)
    if requested in (None, "auto"):
        return "bf16" if native_bf16(device) else "fp32"
    if requested == "bf16" and warn and not native_bf16(device):
        warnings.warn(
            f"bf16 forced on a {device.type} without native bf16 ({cpu_model()}, {aten_capability()}): "
            "convolutions take a slow path; --precision auto picks fp32 here",
            stacklevel=2,
        )
    return requested


def host_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Everything a result needs to say where it was measured: CPU model and ISA, GPU, versions."""
    device = torch.device(device)
    gpu = None
    if device.type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(device)
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_isa": aten_capability(),
        "native_bf16": native_bf16(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
    }
    try:
        info["kernel_isa"] = kernel_isa()  # what the C++ kernels are (or will be) built for
    except Exception as e:  # noqa: BLE001 - an unrunnable request is reported, not fatal here
        info["kernel_isa"] = f"invalid ({e})"
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    if limit:
        info["onednn_max_cpu_isa"] = limit
    return info
