"""Neuron-gradient cosines of foreign models by the engine (docs/math.md 2.5, 2.7 and 3).

A neuron of an ``nn.Linear`` is one output feature (at one position for inputs (n, T, d)); a neuron of a
convolution is one output channel at one output position. Every value is checked against per-neuron
``torch.autograd.grad`` of the layer's output entry with respect to all trainable parameters, one neuron
and one probe point at a time, in float64.
"""

import pytest
import torch
from test_cosines import mean_abs_cosine
from test_cosines import reference_gram as per_neuron_gram
from torch import nn

from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.metrics.engine import neuron_gram
from lightning_linearity.nets import LayeredNTKNet

RTOL, ATOL = 1e-10, 1e-12


def layer_output(model, layer):
    """x -> the output of submodule ``layer`` in ``model(x)``, captured by a forward hook."""
    module = model.get_submodule(layer)

    def output(x):
        captured = []
        handle = module.register_forward_hook(lambda _m, _a, out: captured.append(out))
        try:
            model(x)
        finally:
            handle.remove()
        return captured[0]

    return output


def reference_gram(model, x, layer, neurons=None):
    """G[i, a, b] = <g_a, g_b>, g_r = autograd.grad(z[r](x_i), every trainable parameter), z the flattened
    output of submodule ``layer`` for probe i alone."""
    return per_neuron_gram(model, x, layer_output(model, layer), neurons)


def probes(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def check_layer(model, x, layer, neurons=None):
    """The engine's Gram matrix and both paths' cosines against the per-neuron autograd reference."""
    expected = reference_gram(model, x, layer, neurons)
    subset = neurons if neurons is not None else torch.arange(expected.shape[1])
    torch.testing.assert_close(neuron_gram(model, x, layer, subset), expected, rtol=RTOL, atol=ATOL)
    cosines = mean_abs_cosine(expected)
    for method in ("engine", "generic", "auto"):
        num = None if neurons is None else len(neurons)
        generator = None if neurons is None else torch.Generator().manual_seed(7)
        found = neuron_gradient_cosines(
            model, x, layer, num_neurons=num, generator=generator, method=method, reduction="none"
        )
        torch.testing.assert_close(found, cosines, rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------------------ Linear
def mlp(bias, k, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 8, bias=bias), nn.Tanh(), nn.Linear(8, 7, bias=bias), nn.ReLU(),
        nn.Linear(7, 6, bias=bias), nn.Tanh(), nn.Linear(6, k, bias=bias),
    ).double()  # fmt: skip


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_linear_mlp_every_layer(bias, k):
    model = mlp(bias, k)
    x = probes(3, 5)
    for layer in ("0", "2", "4"):
        check_layer(model, x, layer)
    if k == 3:
        check_layer(model, x, "6")  # the output layer's neurons too


def test_first_linear_layer_is_exactly_orthogonal():
    """000 Remark 4 on a foreign MLP: row r of W_1 (and b_1[r]) is private to neuron r."""
    model = mlp(True, 2)
    gram = neuron_gram(model, probes(3, 5), "0", torch.arange(8))
    off_diagonal = gram - torch.diag_embed(torch.diagonal(gram, dim1=1, dim2=2))
    assert torch.all(off_diagonal == 0)
    assert neuron_gradient_cosines(model, probes(3, 5), "0", method="engine") == 0


def test_sampled_neurons_are_the_documented_subset():
    model = mlp(True, 2)
    x = probes(4, 5, seed=1)
    neurons = torch.randperm(7, generator=torch.Generator().manual_seed(7))[:4]
    check_layer(model, x, "2", neurons)


@pytest.mark.parametrize("route", ["gram", "gradient"])
def test_linear_on_positions(route, monkeypatch):
    """Inputs (n, T, d): a neuron is one output feature at one position (t, r), flattened as t * m + r."""
    monkeypatch.setattr("lightning_linearity.metrics.engine._linear.cheapest", lambda costs: route)
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 2)
    ).double()
    x = probes(3, 2, 3)
    check_layer(model, x, "2")
    check_layer(model, x, "0")


