"""Paired ratios of interleaved runs: their median, and an interval for it.

Run i of two variants saw the same machine (the runs interleave), so the ratio within each
pair carries less of the machine's noise than the ratio of the two medians. The interval is a
bootstrap of the median ratio; with rounds (fresh processes), the resampling is two-stage:
rounds, then pairs within each chosen round, since a round's pairs share its processes.
"""

from __future__ import annotations

import random
import statistics

BOOTSTRAP = 4000


def bootstrap_median(groups: list[list[float]], n: int = BOOTSTRAP, seed: int = 21) -> tuple[float, float]:
    """95 % interval of the median of every value in ``groups``, resampling the groups, then
    the values within each chosen group. One group: a plain bootstrap of its values."""
    groups = [g for g in groups if g]
    if not groups:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    meds = []
    for _ in range(n):
        chosen = groups if len(groups) == 1 else [rng.choice(groups) for _ in groups]
        sample = [rng.choice(g) for g in chosen for _ in g]
        meds.append(statistics.median(sample))
    meds.sort()
    return meds[int(0.025 * n)], meds[int(0.975 * n) - 1]


def verdict(lo: float, hi: float, target: float) -> str:
    """Whether a ratio's interval [lo, hi] says the difference is within ±target of 1."""
    if 1 - target <= lo and hi <= 1 + target:
        return f"within ±{target:.0%}"
    if lo > 1 + target or hi < 1 - target:
        return f"beyond ±{target:.0%}"
    return f"not resolved at ±{target:.0%} (interval {100 * (lo - 1):+.1f}% to {100 * (hi - 1):+.1f}%)"
