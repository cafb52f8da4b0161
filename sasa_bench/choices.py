"""Every fixed choice set, defined once, as a ``str`` Enum.

The layers, :mod:`sasa_bench.spec`, :mod:`sasa_bench.measure` and the CLI all take these. Typer
turns an Enum-typed option into a validated choice (a bad value is one line listing the choices,
exit 2), completes it in the shell and lists it in ``--help``; Python callers may pass the Enum
member or its string value, and everything stored (ModelSpec fields, result files) holds the
plain string, so JSON and result keys are unchanged.

Not here: the attention backends (``sasa_bench.kernels.registry``: a registry of what is
installed, not a fixed set) and devices (``cuda:N`` is open-ended: one parser,
:func:`sasa_bench.hardware.parse_device`; :data:`DEVICE_HELP` says what it takes).
"""

from __future__ import annotations

from enum import Enum
from typing import Any

from sasa_bench.errors import SasaError


class Choice(str, Enum):
    """A choice set: members compare equal to their string values (``Pos.RELATIVE == "relative"``)."""

    def __str__(self) -> str:
        return str(self.value)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def check(cls, value: Any, what: str) -> str:
        """``value`` (a member or its string) as the plain string; else one line with the choices."""
        if isinstance(value, cls):
            return value.value
        if isinstance(value, str) and value in cls.values():
            return value
        raise SasaError(f"unknown {what} {value!r} (choose from {', '.join(cls.values())})")


class Pos(Choice):
    """Positional term of the logits (Table 5)."""

    RELATIVE = "relative"
    ABSOLUTE = "absolute"
    NONE = "none"


class Logits(Choice):
    """Logit terms (Table 6): q.k + q.r, or q.r alone (W_K dropped)."""

    QK_QR = "qk+qr"
    QR = "qr"


class Border(Choice):
    """Window positions outside the image: masked out of the softmax, or zero keys/values."""

    MASK = "mask"
    ZEROS = "zeros"


class Scale(Choice):
    """Logit scaling: none (the paper's equation) or 1/sqrt(d)."""

    NONE = "none"
    RSQRT = "rsqrt"


class Stem(Choice):
    """The network's stem (Table 7): torchvision's conv stem or the paper's attention stems."""

    CONV = "conv"
    ATTENTION = "attention"
    ATTENTION_PLAIN = "attention-plain"
    ATTENTION_CONV_VALUES = "attention-conv-values"


class Precision(Choice):
    """Arithmetic precision; ``auto`` = bf16 where the device computes it natively, else fp32."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class Format(Choice):
    """Output of a command: a rich table, or JSON / CSV on stdout for machines."""

    TABLE = "table"
    JSON = "json"
    CSV = "csv"


DEVICE_HELP = "auto (cuda if available) | cpu | cuda | cuda:N"
DEVICE_COMPLETIONS = ("auto", "cpu", "cuda")


def plain(value: Any) -> Any:
    """A Choice member as its string value; anything else unchanged."""
    return value.value if isinstance(value, Choice) else value
