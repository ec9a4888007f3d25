"""Every key :class:`~lightning_linearity.LinearityMonitor` logs: names, groups, metrics and plot titles.

The one registry of logged keys. The callback's stages write these names, the report figures group and
title them, the progress-bar summary and the CLI's final table show them, and the sweeps collect them:
all read them from here. Every key is logged as ``linearity/<name>`` (one section in W&B and TensorBoard).

=================================  ==================  ===============================================
name (under ``linearity/``)        metric              what (docs/math.md)
=================================  ==================  ===============================================
``lambda_min``, ``lambda_max``     ``ntk``             extreme eigenvalues of K on the probe set (2.2)
``condition_number``               ``ntk``             lambda_max / lambda_min
``ntk_trace``                      ``ntk``             tr K
``pl_ratio``                       ``ntk``             ||grad L||^2 / (2 L) >= lambda_min (2.2)
``kernel_change``, ``..._max``     ``kernel_change``   ||K_t - K_0|| / ||K_0|| and its running max (2.3)
``hessian_norm_max``, ``_mean``    ``hessian_norm``    ||d^2 f_a(x_i)/dw^2||_2 over (i, a) (2.4); per
                                                       hidden layer ``hessian_norm_max/<layer>``
``hessian_eigenvector_share/<l>``  ``hessian_norm``    share ||v_l||^2 of layer l's weights in the top
                                                       eigenvector v of the output Hessians (2.4; option
                                                       ``eigenvector_shares``)
``hessian_eigenvector_neuron_``    ``hessian_norm``    the largest share of one hidden neuron in v
``share``
``grad_cosine/<layer>``            ``grad_cosines``    mean |cos| of neuron gradients (2.5)
``linearization_error_mean``,      ``linearization``   |f(w) - f_lin(w)| (2.6), relative to
``_max``, ``_relative``                                |f(w) - f(w_0)|
``distance_from_init``             ``linearization``   ||w_t - w_0|| (2.6)
``kernel_regime``                  ``kernel_regime``   ||K_t - kron(Theta, I_k)|| / ||kron(Theta, I_k)|| (2.8)
``sharpness``                      ``sharpness``       top eigenvalue of the loss Hessian on the probes (2.9)
``sharpness_gauss_newton``         ``sharpness``       top eigenvalue of its Gauss-Newton part
``edge_of_stability``              ``sharpness``       eta * sharpness / 2 (unstable above 1)
``catapult``                       ``ntk``, or         eta * lambda_max(K) / 2 (catapult regime above 1)
                                   ``sharpness``
``seconds/<stage>``                (every round)       wall time of each part of the round
``overhead``                       (every round)       the monitor's share of the wall time so far
=================================  ==================  ===============================================
"""

from __future__ import annotations

from dataclasses import dataclass

#: Prefix of every logged value.
PREFIX = "linearity/"
#: Prefix of the report images in W&B and TensorBoard.
IMAGE_PREFIX = "linearity_plots/"
#: Key of the one-line summary in the progress bar.
PROGRESS_BAR_KEY = "linearity"

LAMBDA_MIN = "lambda_min"
LAMBDA_MAX = "lambda_max"
CONDITION_NUMBER = "condition_number"
NTK_TRACE = "ntk_trace"
PL_RATIO = "pl_ratio"
KERNEL_CHANGE = "kernel_change"
KERNEL_CHANGE_MAX = "kernel_change_max"
HESSIAN_NORM_MAX = "hessian_norm_max"
HESSIAN_NORM_MEAN = "hessian_norm_mean"
#: Group of the top Hessian eigenvector's share per layer, ``hessian_eigenvector_share/<layer>``.
HESSIAN_EIGENVECTOR_SHARE = "hessian_eigenvector_share"
HESSIAN_EIGENVECTOR_NEURON_SHARE = "hessian_eigenvector_neuron_share"
COSINE_GROUP = "grad_cosine"
LINEARIZATION_ERROR_MEAN = "linearization_error_mean"
LINEARIZATION_ERROR_MAX = "linearization_error_max"
LINEARIZATION_ERROR_RELATIVE = "linearization_error_relative"
DISTANCE_FROM_INIT = "distance_from_init"
KERNEL_REGIME = "kernel_regime"
SHARPNESS = "sharpness"
SHARPNESS_GAUSS_NEWTON = "sharpness_gauss_newton"
EDGE_OF_STABILITY = "edge_of_stability"
CATAPULT = "catapult"
#: Group of the per-stage round times, ``seconds/<stage>`` (and ``seconds/round``, the whole round).
SECONDS_GROUP = "seconds"
#: The monitor's share of the wall time of training so far (rounds / (rounds + training)).
OVERHEAD = "overhead"

#: Keys ending in one of these belong to the group of their stem (``hessian_norm_max`` -> ``hessian_norm``).
SUMMARY_SUFFIXES = ("min", "max", "mean", "median", "std")


