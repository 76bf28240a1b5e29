"""Every ranker architecture: shapes, gate weights, one-batch overfit, gradient to every part."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.batch import ExampleArrays
from models.losses import MultiTaskLoss
from models.rankers import ARCHITECTURES, RankerConfig, build_ranker, init_output_bias

pytestmark = pytest.mark.usefixtures("single_thread")

SHIFT_INVARIANT = "encoder.attention.score.2.bias"
"""The attention scorer's output bias shifts every score of a row equally, so the softmax
cancels it: its gradient is zero up to rounding, whatever the ranker."""
SMALL = {"n_experts": 2, "n_task_experts": 1, "n_category_experts": 1,
         "expert_hidden": (32, 16), "tower_hidden": (8,)}


@pytest.fixture
def arrays(tiny_examples):
    examples, schema, _ = tiny_examples
    return ExampleArrays.from_frame(examples, schema), schema


def small_model(schema, arch: str, **overrides):
    torch.manual_seed(0)
    return build_ranker(schema, RankerConfig(arch=arch, **{**SMALL, **overrides}))


def test_the_cli_choices_are_the_five_families():
    assert set(ARCHITECTURES) == {"shared_bottom", "mmoe", "cgc", "ple", "home"}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_output_shapes_and_gate_weights(arrays, arch):
    data, schema = arrays
    model = small_model(schema, arch)
    model.eval()
    outputs = model(data.batch(np.arange(10)))
    n_tasks = len(schema.tasks)
    assert outputs.shape == (10, n_tasks)
    assert len(model.towers) == n_tasks and len(model.binary_tasks) == n_tasks
    assert all(isinstance(tower.out, torch.nn.Linear) for tower in model.towers)
    weights = model.last_gate_weights
    if arch == "shared_bottom":
        assert weights is None and model.gate_expert_names == []
        return
    assert weights.shape == (10, n_tasks, len(model.gate_expert_names))
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(10, n_tasks))


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_expert_gate_tower_and_table_receives_gradient(arrays, arch):
    data, schema = arrays
    model = small_model(schema, arch)
    batch = data.batch(np.arange(64))
    loss, _ = MultiTaskLoss(schema.tasks)(model(batch), batch.labels, batch.label_mask)
    loss.backward()
    for name, parameter in model.named_parameters():
        if name == SHIFT_INVARIANT:
            continue
        assert parameter.grad is not None, name
        assert parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_overfits_one_batch(arrays, arch):
    data, schema = arrays
    model = small_model(schema, arch)
    batch = data.batch(np.arange(64))
    init_output_bias(model, batch.labels.masked_fill(~batch.label_mask, float("nan")))
    loss_fn = MultiTaskLoss(schema.tasks)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(120):
        loss, _ = loss_fn(model(batch), batch.labels, batch.label_mask)
        first = first if first is not None else loss.item()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()  # BatchNorm (HoME) on running statistics: the model as it would score
    click = [t.name for t in schema.tasks].index("click")
    probabilities = torch.sigmoid(model(batch)[:, click])
    accuracy = ((probabilities > 0.5).float() == batch.labels[:, click]).float().mean()
    assert loss.item() < 0.2 * first
    assert accuracy.item() == 1.0


def test_cgc_is_one_level_and_ple_stacks_levels(arrays):
    _, schema = arrays
    cgc = small_model(schema, "cgc", n_levels=3)
    ple = small_model(schema, "ple", n_levels=3)
    assert len(cgc.levels) == 1 and cgc.levels[0].shared_gate is None
    assert len(ple.levels) == 3
    assert [level.shared_gate is None for level in ple.levels] == [False, False, True]


def test_ple_task_gate_cannot_see_other_tasks_experts(arrays):
    data, schema = arrays
    model = small_model(schema, "ple")
    model(data.batch(np.arange(8)))
    weights = model.last_gate_weights  # (B, K, E_all)
    for k, task in enumerate(schema.tasks):
        for e, name in enumerate(model.gate_expert_names):
            if ".task." in name and f".task.{task.name}." not in name:
                assert (weights[:, k, e] == 0).all(), (task.name, name)


def test_config_round_trips_through_json():
    config = RankerConfig(arch="home", task_categories=(("a", ("click",)), ("b", ("like",))))
    again = RankerConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config


@pytest.mark.parametrize(("change", "message"), [
    ({"n_experts": 0}, "n_experts"), ({"expert_hidden": ()}, "expert_hidden"),
    ({"expert_hidden": (16, 0)}, "expert_hidden"), ({"tower_hidden": (-1,)}, "tower_hidden"),
    ({"n_task_experts": -1}, "n_task_experts"), ({"feature_gate_rank": -2}, "feature_gate_rank")])
def test_config_rejects_an_unbuildable_ranker(change, message):
    with pytest.raises(ValueError, match=message):
        RankerConfig(**change)


def test_config_from_an_older_dict_takes_defaults_for_new_fields():
    old = {"arch": "mmoe", "inputs": {"embedding_dim": 8, "attention_hidden": 16},
           "n_experts": 3, "expert_hidden": [16], "tower_hidden": [8], "dropout": 0.0}
    config = RankerConfig.from_dict(old)
    assert config.n_experts == 3 and config.expert_hidden == (16,)
    assert config.n_levels == RankerConfig().n_levels


def test_mmoe_state_dict_keys_are_unchanged(arrays):
    """Registered MMoE champions from before the ranker family still load."""
    _, schema = arrays
    keys = set(build_ranker(schema, RankerConfig(arch="mmoe", expert_hidden=(8, 4))).state_dict())
    assert {"experts.0.0.weight", "experts.0.2.bias", "gates.0.logits.weight",
            "towers.0.out.weight"} <= keys


def test_mean_pooled_history_is_the_mean_of_item_and_behaviour_embeddings(arrays):
    from features.schema import SEQUENCE_BEHAVIOR_FEATURE, SEQUENCE_ITEM_FEATURE
    from models.inputs import InputConfig

    data, schema = arrays
    model = small_model(schema, "mmoe", inputs=InputConfig(history_pooling="mean"))
    assert model.encoder.attention is None
    rows = np.arange(40)
    batch = data.batch(rows)
    target, history = model.encoder.mean_history(batch)
    tables = model.encoder.sequence.embedding_bags
    item_table, behaviour_table = tables["t_item"].weight, tables["t_behavior"].weight
    torch.testing.assert_close(target, item_table[torch.from_numpy(data.target_item[rows])])
    for i, row in enumerate(rows):
        start, end = data.hist_offsets[row], data.hist_offsets[row + 1]
        items = data.hist_values[SEQUENCE_ITEM_FEATURE][start:end]
        behaviours = data.hist_values[SEQUENCE_BEHAVIOR_FEATURE][start:end]
        expected = (item_table[torch.from_numpy(items)].mean(0)
                    + behaviour_table[torch.from_numpy(behaviours)].mean(0)
                    if end > start else torch.zeros(item_table.shape[1]))
        torch.testing.assert_close(history[i], expected)
    assert any(data.hist_offsets[r] == data.hist_offsets[r + 1] for r in rows)  # empty ones too
    assert model(batch).shape == (40, len(schema.tasks))


def test_an_unknown_history_pooling_is_refused():
    from models.inputs import InputConfig

    with pytest.raises(ValueError, match="history_pooling must be one of"):
        InputConfig(history_pooling="max")
