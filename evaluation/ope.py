"""Off-policy estimators: the value of a target policy from decisions logged by another.

Single-step (contextual bandit, one slot or one row per (decision, slot) for slates):
IPW (optional clipping), SNIPW, NCIS (capped, self-normalised), DM, DR, SNDR, Switch-DR,
DR with optimistic shrinkage (DRos), and ``default``: a MAGIC-style blend of all of them.
Sessions (sequential decisions): per-decision importance sampling (PDIS), per-decision
doubly robust (DR) and fitted-Q evaluation (FQE).

Every estimate carries a bootstrap interval (BCa by default) and the Kish effective sample size
of the importance weights it used, and a warning when those weights are extreme.

Notation: ``n`` logged rows, ``A`` actions; ``w_i = pi(a_i | x_i) / mu(a_i | x_i)`` the
importance weight of row i; ``q(x, a)`` a reward model, ``q_pi(x) = sum_a pi(a|x) q(x, a)``.

Every estimator is a sum of ratios of sums over rows, ``sum_k (sum_i num_ki) / (sum_i
den_ki)`` (a plain mean has ``den = 1``), so the bootstrap needs only per-cluster sums: the
clusters (``groups``: users or sessions; default one per row) are resampled with
replacement, and one resample serves every estimator, so their replicates are paired.
Hyperparameters (NCIS cap, Switch threshold, DRos shrinkage) are chosen on the full sample
by least estimated MSE: variance plus the squared difference from the family's unbiased
member (uncapped / unswitched / unshrunk) less that difference's own variance; they are
held fixed inside the bootstrap.

The ``default`` estimator follows MAGIC (Thomas & Brunskill 2016): blend weights ``x`` on
the simplex minimise ``x' (Cov + b b') x``, where ``Cov`` is the bootstrap covariance of the
estimators and ``b_k`` the distance of estimator k from the reference interval (SNIPW's:
consistent and bounded by the largest reward). No ground truth is used. The blend may use
DM, Switch-DR and DRos only when their intervals include the reward model's own
uncertainty (``refit``): with the model held fixed their bootstrap variance is too small and
the blend would trust them for the wrong reason.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

BANDIT_ESTIMATORS: tuple[str, ...] = (
    "ipw", "snipw", "ncis", "dm", "dr", "sndr", "switch_dr", "dros",
)
"""The classic single-step estimators, in report order (``default`` comes last)."""

MODEL_FREE: tuple[str, ...] = ("ipw", "snipw", "ncis")
"""Estimators that need no reward model."""

SESSION_ESTIMATORS: tuple[str, ...] = ("pdis", "dr", "fqe")
"""Sequential estimators (per episode value)."""

MODEL_VARIANCE_NEEDS_REFIT: tuple[str, ...] = ("dm", "switch_dr", "dros")
"""Estimators whose fixed-model bootstrap misses most of their variance (the model's)."""

DEFAULT_REFERENCE = "snipw"
"""The estimator whose interval anchors the bias estimate of the default blend."""


def single_threaded(function: Callable) -> Callable:
    """Run ``function`` with one BLAS / OpenMP thread. Our linear algebra is small
    (bootstrap matrix-vector products, (D+1)^2 solves), and multithreaded OpenBLAS /
    OpenMP spin-wait so badly on a busy 2-core machine that a 1 ms solve takes 50 ms."""
    import functools

    @functools.wraps(function)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return function(*args, **kwargs)

    return wrapper


class OPEWarning(UserWarning):
    """The importance weights are extreme: estimates from these logs are fragile."""


@dataclass(frozen=True)
class OPEConfig:
    """How estimates and their intervals are computed."""

    n_boot: int = 1000
    """Bootstrap resamples (of clusters) for every interval."""
    level: float = 0.95
    """Confidence level of the intervals."""
    interval: str = "bca"
    """bca: bias-corrected and accelerated bootstrap (acceleration from the leave-one-
    cluster-out jackknife; right for the skewed, heavy-tailed rewards of watch time);
    percentile: the plain percentile interval."""
    seed: int = 0
    """Seed of the bootstrap resampling."""
    ipw_clip: float | None = None
    """Clip IPW weights at this value (None: plain, unbiased IPW)."""
    min_ess_fraction: float = 0.01
    """Warn when the weights' effective sample size is below this fraction of the rows."""
    max_weight_share: float = 0.05
    """Warn when one row carries more than this share of the total weight."""
    default_reference: str = DEFAULT_REFERENCE
    """Reference estimator of the default blend's bias term."""
    default_candidates: tuple[str, ...] = BANDIT_ESTIMATORS
    """Estimators the default may blend."""

    def __post_init__(self) -> None:
        if self.n_boot < 20:
            raise ValueError(f"n_boot must be >= 20, got {self.n_boot}")
        if not 0.5 < self.level < 1.0:
            raise ValueError(f"level must be in (0.5, 1), got {self.level}")
        if self.interval not in ("bca", "percentile"):
            raise ValueError(f"interval must be 'bca' or 'percentile', got {self.interval!r}")
        if self.ipw_clip is not None and self.ipw_clip <= 0:
            raise ValueError(f"ipw_clip must be > 0, got {self.ipw_clip}")


@dataclass(frozen=True)
class Estimate:
    """One estimator's value with its uncertainty."""

    name: str
    value: float
    ci_low: float
    ci_high: float
    std_error: float
    """Bootstrap standard deviation."""
    ess: float
    """Kish effective sample size (sum w)^2 / sum w^2 of the weights this estimator used
    (the row count for the direct method)."""
    n: int
    """Logged rows (or episodes for session estimators)."""
    params: dict = field(default_factory=dict)
    """Chosen hyperparameters (cap, threshold, shrinkage, blend weights)."""
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class WeightDiagnostics:
    """Summary of the importance weights w = pi(a|x) / mu(a|x) of the logged actions."""

    n: int
    ess: float
    ess_fraction: float
    mean: float
    """Should be close to 1 when the propensities are right and mu covers pi."""
    max: float
    max_share: float
    """Largest single weight over the sum of weights."""
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out["warnings"] = list(self.warnings)
        return out


@dataclass(frozen=True)
class BanditData:
    """Logged single-step decisions, one row per decision (or per decision and slot).

    reward (n,) float; action (n,) int in [0, A); pscore (n,) the logging policy's
    probability of the logged action (at the row's slot), in (0, 1]; groups (n,) optional
    cluster ids for the bootstrap (users, sessions); position (n,) optional slot.
    """

    reward: np.ndarray
    action: np.ndarray
    pscore: np.ndarray
    groups: np.ndarray | None = None
    position: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.reward)
        for name in ("action", "pscore", "groups", "position"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"BanditData.{name} has {len(value)} rows, reward has {n}")
        if n == 0:
            raise ValueError("BanditData needs at least one logged row")
        if not np.all(np.isfinite(self.reward)):
            raise ValueError("BanditData.reward has NaN or infinite values")
        p = np.asarray(self.pscore, dtype=np.float64)
        if not np.all((p > 0) & (p <= 1)):
            bad = int(np.sum(~((p > 0) & (p <= 1))))
            raise ValueError(f"BanditData.pscore must be in (0, 1]; {bad} rows are not")

    @property
    def n(self) -> int:
        return len(self.reward)


