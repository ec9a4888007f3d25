"""Neuron-gradient cosines (docs/math.md 2.5) against per-neuron gradients materialised with autograd.grad."""

import itertools

import pytest
import torch
from torch import nn

from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.nets import LayeredNTKNet

EDGES = [
    ("x0", "a"), ("x1", "a"), ("x0", "b"), ("x1", "e"), ("a", "c"), ("b", "c"), ("e", "c"), ("x1", "c"),
    ("a", "d"), ("e", "d"), ("c", "y0"), ("a", "y0"), ("b", "y1"), ("c", "y1"), ("d", "y1"), ("x2", "d"),
]  # fmt: skip


def make_net(family, *, widths=(6, 5, 4), bias=False):
    kwargs = dict(bias=bias, seed=11)
    if family == "fcn":
        return LayeredNTKNet.fcn(4, list(widths), 2, **kwargs)
    if family == "densenet":
        return LayeredNTKNet.densenet(4, list(widths), 2, **kwargs)
    if family == "masked":
        return LayeredNTKNet.masked_dag(4, list(widths), 2, drop_prob=0.5, mask_seed=5, **kwargs)
    return LayeredNTKNet.from_edges(EDGES, **kwargs)


def reference_gram(model, x, preactivation, neurons=None):
    """Per probe: G[a, b] = <g_a, g_b> with g_r = autograd.grad(z[r], all parameters), one neuron at a time;
    ``preactivation(x_i)`` is the layer's output for the single probe x_i, shape (1, ...)."""
    params = [p for p in model.parameters() if p.requires_grad]
    grams = []
    for i in range(x.shape[0]):
        z = preactivation(x[i : i + 1]).reshape(-1)
        rows = range(z.shape[0]) if neurons is None else neurons.tolist()
        grads = torch.stack([
            torch.cat([
                g.reshape(-1)
                for g in torch.autograd.grad(z[r], params, retain_graph=True, materialize_grads=True)
            ])
            for r in rows
        ])  # fmt: skip
        grams.append(grads @ grads.T)
    return torch.stack(grams)


def mean_abs_cosine(gram):
    """Per probe: the mean over pairs r != s of |G_rs| / sqrt(G_rr G_ss), for ``gram`` of shape (n, s, s)."""
    norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt()
    cos = (gram / (norms[:, :, None] * norms[:, None, :])).abs()
    s = gram.shape[1]
    return (cos.sum(dim=(1, 2)) - torch.diagonal(cos, dim1=1, dim2=2).sum(dim=1)) / (s * (s - 1))


def reference_cosines(model, x, preactivation, neurons=None):
    """Per probe: mean over pairs r != s of |cos| between g_r = autograd.grad(z[r], all parameters)."""
    return mean_abs_cosine(reference_gram(model, x, preactivation, neurons))


def net_preactivation(net, layer):
    return lambda x: net.trace(x).preactivations[layer - 1]


