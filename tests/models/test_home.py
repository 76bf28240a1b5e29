"""HoME's four parts: expert normalisation, hierarchy mask, feature-gate, self-gate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from models.batch import ExampleArrays
from models.blocks import Expert, FeatureGate
from models.losses import MultiTaskLoss
from models.rankers import RankerConfig, build_ranker
from models.rankers.home import resolve_categories

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"arch": "home", "n_experts": 2, "n_task_experts": 1, "n_category_experts": 2,
         "expert_hidden": (32, 16), "tower_hidden": (8,)}
WATCH = ("watch_time", "long_view")
INTERACTION = ("click", "like", "follow")


@pytest.fixture
def arrays(tiny_examples):
    examples, schema, _ = tiny_examples
    return ExampleArrays.from_frame(examples, schema), schema


def home(schema, **overrides):
    torch.manual_seed(0)
    return build_ranker(schema, RankerConfig(**{**SMALL, **overrides}))


def single_task_gradients(model, data, schema, task: str) -> dict[str, torch.Tensor]:
    batch = data.batch(np.arange(64))
    k = [t.name for t in schema.tasks].index(task)
    per_task = MultiTaskLoss(schema.tasks).per_task(model(batch), batch.labels,
                                                    batch.label_mask)
    model.zero_grad()
    per_task[k].backward()
    return {name: p.grad if p.grad is not None else torch.zeros_like(p)
            for name, p in model.named_parameters()}


def belongs_to(name: str, category: str, tasks: tuple[str, ...]) -> bool:
    return (f"meta_category.{category}." in name or f"meta_gates.{category}." in name
            or f"meta_self_gates.{category}." in name or f"task_category.{category}." in name
            or any(f".{task}." in name for task in tasks))


@pytest.mark.parametrize(("task", "own", "other", "other_tasks"), [
    ("long_view", "watch", "interaction", INTERACTION),
    ("click", "interaction", "watch", WATCH),
])
def test_hierarchy_mask_blocks_cross_category_experts(arrays, task, own, other, other_tasks):
    data, schema = arrays
    model = home(schema)
    grads = single_task_gradients(model, data, schema, task)
    blocked = [name for name in grads if belongs_to(name, other, other_tasks)
               and not name.startswith("towers.")]
    assert blocked, "the other category has parameters"
    for name in blocked:
        assert grads[name].abs().sum() == 0, f"{task} reaches {name}"
    own_tasks = WATCH if own == "watch" else INTERACTION
    reached = [name for name in grads if belongs_to(name, own, ())]
    reached += [name for name in grads if f"task_own.{task}." in name]
    reached += [name for name in grads if name.startswith(("meta_global.", "task_global."))]
    assert reached
    for name in reached:
        assert grads[name].abs().sum() > 0, f"{task} does not reach {name}"
    # the other tasks' own experts of the same category are hidden from it too
    for sibling in own_tasks:
        if sibling != task:
            for name in grads:
                if f"task_own.{sibling}." in name:
                    assert grads[name].abs().sum() == 0, name


def test_masked_gate_weights_are_zero_outside_the_hierarchy(arrays):
    data, schema = arrays
    model = home(schema)
    model.eval()
    model(data.batch(np.arange(8)))
    weights = model.last_gate_weights  # (B, K, E_all)
    for k, task in enumerate(schema.tasks):
        category = model.category_of[task.name]
        for e, name in enumerate(model.gate_expert_names):
            visible = (name.startswith("task_global.")
                       or name.startswith(f"task_category.{category}.")
                       or name.startswith(f"task_own.{task.name}."))
            assert bool((weights[:, k, e] > 0).all()) == visible, (task.name, name)


def test_feature_gate_is_identity_at_init():
    torch.manual_seed(0)
    gate = FeatureGate(dim=99, rank=8)
    x = torch.randn(256, 99)
    torch.testing.assert_close(gate(x), x, rtol=1e-2, atol=1e-3)
    loss = gate(x).pow(2).sum()
    loss.backward()
    assert gate.down.grad.abs().sum() > 0 and gate.up.grad.abs().sum() > 0


def test_home_experts_are_normalised_and_feature_gated(arrays):
    _, schema = arrays
    model = home(schema)
    experts = [m for m in model.modules() if isinstance(m, Expert)]
    assert experts
    for expert in experts:
        assert isinstance(expert[0], FeatureGate)
        assert isinstance(expert[-2], nn.BatchNorm1d) and isinstance(expert[-1], nn.SiLU)
    plain = home(schema, expert_norm=False, feature_gate_rank=0, self_gate=False)
    for expert in (m for m in plain.modules() if isinstance(m, Expert)):
        assert isinstance(expert[-1], nn.ReLU)
    assert plain.meta_self_gates is None and plain.task_self_gates is None


def test_normalised_expert_outputs_share_one_scale():
    torch.manual_seed(0)
    x = torch.randn(512, 20) * torch.linspace(0.1, 10, 20)
    experts = [Expert(20, (32, 16), normalized=True) for _ in range(4)]
    stds = torch.stack([e(x).std() for e in experts])
    assert stds.max() / stds.min() < 1.5


def test_self_gate_adds_the_own_experts(arrays):
    data, schema = arrays
    with_gate, without = home(schema), home(schema, self_gate=False)
    without.load_state_dict(with_gate.state_dict(), strict=False)
    with_gate.eval()
    without.eval()
    batch = data.batch(np.arange(16))
    assert not torch.allclose(with_gate(batch), without(batch))
    assert set(with_gate.state_dict()) - set(without.state_dict())
    assert all("self_gates" in key
               for key in set(with_gate.state_dict()) - set(without.state_dict()))


def test_resolve_categories():
    tasks = ["click", "like", "watch_time", "comment"]
    resolved = resolve_categories((("watch", ("watch_time", "long_view")),
                                   ("interaction", ("click", "like"))), tasks)
    assert resolved == [("watch", ["watch_time"]), ("interaction", ["click", "like"]),
                        ("comment", ["comment"])]
    with pytest.raises(ValueError, match="one category"):
        resolve_categories((("a", ("click",)), ("b", ("click",))), tasks)
