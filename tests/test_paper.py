"""report/paper.py holds exactly what the paper prints: checked cell by cell against the project's
transcription of the paper (../shared/paper/SASA.md), parsed independently here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sasa_bench.report import paper

SASA_MD = Path(__file__).resolve().parents[2] / "shared" / "paper" / "SASA.md"
pytestmark = pytest.mark.skipif(not SASA_MD.is_file(), reason=f"the paper's transcription {SASA_MD} is not here")

TABLE1_NAMES = {"baseline (conv)": "resnet{d}", "baseline": "resnet{d}",
                "conv-stem + attention": "sasa_resnet{d}_convstem", "full attention": "sasa_resnet{d}"}


def _text() -> str:
    return SASA_MD.read_text()


def _section(title: str) -> str:
    text = _text()
    start = text.index(title)
    end = text.find("**Table", start + len(title))
    end2 = text.find("\n## ", start + len(title))
    ends = [e for e in (end, end2) if e != -1]
    return text[start : min(ends) if ends else len(text)]


def _table_rows(section: str) -> list[list[str]]:
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in section.splitlines() if line.startswith("|")]
    return [r for r in rows[2:] if r]  # drop the header and the --- line


def test_table1() -> None:
    rows = _table_rows(_section("## Table 1"))
    assert len(rows) == 9
    for depth, model, gflops, params, top1 in rows:
        d = re.search(r"\d+", depth).group()
        name = TABLE1_NAMES[model].format(d=d)
        assert paper.TABLE1[name] == (float(gflops), float(params), float(top1))


def test_table3() -> None:
    rows = _table_rows(_section("**Table 3"))
    assert len(rows) == 8
    for _conv, att, gflops, params, top1 in rows:
        key = "none" if att == "—" else att
        assert paper.TABLE3_STAGES[key] == (float(gflops), float(params), float(top1))
    assert set(paper.TABLE3_STAGES) == {"none" if r[1] == "—" else r[1] for r in rows}


def _inline(title: str) -> str:
    return " ".join(_section(title).split())


def test_table4() -> None:
    text = _inline("**Table 4")
    params = float(re.search(r"params constant, ([\d.]+) M", text).group(1))
    found = {int(k): (float(g), params, float(t)) for k, _, g, t in re.findall(r"(\d+)×(\d+): (\d+\.\d) B, (\d+\.\d)", text)}
    assert found == paper.TABLE4_K


def test_table5() -> None:
    text = _inline("**Table 5")
    found = {}
    for name in ("none", "absolute", "relative"):
        g, pm, t = re.search(name + r"[^·]*?(\d+\.\d)(?: B)? / (\d+\.\d)(?: M)? / (\d+\.\d)", text).groups()
        found[name] = (float(g), float(pm), float(t))
    assert found == paper.TABLE5_POS


def test_table6() -> None:
    text = _inline("**Table 6")
    qr = re.search(r"only \(no W_K\) (\d+\.\d) B / (\d+\.\d) M / (\d+\.\d)", text).groups()
    qkqr = re.search(r"qᵀk \+ qᵀr (\d+\.\d) / (\d+\.\d) / (\d+\.\d)", text).groups()
    assert paper.TABLE6_LOGITS == {"qr": tuple(map(float, qr)), "qk+qr": tuple(map(float, qkqr))}


def test_table7() -> None:
    text = _inline("**Table 7")
    assert "no params column" in text
    plain = re.search(r"plain attention stem (\d+\.\d) B, (\d+\.\d)", text).groups()
    conv_values = re.search(r"convolution for the values (\d+\.\d) B, (\d+\.\d)", text).groups()
    aware = re.search(r"spatially aware values \(the paper's stem\) (\d+\.\d) B, (\d+\.\d)", text).groups()
    expect = {"attention-plain": plain, "attention-conv-values": conv_values, "attention": aware}
    assert paper.TABLE7_STEM == {k: (float(g), None, float(t)) for k, (g, t) in expect.items()}