# --------------------------------------------------------------------------------------
# Ratio-of-sums terms and the paired cluster bootstrap
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Terms:
    """An estimator as ``sum_k sum(num[k]) / sum(den[k])``; ``den[k] = None`` means n."""

    num: tuple[np.ndarray, ...]
    den: tuple[np.ndarray | None, ...]

    @classmethod
    def mean(cls, values: np.ndarray) -> Terms:
        return cls((np.asarray(values, np.float64),), (None,))

    def __add__(self, other: Terms) -> Terms:
        return Terms(self.num + other.num, self.den + other.den)

    def value(self) -> float:
        total = 0.0
        for num, den in zip(self.num, self.den, strict=True):
            d = len(num) if den is None else float(np.sum(den))
            total += float(np.sum(num)) / d if d != 0 else float("nan")
        return total


@dataclass(frozen=True)
class Clusters:
    """Cluster index of every row and the bootstrap resamples of clusters."""

    index: np.ndarray  # (n,) in [0, G)
    size: np.ndarray  # (G,) rows per cluster
    counts: np.ndarray  # (B, G) multiplicity of each cluster in each resample

    @classmethod
    def build(cls, n: int, groups: np.ndarray | None, n_boot: int, seed: int) -> Clusters:
        if groups is None:
            index = np.arange(n)
        else:
            _, index = np.unique(np.asarray(groups), return_inverse=True)
        g = int(index.max()) + 1
        rng = np.random.default_rng(seed)
        counts = np.empty((n_boot, g), dtype=np.float64)
        for start in range(0, n_boot, 64):  # chunks bound the multinomial's memory
            stop = min(start + 64, n_boot)
            counts[start:stop] = rng.multinomial(g, np.full(g, 1.0 / g), size=stop - start)
        return cls(index, np.bincount(index, minlength=g).astype(np.float64), counts)

    @property
    def n_clusters(self) -> int:
        return len(self.size)

    def sums(self, values: np.ndarray | None) -> np.ndarray:
        """(G,) per-cluster sums (cluster sizes for None)."""
        if values is None:
            return self.size
        return np.bincount(self.index, weights=values, minlength=self.n_clusters)

    def replicates(self, terms: Terms) -> np.ndarray:
        """(B,) bootstrap replicates of the estimator ``terms``."""
        total = np.zeros(self.counts.shape[0])
        with np.errstate(divide="ignore", invalid="ignore"):
            for num, den in zip(terms.num, terms.den, strict=True):
                total = total + (self.counts @ self.sums(num)) / (self.counts @ self.sums(den))
        return total

    def jackknife(self, terms: Terms) -> np.ndarray:
        """(G,) the estimator with each cluster left out in turn."""
        out = np.zeros(self.n_clusters)
        with np.errstate(divide="ignore", invalid="ignore"):
            for num, den in zip(terms.num, terms.den, strict=True):
                sn, sd = self.sums(num), self.sums(den)
                out = out + (sn.sum() - sn) / (sd.sum() - sd)
        return out

    def std_error(self, terms: Terms) -> float:
        """Analytic cluster-robust standard error (linearised ratio), for SLOPE."""
        g = self.n_clusters
        influence = np.zeros(g)
        for num, den in zip(terms.num, terms.den, strict=True):
            sn, sd = self.sums(num), self.sums(den)
            d = sd.sum()
            if d == 0:
                return float("inf")
            ratio = sn.sum() / d
            influence += (sn - ratio * sd) / d
        return float(math.sqrt(g / max(g - 1, 1) * np.sum(influence**2)))


