"""hessian_spectral_norm against dense Hessians (torch.autograd.functional.hessian, float64), closed forms."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lightning_linearity.metrics._functional import single_input_model, trainable_parameters
from lightning_linearity.metrics._linalg import ConvergenceWarning, power_iteration
from lightning_linearity.metrics.hessian import HessianInfo, hessian_operator, hessian_spectral_norm
from lightning_linearity.nets import LayeredNTKNet

pytestmark = pytest.mark.usefixtures("one_thread")


DAG_EDGES = [
    ("a", "h1"), ("b", "h1"), ("a", "h2"), ("h1", "h3"), ("b", "h3"), ("h1", "h4"), ("h2", "h4"),
    ("a", "h4"), ("h3", "h5"), ("h4", "h5"), ("h5", "o1"), ("h2", "o1"), ("h4", "o2"), ("h3", "o2"),
    ("b", "o2"), ("h5", "o3"), ("h1", "o3"),
]  # fmt: skip


def dense_hessian_norms(module: nn.Module, x: torch.Tensor, columns=None) -> torch.Tensor:
    """max |eig| of the dense Hessian of every output column of ``module`` at every probe: (n, q).

    The reference: ``module`` is evaluated by an explicit flat-parameter function (no torch.func), and
    each P x P Hessian is formed with ``torch.autograd.functional.hessian`` and diagonalised.
    """
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def output(w, xi):
        state, offset = {}, 0
        for name, p in named:
            state[name] = w[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        out = torch.func.functional_call(module, state, (xi.unsqueeze(0),)).reshape(-1)
        return out if columns is None else out[columns]

    q = output(flat, x[0]).numel()
    norms = torch.empty(x.shape[0], q, dtype=flat.dtype)
    for i in range(x.shape[0]):
        for a in range(q):
            hessian = torch.autograd.functional.hessian(
                lambda w, i=i, a=a: output(w, x[i])[a], flat, vectorize=True
            )
            norms[i, a] = torch.linalg.eigvalsh(hessian).abs().max()
    return norms


class Preactivations(nn.Module):
    """z_l of a LayeredNTKNet as an independent reference module (via ``net.preactivations``)."""

    def __init__(self, net: LayeredNTKNet, layer: int):
        super().__init__()
        self.net, self.layer = net, layer

    def forward(self, x):
        return self.net.preactivations(x)[self.layer - 1]


class Bilinear(nn.Module):
    """f(u, v; x) = sum_j x_j u_j v_j: Hessian [[0, diag(x)], [diag(x), 0]], eigenvalues +-x_j."""

    def __init__(self, dim: int):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.u = nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))
        self.v = nn.Parameter(torch.randn(dim, generator=gen, dtype=torch.float64))

    def forward(self, x):
        return (x * self.u * self.v).sum(dim=-1, keepdim=True)


def make_net(family: str, k: int, bias: bool) -> LayeredNTKNet:
    kwargs = {"bias": bias, "seed": 3}
    if family == "fcn":
        net = LayeredNTKNet.fcn(4, [12, 10, 8], k, **kwargs)
    elif family == "densenet":
        net = LayeredNTKNet.densenet(4, [10, 8], k, **kwargs)
    elif family == "masked_dag":
        net = LayeredNTKNet.masked_dag(4, [12, 10, 8], k, drop_prob=0.5, mask_seed=1, **kwargs)
    else:  # outputs o1, o2, o3 (k = 3) or o1 alone (k = 1)
        edges = DAG_EDGES if k == 3 else [e for e in DAG_EDGES if e[1] not in ("o2", "o3")]
        net = LayeredNTKNet.from_edges(edges, **kwargs)
    return net.double()


def probes(n: int, d: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


METHODS = ["structured", "generic"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["fcn", "densenet", "masked_dag", "from_edges"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_dense_hessian(family, k, bias, method):
    net = make_net(family, k, bias)
    x = probes(2, net.in_features)
    values, info = hessian_spectral_norm(net, x, method=method, return_info=True)
    assert values.shape == (2, net.out_features) and values.dtype == torch.float64
    assert info.method == method and info.converged.all()
    torch.testing.assert_close(values, dense_hessian_norms(net, x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_matches_dense_hessian_with_2000_parameters(method):
    net = LayeredNTKNet.fcn(8, [30, 30, 20], 3, seed=4).double()  # P = 1800
    x = probes(1, 8)
    values = hessian_spectral_norm(net, x, method=method)
    torch.testing.assert_close(values, dense_hessian_norms(net, x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("activation", ["erf", "softplus", "gelu", "sigmoid", "relu", "identity"])
def test_structured_path_every_activation(activation):
    # sigma'' enters the structured products in closed form: each activation against the dense Hessian
    net = LayeredNTKNet.densenet(3, [7, 6], 2, activation=activation, bias=True, seed=2).double()
    x = probes(2, 3)
    values = hessian_spectral_norm(net, x, method="structured")
    torch.testing.assert_close(values, dense_hessian_norms(net, x), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_the_larger_end_of_a_nearly_symmetric_spectrum_is_found(method):
    # this Hessian has eigenvalues near +0.3187 and -0.3251; stopping when the larger Ritz value alone met
    # tol 1e-3 gave 0.3187 on the structured path (benchmarks/hessian.py, width 64, probe 0)
    net = LayeredNTKNet.fcn(16, [64] * 3, 1, activation="tanh", seed=0)
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))[:1]
    value = hessian_spectral_norm(net, x, tol=1e-3, max_iter=300, method=method)
    # reference: the torch.func products in float64 at a tight tolerance
    reference = hessian_spectral_norm(net.double(), x.double(), tol=1e-10, max_iter=300, method="generic")
    torch.testing.assert_close(value.double(), reference, rtol=2e-3, atol=0)
    assert abs(reference.item() - 0.32514) < 1e-4


def test_structured_equals_generic_on_a_wide_float32_net():
    # the paths start Lanczos from different vectors; both stop within tol of the same extreme eigenvalue
    net = LayeredNTKNet.masked_dag(16, [256, 256], 4, drop_prob=0.3, mask_seed=0, bias=True, seed=0)
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(0))
    structured, info = hessian_spectral_norm(net, x, tol=1e-5, method="structured", return_info=True)
    generic = hessian_spectral_norm(net, x, tol=1e-5, method="generic")
    assert info.method == "structured" and structured.dtype == torch.float32
    torch.testing.assert_close(structured, generic, rtol=1e-4, atol=0)
    hidden = {
        method: hessian_spectral_norm(net, x, layer=2, num_neurons=5, tol=1e-5, method=method)
        for method in METHODS
    }
    torch.testing.assert_close(hidden["structured"], hidden["generic"], rtol=1e-4, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_columns_reproduce_their_share_of_the_full_computation(method):
    # what a DDP rank computes for its (probe, output) pairs equals that part of the whole computation
    net = make_net("densenet", 3, bias=True)
    x = probes(2, 4)
    full = hessian_spectral_norm(net, x, tol=1e-4, method=method)
    part = hessian_spectral_norm(net, x, tol=1e-4, method=method, columns=[2, 0])
    torch.testing.assert_close(part, full[:, [2, 0]], rtol=1e-12, atol=0)
    generator = torch.Generator().manual_seed(3)
    hidden = hessian_spectral_norm(net, x, layer=2, num_neurons=4, generator=generator, method=method)
    generator = torch.Generator().manual_seed(3)
    hidden_part = hessian_spectral_norm(
        net, x, layer=2, num_neurons=4, generator=generator, method=method, columns=[3]
    )
    torch.testing.assert_close(hidden_part, hidden[:, [3]], rtol=1e-12, atol=0)


TIGHT = {"tol": 1e-10, "max_iter": 300}
FROZEN = {  # which parameters of which layers (0-based index into net.layers) are not part of w
    "first layer": {0: ("weight", "bias")},
    "a hidden bias": {1: ("bias",)},
    "a hidden weight, its bias trained": {1: ("weight",)},
    "the output weight and a first-layer bias": {-1: ("weight",), 0: ("bias",)},
}


@pytest.mark.parametrize("family", ["fcn", "masked_dag", "from_edges"])
@pytest.mark.parametrize("frozen", list(FROZEN))
def test_frozen_parameters_stay_on_the_structured_path(family, frozen):
    """The Hessian with respect to the trainable parameters only (docs/math.md 2.4): the structured subspace
    leaves the frozen parts out of E, exact against the dense Hessian of the trainable ones."""
    net = make_net(family, 3, bias=True)
    for index, names in FROZEN[frozen].items():
        for name in names:
            getattr(net.layers[index], name).requires_grad_(False)
    x = probes(2, net.in_features)
    values, info = hessian_spectral_norm(net, x, return_info=True, eigenvector_shares=True, **TIGHT)
    assert info.method == "structured"
    torch.testing.assert_close(values, dense_hessian_norms(net, x), rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(hessian_spectral_norm(net, x, method="generic", **TIGHT), values)
    if frozen == "first layer":  # a frozen layer holds none of the eigenvector
        assert info.layer_shares[..., 0].abs().max() < 1e-12
    hidden = hessian_spectral_norm(net, x, layer=2, return_info=True, **TIGHT)
    assert hidden[1].method == "structured"
    torch.testing.assert_close(
        hidden[0], hessian_spectral_norm(net, x, layer=2, method="generic", **TIGHT), rtol=1e-8, atol=1e-12
    )


def test_foreign_sequential_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 10), nn.Tanh(), nn.Linear(10, 6), nn.Softplus(), nn.Linear(6, 2)
    ).double()
    x = probes(3, 3)
    torch.testing.assert_close(
        hessian_spectral_norm(model, x), dense_hessian_norms(model, x), rtol=1e-6, atol=0
    )
    # hidden option on a foreign model: the output of submodule "2" (the second Linear)
    values, info = hessian_spectral_norm(model, x, layer="2", return_info=True)
    assert values.shape == (3, 6) and info.layer == "2"
    torch.testing.assert_close(values, dense_hessian_norms(model[:3], x), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", ["fcn", "masked_dag"])
def test_hidden_layer_matches_dense(family, method):
    net = make_net(family, 1, bias=True)
    x = probes(2, net.in_features)
    values, info = hessian_spectral_norm(
        net,
        x,
        layer="layer_3",
        num_neurons=4,
        generator=torch.Generator().manual_seed(5),
        method=method,
        return_info=True,
    )
    assert values.shape == (2, 4) and info.layer == "layer_3"
    assert len(set(info.neurons.tolist())) == 4 and int(info.neurons.max()) < net.hidden_widths[2]
    reference = dense_hessian_norms(Preactivations(net, 3), x, columns=info.neurons)
    torch.testing.assert_close(values, reference, rtol=1e-6, atol=0)
    # the same sample for the same generator seed; every neuron when num_neurons is None
    again = hessian_spectral_norm(net, x, layer=3, num_neurons=4, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(again, values, rtol=1e-6, atol=0)
    assert hessian_spectral_norm(net, x, layer="layers.2").shape == (2, net.hidden_widths[2])


@pytest.mark.parametrize("method", METHODS)
def test_first_layer_preactivations_have_zero_hessian(method):
    # z_1 = W_1 x / sqrt(d) is linear in w: its Hessian is exactly 0
    net = make_net("fcn", 1, bias=False)
    values, info = hessian_spectral_norm(
        net, probes(2, 4), layer=1, num_neurons=3, method=method, return_info=True
    )
    assert torch.equal(values, torch.zeros(2, 3, dtype=torch.float64)) and info.converged.all()


def test_symmetric_spectrum_lanczos_exact_power_iteration_stalls():
    # Hessian of sum_j x_j u_j v_j is [[0, diag(x)], [diag(x), 0]]: eigenvalues exactly +-x_j
    model, x = Bilinear(12), probes(3, 12, seed=2)
    values, info = hessian_spectral_norm(model, x, max_iter=100, return_info=True)
    expected = x.abs().max(dim=1, keepdim=True).values
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(values, dense_hessian_norms(model, x), rtol=1e-6, atol=0)
    assert info.converged.all()
    params = trainable_parameters(model)
    operator = hessian_operator(single_input_model(model), params, x, 1)
    generator = torch.Generator().manual_seed(0)
    power = power_iteration(
        operator, 3, 24, generator=generator, dtype=torch.float64, device=x.device, tol=1e-6, max_iter=100
    )
    assert not power.converged.any()
    assert (power.eigenvalue.abs() < expected.squeeze(1) * (1 - 1e-3)).all()


def test_hessian_norm_falls_like_one_over_sqrt_width():
    # 004 Theorem 3.6: ||H_f|| = O~(1/sqrt(m)); tanh FCN, depth 3, at init, one probe, float32
    widths = [64, 128, 256, 512, 1024, 2048]
    x = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    norms = [hessian_spectral_norm(LayeredNTKNet.fcn(8, [m] * 3, seed=1), x, tol=1e-2).item() for m in widths]
    slope = np.polyfit(np.log(widths), np.log(norms), 1)[0]
    assert -0.7 < slope < -0.3, (slope, norms)


@pytest.mark.parametrize("training", [True, False])
def test_leaves_model_grads_mode_and_rng_untouched(training):
    net = make_net("fcn", 3, bias=True).train(training)
    for p in net.parameters():
        p.grad = torch.full_like(p, 0.5)
    net.layers[0].weight.grad = None  # a mix of set and unset grads
    before = {
        name: (p.detach().clone(), None if p.grad is None else p.grad.clone())
        for name, p in net.named_parameters()
    }
    rng = torch.get_rng_state()
    hessian_spectral_norm(net, probes(2, 4))
    hessian_spectral_norm(net, probes(2, 4), layer=2, num_neurons=3)
    assert torch.equal(torch.get_rng_state(), rng)
    assert net.training is training and all(m.training is training for m in net.modules())
    for name, p in net.named_parameters():
        value, grad = before[name]
        assert torch.equal(p.detach(), value) and p.requires_grad
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)


def test_reductions_info_and_chunking():
    net = make_net("densenet", 3, bias=False)
    x = probes(3, 4)
    values, info = hessian_spectral_norm(net, x, return_info=True)
    assert isinstance(info, HessianInfo) and isinstance(info.num_hvps, int) and info.num_hvps > 0
    assert info.converged.shape == values.shape == (3, 3) and info.converged.dtype == torch.bool
    assert (info.tol, info.max_iter, info.layer, info.neurons) == (1e-6, 100, None, None)
    torch.testing.assert_close(hessian_spectral_norm(net, x, reduction="max"), values.max())
    torch.testing.assert_close(hessian_spectral_norm(net, x, reduction="mean"), values.mean())
    chunked, chunked_info = hessian_spectral_norm(net, x, chunk_size=2, return_info=True)
    torch.testing.assert_close(chunked, values, rtol=1e-6, atol=0)
    assert chunked_info.converged.shape == (3, 3)


def test_float32_model():
    net = LayeredNTKNet.fcn(4, [16, 16], 2, seed=0)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    values = hessian_spectral_norm(net, x, tol=1e-4)
    assert values.dtype == torch.float32
    torch.testing.assert_close(
        values.double(), dense_hessian_norms(net.double(), x.double()), rtol=1e-3, atol=0
    )


def test_non_convergence_is_reported():
    net = make_net("fcn", 1, bias=False)
    with pytest.warns(ConvergenceWarning, match="2 of 2 Hessian spectral norms"):
        _, info = hessian_spectral_norm(net, probes(2, 4), max_iter=2, return_info=True)
    assert not info.converged.any() and info.num_hvps == 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_spectral_norm(net, probes(2, 4))  # converges: no warning


def test_bad_inputs():
    net = make_net("fcn", 1, bias=False)
    x = probes(2, 4)
    with pytest.raises(ValueError, match="could not be evaluated"):
        hessian_spectral_norm(net, probes(2, 5))
    with pytest.raises(ValueError, match=r"unknown hidden layer 'layer_9'.*layer_1"):
        hessian_spectral_norm(net, x, layer="layer_9")
    with pytest.raises(ValueError, match=r"valid submodule names: \['0', '1'\]"):
        hessian_spectral_norm(nn.Sequential(nn.Linear(4, 3), nn.Tanh()).double(), x, layer="fc1")
    with pytest.raises(ValueError, match="reduction"):
        hessian_spectral_norm(net, x, reduction="sum")
    for tol, max_iter in [(0.0, 10), (-1.0, 10), (1e-6, 0), (1e-6, -3)]:
        with pytest.raises(ValueError, match=r"tol|max_iter"):
            hessian_spectral_norm(net, x, tol=tol, max_iter=max_iter)
    for num_neurons in (0, 13, 2.0):
        with pytest.raises(ValueError, match="num_neurons"):
            hessian_spectral_norm(net, x, layer=1, num_neurons=num_neurons)
    with pytest.raises(ValueError, match="chunk_size"):
        hessian_spectral_norm(net, x, chunk_size=0)
    for columns in ([], [1], [0, 0], [True]):
        with pytest.raises(ValueError, match=r"columns must be distinct integers in 0\.\.0"):
            hessian_spectral_norm(net, x, columns=columns)
    with pytest.raises(ValueError, match="method must be"):
        hessian_spectral_norm(net, x, method="dense")
    normed = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Linear(3, 1)).double()
    with pytest.raises(ValueError, match=r"not one of the package's networks, nor a chain.*LayerNorm"):
        hessian_spectral_norm(normed, x, method="structured")
    with pytest.raises(ValueError, match="could not be evaluated"):
        hessian_spectral_norm(net, x[:0])
    frozen = make_net("fcn", 1, bias=False).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        hessian_spectral_norm(frozen, x)
    broken = make_net("fcn", 1, bias=False)
    with torch.no_grad():
        broken.layers[1].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        hessian_spectral_norm(broken, x)


# ------------------------------------------------------------------ where the top eigenvector lives
def dense_top_eigenvectors(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(n, q, P) unit eigenvectors of the largest-magnitude eigenvalue of each dense output Hessian."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def output(w, xi):
        state, offset = {}, 0
        for name, p in named:
            state[name] = w[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.func.functional_call(module, state, (xi.unsqueeze(0),)).reshape(-1)

    q = output(flat, x[0]).numel()
    vectors = torch.empty(x.shape[0], q, flat.numel(), dtype=flat.dtype)
    for i in range(x.shape[0]):
        for a in range(q):
            hessian = torch.autograd.functional.hessian(lambda w, i=i, a=a: output(w, x[i])[a], flat)
            eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
            vectors[i, a] = eigenvectors[:, eigenvalues.abs().argmax()]
    return vectors


def neuron_index_sets(net: LayeredNTKNet) -> dict[tuple[int, int], list[int]]:
    """Flat parameter indices each hidden neuron (l, r) owns, from docs/math.md section 1's layout:
    row r of W_l, b_l[r], and in every later layer the column of h_l[r] inside
    c = concat(h_{l'-1}, ..., h_1, x) (FCN: c = h_{l'-1})."""
    offsets, offset = [], 0
    for layer in net.layers:
        offsets.append(offset)
        offset += layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    sizes = [net.in_features, *net.hidden_widths]
    owned = {}
    for l in range(1, net.depth + 1):
        for r in range(net.hidden_widths[l - 1]):
            layer = net.layers[l - 1]
            idx = [offsets[l - 1] + r * layer.in_features + s for s in range(layer.in_features)]
            if layer.bias is not None:
                idx.append(offsets[l - 1] + layer.weight.numel() + r)
            for later in range(l + 1, net.depth + 2):
                if net.connectivity == "chain" and later != l + 1:
                    continue
                column = r if net.connectivity == "chain" else sum(sizes[l + 1 : later]) + r
                width = net.layers[later - 1].in_features
                idx += [
                    offsets[later - 1] + row * width + column
                    for row in range(net.layers[later - 1].out_features)
                ]
            owned[(l, r)] = idx
    return owned


@pytest.mark.parametrize("kind", ["fcn", "dense", "masked"])
@pytest.mark.parametrize("method", ["structured", "generic"])
def test_eigenvector_shares_match_dense_eigenvector(kind, method):
    builders = {
        "fcn": lambda: LayeredNTKNet.fcn(3, [5, 4], 2, activation="tanh", bias=True, seed=0),
        "dense": lambda: LayeredNTKNet.densenet(3, [4, 3, 4], 1, activation="softplus", seed=1),
        "masked": lambda: LayeredNTKNet.masked_dag(3, [5, 5], 2, activation="gelu", seed=2, mask_seed=3),
    }
    net = builders[kind]().double()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    _, info = hessian_spectral_norm(
        net, x, method=method, return_info=True, eigenvector_shares=True, tol=1e-12, max_iter=300
    )
    vectors = dense_top_eigenvectors(net, x)
    squared = vectors.pow(2)
    offsets = torch.tensor([0] + [sum(p.numel() for p in layer.parameters()) for layer in net.layers]).cumsum(
        0
    )
    expected_layers = torch.stack(
        [squared[..., offsets[l] : offsets[l + 1]].sum(-1) for l in range(len(net.layers))], dim=-1
    )
    assert info.share_names == (*net.hidden_layer_names, "output")
    torch.testing.assert_close(info.layer_shares, expected_layers, rtol=0, atol=1e-8)
    owned = neuron_index_sets(net)
    per_neuron = torch.stack([squared[..., idx].sum(-1) for idx in owned.values()], dim=-1)
    torch.testing.assert_close(info.neuron_share, per_neuron.max(-1).values, rtol=0, atol=1e-8)
    keys = list(owned)
    for i in range(x.shape[0]):
        for a in range(info.neuron_share.shape[1]):
            assert tuple(info.top_neuron[i, a].tolist()) == keys[int(per_neuron[i, a].argmax())]


def test_eigenvector_shares_of_a_foreign_model():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    _, info = hessian_spectral_norm(
        model, x, return_info=True, eigenvector_shares=True, tol=1e-12, max_iter=300
    )
    squared = dense_top_eigenvectors(model, x).pow(2)
    first = sum(p.numel() for p in model[0].parameters())
    assert info.share_names == ("0", "2") and info.neuron_share is None
    torch.testing.assert_close(info.layer_shares[..., 0], squared[..., :first].sum(-1), rtol=0, atol=1e-8)
    with pytest.raises(ValueError, match="layer=None"):
        hessian_spectral_norm(model, x, layer="0", eigenvector_shares=True)
