"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

``checkpoint.pt`` holds the model, optimiser, LR scheduler, grad scaler and EMA states, the
position (global step, epoch, next step within the epoch, the epoch's running loss), the
metrics rows so far, the RNG states (python, numpy, torch, cuda) and the resolved config. It is
written through a temp file + rename (a ``kill -9`` leaves the previous checkpoint intact) and
read with ``weights_only=True`` (plain tensors and containers only).
"""

from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sasa_bench.errors import SasaError
from sasa_bench.store import atomic_torch_save

FORMAT = 1
NAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, state: dict[str, Any]) -> Path:
    return atomic_torch_save({"format": FORMAT, **state, "rng": rng_state()}, path)


def load(path: Path) -> dict[str, Any]:
    """A checkpoint's contents; a missing, corrupt or foreign file is one SasaError line."""
    path = Path(path)
    if not path.is_file():
        raise SasaError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SasaError(f"corrupt checkpoint {path}: {first[:200]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "model" not in state:
        raise SasaError(f"{path} is not a sasa-bench checkpoint (format {FORMAT})")
    return state


def resolve_resume(resume: str | None, out_dir: Path) -> Path | None:
    """``auto`` -> ``out_dir/checkpoint.pt`` if it exists; a path -> that file (must exist)."""
    if not resume:
        return None
    if resume == "auto":
        p = out_dir / NAME
        return p if p.is_file() else None
    p = Path(resume)
    if p.is_dir():
        p = p / NAME
    if not p.is_file():
        raise SasaError(f"no checkpoint at {p} (use --resume auto to start fresh when none exists)")
    return p


class ResumeMismatch(SasaError):
    """A resumed run was asked to continue with other settings than it was started with."""


# Settings a resumed run can never change, even with --resume-override: the data order and the
# position within an epoch depend on them (the model is checked separately).
FIXED_ON_RESUME = ("data", "batch_size", "seed", "synthetic_train", "train_images", "holdout")


def config_changes(saved: dict[str, Any], now: dict[str, Any], neutral: frozenset[str] | set[str]) -> dict[str, tuple[Any, Any]]:
    """The training-altering settings that differ: name -> (saved, now). A setting the saved
    config lacks (added in a later version) counts as its value now when that is the default None."""
    out = {}
    for k in sorted(set(saved) | set(now)):
        if k in neutral or k in ("model", "config_history"):
            continue
        a, b = saved.get(k), now.get(k)
        if a != b:
            out[k] = (a, b)
    return out


def check_compatible(
    state: dict[str, Any],
    spec_dict: dict[str, Any],
    cfg_dict: dict[str, Any],
    path: Path,
    neutral: frozenset[str] | set[str] = frozenset(),
    override: bool = False,
) -> dict[str, tuple[Any, Any]]:
    """Refuse to continue a run with a different network, or with training settings that differ
    from the checkpoint's (``override``: accept them, except :data:`FIXED_ON_RESUME`).
    Returns the accepted changes (name -> (old, new))."""
    saved_spec = {k: v for k, v in state.get("spec", {}).items() if k not in ("backend", "name")}
    now_spec = {k: v for k, v in spec_dict.items() if k not in ("backend", "name")}
    if saved_spec != now_spec:
        diff = sorted(k for k in set(saved_spec) | set(now_spec) if saved_spec.get(k) != now_spec.get(k))
        raise ResumeMismatch(f"checkpoint {path} is for a different model (differs in: {', '.join(diff)})")
    changes = config_changes(state.get("config", {}), cfg_dict, neutral)
    if not changes:
        return {}
    words = ", ".join(f"{k.replace('_', ' ')} {a!r} -> {b!r}" for k, (a, b) in changes.items())
    fixed = [k for k in changes if k in FIXED_ON_RESUME]
    if fixed:
        raise ResumeMismatch(
            f"checkpoint {path} was made with other settings ({words}); "
            f"{', '.join(k.replace('_', ' ') for k in fixed)} cannot change in a resumed run: use another --out"
        )
    if not override:
        raise ResumeMismatch(
            f"checkpoint {path} was made with other training settings ({words}); rerun with the same "
            "settings, or add --resume-override to continue with the new ones (recorded in config.yaml)"
        )
    return changes
