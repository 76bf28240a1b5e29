"""Distributed training: TorchRec ``DistributedModelParallel`` over ``torchrun`` ranks.

``recpipe train-ranker --nproc N`` (and ``recpipe pretrain`` / ``recpipe train-allocator
--algo sl_mgac``, see below) starts ``torchrun`` (``python -m torch.distributed.run``, through
``flows.torchrun``); every rank calls ``init_rank`` and then the same training step as a
single process. For the ranker:

- **model parallel embeddings**: ``shard_ranker`` plans the ranker's embedding tables with
  TorchRec's ``EmbeddingShardingPlanner`` constrained to table-wise and column-wise sharding
  (``ShardingConfig``), each table placed whole (or cut into column slices) on some rank and
  looked up there through all-to-all exchanges. The tables use TorchRec's fused kernel: the
  embedding optimiser runs inside the backward pass (``apply_optimizer_in_backward``).
- **data parallel dense parts**: everything else (attention, experts, gates, towers) is
  replicated and wrapped in ``DistributedDataParallel`` by DMP; gradients are averaged.
- **data**: rank r of W reads rows r, r + W, r + 2W, ... of ``train.parquet`` (``read_shard``:
  a lazy Polars scan that materialises only this rank's rows), cut to ``N // W`` rows so every
  rank runs the same number of equally sized steps (collectives never wait on a rank that ran
  out of data; at most W - 1 rows are left out).
- **batches**: each rank takes ``batch_size // W`` rows per step, so the global batch (what one
  optimiser step averages over) stays ``batch_size`` and a run with W ranks takes the same
  number of steps per epoch, at the same learning rate, as one process. Dense gradients are
  averaged by DDP; TorchRec divides the embedding gradients that come back through the
  all-to-all by W (``comm_ops.GRADIENT_DIVISION``), so both are the global-batch mean. With
  ``TrainConfig.shuffle=False`` the union of the ranks' step-s batches *is* the single-process
  step-s batch, and training is the same computation up to float summation order (a test
  checks this); with shuffling each rank permutes its own shard with its own seed.
- **the saved model is unsharded**: ``full_state_dict`` gathers every sharded table to rank 0
  as one plain tensor of its full size, and the step loads it into a plain single-process
  ranker for evaluation and for ``models.registry.log_ranker``; serving never sees shards.

CPU (gloo) note: fbgemm-gpu-cpu's fused embedding kernel implements only Adagrad, row-wise
Adagrad and SGD on CPU (its Adam is GPU-only), and TorchRec offers its dense (non-fused)
kernel for data-parallel tables only, so a CPU run trains the sharded tables with
``TrainConfig.embedding_optimizer`` = "adagrad" (the default the CLI picks there) while the
dense parts keep Adam. A single process given the same ``embedding_optimizer`` trains the
same way (``models.training.fit``). On GPU (nccl) the fused kernel's Adam is available.

The same pieces serve the other TorchRec models, whose training loops call several methods
of the model per step (``encode_tokens`` and the item table for masked item prediction; the
encoder, critics, actor and reward heads of SL-MGAC) rather than one ``forward``, and change
the set of parameters they use between stages: ``shard_model(..., data_parallel=False)``
shards their tables the same way but leaves the dense parts plain (no DDP hooks), and the
loop averages their gradients itself with ``Rank.average_gradients`` (one flat all-reduce
per step). ``polyak_update`` moves a sharded target network (sharded with the same plan)
towards its online network shard by shard.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingCollection

SHARDING_TYPES: tuple[str, ...] = ("table_wise", "column_wise")
"""Sharding types the planner may use here: whole tables or column slices per rank.
Row-wise is not offered (not asked for; it splits every table's rows across all ranks), nor
data-parallel (it would replicate the tables, which is what sharding avoids)."""
CPU_EMBEDDING_OPTIMIZERS: tuple[str, ...] = ("adagrad", "rowwise_adagrad", "sgd")
"""Embedding optimisers fbgemm-gpu-cpu's fused kernel implements on CPU."""
MIN_COLUMN_SHARD = 4
"""fbgemm needs column-shard widths divisible by 4."""
NOISE: tuple[str, ...] = (
    ".*`broadcast_buffers` is deprecated",  # TorchRec 1.8's own DDP wrapper
    ".*deprecating ShardedTensor",  # TorchRec 1.8's fused tables still hand these out
    ".*Grad strides do not match bucket view strides",  # a (1, H) tower weight: harmless
)
"""Warnings every rank would print on every run, about TorchRec internals; silenced."""


@dataclass(frozen=True)
class ShardingConfig:
    """How the planner may shard the embedding tables."""

    sharding_types: tuple[str, ...] = SHARDING_TYPES
    """Allowed sharding types, a subset of ``SHARDING_TYPES``; the planner picks one per
    table from its cost model."""
    column_shard_dim: int | None = None
    """Narrowest column slice column-wise sharding may cut (TorchRec's ``min_partition``);
    None: D // world_size (at least 4), so a column-wise table is spread over the ranks."""

    def __post_init__(self) -> None:
        unknown = set(self.sharding_types) - set(SHARDING_TYPES)
        if unknown or not self.sharding_types:
            raise ValueError(f"sharding_types must be a non-empty subset of {SHARDING_TYPES}, "
                             f"got {self.sharding_types}")

    @classmethod
    def from_name(cls, name: str) -> ShardingConfig:
        """``auto`` (planner's choice of table-wise / column-wise), ``table_wise`` or
        ``column_wise``."""
        if name == "auto":
            return cls()
        return cls(sharding_types=(name,))

    def to_dict(self) -> dict:
        return {"sharding_types": list(self.sharding_types),
                "column_shard_dim": self.column_shard_dim}


@dataclass(frozen=True)
class Rank:
    """This process's place in the process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only rank that logs, evaluates and writes."""
        return self.rank == 0

    def all_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` (float64) over the ranks."""
        tensor = torch.as_tensor(np.asarray(values, dtype=np.float64), device=self.device)
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def all_mean(self, values: np.ndarray) -> np.ndarray:
        """Element-wise mean of ``values`` over the ranks."""
        return self.all_sum(values) / self.world_size

    def all_min(self, value: int) -> int:
        """The smallest ``value`` over the ranks."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return int(tensor.item())

    def average_gradients(self, parameters) -> None:
        """Average the gradients of parameters outside DDP (the loss's own; every dense
        parameter of a model sharded with ``data_parallel=False``) over the ranks, in one
        flat all-reduce. A parameter without a gradient on some rank counts as zero there
        (the sum is still divided by W, as DDP does); one without a gradient on every rank
        keeps ``grad`` None, so an optimiser skips it as it would on one process."""
        parameters = [p for p in parameters if p.requires_grad]
        if not parameters:
            return
        parts = [p.grad.reshape(-1) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=p.dtype, device=p.device)
                 for p in parameters]
        present = torch.tensor([p.grad is not None for p in parameters], dtype=parts[0].dtype,
                               device=parts[0].device)
        flat = torch.cat([*parts, present])
        dist.all_reduce(flat)
        flat[:-len(parameters)] /= self.world_size
        offset = 0
        for parameter, seen in zip(parameters, flat[-len(parameters):].tolist(), strict=True):
            size = parameter.numel()
            if seen > 0:
                parameter.grad = flat[offset:offset + size].view_as(parameter).clone()
            offset += size

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend,
                "device": self.device.type}


def launched_by_torchrun() -> bool:
    """True inside a process that ``torchrun`` started (its env:// variables are set)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def per_rank_batch(batch_size: int, world_size: int) -> int:
    """Rows (or users, transitions) each of ``world_size`` ranks takes per step, so that one
    optimiser step sees ``batch_size`` in all, as one process would.

    Raises:
        ValueError: unless the ranks divide ``batch_size`` evenly, at least 2 each (batch
            norm and in-batch statistics need two).
    """
    if batch_size % world_size or batch_size // world_size < 2:
        raise ValueError(f"batch size {batch_size} does not split into {world_size} equal "
                         "per-rank batches of at least 2: use a multiple of the number of "
                         f"ranks, at least {2 * world_size}")
    return batch_size // world_size


def init_rank() -> Rank:
    """Join the process group ``torchrun`` set up (env://): nccl with one GPU per local rank
    when CUDA is available, else gloo on CPU."""
    if not launched_by_torchrun():
        raise RuntimeError("init_rank() runs in a process started by torchrun "
                           "(RANK, WORLD_SIZE and MASTER_ADDR are not set)")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device, backend = torch.device("cuda", local_rank), "nccl"
        torch.cuda.set_device(device)
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    for message in NOISE:
        warnings.filterwarnings("ignore", message=message)
    return Rank(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shard_rows(n_rows: int, rank: int, world_size: int) -> np.ndarray:
    """Row indices of rank ``rank``'s shard: ``rank, rank + W, ...``, ``n_rows // W`` of them
    (every rank the same count; the last ``n_rows % W`` rows belong to nobody)."""
    per_rank = n_rows // world_size
    return np.arange(rank, per_rank * world_size, world_size, dtype=np.int64)


def shard_keys(keys: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s share of some keys (users, sessions): every W-th of the sorted
    distinct keys, starting at the rank's index. All keys are used (shares differ by at most
    one): whatever is sampled per rank draws the same count on every rank itself."""
    return np.unique(keys)[rank::world_size]


def read_shard(path: Path, rank: int, world_size: int) -> pl.DataFrame:
    """This rank's rows of a Parquet file (``shard_rows``), read lazily: only they are
    materialised. ValueError when the file has fewer rows than ranks."""
    scan = pl.scan_parquet(path)
    n_rows = scan.select(pl.len()).collect().item()
    if n_rows < world_size:
        raise ValueError(f"{path} has {n_rows} rows, fewer than the {world_size} ranks")
    return scan.gather_every(world_size, offset=rank).head(n_rows // world_size).collect()


def global_label_means(labels: np.ndarray, rank: Rank) -> torch.Tensor:
    """(1, K) mean of every task's observed labels over all ranks' shards (NaN where no rank
    observes the task): what ``init_output_bias`` needs, identical on every rank."""
    observed = ~np.isnan(labels)
    sums = rank.all_sum(np.stack([np.where(observed, labels, 0.0).sum(0),
                                  observed.sum(0)]).astype(np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(sums[1] > 0, sums[0] / np.maximum(sums[1], 1), np.nan)
    return torch.from_numpy(means.astype(np.float32)).unsqueeze(0)


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The TorchRec embedding modules of ``model`` by path (what the planner shards)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, EmbeddingBagCollection | EmbeddingCollection)}


def embedding_optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The torch optimiser class TorchRec maps onto fbgemm's fused kernel for ``name``."""
    from torchrec.optim import RowWiseAdagrad

    classes = {"adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
               "rowwise_adagrad": RowWiseAdagrad, "sgd": torch.optim.SGD}
    if name not in classes:
        raise ValueError(f"unknown embedding optimiser {name!r}; choose one of {sorted(classes)}")
    return classes[name]


def embedding_optimizer_kwargs(name: str, learning_rate: float, weight_decay: float) -> dict:
    """Hyperparameters of the embedding optimiser, the same for the single-process torch
    optimiser and fbgemm's fused kernel (Adagrad's eps is fbgemm's default, 1e-8)."""
    kwargs: dict = {"lr": learning_rate, "weight_decay": weight_decay}
    if name in ("adagrad", "rowwise_adagrad", "adam"):
        kwargs["eps"] = 1e-8
    return kwargs


def check_embedding_optimizer(name: str, device: torch.device) -> None:
    """ValueError when fbgemm's fused kernel cannot run ``name`` on ``device``."""
    embedding_optimizer_class(name)
    if device.type == "cpu" and name not in CPU_EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"embedding optimiser {name!r} has no fused CPU kernel in fbgemm-gpu-cpu; "
            f"distributed training on CPU needs one of {CPU_EMBEDDING_OPTIMIZERS} "
            "(--embedding-optimizer adagrad)")


def sharding_plan(model: nn.Module, rank: Rank, config: ShardingConfig, sharders: list):
    """TorchRec's plan for the trainable embedding tables of ``model`` (computed on rank 0,
    broadcast). A module whose parameters are all frozen (a frozen pretrained user encoder)
    is left out of the plan: DMP then leaves it a plain replicated module, untouched by any
    optimiser."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
    from torchrec.distributed.planner.storage_reservations import (
        FixedPercentageStorageReservation,
    )
    from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig

    modules = embedding_modules(model)
    constraints = {}
    for module in modules.values():
        configs = (module.embedding_bag_configs() if isinstance(module, EmbeddingBagCollection)
                   else module.embedding_configs())
        for table in configs:
            width = config.column_shard_dim or max(MIN_COLUMN_SHARD,
                                                   table.embedding_dim // rank.world_size)
            constraints[table.name] = ParameterConstraints(
                sharding_types=list(config.sharding_types), compute_kernels=["fused"],
                min_partition=width)
    topology = TopologyFactory.create_topology(
        TrainerConfig(world_size=rank.world_size,
                      local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", rank.world_size))),
        kernel_config=KernelConfig(compute_device=rank.device.type))
    planner = EmbeddingShardingPlanner(
        topology=topology, constraints=constraints, debug=False,
        storage_reservation=FixedPercentageStorageReservation(0.15))
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    for path, module in modules.items():
        if not any(p.requires_grad for p in module.parameters()):
            plan.plan.pop(path, None)
    return plan


def _no_data_parallel():
    """A DMP data-parallel wrapper that leaves the unsharded modules plain (no DDP)."""
    from torchrec.distributed.model_parallel import DataParallelWrapper

    class NoDataParallel(DataParallelWrapper):
        def wrap(self, dmp, env, device) -> None:  # noqa: ANN001 (TorchRec's signature)
            return None

    return NoDataParallel()


def shard_model(model: nn.Module, rank: Rank, config: ShardingConfig,
                embedding_optimizer: str, learning_rate: float, weight_decay: float = 0.0,
                data_parallel: bool = True, plan=None):  # noqa: ANN001 (a ShardingPlan)
    """Wrap ``model`` (built identically on every rank) in ``DistributedModelParallel``:
    trainable embedding tables sharded by the planner with the fused ``embedding_optimizer``,
    the rest replicated, under DDP when ``data_parallel`` (else plain: the caller averages
    their gradients with ``Rank.average_gradients`` and calls ``dmp.module``'s methods
    directly). ``plan``: a plan to reuse instead of planning (a target network sharded like
    its online network). The tables start from ``model``'s own initial values, so a run
    starts where a single process with the same seed starts. ``model`` is modified in place
    (its embedding modules are replaced by sharded ones): deep-copy it first for a plain
    copy. Returns (the DMP, the plan, ``describe_plan`` of it)."""
    if weight_decay > 0:
        raise ValueError(f"the fused {embedding_optimizer} kernel of the sharded tables does "
                         f"not apply weight decay ({weight_decay}); use weight_decay=0 with "
                         "--nproc")
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import get_default_sharders
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    check_embedding_optimizer(embedding_optimizer, rank.device)
    initial = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    trainable = [p for module in embedding_modules(model).values()
                 for p in module.parameters() if p.requires_grad]
    if trainable:
        apply_optimizer_in_backward(
            embedding_optimizer_class(embedding_optimizer), trainable,
            embedding_optimizer_kwargs(embedding_optimizer, learning_rate, weight_decay))
    sharders = get_default_sharders()
    plan = plan if plan is not None else sharding_plan(model, rank, config, sharders)
    dmp = DistributedModelParallel(
        model, device=rank.device, plan=plan, sharders=sharders,
        data_parallel_wrapper=None if data_parallel else _no_data_parallel())
    load_full_state(dmp, initial)
    return dmp, plan, describe_plan(plan)


def shard_ranker(model: nn.Module, rank: Rank, config: ShardingConfig,
                 embedding_optimizer: str, learning_rate: float, weight_decay: float = 0.0):
    """``shard_model`` for a ranker (dense parts under DDP). Returns (the DMP,
    ``describe_plan`` of its plan)."""
    dmp, _, described = shard_model(model, rank, config, embedding_optimizer, learning_rate,
                                    weight_decay)
    return dmp, described


@torch.no_grad()
def polyak_update(target: nn.Module, source: nn.Module, tau: float,
                  names: set[str] | None = None) -> None:
    """target <- target + tau (source - target) for every state entry in ``names`` (default:
    all floating ones), two DMPs sharded with the same plan (or two plain modules): each
    rank moves its own shards of the sharded tables and its replica of the rest."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    def local(value: torch.Tensor) -> list[torch.Tensor]:
        if isinstance(value, DTensor):
            value = value.to_local()
        if isinstance(value, ShardedTensor):
            return [shard.tensor for shard in value.local_shards()]
        return [value]

    ours, theirs = [], []
    source_state = source.state_dict()
    for name, value in target.state_dict().items():
        if (names is not None and name not in names) or not value.is_floating_point():
            continue
        ours += local(value)
        theirs += local(source_state[name])
    if ours:
        torch._foreach_lerp_(ours, theirs, tau)


def set_embedding_learning_rate(dmp: nn.Module, learning_rate: float) -> None:
    """Set the learning rate of the fused table optimisers (the kernel reads it at the next
    ``zero_grad`` / ``step`` of ``dmp.fused_optimizer``): a schedule for the tables."""
    for group in dmp.fused_optimizer.param_groups:
        group["lr"] = learning_rate
    dmp.fused_optimizer.zero_grad()


def describe_plan(plan) -> dict[str, dict]:
    """``{"<module>.<table>": {"sharding_type", "ranks", "shards"}}`` of a ShardingPlan
    (``shards``: every shard's [rows, columns])."""
    tables = {}
    for module, params in plan.plan.items():
        for table, spec in params.items():
            placements = spec.sharding_spec.shards if spec.sharding_spec is not None else []
            tables[f"{module}.{table}"] = {
                "sharding_type": spec.sharding_type, "ranks": sorted(set(spec.ranks or [])),
                "shards": [list(s.shard_sizes) for s in placements]}
    return tables


def _plain_sharded_keys(state: dict) -> tuple[set[str], set[str]]:
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    sharded = {k for k, v in state.items() if isinstance(v, ShardedTensor | DTensor)}
    return set(state) - sharded, sharded


@torch.no_grad()
def load_full_state(dmp: nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Copy full (unsharded) tensors into ``dmp``: every local shard takes its slice (by the
    shard's offsets), replicated tensors are copied whole."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    for name, target in dmp.state_dict().items():
        source = full[name]
        if isinstance(target, DTensor):
            target = target.to_local()
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                rows, cols = shard.metadata.shard_offsets
                height, width = shard.tensor.shape
                shard.tensor.copy_(source[rows:rows + height, cols:cols + width])
        else:
            target.copy_(source.to(target.device))


@torch.no_grad()
def full_state_dict(dmp: nn.Module, rank: Rank) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict of ``dmp`` on rank 0 (plain CPU tensors of full size, keys as
    in the plain model), None on the other ranks. A collective: every rank must call it.
    Replicated floating buffers (BatchNorm running statistics, which each rank updates from
    its own batches) are averaged over the ranks; replicated parameters must be identical
    everywhere (checked: ReplicasDivergedError on every rank otherwise)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    buffers = {name for name, _ in dmp.named_buffers()}
    state = dmp.state_dict()
    check_replicas_agree({name: value for name, value in state.items()
                          if type(value) is torch.Tensor and name not in buffers
                          and value.is_floating_point()})
    out: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        if isinstance(value, DTensor):
            full = value.full_tensor()
        elif isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=rank.device) \
                if rank.is_main else None
            value.gather(dst=0, out=full)
        elif name in buffers and value.is_floating_point():
            full = value.detach().clone()
            dist.all_reduce(full)
            full /= rank.world_size
        else:
            full = value.detach()
        if rank.is_main:
            out[name] = full.detach().cpu().clone()
    return out if rank.is_main else None


class ReplicasDivergedError(RuntimeError):
    """A replicated (data-parallel) parameter differs between ranks."""


def check_replicas_agree(replicated: dict[str, torch.Tensor]) -> None:
    """Raise ReplicasDivergedError (on every rank: all see the same extremes) unless every
    tensor of ``replicated`` (name → this rank's copy) is bit-identical on all ranks. They
    are whenever each step averaged the dense gradients over the ranks; a rank that stepped
    on its own gradients would otherwise save only its own half-trained copy. A collective."""
    if not replicated:
        return
    flat = torch.cat([value.detach().reshape(-1).double() for value in replicated.values()])
    finite = torch.tensor([float(torch.isfinite(flat).all())], device=flat.device)
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank decides alike
    if finite.item() < 1:  # NaN differs from itself: say what is really wrong
        broken = [name for name, value in replicated.items() if not value.isfinite().all()]
        raise FloatingPointError(f"non-finite parameters after training (on some rank): "
                                 f"{broken[:5]}")
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    differs, offset = [], 0
    for name, value in replicated.items():
        size = value.numel()
        if not torch.equal(high[offset:offset + size], low[offset:offset + size]):
            differs.append(name)
        offset += size
    if differs:
        raise ReplicasDivergedError(
            f"replicated parameters differ between ranks (their gradients were not averaged "
            f"every step): {differs[:5]}{' ...' if len(differs) > 5 else ''}")


def dense_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters not updated in the backward pass by a fused embedding kernel."""
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    return [p for _, p in in_backward_optimizer_filter(model.named_parameters())
            if p.requires_grad]


def move_batch(batch, device: torch.device):
    """A ``RankerBatch`` on ``device`` (itself on CPU)."""
    if device.type == "cpu":
        return batch
    from dataclasses import fields, replace

    return replace(batch, **{f.name: getattr(batch, f.name).to(device, non_blocking=True)
                             for f in fields(batch)})
