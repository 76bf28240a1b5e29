"""SL-MGAC: Supervised Learning-enhanced Multi-Group Actor Critic, offline, for inserting at most
one live stream per feed request (after Liu et al., KDD 2025, Kuaishou).

Read top to bottom: the hyperparameters, the networks, the bucketed value support, one
training step, the loop, the policy. What each piece is for:

1. The reward (``models.allocators.data.RewardConfig``) is anti-greedy: a request earns its
   total watch time, so a live is credited only net of the video watch it displaced, and an
   early session exit is charged ``exit_penalty_s``; a next-day return at the session's end
   earns ``retention_bonus_s``. An episode is one session; gamma discounts its steps.
2. Multi-group state decomposition: one shared encoder (TorchRec ``EmbeddingBagCollection``
   over user id / candidate author / hour, plus the dense state, through LayerNorm MLPs) and,
   for the actor and for the critic, one head per activity group (low / mid / high). A row
   goes through its own group's head only, so each head is fitted to one group's returns
   (less variance from mixing very different session lengths).
3. Supervised enhancement: multi-task reward heads on (state embedding, action) predict the
   request's live and video watch time, live click, follow, gift and session exit, trained
   jointly with the critic (dense signals shape the encoder the sparse ones share). Their
   expected immediate reward r_hat(s, a) is one part of Q: Q(s, a) = r_hat(s, a) + the
   critic's value of the rest of the return. The heads are fitted on every logged row by
   plain regression, so the immediate cost or gain of inserting (the biggest part of the
   difference between the two actions) comes with supervised-learning variance; the critic,
   fitted by bootstrapping, carries only what comes after (exits, fatigue, retention).
4. The critic is distributional over fixed buckets (a discretised value support fitted to
   the log's Monte-Carlo returns): its scalar target (the sampled residual r - r_hat(s, a)
   plus the later return, see ``train_step``) is mapped two-hot onto the buckets and
   learnt by cross-entropy, which with LayerNorm keeps bootstrapping error from compounding
   as squared-error regression on raw seconds does. The target sums ``n_step`` logged
   rewards before bootstrapping from the smaller of two critics' values under the actor
   (clipped double Q), so an interruption's cost to the rest of the session reaches
   Q(s, insert) quickly and one critic's overestimate of a rarely logged insert is not fed on.
5. The actor maximises the exact expectation over the two actions of Q(s, a), minus the
   Lagrange multiplier times P(insert), plus an entropy bonus, minus a KL to the logged
   propensity (an offline trust region). The multiplier does projected dual ascent on the
   live share (mean P(insert) over logged states) against ``live_share_cap - cap_margin``
   and is logged every step. The served policy is the Polyak-averaged network, its insert
   logit shifted by one constant so its share on the logged states is that bound, or the
   smaller share of states where the critic's Q(s, 1) > Q(s, 0) (``calibrate_share``).

Diagnostics logged (``on_log``): value_loss, head_loss, actor_loss, entropy, advantage mean
and std, q_gap (Q(s,1) - Q(s,0)), policy_share, lagrange_multiplier.

Distributed (``train_sl_mgac(..., rank=)``, ``recpipe train-allocator --nproc N``; see
``models.distributed``): the encoder's user / author / hour tables are sharded by TorchRec's
planner (fused kernel, ``embedding_optimizer``), in the online network and in the target
network alike (the target with the online network's plan, so Polyak averaging moves each
rank's own shards); the dense parts are replicated and their gradients averaged every step.
Every rank reads the whole log: the featurizer (vocabularies, normalisation) and the value
support are fitted on all of it, identically everywhere, but a rank samples its
``batch_size // W`` transitions per step only from its own share of the sessions (n-step
targets never leave a session). **The Lagrange multiplier is all-reduced**: every step the
ranks average their batch's policy share (with the other diagnostics) before the dual
ascent step, so all ranks hold the same multiplier, driven by the global batch's share as
one process's is. **The share calibration runs on rank 0** after training, on the gathered
(unsharded) served network and the whole log: exactly what one process computes for that
network.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType
from tqdm.auto import tqdm

from models.allocators.data import (
    HEAD_TARGETS,
    N_GROUPS,
    SPARSE_FEATURES,
    WATCH_TARGETS,
    AllocationDataset,
    AllocationFeaturizer,
    RewardConfig,
    StateInputs,
    at_request_cap,
    build_dataset,
    discounted_returns,
    state_columns,
)

if TYPE_CHECKING:
    from models.distributed import Rank, ShardingConfig

ALGO = "sl_mgac"


@dataclass(frozen=True)
class SLMGACConfig:
    """Every SL-MGAC hyperparameter (a checkpoint carries it; the MLflow run logs it)."""

    reward: RewardConfig = field(default_factory=RewardConfig)
    """The anti-greedy request reward (exit penalty, retention bonus, request cap)."""
    gamma: float = 0.95
    """Discount per request within a session."""
    live_share_cap: float = 0.3
    """Platform constraint: expected inserted lives per request must stay below this."""
    cap_margin: float = 0.10
    """The multiplier holds the share on logged states to cap - margin: the policy's own
    states are not the log's, and its on-policy share must stay under the cap."""
    embedding_dim: int = 8
    """D: width of the user / author / hour embedding tables."""
    hidden: int = 64
    """Width of the shared encoder and of every head."""
    n_buckets: int = 51
    """Atoms of the discretised value support."""
    n_critics: int = 2
    """Critic heads per group; the target takes the smallest expected value (clipped double
    Q), so the actor cannot feed on one critic's overestimate of a rarely logged insert."""
    n_step: int = 5
    """Logged steps summed before bootstrapping: the target is r_t + ... + g^(n-1) r_(t+n-1)
    + g^n V(s_(t+n)) with V under the actor, so an interruption's cost to the rest of the
    session reaches Q(s, insert) in one update instead of through n bootstrap rounds."""
    support_margin: float = 0.1
    """The support spans the log's discounted returns widened by this fraction each side."""
    n_steps: int = 2500
    """Gradient steps."""
    batch_size: int = 512
    """Transitions per step, sampled uniformly with replacement."""
    learning_rate: float = 1e-3
    """Adam learning rate for all parameters (cosine-decayed to ``final_lr_fraction`` of it)."""
    embedding_optimizer: str = "adam"
    """Optimiser of the embedding tables: "adam" (the one Adam of everything) or "adagrad",
    "rowwise_adagrad", "sgd" (the tables' own, same learning rate and schedule). Distributed
    training on CPU needs one of the latter (fbgemm's fused CPU kernel has no Adam; the CLI
    picks "adagrad" there)."""
    final_lr_fraction: float = 0.1
    """Learning rate at the last step as a fraction of the first."""
    target_tau: float = 0.01
    """Polyak rate of the target network (encoder, critics, actor, heads)."""
    serve_target: bool = True
    """Serve the Polyak-averaged (target) network's actor instead of the last iterate: the
    average of the last ~1/target_tau steps, so the policy does not depend on where the last
    noisy step happened to land."""
    head_loss_weight: float = 1.0
    """Weight of the multi-task reward-head loss next to the critic's cross-entropy."""
    entropy_coef_s: float = 5.0
    """Entropy bonus of the actor, in seconds of value per nat."""
    behaviour_kl_s: float = 2.5
    """Weight (seconds per nat) of KL(actor || logged propensity): offline trust region."""
    lagrange_lr: float = 20.0
    """Dual ascent step: seconds added to the multiplier per unit of share over the cap."""
    lagrange_max_s: float = 500.0
    """Upper clip of the Lagrange multiplier (seconds per inserted live)."""
    calibrate_share: bool = True
    """After training, shift the served actor's insert logit so its share on the logged
    states is ``live_share_cap - cap_margin``, or the critic's smaller share of states worth
    a live (see ``calibrate_share``)."""
    id_dropout: float = 0.3
    """Probability of replacing a row's user / author id by the OOV row while training, so
    the policy also works for users it has never seen."""
    min_id_count: int = 2
    """Ids seen fewer times in the training log share the OOV row."""
    seed: int = 0
    """Seeds parameter init and batch sampling."""
    log_every: int = 50
    """Steps between diagnostics callbacks (averaged over those steps)."""
    progress: bool = True
    """Show a progress bar (auto-off when not a terminal)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SLMGACConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown SLMGACConfig fields: {sorted(unknown)}")
        values = dict(data)
        if isinstance(values.get("reward"), dict):
            values["reward"] = RewardConfig(**values["reward"])
        return cls(**values)


# --- Networks -------------------------------------------------------------------------------


def id_features(ids: dict[str, np.ndarray]) -> KeyedJaggedTensor:
    """One id per row and feature → KeyedJaggedTensor with keys SPARSE_FEATURES."""
    n = ids[SPARSE_FEATURES[0]].shape[0]
    values = np.concatenate([ids[name] for name in SPARSE_FEATURES]).astype(np.int64)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(SPARSE_FEATURES), values=torch.from_numpy(values),
        lengths=torch.ones(n * len(SPARSE_FEATURES), dtype=torch.int64),
    )


def mlp(in_dim: int, hidden: int, out_dim: int | None = None) -> nn.Sequential:
    """Linear → LayerNorm → ReLU, then a Linear to ``out_dim`` if given."""
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden), nn.LayerNorm(hidden), nn.ReLU()]
    if out_dim is not None:
        layers.append(nn.Linear(hidden, out_dim))
    return nn.Sequential(*layers)


class StateEncoder(nn.Module):
    """Shared state embedding: ids (EmbeddingBagCollection) ‖ dense → (B, H). The model never
    knows how its tables are sharded (DistributedModelParallel would wrap it from outside)."""

    def __init__(self, n_dense: int, vocab_sizes: dict[str, int], dim: int, hidden: int) -> None:
        super().__init__()
        self.embeddings = EmbeddingBagCollection(
            tables=[EmbeddingBagConfig(name=f"t_{name}", embedding_dim=dim,
                                       num_embeddings=vocab_sizes[name], feature_names=[name],
                                       pooling=PoolingType.SUM)
                    for name in SPARSE_FEATURES],
            device=torch.device("cpu"),
        )
        self.body = nn.Sequential(mlp(n_dense + dim * len(SPARSE_FEATURES), hidden),
                                  mlp(hidden, hidden))

    def forward(self, ids: KeyedJaggedTensor, dense: torch.Tensor) -> torch.Tensor:
        pooled = self.embeddings(ids).values()  # (B, S * D)
        return self.body(torch.cat([dense, pooled], dim=1))  # (B, H)


class GroupHeads(nn.Module):
    """One two-layer head per activity group over the shared embedding (Linear → LayerNorm →
    ReLU → Linear, weights stacked on a leading group axis). Every row is scored by all G heads
    and keeps only its own group's output, so head g's parameters receive gradient from the
    rows of group g only."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, n_groups: int = N_GROUPS) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(n_groups, in_dim, hidden) / in_dim**0.5)  # (G, I, H)
        self.b1 = nn.Parameter(torch.zeros(n_groups, hidden))  # (G, H)
        self.ln_scale = nn.Parameter(torch.ones(n_groups, hidden))  # (G, H)
        self.ln_shift = nn.Parameter(torch.zeros(n_groups, hidden))  # (G, H)
        self.w2 = nn.Parameter(torch.randn(n_groups, hidden, out_dim) / hidden**0.5)  # (G, H, O)
        self.b2 = nn.Parameter(torch.zeros(n_groups, out_dim))  # (G, O)

    def forward(self, h: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        z = torch.einsum("bi,gih->bgh", h, self.w1) + self.b1  # (B, G, H)
        z = F.layer_norm(z, z.shape[-1:]) * self.ln_scale + self.ln_shift
        every = torch.einsum("bgh,gho->bgo", z.relu(), self.w2) + self.b2  # (B, G, O)
        return every[torch.arange(h.shape[0]), group]  # (B, O)


class ValueBuckets(nn.Module):
    """The discretised critic support: ``n`` evenly spaced atoms on [low, high] (seconds).

    ``encode`` maps a scalar target two-hot onto its two neighbouring atoms, with weights
    that make ``decode(encode(y)) == y`` for every y in [low, high] (targets outside are
    clipped to the ends)."""

    def __init__(self, low: float, high: float, n: int) -> None:
        super().__init__()
        if not (n >= 2 and high > low):
            raise ValueError(f"need n >= 2 and high > low, got n={n}, [{low}, {high}]")
        self.register_buffer("atoms", torch.linspace(low, high, n))  # (n,)

    @property
    def low(self) -> float:
        return float(self.atoms[0])

    @property
    def high(self) -> float:
        return float(self.atoms[-1])

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) targets → (B, n) two-hot probabilities; a NaN target gives a NaN row (the
        loss turns NaN and training stops as diverged, on every rank at once)."""
        n = self.atoms.shape[0]
        position = (y.clamp(self.low, self.high) - self.low) / (self.high - self.low) * (n - 1)
        lower = position.floor().clamp(max=n - 2).nan_to_num(0.0)  # (B,) a valid index
        upper_weight = (position - lower).unsqueeze(1)  # (B, 1)
        probs = torch.zeros(y.shape[0], n, dtype=self.atoms.dtype, device=y.device)
        probs.scatter_(1, lower.long().unsqueeze(1), 1.0 - upper_weight)
        probs.scatter_add_(1, lower.long().unsqueeze(1) + 1, upper_weight)
        return probs  # (B, n)

    def decode(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., n) probabilities → (...) expected value."""
        return probs @ self.atoms


