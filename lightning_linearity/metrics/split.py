"""The work split of ``hessian_spectral_norm`` and ``neuron_gradient_cosines`` across processes.

Each metric's split is a pair of pure functions, the update / sync / compute shape of torchmetrics: the rows
of a share of the work (a DDP rank's), and the values from the rows of all shares, gathered in order. Rows
of disjoint shares concatenated in order are the rows of everything, so the values do not depend on how
the work was split (one process takes a single share of everything). The NTK's split lives with it in
:mod:`lightning_linearity.metrics.ntk` (:func:`~lightning_linearity.metrics.ntk.ntk_path`,
:func:`~lightning_linearity.metrics.ntk.ntk_share_rows`,
:func:`~lightning_linearity.metrics.ntk.ntk_from_share_rows`).

* Hessian norms (docs/math.md 2.4): the units are (function, probe point i, column a) with the function the
  network output or the pre-activations of a hidden layer, and a an output or a sampled neuron. Every unit
  keeps the Lanczos start vector (and neuron sample) it has when everything is computed at once, so a share
  gets what a single process gets (``columns`` of :func:`~lightning_linearity.metrics.hessian_spectral_norm`).
* Neuron-gradient cosines (docs/math.md 2.5): the units are the probe points; the same neuron subset on
  every share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby

import torch
from torch import Tensor, nn

from lightning_linearity.metrics._functional import (
    as_layered_net,
    evaluate,
    layer_output_model,
    trainable_parameters,
)
from lightning_linearity.metrics._layered import EngineMethod, Method
from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.metrics.hessian import hessian_spectral_norm
from lightning_linearity.metrics.ntk import rows_of_share

Layer = int | str

__all__ = [
    "HessianRound",
    "HessianUnit",
    "cosine_share_rows",
    "cosines_from_rows",
    "eigenvector_groups",
    "hessian_from_rows",
    "hessian_share_rows",
    "hessian_units",
]


# ----------------------------------------------------------------------------------------- Hessian norms
@dataclass(frozen=True)
class HessianUnit:
    """One Hessian norm ||d^2 g_a(w; x_i) / dw^2||: ``g`` the network output (``layer=None``) or the
    pre-activations of ``layer``, ``point`` the probe index i, ``column`` the output a or the position in the
    layer's neuron sample."""

    layer: Layer | None
    point: int
    column: int


def hessian_units(
    model: nn.Module, x: Tensor, layers: Sequence[Layer | None], *, num_neurons: int | None
) -> list[HessianUnit]:
    """Every unit of the Hessian norms of ``model`` on the probe points ``x``: function by function (in the
    order of ``layers``, ``None`` for the network output), then point by point, then column by column.

    The columns of a layer are its ``num_neurons`` sampled neurons (all of them for ``None``; more than the
    layer has is the metric's error, raised by :func:`hessian_share_rows`). Evaluates the model on one point.
    """
    units = []
    for layer in layers:
        if layer is None:
            with torch.no_grad():
                q = evaluate(model, x[:1]).shape[1]
        elif num_neurons is None:
            with torch.no_grad():
                q = layer_output_model(model, layer)(trainable_parameters(model), x[:1]).shape[1]
        else:
            q = num_neurons
        units += [HessianUnit(layer, i, a) for i in range(x.shape[0]) for a in range(q)]
    return units


def eigenvector_groups(model: nn.Module) -> tuple[str, ...]:
    """The parameter groups of the top eigenvector's shares: ``layer_1`` .. ``layer_L``, ``output``.

    Raises:
        ValueError: ``model`` is not one of the package's layered networks (the shares of a hidden neuron
            are defined for them only).
    """
    net = as_layered_net(model)
    if net is None:
        raise ValueError(
            f"eigenvector_shares needs one of the package's layered networks, not {type(model).__name__}"
        )
    return (*net.hidden_layer_names, "output")


