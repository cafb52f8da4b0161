"""The `sasa-bench` command line: one Typer app, one small module per command.

Every user mistake (a :class:`SasaError` or a usage error) becomes one line on stderr and exit
code 2, never a traceback; an OS error (disk full, no permission, a file where a folder should
be) is one line naming the path (exit 1 for a full disk, else 2). SIGINT/SIGTERM let the current
atomic write finish, then exit 130 saying how to resume.
"""

import errno
import signal
import sys
import warnings
from typing import Annotated

import typer
from typer._click.exceptions import ClickException, NoArgsIsHelpError

from sasa_bench.cli import ablate as ablate_cmd
from sasa_bench.cli import bench_data as bench_data_cmd
from sasa_bench.cli import bench_layer as bench_layer_cmd
from sasa_bench.cli import eval as eval_cmd
from sasa_bench.cli import flops as flops_cmd
from sasa_bench.cli import latency as latency_cmd
from sasa_bench.cli import report as report_cmd
from sasa_bench.cli import train as train_cmd
from sasa_bench.errors import SasaError

app = typer.Typer(
    name="sasa-bench",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _version(value: bool) -> None:
    if value:
        from sasa_bench import __version__

        print(f"sasa-bench {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", callback=_version, is_eager=True)] = False,
) -> None:
    """Build, count, time, train and ablate Stand-Alone Self-Attention ResNets (Ramachandran et al. 2019)."""


app.command("flops")(flops_cmd.flops)
app.command("models")(flops_cmd.models)
app.command("train")(train_cmd.train)
app.command("eval")(eval_cmd.eval_checkpoint)
app.command("latency")(latency_cmd.latency)
app.command("bench-layer")(bench_layer_cmd.bench_layer)
app.command("bench-data")(bench_data_cmd.bench_data)
app.command("ablate")(ablate_cmd.ablate)
app.command("report")(report_cmd.report)


@app.command("backends")
def backends() -> None:
    """List the attention backends usable on this machine (``auto`` picks the fastest exact one)."""
    import torch

    from sasa_bench.kernels import resolve_backend
    from sasa_bench.kernels.registry import all_backends

    for name, b in all_backends().items():
        usable = ", ".join(d for d in b.devices if b.is_available() and (d == "cpu" or torch.cuda.is_available()))
        print(f"{name:12s} {usable or 'unavailable':12s} {b.description}")
    devices = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
    print("auto         " + ", ".join(f"{d} -> {resolve_backend('auto', d).name}" for d in devices))


def _fail(message: str, code: int = 2) -> None:
    print(f"sasa-bench: error: {message}", file=sys.stderr)
    sys.exit(code)


class Interrupted(BaseException):
    """SIGINT/SIGTERM (not a KeyboardInterrupt: Typer would turn that into a silent exit 130)."""


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(signum)


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def os_error_line(e: OSError) -> str:
    """One line for an OS error, naming the path: 'no space left on device: results/x.json'."""
    what = (e.strerror or str(e)).lower()
    if e.errno == errno.EEXIST or e.errno == errno.ENOTDIR:
        what = f"{what} (a file is where a folder should be)"
    return f"{what}: {e.filename}" if e.filename else what


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001
    """Warnings as one line a user reads (`sasa-bench: warning: ...`), not Python's two-line
    source dump; ours (precision, kernel fallbacks) are written to be read that way."""
    return f"sasa-bench: warning: {str(message).splitlines()[0] if str(message) else category.__name__}\n"


def main(argv: list[str] | None = None) -> None:
    """Console entry point (also `python -m sasa_bench`, which torchrun uses).

    Usage errors (unknown flag, wrong type) and our own validation (SasaError) become one line
    on stderr and exit code 2.
    """
    # fvcore's import calls torch.jit.script, which recent torch flags as deprecated.
    warnings.filterwarnings("ignore", message=r"`torch\.jit", category=FutureWarning)
    warnings.formatwarning = _one_line_warning
    old = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for sig in old:
            signal.signal(sig, _interrupt)
    except ValueError:  # not the main thread (embedded use): keep the handlers as they are
        old = {}
    try:
        code = app(args=argv, standalone_mode=False)
    except NoArgsIsHelpError as e:
        e.show()
        sys.exit(0)
    except ClickException as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
        _fail(" ".join(e.format_message().split()) + hint, e.exit_code)
    except SasaError as e:
        _fail(str(e))
    except OSError as e:
        _fail(os_error_line(e), 1 if e.errno in _DISK_FULL else 2)
    except (KeyboardInterrupt, Interrupted):
        print("sasa-bench: interrupted; rerun the same command to resume", file=sys.stderr)
        sys.exit(130)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
    sys.exit(code if isinstance(code, int) else 0)