FAMILIES = ["fcn", "densenet", "masked", "edges"]
METHODS = ["structured", "generic"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bias", [False, True])
def test_both_paths_equal_materialised_gradients(family, bias):
    net = make_net(family, bias=bias).double()
    x = torch.randn(3, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for layer in range(1, net.depth + 1):
        expected = reference_cosines(net, x, net_preactivation(net, layer))
        for method in METHODS:
            per_probe = neuron_gradient_cosines(net, x, layer, method=method, reduction="none", chunk_size=2)
            torch.testing.assert_close(per_probe, expected, rtol=1e-10, atol=1e-12)
            mean = neuron_gradient_cosines(net, x, f"layer_{layer}", method=method)
            torch.testing.assert_close(mean, expected.mean(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_matches_float64_reference(family):
    net = make_net(family, bias=True)
    x = torch.randn(3, net.in_features, generator=torch.Generator().manual_seed(1))
    layer = net.depth
    expected = reference_cosines(net.double(), x.double(), net_preactivation(net, layer))
    net.float()
    for method in METHODS:
        per_probe = neuron_gradient_cosines(net, x, layer, method=method, reduction="none")
        assert per_probe.dtype == torch.float32
        torch.testing.assert_close(per_probe.double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["fcn", "masked"])
def test_seeded_subset_is_the_documented_one_in_both_paths(family):
    net = make_net(family, widths=(9, 12, 7)).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    neurons = torch.randperm(12, generator=torch.Generator().manual_seed(42))[:5]
    expected = reference_cosines(net, x, net_preactivation(net, 2), neurons)
    for method in METHODS:
        generator = torch.Generator().manual_seed(42)
        result = neuron_gradient_cosines(
            net, x, 2, num_neurons=5, generator=generator, method=method, reduction="none"
        )
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("family", ["densenet", "masked"])
@pytest.mark.parametrize("budget", [300, 1700])
def test_memory_budget_splits_probes_and_neuron_blocks(family, budget, monkeypatch):
    """Tiny element budgets force chunks of 1-2 probes and Jacobian blocks of 1 or 3 of the 9 neurons."""
    net = make_net(family, widths=(6, 9, 5), bias=True).double()
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    expected = reference_cosines(net, x, net_preactivation(net, 2))
    monkeypatch.setattr("lightning_linearity.metrics.cosines.DEFAULT_CHUNK_ELEMENTS", budget)
    for method in METHODS:
        result = neuron_gradient_cosines(net, x, 2, method=method, reduction="none")
        torch.testing.assert_close(result, expected, rtol=1e-10, atol=1e-12)


def test_default_subset_is_fixed_and_leaves_global_rng_alone():
    net = make_net("fcn", widths=(8, 16)).double()
    x = torch.randn(2, 4, dtype=torch.float64)
    rng = torch.get_rng_state()
    first = neuron_gradient_cosines(net, x, 2, num_neurons=4)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(neuron_gradient_cosines(net, x, 2, num_neurons=4, method="generic"), first)
    neurons = torch.randperm(16, generator=torch.Generator().manual_seed(0))[:4]
    torch.testing.assert_close(first, reference_cosines(net, x, net_preactivation(net, 2), neurons).mean())
    everything = neuron_gradient_cosines(net, x, 2)
    assert torch.equal(neuron_gradient_cosines(net, x, 2, num_neurons=16), everything)


def test_foreign_model_generic_and_auto():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    expected = reference_cosines(model, x, lambda xi: model[:3](xi))
    torch.testing.assert_close(neuron_gradient_cosines(model, x, "2", reduction="none"), expected)
    torch.testing.assert_close(neuron_gradient_cosines(model, x, "2", method="generic"), expected.mean())


def test_foreign_conv_layer_neurons_are_channel_position_entries():
    """docs/math.md 2.7: a convolution's neuron is one output channel at one position."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 4, 3, stride=2, dilation=1), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 2),
    ).double()  # fmt: skip
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    # layer "2": output (4 channels, 2 x 2 positions) -> 16 neurons, each the entry [c, i, j] for one sample
    expected = reference_cosines(model, x, lambda xi: model[:3](xi).flatten(1))
    torch.testing.assert_close(neuron_gradient_cosines(model, x, "2", reduction="none"), expected)
    first = reference_cosines(model, x, lambda xi: model[:1](xi).flatten(1))
    assert (first > 0).all()  # positions of one channel share its filter: not orthogonal in layer 1
    torch.testing.assert_close(neuron_gradient_cosines(model, x, "0", reduction="none"), first)


# ------------------------------------------------------------------------------------------ the papers
@pytest.mark.parametrize("width", [3, 17, 64])
@pytest.mark.parametrize("family", ["fcn", "masked"])
def test_two_layer_network_neurons_are_exactly_orthogonal(width, family):
    """000 Remark 4: the hidden neurons of a two-layer network have private parameters (row r of W_1)
    only, so their gradients are exactly orthogonal at any finite width; the same holds for layer 1 of any
    deeper network, while layer 2 neurons share W_1 and are not orthogonal."""
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    two_layer = make_net(family, widths=(width,), bias=True).double()
    for method in METHODS:
        assert torch.all(neuron_gradient_cosines(two_layer, x, 1, method=method, reduction="none") == 0)
    deep = make_net(family, widths=(width, width)).double()
    assert neuron_gradient_cosines(deep, x, 1) == 0
    assert neuron_gradient_cosines(deep, x, 2) > 0.01


def test_mean_abs_cosine_falls_monotonically_with_width():
    """000 Theorem 3 / Figure 3 left: at init, tanh, depth 3, the average |cos| shrinks as the width grows."""
    x = torch.randn(10, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for layer in (2, 3):
        values = [
            neuron_gradient_cosines(LayeredNTKNet.fcn(8, [m] * 3, seed=m).double(), x, layer, num_neurons=128)
            for m in (32, 64, 128, 256, 512)
        ]
        assert all(a > b for a, b in itertools.pairwise(values)), values


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(method="exact"), "method"), (dict(reduction="sum"), "reduction"),
     (dict(num_neurons=1), "num_neurons"), (dict(chunk_size=-1), "chunk_size")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        neuron_gradient_cosines(make_net("fcn"), torch.randn(2, 4), 1, **kwargs)


@pytest.mark.parametrize("method", ["auto", "generic"])
def test_unknown_layer(method):
    with pytest.raises(ValueError, match="unknown"):
        neuron_gradient_cosines(make_net("fcn"), torch.randn(2, 4), 4, method=method)


def test_layer_with_one_neuron():
    with pytest.raises(ValueError, match="at least two"):
        neuron_gradient_cosines(make_net("fcn", widths=(1, 5)), torch.randn(2, 4), 1)


def test_structured_rejects_foreign_model():
    with pytest.raises(ValueError, match="not one of the package's networks"):
        neuron_gradient_cosines(nn.Sequential(nn.Linear(3, 4)), torch.randn(2, 3), "0", method="structured")


def test_structured_rejects_batchnorm():
    net = make_net("fcn")
    net.layers.insert(1, nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="BatchNorm"):
        neuron_gradient_cosines(net, torch.randn(3, 4), 1, method="structured")


def test_no_trainable_parameters():
    with pytest.raises(ValueError, match="no trainable parameters"):
        neuron_gradient_cosines(make_net("fcn").requires_grad_(False), torch.randn(2, 4), 1)


@pytest.mark.parametrize("method", METHODS)
def test_wrong_trailing_shape(method):
    with pytest.raises(ValueError, match="could not be evaluated"):
        neuron_gradient_cosines(make_net("fcn"), torch.randn(2, 3), 1, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_output(method):
    net = make_net("fcn")
    with torch.no_grad():
        net.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        neuron_gradient_cosines(net, torch.randn(2, 4), 2, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_vanishing_neuron_gradient(method):
    """A zero probe gives layer-1 neurons (no bias) a zero gradient: the cosine is undefined."""
    with pytest.raises(ValueError, match="vanishes"):
        neuron_gradient_cosines(make_net("fcn"), torch.zeros(2, 4), 1, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("training", [True, False])
def test_leaves_model_and_global_state_unchanged(method, training):
    net = make_net("densenet", bias=True).train(training)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    x = torch.randn(3, 4)
    rng = torch.get_rng_state()
    neuron_gradient_cosines(net, x, 2, num_neurons=3, method=method)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training == training for m in net.modules())
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(p.grad, torch.ones_like(p)) and p.requires_grad
