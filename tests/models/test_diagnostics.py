"""Diagnostics: expert collapse, gate usage, per-task gradients, and their plots."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from evaluation import plots
from models import diagnostics
from models.batch import ExampleArrays
from models.losses import MultiTaskLoss
from models.rankers import RankerConfig, build_ranker

pytestmark = pytest.mark.usefixtures("single_thread")
SMALL = {"n_experts": 2, "n_task_experts": 1, "n_category_experts": 1,
         "expert_hidden": (16, 8), "tower_hidden": (4,)}


@pytest.fixture
def arrays(tiny_examples):
    examples, schema, _ = tiny_examples
    return ExampleArrays.from_frame(examples, schema), schema


def model_for(schema, arch):
    torch.manual_seed(0)
    return build_ranker(schema, RankerConfig(arch=arch, **SMALL))


def test_a_dead_relu_expert_shows_full_collapse(arrays):
    data, schema = arrays
    model = model_for(schema, "mmoe")
    last = model.experts[1][-2]  # the last Linear before its ReLU
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(-1.0)
    activity = diagnostics.expert_activity(model, data, max_rows=300)
    assert activity.names == ["experts.0", "experts.1"]
    assert activity.zero_fraction[1] == 1.0 and activity.dead_unit_fraction[1] == 1.0
    assert activity.zero_fraction[0] < 1.0


def test_home_experts_have_no_zero_activations(arrays):
    data, schema = arrays
    activity = diagnostics.expert_activity(model_for(schema, "home"), data, max_rows=300)
    assert len(activity.names) == len(diagnostics.named_experts(model_for(schema, "home")))
    assert activity.zero_fraction.max() < 0.05


@pytest.mark.parametrize("arch", ["mmoe", "ple", "home"])
def test_gate_usage_rows_are_distributions(arrays, arch):
    data, schema = arrays
    model = model_for(schema, arch)
    usage = diagnostics.gate_usage(model, data, [t.name for t in schema.tasks], max_rows=300)
    assert usage.weights.shape == (len(schema.tasks), len(model.gate_expert_names))
    np.testing.assert_allclose(usage.weights.sum(1), 1.0, rtol=1e-5)


def test_shared_bottom_has_no_gate_usage(arrays):
    data, schema = arrays
    assert diagnostics.gate_usage(model_for(schema, "shared_bottom"), data, ["x"]) is None


def test_task_gradients_find_the_shared_layers(arrays):
    data, schema = arrays
    names = [t.name for t in schema.tasks]
    model = model_for(schema, "home")
    grads = diagnostics.task_gradients(model, MultiTaskLoss(schema.tasks), data, names,
                                       rows=256)
    assert grads.norms.shape == (len(names), 3) and (grads.norms[:, 0] > 0).all()
    np.testing.assert_allclose(np.diag(grads.cosine), 1.0, rtol=1e-5)
    shared = grads.shared_parameters
    assert any(name.startswith("meta_global.") for name in shared)  # every task reaches it
    assert not any(name.startswith("task_own.") for name in shared)  # one task each
    assert not any(name.startswith("towers.") for name in shared)
    # MMoE: every expert is shared
    mmoe = diagnostics.task_gradients(model_for(schema, "mmoe"), MultiTaskLoss(schema.tasks),
                                      data, names, rows=256)
    assert any(name.startswith("experts.") for name in mmoe.shared_parameters)


def test_diagnostics_leave_the_model_unchanged(arrays):
    data, schema = arrays
    model = model_for(schema, "home")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diagnostics.expert_activity(model, data, max_rows=200)
    diagnostics.task_gradients(model, MultiTaskLoss(schema.tasks), data,
                               [t.name for t in schema.tasks], rows=128)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key])


def png_bytes(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def test_plots_render_to_png():
    rng = np.random.default_rng(0)
    p = rng.random(500)
    y = (rng.random(500) < p).astype(float)
    figures = [
        plots.reliability_figure({"click": (y, p), "like": (y, p * 0.5)}, {"click": 0.01}),
        plots.gate_heatmap(np.array([[0.5, 0.5, 0.0], [0.2, 0.0, 0.8]]), ["a", "b"],
                           ["g.0", "own.a", "own.b"]),
        plots.expert_activity_figure(["e0", "e1"], np.array([0.1, 0.95]), np.zeros(2),
                                     np.ones(2)),
        plots.gradient_figure(["a", "b"], ["encoder", "shared"], np.ones((2, 2)),
                              np.array([[1.0, -0.2], [-0.2, 1.0]])),
        plots.oracle_figure({"click": 0.7}, {"click": 0.8}),
    ]
    for figure in figures:
        assert png_bytes(figure)[:4] == b"\x89PNG"


def test_reliability_curve_bins_like_ece():
    p = np.array([0.05, 0.05, 0.95, 0.95])
    y = np.array([0.0, 1.0, 1.0, 1.0])
    mean_p, rate, counts = plots.reliability_curve(y, p, n_bins=10)
    np.testing.assert_allclose(mean_p, [0.05, 0.95])
    np.testing.assert_allclose(rate, [0.5, 1.0])
    np.testing.assert_array_equal(counts, [2, 2])
