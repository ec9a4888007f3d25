"""analytic_ntk / analytic_nngp (docs/math.md 2.8) against Monte-Carlo means of wide networks and closed
forms.

Monte-Carlo tolerances: an entry passes if it lies within Z standard errors of the Monte-Carlo mean, the
standard error estimated from the S networks' spread (std / sqrt(S)). Z = 4.5 is a per-entry two-sided
level of about 1e-4 for S = 30 (Student t, 29 degrees of freedom), so about 2e-3 family-wise over the n^2
entries; the seeds are fixed, so the outcome is deterministic. The finite-width bias of E[K] is O(1/m),
below the standard error O(1/sqrt(m S)) for S << m.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from lightning_linearity import NTKFCN
from lightning_linearity.metrics import analytic_nngp, analytic_ntk, empirical_ntk
from lightning_linearity.metrics.analytic import gaussian_moments, limit_kernels
from lightning_linearity.nets import LayeredNTKNet

pytestmark = pytest.mark.usefixtures("one_thread")

Z = 4.5
D, N = 4, 4


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(N, D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def monte_carlo(build, x, seeds, statistic):
    """Mean and standard error of ``statistic(net)`` over networks ``build(seed)``."""
    values = torch.stack([statistic(build(s).double(), x) for s in range(seeds)])
    return values.mean(0), values.std(0) / math.sqrt(seeds)


def assert_within(mean, se, target):
    ratio = ((mean - target).abs() / se).max().item()
    assert ratio < Z, f"Monte-Carlo mean is {ratio:.2f} standard errors from the analytic kernel"


# ---------------------------------------------------------------------------------- Gaussian moments
def _covariances():
    var1 = torch.tensor([1.0, 4.0, 0.3, 2.0, 0.0, 10.0], dtype=torch.float64)
    var2 = torch.tensor([1.2, 3.0, 0.5, 2.0, 1.0, 12.0], dtype=torch.float64)
    cov = torch.tensor([0.5, -3.0, 0.1, 2.0, 0.0, 9.0], dtype=torch.float64)
    return var1, cov, var2


def test_quadrature_matches_erf_and_identity_closed_forms():
    var1, cov, var2 = _covariances()
    for name in ("erf", "identity"):
        exact = gaussian_moments(name, var1, cov, var2, method="closed_form")
        quad = gaussian_moments(name, var1, cov, var2, method="quadrature")
        for e, q in zip(exact, quad, strict=True):
            torch.testing.assert_close(q, e, rtol=0, atol=1e-10)


def test_quadrature_matches_relu_closed_form_at_its_rate():
    # relu's kink makes the value second order in the step h and the jump of relu' first order
    var1, cov, var2 = _covariances()
    exact = gaussian_moments("relu", var1, cov, var2, method="closed_form")
    value, slope = gaussian_moments("relu", var1, cov, var2, method="quadrature", step=0.01)
    torch.testing.assert_close(value, exact[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(slope, exact[1], rtol=0, atol=3e-3)


def test_relu_closed_form_known_values():
    # Cho & Saul: E[relu(u)^2] = var / 2, E[relu'(u)^2] = 1/2; independent u, v: E = (sqrt(var)/sqrt(2 pi))^2
    value, slope = gaussian_moments("relu", torch.tensor(3.0), torch.tensor(3.0), torch.tensor(3.0))
    assert value.item() == pytest.approx(1.5, abs=1e-12) and slope.item() == pytest.approx(0.5, abs=1e-12)
    value, slope = gaussian_moments("relu", torch.tensor(2.0), torch.tensor(0.0), torch.tensor(8.0))
    assert value.item() == pytest.approx(4.0 / (2 * math.pi), abs=1e-12)
    assert slope.item() == pytest.approx(0.25, abs=1e-12)


@pytest.mark.parametrize("name", ["tanh", "softplus", "gelu", "sigmoid"])
def test_quadrature_matches_gauss_hermite(name):
    # independent nodes: 150-point Gauss-Hermite (numpy) converges to ~1e-13 at variances <= ~1
    var1 = torch.tensor([1.0, 0.3, 0.8], dtype=torch.float64)
    var2 = torch.tensor([0.7, 0.5, 0.8], dtype=torch.float64)
    cov = torch.tensor([0.5, -0.2, 0.8], dtype=torch.float64)
    nodes, weights = np.polynomial.hermite_e.hermegauss(150)
    z, w = torch.tensor(nodes), torch.tensor(weights / math.sqrt(2 * math.pi))
    from lightning_linearity.nets.activations import get_activation

    act = get_activation(name)
    rho = cov / (var1 * var2).sqrt()
    u = var1.sqrt()[:, None, None] * z[:, None]
    v = var2.sqrt()[:, None, None] * (
        rho[:, None, None] * z[:, None] + (1 - rho**2).sqrt()[:, None, None] * z
    )
    ww = w[:, None] * w
    value, slope = gaussian_moments(name, var1, cov, var2)
    torch.testing.assert_close(value, (act.fn(u) * act.fn(v) * ww).sum((-1, -2)), rtol=0, atol=1e-10)
    torch.testing.assert_close(
        slope, (act.derivative(u) * act.derivative(v) * ww).sum((-1, -2)), rtol=0, atol=1e-10
    )


def test_moment_errors():
    with pytest.raises(ValueError, match="no closed form"):
        gaussian_moments(
            "tanh", torch.tensor(1.0), torch.tensor(0.5), torch.tensor(1.0), method="closed_form"
        )
    with pytest.raises(ValueError, match="method must be"):
        gaussian_moments("tanh", torch.tensor(1.0), torch.tensor(0.5), torch.tensor(1.0), method="exact")


# ---------------------------------------------------------------------------------- closed-form layers
def test_one_hidden_layer_relu_by_hand(x):
    # Theta = Sigma_2 + Sigma_1 E[relu' relu'], Sigma_1 = (x.x' + 1)/(d + 1) with a bias
    net = LayeredNTKNet.fcn(D, [8], 1, activation="relu", bias=True).double()
    s1 = (x @ x.T + 1.0) / (D + 1.0)
    norms = s1.diag().sqrt()
    theta = torch.arccos((s1 / norms[:, None] / norms[None, :]).clamp(-1, 1))
    e_post = (
        norms[:, None] * norms[None, :] / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * theta.cos())
    )
    e_slope = (math.pi - theta) / (2 * math.pi)
    torch.testing.assert_close(analytic_nngp(net, x), e_post, rtol=0, atol=1e-10)
    # arccos is ill-conditioned at 1 (the diagonal): sqrt(2 eps) ~ 2e-8 in theta
    torch.testing.assert_close(analytic_ntk(net, x), e_post + s1 * e_slope, rtol=0, atol=1e-8)


def test_identity_activation_is_a_linear_network(x):
    # linear FCN with L hidden layers: Sigma = x.x'/d, Theta = (L + 1) x.x'/d
    net = LayeredNTKNet.fcn(D, [8, 8, 8], 1, activation="identity").double()
    torch.testing.assert_close(analytic_nngp(net, x), x @ x.T / D)
    torch.testing.assert_close(analytic_ntk(net, x), 4 * x @ x.T / D)


@pytest.mark.parametrize(
    "net",
    [
        LayeredNTKNet.fcn(D, [16, 8], 2, activation="tanh", bias=True),
        LayeredNTKNet.densenet(D, [16, 8, 16], 1, activation="gelu"),
        LayeredNTKNet.masked_dag(D, [16, 16], 1, activation="sigmoid", mask_seed=1),
    ],
)
def test_symmetric_psd_and_cross_blocks(net, x):
    x2 = torch.randn(3, D, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    both = torch.cat([x, x2])
    assert analytic_ntk(net, both).dtype == torch.float32  # the model's dtype
    net = copy.deepcopy(net).double()
    for fn in (analytic_ntk, analytic_nngp):
        full = fn(net, both)
        assert torch.equal(full, full.T)
        assert torch.linalg.eigvalsh(full).min() > -1e-10 * full.diag().max()
        torch.testing.assert_close(fn(net, x, x2), full[:N, N:], rtol=1e-12, atol=1e-12)


def test_frozen_layers_drop_their_own_term(x):
    net = LayeredNTKNet.fcn(D, [16, 16], 1, activation="tanh").double()
    full, nngp = analytic_ntk(net, x), analytic_nngp(net, x)
    net.layers[-1].weight.requires_grad_(False)  # the output layer's own term is Sigma_{L+1} = NNGP
    torch.testing.assert_close(full - analytic_ntk(net, x), nngp, rtol=1e-12, atol=1e-12)
    net.layers[0].weight.requires_grad_(False)
    net.layers[1].weight.requires_grad_(False)  # nothing trainable left in the limit
    torch.testing.assert_close(analytic_ntk(net, x), torch.zeros_like(full), rtol=0, atol=1e-14)


def test_lightning_module_and_fan_in_option(x):
    module = NTKFCN(D, 2, width=32, depth=2, activation="erf").double()
    torch.testing.assert_close(analytic_ntk(module, x), analytic_ntk(module.net, x))
    # an FCN without bias has no input or bias columns past layer 1: both fan-in conventions agree
    limit = limit_kernels(module.net, x, None, True, "limit")[1]
    torch.testing.assert_close(limit, limit_kernels(module.net, x, None, True, "network")[1])
    # a DenseNet's input columns are a share d / (m + d) of layer 2's fan-in: the two conventions differ,
    # by less as m grows
    gaps = []
    for m in (16, 256):
        net = LayeredNTKNet.densenet(D, [m, m], 1, activation="erf").double()
        a, b = (analytic_ntk(net, x, fan_in=f) for f in ("limit", "network"))
        gaps.append(((a - b).norm() / a.norm()).item())
    assert gaps[0] > 4 * gaps[1] > 0


def test_errors(x):
    with pytest.raises(ValueError, match="package's networks"):
        analytic_ntk(nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 1)), x)
    dag = LayeredNTKNet.from_edges([("a", "h"), ("b", "h"), ("h", "o"), ("a", "o")])
    with pytest.raises(ValueError, match="edge list"):
        analytic_nngp(dag, x[:, :2])
    net = LayeredNTKNet.fcn(D, [8], 1)
    with pytest.raises(ValueError, match="in_features=4"):
        analytic_ntk(net, x[:, :3])
    with pytest.raises(ValueError, match="fan_in"):
        analytic_ntk(net, x, fan_in="finite")


# ---------------------------------------------------------------------------------- Monte Carlo
@pytest.mark.parametrize(
    ("build", "width"),
    [
        (lambda s: LayeredNTKNet.fcn(D, [1024, 512], 1, activation="tanh", bias=True, seed=s), 512),
        (lambda s: LayeredNTKNet.densenet(D, [512, 256, 512], 1, activation="relu", seed=s), 256),
    ],
    ids=["fcn-tanh-bias", "densenet-relu-unequal"],
)
def test_ntk_matches_mean_of_wide_networks(build, width, x):
    mean, se = monte_carlo(build, x, 30, empirical_ntk)
    assert_within(mean, se, analytic_ntk(build(0).double(), x))


def test_nngp_matches_output_covariance_of_wide_networks(x):
    # 16 outputs per network; the per-network mean of f_a(x) f_a(x') over a is one Monte-Carlo draw
    def build(s):
        return LayeredNTKNet.densenet(D, [512, 512], 16, activation="softplus", bias=True, seed=s)

    def covariance(net, probes):
        with torch.no_grad():
            f = net(probes)
        return f @ f.T / f.shape[1]

    mean, se = monte_carlo(build, x, 30, covariance)
    assert_within(mean, se, analytic_nngp(build(0).double(), x))


def test_masked_dag_limit_is_not_the_unmasked_densenets(x):
    """Random masks at fixed d: layer 1's neurons read different input subsets, so the limit averages the
    Gaussian expectations over them and differs from the unmasked DenseNet's kernel (docs/math.md 2.8).

    Each network has its own mask (as in 004's runs); per network the difference K - Theta(net) is taken,
    so the mask sampling of the first layer averages out with the weights."""
    seeds, dense = 30, analytic_ntk(LayeredNTKNet.densenet(D, [8, 8], 1, activation="erf").double(), x)
    own, unmasked = [], []
    for s in range(seeds):
        net = LayeredNTKNet.masked_dag(
            D, [1024, 1024], 1, activation="erf", seed=s, mask_seed=100 + s
        ).double()
        kernel = empirical_ntk(net, x)
        own.append(kernel - analytic_ntk(net, x))
        unmasked.append(kernel - dense)
    for diffs, close in ((own, True), (unmasked, False)):
        diffs = torch.stack(diffs)
        ratio = (diffs.mean(0).abs() / (diffs.std(0) / math.sqrt(seeds))).max().item()
        assert (ratio < Z) == close, f"{ratio:.1f} standard errors"


def test_state_untouched(x):
    net = LayeredNTKNet.masked_dag(D, [8, 8], 1, activation="tanh", mask_seed=0).double().train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    analytic_ntk(net, x)
    analytic_nngp(net, x)
    assert net.training and torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