def hessian_share_rows(
    model: nn.Module,
    x: Tensor,
    units: Sequence[HessianUnit],
    *,
    seed: int,
    num_neurons: int | None,
    tol: float,
    max_iter: int,
    method: Method = "auto",
    eigenvector_shares: bool = False,
) -> Tensor:
    """The rows of ``units`` (a share of :func:`hessian_units`), float64, one per unit.

    Column 0 is the norm ||d^2 g_a(w; x_i) / dw^2||_2
    (:func:`~lightning_linearity.metrics.hessian_spectral_norm`, one call per function and point, with a
    generator seeded ``seed``). With ``eigenvector_shares`` (the
    package's networks, :func:`eigenvector_groups`) each row also holds where the unit eigenvector v of that
    eigenvalue lives: its share ||v_g||^2 of each group's parameters, then its largest single-neuron share
    (docs/math.md 2.4); NaN for the units of a hidden layer, for which no share is defined.
    """
    width = 1 + (len(eigenvector_groups(model)) + 1 if eigenvector_shares else 0)
    rows = [torch.zeros(0, width, dtype=torch.float64, device=x.device)]  # float even for token inputs
    for (layer, i), group in groupby(units, key=lambda unit: (unit.layer, unit.point)):
        shares = eigenvector_shares and layer is None
        result = hessian_spectral_norm(
            model,
            x[i : i + 1],
            layer=layer,
            num_neurons=None if layer is None else num_neurons,
            generator=torch.Generator().manual_seed(seed),
            tol=tol,
            max_iter=max_iter,
            method=method,
            columns=[unit.column for unit in group],
            return_info=shares,
            eigenvector_shares=shares,
        )
        norms, info = result if shares else (result, None)
        block = torch.full((norms.numel(), width), torch.nan, dtype=torch.float64, device=x.device)
        block[:, 0] = norms.flatten()
        if info is not None:
            block[:, 1:-1] = info.layer_shares.flatten(0, 1)
            block[:, -1] = info.neuron_share.flatten()
        rows.append(block)
    return torch.cat(rows)


@dataclass(frozen=True)
class HessianRound:
    """The Hessian norms of a round, assembled by :func:`hessian_from_rows`.

    Attributes:
        norms: per function (``None``: the network output, else the layer as given), the norms of its units.
        top_shares: the shares ||v_g||^2 of the parameter groups (:func:`eigenvector_groups`) in the top
            eigenvector v of the output Hessian with the largest norm over points and outputs (``None``
            without ``eigenvector_shares``); they sum to 1.
        top_neuron_share: the largest share of one hidden neuron in that v.
    """

    norms: dict[Layer | None, Tensor]
    top_shares: Tensor | None = None
    top_neuron_share: Tensor | None = None


def hessian_from_rows(units: Sequence[HessianUnit], rows: Tensor) -> HessianRound:
    """The norms per function and the top eigenvector's shares from the rows of all ``units``."""
    if rows.shape[0] != len(units):
        raise ValueError(f"rows must hold one row per unit ({len(units)}), got {rows.shape[0]}")
    layers = [unit.layer for unit in units]
    norms = {
        layer: rows[[j for j, other in enumerate(layers) if other == layer], 0]
        for layer in dict.fromkeys(layers)
    }
    if rows.shape[1] == 1 or None not in norms:
        return HessianRound(norms)
    output = [j for j, layer in enumerate(layers) if layer is None]
    top = output[int(rows[output, 0].argmax())]
    return HessianRound(norms, rows[top, 1:-1], rows[top, -1])


# ------------------------------------------------------------------------------------- gradient cosines
def cosine_share_rows(
    model: nn.Module,
    x: Tensor,
    share: slice,
    layer: Layer,
    *,
    seed: int,
    num_neurons: int | None,
    method: EngineMethod = "auto",
    chunk_size: int | None = None,
) -> Tensor:
    """Per probe point of ``x[share]``, the mean |cos| over the pairs of sampled neurons of ``layer``
    (:func:`~lightning_linearity.metrics.neuron_gradient_cosines` with ``reduction="none"`` and a generator
    seeded ``seed``: the same neurons on every share), shape (share size,)."""

    def per_probe(xs: Tensor) -> Tensor:
        return neuron_gradient_cosines(
            model,
            xs,
            layer,
            num_neurons=num_neurons,
            generator=torch.Generator().manual_seed(seed),
            method=method,
            reduction="none",
            chunk_size=chunk_size,
        )

    return rows_of_share(per_probe, x, share)


def cosines_from_rows(rows: Tensor) -> Tensor:
    """The metric from the per-probe rows of all points: their mean (every probe has the same pairs, so this
    is the mean over probes and pairs of docs/math.md 2.5)."""
    return rows.mean()
