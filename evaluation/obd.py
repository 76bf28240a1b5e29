"""The Open Bandit Dataset (ZOZOTOWN) and its off-policy benchmark, without ``obp``.

Layout read: ``<data>/{random,bts}/{all,men,women}/{campaign}.csv`` plus
``item_context.csv`` beside each, and ``<data>/prior_bts.yaml`` (the production Bernoulli TS
prior per campaign). One row per (impression, slot): ``item_id``, ``position`` (1-3),
``click``, ``propensity_score`` (the logging policy's probability of that item in that
slot), user features and user-item affinities.

The benchmark (Saito et al. 2021): estimate the value (CTR per slot impression) of the
Bernoulli TS policy from the uniform-random logs, or of the random policy from the BTS
logs; the truth is the mean click of the evaluation policy's own logs. The BTS policy's
action-choice probabilities per slot come from Monte-Carlo sampling of its Beta posteriors
with the prior only (alpha, beta from the yaml; no reward counts), each draw ranking the
items by sampled CTR and filling the slots top-down, as obp's ``BernoulliTS`` with
``is_zozotown_prior=True`` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from evaluation.ope import (
    BanditData,
    OPEConfig,
    RewardRefit,
    cross_fit,
    estimate_bandit,
    fit_logistic,
)

CAMPAIGNS: tuple[str, ...] = ("all", "men", "women")
POLICIES: tuple[str, ...] = ("random", "bts")
LEN_LIST = 3
"""Slots per recommendation in ZOZOTOWN's widget."""


class OBDError(ValueError):
    """The Open Bandit data is missing or malformed (a user error: exit 2 in the CLI)."""


@dataclass(frozen=True)
class OBDLog:
    """One policy's logs of one campaign. n rows, K items."""

    policy: str
    campaign: str
    item: np.ndarray
    """(n,) int item id in [0, K)."""
    position: np.ndarray
    """(n,) int slot in [0, 3)."""
    click: np.ndarray
    """(n,) float 0/1."""
    pscore: np.ndarray
    """(n,) logging propensity of (item, slot)."""
    user_features: np.ndarray
    """(n, 4) str hashed categorical user features."""
    affinity: np.ndarray
    """(n, K) float user-item affinity."""
    item_context: pl.DataFrame
    """K rows: item_id, item_feature_0 (float), item_feature_1..3 (categorical)."""

    @property
    def n(self) -> int:
        return len(self.item)

    @property
    def n_items(self) -> int:
        return self.affinity.shape[1]


def load_obd(data_dir: Path | str, policy: str, campaign: str) -> OBDLog:
    """Read one ``<data>/<policy>/<campaign>/<campaign>.csv`` (sorted by time)."""
    if policy not in POLICIES:
        raise OBDError(f"policy must be one of {POLICIES}, got {policy!r}")
    if campaign not in CAMPAIGNS:
        raise OBDError(f"campaign must be one of {CAMPAIGNS}, got {campaign!r}")
    folder = Path(data_dir) / policy / campaign
    path, context_path = folder / f"{campaign}.csv", folder / "item_context.csv"
    for file in (path, context_path):
        if not file.is_file():
            raise OBDError(f"{file} not found: --data must be the Open Bandit folder holding "
                           "random/ and bts/ (e.g. ../shared/data/obd)")
    frame = pl.read_csv(path).sort("timestamp")
    needed = ["item_id", "position", "click", "propensity_score",
              *(f"user_feature_{i}" for i in range(4))]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise OBDError(f"{path}: missing columns {missing}")
    items = pl.read_csv(context_path).sort("item_id")
    n_items = items.height
    affinity_cols = [f"user-item_affinity_{k}" for k in range(n_items)]
    missing = [c for c in affinity_cols if c not in frame.columns]
    if missing:
        raise OBDError(f"{path}: missing affinity columns for {len(missing)} items")
    item = frame["item_id"].to_numpy().astype(np.int64)
    if item.min() < 0 or item.max() >= n_items:
        raise OBDError(f"{path}: item_id outside [0, {n_items})")
    position = frame["position"].to_numpy().astype(np.int64) - 1
    if position.min() < 0 or position.max() >= LEN_LIST:
        raise OBDError(f"{path}: position outside 1..{LEN_LIST}")
    pscore = frame["propensity_score"].to_numpy().astype(np.float64)
    if not np.all((pscore > 0) & (pscore <= 1)):
        raise OBDError(f"{path}: propensity_score outside (0, 1]")
    return OBDLog(
        policy=policy, campaign=campaign, item=item, position=position,
        click=frame["click"].to_numpy().astype(np.float64), pscore=pscore,
        user_features=frame.select(f"user_feature_{i}" for i in range(4)).to_numpy().astype(str),
        affinity=frame.select(affinity_cols).to_numpy().astype(np.float64),
        item_context=items,
    )


