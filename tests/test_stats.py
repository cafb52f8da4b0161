"""The report's statistics against values worked out by hand (and an independent Monte Carlo)."""

from __future__ import annotations

import math
import random

import pytest

from sasa_bench.report import stats


def test_t_interval_matches_the_textbook_formula() -> None:
    s = stats.summarize([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    assert s.mean == 2.0 and s.std == 1.0 and s.n == 3
    assert s.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert stats.summarize([5.0]).low is None


def test_t_interval_covers_the_mean_95_percent_of_the_time() -> None:
    rng = random.Random(0)
    hits = 0
    for _ in range(2000):
        s = stats.summarize([rng.gauss(10.0, 2.0) for _ in range(4)])
        hits += s.low <= 10.0 <= s.high
    assert 0.93 < hits / 2000 < 0.97


def test_verdicts_separate_signal_from_noise() -> None:
    assert stats.difference([90.0, 90.2, 89.9], [88.0, 88.1, 87.9]).verdict == "better"
    assert stats.difference([88.0, 88.1, 87.9], [90.0, 90.2, 89.9]).verdict == "worse"
    d = stats.difference([89.0, 89.6, 88.7], [89.2, 88.8, 89.5])
    assert d.verdict == "within noise" and d.low < 0 < d.high
    assert stats.difference([1.0], [0.0, 0.5]).verdict == "n too small"
    # lower-is-better metrics flip the verdict
    assert stats.difference([1.0, 1.1, 1.05], [2.0, 2.1, 2.05], higher_is_better=False).verdict == "better"


def test_welch_interval_matches_a_hand_computation() -> None:
    a, b = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0, 8.0]
    d = stats.difference(a, b)
    va, vb = 1.0 / 3, (20 / 3) / 4  # s^2/n
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    from scipy.stats import t

    half = t.ppf(0.975, df) * math.sqrt(va + vb)
    assert d.delta == -3.0 and d.low == pytest.approx(-3.0 - half) and d.high == pytest.approx(-3.0 + half)


def test_kendall_tau_on_known_orderings() -> None:
    assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert stats.kendall_tau([1, 2, 3, 4], [40, 30, 20, 10]) == pytest.approx(-1.0)
    # one swapped pair of six: (5 - 1) / 6
    assert stats.kendall_tau([1, 2, 3, 4], [10, 20, 40, 30]) == pytest.approx(4 / 6)
    assert stats.kendall_tau([1, 2], [1, 2]) is None


def test_agreement_counts_the_papers_pairwise_claims() -> None:
    ours = {"a": [80.0, 80.1, 79.9], "b": [70.0, 70.2, 69.8], "c": [75.0, 76.5, 73.5]}
    paper = {"a": 77.0, "b": 76.0, "c": 78.0, "d": 79.0}  # d: no result of ours, ignored
    ag = stats.agreement(ours, paper)
    assert ag.n_variants == 3
    # the paper: a > b, c > b, c > a; ours: a and c clearly above b, but a clearly above c
    assert ag.reproduced == [("a", "b"), ("c", "b")]
    assert ag.contradicted == [("c", "a")] and ag.within_noise == []
    noisy = stats.agreement({"a": [80.0, 80.9, 79.2], "b": [80.3, 79.5, 80.6]}, {"a": 77.0, "b": 76.0})
    assert noisy.within_noise == [("a", "b")] and not noisy.reproduced and not noisy.contradicted
    close = stats.agreement(ours, {"a": 77.0, "b": 76.9, "c": 78.0})
    assert close.close_in_paper == 1  # a vs b: 0.1 points in the paper is no claim
    line = ag.sentence({"a": "A", "b": "B", "c": "C"})
    assert line.startswith("Agreement with the paper: Kendall's τ = ")
    assert "contradict 1 (“C” > “A”)" in line
