"""Binomial statistics of judged samples: exact (Clopper-Pearson) intervals, judged rates and win rates.

    rate = judged_rate(flags)                       # {"desirable_rate", "ci90", "n"}
    wr = winrate(policy_flags, baseline_flags)      # per prompt, a tie counts half

The paper's pairwise protocol (kto_jax/judges/protocol.py) reports its win rate with the same interval.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import stats


def clopper_pearson_interval(successes: float, n: int, level: float = 0.9) -> tuple[float, float]:
    """Exact (Clopper-Pearson) interval for a binomial proportion, 90% by default: the interval the
    KTO paper's plots draw (HALOs visualize.py, ``scipy.stats.binomtest(k, n).proportion_ci(0.9)``,
    whose default method is "exact").

    lower = Beta(a/2; k, n - k + 1) quantile (0 when k = 0), upper = Beta(1 - a/2; k + 1, n - k)
    quantile (1 when k = n), a = 1 - level. A fractional ``successes`` (ties counted as half a win)
    takes the same beta quantiles, which interpolate between the integer counts' bounds.
    """
    if n == 0:
        return (0.0, 1.0)
    if not 0 <= successes <= n:
        raise ValueError(f"clopper_pearson_interval needs 0 <= successes <= n; got successes={successes}, n={n}")
    if not 0 < level < 1:
        raise ValueError(f"clopper_pearson_interval needs 0 < level < 1; got {level}")
    alpha = 1.0 - level
    lo = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(stats.beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return (lo, hi)


def judged_rate(flags: Sequence[bool], level: float = 0.9) -> dict:
    """Fraction judged desirable with its exact (Clopper-Pearson) binomial interval."""
    flags = np.asarray(flags, bool)
    lo, hi = clopper_pearson_interval(float(flags.sum()), len(flags), level)
    return {"desirable_rate": float(flags.mean()) if len(flags) else 0.0, "ci90": [lo, hi], "n": int(len(flags))}


def winrate(policy: Sequence[bool], baseline: Sequence[bool], level: float = 0.9) -> dict:
    """Per-prompt comparison of the policy with a baseline under a unary judge: a win when only
    the policy's completion is desirable, a loss when only the baseline's is, a tie otherwise.

    ``winrate`` counts a tie as half a win; ``win_fraction`` = wins / n is the paper's
    convention (GPT-4's pairwise verdicts, ties counted as non-wins). Intervals are 90%
    Clopper-Pearson, as the paper's plots (for ``winrate`` on its half-integer score).
    """
    policy, baseline = np.asarray(policy, bool), np.asarray(baseline, bool)
    if policy.shape != baseline.shape:
        raise ValueError(
            f"winrate needs one policy and one baseline judgment per prompt; got {policy.shape} and {baseline.shape}"
        )
    n = len(policy)
    wins, losses = int((policy & ~baseline).sum()), int((~policy & baseline).sum())
    ties = n - wins - losses
    score = wins + 0.5 * ties
    return {
        "winrate": score / n if n else 0.0,
        "ci90": list(clopper_pearson_interval(score, n, level)),
        "win_fraction": wins / n if n else 0.0,
        "win_fraction_ci90": list(clopper_pearson_interval(wins, n, level)),
        "wins": wins,
        "ties": ties,
        "losses": losses,
        "n": n,
    }
