"""Task-loss weighting: fixed weights and uncertainty weighting (Kendall et al. 2018)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from features.schema import TaskSpec
from models.batch import ExampleArrays
from models.losses import MultiTaskLoss
from models.rankers import RankerConfig, build_ranker
from models.training import TrainConfig, fit

pytestmark = pytest.mark.usefixtures("single_thread")

TASKS = (TaskSpec("click", "binary", "click"), TaskSpec("watch_time", "regression", "w"))


def test_fixed_weights_scale_each_task():
    outputs, labels = torch.zeros(4, 2), torch.tensor([[1.0, 2.0]] * 4)
    mask = torch.ones(4, 2, dtype=torch.bool)
    total, per_task = MultiTaskLoss(TASKS, {"click": 2.0, "watch_time": 0.5})(outputs, labels,
                                                                              mask)
    torch.testing.assert_close(per_task, torch.tensor([math.log(2.0), 4.0]))
    torch.testing.assert_close(total, torch.tensor(2 * math.log(2.0) + 0.5 * 4.0))


def test_unknown_weights_and_weightings_are_refused():
    with pytest.raises(ValueError, match="unknown tasks"):
        MultiTaskLoss(TASKS, {"clik": 1.0})
    with pytest.raises(ValueError, match="unknown loss weighting"):
        MultiTaskLoss(TASKS, weighting="gradnorm")
    for weight in (-1.0, float("nan"), float("inf")):  # -1 would ascend click's loss
        with pytest.raises(ValueError, match="finite and >= 0"):
            MultiTaskLoss(TASKS, {"click": weight})


def test_uncertainty_weighting_at_init_and_its_optimum():
    loss_fn = MultiTaskLoss(TASKS, weighting="uncertainty")
    outputs, labels = torch.zeros(8, 2), torch.tensor([[1.0, 2.0]] * 8)
    mask = torch.ones(8, 2, dtype=torch.bool)
    total, per_task = loss_fn(outputs, labels, mask)
    # s = 0: binary counts once, regression half (the Gaussian likelihood's 1/2)
    torch.testing.assert_close(total, per_task[0] + 0.5 * per_task[1])
    optimiser = torch.optim.Adam(loss_fn.parameters(), lr=0.05)
    for _ in range(600):
        total, _ = loss_fn(outputs, labels, mask)
        optimiser.zero_grad()
        total.backward()
        optimiser.step()
    # d/ds (c e^-s L + s/2) = 0  ⇔  s = log(2 c L)
    expected = torch.log(2 * torch.tensor([1.0, 0.5]) * per_task)
    torch.testing.assert_close(loss_fn.log_variance.detach(), expected, atol=1e-2, rtol=1e-2)
    weights = loss_fn.task_weights()  # the noisier (larger-loss) task ends with less weight
    assert weights["watch_time"] < weights["click"]


def test_uncertainty_ignores_a_task_without_labels_in_the_batch():
    loss_fn = MultiTaskLoss(TASKS, weighting="uncertainty")
    mask = torch.tensor([[True, False]] * 4)
    total, _ = loss_fn(torch.zeros(4, 2), torch.ones(4, 2), mask)
    total.backward()
    assert loss_fn.log_variance.grad[1] == 0 and loss_fn.log_variance.grad[0] != 0


def test_fit_trains_the_uncertainty_parameters(tiny_examples):
    examples, schema, _ = tiny_examples
    data = ExampleArrays.from_frame(examples, schema)
    torch.manual_seed(0)
    model = build_ranker(schema, RankerConfig(n_experts=2, expert_hidden=(16,)))
    loss_fn = MultiTaskLoss(schema.tasks, weighting="uncertainty")
    config = TrainConfig(epochs=1, batch_size=128, progress=False, loss_weighting="uncertainty")
    history = fit(model, loss_fn, data, config, [t.name for t in schema.tasks])
    assert loss_fn.log_variance.detach().abs().sum() > 0
    assert set(history[0]) >= {f"weight_{t.name}" for t in schema.tasks}
    assert np.isfinite(list(history[0].values())).all()


def test_weight_decay_never_reaches_the_uncertainty_log_variances(tiny_examples):
    from models.training import make_optimisers

    _, schema, _ = tiny_examples
    model = build_ranker(schema, RankerConfig(n_experts=2, expert_hidden=(16,)))
    loss_fn = MultiTaskLoss(schema.tasks, weighting="uncertainty")
    (adam,) = make_optimisers(model, loss_fn, TrainConfig(weight_decay=0.1))
    decay = {id(p): group["weight_decay"] for group in adam.param_groups for p in group["params"]}
    assert decay[id(loss_fn.log_variance)] == 0.0
    assert {decay[id(p)] for p in model.parameters()} == {0.1}


def test_a_last_batch_of_one_row_joins_the_one_before(tiny_examples):
    """HoME's BatchNorm cannot train on one row: 1 + k * batch rows must still train."""
    examples, schema, _ = tiny_examples
    data = ExampleArrays.from_frame(examples, schema)
    batch_size = len(data) - 1
    sizes = [len(b.labels) for b in data.batches(batch_size, shuffle=True, seed=0)]
    assert sizes == [len(data)] and data.n_batches(batch_size) == 1
    assert sum(len(b.labels) for b in data.batches(4)) == len(data)
    assert min(len(b.labels) for b in data.batches(4)) >= 2
    torch.manual_seed(0)
    model = build_ranker(schema, RankerConfig(arch="home", n_experts=2, expert_hidden=(16,)))
    config = TrainConfig(epochs=1, batch_size=batch_size, progress=False)
    history = fit(model, MultiTaskLoss(schema.tasks), data, config,
                  [t.name for t in schema.tasks])
    assert np.isfinite(history[0]["loss"])
