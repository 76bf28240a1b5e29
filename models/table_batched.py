"""A TorchRec EmbeddingBagCollection's lookups as one fbgemm table-batched call.

An unsharded ``EmbeddingBagCollection`` on CPU runs one ``nn.EmbeddingBag`` per feature, and
each backward builds a dense gradient for its table through a sort of its indices: for the
rankers' seven small lookups that was 40% of a mean-pooled MMoE's training step on CPU.
fbgemm's dense table-batched embedding op (what TorchRec's data-parallel kernel runs) does
every feature of the collection in one forward and one backward call. :func:`pooled_lookup`
runs it on the collection's own weight tensors (concatenated, so the gradient flows back
into each table's ``weight``): same parameters, same state dict, same function; the
optimiser is unchanged.

Anything this does not cover (a sharded collection under DistributedModelParallel, weighted
features, mixed pooling, forward hooks, non-CPU or non-float32 tables, or feature keys in
another order) runs the collection's own forward.
"""

from __future__ import annotations

import functools
import warnings
from itertools import accumulate
from math import log2

import torch
from torchrec import EmbeddingBagCollection, KeyedJaggedTensor, KeyedTensor, PoolingType

AUTOGRAD_FALLBACK_WARNING = (
    "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered")
"""PyTorch warns in every backward through the op: fbgemm registers it at the CPU key and its
CPU kernel records its own autograd graph (the gradients are checked against the collection's
in tests/models/test_table_batched.py), so the warning says nothing here."""
warnings.filterwarnings("ignore", message=AUTOGRAD_FALLBACK_WARNING)

_POOLING_MODES = {PoolingType.SUM: 0, PoolingType.MEAN: 1}
"""fbgemm's ``PoolingMode`` values."""


def pooled_lookup(collection: torch.nn.Module, features: KeyedJaggedTensor) -> KeyedTensor:
    """``collection(features)``: a KeyedTensor of (B, D) per feature, (B, sum D) in all."""
    if type(collection) is not EmbeddingBagCollection:  # e.g. sharded by DMP
        return collection(features)
    weights = [bag.weight for bag in collection.embedding_bags.values()]  # (rows_t, D_t) each
    plan = _plan(collection, features, weights)
    if plan is None:
        return collection(features)
    flat = torch.cat([weight.reshape(-1) for weight in weights])  # (sum rows_t * D_t,)
    values = torch.ops.fbgemm.dense_embedding_codegen_lookup_function(
        dev_weights=flat,
        weights_offsets=plan.weights_offsets,
        D_offsets=plan.dim_offsets,
        total_D=plan.total_dim,
        max_D=plan.max_dim,
        hash_size_cumsum=plan.hash_size_cumsum,
        total_hash_size_bits=plan.total_hash_size_bits,
        indices=features.values(),
        offsets=features.offsets().to(features.values().dtype),
        pooling_mode=plan.pooling_mode,
        indice_weights=None,
        feature_requires_grad=None,
    )  # (B, sum D)
    return KeyedTensor(keys=list(plan.keys), length_per_key=list(plan.dims), values=values)


class _Plan:
    """The fbgemm layout of one collection: per feature, where its table starts in the flat
    weights and its output columns."""

    def __init__(self, rows: tuple[int, ...], dims: tuple[int, ...],
                 feature_tables: tuple[int, ...], keys: tuple[str, ...], pooling_mode: int):
        weight_starts = [0, *accumulate(n * d for n, d in zip(rows, dims, strict=True))]
        row_starts = [0, *accumulate(rows)]
        feature_dims = [dims[t] for t in feature_tables]
        dim_starts = [0, *accumulate(feature_dims)]
        self.keys = keys
        self.dims = tuple(feature_dims)
        self.total_dim, self.max_dim = dim_starts[-1], max(dims)
        self.pooling_mode = pooling_mode
        self.weights_offsets = torch.tensor([weight_starts[t] for t in feature_tables])
        self.dim_offsets = torch.tensor(dim_starts, dtype=torch.int32)
        self.hash_size_cumsum = torch.tensor([row_starts[t] for t in feature_tables]
                                             + [row_starts[-1]])
        self.total_hash_size_bits = int(log2(row_starts[-1]) + 1) if row_starts[-1] else 0


@functools.lru_cache(maxsize=64)
def _cached_plan(rows: tuple[int, ...], dims: tuple[int, ...], feature_tables: tuple[int, ...],
                 keys: tuple[str, ...], pooling_mode: int) -> _Plan:
    return _Plan(rows, dims, feature_tables, keys, pooling_mode)


def _plan(collection: EmbeddingBagCollection, features: KeyedJaggedTensor,
          weights: list[torch.Tensor]) -> _Plan | None:
    """The collection's plan (``weights``: its tables' weights in order), or None where the
    batched call does not apply."""
    if (collection.is_weighted() or collection._forward_hooks
            or collection._forward_pre_hooks
            or not hasattr(torch.ops.fbgemm, "dense_embedding_codegen_lookup_function")):
        return None
    configs = collection.embedding_bag_configs()
    poolings = {config.pooling for config in configs}
    if (len(poolings) != 1 or next(iter(poolings)) not in _POOLING_MODES
            or any(w.device.type != "cpu" or w.dtype != torch.float32 for w in weights)):
        return None
    keys = tuple(name for config in configs for name in config.feature_names)
    if tuple(features.keys()) != keys or features.weights_or_none() is not None:
        return None
    feature_tables = tuple(t for t, config in enumerate(configs) for _ in config.feature_names)
    return _cached_plan(tuple(c.num_embeddings for c in configs),
                        tuple(c.embedding_dim for c in configs), feature_tables, keys,
                        _POOLING_MODES[next(iter(poolings))])
