"""Install anywhere: the wheel carries the studies (and kernel sources), and the declared
dependencies are exactly the third-party modules the package imports."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# import name -> distribution name, where they differ
DIST_NAMES = {"yaml": "pyyaml", "PIL": "pillow"}
# shipped by torch itself where it works (CUDA wheels carry triton); imported lazily, never declared
PROVIDED_BY_TORCH = {"triton"}


def test_listed_packages_are_the_package_folders() -> None:
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = {
        ".".join(p.relative_to(ROOT).parts[:-1])
        for p in (ROOT / "sasa_bench").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert listed - {"sasa_bench.ablations", "sasa_bench.csrc"} == found  # the two data packages
    assert PYPROJECT["tool"]["setuptools"]["package-dir"]["sasa_bench.ablations"] == "ablations"


def _third_party_imports() -> set[str]:
    stdlib = set(sys.stdlib_module_names)
    names: set[str] = set()
    for path in (ROOT / "sasa_bench").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return {n for n in names if n not in stdlib and n != "sasa_bench" and n not in PROVIDED_BY_TORCH}


def _requirement_names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_dependencies_are_what_is_imported() -> None:
    project = PYPROJECT["project"]
    required = _requirement_names(project["dependencies"])
    optional = set().union(*(_requirement_names(v) for v in project.get("optional-dependencies", {}).values()))
    imported = {DIST_NAMES.get(n, n).lower() for n in _third_party_imports()}
    # every import is declared (optional ones are imported lazily, behind a clear error)
    assert imported <= required | optional, f"imported but not declared: {sorted(imported - required - optional)}"
    # every hard dependency is imported (torch's own triton is optional and imported lazily)
    assert required <= imported, f"declared but never imported: {sorted(required - imported)}"


@pytest.mark.slow
def test_wheel_ships_studies_and_lists_them_outside_the_checkout(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(wheels)],
        check=True, capture_output=True,
    )
    (wheel,) = wheels.glob("sasa_bench-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    studies = sorted(p.stem for p in (ROOT / "ablations").glob("*.toml"))
    assert sorted(Path(n).stem for n in names if n.startswith("sasa_bench/ablations/") and n.endswith(".toml")) == studies
    assert any(n.startswith("sasa_bench/csrc/") for n in names), "kernel sources missing from the wheel"

    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True, capture_output=True,
    )
    env = {k: v for k, v in os.environ.items() if k != "SASA_BENCH_STUDIES"}
    env["PYTHONPATH"] = str(target)
    code = "import sasa_bench, sys; print(sasa_bench.__file__); from sasa_bench.cli.app import main; main(['ablate', '--list'])"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, *lines = out.stdout.splitlines()
    assert first.startswith(str(target)), f"imported the checkout, not the installed copy: {first}"
    assert sorted(line.split()[0] for line in lines if line.strip()) == studies


def test_lower_layers_never_import_the_cli() -> None:
    """Layering: the library (measure/, studies/, train/, ...) reports through callbacks and
    never imports from cli/ (only the cli itself and `python -m sasa_bench` do)."""
    pkg = Path(__file__).resolve().parents[1] / "sasa_bench"
    offenders = []
    for path in pkg.rglob("*.py"):
        rel = path.relative_to(pkg)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{rel}: {n}" for n in names if n == "sasa_bench.cli" or n.startswith("sasa_bench.cli.")]
    assert not offenders, offenders
