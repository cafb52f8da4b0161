"""The `sasa-bench` command line: one Typer app, one small module per command.

Every user mistake (a :class:`SasaError` or a usage error) becomes one line on stderr and exit
code 2, never a traceback.
"""

import sys
import warnings

import typer

from sasa_bench.cli import ablate as ablate_cmd
from sasa_bench.cli import bench_layer as bench_layer_cmd
from sasa_bench.cli import flops as flops_cmd
from sasa_bench.cli import latency as latency_cmd
from sasa_bench.cli import report as report_cmd
from sasa_bench.cli import train as train_cmd
from sasa_bench.errors import SasaError

app = typer.Typer(
    name="sasa-bench",
    help="Build, count, time, train and ablate Stand-Alone Self-Attention ResNets (Ramachandran et al. 2019).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

app.command("flops")(flops_cmd.flops)
app.command("models")(flops_cmd.models)
app.command("train")(train_cmd.train)
app.command("latency")(latency_cmd.latency)
app.command("bench-layer")(bench_layer_cmd.bench_layer)
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


def _fail(message: str) -> None:
    print(f"sasa-bench: error: {message}", file=sys.stderr)
    sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (also `python -m sasa_bench`, which torchrun uses).

    Typer itself reports usage errors (unknown flag, wrong type) with exit code 2; our own
    validation raises SasaError, reported here as one line with exit code 2.
    """
    # fvcore's import calls torch.jit.script, which recent torch flags as deprecated.
    warnings.filterwarnings("ignore", message=r"`torch\.jit", category=FutureWarning)
    try:
        app(args=argv)
    except SasaError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        print("sasa-bench: interrupted", file=sys.stderr)
        sys.exit(130)