@dataclass(frozen=True)
class Group:
    """Keys drawn on one panel of the report: a title, and whether the report draws it at all."""

    title: str
    plotted: bool = True


#: The groups, in the order of the definitions (the report's panels follow it; unknown groups come last).
GROUPS: dict[str, Group] = {
    "lambda": Group("NTK eigenvalues  λ(K)"),
    CONDITION_NUMBER: Group("NTK condition number  λ_max / λ_min"),
    NTK_TRACE: Group("NTK trace  tr K"),
    PL_RATIO: Group("‖∇L‖² / (2L)  (PL*: ≥ λ_min)"),
    KERNEL_CHANGE: Group("relative kernel change  ‖K_t - K_0‖ / ‖K_0‖"),
    "hessian_norm": Group("Hessian spectral norm  ‖H_f‖₂"),
    HESSIAN_EIGENVECTOR_SHARE: Group(
        "top Hessian eigenvector v: share ‖v_l‖² per layer, largest of one neuron"
    ),
    COSINE_GROUP: Group("mean |cos| of neuron gradients"),
    "linearization_error": Group("linearisation error  |f - f_lin|"),
    LINEARIZATION_ERROR_RELATIVE: Group("relative linearisation error  |f - f_lin| / |f - f_0|"),
    DISTANCE_FROM_INIT: Group("distance from init  ‖w_t - w_0‖"),
    KERNEL_REGIME: Group("distance from the infinite-width kernel  ‖K_t - Θ⊗I‖ / ‖Θ⊗I‖"),
    SHARPNESS: Group("loss sharpness  λ_max(∇²L) (and its Gauss-Newton part)"),
    EDGE_OF_STABILITY: Group("η · sharpness / 2  (edge of stability at 1)"),
    CATAPULT: Group("η · λ_max(K) / 2  (catapult above 1)"),
    SECONDS_GROUP: Group("seconds per round", plotted=False),
    OVERHEAD: Group("monitor's share of wall time", plotted=False),
}

#: Keys whose group does not follow from their name: ``{key: (group, label)}``.
_EXPLICIT_GROUPS = {
    SHARPNESS: (SHARPNESS, "loss Hessian"),
    SHARPNESS_GAUSS_NEWTON: (SHARPNESS, "Gauss-Newton"),
    HESSIAN_EIGENVECTOR_NEURON_SHARE: (HESSIAN_EIGENVECTOR_SHARE, "one neuron (largest)"),
}

#: (key, short name) of the progress-bar summary, shown when present.
SUMMARY_KEYS = (
    (LAMBDA_MIN, "lmin"),
    (KERNEL_CHANGE, "dK"),
    (HESSIAN_NORM_MAX, "H"),
    (LINEARIZATION_ERROR_MAX, "lin"),
)


def logged(name: str) -> str:
    """The logged key of ``name``: ``linearity/<name>``."""
    return PREFIX + name


def cosine_key(layer: str) -> str:
    """The name of the cosines of one layer, ``grad_cosine/<layer>``."""
    return f"{COSINE_GROUP}/{layer}"


def eigenvector_share_key(layer: str) -> str:
    """The name of one layer's share in the top Hessian eigenvector, ``hessian_eigenvector_share/<layer>``."""
    return f"{HESSIAN_EIGENVECTOR_SHARE}/{layer}"


def seconds_key(stage: str) -> str:
    """The name of one part's wall time in a round, ``seconds/<stage>``."""
    return f"{SECONDS_GROUP}/{stage}"


def group_of(name: str) -> tuple[str, str]:
    """``(group, label)`` of a key name without the prefix.

    ``lambda_min`` -> (lambda, min); ``grad_cosine/layer_2`` -> (grad_cosine, layer_2);
    ``hessian_norm_max/layer_2`` -> (hessian_norm, max layer_2); ``seconds/ntk`` -> (seconds, ntk);
    ``kernel_change`` -> (kernel_change, kernel_change).
    """
    if name in _EXPLICIT_GROUPS:
        return _EXPLICIT_GROUPS[name]
    base, _, sub = name.partition("/")
    stem, _, suffix = base.rpartition("_")
    if not (stem and suffix in SUMMARY_SUFFIXES):
        stem, suffix = base, ""
    return stem, " ".join(part for part in (suffix, sub) if part) or base


def is_timing(name: str) -> bool:
    """Whether ``name`` (with or without the prefix) is a wall-time record rather than a measurement."""
    name = name.removeprefix(PREFIX)
    return name == OVERHEAD or name.startswith(SECONDS_GROUP + "/")


def is_plotted(name: str) -> bool:
    """Whether the report's curves draw the key ``name`` (timings are not drawn)."""
    group = GROUPS.get(group_of(name)[0])
    return group is None or group.plotted
