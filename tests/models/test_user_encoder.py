"""The user encoder and its augmentations: length contracts, no padding leaks, padding
invariance, and the ranker adapter (frozen / fine-tuned) training inside build_ranker."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from features.vocab import Vocabulary
from models.batch import ExampleArrays
from models.losses import MultiTaskLoss
from models.rankers import RankerConfig, build_ranker
from models.training import TrainConfig, fit
from models.user_encoders import (
    AugmentConfig,
    PaddedSequences,
    PretrainedUserEncoder,
    UserEncoderConfig,
    augment,
    build_user_encoder,
    crop,
    history_kjt,
    item_index_map,
    mask,
    reorder,
)

T = 8
CONFIG = UserEncoderConfig(embedding_dim=8, n_layers=1, n_heads=2, ffn_dim=16, dropout=0.1,
                           n_items=30, n_behaviors=5, max_length=T)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_sequences(n: int = 64, seed: int = 0) -> PaddedSequences:
    """Lengths 0..T (all of them present), items ≥ 2, behaviours 1..4, padding 0."""
    rng = np.random.default_rng(seed)
    lengths = np.concatenate([np.arange(T + 1), rng.integers(0, T + 1, n - T - 1)])
    valid = np.arange(T)[None, :] < lengths[:, None]
    items = np.where(valid, rng.integers(2, CONFIG.n_items, (n, T)), 0)
    behaviors = np.where(valid, rng.integers(1, 5, (n, T)), 0)
    return PaddedSequences(torch.from_numpy(items), torch.from_numpy(behaviors),
                           torch.from_numpy(lengths))


def assert_no_padding_leak(view: PaddedSequences) -> None:
    valid = view.valid()
    assert (view.items[~valid] == 0).all() and (view.behaviors[~valid] == 0).all()
    assert (view.items[valid] != 0).all() and (view.behaviors[valid] != 0).all()


OPERATIONS = {
    "crop": lambda s, g: crop(s, 0.4, g),
    "mask": lambda s, g: mask(s, 0.6, CONFIG.mask_item, CONFIG.mask_behavior, g),
    "reorder": lambda s, g: reorder(s, 0.6, g),
    "augment": lambda s, g: augment(s, AugmentConfig(), CONFIG.mask_item,
                                    CONFIG.mask_behavior, g),
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_augmentations_keep_shape_and_never_leak_padding(name):
    seqs = random_sequences()
    view = OPERATIONS[name](seqs, torch.Generator().manual_seed(1))
    assert view.items.shape == view.behaviors.shape == seqs.items.shape
    assert_no_padding_leak(view)
    assert (view.lengths <= seqs.lengths).all()
    assert ((view.lengths > 0) == (seqs.lengths > 0)).all()


def test_crop_keeps_a_contiguous_part_of_the_stated_length():
    seqs = random_sequences()
    view = crop(seqs, 0.4, torch.Generator().manual_seed(2))
    expected = torch.minimum(torch.ceil(0.4 * seqs.lengths.double()).long().clamp(min=1),
                             seqs.lengths)
    assert torch.equal(view.lengths, expected)
    for row in range(seqs.size):
        length, kept = int(seqs.lengths[row]), int(view.lengths[row])
        original = [tuple(x) for x in zip(seqs.items[row, :length].tolist(),
                                          seqs.behaviors[row, :length].tolist(), strict=True)]
        part = [tuple(x) for x in zip(view.items[row, :kept].tolist(),
                                      view.behaviors[row, :kept].tolist(), strict=True)]
        assert any(original[s:s + kept] == part for s in range(length - kept + 1))


def test_mask_replaces_the_stated_share_by_mask_tokens_never_all():
    seqs = random_sequences()
    view = mask(seqs, 0.6, CONFIG.mask_item, CONFIG.mask_behavior,
                torch.Generator().manual_seed(3))
    assert torch.equal(view.lengths, seqs.lengths)
    masked = view.items == CONFIG.mask_item
    assert torch.equal(masked, view.behaviors == CONFIG.mask_behavior)
    lengths = seqs.lengths.double()
    expected = torch.ceil(0.6 * lengths)
    expected = torch.where(expected >= lengths, torch.floor(0.6 * lengths), expected)
    assert torch.equal(masked.sum(1), expected.long())
    assert (masked.sum(1) < seqs.lengths.clamp(min=1)).all()
    kept = ~masked & seqs.valid()
    assert torch.equal(view.items[kept], seqs.items[kept])


def test_reorder_shuffles_one_span_and_keeps_everything_else():
    seqs = random_sequences()
    view = reorder(seqs, 0.6, torch.Generator().manual_seed(4))
    assert torch.equal(view.lengths, seqs.lengths)
    for row in range(seqs.size):
        length = int(seqs.lengths[row])
        before = list(zip(seqs.items[row].tolist(), seqs.behaviors[row].tolist(), strict=True))
        after = list(zip(view.items[row].tolist(), view.behaviors[row].tolist(), strict=True))
        assert sorted(before[:length]) == sorted(after[:length])
        changed = [i for i in range(length) if before[i] != after[i]]
        if changed:
            assert changed[-1] - changed[0] + 1 <= int(np.ceil(0.6 * length))


def test_augmentations_are_reproducible_from_the_generator():
    seqs = random_sequences()
    first = augment(seqs, AugmentConfig(), CONFIG.mask_item, CONFIG.mask_behavior,
                    torch.Generator().manual_seed(7))
    again = augment(seqs, AugmentConfig(), CONFIG.mask_item, CONFIG.mask_behavior,
                    torch.Generator().manual_seed(7))
    assert torch.equal(first.items, again.items) and torch.equal(first.lengths, again.lengths)


def test_encoder_output_is_invariant_to_padding_and_batch_company():
    encoder = build_user_encoder(CONFIG, seed=0).eval()
    seqs = random_sequences()
    garbage = PaddedSequences(
        torch.where(seqs.valid(), seqs.items, torch.randint(2, 30, seqs.items.shape)),
        torch.where(seqs.valid(), seqs.behaviors, torch.randint(1, 5, seqs.items.shape)),
        seqs.lengths)
    with torch.no_grad():
        full = encoder.encode(seqs)  # (B, D)
        torch.testing.assert_close(encoder.encode(garbage), full)
        for row in (1, 5, T, 20):  # alone in its batch
            alone = PaddedSequences(seqs.items[row:row + 1], seqs.behaviors[row:row + 1],
                                    seqs.lengths[row:row + 1])
            torch.testing.assert_close(encoder.encode(alone), full[row:row + 1])
        # a longer encoder (more padding slots, same weights on the shared positions)
        longer = build_user_encoder(
            UserEncoderConfig(**{**CONFIG.to_dict(), "max_length": 2 * T}), seed=0).eval()
        state = encoder.state_dict()
        state["positions.weight"] = torch.cat([state["positions.weight"],
                                               longer.positions.weight[T:]])
        longer.load_state_dict(state)
        wide = PaddedSequences(torch.cat([seqs.items, torch.zeros_like(seqs.items)], 1),
                               torch.cat([seqs.behaviors, torch.zeros_like(seqs.items)], 1),
                               seqs.lengths)
        torch.testing.assert_close(longer.encode(wide), full)
    assert torch.equal(full[0], encoder.empty.detach())  # row 0 has an empty history


def test_empty_histories_keep_gradients_finite():
    encoder = build_user_encoder(CONFIG, seed=0).train()
    encoder.encode(random_sequences()).pow(2).sum().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name


def test_history_kjt_keeps_the_most_recent_behaviours():
    kjt = history_kjt(torch.tensor([5, 6, 7, 8, 9, 3]), torch.tensor([1, 2, 3, 4, 1, 2]),
                      torch.tensor([5, 1]), max_length=3)
    items = kjt["hist_item_id"]
    assert items.lengths().tolist() == [3, 1]
    assert items.values().tolist() == [7, 8, 9, 3]
    assert kjt["hist_behavior"].values().tolist() == [3, 4, 1, 2]


def test_item_index_map_translates_between_vocabularies():
    table = item_index_map(encoder_items=(10, 20, 30), ranker_items=(20, 40, 10))
    # ranker: 0 pad, 1 unknown, 2 → raw 20, 3 → raw 40 (unseen), 4 → raw 10
    assert table.tolist() == [0, 1, 3, 1, 2]


@pytest.fixture
def ranker_data(tiny_examples):
    examples, schema, vocab = tiny_examples
    return ExampleArrays.from_frame(examples, schema), schema, vocab


def adapter_for(schema, vocab: Vocabulary, freeze: bool) -> PretrainedUserEncoder:
    config = UserEncoderConfig(embedding_dim=8, n_layers=1, n_heads=2, ffn_dim=16)
    encoder = build_user_encoder(config.for_schema(schema), seed=0)
    return PretrainedUserEncoder.for_vocabularies(encoder, vocab, vocab, freeze=freeze)


@pytest.mark.parametrize("freeze", [True, False])
def test_build_ranker_trains_with_the_adapter(ranker_data, freeze):
    data, schema, vocab = ranker_data
    adapter = adapter_for(schema, vocab, freeze)
    before = copy.deepcopy(adapter.encoder.state_dict())
    torch.manual_seed(0)
    model = build_ranker(schema, RankerConfig(n_experts=2), user_encoder=adapter)
    assert model.encoder.user_encoder is adapter
    vectors = adapter(data.batch(np.arange(16)))
    assert vectors.shape == (16, adapter.out_dim)
    config = TrainConfig(epochs=1, batch_size=128, progress=False)
    history = fit(model, MultiTaskLoss(schema.tasks), data, config,
                  [t.name for t in schema.tasks])
    assert np.isfinite(history[-1]["loss"])
    after = adapter.encoder.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    if freeze:
        assert changed == [] and not adapter.encoder.training
        assert all(not p.requires_grad for p in adapter.encoder.parameters())
    else:
        assert "embeddings.embeddings.t_item.weight" in changed and len(changed) > 5


def test_adapter_rebuilds_from_its_spec(ranker_data):
    data, schema, vocab = ranker_data
    adapter = adapter_for(schema, vocab, freeze=True)
    rebuilt = PretrainedUserEncoder.from_spec(adapter.spec())
    rebuilt.load_state_dict(adapter.state_dict())
    batch = data.batch(np.arange(32))
    torch.testing.assert_close(rebuilt(batch), adapter(batch))


def test_a_ranker_with_the_adapter_rebuilds_from_config_plus_spec(ranker_data):
    """The recipe for ``LoadedRanker``: save ``adapter.spec()`` next to the state dict and
    rebuild with ``build_ranker(schema, config, PretrainedUserEncoder.from_spec(spec))``."""
    data, schema, vocab = ranker_data
    adapter = adapter_for(schema, vocab, freeze=False)
    model = build_ranker(schema, RankerConfig(n_experts=2), user_encoder=adapter).eval()
    spec = json.loads(json.dumps(adapter.spec()))
    rebuilt = build_ranker(schema, RankerConfig(n_experts=2),
                           user_encoder=PretrainedUserEncoder.from_spec(spec)).eval()
    rebuilt.load_state_dict(model.state_dict())
    batch = data.batch(np.arange(32))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(batch), model(batch))


@pytest.mark.parametrize(("change", "message"), [
    ({"n_layers": 0}, "n_layers"), ({"embedding_dim": 0}, "embedding_dim"),
    ({"n_heads": 3}, "must divide"), ({"dropout": 1.0}, "dropout")])
def test_encoder_config_rejects_an_unbuildable_encoder(change, message):
    with pytest.raises(ValueError, match=message):
        UserEncoderConfig(**{**CONFIG.to_dict(), **change})
