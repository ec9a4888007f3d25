"""Empirical NTK (docs/math.md 2.1): structured and generic paths against an explicit float64 Jacobian."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_linearity.metrics.ntk import NTKFactors, empirical_ntk, structured_factors, structured_kernel
from lightning_linearity.models import NTKFCN
from lightning_linearity.nets import LayeredNTKNet

EDGES = [
    ("x0", "a"), ("x1", "a"), ("x0", "b"), ("a", "c"), ("b", "c"), ("x1", "c"),
    ("a", "d"), ("c", "y0"), ("a", "y0"), ("b", "y1"), ("c", "y1"), ("d", "y1"), ("x2", "d"),
]  # fmt: skip


def make_net(family, *, widths=(6, 5), out=1, bias=False, activation="tanh"):
    kwargs = dict(bias=bias, activation=activation, seed=7)
    if family == "fcn":
        return LayeredNTKNet.fcn(4, list(widths), out, **kwargs)
    if family == "densenet":
        return LayeredNTKNet.densenet(4, list(widths), out, **kwargs)
    if family == "masked":
        return LayeredNTKNet.masked_dag(4, list(widths), out, drop_prob=0.5, mask_seed=3, **kwargs)
    return LayeredNTKNet.from_edges(EDGES, **kwargs)


def jacobian_kernel(model, x):
    """J J^T, J = torch.autograd.functional.jacobian of the flat output w.r.t. a flat parameter vector."""
    named = [(name, p.detach()) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.reshape(-1) for _, p in named])
    buffers = dict(model.named_buffers())

    def f(vector):
        params, start = {}, 0
        for name, p in named:
            params[name] = vector[start : start + p.numel()].view_as(p)
            start += p.numel()
        return functional_call(model, (params, buffers), (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, flat)
    return jac @ jac.T


def assert_relative(actual, expected, rtol):
    scale = expected.abs().max()
    assert actual.shape == expected.shape
    assert ((actual - expected).abs().max() / scale).item() <= rtol


PATHS = [("structured", "jacobian"), ("generic", "jacobian"), ("generic", "ntk_vp")]
FAMILIES = ["fcn", "densenet", "masked", "edges"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_from_factors_gathered_in_parts_equals_the_explicit_jacobian(family):
    # what DDP ranks do: factors of their own probe points, flattened, gathered, assembled into K
    net = make_net(family, out=3, bias=True).double()
    x = torch.randn(5, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = torch.cat([structured_factors(net, part).flatten() for part in (x[:2], x[2:4], x[4:])])
    factors = NTKFactors.unflatten(rows, net)
    assert [c.shape for c in factors.inputs] == [c.shape for c in structured_factors(net, x).inputs]
    assert_relative(structured_kernel(net, factors), jacobian_kernel(net, x), 1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_all_paths_equal_explicit_jacobian_float64(family, out, bias):
    net = make_net(family, out=out, bias=bias).double()
    x = torch.randn(5, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = jacobian_kernel(net, x)
    for method, impl in PATHS:
        kernel = empirical_ntk(net, x, method=method, generic_impl=impl, chunk_size=2)
        assert_relative(kernel, expected, 1e-10)


@pytest.mark.parametrize(
    ("family", "widths", "activation"),
    [("fcn", (3,), "erf"), ("fcn", (9, 2, 7, 4), "gelu"), ("densenet", (2, 8, 3), "softplus"),
     ("masked", (12, 10, 11), "sigmoid")],
)  # fmt: skip
def test_structured_other_depths_widths_activations(family, widths, activation):
    net = make_net(family, widths=widths, out=2, bias=True, activation=activation).double()
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert_relative(empirical_ntk(net, x, method="structured"), jacobian_kernel(net, x), 1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_float32_matches_float64_reference(family):
    net = make_net(family, out=3, bias=True)
    x = torch.randn(6, net.in_features, generator=torch.Generator().manual_seed(2))
    expected = jacobian_kernel(net.double(), x.double())
    net.float()
    for method, impl in PATHS:
        kernel = empirical_ntk(net, x, method=method, generic_impl=impl)
        assert kernel.dtype == torch.float32
        assert_relative(kernel.double(), expected, 1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_kernel_is_symmetric_psd(family):
    net = make_net(family, widths=(8, 6), out=3).double()
    x = torch.randn(7, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    kernel = empirical_ntk(net, x)
    assert torch.equal(kernel, kernel.T)
    assert torch.linalg.eigvalsh(kernel).min() >= -1e-12 * kernel.abs().max()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(("method", "impl"), PATHS)
def test_cross_kernel_is_block_of_full_kernel(family, method, impl):
    net = make_net(family, out=2, bias=True).double()
    x = torch.randn(7, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    full = jacobian_kernel(net, x)
    rows = empirical_ntk(net, x[2:5], x, method=method, generic_impl=impl, chunk_size=2)
    assert rows.shape == (6, 14)
    assert_relative(rows, full[4:10], 1e-10)
    other = empirical_ntk(net, x[:3], x[3:], method=method, generic_impl=impl)
    assert_relative(other, full[:6, 6:], 1e-10)


@pytest.mark.parametrize("family", ["masked", "edges"])
def test_many_probes_few_outputs_masked_grouping(family):
    """n >= 8 * k takes the per-neuron grouping for the output layer; chunks of probe pairs elsewhere."""
    net = make_net(family, out=2, bias=True).double()
    x = torch.randn(17, net.in_features, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    full = jacobian_kernel(net, x)
    assert_relative(empirical_ntk(net, x, method="structured"), full, 1e-10)
    assert_relative(empirical_ntk(net, x[:3], x, method="structured"), full[:6], 1e-10)


def test_frozen_parameters_are_not_part_of_w():
    net = make_net("masked", out=2, bias=True).double()
    net.layers[0].weight.requires_grad_(False)
    net.layers[2].bias.requires_grad_(False)
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    expected = jacobian_kernel(net, x)
    for method, impl in PATHS:
        assert_relative(empirical_ntk(net, x, method=method, generic_impl=impl), expected, 1e-10)


def test_foreign_sequential_through_generic_and_auto():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    expected = jacobian_kernel(model, x)
    for impl in ("jacobian", "ntk_vp"):
        assert_relative(empirical_ntk(model, x, generic_impl=impl), expected, 1e-10)
        assert_relative(empirical_ntk(model, x, method="generic", generic_impl=impl), expected, 1e-10)


def test_lightning_module_uses_its_network():
    module = NTKFCN(4, out_features=2, width=6, depth=2, init_seed=1).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    assert_relative(empirical_ntk(module, x, method="structured"), jacobian_kernel(module, x), 1e-10)


def test_one_dimensional_output_counts_as_one_output():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_relative(empirical_ntk(model, x), jacobian_kernel(model, x), 1e-10)


# ------------------------------------------------------------------------------------------ bad input
def test_structured_rejects_foreign_model():
    with pytest.raises(ValueError, match="not one of the package's networks"):
        empirical_ntk(nn.Sequential(nn.Linear(3, 1)), torch.randn(2, 3), method="structured")


def test_structured_rejects_batchnorm():
    net = make_net("fcn")
    net.layers.insert(1, nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="BatchNorm"):
        empirical_ntk(net, torch.randn(3, 4), method="structured")


def test_no_trainable_parameters():
    net = make_net("fcn").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        empirical_ntk(net, torch.randn(3, 4))


@pytest.mark.parametrize("method", ["structured", "generic"])
def test_wrong_trailing_shape(method):
    with pytest.raises(ValueError, match="could not be evaluated"):
        empirical_ntk(make_net("densenet"), torch.randn(3, 5), method=method)


def test_x2_shaped_unlike_x():
    with pytest.raises(ValueError, match="same trailing shape"):
        empirical_ntk(make_net("fcn"), torch.randn(3, 4), torch.randn(2, 5))


@pytest.mark.parametrize("method", ["structured", "generic"])
def test_non_finite_output(method):
    net = make_net("fcn")
    with torch.no_grad():
        net.layers[1].weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        empirical_ntk(net, torch.randn(3, 4), method=method)


def test_output_not_differentiable():
    model = nn.Sequential(nn.Linear(3, 2), nn.Flatten())
    model.forward = lambda x: model[0](x).detach()
    with pytest.raises(ValueError, match="differentiabl"):
        empirical_ntk(model, torch.randn(2, 3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [(dict(method="exact"), "method"), (dict(generic_impl="vp"), "generic_impl"),
     (dict(chunk_size=0), "chunk_size")],
)  # fmt: skip
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        empirical_ntk(make_net("fcn"), torch.randn(3, 4), **kwargs)


def test_empty_probe_set():
    with pytest.raises(ValueError, match="n >= 1"):
        empirical_ntk(make_net("fcn"), torch.randn(0, 4))


@pytest.mark.parametrize(("method", "impl"), PATHS)
@pytest.mark.parametrize("training", [True, False])
def test_leaves_model_and_global_state_unchanged(method, impl, training):
    net = make_net("masked", out=2, bias=True).train(training)
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    x, x2 = torch.randn(4, 4), torch.randn(3, 4)
    rng = torch.get_rng_state()
    empirical_ntk(net, x, x2, method=method, generic_impl=impl)
    empirical_ntk(net, x, method=method, generic_impl=impl)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training == training for m in net.modules())
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(p.grad, torch.ones_like(p)) and p.requires_grad


def test_a_module_used_twice_stays_intact_and_its_kernel_is_exact():
    """functional_call's weight tying used to leave the reused module with a plain tensor for a weight."""
    shared = nn.Linear(2, 2).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    kernel = empirical_ntk(model, x, method="generic")
    assert isinstance(shared.weight, nn.Parameter) and isinstance(shared.bias, nn.Parameter)

    def flat(weight, bias):
        return torch.func.functional_call(model, {"0.weight": weight, "0.bias": bias}, (x,)).reshape(-1)

    blocks = torch.autograd.functional.jacobian(flat, (shared.weight, shared.bias))
    jac = torch.cat([block.reshape(6, -1) for block in blocks], 1)
    torch.testing.assert_close(kernel, jac @ jac.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(empirical_ntk(model, x, method="engine"), kernel, rtol=1e-10, atol=1e-12)