def kish_ess(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2; 0 when every weight is 0."""
    w = np.asarray(weights, dtype=np.float64)
    s2 = float(np.sum(w * w))
    return float(np.sum(w)) ** 2 / s2 if s2 > 0 else 0.0


def weight_diagnostics(weights: np.ndarray, config: OPEConfig = OPEConfig()) -> WeightDiagnostics:
    """ESS, mean and extremes of importance weights, with warnings when they are extreme."""
    w = np.asarray(weights, dtype=np.float64)
    n = len(w)
    ess = kish_ess(w)
    total = float(w.sum())
    max_share = float(w.max()) / total if total > 0 else float("nan")
    found = []
    if ess < config.min_ess_fraction * n:
        found.append(f"extreme importance weights: effective sample size {ess:.1f} of {n} rows "
                     f"({100 * ess / n:.2f}% < {100 * config.min_ess_fraction:g}%)")
    if total > 0 and max_share > config.max_weight_share:
        found.append(f"extreme importance weights: one row carries {100 * max_share:.1f}% of "
                     f"the total weight (max weight {w.max():.3g})")
    if total == 0:
        found.append("every importance weight is 0: the target never takes a logged action")
    elif n > 1:
        se = float(w.std(ddof=1)) / math.sqrt(n)
        if abs(w.mean() - 1.0) > max(0.1, 4.0 * se):
            found.append(f"mean importance weight {w.mean():.3f} is far from 1: the logging "
                         "policy does not cover the target, or the propensities are wrong")
    return WeightDiagnostics(n=n, ess=ess, ess_fraction=ess / n, mean=float(w.mean()),
                             max=float(w.max()), max_share=max_share, warnings=tuple(found))


def interval(replicates: np.ndarray, value: float, jackknife: np.ndarray | None,
             config: OPEConfig) -> tuple[float, float]:
    if config.interval == "bca":
        return bca_interval(replicates, value, jackknife, config.level)
    return percentile_interval(replicates, config.level)


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return float("nan"), float("nan")
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return float(low), float(high)


def bca_interval(replicates: np.ndarray, value: float, jackknife: np.ndarray | None,
                 level: float) -> tuple[float, float]:
    """Bias-corrected and accelerated bootstrap interval (Efron 1987): the percentile
    levels are shifted by the median bias z0 of the replicates and the acceleration a from
    the jackknife's skewness. Falls back to the percentile interval when undefined."""
    from statistics import NormalDist

    finite = replicates[np.isfinite(replicates)]
    if finite.size < 20 or not math.isfinite(value) or jackknife is None:
        return percentile_interval(replicates, level)
    b = finite.size
    below = (np.sum(finite < value) + 0.5 * np.sum(finite == value)) / b
    normal = NormalDist()
    z0 = normal.inv_cdf(min(max(below, 0.5 / b), 1 - 0.5 / b))
    jk = jackknife[np.isfinite(jackknife)]
    d = jk.mean() - jk if jk.size else np.zeros(1)
    scale = float(np.sum(d * d)) ** 1.5
    accel = float(np.sum(d**3)) / (6.0 * scale) if scale > 0 else 0.0
    alpha = (1.0 - level) / 2.0
    levels = []
    for z in (normal.inv_cdf(alpha), normal.inv_cdf(1.0 - alpha)):
        shifted = z0 + (z0 + z) / (1.0 - accel * (z0 + z))
        levels.append(min(max(normal.cdf(shifted), 0.0), 1.0))
    low, high = np.quantile(finite, levels)
    return float(low), float(high)


# --------------------------------------------------------------------------------------
# Single-step estimators as Terms
# --------------------------------------------------------------------------------------

def importance_weights(data: BanditData, action_dist: np.ndarray) -> np.ndarray:
    """(n,) w_i = pi(a_i | x_i) / pscore_i from the target's (n, A) action distribution."""
    pi = np.asarray(action_dist, dtype=np.float64)
    if pi.ndim != 2 or pi.shape[0] != data.n:
        raise ValueError(f"action_dist must be (n={data.n}, A), got {pi.shape}")
    if np.any(pi < -1e-12) or np.any(np.abs(pi.sum(axis=1) - 1.0) > 1e-6):
        raise ValueError("action_dist rows must be probability distributions (>= 0, sum 1)")
    action = np.asarray(data.action, dtype=np.int64)
    if action.min() < 0 or action.max() >= pi.shape[1]:
        raise ValueError(f"actions must lie in [0, {pi.shape[1]}) for this action_dist")
    return pi[np.arange(data.n), action] / np.asarray(data.pscore, dtype=np.float64)


def ipw_terms(r: np.ndarray, w: np.ndarray, clip: float | None = None) -> Terms:
    """IPW: mean(w r), with w clipped at ``clip`` when given."""
    wc = w if clip is None else np.minimum(w, clip)
    return Terms.mean(wc * r)


def snipw_terms(r: np.ndarray, w: np.ndarray) -> Terms:
    """Self-normalised IPW: sum(w r) / sum(w)."""
    return Terms((w * r,), (w,))


def ncis_terms(r: np.ndarray, w: np.ndarray, cap: float) -> Terms:
    """Normalised capped IS: sum(min(w, c) r) / sum(min(w, c))."""
    wc = np.minimum(w, cap)
    return Terms((wc * r,), (wc,))


def dm_terms(q_pi: np.ndarray) -> Terms:
    """Direct method: mean(q_pi(x))."""
    return Terms.mean(q_pi)


def dr_terms(r: np.ndarray, w: np.ndarray, q_logged: np.ndarray, q_pi: np.ndarray) -> Terms:
    """Doubly robust: mean(q_pi(x) + w (r - q(x, a)))."""
    return Terms.mean(q_pi + w * (r - q_logged))


def sndr_terms(r: np.ndarray, w: np.ndarray, q_logged: np.ndarray, q_pi: np.ndarray) -> Terms:
    """Self-normalised DR: mean(q_pi) + sum(w (r - q)) / sum(w)."""
    return Terms.mean(q_pi) + Terms((w * (r - q_logged),), (w,))


def switch_dr_terms(r: np.ndarray, w: np.ndarray, q_logged: np.ndarray, q_pi: np.ndarray,
                    tau: float) -> Terms:
    """Switch-DR (Wang et al. 2017): the DR correction only where w <= tau (DM elsewhere)."""
    keep = w <= tau
    return Terms.mean(q_pi + np.where(keep, w, 0.0) * (r - q_logged))


def dros_terms(r: np.ndarray, w: np.ndarray, q_logged: np.ndarray, q_pi: np.ndarray,
               lam: float) -> Terms:
    """DR with optimistic shrinkage (Su et al. 2020): w -> lam w / (w^2 + lam)."""
    shrunk = w if math.isinf(lam) else lam * w / (w * w + lam)
    return Terms.mean(q_pi + shrunk * (r - q_logged))


def negate(terms: Terms) -> Terms:
    return Terms(tuple(-num for num in terms.num), terms.den)


def mse_select(candidates: Sequence[tuple[float, Terms]], clusters: Clusters) -> int:
    """Index of the candidate with the least estimated MSE. The first candidate is the
    family's unbiased member (plain weights); candidate k's MSE is estimated as
    se_k^2 + max(0, d_k^2 - se(d_k)^2), d_k its difference from the first, whose sampling
    variance is subtracted so that noise is not mistaken for bias."""
    reference = candidates[0][1]
    best, chosen = math.inf, 0
    for i, (_, terms) in enumerate(candidates):
        value, se = terms.value(), clusters.std_error(terms)
        if not math.isfinite(value) or not math.isfinite(se):
            continue
        diff = terms + negate(reference)
        bias2 = max(0.0, diff.value() ** 2 - clusters.std_error(diff) ** 2) if i else 0.0
        mse = se * se + bias2
        if mse < best - 1e-15:
            best, chosen = mse, i
    return chosen


def weight_grid(w: np.ndarray) -> np.ndarray:
    """Upper quantiles of the positive weights, descending: caps and thresholds that trim
    at most the top half of the weights (a cap below most weights would make NCIS the
    logging policy's own value on the target's support, whatever the target)."""
    positive = w[w > 0]
    if positive.size == 0:
        return np.array([1.0])
    q = np.quantile(positive, [1.0, 0.999, 0.99, 0.95, 0.9, 0.75, 0.5])
    return np.unique(q)[::-1]


@dataclass(frozen=True)
class BanditInputs:
    """Arrays every single-step estimator reads; q_logged / q_pi are None without a model."""

    reward: np.ndarray  # (n,)
    weight: np.ndarray  # (n,) w_i
    q_logged: np.ndarray | None = None  # (n,) q(x_i, a_i)
    q_pi: np.ndarray | None = None  # (n,) sum_a pi(a|x_i) q(x_i, a)

    def with_model(self, q_hat: np.ndarray, action_dist: np.ndarray,
                   action: np.ndarray) -> BanditInputs:
        q = np.asarray(q_hat, dtype=np.float64)
        if q.shape != np.shape(action_dist):
            raise ValueError(f"q_hat must have the action_dist's shape {np.shape(action_dist)}, "
                             f"got {q.shape}")
        return BanditInputs(self.reward, self.weight,
                            q[np.arange(len(q)), np.asarray(action, dtype=np.int64)],
                            np.sum(np.asarray(action_dist) * q, axis=1))


def model_free_terms(x: BanditInputs, params: dict[str, dict]) -> dict[str, Terms]:
    r, w = x.reward, x.weight
    return {"ipw": ipw_terms(r, w, params["ipw"]["clip"]), "snipw": snipw_terms(r, w),
            "ncis": ncis_terms(r, w, params["ncis"]["cap"])}


def model_based_terms(x: BanditInputs, params: dict[str, dict]) -> dict[str, Terms]:
    r, w, q, qp = x.reward, x.weight, x.q_logged, x.q_pi
    assert q is not None and qp is not None
    return {"dm": dm_terms(qp), "dr": dr_terms(r, w, q, qp), "sndr": sndr_terms(r, w, q, qp),
            "switch_dr": switch_dr_terms(r, w, q, qp, params["switch_dr"]["tau"]),
            "dros": dros_terms(r, w, q, qp, params["dros"]["lambda"])}


def choose_params(x: BanditInputs, config: OPEConfig, clusters: Clusters) -> dict[str, dict]:
    """Hyperparameters on the full sample: NCIS cap, Switch threshold and DRos shrinkage by
    least estimated MSE (``mse_select``); the IPW clip comes from the config."""
    r, w = x.reward, x.weight
    grid = weight_grid(w)
    params: dict[str, dict] = {"ipw": {"clip": config.ipw_clip}, "snipw": {}}
    caps = [math.inf, *grid.tolist()]
    ncis = [(c, ncis_terms(r, w, c)) for c in caps]
    params["ncis"] = {"cap": ncis[mse_select(ncis, clusters)][0]}
    if x.q_logged is None or x.q_pi is None:
        return params
    q, qp = x.q_logged, x.q_pi
    params["dm"], params["dr"], params["sndr"] = {}, {}, {}
    taus = [math.inf, *grid.tolist(), 0.0]
    switch = [(t, switch_dr_terms(r, w, q, qp, t)) for t in taus]
    params["switch_dr"] = {"tau": switch[mse_select(switch, clusters)][0]}
    top = float(grid[0]) ** 2
    lams = [math.inf, *(top * 10.0**k for k in range(1, -7, -1))]
    dros = [(lam, dros_terms(r, w, q, qp, lam)) for lam in lams]
    params["dros"] = {"lambda": dros[mse_select(dros, clusters)][0]}
    return params


def effective_weights(name: str, w: np.ndarray, params: dict) -> np.ndarray | None:
    """The weights behind an estimator's ESS (None: the direct method uses none)."""
    if name == "ipw" and params.get("clip") is not None:
        return np.minimum(w, params["clip"])
    if name == "ncis":
        return np.minimum(w, params["cap"])
    if name == "dm":
        return None
    if name == "switch_dr":
        return np.where(w <= params["tau"], w, 0.0)
    if name == "dros" and not math.isinf(params["lambda"]):
        return params["lambda"] * w / (w * w + params["lambda"])
    return w


# --------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OPEResult:
    """Estimates keyed by estimator name, the weight diagnostics and the bootstrap
    replicates (B, E) in the order of ``estimates`` (paired across estimators)."""

    estimates: dict[str, Estimate]
    weights: WeightDiagnostics
    replicates: dict[str, np.ndarray]

    def to_dict(self) -> dict:
        return {"estimates": {k: v.to_dict() for k, v in self.estimates.items()},
                "weights": self.weights.to_dict()}


def summarise(name: str, value: float, replicates: np.ndarray, ess_weights: np.ndarray | None,
              config: OPEConfig, params: dict, n: int,
              jackknife: np.ndarray | None = None) -> Estimate:
    """Point value, bootstrap interval, ESS and warnings of one estimator."""
    low, high = interval(replicates, value, jackknife, config)
    found: tuple[str, ...] = ()
    if ess_weights is None:
        ess = float(n)
    else:
        diag = weight_diagnostics(ess_weights, config)
        ess, found = diag.ess, diag.warnings
    finite = replicates[np.isfinite(replicates)]
    return Estimate(name=name, value=value, ci_low=low, ci_high=high,
                    std_error=float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
                    ess=ess, n=n, params=_jsonable(params), warnings=found)


RewardRefit = Callable[[np.ndarray], np.ndarray]
"""Given (n,) row weights (bootstrap multiplicities), return (n, A) cross-fitted q_hat."""


def weighted_value(terms: Terms, weights: np.ndarray) -> float:
    """The estimator on a resample given as row multiplicities."""
    total = 0.0
    for num, den in zip(terms.num, terms.den, strict=True):
        d = float(weights.sum()) if den is None else float(weights @ den)
        total += float(weights @ num) / d if d != 0 else float("nan")
    return total


@single_threaded
def estimate_bandit(data: BanditData, action_dist: np.ndarray, q_hat: np.ndarray | None = None,
                    config: OPEConfig = OPEConfig(), warn: bool = True,
                    refit: RewardRefit | None = None, progress: bool = False) -> OPEResult:
    """All single-step estimators of the target ``action_dist`` (n, A) from ``data``.

    ``q_hat`` (n, A): reward-model predictions q(x_i, a), cross-fitted (see ``cross_fit``);
    without it only IPW, SNIPW and NCIS are computed. ``refit``: when given, every bootstrap
    resample refits the reward model (row weights = multiplicities), so the intervals of
    DM and its relatives include the model's own uncertainty; without it the model is held
    fixed (right for DR-type estimators to first order, too narrow for DM). ``default`` is
    always added. Emits an ``OPEWarning`` when the weights are extreme (``warn=False``).
    """
    clusters = Clusters.build(data.n, data.groups, config.n_boot, config.seed)
    base = BanditInputs(np.asarray(data.reward, dtype=np.float64),
                        importance_weights(data, action_dist))
    x = base if q_hat is None else base.with_model(q_hat, action_dist, data.action)
    params = choose_params(x, config, clusters)
    terms = model_free_terms(x, params)
    if q_hat is not None:
        terms.update(model_based_terms(x, params))
    replicates = {name: clusters.replicates(t) for name, t in terms.items()}
    if q_hat is not None and refit is not None:
        rows = range(config.n_boot)
        if progress:
            from tqdm import tqdm

            rows = tqdm(rows, desc="bootstrap (refit reward model)", leave=False)
        for b in rows:
            m = clusters.counts[b][clusters.index]  # (n,) row multiplicities
            xb = base.with_model(refit(m), action_dist, data.action)
            for name, t in model_based_terms(xb, params).items():
                replicates[name][b] = weighted_value(t, m)
    jackknives = {name: clusters.jackknife(t) for name, t in terms.items()}
    estimates = {
        name: summarise(name, t.value(), replicates[name],
                        effective_weights(name, x.weight, params[name]), config, params[name],
                        data.n, jackknives[name])
        for name, t in terms.items()
    }
    weights = weight_diagnostics(x.weight, config)
    honest = [k for k in config.default_candidates
              if refit is not None or k not in MODEL_VARIANCE_NEEDS_REFIT]
    estimates["default"], replicates["default"] = blend_default(estimates, replicates, config,
                                                                weights, honest, jackknives)
    if warn:
        for message in weights.warnings:
            warnings.warn(message, OPEWarning, stacklevel=2)
    return OPEResult(estimates, weights, replicates)


def blend_default(estimates: dict[str, Estimate], replicates: dict[str, np.ndarray],
                  config: OPEConfig, weights: WeightDiagnostics,
                  candidates: Sequence[str] | None = None,
                  jackknives: dict[str, np.ndarray] | None = None,
                  ) -> tuple[Estimate, np.ndarray]:
    """MAGIC-style blend: x on the simplex minimising x'(Cov + b b')x (see module doc)."""
    names = [k for k in (candidates or config.default_candidates) if k in estimates]
    values = np.array([estimates[k].value for k in names])
    reps = np.stack([replicates[k] for k in names], axis=1)  # (B, E)
    ok = np.all(np.isfinite(reps), axis=1)
    reference = estimates.get(config.default_reference) or estimates[names[0]]
    bias = np.maximum(0.0, np.maximum(reference.ci_low - values, values - reference.ci_high))
    cov = np.cov(reps[ok], rowvar=False) if ok.sum() > 2 else np.eye(len(names))
    x = simplex_min_quadratic(np.atleast_2d(cov) + np.outer(bias, bias))
    blended = reps @ x
    jack = (np.stack([jackknives[k] for k in names], axis=1) @ x) if jackknives else None
    low, high = interval(blended, float(values @ x), jack, config)
    finite = blended[np.isfinite(blended)]
    estimate = Estimate(
        name="default", value=float(values @ x), ci_low=low, ci_high=high,
        std_error=float(finite.std(ddof=1)) if finite.size > 1 else float("nan"),
        ess=weights.ess, n=reference.n,
        params={"rule": "magic", "reference": reference.name,
                "blend": {k: round(float(v), 4) for k, v in zip(names, x, strict=True)
                          if v > 1e-4}},
        warnings=weights.warnings)
    return estimate, blended


def simplex_min_quadratic(omega: np.ndarray) -> np.ndarray:
    """argmin over the probability simplex of x' omega x (omega PSD, small E), exactly, by
    enumerating supports: on a support S the optimum is omega_S^+ 1 / (1' omega_S^+ 1)."""
    e = omega.shape[0]
    best, best_x = math.inf, np.full(e, 1.0 / e)
    scale = float(np.trace(omega)) / e or 1.0
    om = omega / scale + 1e-10 * np.eye(e)
    for size in range(1, e + 1):
        for support in itertools.combinations(range(e), size):
            idx = list(support)
            sub = om[np.ix_(idx, idx)]
            y = np.linalg.lstsq(sub, np.ones(size), rcond=None)[0]
            total = y.sum()
            if total <= 0 or np.any(y < -1e-12):
                continue
            x = np.zeros(e)
            x[idx] = np.maximum(y, 0.0) / np.maximum(y, 0.0).sum()
            objective = float(x @ om @ x)
            if objective < best - 1e-12:
                best, best_x = objective, x
    return best_x


def _jsonable(params: dict) -> dict:
    """inf → "inf" so JSON summaries stay valid."""
    out = {}
    for key, value in params.items():
        if isinstance(value, float) and math.isinf(value):
            out[key] = "inf"
        elif isinstance(value, np.floating):
            out[key] = float(value)
        else:
            out[key] = value
    return out


# --------------------------------------------------------------------------------------
# Reward models
# --------------------------------------------------------------------------------------

def fold_ids(n: int, n_folds: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """(n,) fold of every row; rows of one group share a fold."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return rng.permutation(n) % n_folds
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    folds_of_group = rng.permutation(int(index.max()) + 1) % n_folds
    return folds_of_group[index]


FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray | None], np.ndarray]
"""fit_predict(train_rows, test_rows, train_weights or None) -> (len(test_rows), A)."""


def cross_fit(fit_predict: FitPredict, n: int, n_folds: int = 2, seed: int = 0,
              groups: np.ndarray | None = None,
              sample_weight: np.ndarray | None = None) -> np.ndarray:
    """Cross-fitted predictions: for each fold, ``fit_predict(train_rows, test_rows,
    weights)`` fits on the other folds (rows of weight 0 are left out) and returns
    (len(test_rows), A) predictions for the fold's rows, so no row is predicted by a model
    that saw its reward. Folds are fixed by ``seed`` (and ``groups``), not by the weights,
    so a bootstrap refit keeps the same split. Returns (n, A)."""
    if n_folds < 2:
        raise ValueError(f"cross-fitting needs n_folds >= 2, got {n_folds}")
    folds = fold_ids(n, n_folds, seed, groups)
    out: np.ndarray | None = None
    for k in range(n_folds):
        test = np.flatnonzero(folds == k)
        if sample_weight is None:
            train, train_w = np.flatnonzero(folds != k), None
        else:
            train = np.flatnonzero((folds != k) & (sample_weight > 0))
            train_w = np.asarray(sample_weight, dtype=np.float64)[train]
        if test.size == 0:
            continue
        pred = np.asarray(fit_predict(train, test, train_w), dtype=np.float64)
        if out is None:
            out = np.zeros((n, *pred.shape[1:]))
        out[test] = pred
    assert out is not None
    return out


def fit_logistic(x, y: np.ndarray, sample_weight: np.ndarray | None = None,  # noqa: ANN001
                 c: float = 1.0, max_iter: int = 50, tol: float = 1e-8,
                 init: tuple[np.ndarray, float] | None = None) -> tuple[np.ndarray, float]:
    """L2 logistic regression by Newton's method with backtracking: minimises
    sum_i s_i logloss(y_i, sigmoid(b + x_i' beta)) + ||beta||^2 / (2 c), the intercept b
    unpenalised (scikit-learn's objective), to a tight tolerance in a few iterations; ``x``
    (m, D) dense or scipy sparse; ``init`` a starting point (e.g. the full-sample fit when
    refitting a bootstrap resample: same optimum, fewer steps). Returns (beta (D,), b).
    Runs single-threaded (see ``single_threaded``)."""
    return _fit_logistic(x, y, sample_weight, c, max_iter, tol, init)


@single_threaded
def _fit_logistic(x, y, sample_weight, c, max_iter, tol, init):  # noqa: ANN001, ANN202
    import scipy.sparse as sp

    m, d = x.shape
    s = np.ones(m) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    xs = sp.csr_matrix(x) if sp.issparse(x) else np.asarray(x, dtype=np.float64)
    rate = float(np.clip((s @ y) / s.sum(), 1e-6, 1 - 1e-6))
    theta = np.zeros(d + 1)
    theta[-1] = math.log(rate / (1 - rate))
    if init is not None:
        theta[:-1], theta[-1] = init
    penalty = np.full(d + 1, 1.0 / c)
    penalty[-1] = 0.0

    def objective(t: np.ndarray) -> float:
        z = xs @ t[:-1] + t[-1]
        return float(s @ (np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(penalty * t * t))

    current = objective(theta)
    for _ in range(max_iter):
        z = xs @ theta[:-1] + theta[-1]
        p = 1.0 / (1.0 + np.exp(-z))
        g_lin = s * (p - y)
        grad = np.concatenate([xs.T @ g_lin, [g_lin.sum()]]) + penalty * theta
        h = s * p * (1 - p)
        if sp.issparse(xs):
            xh = xs.multiply(h[:, None]).tocsr()
            hxx = (xs.T @ xh).toarray()
            hx1 = np.asarray(xh.sum(axis=0)).ravel()
        else:
            hxx = xs.T @ (xs * h[:, None])
            hx1 = h @ xs
        hess = np.empty((d + 1, d + 1))
        hess[:d, :d], hess[:d, d], hess[d, :d], hess[d, d] = hxx, hx1, hx1, h.sum()
        hess[np.diag_indices(d + 1)] += penalty + 1e-10
        step = np.linalg.solve(hess, grad)
        size = 1.0
        while size > 1e-6:
            candidate = theta - size * step
            value = objective(candidate)
            if value <= current - 1e-4 * size * float(grad @ step):
                break
            size /= 2.0
        theta, previous, current = candidate, current, value
        if abs(previous - current) <= tol * max(1.0, abs(current)):
            break
    return theta[:-1], float(theta[-1])


# --------------------------------------------------------------------------------------
# Sessions: per-decision IS, per-decision DR, fitted-Q evaluation
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SessionData:
    """Logged sequential decisions, one row per decision, rows of an episode contiguous and
    in time order. episode (n,) ids; reward (n,); action (n,); pscore (n,) in (0, 1];
    groups (n,) optional bootstrap clusters (default: the episode)."""

    episode: np.ndarray
    reward: np.ndarray
    action: np.ndarray
    pscore: np.ndarray
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.episode)
        for name in ("reward", "action", "pscore"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"SessionData.{name} has {len(getattr(self, name))} rows, "
                                 f"episode has {n}")
        if n == 0:
            raise ValueError("SessionData needs at least one decision")
        e = np.asarray(self.episode)
        starts = np.concatenate([[True], e[1:] != e[:-1]])
        if len(np.unique(e)) != int(starts.sum()):
            raise ValueError("SessionData rows of one episode must be contiguous (sort by "
                             "episode, then time)")
        p = np.asarray(self.pscore, dtype=np.float64)
        if not np.all((p > 0) & (p <= 1)):
            raise ValueError("SessionData.pscore must be in (0, 1]")

    @property
    def n(self) -> int:
        return len(self.episode)

    @property
    def first(self) -> np.ndarray:
        """(n,) bool: first decision of its episode."""
        e = np.asarray(self.episode)
        return np.concatenate([[True], e[1:] != e[:-1]])

    @property
    def last(self) -> np.ndarray:
        """(n,) bool: last decision of its episode."""
        e = np.asarray(self.episode)
        return np.concatenate([e[1:] != e[:-1], [True]])

    @property
    def n_episodes(self) -> int:
        return int(self.first.sum())

    def cumulative_weights(self, action_dist: np.ndarray) -> np.ndarray:
        """(n,) rho_{0:t} = prod over the episode's decisions up to t of pi / mu."""
        pi = np.asarray(action_dist, dtype=np.float64)
        w = pi[np.arange(self.n), np.asarray(self.action, np.int64)] / np.asarray(self.pscore)
        log_w = np.log(np.maximum(w, 1e-300))
        zero = w == 0
        csum = np.cumsum(log_w)
        czero = np.cumsum(zero)
        start = np.flatnonzero(self.first)
        seg = np.cumsum(self.first) - 1
        base = np.concatenate([[0.0], csum])[start][seg]
        base_zero = np.concatenate([[0], czero])[start][seg]
        rho = np.exp(csum - base)
        rho[(czero - base_zero) > 0] = 0.0
        return rho


def pdis_terms(data: SessionData, rho: np.ndarray) -> Terms:
    """Per-decision IS: mean over episodes of sum_t rho_{0:t} r_t."""
    return Terms((rho * np.asarray(data.reward, np.float64),), (data.first.astype(float),))


def session_dr_terms(data: SessionData, rho: np.ndarray, q_logged: np.ndarray,
                     v_hat: np.ndarray) -> Terms:
    """Per-decision DR (Jiang & Li 2016): sum_t rho_{0:t}(r_t - Q(s_t, a_t)) +
    rho_{0:t-1} V(s_t), averaged over episodes."""
    rho_prev = np.where(data.first, 1.0, np.concatenate([[1.0], rho[:-1]]))
    r = np.asarray(data.reward, np.float64)
    return Terms((rho * (r - q_logged) + rho_prev * v_hat,), (data.first.astype(float),))


def fqe_terms(data: SessionData, v_hat: np.ndarray) -> Terms:
    """FQE: mean over episodes of V(s_0)."""
    first = data.first
    return Terms((np.where(first, v_hat, 0.0),), (first.astype(float),))


RegressorFactory = Callable[[], object]
"""Makes a fresh scikit-learn style regressor (fit(X, y), predict(X))."""


def fitted_q(states: np.ndarray, data: SessionData, action_dist: np.ndarray,
             rows: np.ndarray, make_regressor: RegressorFactory, n_iterations: int,
             n_actions: int) -> list:
    """Fitted-Q evaluation on the episodes of ``rows``: Q_{k+1}(s, a) fits r + V_k(s') with
    V_k(s') = sum_a' pi(a'|s') Q_k(s', a') (0 after the episode's last decision). One
    regressor per action; returns the final models [model_a for a in range(A)]."""
    x = states[rows]
    a = np.asarray(data.action, np.int64)[rows]
    r = np.asarray(data.reward, np.float64)[rows]
    last = data.last[rows]
    pi = np.asarray(action_dist, np.float64)[rows]
    next_row = np.minimum(np.arange(rows.size) + 1, rows.size - 1)
    models: list = [None] * n_actions
    q_next = np.zeros((rows.size, n_actions))
    for _ in range(n_iterations):
        v = np.sum(pi * q_next, axis=1)  # (m,) V_k at each row's own state
        target = r + np.where(last, 0.0, v[next_row])
        for action in range(n_actions):
            mask = a == action
            if mask.sum() < 2:
                models[action] = _Constant(float(target[mask].mean()) if mask.any() else 0.0)
                continue
            model = make_regressor()
            model.fit(x[mask], target[mask])
            models[action] = model
        q_next = np.stack([m.predict(x) for m in models], axis=1)
    return models


@dataclass
class _Constant:
    value: float

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.full(len(x), self.value)


@single_threaded
def cross_fitted_q(states: np.ndarray, data: SessionData, action_dist: np.ndarray,
                   make_regressor: RegressorFactory, n_iterations: int | None = None,
                   n_folds: int = 2, seed: int = 0) -> np.ndarray:
    """(n, A) Q(s_i, a) from FQE fitted on the other folds' episodes (episode-level folds)."""
    n_actions = np.shape(action_dist)[1]
    if n_iterations is None:
        lengths = np.diff(np.concatenate([np.flatnonzero(data.first), [data.n]]))
        n_iterations = int(lengths.max())
    groups = data.groups if data.groups is not None else data.episode

    def fit_predict(train: np.ndarray, test: np.ndarray, _: np.ndarray | None) -> np.ndarray:
        models = fitted_q(states, data, action_dist, train, make_regressor, n_iterations,
                          n_actions)
        return np.stack([m.predict(states[test]) for m in models], axis=1)

    return cross_fit(fit_predict, data.n, n_folds, seed, groups)


@dataclass
class LSTDQ:
    """Linear fitted-Q evaluation in closed form (LSTDQ, the fixed point that FQE with a
    linear regressor converges to): Q(s, a) = phi(s, a)' theta with phi = e_a (x) [1, z(s)],
    z the states standardised on the training rows; theta solves
    (Phi' W (Phi - Phi'_pi) + ridge sum(W) I) theta = Phi' W r, where Phi'_pi holds
    sum_a' pi(a'|s') phi(s', a') of the next decision (0 after the last) and W the row
    weights. The design is built once, so a bootstrap refit is one small solve."""

    mean: np.ndarray
    scale: np.ndarray
    phi: np.ndarray  # (m, A(d+1))
    phi_next: np.ndarray  # (m, A(d+1))
    reward: np.ndarray  # (m,)
    n_actions: int
    ridge: float

    @classmethod
    def design(cls, states: np.ndarray, data: SessionData, action_dist: np.ndarray,
               rows: np.ndarray, ridge: float = 1e-3) -> LSTDQ:
        n_actions = np.shape(action_dist)[1]
        x = states[rows]
        mean, scale = x.mean(axis=0), x.std(axis=0)
        scale[scale == 0] = 1.0
        psi = np.hstack([np.ones((len(x), 1)), (x - mean) / scale])  # (m, d+1)
        dim = psi.shape[1]
        a = np.asarray(data.action, np.int64)[rows]
        pi = np.asarray(action_dist, np.float64)[rows]
        last = data.last[rows]
        # rows of one episode are contiguous in ``rows`` (folds are episode-level)
        nxt = np.minimum(np.arange(rows.size) + 1, rows.size - 1)
        phi = np.zeros((rows.size, n_actions * dim))
        phi_next = np.zeros_like(phi)
        for action in range(n_actions):
            block = slice(action * dim, (action + 1) * dim)
            phi[a == action, block] = psi[a == action]
            phi_next[:, block] = np.where(last[:, None], 0.0,
                                          pi[nxt, action][:, None] * psi[nxt])
        return cls(mean, scale, phi, phi_next, np.asarray(data.reward, np.float64)[rows],
                   n_actions, ridge)

    def solve(self, weights: np.ndarray | None = None) -> np.ndarray:
        """(A, d+1) theta for row weights (None: all 1)."""
        w = np.ones(len(self.reward)) if weights is None else weights
        weighted = self.phi * w[:, None]
        lhs = weighted.T @ (self.phi - self.phi_next)
        lhs[np.diag_indices_from(lhs)] += self.ridge * max(float(w.sum()), 1.0)
        return np.linalg.solve(lhs, weighted.T @ self.reward).reshape(self.n_actions, -1)

    def predict(self, theta: np.ndarray, states: np.ndarray) -> np.ndarray:
        """(m, A) Q of ``states`` for every action."""
        basis = np.hstack([np.ones((len(states), 1)), (states - self.mean) / self.scale])
        return basis @ theta.T


def lstdq(states: np.ndarray, data: SessionData, action_dist: np.ndarray, rows: np.ndarray,
          ridge: float = 1e-3) -> Callable[[np.ndarray], np.ndarray]:
    """``q(states) -> (m, A)`` from LSTDQ fitted on ``rows`` (see ``LSTDQ``)."""
    model = LSTDQ.design(states, data, action_dist, rows, ridge)
    theta = model.solve()
    return lambda z: model.predict(theta, z)


def lstdq_model(states: np.ndarray, data: SessionData, action_dist: np.ndarray,
                n_folds: int = 2, seed: int = 0, ridge: float = 1e-3) -> RewardRefit:
    """Refittable cross-fitted linear FQE: ``model(weights or None) -> (n, A)`` Q(s_i, a)
    from the fit on the other folds' episodes (row weights: bootstrap multiplicities)."""
    groups = data.groups if data.groups is not None else data.episode
    designs: dict[int, LSTDQ] = {}

    def fit_predict(train: np.ndarray, test: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        fold = int(test[0])
        if fold not in designs:  # the unweighted call builds the fold's design on all rows
            designs[fold] = LSTDQ.design(states, data, action_dist, train, ridge)
        design = designs[fold]
        weights = None
        if w is not None:  # cross_fit drops zero-weight rows: put the weights back in place
            weights = np.zeros(len(design.reward))
            weights[np.searchsorted(design_rows[fold], train)] = w
        return design.predict(design.solve(weights), states[test])

    folds = fold_ids(data.n, n_folds, seed, groups)
    design_rows = {int(np.flatnonzero(folds == k)[0]): np.flatnonzero(folds != k)
                   for k in range(n_folds) if np.any(folds == k)}

    @single_threaded
    def predict(weights: np.ndarray | None = None) -> np.ndarray:
        if weights is not None and len(designs) < len(design_rows):
            predict(None)  # build the designs from the full training folds first
        return cross_fit(fit_predict, data.n, n_folds, seed, groups, sample_weight=weights)

    return predict


@single_threaded
def cross_fitted_lstdq(states: np.ndarray, data: SessionData, action_dist: np.ndarray,
                       n_folds: int = 2, seed: int = 0, ridge: float = 1e-3) -> np.ndarray:
    """(n, A) Q(s_i, a) from linear FQE (``LSTDQ``) fitted on the other folds' episodes."""
    return lstdq_model(states, data, action_dist, n_folds, seed, ridge)(None)


@single_threaded
def estimate_sessions(data: SessionData, action_dist: np.ndarray,
                      q_hat: np.ndarray | None = None,
                      config: OPEConfig = OPEConfig(), warn: bool = True,
                      refit: RewardRefit | None = None) -> OPEResult:
    """PDIS, and with ``q_hat`` (n, A) from FQE also per-decision DR and FQE itself: the
    mean per-episode value of the target ``action_dist`` (n, A). Bootstrap over episodes
    (or ``data.groups``); ESS of the cumulative weights at each episode's last decision.
    ``refit(weights) -> q_hat`` (e.g. ``lstdq_model``) refits the Q model in every
    resample, so FQE's interval includes the model's uncertainty."""
    groups = data.groups if data.groups is not None else data.episode
    clusters = Clusters.build(data.n, groups, config.n_boot, config.seed)
    rho = data.cumulative_weights(action_dist)
    final_rho = rho[data.last]
    parts: dict[str, tuple[Terms, np.ndarray | None, dict]] = {
        "pdis": (pdis_terms(data, rho), final_rho, {}),
    }
    if q_hat is not None:
        q = np.asarray(q_hat, np.float64)
        pi = np.asarray(action_dist, np.float64)
        v_hat = np.sum(pi * q, axis=1)
        q_logged = q[np.arange(data.n), np.asarray(data.action, np.int64)]
        parts["dr"] = (session_dr_terms(data, rho, q_logged, v_hat), final_rho, {})
        parts["fqe"] = (fqe_terms(data, v_hat), None, {})
    estimates, replicates = {}, {}
    for name, (terms, _, _) in parts.items():
        replicates[name] = clusters.replicates(terms)
    if q_hat is not None and refit is not None:
        for b in range(config.n_boot):
            m = clusters.counts[b][clusters.index]
            qb = np.asarray(refit(m), np.float64)
            vb = np.sum(np.asarray(action_dist, np.float64) * qb, axis=1)
            qlb = qb[np.arange(data.n), np.asarray(data.action, np.int64)]
            replicates["dr"][b] = weighted_value(session_dr_terms(data, rho, qlb, vb), m)
            replicates["fqe"][b] = weighted_value(fqe_terms(data, vb), m)
    for name, (terms, ess_w, params) in parts.items():
        estimates[name] = summarise(name, terms.value(), replicates[name], ess_w, config,
                                    params, data.n_episodes, clusters.jackknife(terms))
    weights = weight_diagnostics(final_rho, config)
    if warn:
        for message in weights.warnings:
            warnings.warn(message, OPEWarning, stacklevel=2)
    return OPEResult(estimates, weights, replicates)
