"""Progress that a user can see on a terminal and off it, built once for every long command.

The library reports progress through callbacks (``ProgressFn(message, done, total)`` and
``LogFn(message)``) and never imports from ``cli/``; this module holds the two renderings those
callbacks end in: rich bars with ETA on a terminal, and plain, timestamped lines on stderr
otherwise, at least every :data:`QUIET_S` seconds, so a piped or logged run (``make demo |
tee``, CI, a cluster job) never goes quiet for long.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape

ProgressFn = Callable[[str, int, int], None]  # (message, done, total)
LogFn = Callable[[str], None]

QUIET_S = 20.0  # off a terminal, a plain progress line at least this often while work advances

err_console = Console(stderr=True)  # logs and progress go to stderr, so stdout carries only data


def fmt_duration(s: float) -> str:
    s = int(max(0.0, s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plain_line(message: str, prefix: str = "") -> None:
    print(f"{time.strftime('%H:%M:%S')} {prefix}{message}", file=sys.stderr, flush=True)


def rich_bars(with_info: bool, transient: bool = False, eta: bool = True) -> Any:
    """The one rich display (entered): description, bar, done/total, [info], elapsed[, ETA].
    ``transient`` bars vanish when done (a single command's steps); others stay (a study, a run)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    info = (TextColumn("{task.fields[info]}"),) if with_info else ()
    left = (TextColumn("eta"), TimeRemainingColumn()) if eta else ()
    bar = RichProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), *info,
        TimeElapsedColumn(), *left, console=err_console, transient=transient,
    )
    bar.__enter__()
    return bar


@contextmanager
def step_progress(first: str) -> Iterator[ProgressFn]:
    """A transient bar on stderr for one command's steps (latency, bench-layer, flops); yields
    the ``progress(message, done, total)`` callback the measurement APIs report through. Off a
    terminal: plain lines, at least every :data:`QUIET_S` seconds."""
    if not err_console.is_terminal:
        plain = PlainProgress()
        plain(first, 0, 0)
        yield plain
        return
    bar = rich_bars(with_info=False, transient=True, eta=False)
    try:
        task = bar.add_task(escape(first), total=None)

        def progress(message: str, done: int, total: int) -> None:
            bar.update(task, description=escape(message), completed=done, total=total)

        yield progress
    finally:
        bar.__exit__(None, None, None)


class Eta:
    """Rate and time left from the steps done since :meth:`start` (resumed runs start late)."""

    def __init__(self) -> None:
        self.start()

    def start(self, done: int = 0) -> None:
        self.t0, self.done0 = time.perf_counter(), done

    def left(self, done: int, total: int) -> float | None:
        n = done - self.done0
        if n <= 0 or total <= 0:
            return None
        return (total - done) * (time.perf_counter() - self.t0) / n


class PlainProgress:
    """A ``ProgressFn`` that prints a line when the message is new-ish: on the first and last
    call, and otherwise at most every ``every`` seconds, with done/total and ETA."""

    def __init__(self, prefix: str = "", every: float = QUIET_S) -> None:
        self.prefix, self.every = prefix, every
        self.last = -float("inf")
        self.eta = Eta()

    def __call__(self, message: str, done: int, total: int) -> None:
        now = time.perf_counter()
        if done <= 0:
            self.eta.start(max(done, 0))
        final = total > 0 and done >= total
        if not final and now - self.last < self.every and done > 0:
            return
        self.last = now
        tail = ""
        if total > 0 and done >= 0:
            left = self.eta.left(done, total)
            tail = f" [{done}/{total}" + (f", eta {fmt_duration(left)}]" if left is not None else "]")
        plain_line(f"{message}{tail}", self.prefix)


class TrainProgress:
    """The training loop's reporter: its own rich bars (total + epoch) on a terminal, plain lines
    off it; or, given ``on_step``/``on_log`` callbacks (a study drawing one bar for all its
    units), only those. ``enabled=False`` silences everything (non-zero ranks)."""

    def __init__(
        self,
        enabled: bool,
        total_steps: int,
        spe: int,
        log_every: int | None = None,
        on_step: ProgressFn | None = None,
        on_log: LogFn | None = None,
    ) -> None:
        self.enabled, self.total, self.spe = enabled, total_steps, spe
        self.on_step, self.on_log = on_step, on_log
        self.rich = enabled and on_step is None and err_console.is_terminal
        self.log_every = log_every
        self.plain = PlainProgress("[train] ")
        self.eta = Eta()
        self.bar: Any = None

    def __enter__(self) -> TrainProgress:
        if self.rich:
            self.bar = rich_bars(with_info=True)
            self.task_all = self.bar.add_task("total", total=self.total, info="")
            self.task_ep = self.bar.add_task("epoch", total=self.spe, info="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def start(self, step: int) -> None:
        self.eta.start(step)
        self.plain.eta.start(step)
        if self.bar is not None:
            self.bar.update(self.task_all, completed=step)

    def epoch(self, epoch: int, epochs: int, step_in_epoch: int, steps_this_epoch: int) -> None:
        if self.bar is not None:
            self.bar.reset(self.task_ep, total=steps_this_epoch, completed=step_in_epoch,
                           description=f"epoch {epoch + 1}/{epochs}", info="")

    def step(self, step: int, step_in_epoch: int, loss: float, lr: float, img_s: float) -> None:
        if not self.enabled:
            return
        info = f"loss {loss:.4f} lr {lr:.4g} {img_s:.0f} img/s"
        if self.bar is not None:
            self.bar.update(self.task_ep, completed=step_in_epoch, info=info)
            self.bar.update(self.task_all, completed=step, info="")
        elif self.on_step is not None:  # the caller's display adds done/total and the ETA
            self.on_step(f"training: {info}", step, self.total)
        elif self.log_every and step_in_epoch % self.log_every == 0:
            self.plain.last = -float("inf")  # an explicit --log-every prints every N steps
            self.plain(f"step {step} {info}", step, self.total)
        elif not self.log_every:
            self.plain(f"step {step} {info}", step, self.total)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self.on_log is not None:
            self.on_log(msg)
        elif self.bar is not None:
            self.bar.console.print(escape(msg), highlight=False)
        else:
            print(f"[train] {msg}", file=sys.stderr, flush=True)


class StudyDisplay:
    """One display for a whole study: a units bar and a bar for the current unit's steps
    (latency timing, training) on a terminal; off it, a line per unit and a step line at least
    every :data:`QUIET_S` seconds. Use as a context manager; pass :attr:`progress`,
    :attr:`log` and :attr:`step` to ``run_study``."""

    def __init__(self, name: str, total: int) -> None:
        self.name, self.total = name, total
        self.rich = err_console.is_terminal
        self.bar: Any = None
        self._units = PlainProgress(f"{name}: ", every=0.0)
        self._steps = PlainProgress("  ")
        self._eta = Eta()

    def __enter__(self) -> StudyDisplay:
        if self.rich:
            self.bar = rich_bars(with_info=False)
            self.task_units = self.bar.add_task(escape(self.name), total=self.total)
            self.task_steps = self.bar.add_task("", total=None, visible=False)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def progress(self, message: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task_units, completed=done, description=escape(f"{self.name}: {message}"))
            self.bar.update(self.task_steps, visible=False)
        else:
            self._units(message, done, total)

    def step(self, message: str, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task_steps, description=escape(f"  {message}"), completed=max(done, 0),
                            total=total if total > 0 else None, visible=True)
        else:
            self._steps(message, done, total)

    def log(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        if self.bar is not None:
            self.bar.console.print(f"[dim]{line[:8]}[/]{escape(line[8:])}", highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)
