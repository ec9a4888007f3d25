"""The monitor's metrics beyond the papers: the distance from the infinite-width kernel (kernel_regime),
the loss sharpness against the optimiser's current step size (sharpness), docs/math.md 2.8 and 2.9, and where
the top Hessian eigenvector lives (hessian_norm eigenvector_shares, 2.4)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_callback import ForeignMLP, dataset, fcn, loader, make_monitor, trainer

from lightning_linearity.metrics import analytic_ntk, empirical_ntk


def test_kernel_regime_is_the_relative_distance_from_kron_theta(tmp_path):
    model = fcn()
    at_init = copy.deepcopy(model.net).double()
    monitor = make_monitor({"ntk": {}, "kernel_regime": {}}, every_n_steps=2, probe_size=8, dtype="float64")
    trainer(tmp_path, [monitor], max_steps=4, logger=False).fit(model, loader())
    x = dataset().tensors[0][:8].double()
    kernel = empirical_ntk(at_init, x)
    limit = torch.kron(analytic_ntk(at_init, x), torch.eye(kernel.shape[0] // 8, dtype=torch.float64))
    expected = torch.linalg.matrix_norm(kernel - limit, ord=2) / torch.linalg.matrix_norm(limit, ord=2)
    rows = monitor.history
    assert [row["step"] for row in rows] == [0, 2, 4]
    assert rows[0]["linearity/kernel_regime"] == pytest.approx(float(expected), rel=1e-8)
    assert all(row["linearity/kernel_regime"] > 0 for row in rows)


def test_kernel_regime_on_a_foreign_model_is_off_with_a_warning_and_the_ntk_still_logged(tmp_path):
    monitor = make_monitor({"ntk": {}, "kernel_regime": {}}, every_n_steps=1, probe_size=4)
    with pytest.warns(UserWarning, match="kernel_regime is off for this run: .*foreign model"):
        trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(ForeignMLP(), loader())
    assert [row["step"] for row in monitor.history] == [0, 1]
    rows = monitor.history
    assert all("linearity/lambda_min" in row and "linearity/kernel_regime" not in row for row in rows)


class Scheduled(ForeignMLP):
    """Plain SGD whose step size halves after every step (a scheduler the monitor must read)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.2)
        halving = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5**step)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": halving, "interval": "step"}}


def test_sharpness_reads_the_current_step_size_and_its_gauss_newton_part_is_lambda_max_of_k(tmp_path):
    torch.manual_seed(0)
    model = Scheduled()
    at_init = copy.deepcopy(model)
    monitor = make_monitor({"sharpness": {"tol": 1e-6}}, every_n_steps=1, probe_size=8, dtype="float64")
    trainer(tmp_path, [monitor], max_steps=3, logger=False).fit(model, loader())
    rows = {row["step"]: row for row in monitor.history}
    assert sorted(rows) == [0, 1, 2, 3]
    for step, row in rows.items():
        lr = 0.2 * 0.5**step  # the scheduler's step size when the round at this step ran
        assert row["linearity/edge_of_stability"] == pytest.approx(lr * row["linearity/sharpness"] / 2)
        assert row["linearity/catapult"] == pytest.approx(lr * row["linearity/sharpness_gauss_newton"] / 2)
    # for 1/2 sum ||f - y||^2 the Gauss-Newton part is J^T J, whose top eigenvalue is lambda_max(K)
    x = dataset().tensors[0][:8].double()
    lambda_max = torch.linalg.eigvalsh(empirical_ntk(at_init.double(), x, method="generic"))[-1]
    assert rows[0]["linearity/sharpness_gauss_newton"] == pytest.approx(float(lambda_max), rel=1e-5)


def test_sharpness_without_targets_only_warns(tmp_path):
    x = dataset().tensors[0][:6]
    monitor = make_monitor({"sharpness": {}, "ntk": {}}, every_n_steps=1, probe_data=x)
    with pytest.warns(UserWarning, match="sharpness needs probe targets"):
        trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(fcn(), loader())
    assert [row["step"] for row in monitor.history] == [0, 1]
    assert all("linearity/lambda_min" in row and "linearity/sharpness" not in row for row in monitor.history)


