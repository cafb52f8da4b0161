"""What is signal: intervals over seeds, differences against a study's base, verdicts, and how
our ordering of the variants agrees with the paper's.

Methods (stated in the report):

* a variant's 95% interval is Student's t-interval of the mean over seeds,
  mean ± t(0.975, n−1)·s/√n (none for n = 1);
* a difference against the base variant is Welch's t-interval of the difference of two means
  (unequal variances, Welch–Satterthwaite degrees of freedom); seeds are *not* paired, because
  the same seed gives a different initialisation in another architecture;
* the verdict is "better" / "worse" when that interval excludes 0, "within noise" otherwise
  (and "n too small" below 2 seeds on either side);
* agreement with the paper: Kendall's τ-b between our means and the paper's numbers, and each
  pair of variants whose paper numbers differ by at least :data:`CLAIM_MIN_GAP` points counted
  as reproduced (our Welch interval excludes 0 on the paper's side), contradicted (excludes 0
  on the other side) or within our noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from scipy import stats as _st

LEVEL = 0.95
CLAIM_MIN_GAP = 0.2  # points: smaller paper differences are below the paper's own rounding noise
METHOD = (
    "95% intervals: Student's t over seeds for a variant's mean; Welch's t for the difference against "
    "the base variant (seeds not paired); verdict 'better'/'worse' when that interval excludes 0, else "
    "'within noise'. Agreement: Kendall's τ-b between our means and the paper's numbers, and the paper's "
    f"pairwise orderings (pairs ≥ {CLAIM_MIN_GAP} points apart) reproduced / contradicted / within noise."
)


@dataclass(frozen=True)
class Summary:
    """Mean, std and 95% t-interval of one variant's values over seeds."""

    mean: float
    std: float
    n: int
    low: float | None
    high: float | None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None else (self.high - self.low) / 2


@dataclass(frozen=True)
class Difference:
    """``a − b`` with its Welch 95% interval and verdict."""

    delta: float
    low: float | None
    high: float | None
    verdict: str  # better | worse | within noise | n too small


def summarize(values: Sequence[float]) -> Summary:
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("no values")
    n, mean = len(xs), statistics.fmean(xs)
    if n < 2:
        return Summary(mean, 0.0, n, None, None)
    sd = statistics.stdev(xs)
    half = _st.t.ppf(0.5 + LEVEL / 2, n - 1) * sd / math.sqrt(n)
    return Summary(mean, sd, n, mean - half, mean + half)


def difference(a: Sequence[float], b: Sequence[float], higher_is_better: bool = True) -> Difference:
    """Welch's t-interval of mean(a) − mean(b) and the verdict for ``a`` against ``b``."""
    sa, sb = summarize(a), summarize(b)
    delta = sa.mean - sb.mean
    if sa.n < 2 or sb.n < 2:
        return Difference(delta, None, None, "n too small")
    va, vb = sa.std**2 / sa.n, sb.std**2 / sb.n
    se = math.sqrt(va + vb)
    if se == 0:
        verdict = "within noise" if delta == 0 else ("better" if (delta > 0) == higher_is_better else "worse")
        return Difference(delta, delta, delta, verdict)
    df = (va + vb) ** 2 / (va**2 / (sa.n - 1) + vb**2 / (sb.n - 1))
    half = _st.t.ppf(0.5 + LEVEL / 2, df) * se
    low, high = delta - half, delta + half
    if low > 0 or high < 0:
        verdict = "better" if (low > 0) == higher_is_better else "worse"
    else:
        verdict = "within noise"
    return Difference(delta, low, high, verdict)


def kendall_tau(ours: Sequence[float], paper: Sequence[float]) -> float | None:
    """Kendall's τ-b (ties handled); None below 3 pairs or when either side is constant."""
    if len(ours) < 3 or len(set(ours)) < 2 or len(set(paper)) < 2:
        return None
    tau = _st.kendalltau(ours, paper).statistic
    return None if tau is None or math.isnan(tau) else float(tau)


@dataclass(frozen=True)
class Agreement:
    tau: float | None
    n_variants: int
    reproduced: list[tuple[str, str]]  # (paper's better, paper's worse)
    contradicted: list[tuple[str, str]]
    within_noise: list[tuple[str, str]]
    close_in_paper: int  # pairs the paper itself puts within CLAIM_MIN_GAP

    def sentence(self, labels: dict[str, str] | None = None) -> str:
        """The report's one line, beginning 'Agreement with the paper:'."""
        name = (labels or {}).get
        n_claims = len(self.reproduced) + len(self.contradicted) + len(self.within_noise)
        if self.n_variants < 2:
            return "Agreement with the paper: not assessable (fewer than 2 variants with both our accuracy and the paper's)."
        tau = f"Kendall's τ = {self.tau:+.2f} between our means and the paper's numbers over {self.n_variants} variants" \
            if self.tau is not None else f"τ not defined for {self.n_variants} variants"

        def pairs(ps: list[tuple[str, str]]) -> str:
            return "; ".join(f"“{name(a) or a}” > “{name(b) or b}”" for a, b in ps)

        ordering = "ordering" if n_claims == 1 else "orderings"
        parts = [f"of the paper's {n_claims} pairwise {ordering}, we reproduce {len(self.reproduced)}"
                 + (f" ({pairs(self.reproduced)})" if self.reproduced else "")]
        parts.append(f"contradict {len(self.contradicted)}" + (f" ({pairs(self.contradicted)})" if self.contradicted else ""))
        verb = "is" if len(self.within_noise) == 1 else "are"
        parts.append(f"and {len(self.within_noise)} {verb} within our seed noise")
        tail = f"; {self.close_in_paper} more pair(s) the paper itself puts within {CLAIM_MIN_GAP} points" if self.close_in_paper else ""
        return f"Agreement with the paper: {tau}; " + ", ".join(parts) + tail + "."


def agreement(
    ours: dict[str, Sequence[float]], paper: dict[str, float], higher_is_better: bool = True
) -> Agreement:
    """Compare our per-variant values (over seeds) with the paper's number for each variant."""
    common = [v for v in paper if v in ours and len(ours[v]) > 0]
    means = [statistics.fmean(ours[v]) for v in common]
    tau = kendall_tau(means, [paper[v] for v in common])
    rep: list[tuple[str, str]] = []
    con: list[tuple[str, str]] = []
    noise: list[tuple[str, str]] = []
    close = 0
    for a, b in combinations(common, 2):
        gap = paper[a] - paper[b]
        if abs(gap) < CLAIM_MIN_GAP:
            close += 1
            continue
        hi, lo = (a, b) if (gap > 0) == higher_is_better else (b, a)  # the paper's better, worse
        d = difference(ours[hi], ours[lo], higher_is_better)
        if d.verdict == "better":
            rep.append((hi, lo))
        elif d.verdict == "worse":
            con.append((hi, lo))
        else:
            noise.append((hi, lo))
    return Agreement(tau, len(common), rep, con, noise, close)
