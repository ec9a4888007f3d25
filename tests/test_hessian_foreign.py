"""hessian_spectral_norm on foreign models: the structured route for chains of nn.Linear layers and
elementwise activations against dense Hessians (torch.autograd.functional.hessian, float64) and the generic
path, and the models it must refuse (docs/math.md 2.4 and section 3)."""

from __future__ import annotations

import itertools

import pytest
import torch
from test_hessian import dense_hessian_norms, dense_top_eigenvectors
from torch import nn

from lightning_linearity.metrics._chain import LinearChain, linear_chain
from lightning_linearity.metrics.hessian import hessian_spectral_norm

pytestmark = pytest.mark.usefixtures("one_thread")

ACTIVATIONS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.2),
    "elu": lambda: nn.ELU(0.7),
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": lambda: nn.Softplus(beta=2.0, threshold=1.0),  # the linear branch is reached
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "identity": nn.Identity,
}
TIGHT = {"tol": 1e-10, "max_iter": 300}


def mlp(
    activation: str, k: int, bias: bool = True, widths=(6, 5), d: int = 3, seed: int = 0
) -> nn.Sequential:
    """Linear, sigma, Linear, sigma, Linear in float64 with PyTorch's default initialisation."""
    torch.manual_seed(seed)
    sizes = (d, *widths)
    layers: list[nn.Module] = []
    for n_in, n_out in itertools.pairwise(sizes):
        layers += [nn.Linear(n_in, n_out, bias=bias), ACTIVATIONS[activation]()]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], k, bias=bias)).double()


def probes(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return 1.5 * torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def structured(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    values, info = hessian_spectral_norm(model, x, return_info=True, **TIGHT, **kwargs)
    assert info.method == "structured"
    return values


# ------------------------------------------------------------------ the chain route against dense Hessians
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_chain_matches_dense_hessian(activation, bias, k):
    model, x = mlp(activation, k, bias), probes(3, 3)
    torch.testing.assert_close(structured(model, x), dense_hessian_norms(model, x), rtol=1e-8, atol=1e-12)


def test_flatten_composed_activations_and_a_custom_forward():
    class Net(nn.Module):  # forward is exactly a chain: one Tanh module used twice, two Linears in a row
        def __init__(self):
            super().__init__()
            self.flat, self.act = nn.Flatten(), nn.Tanh()
            self.fc1, self.fc2, self.fc3, self.out = (
                nn.Linear(4, 6),
                nn.Linear(6, 5),
                nn.Linear(5, 5),
                nn.Linear(5, 2),
            )
            self.soft = nn.Softplus()

        def forward(self, x):
            h = self.act(self.fc1(self.flat(x)))
            h = self.act(self.soft(self.fc2(h)))  # tanh∘softplus
            return self.out(self.fc3(h))  # fc2 -> fc3 with no activation: sigma = identity

    torch.manual_seed(2)
    model, x = Net().double(), probes(3, 4).view(3, 2, 2)
    chain = linear_chain(model, x)
    assert isinstance(chain, LinearChain) and chain.names == ("fc1", "fc2", "fc3", "out") and chain.flatten
    assert [sigma.name for sigma in chain.activations] == ["tanh", "tanh∘softplus", "identity"]
    torch.testing.assert_close(structured(model, x), dense_hessian_norms(model, x), rtol=1e-8, atol=1e-12)


def test_eval_mode_dropout_and_in_place_activations():
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.ReLU(inplace=True), nn.Dropout(0.3), nn.Linear(6, 5), nn.ELU(inplace=True),
        nn.Linear(5, 2),
    ).double()  # fmt: skip
    x = probes(3, 3)
    model.eval()
    torch.testing.assert_close(structured(model, x), dense_hessian_norms(model, x), rtol=1e-8, atol=1e-12)
    assert linear_chain(model.train(), x) == "2 (Dropout) is in the chain"  # random in training mode


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "softplus"])
def test_kinks_follow_autograd(activation):
    # the first probe (x = 0) puts z_1 = b_1; some neurons of both hidden layers sit exactly on the kink
    # (0, or beta z = threshold for Softplus), those of layer 2 with zero incoming weights
    model = mlp(activation, 2, widths=(6, 6))
    kink = 0.5 if activation == "softplus" else 0.0
    with torch.no_grad():
        model[0].bias[:3] = kink
        model[2].weight[:2] = 0.0
        model[2].bias[:2] = kink
    x = torch.zeros(2, 3, dtype=torch.float64)
    x[1, 0] = 0.3
    with torch.no_grad():
        assert (model[0](x)[0, :3] == kink).all() and (model[:3](x)[:, :2] == kink).all()
    torch.testing.assert_close(structured(model, x), dense_hessian_norms(model, x), rtol=1e-8, atol=1e-12)


def test_columns_and_hidden_layers():
    model, x = mlp("tanh", 3), probes(3, 3)
    full = structured(model, x)
    part = structured(model, x, columns=[2, 0])
    torch.testing.assert_close(part, full[:, [2, 0]], rtol=1e-12, atol=0)
    torch.testing.assert_close(part, dense_hessian_norms(model, x, columns=[2, 0]), rtol=1e-8, atol=1e-12)
    # layer "2" is the second Linear: z_2, the output of model[:3]
    hidden = structured(model, x, layer="2")
    torch.testing.assert_close(hidden, dense_hessian_norms(model[:3], x), rtol=1e-8, atol=1e-12)
    generator = torch.Generator().manual_seed(4)
    sampled, info = hessian_spectral_norm(
        model, x, layer="2", num_neurons=3, generator=generator, columns=[1], return_info=True, **TIGHT
    )
    assert info.method == "structured" and info.layer == "2"
    expected = dense_hessian_norms(model[:3], x)[:, info.neurons[[1]]]
    torch.testing.assert_close(sampled, expected, rtol=1e-8, atol=1e-12)
    # the output of an activation module is no pre-activation of the chain: the generic path takes it
    post, info = hessian_spectral_norm(model, x, layer="3", return_info=True, **TIGHT)
    assert info.method == "generic"
    torch.testing.assert_close(post, dense_hessian_norms(model[:4], x), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match=r"layer '3' is not one of its nn.Linear layers.*method='generic'"):
        hessian_spectral_norm(model, x, layer="3", method="structured")


