"""Build-on-first-use for the C++ CPU kernels (``sasa_bench/csrc``): compile once, cache, fall back.

The sources are real files shipped as package data; :func:`torch.utils.cpp_extension.load`
compiles them into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default
``~/.cache/torch_extensions``) under a name keyed by the sources, the kernel ISA and the torch
version, so a second process loads the binary in milliseconds and a changed source, ISA or torch
never picks up a stale one. The ISA (:func:`sasa_bench.hardware.kernel_isa`) is the host's best
unless ``SASA_BENCH_CPU_ISA`` asks for another:

- ``avx512``: ``-march=x86-64-v4`` (16 fp32 lanes), ``avx2``: ``-march=x86-64-v3`` (8 lanes, FMA),
- ``portable``: the baseline ISA (SSE2 on x86-64, NEON on aarch64) with GCC vector extensions.

A build (not a cache hit) announces itself once through :data:`BUILD_LISTENERS` (default: a
WARNING on the ``sasa_bench.kernels`` logger, which reaches stderr without any logging set up),
since it takes ~1 min on a 2-core machine. If it fails, one warning says so and callers use their
pure-PyTorch path.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

CSRC = Path(__file__).resolve().parent.parent / "csrc"
SOURCES = ("attention.cpp", "stem.cpp", "bindings.cpp")
HEADERS = ("simd.h", "kernels.h")
BUILD_MESSAGE = "building cpu kernel (first use, ~1 min)"
log = logging.getLogger("sasa_bench.kernels")

# Called with BUILD_MESSAGE (and the ISA) when a build, not a cache hit, starts. Empty: log it.
BUILD_LISTENERS: list[Callable[[str], None]] = []


def _announce(isa: str) -> None:
    msg = f"{BUILD_MESSAGE} [{isa}]"
    if BUILD_LISTENERS:
        for fn in BUILD_LISTENERS:
            fn(msg)
    else:
        log.warning(msg)


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


def isa_flags(isa: str) -> list[str]:
    """Compiler flags that select ``isa`` (see the module docstring)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if isa == "avx512":
        return ["-march=x86-64-v4", "-mtune=native"]
    if isa == "avx2":
        return ["-march=x86-64-v3", "-mtune=native"]
    return (["-march=x86-64", "-mtune=native"] if x86 else []) + ["-DSASA_ISA_PORTABLE"]


def _source_hash() -> str:
    h = hashlib.sha1()
    for name in (*SOURCES, *HEADERS):
        h.update((CSRC / name).read_bytes())
    return h.hexdigest()


class CpuExtension:
    """The kernels built for one ISA; ``module`` is None (and ``failed`` says why) if unbuildable."""

    def __init__(self, isa: str) -> None:
        self.isa = isa
        self.module: ModuleType | None = None
        self.failed: str | None = None
        self.build_seconds: float | None = None  # wall time of the load (build or cache hit)
        self.built_now = False  # True if this process compiled it (not a cache hit)

    def cflags(self) -> list[str]:
        return ["-O3", "-fopenmp", "-ffp-contract=fast", *isa_flags(self.isa)]

    def name(self) -> str:
        key = "|".join([_source_hash(), self.isa, *self.cflags(), torch.__version__])
        return f"sasa_cpu_{self.isa}_{hashlib.sha1(key.encode()).hexdigest()[:10]}"

    def is_available(self) -> bool:
        """Cheap probe (no build): built already, or a compiler is on PATH and no build failed."""
        if self.module is not None:
            return True
        return self.failed is None and shutil.which(_compiler()) is not None

    def load(self, fallback: str = "the PyTorch path") -> ModuleType | None:
        if self.module is not None or self.failed is not None:
            return self.module
        t0 = time.perf_counter()
        from sasa_bench.hardware import kernel_isa_supported

        problem = kernel_isa_supported(self.isa)
        if problem is not None:
            self.failed = f"{self.isa}: {problem}"
        elif shutil.which(_compiler()) is None:
            self.failed = f"no C++ compiler ({_compiler()}) found"
        else:
            try:
                self.module = self._build()
            except Exception as e:  # noqa: BLE001 - any build failure means "unavailable"
                msg = str(e).strip()
                self.failed = f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
        if self.failed is not None:
            warnings.warn(f"sasa_bench: C++ CPU kernels unavailable ({self.failed}); using {fallback}", stacklevel=3)
            return None
        self.build_seconds = time.perf_counter() - t0
        return self.module

    def _build(self) -> ModuleType:
        # importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not ours
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import _get_build_directory, load
        finally:
            cpp_log.setLevel(level)
        name = self.name()
        build_dir = Path(_get_build_directory(name, verbose=False))
        self.built_now = not (build_dir / f"{name}.so").exists()
        if self.built_now:
            _announce(self.isa)
        return load(
            name=name,
            sources=[str(CSRC / s) for s in SOURCES],
            extra_include_paths=[str(CSRC)],
            extra_cflags=self.cflags(),
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )


_EXTENSIONS: dict[str, CpuExtension] = {}


def extension(isa: str | None = None) -> CpuExtension:
    """The extension for ``isa`` (default: :func:`sasa_bench.hardware.kernel_isa`), one per process."""
    if isa is None:
        from sasa_bench.errors import SasaError
        from sasa_bench.hardware import kernel_isa

        try:
            isa = kernel_isa()
        except SasaError as e:  # an unrunnable SASA_BENCH_CPU_ISA: unavailable, with the reason
            ext = _EXTENSIONS.setdefault("invalid", CpuExtension("invalid"))
            ext.failed = str(e)
            return ext
    return _EXTENSIONS.setdefault(isa, CpuExtension(isa))


def load(isa: str | None = None, fallback: str = "the PyTorch path") -> ModuleType | None:
    """Build or load the kernels (for ``isa``, default the host's); None if they cannot be."""
    return extension(isa).load(fallback)
