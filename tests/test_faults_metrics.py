"""Faults a new user runs into with the LightningModules and the public metric functions: every argument of
the wrong type, out of range, NaN/inf, empty or huge gets a one-line error naming it (or works), and the
numbers that come back are checked against an independent computation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.metrics.kernel_change import relative_kernel_change
from lightning_linearity.metrics.linearization import distance_from_init, linearization_error
from lightning_linearity.metrics.pl import kernel_spectrum, pl_ratio, square_loss_targets
from lightning_linearity.models import NTKFCN, MaskedDAGNet, NTKDenseNet
from lightning_linearity.nets import LayeredNTKNet

NAN, INF = float("nan"), float("inf")
SMALL = {"width": 8, "depth": 1}


def _one_line(info: pytest.ExceptionInfo) -> None:
    assert len(str(info.value).splitlines()) == 1, str(info.value)


# ------------------------------------------------------------------------------------- LightningModules
MODULE_BAD = [
    ({"lr": "0.1"}, r"lr must be positive and finite \(a float\), got '0.1'"),
    ({"lr": None}, "lr must be positive and finite .* got None"),
    ({"lr": INF}, "lr must be positive and finite .* got inf"),
    ({"lr": NAN}, "lr must be positive and finite .* got nan"),
    ({"lr": True}, "lr must be positive and finite .* got True"),
    ({"lr": -1e-3}, "lr must be positive and finite .* got -0.001"),
    ({"lr": [0.1]}, r"lr must be positive and finite .* got \[0.1\]"),
    ({"momentum": NAN}, r"momentum must be a float in \[0, 1\), got nan"),
    ({"momentum": INF}, r"momentum must be a float in \[0, 1\), got inf"),
    ({"momentum": 1.5}, r"momentum must be a float in \[0, 1\), got 1.5"),
    ({"momentum": -0.1}, r"momentum must be a float in \[0, 1\), got -0.1"),
    ({"momentum": "0.9"}, r"momentum must be a float in \[0, 1\), got '0.9'"),
    ({"momentum": False}, r"momentum must be a float in \[0, 1\), got False"),
    ({"weight_decay": NAN}, "weight_decay must be a finite float >= 0, got nan"),
    ({"weight_decay": INF}, "weight_decay must be a finite float >= 0, got inf"),
    ({"weight_decay": -1}, "weight_decay must be a finite float >= 0, got -1"),
    ({"weight_decay": "0"}, "weight_decay must be a finite float >= 0, got '0'"),
    ({"optimizer": "adam", "momentum": 0.9}, "momentum=0.9 applies to optimizer='sgd' only"),
    ({"optimizer": "SGD"}, "optimizer must be 'sgd' or 'adam', got 'SGD'"),
    ({"optimizer": ["sgd"]}, r"optimizer must be 'sgd' or 'adam', got \['sgd'\]"),
    ({"loss": None}, "loss must be 'mse' or 'cross_entropy', got None"),
    ({"widths": 8.0}, "widths must be a non-empty list of positive integers, got 8.0"),
    ({"widths": np.int64(8)}, r"widths must be a non-empty list of positive integers, got np.int64\(8\)"),
    ({"widths": "8"}, "widths must be a non-empty list of positive integers, got '8'"),
    ({"widths": {8: 1}}, r"widths must be a non-empty list of positive integers, got \{8: 1\}"),
    ({"widths": []}, r"widths must be a non-empty list of positive integers, got \[\]"),
    ({"widths": [8, INF]}, "every hidden width must be a positive integer, got inf"),
    ({"widths": [10**13]}, r"hidden widths \[10000000000000\] does not fit in memory"),
    ({"width": 10**13, "depth": 1}, r"hidden widths \[10000000000000\] does not fit in memory"),
    ({"width": 8.0}, "width must be a positive integer, got 8.0"),
    ({"width": "8"}, "width must be a positive integer, got '8'"),
    ({"depth": NAN}, "depth must be a positive integer, got nan"),
    ({"depth": True}, "depth must be a positive integer, got True"),
    ({"activation": "Tanh"}, "unknown activation 'Tanh'; choose one of"),
    ({"activation": None}, "unknown activation None"),
    ({"bias": "False"}, "bias must be True or False, got 'False'"),
    ({"in_features": 0}, "in_features must be a positive integer, got 0"),
    ({"out_features": 2.0}, "out_features must be a positive integer, got 2.0"),
]


@pytest.mark.parametrize("cls", [NTKFCN, NTKDenseNet, MaskedDAGNet])
@pytest.mark.parametrize(("kwargs", "match"), MODULE_BAD, ids=[m[:40] for _, m in MODULE_BAD])
def test_bad_module_arguments_get_one_line_errors(cls, kwargs, match):
    kwargs = {"in_features": 4, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        cls(**kwargs)
    _one_line(info)


MASKED_BAD = [
    ({"drop_prob": NAN}, r"drop_prob must be in \[0, 1\), got nan"),
    ({"drop_prob": "0.5"}, r"drop_prob must be in \[0, 1\), got '0.5'"),
    ({"edges": [1, 2]}, r"each edge must be a pair \(u, v\); got 1"),
    ({"edges": "ab"}, r"edges must be a list of \(u, v\) pairs, got 'ab'"),
    ({"edges": 5}, r"edges must be a list of \(u, v\) pairs, got 5"),
    ({"edges": [[0, 2, 3], [1, 2]]}, r"each edge must be a pair \(u, v\); got \(0, 2, 3\)"),
    ({"edges": [[0, 2], [1, 2], [2, 3]], "in_features": "2"}, "in_features='2' but the edge list has 2"),
]


@pytest.mark.parametrize(("kwargs", "match"), MASKED_BAD, ids=[m[:40] for _, m in MASKED_BAD])
def test_bad_masked_dag_arguments_get_one_line_errors(kwargs, match):
    kwargs = {"in_features": 2, "out_features": 1, **SMALL, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        MaskedDAGNet(**kwargs)
    _one_line(info)


def test_from_edges_names_a_bad_edge():
    """Before: a non-pair entry was "TypeError: 'int' object is not iterable"."""
    with pytest.raises(ValueError, match=r"each edge must be a pair \(u, v\); got 7") as info:
        MaskedDAGNet.from_edges([[0, 2], 7])
    _one_line(info)
    built = MaskedDAGNet.from_edges([(0, 2), [1, 2], (2, 3)], init_seed=0)
    assert (built.net.in_features, built.net.out_features) == (2, 1)


def test_numpy_numbers_build_the_same_module():
    """Widths, depth, lr and momentum from numpy (a grid, a config array) are plain numbers; the optimiser
    gets Python floats."""
    a = NTKFCN(4, 1, width=np.int64(8), depth=np.int32(2), lr=np.float32(0.5), momentum=np.float64(0.25))
    b = NTKFCN(4, 1, widths=np.array([8, 8]), lr=0.5, momentum=0.25)
    assert a.net.hidden_widths == b.net.hidden_widths == [8, 8]
    group = a.configure_optimizers().param_groups[0]
    assert type(group["lr"]) is float and group["lr"] == 0.5 and group["momentum"] == 0.25


@settings(max_examples=30, deadline=None)
@given(
    lr=st.floats(min_value=1e-300, max_value=1e300),
    momentum=st.floats(min_value=0, max_value=1, exclude_max=True),
    weight_decay=st.floats(min_value=0, max_value=1e300),
)
def test_any_finite_optimiser_setting_in_range_reaches_the_optimiser(lr, momentum, weight_decay):
    model = NTKFCN(2, 1, width=2, depth=1, lr=lr, momentum=momentum, weight_decay=weight_decay)
    group = model.configure_optimizers().param_groups[0]
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (lr, momentum, weight_decay)


# ------------------------------------------------------------------------------------------ metrics
@pytest.fixture(scope="module")
def net() -> LayeredNTKNet:
    return LayeredNTKNet(3, [4], 2, seed=0)


def _w0(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


EYE = torch.eye(3, dtype=torch.float64)

METRIC_BAD = [
    # relative_kernel_change
    (lambda n: relative_kernel_change(EYE, EYE, ord=["fro"]), ValueError, "ord must be 'spectral' or 'fro'"),
    (lambda n: relative_kernel_change(EYE, EYE, ord=2), ValueError, "ord must be 'spectral' or 'fro', got 2"),
    (
        lambda n: relative_kernel_change(EYE.long(), EYE.long()),
        ValueError,
        "kernel_t must be a real floating-point matrix, got dtype torch.int64",
    ),
    (
        lambda n: relative_kernel_change(EYE, EYE.to(torch.cdouble)),
        ValueError,
        "kernel_0 must be a real floating-point matrix, got dtype torch.complex128",
    ),
    (lambda n: relative_kernel_change(EYE.bool(), EYE.bool()), ValueError, "dtype torch.bool"),
    (
        lambda n: relative_kernel_change(torch.zeros(0, 0), torch.zeros(0, 0)),
        ValueError,
        r"kernel_t is empty",
    ),
    (lambda n: relative_kernel_change(EYE.numpy(), EYE), ValueError, "kernel_t must be a 2-D kernel matrix"),
    (lambda n: relative_kernel_change(EYE * NAN, EYE), FloatingPointError, "kernel_t has 9 non-finite"),
    (lambda n: relative_kernel_change(EYE, EYE * INF), FloatingPointError, "kernel_0 has 9 non-finite"),
    # kernel_spectrum
    (lambda n: kernel_spectrum(EYE.long()), ValueError, "kernel must be a real floating-point matrix"),
    (lambda n: kernel_spectrum(EYE.to(torch.cdouble)), ValueError, "got dtype torch.complex128"),
    (lambda n: kernel_spectrum(EYE.bool()), ValueError, "got dtype torch.bool"),
    (
        lambda n: kernel_spectrum(EYE.tolist()),
        ValueError,
        "the kernel must be a square matrix, got shape list",
    ),
    (lambda n: kernel_spectrum(torch.zeros(0, 0)), ValueError, "the kernel is empty"),
    # square_loss_targets
    (lambda n: square_loss_targets([0, 1], torch.zeros(2, 2)), ValueError, "y must be a tensor, got list"),
    (
        lambda n: square_loss_targets(torch.tensor([0, 1]), None),
        ValueError,
        "out must be a tensor, got NoneType",
    ),
    (
        lambda n: square_loss_targets(torch.tensor([0, 1]), torch.zeros(2)),
        ValueError,
        r"out must be the model output of shape \(n, k\), got shape \(2,\)",
    ),
    (
        lambda n: square_loss_targets(torch.tensor([True, False]), torch.zeros(2, 2)),
        ValueError,
        "y has dtype torch.bool; use integer class labels or real",
    ),
    (
        lambda n: square_loss_targets(torch.tensor([1j, 1.0]), torch.zeros(2, 1)),
        ValueError,
        "y has dtype torch.complex64",
    ),
    (
        lambda n: square_loss_targets(torch.tensor([[NAN], [1.0]]), torch.zeros(2, 1)),
        ValueError,
        "y has 1 NaN or inf targets; drop those points or impute their targets",
    ),
    # pl_ratio
    (
        lambda n: pl_ratio(n, torch.zeros(0, 3), torch.zeros(0, 2)),
        ValueError,
        r"x must be a tensor .* got \(0, 3\)",
    ),
    (lambda n: pl_ratio(n, torch.ones(2, 3), torch.full((2, 2), NAN)), FloatingPointError, "the targets y"),
    # linearization_error / distance_from_init
    (
        lambda n: linearization_error(n, {k: v.numpy() for k, v in _w0(n).items()}, torch.ones(2, 3)),
        TypeError,
        r"params_0\['layers.0.weight'\] must be a tensor, got ndarray",
    ),
    (
        lambda n: distance_from_init(n, {k: "w" for k in _w0(n)}),
        TypeError,
        r"params_0\['layers.0.weight'\] must be a tensor, got str",
    ),
    (
        lambda n: distance_from_init(n, {k: v.to(torch.cdouble) for k, v in _w0(n).items()}),
        ValueError,
        r"params_0\['layers.0.weight'\] must hold real numbers, got dtype torch.complex128",
    ),
    (
        lambda n: distance_from_init(n, {k: v * NAN for k, v in _w0(n).items()}),
        FloatingPointError,
        "the entry 'layers.0.weight' at params_0 has 12 non-finite",
    ),
    (
        lambda n: distance_from_init(n, {k: v + INF for k, v in _w0(n).items()}),
        FloatingPointError,
        "at params_0 has .* non-finite",
    ),
    (
        lambda n: linearization_error(n, _w0(n), torch.zeros(0, 3)),
        ValueError,
        r"x must be a tensor of shape \(n, ...\) with n >= 1 probes, got \(0, 3\)",
    ),
    (
        lambda n: linearization_error(n, _w0(n), [[0.0, 0.0, 0.0]]),
        ValueError,
        r"x must be a tensor of shape \(n, ...\) with n >= 1 probes, got list",
    ),
    # neuron_gradient_cosines
    (
        lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, num_neurons=2, generator=5),
        ValueError,
        "generator must be a torch.Generator or None, got int",
    ),
    (
        lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, generator=np.random.default_rng(0)),
        ValueError,
        "generator must be a torch.Generator or None, got Generator",
    ),
    (
        lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, num_neurons=1.5),
        ValueError,
        "num_neurons must",
    ),
    (
        lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, num_neurons=True),
        ValueError,
        "num_neurons must",
    ),
    (
        lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, chunk_size=NAN),
        ValueError,
        "chunk_size must",
    ),
    (lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), None), ValueError, "unknown hidden layer None"),
    (lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, reduction=None), ValueError, "reduction must"),
    (lambda n: neuron_gradient_cosines(n, torch.ones(2, 3), 1, method=None), ValueError, "method must"),
    (
        lambda n: neuron_gradient_cosines(n, torch.zeros(0, 3), 1),
        ValueError,
        r"x must be a tensor .*\(0, 3\)",
    ),
    (lambda n: neuron_gradient_cosines(n, torch.full((2, 3), INF), 1), FloatingPointError, "model output"),
]


@pytest.mark.parametrize(("call", "error", "match"), METRIC_BAD, ids=[m[:40] for *_, m in METRIC_BAD])
def test_bad_metric_arguments_get_one_line_errors(net, call, error, match):
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with pytest.raises(error, match=match) as info:
        call(net)
    _one_line(info)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters())  # nothing changed


def test_kernel_change_of_integer_kernels_was_truncated():
    """Before: integer kernels were accepted and the change was cast back to int64 (0.5 -> 0); now they are
    refused, and their float copy gives the exact value: ||2I - I|| / ||I|| ... in the spectral norm."""
    k0, kt = torch.eye(2, dtype=torch.long), torch.tensor([[2, 0], [0, 1]])
    with pytest.raises(ValueError, match="floating-point"):
        relative_kernel_change(kt, k0)
    assert relative_kernel_change(kt.double(), k0.double()).item() == 1.0
    half = torch.tensor([[1.5, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert relative_kernel_change(half, k0.double()).item() == 0.5


def test_kernel_spectrum_of_a_complex_kernel_was_its_real_part():
    """Before: a Hermitian complex kernel was cast to float64 (imaginary part dropped, eigenvalues wrong)."""
    hermitian = torch.tensor([[1.0, 1j], [-1j, 1.0]], dtype=torch.cdouble)  # eigenvalues 0 and 2
    assert torch.allclose(torch.linalg.eigvalsh(hermitian), torch.tensor([0.0, 2.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="complex128"):
        kernel_spectrum(hermitian)


def test_distance_from_a_non_finite_init_was_nan():
    net = LayeredNTKNet(3, [4], 1, seed=1)
    w0 = _w0(net)
    w0["layers.1.weight"][0, 0] = NAN
    with pytest.raises(FloatingPointError, match=r"'layers.1.weight' at params_0 has 1 non-finite"):
        distance_from_init(net, w0)


@settings(max_examples=25, deadline=None)
@given(
    st.lists(st.floats(-1e3, 1e3), min_size=9, max_size=9),
    st.lists(st.floats(-1e3, 1e3), min_size=9, max_size=9),
)
def test_kernel_change_matches_the_singular_values(a, b):
    """Any finite symmetric pair: the value is the largest singular value of K_t - K_0 over that of K_0
    (numpy's SVD, float64), or a one-line error when K_0 = 0."""
    k0 = torch.tensor(a, dtype=torch.float64).reshape(3, 3)
    kt = torch.tensor(b, dtype=torch.float64).reshape(3, 3)
    k0, kt = k0 + k0.T, kt + kt.T
    reference = np.linalg.norm(k0.numpy(), 2)
    if reference == 0:
        with pytest.raises(ValueError, match="kernel_0 is the zero matrix") as info:
            relative_kernel_change(kt, k0)
        _one_line(info)
        return
    expected = np.linalg.norm((kt - k0).numpy(), 2) / reference
    assert math.isclose(relative_kernel_change(kt, k0).item(), expected, rel_tol=1e-9, abs_tol=1e-12)


def test_huge_and_tiny_kernels_keep_their_ratio():
    """float32 kernels near the ends of the range: computed in float64, so no overflow or underflow."""
    for scale in (1e38, 1e-40):
        k0 = (torch.eye(3) * scale).float()
        kt = (torch.eye(3) * 3 * scale).float() if scale > 1 else (torch.eye(3) * 2 * scale).float()
        expected = float(kt[0, 0].double() / k0[0, 0].double()) - 1
        assert math.isclose(relative_kernel_change(kt, k0).item(), expected, rel_tol=1e-6)
    spectrum = kernel_spectrum(torch.full((2, 2), 3e38))  # eigenvalues 0 and 6e38, beyond float32
    assert spectrum.lambda_max == pytest.approx(2 * float(torch.tensor(3e38)), rel=1e-12)


@pytest.mark.parametrize("ours", [False, True])
def test_a_non_finite_output_says_where_it_comes_from(ours):
    """NaN in the probe inputs, a diverged parameter, or an overflowing forward pass: three different fixes,
    three different one-line messages (the first two used to blame the parameters alike)."""
    from lightning_linearity.metrics.ntk import empirical_ntk

    torch.manual_seed(0)
    if ours:
        model = NTKFCN(in_features=3, width=4, depth=1, out_features=2, activation="relu", bias=True)
        first, bias = model.layered_net.layers[0].weight, model.layered_net.layers[1].bias
    else:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        first, bias = model[0].weight, model[2].bias
    x = torch.randn(4, 3)
    causes = {
        "the probe inputs hold 1 NaN or inf": lambda: x.__setitem__((0, 1), math.nan),
        r"'\S*bias' is non-finite .* diverged": lambda: bias.data.fill_(math.inf),
        # finite inputs (1e30) and weights (1e10), a pre-activation of 3e40 > float32's 3.4e38
        "forward pass overflows on these inputs": lambda: (x.fill_(1e30), first.data.fill_(1e10)),
    }
    for message, damage in causes.items():
        saved = {k: v.clone() for k, v in model.state_dict().items()}
        x.copy_(torch.randn(4, 3))
        damage()
        with pytest.raises(
            FloatingPointError, match=f"^the model output on the probe inputs has .*{message}"
        ) as info:
            empirical_ntk(model, x)
        _one_line(info)
        model.load_state_dict(saved)


@pytest.mark.parametrize("ours", [False, True])
def test_integer_probe_inputs_on_a_float_model_say_to_cast_them(ours):
    from lightning_linearity.metrics.ntk import empirical_ntk

    if ours:
        model = NTKFCN(in_features=3, width=4, depth=1, out_features=2)
    else:
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    with pytest.raises(
        ValueError, match=r"the probe inputs are torch.int64: cast them to the model's dtype"
    ) as info:
        empirical_ntk(model, torch.randint(0, 5, (4, 3)))
    _one_line(info)