def test_eigenvector_shares_match_dense_eigenvector():
    model, x = mlp("gelu", 2, widths=(4, 3)), probes(2, 3)
    _, info = hessian_spectral_norm(model, x, return_info=True, eigenvector_shares=True, **TIGHT)
    assert info.method == "structured" and info.share_names == ("0", "2", "4")
    squared = dense_top_eigenvectors(model, x).pow(2)
    sizes = [sum(p.numel() for p in model[i].parameters()) for i in (0, 2, 4)]
    expected = torch.stack([part.sum(-1) for part in squared.split(sizes, dim=-1)], dim=-1)
    torch.testing.assert_close(info.layer_shares, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_structured_equals_generic_on_a_medium_model(activation):
    model, x = mlp(activation, 2, widths=(48, 40, 32), d=10), probes(2, 10)
    fast = structured(model, x)
    generic, info = hessian_spectral_norm(model, x, method="generic", return_info=True, **TIGHT)
    assert info.method == "generic"
    torch.testing.assert_close(fast, generic, rtol=1e-8, atol=0)


# ------------------------------------------------------------------ models the chain route must refuse
class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.out = nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 2)

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.out(h + torch.tanh(self.fc2(h)))


class FunctionalTanh(nn.Module):  # the activation is no module: the called modules look like Linear, Linear
    def __init__(self):
        super().__init__()
        self.fc1, self.out = nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.fc1(x)))


def tied_weights() -> nn.Module:
    model = nn.Sequential(
        nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)
    )
    model[4].weight = model[2].weight
    return model


def used_twice() -> nn.Module:
    hidden = nn.Linear(5, 5)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), hidden, nn.Tanh(), hidden, nn.Tanh(), nn.Linear(5, 2))


def batchnorm_in_training() -> nn.Module:
    # BatchNorm1d on (n, 2, 4): statistics over n and 4 positions, so one probe alone is well defined
    return nn.Sequential(
        nn.Linear(3, 8), nn.Unflatten(1, (2, 4)), nn.BatchNorm1d(2), nn.Flatten(), nn.Tanh(), nn.Linear(8, 2)
    ).train()


def frozen_weight() -> nn.Module:
    model = mlp("tanh", 2)
    model[2].weight.requires_grad_(False)
    return model


REFUSED = {
    "skip connection": (Residual, "skip connection"),
    "functional activation": (FunctionalTanh, "skip connection"),
    "non-elementwise module": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Softmax(dim=1), nn.Linear(5, 2)),
        r"Softmax\) is in the chain",
    ),
    "tied weights": (tied_weights, r"share \(tie\) parameters"),
    "a Linear used twice": (used_twice, "called twice"),
    "batchnorm in training mode": (batchnorm_in_training, r"Unflatten\) is in the chain"),
    "frozen weight": (frozen_weight, "2 has frozen parameters"),
    "trailing activation": (
        lambda: nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2), nn.Sigmoid()),
        "activation after the last",
    ),
}


def refused_model(name: str) -> nn.Module:
    torch.manual_seed(3)
    return REFUSED[name][0]().double()


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_models_fall_back_to_the_generic_path(name):
    model, x = refused_model(name), probes(3, 3)
    assert isinstance(linear_chain(model, x), str)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    values, info = hessian_spectral_norm(model, x, return_info=True, **TIGHT)
    assert info.method == "generic"
    for key, value in model.state_dict().items():  # running statistics included
        assert torch.equal(value, state[key]), key
    torch.testing.assert_close(values, dense_hessian_norms(model, x), rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match=REFUSED[name][1]) as raised:
        hessian_spectral_norm(model, x, method="structured")
    assert "\n" not in str(raised.value) and "method='generic'" in str(raised.value)


def test_the_model_is_left_untouched():
    model, x = mlp("relu", 2).train(), probes(2, 3)
    model[0].weight.grad = torch.ones_like(model[0].weight)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    structured(model, x)
    assert model.training and all(m.training for m in model.modules())
    assert (
        torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[2].weight.grad is None
    )
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_a_hidden_layer_after_batchnorm_in_training_mode():
    """layer= on the generic path with a normalisation layer in training mode: the running statistics are
    passed as None (normalised by the probe's own statistics, nothing updated in place inside torch.func)."""
    torch.manual_seed(5)
    model, x = batchnorm_in_training().double(), probes(2, 3)
    before = {name: b.clone() for name, b in model.named_buffers()}
    values = hessian_spectral_norm(model, x, layer="2", **TIGHT)
    assert all(torch.equal(b, before[name]) for name, b in model.named_buffers()) and model.training
    # the reference: the dense Hessian of the flattened BatchNorm output (it updates the statistics itself)
    torch.testing.assert_close(values, dense_hessian_norms(model[:4], x), rtol=1e-6, atol=1e-9)