# ------------------------------------------------------------------------------------------ convolutions
CONVS = {
    "conv1d_stride_padding": lambda: nn.Sequential(
        nn.Conv1d(2, 4, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv1d(4, 6, 3, dilation=2, groups=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(6, 2),
    ),
    "conv2d_groups_dilation": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False),
        nn.Tanh(),
        nn.Conv2d(4, 6, (3, 2), stride=(2, 1), dilation=(1, 2), groups=2, padding=(1, 0)),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(2),
    ),
    "conv2d_reflect": lambda: nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect"),
        nn.Tanh(),
        nn.Conv2d(3, 4, 2, stride=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(1),
    ),
    "conv3d": lambda: nn.Sequential(
        nn.Conv3d(1, 2, 2),
        nn.Tanh(),
        nn.Conv3d(2, 3, 2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.LazyLinear(1),
    ),
}
INPUTS = {
    "conv1d_stride_padding": (3, 2, 9),
    "conv2d_groups_dilation": (3, 2, 5, 6),
    "conv2d_reflect": (3, 2, 4, 4),
    "conv3d": (2, 1, 3, 3, 3),
}


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("route", ["gram", "gradient"])
def test_convolutions(name, route, monkeypatch):
    """A neuron is one output channel at one output position; both contractions of the conv rule."""
    monkeypatch.setattr("lightning_linearity.metrics.engine._conv.cheapest", lambda costs: route)
    torch.manual_seed(2)
    model = CONVS[name]()
    x = probes(*INPUTS[name], seed=3)
    model(x.float())  # materialise LazyLinear
    model.double()
    check_layer(model, x, "2")
    neurons = torch.randperm(model[:1](x[:1]).numel(), generator=torch.Generator().manual_seed(7))[:5]
    check_layer(model, x, "0", neurons)


def test_first_convolution_is_not_orthogonal():
    """docs/math.md 2.7: two positions of one channel share its filter, so layer 1 is not 0 (unlike 000
    Remark 4), while different channels at any positions are orthogonal there."""
    torch.manual_seed(4)
    model = CONVS["conv2d_reflect"]()
    x = probes(2, 2, 4, 4)
    model(x.float())
    model.double()
    gram = neuron_gram(model, x, "0", torch.arange(3 * 16))  # neuron index = channel * 16 + position
    channel = torch.arange(48) // 16
    different = channel[:, None] != channel[None, :]
    assert torch.all(gram[:, different] == 0)
    assert torch.all(gram[:, ~different].abs() > 0)
    assert neuron_gradient_cosines(model, x, "0", method="engine") > 0


def mlp_or_cnn(family, seed):
    """A small MLP or 1-d CNN whose layer "2" is hidden, and probe points for it."""
    torch.manual_seed(seed)
    if family == "mlp":
        return mlp(True, 2), probes(3, 5)
    return CONVS["conv1d_stride_padding"]().double(), probes(3, 2, 9)


@pytest.mark.parametrize("family", ["mlp", "conv"])
def test_layer_with_frozen_weight(family):
    """Only the bias of the layer is trainable: its own block is [same output unit] * 1."""
    model, x = mlp_or_cnn(family, seed=9)
    model[2].weight.requires_grad_(False)
    check_layer(model, x, "2")


# ------------------------------------------------------------------------------------------ mixed models
class Scale(nn.Module):
    """A layer the engine has no rule for (its own per-sample gradients by torch.func)."""

    def __init__(self, width):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, width))
        self.shift = nn.Parameter(torch.linspace(-0.2, 0.3, width))

    def forward(self, x):
        return x * self.weight + torch.sin(self.shift)


class Mixed(nn.Module):
    """Known rules (Linear, LayerNorm, Conv1d) and unknown layers, a Linear used twice, a frozen layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.scale = Scale(12)
        self.shared = nn.Linear(12, 12)
        self.frozen = nn.Linear(12, 9).requires_grad_(False)
        self.norm = nn.LayerNorm(9)
        self.hidden = nn.Linear(9, 7)
        self.out = nn.Linear(7, 2)

    def forward(self, x):
        h = torch.tanh(self.conv(x.unsqueeze(1))).flatten(1)[:, :12]
        h = torch.tanh(self.scale(h))
        h = torch.tanh(self.shared(torch.tanh(self.shared(h))))
        h = self.norm(self.frozen(h))
        return self.out(torch.tanh(self.hidden(h)))


def test_mixed_known_and_unknown_layers():
    torch.manual_seed(5)
    model = Mixed().double()
    x = probes(3, 6)
    for layer in ("hidden", "frozen", "scale", "norm"):  # "shared" runs twice: no neurons of its own
        check_layer(model, x, layer)


def test_layer_is_a_block_of_modules():
    """Any named submodule: its output entries are the neurons (here a Sequential ending in a Linear)."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)), nn.Tanh(), nn.Linear(5, 2)
    ).double()
    check_layer(model, probes(3, 4), "0")


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


