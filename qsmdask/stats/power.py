"""Simulation-based power and sample size for the two-group Wilcoxon rank-sum design.

Data are simulated as normal ROI values (control mean 0, patient mean ``effect_ppm``, SD
``sd_ppm``); each simulated study is tested with ``scipy.stats.mannwhitneyu`` (two-sided) at
the per-ROI level ``alpha / n_rois`` (Bonferroni over the ROI family, as
:func:`qsmdask.stats.group_wilcoxon`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from ._common import long_table, merge_participants, validate_alpha

__all__ = ["power_wilcoxon", "sample_size_for_power", "observed_effects", "power_table"]


def _sizes(n_per_group):
    if np.ndim(n_per_group) == 0:
        n1 = n2 = int(n_per_group)
    else:
        n1, n2 = (int(v) for v in n_per_group)
    if n1 < 2 or n2 < 2:
        raise ValueError(f"n_per_group must be >= 2 per group, got {n_per_group!r}")
    return n1, n2


def power_wilcoxon(n_per_group, effect_ppm: float, sd_ppm: float, *, alpha: float = 0.05,
                   n_rois: int = 1, n_sim: int = 2000, seed: int | None = 0,
                   mwu_method: str = "auto") -> dict:
    """Power of the two-sided Wilcoxon rank-sum test by Monte Carlo simulation.

    Parameters
    ----------
    n_per_group : int or (int, int)
        Subjects per group (patients, controls).
    effect_ppm : float
        Difference of group means (ppm).
    sd_ppm : float
        Within-group SD (ppm), > 0.
    alpha : float
        Family-wise level; each ROI is tested at ``alpha / n_rois`` (Bonferroni).
    n_rois : int
        Size of the ROI family.
    n_sim : int
        Simulated studies.
    seed : int or None
        Random seed.
    mwu_method : {"auto", "asymptotic", "exact"}
        ``scipy.stats.mannwhitneyu`` method.

    Returns
    -------
    dict
        ``power``, ``mc_se`` (Monte Carlo SE), ``n1``, ``n2``, ``alpha_per_roi``,
        ``effect_ppm``, ``sd_ppm``, ``cohen_d``, ``n_sim``.
    """
    n1, n2 = _sizes(n_per_group)
    alpha = validate_alpha(alpha)
    if float(sd_ppm) <= 0:
        raise ValueError(f"sd_ppm must be > 0, got {sd_ppm!r}")
    if int(n_rois) < 1:
        raise ValueError(f"n_rois must be >= 1, got {n_rois!r}")
    if int(n_sim) < 10:
        raise ValueError(f"n_sim must be >= 10, got {n_sim!r}")
    rng = np.random.default_rng(seed)
    x = rng.normal(float(effect_ppm), float(sd_ppm), size=(int(n_sim), n1))
    y = rng.normal(0.0, float(sd_ppm), size=(int(n_sim), n2))
    p = stats.mannwhitneyu(x, y, alternative="two-sided", method=mwu_method, axis=1).pvalue
    a_roi = alpha / int(n_rois)
    pw = float(np.mean(p <= a_roi))
    return dict(power=pw, mc_se=float(np.sqrt(pw * (1 - pw) / int(n_sim))), n1=n1, n2=n2,
                alpha_per_roi=a_roi, effect_ppm=float(effect_ppm), sd_ppm=float(sd_ppm),
                cohen_d=float(effect_ppm) / float(sd_ppm), n_sim=int(n_sim))


def sample_size_for_power(effect_ppm: float, sd_ppm: float, *, power: float = 0.8,
                          alpha: float = 0.05, n_rois: int = 1, n_sim: int = 2000,
                          seed: int | None = 0, n_min: int = 3, n_max: int = 2000) -> dict:
    """Smallest equal group size whose simulated Wilcoxon power reaches ``power``.

    Bisection over n with the same seed at every n (common random numbers keep the
    simulated power curve close to monotone).

    Returns
    -------
    dict
        ``n_per_group``, ``power`` (achieved), ``mc_se``, ``target_power``, ``curve``
        (DataFrame n_per_group, power of every n evaluated). ``n_per_group`` is None when
        even ``n_max`` falls short.
    """
    target = validate_alpha(power, "power")
    if float(effect_ppm) == 0:
        raise ValueError("effect_ppm must be non-zero for a sample size")
    n_min, n_max = max(2, int(n_min)), int(n_max)
    if n_max <= n_min:
        raise ValueError(f"n_max must exceed n_min, got {n_min}, {n_max}")
    cache = {}

    def pw(n):
        if n not in cache:
            cache[n] = power_wilcoxon(n, effect_ppm, sd_ppm, alpha=alpha, n_rois=n_rois,
                                      n_sim=n_sim, seed=seed)
        return cache[n]["power"]

    # start from the normal approximation of the t-test size inflated by the asymptotic
    # relative efficiency of the Wilcoxon test (3/pi), then widen by doubling
    a_roi = validate_alpha(alpha) / max(int(n_rois), 1)
    z = stats.norm.ppf(1 - a_roi / 2) + stats.norm.ppf(target)
    guess = int(np.ceil(2 * (z * float(sd_ppm) / float(effect_ppm)) ** 2 / (3 / np.pi)))
    lo, hi = n_min, int(min(max(guess + 2, n_min + 1), n_max))
    while pw(hi) < target and hi < n_max:
        lo, hi = hi, min(2 * hi, n_max)
    if pw(hi) < target:
        found = None
    elif pw(lo) >= target:
        found = lo
    else:
        while hi - lo > 1:          # invariant: pw(lo) < target <= pw(hi)
            mid = (lo + hi) // 2
            if pw(mid) >= target:
                hi = mid
            else:
                lo = mid
        found = hi
    curve = pd.DataFrame(sorted((n, r["power"]) for n, r in cache.items()),
                         columns=["n_per_group", "power"])
    res = cache[found] if found is not None else cache[n_max]
    return dict(n_per_group=found, power=res["power"], mc_se=res["mc_se"], target_power=target,
                curve=curve)


def observed_effects(roi_table: pd.DataFrame, participants: pd.DataFrame, *,
                     value: str = "mean_ppm", level: str | None = "group", session=None,
                     measures=None, atlas=None, groups=("patient", "control"),
                     group_column: str = "group") -> pd.DataFrame:
    """Observed group difference and pooled SD per ROI (defaults for power analysis).

    Returns
    -------
    DataFrame with ``measure, session_id, roi, hemisphere, n1, n2, effect_ppm``
    (mean of groups[0] minus groups[1]) and ``sd_ppm`` (pooled SD).
    """
    long = long_table(roi_table, value=value, level=level, session=session, measures=measures,
                      atlas=atlas)
    df = merge_participants(long, participants, [group_column])
    rows = []
    for key, sub in df.groupby(["measure", "session_id", "roi", "hemisphere"], sort=True):
        x = sub.loc[sub[group_column] == groups[0], "value"].to_numpy(float)
        y = sub.loc[sub[group_column] == groups[1], "value"].to_numpy(float)
        if x.size < 2 or y.size < 2:
            continue
        sp = np.sqrt(((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1))
                     / (x.size + y.size - 2))
        rows.append(dict(zip(["measure", "session_id", "roi", "hemisphere"], key), n1=x.size,
                         n2=y.size, effect_ppm=x.mean() - y.mean(), sd_ppm=sp))
    return pd.DataFrame(rows, columns=["measure", "session_id", "roi", "hemisphere", "n1", "n2",
                                       "effect_ppm", "sd_ppm"])


def power_table(roi_table: pd.DataFrame, participants: pd.DataFrame, *, n_per_group=None,
                alpha: float = 0.05, target_power: float = 0.8, n_sim: int = 1000,
                seed: int | None = 0, **select) -> pd.DataFrame:
    """Power at ``n_per_group`` and the sample size for ``target_power`` for every ROI,
    using the study's observed effects (:func:`observed_effects`) and Bonferroni over all
    ROIs of the table.

    Parameters
    ----------
    n_per_group : int or None
        Planned group size (None: the study's own group sizes).
    select
        Row selection passed to :func:`observed_effects` (value, level, session, ...).
    """
    eff = observed_effects(roi_table, participants, **select)
    n_rois = max(len(eff), 1)
    out = []
    for _, r in eff.iterrows():
        n = (int(r.n1), int(r.n2)) if n_per_group is None else n_per_group
        pw = power_wilcoxon(n, r.effect_ppm, r.sd_ppm, alpha=alpha, n_rois=n_rois,
                            n_sim=n_sim, seed=seed)
        if r.effect_ppm != 0 and r.sd_ppm > 0:
            ss = sample_size_for_power(r.effect_ppm, r.sd_ppm, power=target_power, alpha=alpha,
                                       n_rois=n_rois, n_sim=n_sim, seed=seed, n_max=1000)
        else:
            ss = dict(n_per_group=None)
        out.append(dict(r.to_dict(), power=pw["power"], mc_se=pw["mc_se"],
                        n_for_target=ss["n_per_group"], target_power=target_power,
                        n_rois=n_rois))
    return pd.DataFrame(out)