def test_catapult_comes_from_the_ntk_whenever_the_step_size_is_known(tmp_path):
    """lr * lambda_max(K) / 2 in every ntk round; with sharpness in the same run the ntk's value is the one
    logged; sharpness with the cross-entropy (Gauss-Newton top is not lambda_max(K)) logs none itself."""
    torch.manual_seed(0)
    both = make_monitor(
        {"ntk": {}, "sharpness": {"tol": 1e-8}}, every_n_steps=1, probe_size=8, dtype="float64"
    )
    trainer(tmp_path, [both], max_steps=2, logger=False).fit(Scheduled(), loader())
    for row in both.history:
        lr = 0.2 * 0.5 ** row["step"]
        assert row["linearity/catapult"] == pytest.approx(lr * row["linearity/lambda_max"] / 2, rel=1e-12)
        assert row["linearity/catapult"] == pytest.approx(lr * row["linearity/sharpness_gauss_newton"] / 2)
    labels = torch.arange(8) % 2  # class labels of the model's two outputs, for the cross-entropy
    probe = (dataset().tensors[0][:8], labels)
    cross_entropy = make_monitor({"sharpness": {"loss": "cross_entropy"}}, every_n_steps=1, probe_data=probe)
    trainer(tmp_path, [cross_entropy], max_steps=1, logger=False).fit(Scheduled(), loader())
    rows = cross_entropy.history
    assert [row["step"] for row in rows] == [0, 1]
    assert all("linearity/edge_of_stability" in row and "linearity/catapult" not in row for row in rows)


class Momentum(ForeignMLP):
    def __init__(self, optimizer):
        super().__init__()
        self.make = optimizer

    def configure_optimizers(self):
        return self.make(self.parameters())


@pytest.mark.parametrize(
    ("optimizer", "eta"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 0.1 / 1.9),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, dampening=0.5), 0.1 * 0.5 / 1.5),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 0.1 * 2.8 / 1.9),
        (lambda p: torch.optim.Adam(p, lr=0.1), None),
    ],
)
def test_the_indicators_use_the_step_of_gradient_descent_with_the_optimisers_threshold(
    tmp_path, optimizer, eta
):
    """Heavy-ball momentum beta is stable while lr (1 - d) lambda < 2 (1 + beta), Nesterov's while
    lr lambda < 2 (1 + beta) / (1 + 2 beta) (docs/math.md 2.9): the indicators are 1 at that threshold.
    Adam has none: no indicator (and one warning when sharpness is asked for)."""
    monitor = make_monitor({"ntk": {}, "sharpness": {}}, every_n_steps=1, probe_size=8)
    if eta is None:
        with pytest.warns(UserWarning, match="edge_of_stability and catapult are not logged"):
            trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(Momentum(optimizer), loader())
    else:
        trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(Momentum(optimizer), loader())
    row = monitor.history[0]  # step 0: the optimiser's settings before any step
    if eta is None:
        assert "linearity/catapult" not in row and "linearity/edge_of_stability" not in row
        return
    assert row["linearity/catapult"] == pytest.approx(eta * row["linearity/lambda_max"] / 2, rel=1e-6)
    assert row["linearity/edge_of_stability"] == pytest.approx(eta * row["linearity/sharpness"] / 2, rel=1e-6)


def test_hessian_eigenvector_shares_are_logged_each_round_for_the_package_nets(tmp_path):
    options = {"hessian_norm": {"eigenvector_shares": True, "tol": 1e-3}}
    monitor = make_monitor(options, every_n_steps=2, probe_size=4, dtype="float64")
    trainer(tmp_path, [monitor], max_steps=2, logger=False).fit(fcn(), loader())
    assert [row["step"] for row in monitor.history] == [0, 2]
    for row in monitor.history:
        shares = {k: v for k, v in row.items() if k.startswith("linearity/hessian_eigenvector_share/")}
        assert len(shares) == fcn().net.depth + 1  # every hidden layer and the output layer
        assert sum(shares.values()) == pytest.approx(1.0)
        assert 0 < row["linearity/hessian_eigenvector_neuron_share"] <= 1


def test_hessian_eigenvector_shares_on_a_foreign_model_warn_once_and_log_nothing_for_them(tmp_path):
    monitor = make_monitor({"hessian_norm": {"eigenvector_shares": True}}, every_n_steps=1, probe_size=4)
    with pytest.warns(UserWarning, match="eigenvector_shares is off for this run") as record:
        trainer(tmp_path, [monitor], max_steps=2, logger=False).fit(ForeignMLP(), loader())
    assert sum("eigenvector_shares" in str(w.message) for w in record) == 1
    assert [row["step"] for row in monitor.history] == [0, 1, 2]
    assert all("linearity/hessian_norm_max" in row for row in monitor.history)
    assert not any("eigenvector" in key for row in monitor.history for key in row)
