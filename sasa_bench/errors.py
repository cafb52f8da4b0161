"""One exception type for every user-facing mistake, and the type checks every settings
dataclass shares.

The CLI turns a :class:`SasaError` into a single line on stderr and exit code 2, so any module
can reject bad input without knowing how it is reported.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any


class SasaError(ValueError):
    """Bad input from the user (options, files, data): reported as one line, exit code 2."""


# Annotation (as written, PEP 563 strings) -> accepted Python types; an int is a valid float.
_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
_WORDS = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false", "None": "unset"}


def check_types(obj: Any, what: str) -> None:
    """Every field of dataclass ``obj`` has its annotated type (config files and study ``set``
    tables can hold anything: ``epochs = true``, ``batch_size = "lots"``), and every number is
    finite. Fields with other annotations (tuples, dicts) are left to the caller."""
    for f in dataclasses.fields(obj):
        ann = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        parts = [p.strip() for p in ann.split("|")]
        if any(p not in _TYPES and p != "None" for p in parts):
            continue
        v = getattr(obj, f.name)
        name = f.name.replace("_", " ")
        if v is None:
            if "None" in parts:
                continue
        elif any(isinstance(v, _TYPES[p]) and (p == "bool" or not isinstance(v, bool)) for p in parts if p != "None"):
            if isinstance(v, float) and not math.isfinite(v):
                raise SasaError(f"{what} {name} must be a finite number, got {v}")
            continue
        want = " or ".join(_WORDS[p] for p in parts)
        raise SasaError(f"{what} {name} must be {want}, got {v!r}")
