"""PL* through the NTK spectrum (docs/math.md 2.2): ||grad L||^2 = r^T K r >= 2 lambda_min(K) L."""

import math

import pytest
import torch
from torch import nn

from lightning_linearity.metrics.ntk import empirical_ntk
from lightning_linearity.metrics.pl import KernelSpectrum, kernel_spectrum, pl_ratio, square_loss_targets
from lightning_linearity.nets import LayeredNTKNet


def make_net(family, in_features, widths, out, seed):
    kwargs = dict(bias=seed % 2 == 1, seed=seed)
    if family == "fcn":
        return LayeredNTKNet.fcn(in_features, widths, out, **kwargs)
    if family == "densenet":
        return LayeredNTKNet.densenet(in_features, widths, out, **kwargs)
    if family == "masked":
        return LayeredNTKNet.masked_dag(in_features, widths, out, mask_seed=seed, **kwargs)
    edges = [(f"x{i}", f"h{j}") for i in range(in_features) for j in range(widths[0]) if (i + j) % 2 == 0]
    edges += [(f"h{j}", f"y{a}") for j in range(widths[0]) for a in range(out)]
    return LayeredNTKNet.from_edges(edges, **kwargs)


def square_loss_gradient(model, x, y):
    """L = 1/2 ||f(x) - y||^2 and ||grad_w L||^2 by plain autograd on the model's own parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = 0.5 * (model(x) - y).pow(2).sum()
    grads = torch.autograd.grad(loss, params)
    return loss.detach(), sum(g.pow(2).sum() for g in grads), (model(x) - y).detach().reshape(-1)


@pytest.mark.parametrize("family", ["fcn", "densenet", "masked", "edges"])
def test_gradient_norm_is_bounded_below_by_lambda_min(family):
    """Seeded property loop over random small sizes: the PL* inequality and the identity behind it."""
    sizes = torch.Generator().manual_seed(0)
    for seed in range(6):
        d, n, k = (int(v) for v in torch.randint(1, 5, (3,), generator=sizes))
        widths = [int(v) for v in torch.randint(1, 9, (int(torch.randint(1, 4, (1,), generator=sizes)),),
                                                generator=sizes)]  # fmt: skip
        net = make_net(family, d + 1, widths, k, seed).double()
        x = torch.randn(n, net.in_features, dtype=torch.float64, generator=sizes)
        y = torch.randn(n, net.out_features, dtype=torch.float64, generator=sizes)
        loss, grad_norm_sq, residual = square_loss_gradient(net, x, y)
        kernel = empirical_ntk(net, x)
        lambda_min = kernel_spectrum(kernel).lambda_min
        assert grad_norm_sq >= 2 * lambda_min * loss - 1e-10 * grad_norm_sq
        torch.testing.assert_close(grad_norm_sq, residual @ kernel @ residual, rtol=1e-10, atol=0)
        ratio = pl_ratio(net, x, y)
        torch.testing.assert_close(ratio, grad_norm_sq / (2 * loss), rtol=1e-12, atol=0)
        assert ratio >= lambda_min - 1e-10 * abs(ratio)


def test_lambda_min_vanishes_when_outputs_outnumber_parameters():
    net = LayeredNTKNet.fcn(2, [2], 1, seed=0).double()  # 6 parameters
    x = torch.randn(10, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    spectrum = kernel_spectrum(empirical_ntk(net, x))
    assert abs(spectrum.lambda_min) <= 1e-12 * spectrum.lambda_max
    assert pl_ratio(net, x, torch.randn(10, 1, dtype=torch.float64)) >= spectrum.lambda_min


def test_spectrum_of_closed_form_kernels():
    generator = torch.Generator().manual_seed(2)
    rotation, _ = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=generator))
    kernel = rotation @ torch.diag(torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)) @ rotation.T
    kernel = 0.5 * (kernel + kernel.T)
    spectrum = kernel_spectrum(kernel.float())
    assert isinstance(spectrum, KernelSpectrum)
    assert spectrum.lambda_min == pytest.approx(1.0, rel=1e-6)
    assert spectrum.lambda_max == pytest.approx(5.0, rel=1e-6)
    assert spectrum.condition_number == pytest.approx(5.0, rel=1e-6)
    assert spectrum.trace == pytest.approx(8.0, rel=1e-6)
    assert kernel_spectrum(torch.diag(torch.tensor([0.0, 3.0]))).condition_number == math.inf
    assert kernel_spectrum(torch.diag(torch.tensor([-1.0, 3.0]))).condition_number == math.inf
    with pytest.raises(AttributeError):
        spectrum.lambda_min = 0.0  # frozen


def test_targets_of_shape_n_for_a_single_output():
    net = LayeredNTKNet.fcn(3, [5], 1, seed=3).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    y = torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(pl_ratio(net, x, y), pl_ratio(net, x, y[:, None]))


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kernel", "match"),
    [(torch.ones(2, 3), "square"), (torch.ones(3), "square"), (torch.zeros(0, 0), "empty"),
     (torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "symmetric")],
)  # fmt: skip
def test_spectrum_rejects_bad_kernels(kernel, match):
    with pytest.raises(ValueError, match=match):
        kernel_spectrum(kernel)


def test_spectrum_rejects_non_finite_kernel():
    with pytest.raises(FloatingPointError, match="non-finite"):
        kernel_spectrum(torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]]))


def test_pl_ratio_wrong_target_shape():
    net = LayeredNTKNet.fcn(3, [5], 2, seed=0)
    with pytest.raises(ValueError, match="shaped like the model output"):
        pl_ratio(net, torch.randn(4, 3), torch.randn(4))


def test_pl_ratio_interpolating_model():
    net = LayeredNTKNet.fcn(3, [5], 2, seed=0)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="L\\(w\\) = 0"):
        pl_ratio(net, x, net(x).detach())


def test_pl_ratio_no_trainable_parameters():
    net = LayeredNTKNet.fcn(3, [5], 1, seed=0).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        pl_ratio(net, torch.randn(4, 3), torch.randn(4, 1))


def test_pl_ratio_wrong_input_shape():
    with pytest.raises(ValueError, match="could not be evaluated"):
        pl_ratio(LayeredNTKNet.fcn(3, [5], 1, seed=0), torch.randn(4, 2), torch.randn(4, 1))


def test_pl_ratio_non_finite_output():
    net = LayeredNTKNet.fcn(3, [5], 1, seed=0)
    with torch.no_grad():
        net.layers[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        pl_ratio(net, torch.randn(4, 3), torch.randn(4, 1))


def test_pl_ratio_leaves_model_and_global_state_unchanged():
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).eval()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    rng = torch.get_rng_state()
    with torch.no_grad():  # works inside a no_grad context too
        pl_ratio(model, x, y)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not any(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and torch.equal(p.grad, torch.ones_like(p)) and p.requires_grad


def test_square_loss_targets_encode_labels_as_the_square_loss_reads_them():
    out = torch.zeros(3, 4)
    labels = torch.tensor([2, 0, 3])
    expected = torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]])
    assert torch.equal(square_loss_targets(labels, out), expected)
    binary = square_loss_targets(torch.tensor([0, 1, 1]), torch.zeros(3, 1))
    assert torch.equal(binary, torch.tensor([[-1.0], [1], [1]]))
    floats = torch.arange(12.0)
    assert torch.equal(square_loss_targets(floats, out), floats.reshape(3, 4))
    for y, match in (
        (torch.tensor([0, 4, 1]), "labels 0..4 do not fit a model with 4 outputs"),
        (torch.arange(6.0), r"targets of shape \(6,\) do not match outputs of shape \(3, 4\)"),
        (torch.tensor([0, 1]), r"class labels of shape \(2,\) for outputs of shape \(3, 4\)"),
    ):
        with pytest.raises(ValueError, match=match):
            square_loss_targets(y, out)
    with pytest.raises(ValueError, match="two classes labelled 0 and 1"):
        square_loss_targets(torch.tensor([0, 2, 1]), torch.zeros(3, 1))
