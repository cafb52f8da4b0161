"""Attention backends by name: which exist, which run here, which ``auto`` picks.

A backend is a function with the signature of
:func:`sasa_bench.kernels.reference.local_attention_reference`; through the registry it receives
both relative embeddings or neither. Fast backends register
themselves in :mod:`sasa_bench.kernels` with an availability probe and the device types they
serve; ``auto`` picks the first available backend in ``AUTO_ORDER`` for the tensor's device.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass

from sasa_bench.errors import SasaError

AttentionFn = Callable[..., "object"]


@dataclass(frozen=True)
class Backend:
    name: str
    fn: AttentionFn
    devices: tuple[str, ...]  # torch device types it runs on: "cpu", "cuda"
    is_available: Callable[[], bool]
    description: str
    # Optional: build/compile now (outside any timing); returns the seconds it took, or None.
    warm_up: Callable[[], float | None] | None = None


_BACKENDS: dict[str, Backend] = {}
# Preference for ``auto``, fastest first; filled by the modules that register fast backends.
AUTO_ORDER: dict[str, list[str]] = {"cpu": [], "cuda": []}


def _rel_pair(fn: AttentionFn) -> AttentionFn:
    """``fn`` with the relative embeddings normalised once for every backend: q.r needs both
    halves, so a single one given means no relative term at all."""

    @functools.wraps(fn)
    def call(q, k, v, rel_row, rel_col, kernel_size, mask_border=True):  # noqa: ANN001, ANN202
        if rel_row is None or rel_col is None:
            rel_row = rel_col = None
        return fn(q, k, v, rel_row, rel_col, kernel_size, mask_border)

    return call


def register_backend(backend: Backend, auto_rank: dict[str, int] | None = None) -> None:
    """Add a backend; ``auto_rank`` maps device type -> position in that device's auto order.
    Its function is stored wrapped by :func:`_rel_pair`, so backends may assume both or no
    relative embeddings."""
    _BACKENDS[backend.name] = dataclasses.replace(backend, fn=_rel_pair(backend.fn))
    for dev, pos in (auto_rank or {}).items():
        order = AUTO_ORDER.setdefault(dev, [])
        if backend.name not in order:
            order.insert(pos, backend.name)


def all_backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def available_backends(device: str | None = None) -> list[str]:
    """Names usable on this machine (optionally: on this device type), plus ``auto``."""
    names = [
        b.name
        for b in _BACKENDS.values()
        if (device is None or device in b.devices) and b.is_available()
    ]
    return ["auto", *names]


def check_backend_name(name: str) -> str:
    if name != "auto" and name not in _BACKENDS:
        known = ", ".join(["auto", *_BACKENDS])
        raise SasaError(f"unknown attention backend {name!r} (known: {known})")
    return name


def resolve_backend(name: str, device_type: str) -> Backend:
    """The backend that runs ``name`` on ``device_type``; ``auto`` = fastest available exact one."""
    check_backend_name(name)
    if name == "auto":
        for cand in AUTO_ORDER.get(device_type, []):
            b = _BACKENDS[cand]
            if device_type in b.devices and b.is_available():
                return b
        return _BACKENDS["reference"]
    b = _BACKENDS[name]
    if device_type not in b.devices or not b.is_available():
        raise SasaError(f"attention backend {name!r} cannot run on {device_type} on this machine")
    return b


def backend_that_runs(name: str, device_type: str) -> str:
    """The backend that actually runs ``name`` on ``device_type``: built first (a lazy C++ build
    happens here, outside any timing), and ``shift`` if that build failed, since the fast
    backends fall back to it."""
    b = resolve_backend(name, device_type)
    if b.warm_up is not None:
        b.warm_up()
    return b.name if b.is_available() else "shift"


def kernel_facts() -> dict[str, str | None]:
    """What the results must say about the CPU kernels: the ISA the loaded C++ kernel was built for
    (None if it was never loaded), beside the host's CPU model and PyTorch's own ISA."""
    from sasa_bench import hardware
    from sasa_bench.kernels import cpp_build

    ext = cpp_build.extension()
    return {
        "cpu": hardware.cpu_model(),
        "aten_isa": hardware.aten_capability(),
        "kernel_isa": ext.module.isa() if ext.module is not None else None,
    }