class SLMGACModel(nn.Module):
    """Encoder + group-specific critic and actor heads + multi-task reward heads."""

    def __init__(self, n_dense: int, vocab_sizes: dict[str, int], config: SLMGACConfig,
                 support: tuple[float, float]) -> None:
        super().__init__()
        h = config.hidden
        self.encoder = StateEncoder(n_dense, vocab_sizes, config.embedding_dim, h)
        self.critics = nn.ModuleList(GroupHeads(h, h, 2 * config.n_buckets)
                                     for _ in range(config.n_critics))
        self.actor = GroupHeads(h, h, 1)
        self.reward_heads = mlp(h + 2, h, len(HEAD_TARGETS))
        self.buckets = ValueBuckets(support[0], support[1], config.n_buckets)
        self.register_buffer("insert_shift", torch.zeros(()))  # set by calibrate_share
        self.n_buckets = config.n_buckets
        self.n_critics = config.n_critics

    def embed(self, x: StateInputs) -> torch.Tensor:
        return self.encoder(id_features(x.ids), torch.from_numpy(x.dense))  # (B, H)

    def q_logits(self, h: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        every = torch.stack([critic(h, group) for critic in self.critics], dim=1)  # (B, C, 2n)
        return every.view(-1, self.n_critics, 2, self.n_buckets)  # (B, C, 2, n)

    def q_values(self, h: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        """(B, C, 2) expected value of each critic and action."""
        return self.buckets.decode(self.q_logits(h, group).softmax(dim=-1))

    def insert_logit(self, h: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
        return self.actor(h, group).squeeze(1) + self.insert_shift  # (B,)

    def heads(self, h: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        a = F.one_hot(action, 2).to(h.dtype)  # (B, 2)
        return self.reward_heads(torch.cat([h, a], dim=1))  # (B, K)


# --- Training -------------------------------------------------------------------------------


def bernoulli_kl(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """KL(Bernoulli(p) || Bernoulli(q)) elementwise."""
    p, q = p.clamp(eps, 1 - eps), q.clamp(eps, 1 - eps)
    return p * (p / q).log() + (1 - p) * ((1 - p) / (1 - q)).log()


def fit_support(data: AllocationDataset, config: SLMGACConfig) -> tuple[float, float]:
    """[low, high] of the discounted Monte-Carlo returns, widened by ``support_margin``."""
    returns = discounted_returns(data.reward, data.next_index, config.gamma)
    low, high = float(returns.min()), float(returns.max())
    pad = config.support_margin * max(high - low, 1.0)
    return low - pad, high + pad


def drop_ids(x: StateInputs, rate: float, rng: np.random.Generator) -> StateInputs:
    """User / author ids replaced by the OOV row 0 with probability ``rate`` each."""
    if rate <= 0:
        return x
    ids = dict(x.ids)
    for name in ("user_id", "candidate_author_id"):
        ids[name] = np.where(rng.random(ids[name].shape[0]) < rate, 0, ids[name])
    return StateInputs(x.dense, ids, x.group)


def concat_inputs(a: StateInputs, b: StateInputs) -> StateInputs:
    """Rows of ``a`` then rows of ``b`` (one encoder pass for a batch and its next states)."""
    return StateInputs(np.concatenate([a.dense, b.dense]),
                       {k: np.concatenate([a.ids[k], b.ids[k]]) for k in a.ids},
                       np.concatenate([a.group, b.group]))


def immediate_reward(model: SLMGACModel, h: torch.Tensor, action: torch.Tensor,
                     early: torch.Tensor, config: SLMGACConfig) -> torch.Tensor:
    """r_hat(s, a) (B,): the reward heads' expected immediate reward of ``action``: predicted
    live + video watch minus the exit penalty times the predicted exit probability (``early``
    (B,) is 0 at the request cap, where no exit is early)."""
    out = model.heads(h, action)  # (B, K)
    watch = 60.0 * out[:, :WATCH_TARGETS].sum(dim=1)  # (B,) seconds
    p_exit = torch.sigmoid(out[:, HEAD_TARGETS.index("session_end")])
    return watch - config.reward.exit_penalty_s * p_exit * early


def action_values(model: SLMGACModel, h: torch.Tensor, group: torch.Tensor,
                  early: torch.Tensor, config: SLMGACConfig) -> torch.Tensor:
    """(B, C, 2) Q(s, a) = r_hat(s, a) + the critics' expected rest of the return."""
    rest = model.q_values(h, group)  # (B, C, 2)
    r_hat = torch.stack([immediate_reward(model, h, torch.full_like(group, a), early, config)
                         for a in (0, 1)], dim=1)  # (B, 2)
    return rest + r_hat.unsqueeze(1)


@dataclass
class LagrangeMultiplier:
    """Dual variable of the live-share constraint E[P(insert)] <= cap (seconds per live)."""

    cap: float
    """The constraint's bound."""
    lr: float
    """Seconds added per unit of share above the cap, per update."""
    max_value: float
    """Upper clip."""
    value: float = 0.0
    """Current multiplier (>= 0)."""

    def update(self, share: float) -> float:
        """One projected dual-ascent step on the observed share; returns the new value."""
        self.value = float(np.clip(self.value + self.lr * (share - self.cap), 0.0,
                                   self.max_value))
        return self.value


@dataclass(frozen=True)
class NStepTargets:
    """Per row t: the discounted logged rewards of steps t+1 .. t+n-1 of its episode, the row
    of step t+n (-1 when the episode ends before it) and its discount g^n, all (N,)."""

    later_rewards: np.ndarray
    bootstrap_row: np.ndarray
    bootstrap_discount: np.ndarray

    @classmethod
    def build(cls, data: AllocationDataset, n: int, gamma: float) -> NStepTargets:
        rows = np.arange(len(data))
        later, current, discount = np.zeros(len(data)), data.next_index.copy(), np.ones(len(data))
        for _ in range(n - 1):
            alive = current >= 0
            discount = np.where(alive, discount * gamma, discount)
            later += np.where(alive, discount * data.reward[np.maximum(current, 0)], 0.0)
            current = np.where(alive, data.next_index[np.maximum(current, 0)], -1)
        alive = current >= 0
        return cls(later, np.where(alive, current, rows), np.where(alive, discount * gamma, 0.0))


def train_step(model: SLMGACModel, target: SLMGACModel,
               optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer],
               data: AllocationDataset, nstep: NStepTargets, rows: np.ndarray,
               lagrange: LagrangeMultiplier, config: SLMGACConfig,
               rng: np.random.Generator, replicas: Replicas | None = None
               ) -> dict[str, float]:
    """One gradient step on the transitions ``rows``; returns its diagnostics.

    ``replicas`` (distributed): ``model`` and ``target`` are the modules of sharded DMPs;
    dense gradients are averaged over the ranks, the target moves shard by shard, and the
    diagnostics (the policy share among them, hence the multiplier) are averaged over the
    ranks before the dual step."""
    optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
    x = drop_ids(data.inputs.take(rows), config.id_dropout, rng)
    x_boot = drop_ids(data.inputs.take(nstep.bootstrap_row[rows]), config.id_dropout, rng)
    group, group_boot = torch.from_numpy(x.group), torch.from_numpy(x_boot.group)
    action = torch.from_numpy(data.action[rows])  # (B,)
    batch = torch.arange(rows.shape[0])

    h, h_boot = model.embed(concat_inputs(x, x_boot)).split(rows.shape[0])  # (B, H) each
    early = torch.from_numpy(~data.at_cap[rows]).float()
    early_boot = torch.from_numpy(~data.at_cap[nstep.bootstrap_row[rows]]).float()
    # Critic target: what the return adds to the reward heads' r_hat(s, a) of the logged
    # action: its sampled residual r - r_hat, the next n-1 logged rewards, then the value
    # under the current actor of the state n steps on, Q through the target critics (the
    # smaller of their estimates) plus r_hat. The immediate difference between inserting and
    # skipping is thus carried by the supervised heads (fitted on every row, low variance)
    # and the critics only learn what comes after.
    with torch.no_grad():
        h_target_boot = target.embed(x_boot)
        q_boot = action_values(target, h_target_boot, group_boot, early_boot,
                               config).min(dim=1).values  # (B, 2)
        pi_boot = torch.sigmoid(model.insert_logit(h_boot, group_boot))  # (B,)
        v_boot = (1 - pi_boot) * q_boot[:, 0] + pi_boot * q_boot[:, 1]
        sampled = torch.from_numpy(data.reward[rows]).float()
        residual = sampled - immediate_reward(model, h, action, early, config)
        y = (residual + torch.from_numpy(nstep.later_rewards[rows]).float()
             + torch.from_numpy(nstep.bootstrap_discount[rows]).float() * v_boot)  # (B,)
        target_probs = model.buckets.encode(y)  # (B, n)
    every = model.q_logits(h, group)  # (B, C, 2, n)
    logits = every[batch, :, action]  # (B, C, n) of the logged action
    value_loss = -(target_probs.unsqueeze(1) * logits.log_softmax(dim=-1)).sum(dim=-1).mean()

    # Multi-task reward heads on the logged action (watch in minutes: MSE; funnel: BCE).
    out = model.heads(h, action)  # (B, K)
    targets = torch.from_numpy(data.targets[rows])  # (B, K)
    head_loss = (F.mse_loss(out[:, :WATCH_TARGETS], targets[:, :WATCH_TARGETS])
                 + F.binary_cross_entropy_with_logits(out[:, WATCH_TARGETS:],
                                                      targets[:, WATCH_TARGETS:]))

    # Actor: exact expectation over both actions of Q - mu * insert, + entropy - KL to logs.
    with torch.no_grad():
        q = action_values(model, h, group, early, config).mean(dim=1)  # (B, 2)
    pi = torch.sigmoid(model.insert_logit(h.detach(), group))  # (B,)
    p_logged = torch.from_numpy(data.p_insert[rows]).float()
    entropy = -(pi.clamp_min(1e-6).log() * pi + (1 - pi).clamp_min(1e-6).log() * (1 - pi))
    objective = (pi * (q[:, 1] - lagrange.value) + (1 - pi) * q[:, 0]
                 + config.entropy_coef_s * entropy
                 - config.behaviour_kl_s * bernoulli_kl(pi, p_logged))
    actor_loss = -objective.mean()

    loss = value_loss + config.head_loss_weight * head_loss + actor_loss
    for each in optimizers:
        each.zero_grad()
    loss.backward()
    if replicas is not None:
        replicas.rank.average_gradients(replicas.dense)
    for each in optimizers:
        each.step()
    with torch.no_grad():
        if replicas is None:
            torch._foreach_lerp_(list(target.parameters()), list(model.parameters()),
                                 config.target_tau)
        else:
            replicas.polyak(config.target_tau)
    v = (1 - pi.detach()) * q[:, 0] + pi.detach() * q[:, 1]
    advantage = q[batch, action] - v  # (B,) of the logged action
    stats = {
        "value_loss": value_loss.item(), "head_loss": head_loss.item(),
        "actor_loss": actor_loss.item(), "entropy": entropy.detach().mean().item(),
        "advantage_mean": float(advantage.mean()), "advantage_std": float(advantage.std()),
        "q_gap": float((q[:, 1] - q[:, 0]).mean()), "q_mean": float(v.mean()),
        "policy_share": float(pi.detach().mean()),
    }
    if replicas is not None:  # the global batch's means, the same on every rank
        stats = dict(zip(stats, replicas.rank.all_mean(list(stats.values())).tolist(),
                         strict=True))
    stats["lagrange_multiplier"] = lagrange.update(stats["policy_share"])
    return stats


@dataclass
class Replicas:
    """The distributed side of a training step: the rank, the dense (replicated) parameters
    whose gradients are averaged, and the sharded online / target DMPs Polyak moves."""

    rank: Rank
    dense: list[nn.Parameter]
    online: nn.Module
    target: nn.Module
    parameter_names: set[str]
    described: dict = field(default_factory=dict)
    """World size, backend, per-rank batch, sharding and plan (the step's ``distributed``)."""

    def polyak(self, tau: float) -> None:
        from models.distributed import polyak_update

        polyak_update(self.target, self.online, tau, self.parameter_names)


LogCallback = Callable[[int, dict[str, float]], None]


def train_sl_mgac(frame: pl.DataFrame, config: SLMGACConfig = SLMGACConfig(),
                  on_log: LogCallback | None = None, rank: Rank | None = None,
                  sharding: ShardingConfig | None = None) -> SLMGACPolicy | None:
    """Train on a validated allocation log (``data.read_allocation_log``); returns the policy.

    Distributed (``rank`` given; every ``torchrun`` rank calls this with the whole log, see
    the module docstring): tables sharded per ``sharding``, transitions drawn from this
    rank's sessions, ``on_log`` on every rank with diagnostics averaged over the ranks; rank
    0 returns the policy of the gathered network (calibrated there), the others None.

    Raises:
        FloatingPointError: if a loss becomes NaN or infinite (never register such a model).
    """
    from models.training import make_table_optimiser

    torch.manual_seed(config.seed)
    featurizer = AllocationFeaturizer.fit(frame, config.min_id_count)
    data = build_dataset(frame, featurizer, config.reward)
    support = fit_support(data, config)
    model = SLMGACModel(featurizer.n_dense, featurizer.vocab_sizes, config, support)
    target = copy.deepcopy(model).requires_grad_(False)
    rows_from = np.arange(len(data))  # the rows this process samples transitions from
    batch_size, replicas = config.batch_size, None
    online, trained_target = model, target  # what the steps run
    if rank is not None:
        rows_from, replicas, online, trained_target = _shard_sl_mgac(
            frame, model, config, rank, sharding)
        batch_size = replicas.described["per_rank_batch"]
    rng = np.random.default_rng(config.seed + (0 if rank is None else 1_000_003 * rank.rank))
    if replicas is not None:
        optimizers = [torch.optim.Adam(replicas.dense, lr=config.learning_rate, foreach=True)]
    elif config.embedding_optimizer != "adam":
        tables = make_table_optimiser(model, config.embedding_optimizer, config.learning_rate)
        in_tables = {id(p) for group in tables.param_groups for p in group["params"]}
        optimizers = [torch.optim.Adam([p for p in model.parameters() if id(p) not in in_tables],
                                       lr=config.learning_rate, foreach=True), tables]
    else:
        optimizers = [torch.optim.Adam(model.parameters(), lr=config.learning_rate,
                                       foreach=True)]
    schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(
        each, T_max=config.n_steps, eta_min=config.learning_rate * config.final_lr_fraction)
        for each in optimizers]
    lagrange = LagrangeMultiplier(config.live_share_cap - config.cap_margin, config.lagrange_lr,
                                  config.lagrange_max_s)
    nstep = NStepTargets.build(data, config.n_step, config.gamma)
    window: list[dict[str, float]] = []
    online.train()
    show = config.progress and (rank is None or rank.is_main)
    for step in tqdm(range(1, config.n_steps + 1), desc="sl-mgac", disable=not show or None,
                     leave=False):
        rows = rows_from[rng.integers(0, len(rows_from), batch_size)]
        stats = train_step(online, trained_target, optimizers, data, nstep, rows, lagrange,
                           config, rng, replicas)
        if not all(math.isfinite(v) for v in stats.values()):  # all ranks: the same means
            raise FloatingPointError(f"SL-MGAC diverged at step {step}: {stats}")
        for schedule in schedules:
            schedule.step()
        if replicas is not None:  # the fused tables follow the dense schedule
            from models.distributed import set_embedding_learning_rate

            set_embedding_learning_rate(replicas.online, schedules[0].get_last_lr()[0])
        window.append(stats)
        if on_log is not None and (step % config.log_every == 0 or step == config.n_steps):
            on_log(step, {k: float(np.mean([s[k] for s in window])) for k in stats})
            window = []
    served = target if config.serve_target else model
    if replicas is not None:
        from models.distributed import full_state_dict

        state = full_state_dict(replicas.target if config.serve_target else replicas.online,
                                rank)  # a collective; the full state on rank 0 only
        if not rank.is_main:
            return None
        served.load_state_dict(state)
    served = served.requires_grad_(False).eval()
    if config.calibrate_share:
        calibrate_share(served, data, config)
    policy = SLMGACPolicy(served, featurizer, config, support)
    if replicas is not None:
        policy.distributed = replicas.described
    return policy


def _shard_sl_mgac(frame: pl.DataFrame, model: SLMGACModel, config: SLMGACConfig, rank: Rank,
                   sharding: ShardingConfig | None):
    """This rank's rows (those of its share of the sessions), its ``Replicas`` and the
    modules the steps run: the online and target networks as DMPs with sharded tables (the
    target planned like the online network). ``model`` stays the plain twin."""
    from models.distributed import (
        ShardingConfig,
        dense_parameters,
        per_rank_batch,
        shard_keys,
        shard_model,
    )

    sessions = frame["session_id"].to_numpy()
    mine = shard_keys(sessions, rank.rank, rank.world_size)
    if rank.all_min(len(mine)) == 0:
        raise ValueError(f"the log has fewer sessions than the {rank.world_size} ranks")
    rows = np.flatnonzero(np.isin(sessions, mine))
    sharding = sharding or ShardingConfig()
    online, plan, described = shard_model(copy.deepcopy(model), rank, sharding,
                                          config.embedding_optimizer, config.learning_rate,
                                          data_parallel=False)
    target, _, _ = shard_model(copy.deepcopy(model), rank, sharding, config.embedding_optimizer,
                               config.learning_rate, data_parallel=False, plan=plan)
    replicas = Replicas(rank, dense_parameters(online), online, target,
                        {name for name, _ in model.named_parameters()},
                        {**rank.to_dict(),
                         "per_rank_batch": per_rank_batch(config.batch_size, rank.world_size),
                         "sharding": sharding.to_dict(), "plan": described})
    return rows, replicas, online.module, target.module


@torch.no_grad()
def calibrate_share(model: SLMGACModel, data: AllocationDataset, config: SLMGACConfig) -> float:
    """Shift the actor's insert logit by one constant so that its mean P(insert) over the
    logged states equals the share the constrained problem asks for; returns the shift.

    That share is the bound ``live_share_cap - cap_margin``, or less where the critic sees
    fewer logged states worth a live: min(bound, share of states with Q(s,1) > Q(s,0)), the
    share of the constrained optimum given Q (insert where the gap beats a multiplier that
    makes the bound hold). The dual ascent holds the bound only on average over training;
    with a value gap of 100+ seconds between the actions it swings between inserting almost
    everywhere and almost nowhere, and the served (averaged) network lands wherever the last
    swing left it. One shift keeps the actor's ranking of requests (which to insert into
    first) and only sets how many.
    """
    h = model.embed(data.inputs)
    group = torch.tensor(data.inputs.group)  # a copy: the log's arrays are read-only
    early = torch.from_numpy(~data.at_cap).float()
    q = action_values(model, h, group, early, config).mean(dim=1)  # (N, 2)
    worth = float((q[:, 1] > q[:, 0]).double().mean())
    target_share = min(config.live_share_cap - config.cap_margin, worth)
    logits = model.insert_logit(h, group).double()  # (N,)
    low, high = -50.0, 50.0  # the share grows with the shift
    for _ in range(60):
        middle = (low + high) / 2
        if torch.sigmoid(logits + middle).mean() > target_share:
            high = middle
        else:
            low = middle
    model.insert_shift += low
    return low


# --- The policy -----------------------------------------------------------------------------


class SLMGACPolicy:
    """The trained actor as an ``AllocationPolicy``: observable state → P(insert) (B,).

    ``id_features=False`` (see ``AllocationFeaturizer.transform``) scores users and authors
    as unseen, for rollouts in another world than the training log's."""

    algo = ALGO
    distributed: dict | None = None
    """How it was trained when distributed (``train_sl_mgac(..., rank=)``); not saved."""

    def __init__(self, model: SLMGACModel, featurizer: AllocationFeaturizer,
                 config: SLMGACConfig, support: tuple[float, float],
                 id_features: bool = True) -> None:
        self.model = model.eval()
        self.featurizer = featurizer
        self.config = config
        self.support = support
        self.id_features = id_features
        self.name = f"sl-mgac-seed{config.seed}"

    def with_id_features(self, enabled: bool) -> SLMGACPolicy:
        """A copy that does (or does not) use the learnt user / author embeddings."""
        other = copy.copy(self)
        other.id_features = enabled
        return other

    @torch.no_grad()
    def scores(self, state: Any) -> dict[str, np.ndarray]:
        """P(insert), Q(s, 0), Q(s, 1) and the group of every request, each (B,)."""
        x = self.featurizer.transform(state, self.id_features)
        if len(x) == 0:
            empty = np.zeros(0)
            return {"p_insert": empty, "q_skip": empty, "q_insert": empty, "group": empty}
        group = torch.tensor(x.group)  # a copy: state arrays may be read-only
        h = self.model.embed(x)
        early = torch.from_numpy(~at_request_cap(state_columns(state)["request_index"],
                                                 self.config.reward.max_requests_per_session))
        early = early.float()  # (B,)
        q = action_values(self.model, h, group, early, self.config).mean(dim=1)
        q = q.numpy().astype(np.float64)  # (B, 2)
        p = torch.sigmoid(self.model.insert_logit(h, group)).numpy().astype(np.float64)
        return {"p_insert": p, "q_skip": q[:, 0], "q_insert": q[:, 1], "group": x.group}

    def __call__(self, state: Any) -> np.ndarray:
        return self.scores(state)["p_insert"]

    def save(self, directory: Path) -> None:
        """Checkpoint: the config, the featurizer, the value support and the state dict."""
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(self.model.state_dict(), directory / "state_dict.pt")
        (directory / "policy.json").write_text(json.dumps({
            "algo": ALGO, "config": self.config.to_dict(), "support": list(self.support),
            "featurizer": self.featurizer.to_dict(),
        }))

    @classmethod
    def load(cls, directory: Path) -> SLMGACPolicy:
        meta = json.loads((directory / "policy.json").read_text())
        config = replace(SLMGACConfig.from_dict(meta["config"]), progress=False)
        featurizer = AllocationFeaturizer.from_dict(meta["featurizer"])
        support = (float(meta["support"][0]), float(meta["support"][1]))
        model = SLMGACModel(featurizer.n_dense, featurizer.vocab_sizes, config, support)
        state = torch.load(directory / "state_dict.pt", map_location="cpu", weights_only=True)
        model.load_state_dict(state)
        return cls(model, featurizer, config, support)
