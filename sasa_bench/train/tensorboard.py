"""TensorBoard event files for a run: the scalars of ``metrics.csv`` plus per-step curves.

Optional (``pip install 'sasa-bench[tensorboard]'``): on by default when the ``tensorboard``
package is installed, off otherwise; ``--tensorboard`` without it is one error line. Events go to
``OUT/tensorboard/`` (rank 0 only), written through ``torch.utils.tensorboard.SummaryWriter``.
Tags: every numeric ``metrics.csv`` column under ``epoch/<column>`` at the row's global step
(so ``epoch/eval_top1`` holds the same numbers as the CSV), and ``step/loss``, ``step/lr``,
``step/images_per_s`` at every optimiser step. A resumed run purges the events written after its
checkpoint's step, and a fresh run in a reused directory all earlier ones (``purge_step``), so
the curves have no doubled segment.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from sasa_bench.errors import SasaError

SUBDIR = "tensorboard"
INSTALL_HINT = "pip install 'sasa-bench[tensorboard]'"


def available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


def enabled(requested: bool | None) -> bool:
    """``None`` (not given): on when the package is installed; ``True`` without it: an error."""
    if requested is None:
        return available()
    if requested and not available():
        raise SasaError(f"--tensorboard needs the tensorboard package ({INSTALL_HINT}), or use --no-tensorboard")
    return requested


class TensorBoardLog:
    """A SummaryWriter under ``out_dir/tensorboard``; every method is a no-op once closed."""

    def __init__(self, out_dir: Path, purge_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = Path(out_dir) / SUBDIR
        self.writer: Any = SummaryWriter(str(self.dir), purge_step=purge_step)

    def step(self, step: int, loss: float, lr: float, images_per_s: float) -> None:
        if self.writer is None:
            return
        self.writer.add_scalar("step/loss", loss, step)
        self.writer.add_scalar("step/lr", lr, step)
        self.writer.add_scalar("step/images_per_s", images_per_s, step)

    def row(self, row: dict[str, Any], columns: list[str]) -> None:
        """One ``metrics.csv`` row: its numeric columns at the row's step."""
        if self.writer is None:
            return
        for c in columns:
            v = row.get(c)
            if c not in ("epoch", "step") and isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"epoch/{c}", v, row["step"])
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class NoLog(TensorBoardLog):
    """TensorBoard off (or not rank 0): nothing is written."""

    def __init__(self) -> None:
        self.writer = None


def open_log(requested: bool | None, out_dir: Path, is_main: bool, resumed_at: int | None) -> TensorBoardLog:
    """The run's log (rank 0, when on). ``resumed_at``: the checkpoint's step (its events are
    kept, later ones dropped), or None for a fresh run (every earlier event dropped)."""
    on = enabled(requested)  # checked on every rank: the same error everywhere
    if not (on and is_main):
        return NoLog()
    return TensorBoardLog(out_dir, 0 if resumed_at is None else resumed_at + 1)
