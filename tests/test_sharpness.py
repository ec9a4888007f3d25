"""loss_sharpness (docs/math.md 2.9) against the dense loss Hessian (autograd.functional.hessian, float64)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_linearity import NTKFCN
from lightning_linearity.metrics import ConvergenceWarning, Sharpness, empirical_ntk, loss_sharpness
from lightning_linearity.nets import LayeredNTKNet

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = 1e-10


def flat_function(module: nn.Module):
    """(w_flat, x) -> module output, by an explicit flat-parameter evaluation (the reference)."""
    named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for _, p in named])

    def output(w, x):
        state, offset = {}, 0
        for name, p in named:
            state[name] = w[offset : offset + p.numel()].view_as(p)
            offset += p.numel()
        return torch.func.functional_call(module, state, (x,)).reshape(x.shape[0], -1)

    return flat, output


def reference_loss(loss, reduction, y):
    def ell(out):
        if loss == "mse":
            value = 0.5 * (out - y).pow(2).sum()
        elif out.shape[1] == 1:
            value = F.binary_cross_entropy_with_logits(out[:, 0], y.to(out.dtype), reduction="sum")
        else:
            value = F.cross_entropy(out, y, reduction="sum")
        return value / out.shape[0] if reduction == "mean" else value

    return ell


def dense_spectra(module, x, y, loss, reduction):
    """Eigenvalues (ascending) of the dense loss Hessian and of the dense Gauss-Newton matrix J^T H_ell J."""
    flat, output = flat_function(module)
    ell = reference_loss(loss, reduction, y)
    hessian = torch.autograd.functional.hessian(lambda w: ell(output(w, x)), flat)
    out = output(flat, x).detach()
    jacobian = torch.autograd.functional.jacobian(lambda w: output(w, x), flat).reshape(out.numel(), -1)
    output_hessian = torch.autograd.functional.hessian(lambda o: ell(o.view_as(out)), out.reshape(-1))
    gauss_newton = jacobian.T @ output_hessian @ jacobian
    return torch.linalg.eigvalsh(hessian), torch.linalg.eigvalsh(gauss_newton)


def _data(n, d, k, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), scale * torch.randn(
        n, k, generator=g, dtype=torch.float64
    )


CASES = [
    ("fcn-tanh", lambda: LayeredNTKNet.fcn(3, [6, 5], 2, activation="tanh", seed=0), "mse", "sum"),
    ("dense-softplus-bias",
     lambda: LayeredNTKNet.densenet(3, [5, 4], 1, activation="softplus", bias=True, seed=1), "mse", "mean"),
    ("masked-gelu", lambda: LayeredNTKNet.masked_dag(3, [6, 6], 2, activation="gelu", seed=2, mask_seed=3),
     "mse", "sum"),
    ("sequential-mse", lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)), "mse", "sum"),
    ("sequential-ce", lambda: nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)),
     "cross_entropy", "mean"),
    ("sequential-bce", lambda: nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 1)),
     "cross_entropy", "sum"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "build", "loss", "reduction"), CASES, ids=[c[0] for c in CASES])
def test_top_eigenvalues_match_dense_hessian(name, build, loss, reduction):
    torch.manual_seed(0)
    module = build().double()
    x, y = _data(5, 3, 2 if name != "dense-softplus-bias" else 1, seed=4)
    if loss == "cross_entropy":
        out_features = 1 if name.endswith("bce") else 3
        y = torch.randint(0, max(out_features, 2), (5,), generator=torch.Generator().manual_seed(5))
    result = loss_sharpness(module, x, y, loss=loss, k=3, reduction=reduction, tol=TOL, max_iter=200)
    eigenvalues, gauss_newton = dense_spectra(module, x, y, loss, reduction)
    assert isinstance(result, Sharpness) and result.converged.all() and result.gauss_newton_converged
    scale = eigenvalues.abs().max()
    torch.testing.assert_close(result.eigenvalues, eigenvalues.flip(0)[:3], rtol=0, atol=1e-8 * scale)
    torch.testing.assert_close(result.gauss_newton_max, gauss_newton.max(), rtol=1e-8, atol=0)
    if loss == "mse":
        assert eigenvalues.min() < -1e-3 * scale  # far from a minimum: indefinite, as intended


def test_whole_spectrum_of_an_indefinite_hessian():
    """k = P: every eigenvalue, the negative ones included, far from a minimum (large residuals)."""
    module = LayeredNTKNet.fcn(2, [3], 1, activation="tanh", seed=0).double()
    x, y = _data(3, 2, 1, seed=1, scale=10.0)
    size = sum(p.numel() for p in module.parameters())
    result = loss_sharpness(module, x, y, k=size, tol=TOL, max_iter=200)
    eigenvalues, _ = dense_spectra(module, x, y, "mse", "sum")
    assert eigenvalues.min() < 0
    torch.testing.assert_close(
        result.eigenvalues, eigenvalues.flip(0), rtol=0, atol=1e-8 * eigenvalues.abs().max()
    )


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_gauss_newton_is_lambda_max_of_the_ntk(reduction):
    module = NTKFCN(4, 3, width=16, depth=2, activation="erf", init_seed=0).double()
    x, y = _data(6, 4, 3, seed=2)
    result = loss_sharpness(module, x, y, reduction=reduction, tol=TOL, max_iter=200)
    lambda_max = torch.linalg.eigvalsh(empirical_ntk(module, x, method="generic")).max()
    expected = lambda_max if reduction == "sum" else lambda_max / x.shape[0]
    torch.testing.assert_close(result.gauss_newton_max, expected, rtol=1e-8, atol=0)


def test_integer_labels_for_mse_use_the_models_encoding():
    module = NTKFCN(4, 3, width=8, depth=1, init_seed=0).double()
    x, _ = _data(5, 4, 3, seed=3)
    labels = torch.tensor([0, 2, 1, 1, 0])
    with_labels = loss_sharpness(module, x, labels, tol=TOL)
    one_hot = loss_sharpness(module, x, F.one_hot(labels, 3).double(), tol=TOL)
    torch.testing.assert_close(with_labels.eigenvalues, one_hot.eigenvalues)


def test_state_untouched():
    module = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double().train()
    x, y = _data(5, 3, 2, seed=6)
    module(x).sum().backward()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    grads = [p.grad.clone() for p in module.parameters()]
    rng = torch.get_rng_state()
    loss_sharpness(module, x, y, k=2)
    assert module.training and all(m.training for m in module.modules())
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, module.parameters(), strict=True))
    assert torch.equal(rng, torch.get_rng_state())


def test_non_converged_is_flagged():
    module = LayeredNTKNet.fcn(3, [16], 2, seed=0).double()
    x, y = _data(5, 3, 2, seed=7)
    with pytest.warns(ConvergenceWarning, match="lower bounds"):
        result = loss_sharpness(module, x, y, k=2, max_iter=3, tol=1e-12)
    assert not result.converged.all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_sharpness(module, x, y, gauss_newton=False, tol=1e-6)


def test_bad_input():
    module = LayeredNTKNet.fcn(3, [4], 2, seed=0)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    size = sum(p.numel() for p in module.parameters())
    with pytest.raises(ValueError, match="loss must be"):
        loss_sharpness(module, x, y, loss="hinge")
    with pytest.raises(ValueError, match="reduction must be"):
        loss_sharpness(module, x, y, reduction="none")
    for k in (0, size + 1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer"):
            loss_sharpness(module, x, y, k=k)
    with pytest.raises(ValueError, match="rows"):
        loss_sharpness(module, x, y[:4])
    with pytest.raises(ValueError, match="do not match"):
        loss_sharpness(module, x, torch.randn(5, 3))
    with pytest.raises(ValueError, match="integer class labels"):
        loss_sharpness(module, x, y, loss="cross_entropy")
    with pytest.raises(ValueError, match=r"needs 0\.\.1"):
        loss_sharpness(module, x, torch.tensor([0, 1, 2, 0, 1]), loss="cross_entropy")
    with pytest.raises(ValueError, match="in_features"):
        loss_sharpness(module, torch.randn(5, 4), y)
