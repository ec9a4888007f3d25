"""linearization_error and distance_from_init against closed forms (Taylor remainder, hand-computed norms)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_linearity.metrics.linearization import (
    LinearizationError,
    distance_from_init,
    linearization_error,
)
from lightning_linearity.nets import LayeredNTKNet


class ScaledTanh(nn.Module):
    """f(a, b; x) = a * tanh(b * x) with scalar parameters: a closed-form first-order Taylor expansion."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def forward(self, x):
        return self.a * torch.tanh(self.b * x)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def probes(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_taylor_remainder_in_closed_form():
    a0, b0, a, b = 1.3, 0.7, 1.1, 0.95
    model = ScaledTanh(a0, b0)
    params_0 = snapshot(model)
    with torch.no_grad():
        model.a.fill_(a), model.b.fill_(b)
    x = torch.tensor([[-1.5], [-0.2], [0.4], [2.0]], dtype=torch.float64)
    result = linearization_error(model, params_0, x)

    xs = x.flatten().tolist()
    f = [a * math.tanh(b * xi) for xi in xs]
    f0 = [a0 * math.tanh(b0 * xi) for xi in xs]
    # f_lin = f(w0) + df/da (a - a0) + df/db (b - b0), df/da = tanh(b0 x), df/db = a0 x sech^2(b0 x)
    f_lin = [
        f0i + math.tanh(b0 * xi) * (a - a0) + a0 * xi / math.cosh(b0 * xi) ** 2 * (b - b0)
        for f0i, xi in zip(f0, xs, strict=True)
    ]
    errors = [abs(fi - li) for fi, li in zip(f, f_lin, strict=True)]
    change = sum(abs(fi - f0i) for fi, f0i in zip(f, f0, strict=True)) / len(xs)
    assert isinstance(result, LinearizationError)
    torch.testing.assert_close(result.mean_abs.item(), sum(errors) / len(errors), rtol=1e-12, atol=0)
    torch.testing.assert_close(result.max_abs.item(), max(errors), rtol=1e-12, atol=0)
    torch.testing.assert_close(result.relative.item(), sum(errors) / len(errors) / change, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.distance.item(), math.hypot(a - a0, b - b0), rtol=1e-12, atol=0)


def test_linear_in_the_weights_has_zero_error():
    model = nn.Linear(5, 3).double()
    params_0 = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1), dtype=p.dtype))
    result = linearization_error(model, params_0, probes(7, 5))
    assert result.max_abs < 1e-13 and result.relative < 1e-13 and result.distance > 1.0


def test_identity_net_with_only_the_output_layer_trained_is_linear():
    # with sigma = identity the net is still multilinear in (W_1, ..., W_{L+1}); freezing all but the last
    # layer makes f linear in the trainable weights. params_0 may hold the frozen ones: they are ignored.
    net = LayeredNTKNet.fcn(4, [16, 16], 2, activation="identity", seed=0).double()
    for layer in net.layers[:-1]:
        layer.requires_grad_(False)
    params_0 = snapshot(net)
    with torch.no_grad():
        net.layers[-1].weight.mul_(-2.0)
    result = linearization_error(net, params_0, probes(6, 4))
    assert result.max_abs < 1e-12 and result.mean_abs < 1e-12
    torch.testing.assert_close(result.distance, 3.0 * params_0["layers.2.weight"].norm())


def test_at_init_everything_is_zero():
    net = LayeredNTKNet.fcn(3, [8, 8], 2, seed=0)
    result = linearization_error(net, snapshot(net), torch.randn(4, 3))
    for value in (result.mean_abs, result.max_abs, result.relative, result.distance):
        assert value.dim() == 0 and value.item() == 0.0


def test_relative_is_infinite_when_only_the_linearisation_moves():
    # (a, b) -> (-a0, -b0) leaves a tanh(b x) unchanged, but f_lin moves along the gradient
    model = ScaledTanh(1.0, 0.5)
    params_0 = snapshot(model)
    with torch.no_grad():
        model.a.neg_(), model.b.neg_()
    result = linearization_error(model, params_0, torch.tensor([[1.0], [-0.5]], dtype=torch.float64))
    assert result.mean_abs > 0 and math.isinf(result.relative.item())


def test_distance_by_hand():
    net = LayeredNTKNet.fcn(3, [5, 4], 2, bias=True, seed=0).double()
    params_0 = snapshot(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.25)
    num_parameters = 3 * 5 + 5 + 5 * 4 + 4 + 4 * 2 + 2
    expected = 0.25 * math.sqrt(num_parameters)
    torch.testing.assert_close(distance_from_init(net, params_0).item(), expected)
    torch.testing.assert_close(linearization_error(net, params_0, probes(2, 3)).distance.item(), expected)


def test_params_0_on_another_dtype_is_converted():
    net = LayeredNTKNet.fcn(3, [6], 1, seed=0)
    params_0 = {name: p.double() for name, p in snapshot(net).items()}
    result = linearization_error(net, params_0, torch.randn(2, 3))
    assert result.mean_abs.dtype == torch.float32 and result.mean_abs.item() == 0.0


def test_leaves_model_grads_mode_and_rng_untouched():
    net = LayeredNTKNet.fcn(3, [8, 8], 1, seed=0).train()
    params_0 = snapshot(net)
    with torch.no_grad():
        net.layers[1].weight.add_(0.1)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    before = snapshot(net)
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    rng = torch.get_rng_state()
    linearization_error(net, params_0, torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    distance_from_init(net, params_0)
    assert torch.equal(torch.get_rng_state(), rng) and net.training
    for name, p in net.named_parameters():
        assert torch.equal(p.detach(), before[name]) and torch.equal(p.grad, grads[name])


def test_bad_params_0_and_inputs():
    net = LayeredNTKNet.fcn(3, [6, 6], 1, seed=0)
    params_0 = snapshot(net)
    x = torch.randn(2, 3)
    missing = {k: v for k, v in params_0.items() if k != "layers.1.weight"}
    with pytest.raises(ValueError, match=r"missing \['layers.1.weight'\]"):
        linearization_error(net, missing, x)
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        distance_from_init(net, {**params_0, "extra": torch.zeros(1)})
    wrong = {**params_0, "layers.0.weight": torch.zeros(6, 4)}
    with pytest.raises(ValueError, match=r"layers.0.weight: \(6, 4\) != \(6, 3\)"):
        linearization_error(net, wrong, x)
    with pytest.raises(TypeError, match="dict"):
        linearization_error(net, list(params_0.values()), x)
    with pytest.raises(ValueError, match="could not be evaluated"):
        linearization_error(net, params_0, torch.randn(2, 4))
    with pytest.raises(ValueError, match="no trainable parameters"):
        linearization_error(LayeredNTKNet.fcn(3, [6], 1).requires_grad_(False), params_0, x)
    diverged_init = {
        **params_0,
        "layers.2.weight": torch.full_like(params_0["layers.2.weight"], float("nan")),
    }
    with pytest.raises(FloatingPointError, match="at params_0 has"):
        linearization_error(net, diverged_init, x)
    with torch.no_grad():
        net.layers[2].weight.fill_(float("inf"))
    with pytest.raises(FloatingPointError, match="model output on the probe inputs"):
        linearization_error(net, params_0, x)
