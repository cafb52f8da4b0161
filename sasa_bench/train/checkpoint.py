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


def check_compatible(state: dict[str, Any], spec_dict: dict[str, Any], cfg_dict: dict[str, Any], path: Path) -> None:
    """Refuse to continue a run with a different network, data or schedule."""
    saved_spec = {k: v for k, v in state.get("spec", {}).items() if k not in ("backend", "name")}
    now_spec = {k: v for k, v in spec_dict.items() if k not in ("backend", "name")}
    if saved_spec != now_spec:
        diff = sorted(k for k in set(saved_spec) | set(now_spec) if saved_spec.get(k) != now_spec.get(k))
        raise SasaError(f"checkpoint {path} is for a different model (differs in: {', '.join(diff)})")
    saved_cfg = state.get("config", {})
    for key in ("data", "batch_size", "epochs", "seed", "warmup_epochs", "schedule", "synthetic_train"):
        if saved_cfg.get(key) != cfg_dict.get(key):
            raise SasaError(
                f"checkpoint {path} was made with {key}={saved_cfg.get(key)!r}, not {cfg_dict.get(key)!r}"
            )
