"""One fbgemm table-batched call computes what the EmbeddingBagCollection computes."""

from __future__ import annotations

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, PoolingType

from models.table_batched import pooled_lookup

pytestmark = pytest.mark.usefixtures("single_thread")


def collection(pooling: PoolingType) -> EmbeddingBagCollection:
    """Two tables, the first shared by two features (as the item table is)."""
    torch.manual_seed(0)
    return EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name="t_item", embedding_dim=4, num_embeddings=11,
                           feature_names=["item", "history"], pooling=pooling),
        EmbeddingBagConfig(name="t_kind", embedding_dim=3, num_embeddings=5,
                           feature_names=["kind"], pooling=pooling),
    ])


def features(keys: tuple[str, ...] = ("item", "history", "kind")) -> KeyedJaggedTensor:
    """Batch of 3; bags of different lengths, one empty history bag, repeated ids."""
    lengths = {"item": [1, 1, 1], "history": [3, 0, 2], "kind": [2, 1, 3]}
    values = {"item": [4, 10, 4], "history": [1, 1, 7, 0, 10], "kind": [2, 2, 0, 4, 1, 3]}
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(keys), values=torch.tensor([v for k in keys for v in values[k]]),
        lengths=torch.tensor([n for k in keys for n in lengths[k]]))


def weight_grads(module: EmbeddingBagCollection) -> list[torch.Tensor]:
    return [bag.weight.grad.clone() for bag in module.embedding_bags.values()]


@pytest.mark.parametrize("pooling", [PoolingType.SUM, PoolingType.MEAN])
def test_batched_lookup_equals_the_collection_with_gradients(pooling):
    module, batch = collection(pooling), features()
    upstream = torch.randn(3, 11)  # (B, 4 + 4 + 3)
    expected = module(batch)
    (expected.values() * upstream).sum().backward()
    expected_grads = weight_grads(module)
    module.zero_grad()
    got = pooled_lookup(module, batch)
    (got.values() * upstream).sum().backward()
    assert got.keys() == expected.keys() and got.length_per_key() == [4, 4, 3]
    torch.testing.assert_close(got.values(), expected.values())
    for grad, want in zip(weight_grads(module), expected_grads, strict=True):
        torch.testing.assert_close(grad, want)
    assert (got["history"][1] == 0).all()  # the empty bag pools to zeros


def test_feature_keys_in_another_order_use_the_collection_itself():
    module = collection(PoolingType.SUM)
    batch = features(("kind", "item", "history"))
    torch.testing.assert_close(pooled_lookup(module, batch).values(), module(batch).values())


def test_a_forward_hook_still_runs():
    module, calls = collection(PoolingType.SUM), []
    module.register_forward_hook(lambda *_: calls.append(1))
    pooled_lookup(module, features())
    assert calls == [1]
