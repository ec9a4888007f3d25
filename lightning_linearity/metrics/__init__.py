"""Linearity metrics as pure functions of ``(model, inputs[, reference])`` (docs/math.md section 2).

No Lightning import here: these work on any ``torch.nn.Module`` mapping (n, ...) to (n, k), with fast
structured paths for the package's own networks. None of them changes the model's parameters, ``.grad``,
train/eval mode or torch's global random state.

=============================  ==================================================================
``empirical_ntk``              K[(i,a),(j,b)] = <df_a(x_i)/dw, df_b(x_j)/dw>                 (2.1)
``kernel_spectrum``            lambda_min, lambda_max, condition number and trace of K        (2.2)
``pl_ratio``                   realised ||grad L||^2 / (2 L) >= lambda_min(K)                 (2.2)
``relative_kernel_change``     ||K_t - K_0|| / ||K_0||                                         (2.3)
``hessian_spectral_norm``      ||d^2 f_a(x_i) / dw^2||_2 by Lanczos on Hessian-vector products (2.4)
``neuron_gradient_cosines``    mean |cos| between the gradients of a layer's neurons          (2.5)
``linearization_error``        |f(w) - f_lin(w)| with f_lin the first-order expansion at w_0 (2.6)
``distance_from_init``         R = ||w - w_0||                                                 (2.6)
``analytic_ntk``               infinite-width NTK Theta: empirical_ntk -> kron(Theta, I_k)    (2.8)
``analytic_nngp``              infinite-width NNGP Sigma = lim E[f_a(x) f_a(x')] at init      (2.8)
``loss_sharpness``             k largest eigenvalues of d^2 L / dw^2 and the Gauss-Newton top (2.9)
=============================  ==================================================================

Work splits across processes (DDP), as pairs of pure functions: rows of a share of the probe points or
units, and the values from the rows of all shares: the NTK's in :mod:`lightning_linearity.metrics.ntk`
(``ntk_path``, ``ntk_share_rows``, ``ntk_from_share_rows``), the Hessian norms' and the cosines' in
:mod:`lightning_linearity.metrics.split`.

Helpers for code built on the metrics (the callback): ``as_layered_net`` (the package's network behind a
model), ``evaluate`` (f(w; x) as (n, k) with clear errors), ``resolve_layer`` (a hidden layer's submodule
and display name), ``check_method``, ``Method`` and ``EngineMethod`` (the ``method`` argument of the
metrics; ``ENGINE_METHODS`` for those with an engine route).
"""

from lightning_linearity.metrics._functional import as_layered_net, evaluate, resolve_layer
from lightning_linearity.metrics._layered import ENGINE_METHODS, EngineMethod, Method, check_method
from lightning_linearity.metrics._linalg import ConvergenceWarning
from lightning_linearity.metrics.analytic import analytic_nngp, analytic_ntk
from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.metrics.hessian import HessianInfo, hessian_spectral_norm
from lightning_linearity.metrics.kernel_change import relative_kernel_change
from lightning_linearity.metrics.linearization import (
    LinearizationError,
    distance_from_init,
    linearization_error,
)
from lightning_linearity.metrics.ntk import empirical_ntk
from lightning_linearity.metrics.pl import KernelSpectrum, kernel_spectrum, pl_ratio
from lightning_linearity.metrics.sharpness import Sharpness, loss_sharpness

__all__ = [
    "ENGINE_METHODS",
    "ConvergenceWarning",
    "EngineMethod",
    "HessianInfo",
    "KernelSpectrum",
    "LinearizationError",
    "Method",
    "Sharpness",
    "analytic_nngp",
    "analytic_ntk",
    "as_layered_net",
    "check_method",
    "distance_from_init",
    "empirical_ntk",
    "evaluate",
    "hessian_spectral_norm",
    "kernel_spectrum",
    "linearization_error",
    "loss_sharpness",
    "neuron_gradient_cosines",
    "pl_ratio",
    "relative_kernel_change",
    "resolve_layer",
]
