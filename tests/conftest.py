"""Shared fixtures: every test starts from the same random state; the C++ kernels are built once."""

import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session", autouse=True)
def cpu_kernels():  # noqa: ANN201
    """Build (or load from the cache) the host's C++ kernels before the first test, so a ~1 min
    first build is not charged to whichever test happens to touch a kernel first. The library
    announces a real build (not a cache hit); here that line goes straight to the terminal."""
    from sasa_bench.kernels import cpp_build

    def say(msg: str) -> None:
        print(msg, file=sys.__stderr__, flush=True)

    cpp_build.BUILD_LISTENERS.append(say)
    try:
        yield cpp_build.load(fallback="the PyTorch paths")
    finally:
        cpp_build.BUILD_LISTENERS.remove(say)