class Wrapped(nn.Module):
    """The layer sits inside a module whose own parameter acts in the same call."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor([1.3, 0.7, 1.1, 0.9]))
        self.inner = nn.Linear(4, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, x):
        return self.out(torch.tanh(self.inner(x * self.gain)))


@pytest.mark.parametrize(
    ("model", "layer", "reason"), [(Tied, "b", "tied"), (Wrapped, "inner", "lies inside")]
)
def test_models_the_engine_refuses_take_the_generic_path(model, layer, reason, monkeypatch):
    torch.manual_seed(7)
    model = model().double()
    x = probes(3, 4)
    expected = mean_abs_cosine(reference_gram(model, x, layer))
    with pytest.raises(ValueError, match=f"method='engine' cannot handle this model: .*{reason}"):
        neuron_gradient_cosines(model, x, layer, method="engine")
    torch.testing.assert_close(neuron_gradient_cosines(model, x, layer, reduction="none"), expected)


def test_auto_takes_the_engine_for_foreign_models_and_structured_for_the_package_nets(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the generic path was taken")

    monkeypatch.setattr("lightning_linearity.metrics.cosines._generic_gram", refuse)
    model, x = mlp(True, 2), probes(3, 5)
    expected = mean_abs_cosine(reference_gram(model, x, "2"))
    torch.testing.assert_close(neuron_gradient_cosines(model, x, "2", reduction="none"), expected)
    monkeypatch.setattr("lightning_linearity.metrics.cosines.neuron_gram", refuse)
    net = LayeredNTKNet.fcn(5, [6, 7], 2, seed=0).double()
    neuron_gradient_cosines(net, x, 2)


@pytest.mark.parametrize("family", ["fcn", "densenet", "masked"])
def test_engine_equals_structured_on_the_package_nets(family):
    """The package's nets keep the structured path; the engine (its NTKLinear rule) gives the same values."""
    build = {"fcn": LayeredNTKNet.fcn, "densenet": LayeredNTKNet.densenet}.get(family)
    if build is None:
        net = LayeredNTKNet.masked_dag(4, [6, 5, 4], 2, drop_prob=0.5, mask_seed=5, bias=True, seed=11)
    else:
        net = build(4, [6, 5, 4], 2, bias=True, seed=11)
    net = net.double()
    x = probes(3, 4)
    for layer in (1, 2, 3):
        structured = neuron_gradient_cosines(net, x, layer, method="structured", reduction="none")
        engine = neuron_gradient_cosines(net, x, layer, method="engine", reduction="none")
        torch.testing.assert_close(engine, structured, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(neuron_gradient_cosines(net, x, layer, reduction="none"), structured)


@pytest.mark.parametrize("budget", [40, 2000])
def test_small_memory_budget_splits_probes(budget, monkeypatch):
    monkeypatch.setattr("lightning_linearity.metrics.engine._neurons.DEFAULT_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr("lightning_linearity.metrics.engine._base.DEFAULT_CHUNK_ELEMENTS", budget)
    monkeypatch.setattr("lightning_linearity.metrics.engine._conv.cheapest", lambda costs: "gram")
    torch.manual_seed(8)
    model = CONVS["conv1d_stride_padding"]().double()
    x = probes(5, 2, 9)
    expected = reference_gram(model, x, "2")
    torch.testing.assert_close(neuron_gram(model, x, "2", torch.arange(6)), expected, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(
        neuron_gram(model, x, "2", torch.arange(6), chunk_size=2), expected, rtol=RTOL, atol=ATOL
    )


def test_float32():
    model = mlp(True, 2)
    x = probes(3, 5)
    expected = mean_abs_cosine(reference_gram(model, x, "4"))
    found = neuron_gradient_cosines(model.float(), x.float(), "4", method="engine", reduction="none")
    assert found.dtype == torch.float32
    torch.testing.assert_close(found.double(), expected, rtol=1e-5, atol=1e-6)


def test_leaves_model_and_global_state_unchanged():
    model = mlp(True, 2).train()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    rng = torch.get_rng_state()
    neuron_gradient_cosines(model, probes(3, 5), "2", num_neurons=3, method="engine")
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(p.grad, torch.ones_like(p)) and p.requires_grad


# ------------------------------------------------------------------------------------------ bad input
class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.shared, self.out = nn.Linear(3, 3), nn.Linear(3, 1)

    def forward(self, x):
        return self.out(self.shared(torch.tanh(self.shared(x))))


@pytest.mark.parametrize("method", ["engine", "generic"])
def test_layer_running_twice(method):
    with pytest.raises(ValueError, match="ran 2 times"):
        neuron_gradient_cosines(Twice().double(), probes(2, 3), "shared", method=method)


@pytest.mark.parametrize("method", ["engine", "generic"])
def test_vanishing_neuron_gradient(method):
    """A zero probe gives the first layer's neurons (no bias) a zero gradient: the cosine is undefined."""
    with pytest.raises(ValueError, match="vanishes"):
        neuron_gradient_cosines(mlp(False, 1), torch.zeros(2, 5, dtype=torch.float64), "0", method=method)


def test_no_trainable_parameter_before_the_layer():
    model = mlp(True, 1)
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match="vanishes"):
        neuron_gradient_cosines(model, probes(2, 5), "0", method="engine")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(method="exact"), "method must be"), (dict(layer="nope"), "unknown layer"),
     (dict(layer="6"), "at least two"), (dict(x=torch.randn(2, 4)), "could not be evaluated")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    arguments = dict(model=mlp(True, 1).float(), x=torch.randn(2, 5), layer="2", method="engine") | kwargs
    with pytest.raises(ValueError, match=match) as info:
        neuron_gradient_cosines(**arguments)
    assert "\n" not in str(info.value)


def test_non_finite_output():
    model = mlp(True, 1)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        neuron_gradient_cosines(model, probes(2, 5), "2", method="engine")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["mlp", "conv"])
def test_cuda_equals_cpu(family):
    model, x = mlp_or_cnn(family, seed=10)
    cpu = neuron_gradient_cosines(model, x, "2", num_neurons=4, method="engine", reduction="none")
    gpu = neuron_gradient_cosines(
        model.cuda(), x.cuda(), "2", num_neurons=4, method="engine", reduction="none"
    )
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=RTOL, atol=ATOL)
