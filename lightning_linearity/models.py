"""LightningModules wrapping the NTK networks: loss, optimiser and task metrics.

The three public modules share :class:`LinearityModule`. Their constructors take plain typed arguments
so they work as ``class_path`` targets in LightningCLI configs, and ``save_hyperparameters()`` makes
checkpoints reload with ``Module.load_from_checkpoint(path)``.

Losses (docs/math.md 2.2):
    ``mse``            L = 1/2 * sum_i ||f(w; x_i) - y_i||^2   (the theory's square loss, summed)
    ``cross_entropy``  mean softmax cross-entropy (binary cross-entropy with logits when out_features = 1)
Integer class targets are encoded for ``mse``: one-hot when out_features > 1, and +/-1 when
out_features = 1 (two classes, labels 0 and 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanSquaredError
from torchmetrics.classification import MulticlassAccuracy

from lightning_linearity._compat import LightningModule
from lightning_linearity._text import short_repr
from lightning_linearity.metrics.pl import square_loss_targets
from lightning_linearity.nets import LayeredNTKNet
from lightning_linearity.nets.network import Connectivity

LossName = Literal["mse", "cross_entropy"]
OptimizerName = Literal["sgd", "adam"]


def _is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_)


def hidden_widths(width: int, depth: int, widths: Sequence[int] | None) -> list[int]:
    """``widths`` when given (e.g. a bottleneck ``[1000, 16, 1000]``), else ``depth`` layers of ``width``."""
    if widths is not None:
        if isinstance(widths, np.ndarray) and widths.ndim == 1:
            widths = widths.tolist()
        if not isinstance(widths, list | tuple) or len(widths) == 0:
            raise ValueError(
                f"widths must be a non-empty list of positive integers, got {short_repr(widths)}"
            )
        return list(widths)
    for name, value in (("width", width), ("depth", depth)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {short_repr(value)}")
    return [int(width)] * int(depth)


def _check_rate(name: str, value: object, *, low: float, high: float, strict: bool, expected: str) -> float:
    """``value`` as a float if it is a real number (no bool) in the range, else a one-line ``ValueError``."""
    real = int | float | np.integer | np.floating
    number = isinstance(value, real) and not isinstance(value, bool | np.bool_)
    if not number or not (low < value if strict else low <= value) or not value < high:
        raise ValueError(f"{name} must be {expected}, got {short_repr(value)}")
    return float(value)


def _allocate(build: Callable[[], LayeredNTKNet], sizes: list[int]) -> LayeredNTKNet:
    """``build()``; a network too large for memory is a one-line ``ValueError`` naming the widths."""
    try:
        return build()
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and "allocate" not in str(err):
            raise
        raise ValueError(
            f"the network with hidden widths {sizes} does not fit in memory ({type(err).__name__}); "
            f"use smaller width / widths"
        ) from None


def _edge_pairs(edges: object) -> object:
    """An edge list with its list / tuple entries as tuples; anything else is passed on unchanged for
    :func:`~lightning_linearity.nets.layer_edges` to name in its error."""
    if not isinstance(edges, list | tuple):
        return edges
    return [tuple(e) if isinstance(e, list | tuple) else e for e in edges]


class LinearityModule(LightningModule):
    """Base LightningModule around a :class:`LayeredNTKNet` stored as ``self.net``.

    Args:
        loss: ``"mse"`` (1/2 sum of squares, the papers' setting) or ``"cross_entropy"``.
        optimizer: ``"sgd"`` (full-batch gradient descent when the data module is full-batch) or ``"adam"``.
        lr: learning rate, positive and finite.
        momentum: SGD momentum in [0, 1) (0 is plain gradient descent); must be 0 with ``"adam"``.
        weight_decay: L2 penalty passed to the optimiser, finite and >= 0.

    Raises:
        ValueError: any of these out of range, NaN/inf, or of the wrong type (one line naming it); a network
            too large for memory.
    """

    net: LayeredNTKNet

    def __init__(
        self,
        loss: LossName = "mse",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ):
        super().__init__()
        if not isinstance(loss, str) or loss not in ("mse", "cross_entropy"):
            raise ValueError(f"loss must be 'mse' or 'cross_entropy', got {short_repr(loss)}")
        if not isinstance(optimizer, str) or optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {short_repr(optimizer)}")
        positive = "positive and finite (a float)"
        lr = _check_rate("lr", lr, low=0, high=math.inf, strict=True, expected=positive)
        unit = "a float in [0, 1)"
        momentum = _check_rate("momentum", momentum, low=0, high=1, strict=False, expected=unit)
        weight_decay = _check_rate(
            "weight_decay", weight_decay, low=0, high=math.inf, strict=False, expected="a finite float >= 0"
        )
        if optimizer == "adam" and momentum != 0:
            raise ValueError(
                f"momentum={momentum!r} applies to optimizer='sgd' only (Adam has no momentum argument); "
                f"set momentum=0 or optimizer='sgd'"
            )
        self.loss_name = loss
        self.optimizer_name = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay

    def _init_metrics(self) -> None:
        """Task metrics per stage; called by subclasses once ``self.net`` exists."""
        classes = max(self.net.out_features, 2)
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_mse", MeanSquaredError())
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes=classes, average="micro"))

    @property
    def layered_net(self) -> LayeredNTKNet:
        """The network; ``self(x) == self.layered_net(x)`` (the metrics' structured paths rely on it)."""
        return self.net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # --------------------------------------------------------------------------------- loss
    def encode_targets(self, y: Tensor, out: Tensor) -> Tensor:
        """Regression targets as (n, k); integer class labels one-hot (k > 1) or as +/-1 (k = 1)
        (:func:`~lightning_linearity.metrics.pl.square_loss_targets`)."""
        return square_loss_targets(y, out)

    def compute_loss(self, out: Tensor, y: Tensor) -> Tensor:
        if self.loss_name == "mse":
            return 0.5 * (out - self.encode_targets(y, out)).pow(2).sum()
        if y.dtype.is_floating_point:
            raise ValueError("loss='cross_entropy' needs integer class labels; use loss='mse' for regression")
        if out.shape[1] == 1:
            return F.binary_cross_entropy_with_logits(out.squeeze(1), y.to(out.dtype))
        return F.cross_entropy(out, y.long())

    def _shared_step(self, batch: tuple[Tensor, Tensor], stage: str) -> Tensor:
        x, y = batch
        out = self(x)
        loss = self.compute_loss(out, y)
        mse = getattr(self, f"{stage}_mse")
        mse(out, self.encode_targets(y, out))
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=len(x))
        self.log(f"{stage}/mse", mse, on_step=on_step, on_epoch=True, batch_size=len(x))
        if not y.dtype.is_floating_point:
            acc = getattr(self, f"{stage}_acc")
            pred = (out.squeeze(1) > 0).long() if out.shape[1] == 1 else out.argmax(dim=1)
            acc(pred, y.long())
            self.log(
                f"{stage}/acc",
                acc,
                prog_bar=stage != "train",
                on_step=False,
                on_epoch=True,
                batch_size=len(x),
            )
        return loss

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(self, batch: tuple[Tensor, ...] | Tensor, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, tuple | list) else batch
        return self(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(
            self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
        )


class _UniformNet(LinearityModule):
    """A :class:`LayeredNTKNet` of the class's ``connectivity`` with ``depth`` layers of ``width``."""

    connectivity: ClassVar[Connectivity]

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        width: int = 512,
        depth: int = 3,
        activation: str = "tanh",
        bias: bool = False,
        widths: list[int] | None = None,
        init_seed: int | None = None,
        loss: LossName = "mse",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ):
        super().__init__(loss, optimizer, lr, momentum, weight_decay)
        self.save_hyperparameters()
        sizes = hidden_widths(width, depth, widths)
        self.net = _allocate(
            lambda: LayeredNTKNet(
                in_features,
                sizes,
                out_features,
                connectivity=self.connectivity,
                activation=activation,
                bias=bias,
                seed=init_seed,
            ),
            sizes,
        )
        self._init_metrics()


class NTKFCN(_UniformNet):
    """Fully-connected NTK network (000 Eq. 8): ``depth`` hidden layers of ``width``, or explicit ``widths``.

    Args:
        in_features: input dimension.
        out_features: number of outputs.
        width: hidden width (ignored when ``widths`` is given).
        depth: number of hidden layers (ignored when ``widths`` is given).
        activation: tanh, erf, softplus, gelu, sigmoid, relu or identity.
        bias: add biases (N(0,1) weights on a constant-1 input, counted in the in-degree).
        widths: per-layer hidden widths, e.g. ``[1000, 16, 1000]`` for 000 Figure 3's bottleneck network.
        init_seed: draw the initial weights from this seed's own stream (else torch's global generator;
            named apart from the data modules' ``seed``, since Lightning logs both in one hparams set).
        loss, optimizer, lr, momentum, weight_decay: see :class:`LinearityModule`.
    """

    connectivity = "chain"


class NTKDenseNet(_UniformNet):
    """DenseNet: every layer reads all earlier layers and the input (000 Appendix E, Eq. 37).

    Same arguments as :class:`NTKFCN`.
    """

    connectivity = "dense"


class MaskedDAGNet(LinearityModule):
    """DenseNet connectivity with edges dropped i.i.d. (004 Figure 2), or a DAG from an edge list.

    With ``edges=None``: each DenseNet edge is kept with probability ``1 - drop_prob``; the mask comes from
    ``mask_seed``'s own random stream, independent of the weights even when ``init_seed == mask_seed``
    (``mask_seed=None`` draws one from torch's global generator). A neuron left with no incoming edge
    gets one edge back, chosen at random. With ``edges``: the DAG given as ``[u, v]`` pairs, layered by
    longest path from the inputs (004 Def. 2.5); ``in_features`` must equal the number of inputs (use
    :meth:`from_edges` to infer it). The mask is a buffer, so checkpoints restore it exactly.

    Args:
        in_features, out_features, width, depth, activation, bias, widths, init_seed: as in :class:`NTKFCN`.
        drop_prob: probability of dropping each edge, in [0, 1) (the DAG paper uses 1/2).
        mask_seed: seed of the mask's random stream.
        edges: optional edge list; then ``width``/``depth``/``widths``/``drop_prob`` are unused.
        inputs, outputs: optional vertex orders for ``x`` and ``f`` columns (edge-list mode).
        loss, optimizer, lr, momentum, weight_decay: see :class:`LinearityModule`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int = 1,
        width: int = 512,
        depth: int = 3,
        activation: str = "tanh",
        bias: bool = False,
        widths: list[int] | None = None,
        init_seed: int | None = None,
        drop_prob: float = 0.5,
        mask_seed: int | None = None,
        edges: list[list[Hashable]] | None = None,
        inputs: list[Hashable] | None = None,
        outputs: list[Hashable] | None = None,
        loss: LossName = "mse",
        optimizer: OptimizerName = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ):
        super().__init__(loss, optimizer, lr, momentum, weight_decay)
        self.save_hyperparameters()
        if edges is None:
            sizes = hidden_widths(width, depth, widths)
            self.net = _allocate(
                lambda: LayeredNTKNet.masked_dag(
                    in_features,
                    sizes,
                    out_features,
                    drop_prob=drop_prob,
                    mask_seed=mask_seed,
                    activation=activation,
                    bias=bias,
                    seed=init_seed,
                ),
                sizes,
            )
        else:
            self.net = LayeredNTKNet.from_edges(
                _edge_pairs(edges), inputs, outputs, activation=activation, bias=bias, seed=init_seed
            )
            for name, given, actual in (
                ("in_features", in_features, self.net.in_features),
                ("out_features", out_features, self.net.out_features),
            ):
                if given != actual:
                    raise ValueError(
                        f"{name}={given!r} but the edge list has {actual}; use MaskedDAGNet.from_edges"
                    )
        self._init_metrics()

    @classmethod
    def from_edges(
        cls,
        edges: Sequence[Sequence[Hashable]],
        inputs: Sequence[Hashable] | None = None,
        outputs: Sequence[Hashable] | None = None,
        **kwargs,
    ) -> MaskedDAGNet:
        """Build from an edge list, inferring ``in_features`` / ``out_features`` from its inputs/outputs."""
        from lightning_linearity.nets import layer_edges

        layout = layer_edges(_edge_pairs(edges), inputs, outputs)
        edges = [list(e) for e in _edge_pairs(edges)]
        return cls(
            len(layout.inputs),
            len(layout.outputs),
            edges=edges,
            inputs=None if inputs is None else list(inputs),
            outputs=None if outputs is None else list(outputs),
            **kwargs,
        )
