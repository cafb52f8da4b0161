"""Build-on-first-use for the C++ CPU kernels: compile once, cache, fall back with one warning.

Each kernel module holds one :class:`InlineExtension`. The build goes through
:func:`torch.utils.cpp_extension.load_inline` into torch's extension cache, under a name keyed
by the source, the CPU's flags and the torch version, so a second process (or run) loads it in
milliseconds and a changed source or machine never picks up a stale binary.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import warnings
from types import ModuleType

import torch


def cpu_tag() -> str:
    """Hash of the CPU flags and torch version: binaries built with -march=native are not portable."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1((flags + torch.__version__).encode()).hexdigest()[:10]


def _compiler() -> str:
    return os.environ.get("CXX", "c++")


class InlineExtension:
    """A C++ extension compiled on first :meth:`load`; ``None`` (and one warning) if it cannot be."""

    def __init__(self, prefix: str, decls: str, source: str, functions: list[str], fallback: str) -> None:
        self.prefix, self.decls, self.source, self.functions = prefix, decls, source, functions
        self.fallback = fallback  # what runs instead, for the warning
        self.module: ModuleType | None = None
        self.failed: str | None = None
        self.build_seconds: float | None = None  # wall time of the load (build or cache hit)

    def is_available(self) -> bool:
        """Cheap probe (no build): built already, or a compiler is on PATH and no build failed."""
        if self.module is not None:
            return True
        return self.failed is None and shutil.which(_compiler()) is not None

    def load(self) -> ModuleType | None:
        if self.module is not None or self.failed is not None:
            return self.module
        t0 = time.perf_counter()
        if shutil.which(_compiler()) is None:
            self.failed = f"no C++ compiler ({_compiler()}) found"
        else:
            try:
                self.module = self._build()
            except Exception as e:  # noqa: BLE001 - any build failure means "unavailable"
                msg = str(e).strip()
                self.failed = f"{type(e).__name__}: {msg.splitlines()[-1] if msg else ''}"
        if self.failed is not None:
            warnings.warn(f"sasa_bench: {self.prefix} unavailable ({self.failed}); using {self.fallback}", stacklevel=3)
            return None
        self.build_seconds = time.perf_counter() - t0
        return self.module

    def _build(self) -> ModuleType:
        # importing cpp_extension logs "No CUDA runtime is found" on CPU-only machines: not ours
        cpp_log = logging.getLogger("torch.utils.cpp_extension")
        level = cpp_log.level
        cpp_log.setLevel(logging.ERROR)
        try:
            from torch.utils.cpp_extension import load_inline
        finally:
            cpp_log.setLevel(level)
        src_hash = hashlib.sha1(self.source.encode()).hexdigest()[:8]
        return load_inline(
            name=f"{self.prefix}_{src_hash}_{cpu_tag()}",
            cpp_sources=[self.decls, self.source],
            functions=self.functions,
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
