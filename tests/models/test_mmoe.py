"""MMoE on TorchRec inputs: shapes, one-batch overfit, gradients to every part."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec import KeyedJaggedTensor

from models.batch import ExampleArrays
from models.losses import MultiTaskLoss, task_predictions
from models.rankers import RankerConfig, build_ranker
from models.training import TrainConfig, TrainingDivergedError, fit

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def arrays(tiny_examples):
    examples, schema, _ = tiny_examples
    return ExampleArrays.from_frame(examples, schema), schema


def test_batch_is_torchrec_keyed_jagged(arrays):
    data, schema = arrays
    batch = data.batch(np.arange(16))
    assert isinstance(batch.pooled, KeyedJaggedTensor)
    assert isinstance(batch.sequence, KeyedJaggedTensor)
    lengths = batch.sequence["hist_item_id"].lengths()
    assert lengths.shape == (16,) and int(lengths.max()) <= schema.history_length
    assert batch.labels.shape == batch.label_mask.shape == (16, len(schema.tasks))


def test_output_shapes_and_gate_weights(arrays):
    data, schema = arrays
    model = build_ranker(schema, RankerConfig(n_experts=3))
    outputs = model(data.batch(np.arange(10)))
    assert outputs.shape == (10, len(schema.tasks))
    weights = model.last_gate_weights
    assert weights.shape == (10, len(schema.tasks), 3)
    torch.testing.assert_close(weights.sum(-1), torch.ones(10, len(schema.tasks)))
    predictions = task_predictions(outputs, schema.tasks)
    assert ((predictions[:, 0] > 0) & (predictions[:, 0] < 1)).all()


def test_every_expert_gate_tower_and_table_receives_gradient(arrays):
    data, schema = arrays
    torch.manual_seed(0)
    model = build_ranker(schema, RankerConfig(n_experts=3))
    batch = data.batch(np.arange(64))
    loss, _ = MultiTaskLoss(schema.tasks)(model(batch), batch.labels, batch.label_mask)
    loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


def test_overfits_one_batch(arrays):
    data, schema = arrays
    torch.manual_seed(0)
    model = build_ranker(schema, RankerConfig(n_experts=2))
    batch = data.batch(np.arange(64))
    loss_fn = MultiTaskLoss(schema.tasks)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss, _ = loss_fn(model(batch), batch.labels, batch.label_mask)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    click = [t.name for t in schema.tasks].index("click")
    probabilities = torch.sigmoid(model(batch)[:, click])
    accuracy = ((probabilities > 0.5).float() == batch.labels[:, click]).float().mean()
    assert loss.item() < 0.2 * first
    assert accuracy.item() == 1.0


def test_masked_labels_do_not_contribute(arrays):
    data, schema = arrays
    loss_fn = MultiTaskLoss(schema.tasks)
    outputs = torch.zeros(4, len(schema.tasks))
    labels = torch.ones(4, len(schema.tasks))
    mask = torch.zeros(4, len(schema.tasks), dtype=torch.bool)
    total, per_task = loss_fn(outputs, labels, mask)
    assert total.item() == 0.0 and (per_task == 0).all()


def test_training_stops_on_nan_loss(arrays):
    data, schema = arrays
    model = build_ranker(schema, RankerConfig())
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    config = TrainConfig(epochs=1, batch_size=64, progress=False)
    with pytest.raises(TrainingDivergedError, match="loss is nan"):
        fit(model, MultiTaskLoss(schema.tasks), data, config, [t.name for t in schema.tasks])


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", 0), ("batch_size", -5), ("learning_rate", 0.0), ("learning_rate", float("nan")),
    ("weight_decay", -1.0), ("batch_size", 1)])
def test_train_config_rejects_values_that_would_train_nothing(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})