def load_prior(data_dir: Path | str, campaign: str) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, beta) of the production Bernoulli TS prior of ``campaign``."""
    import yaml

    path = Path(data_dir) / "prior_bts.yaml"
    if not path.is_file():
        raise OBDError(f"{path} not found (the ZOZOTOWN Bernoulli TS prior)")
    prior = yaml.safe_load(path.read_text())
    if campaign not in prior:
        raise OBDError(f"{path}: no prior for campaign {campaign!r}")
    return (np.asarray(prior[campaign]["alpha"], dtype=np.float64),
            np.asarray(prior[campaign]["beta"], dtype=np.float64))


def bts_action_dist(alpha: np.ndarray, beta: np.ndarray, len_list: int = LEN_LIST,
                    n_sim: int = 100_000, seed: int = 0) -> np.ndarray:
    """(K, len_list) P(item k in slot j) of Bernoulli Thompson sampling with Beta(alpha,
    beta) beliefs, by Monte Carlo: each draw samples a CTR per item, ranks the items by it
    and fills the slots top-down."""
    k = len(alpha)
    rng = np.random.default_rng(seed)
    counts = np.zeros((k, len_list))
    chunk = 20_000
    for start in range(0, n_sim, chunk):
        size = min(chunk, n_sim - start)
        draws = rng.beta(alpha, beta, size=(size, k))  # (S, K)
        top = np.argpartition(-draws, len_list - 1, axis=1)[:, :len_list]  # (S, L) unordered
        order = np.argsort(-np.take_along_axis(draws, top, axis=1), axis=1)
        ranked = np.take_along_axis(top, order, axis=1)  # (S, L) slot 0 first
        for slot in range(len_list):
            counts[:, slot] += np.bincount(ranked[:, slot], minlength=k)
    return counts / n_sim


def random_action_dist(n_items: int, len_list: int = LEN_LIST) -> np.ndarray:
    """(K, len_list): the uniform random policy shows each item in each slot w.p. 1/K."""
    return np.full((n_items, len_list), 1.0 / n_items)


def evaluation_action_dist(data_dir: Path | str, evaluation: str, campaign: str,
                           n_items: int, n_sim: int, seed: int) -> np.ndarray:
    """(K, 3) slot-wise action distribution of the evaluation policy."""
    if evaluation == "random":
        return random_action_dist(n_items)
    if evaluation == "bts":
        alpha, beta = load_prior(data_dir, campaign)
        if len(alpha) != n_items:
            raise OBDError(f"the {campaign} prior has {len(alpha)} items, the logs {n_items}")
        return bts_action_dist(alpha, beta, n_sim=n_sim, seed=seed)
    raise OBDError(f"evaluation policy must be one of {POLICIES}, got {evaluation!r}")


# --------------------------------------------------------------------------------------
# Reward model: logistic regression on user, item and slot features, cross-fitted
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Design:
    """Pieces of the linear design: logit(i, a) = user[i] + item[a] + slot[i] + aff[i, a]."""

    user: np.ndarray  # (n, Du) one-hot user features
    item: np.ndarray  # (K, Di) item one-hot + item features
    slot: np.ndarray  # (n, 3) one-hot position
    affinity: np.ndarray  # (n, K) standardised affinity

    def logged(self, rows: np.ndarray, items: np.ndarray):  # noqa: ANN201 (scipy CSR)
        """(m, D) sparse design of the logged (row, item) pairs."""
        import scipy.sparse as sp

        return sp.csr_matrix(np.hstack([self.user[rows], self.item[items], self.slot[rows],
                                        self.affinity[rows, items][:, None]]))

    def all_items(self, coef: np.ndarray, intercept: float, rows: np.ndarray) -> np.ndarray:
        """(m, K) logits of every item for ``rows`` (the design is additive, so no
        (m * K, D) matrix is built)."""
        du, di = self.user.shape[1], self.item.shape[1]
        cu, ci, cs, ca = coef[:du], coef[du:du + di], coef[du + di:du + di + 3], coef[-1]
        return (intercept + (self.user[rows] @ cu)[:, None] + (self.item @ ci)[None, :]
                + (self.slot[rows] @ cs)[:, None] + ca * self.affinity[rows])


def _one_hot(values: np.ndarray) -> np.ndarray:
    _, index = np.unique(values, return_inverse=True)
    out = np.zeros((len(values), int(index.max()) + 1))
    out[np.arange(len(values)), index] = 1.0
    return out


def reward_design(log: OBDLog) -> _Design:
    """Features for the reward model (labels are not used, so no leakage across folds)."""
    user = np.hstack([_one_hot(log.user_features[:, j])
                      for j in range(log.user_features.shape[1])])
    ctx = log.item_context
    f0 = ctx["item_feature_0"].to_numpy().astype(np.float64)
    f0 = (f0 - f0.mean()) / (f0.std() or 1.0)
    cats = [_one_hot(ctx[c].to_numpy().astype(str)) for c in ctx.columns
            if c.startswith("item_feature_") and c != "item_feature_0"]
    item = np.hstack([np.eye(log.n_items), f0[:, None], *cats])
    slot = np.eye(LEN_LIST)[log.position]
    aff = log.affinity
    aff = (aff - aff.mean()) / (aff.std() or 1.0)
    return _Design(user, item, slot, aff)


def reward_model(log: OBDLog, n_folds: int = 3, seed: int = 0,
                 c: float = 1.0) -> RewardRefit:
    """A refittable, cross-fitted click model: ``model(weights)`` → (n, K) P(click | user,
    item k, the row's slot). L2 logistic regression (C=1, sklearn's default) on one-hot
    user features, item one-hot and item features, slot one-hot and the user-item
    affinity (fitted by ``evaluation.ope.fit_logistic``, scikit-learn's objective solved by
    Newton's method: tight and fast enough to refit in every bootstrap resample);
    ``weights`` None for the plain fit, bootstrap multiplicities for a refit."""
    design = reward_design(log)
    x_logged = design.logged(np.arange(log.n), log.item)  # (n, D) sparse
    full_fit: dict[int, tuple[np.ndarray, float]] = {}  # per fold: start of every refit

    def fit_predict(train: np.ndarray, test: np.ndarray, w: np.ndarray | None) -> np.ndarray:
        y = log.click[train]
        if y.min() == y.max():  # a fold without clicks: the constant rate
            return np.full((test.size, log.n_items), float(y.mean()))
        fold = int(test[0])
        coef, intercept = fit_logistic(x_logged[train], y, w, c=c, init=full_fit.get(fold))
        if w is None:
            full_fit[fold] = (coef, intercept)
        logit = design.all_items(coef, intercept, test)
        return 1.0 / (1.0 + np.exp(-logit))

    def predict(weights: np.ndarray | None = None) -> np.ndarray:
        return cross_fit(fit_predict, log.n, n_folds=n_folds, seed=seed,
                         sample_weight=weights)

    return predict


# --------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------

def relative_error(value: float, truth: float) -> float:
    return abs(value - truth) / abs(truth) if truth else float("nan")


def run_obd(data_dir: Path | str, campaign: str = "all", behavior: str = "random",
            evaluation: str = "bts", config: OPEConfig | None = None, n_sim: int = 100_000,
            n_folds: int = 3, refit: bool = True, warn: bool = True,
            progress: bool = False) -> dict:
    """Estimate the ``evaluation`` policy's CTR from the ``behavior`` policy's logs of
    ``campaign``; compare with the on-policy truth. Returns a JSON-ready summary:
    ``truth``, ``estimates`` {name: value, ci_low, ci_high, relative_error, ...}, weights.
    ``refit``: refit the reward model in every bootstrap resample (honest DM intervals).
    Seeds (Monte Carlo, folds, bootstrap) all come from ``config.seed``."""
    config = config or OPEConfig(n_boot=200)
    seed = config.seed
    log = load_obd(data_dir, behavior, campaign)
    own = load_obd(data_dir, evaluation, campaign)
    truth = float(own.click.mean())
    slot_dist = evaluation_action_dist(data_dir, evaluation, campaign, log.n_items, n_sim, seed)
    action_dist = slot_dist.T[log.position]  # (n, K): pi(item | row's slot)
    model = reward_model(log, n_folds=n_folds, seed=seed)
    data = BanditData(reward=log.click, action=log.item, pscore=log.pscore,
                      position=log.position)
    result = estimate_bandit(data, action_dist, model(None), config, warn=warn,
                             refit=model if refit else None, progress=progress)
    estimates = {}
    for name, est in result.estimates.items():
        row = est.to_dict()
        row["relative_error"] = relative_error(est.value, truth)
        row["covers_truth"] = bool(est.ci_low <= truth <= est.ci_high)
        estimates[name] = row
    return {
        "dataset": "obd", "campaign": campaign, "behavior": behavior, "evaluation": evaluation,
        "n": log.n, "n_items": log.n_items, "clicks": int(log.click.sum()),
        "truth": truth, "truth_n": own.n,
        "truth_std_error": float(own.click.std(ddof=1) / np.sqrt(own.n)),
        "estimates": estimates, "weights": result.weights.to_dict(),
        "config": {"n_boot": config.n_boot, "level": config.level, "seed": seed,
                   "n_sim": n_sim, "n_folds": n_folds, "refit": refit},
    }
