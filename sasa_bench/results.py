"""The results folder as one pandas DataFrame: one row per valid result file, flat columns.

    >>> import sasa_bench.results as R
    >>> df = R.load("results")                      # every study result
    >>> df.groupby(["study", "variant"])["training.top1"].agg(["mean", "std", "count"])

Columns are the result file's fields flattened with dots (``spec.kernel_size``,
``flops.gflops``, ``latency.time_ratio``, ``training.top1``, ``env.cpu_isa``, ``paper.top1``,
...), plus ``path`` (the file) and a few conveniences computed once here:

* ``model`` (``spec.name``), ``family`` (``conv`` | ``convstem`` | ``full``: which kind of
  network, the colour of every figure), ``attention_groups`` as text (``"1,2,3,4"``, ``"none"``);
* ``top1`` / ``top5`` / ``recipe`` / ``dataset`` of the training, when there is one.

A file that does not parse or validate is not a row: :func:`load_with_problems` returns those
too, each with its reason (the report lists them; nothing is dropped silently).
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from sasa_bench.store import Problem, scan

# One colour per family across every figure: ours (conv, convstem, full) and timm's peers.
FAMILIES = ("conv", "convstem", "full", "halonet", "botnet", "lambda", "swin", "timm")


def family_of(spec: dict[str, Any] | None) -> str | None:
    """conv (no attention anywhere), convstem (attention groups, conv stem) or full (attention
    stem); a timm model: its peer family (halonet, botnet, lambda, swin; conv for a ResNet)."""
    if not spec:
        return None
    if spec.get("timm"):
        from sasa_bench.models.timm_models import family

        return family(spec["timm"])
    if str(spec.get("stem", "conv")).startswith("attention"):
        return "full"
    return "convstem" if spec.get("attention_groups") else "conv"


def _groups_text(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) or "none"
    return v


def frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """Records (as read by :func:`sasa_bench.store.scan`) -> the flat frame described above."""
    if not records:
        return pd.DataFrame(columns=["path", "study", "variant", "seed", "train", "model", "family"])
    rows = []
    for rec in records:
        rec = dict(rec)
        path = rec.pop("_path", None)
        rows.append({"path": path, **rec})
    df = pd.json_normalize(rows, sep=".", max_level=2)
    specs = [r.get("spec") for r in records]
    df["model"] = [s.get("name") if s else None for s in specs]
    df["family"] = [family_of(s) for s in specs]
    for col in [c for c in df.columns if c.endswith("attention_groups")]:
        df[col] = df[col].map(_groups_text)
    if "spec.attention_groups" in df:
        df["attention_groups"] = df["spec.attention_groups"]
    trainings = [r.get("training") or {} for r in records]
    df["top1"] = [t.get("top1") for t in trainings]
    df["top5"] = [t.get("top5") for t in trainings]
    df["recipe"] = [t.get("recipe") for t in trainings]
    df["dataset"] = [t.get("dataset") for t in trainings]
    return df


def load_with_problems(results_dir: str | os.PathLike[str], kind: str | None = None) -> tuple[pd.DataFrame, list[Problem]]:
    """(frame of every valid result file, the files that are not, with their reasons)."""
    records, problems = scan(results_dir, kind)
    return frame(records), problems


def load(results_dir: str | os.PathLike[str], kind: str | None = None) -> pd.DataFrame:
    """One row per valid result file under ``results_dir`` (of one ``kind`` folder, or all)."""
    return load_with_problems(results_dir, kind)[0]
