"""One layered NTK network (docs/math.md section 1) from which FCN, DenseNet and masked DAGs are built.

For layers l = 1..L+1, with ``c_l`` the post-activations layer l reads and ``M_l`` its 0/1 mask:

    z_l[r] = ( sum_s M_l[r,s] W_l[r,s] c_l[s] ) / sqrt(deg_l[r]),    h_l = sigma(z_l),    f = z_{L+1}

``chain`` connectivity reads ``c_l = h_{l-1}`` (FCN); ``dense`` reads ``c_l = concat(h_{l-1}, ..., h_1, x)``
(DenseNet, 000 Appendix E; masked DAGs are dense connectivity with masks).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_linearity._text import short_repr
from lightning_linearity.nets._checks import check_flag, check_positive_int, check_seed, check_widths
from lightning_linearity.nets.activations import get_activation
from lightning_linearity.nets.dag import (
    MASK_STREAM,
    WEIGHT_STREAM,
    dense_source_sizes,
    derived_generator,
    layer_edges,
    random_dense_masks,
)
from lightning_linearity.nets.layers import NTKLinear

Connectivity = Literal["chain", "dense"]


@dataclass(frozen=True)
class NetworkTrace:
    """What one forward pass computed, layer by layer (l = 1..L+1).

    ``inputs[l-1]`` is ``c_l`` (what layer l reads), ``preactivations[l-1]`` is ``z_l``; the last
    pre-activation is the network output ``f``.
    """

    inputs: list[Tensor]
    preactivations: list[Tensor]

    @property
    def output(self) -> Tensor:
        return self.preactivations[-1]


class LayeredNTKNet(nn.Module):
    """NTK-parameterised feedforward network in the layered form of docs/math.md section 1.

    Args:
        in_features: input dimension d.
        hidden_widths: widths of the hidden layers 1..L (L >= 1).
        out_features: number of outputs k.
        connectivity: ``"chain"`` (FCN) or ``"dense"`` (DenseNet / masked DAG).
        masks: optional 0/1 masks for layers 1..L+1 (``None`` entries mean fully connected).
        activation: name of sigma (see :mod:`lightning_linearity.nets.activations`).
        bias: add a bias to every layer (a N(0,1) weight on a constant-1 input, counted in the in-degree).
        seed: draw the initial weights from this seed's own stream instead of torch's global generator
            (an integer in [0, 2**64)). Either way the draws are made in float32 on the CPU and then cast,
            so a seed names the same network whatever torch's default dtype and device.
        output_distance: p(v) of each output neuron when it differs from L+1 (DAGs from edge lists);
            only used by :attr:`width`.
    """

    def __init__(
        self,
        in_features: int,
        hidden_widths: Sequence[int],
        out_features: int = 1,
        *,
        connectivity: Connectivity = "chain",
        masks: Sequence[Tensor | None] | None = None,
        activation: str = "tanh",
        bias: bool = False,
        seed: int | None = None,
        output_distance: Sequence[int] | None = None,
    ):
        super().__init__()
        self.in_features = check_positive_int("in_features", in_features)
        self.out_features = check_positive_int("out_features", out_features)
        self.hidden_widths = check_widths(hidden_widths)
        bias = check_flag("bias", bias)
        if seed is not None:
            seed = check_seed("seed (the models' init_seed)", seed)
        if connectivity not in ("chain", "dense"):
            raise ValueError(f"connectivity must be 'chain' or 'dense', got {short_repr(connectivity)}")
        self.connectivity = connectivity
        self.activation = get_activation(activation)
        depth = len(self.hidden_widths)
        if masks is None:
            masks = [None] * (depth + 1)
        if isinstance(masks, str | bytes | Tensor) or not isinstance(masks, Sequence):
            raise ValueError(
                f"masks must be a list of {depth + 1} 0/1 tensors or None, got {type(masks).__name__}"
            )
        if len(masks) != depth + 1:
            raise ValueError(f"expected {depth + 1} masks (one per layer incl. the output), got {len(masks)}")
        rows = [*self.hidden_widths, self.out_features]
        self.layers = nn.ModuleList(
            NTKLinear(self._layer_input_size(l), rows[l - 1], mask=masks[l - 1], bias=bias)
            for l in range(1, depth + 2)
        )
        if output_distance is not None:
            if isinstance(output_distance, str) or len(output_distance) != self.out_features:
                raise ValueError("output_distance needs one entry per output neuron")
            output_distance = [check_positive_int("every output_distance", p) for p in output_distance]
        self.output_distance = output_distance
        if seed is not None:
            self.reset_parameters(derived_generator(seed, WEIGHT_STREAM))

    # ----------------------------------------------------------------------------------- structure
    def _layer_input_size(self, layer: int) -> int:
        if self.connectivity == "chain":
            return ([self.in_features, *self.hidden_widths])[layer - 1]
        return sum(dense_source_sizes(self.in_features, self.hidden_widths, layer))

    @property
    def depth(self) -> int:
        """L, the number of hidden layers."""
        return len(self.hidden_widths)

    @property
    def in_degrees(self) -> list[Tensor]:
        """deg_l for layers 1..L+1 (one entry per neuron; the bias input counts)."""
        return [layer.in_degree for layer in self.layers]

    @property
    def width(self) -> int:
        """m = minimum in-degree over neurons of layers 2..L+1 (004 Def. 2.7)."""
        degrees = [d for d in self.in_degrees[1:-1]]
        out_degree = self.in_degrees[-1]
        if self.output_distance is not None:
            keep = torch.tensor([p >= 2 for p in self.output_distance], device=out_degree.device)
            out_degree = out_degree[keep]
        degrees.append(out_degree)
        degrees = torch.cat([d.flatten() for d in degrees])
        if degrees.numel() == 0:
            raise ValueError("width is undefined: no neuron lies beyond the first layer")
        return int(degrees.min().item())

    @property
    def hidden_layer_names(self) -> list[str]:
        """Names of the hidden layers as the metrics and logs use them: ``layer_1`` .. ``layer_L``."""
        return [f"layer_{l}" for l in range(1, self.depth + 1)]

    def resolve_hidden_layer(self, layer: int | str) -> int:
        """The 1-based index of a hidden layer given as ``2``, ``"layer_2"`` or as module ``"layers.1"``."""
        names = self.hidden_layer_names
        if isinstance(layer, int) and not isinstance(layer, bool) and 1 <= layer <= self.depth:
            return layer
        if isinstance(layer, str):
            if layer in names:
                return names.index(layer) + 1
            if layer in [f"layers.{l - 1}" for l in range(1, self.depth + 1)]:
                return int(layer.split(".")[1]) + 1
        raise ValueError(
            f"unknown hidden layer {layer!r}; valid: 1..{self.depth}, {names} or "
            f"{[f'layers.{l}' for l in range(self.depth)]}"
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Redraw every weight i.i.d. N(0, 1)."""
        for layer in self.layers:
            layer.reset_parameters(generator)

    # ----------------------------------------------------------------------------------- forward
    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 2 or x.shape[-1] != self.in_features:
            raise ValueError(
                f"input has shape {tuple(x.shape)}, but the network expects "
                f"(n, in_features={self.in_features}); "
                f"flatten the inputs or set in_features to match the data"
            )

    def trace(self, x: Tensor) -> NetworkTrace:
        """Forward pass returning every layer's input ``c_l`` and pre-activation ``z_l``."""
        self._check_input(x)
        inputs, preacts = [], []
        post = [x]  # h_0 = x, h_1, ...
        for l, layer in enumerate(self.layers, start=1):
            c = post[-1] if self.connectivity == "chain" else torch.cat(post[::-1], dim=-1)
            z = layer(c)
            inputs.append(c)
            preacts.append(z)
            if l <= self.depth:
                post.append(self.activation(z))
        return NetworkTrace(inputs, preacts)

    def preactivations(self, x: Tensor) -> list[Tensor]:
        """Pre-activations z_1..z_L of the hidden layers ("neurons" in docs/math.md 2.5)."""
        return self.trace(x).preactivations[:-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.trace(x).output

    # ----------------------------------------------------------------------------------- builders
    @classmethod
    def fcn(cls, in_features: int, widths: Sequence[int], out_features: int = 1, **kwargs) -> LayeredNTKNet:
        """Fully-connected network, 000 Eq. (8)."""
        return cls(in_features, widths, out_features, connectivity="chain", **kwargs)

    @classmethod
    def densenet(
        cls, in_features: int, widths: Sequence[int], out_features: int = 1, **kwargs
    ) -> LayeredNTKNet:
        """DenseNet: every layer reads all earlier layers and the input (000 Appendix E, Eq. 37)."""
        return cls(in_features, widths, out_features, connectivity="dense", **kwargs)

    @classmethod
    def masked_dag(
        cls,
        in_features: int,
        widths: Sequence[int],
        out_features: int = 1,
        *,
        drop_prob: float = 0.5,
        mask_seed: int | None = None,
        **kwargs,
    ) -> LayeredNTKNet:
        """DenseNet connectivity with each edge dropped i.i.d. with probability ``drop_prob``.

        The mask comes from its own random stream of ``mask_seed`` (independent of the weights even for
        equal seeds; drawn in float32 on the CPU, so the same mask under any default dtype and device);
        ``mask_seed=None`` draws one from torch's global generator. A neuron left with no incoming edge
        gets one edge back, chosen at random.
        """
        if (
            isinstance(drop_prob, bool)
            or not isinstance(drop_prob, int | float)
            or not 0.0 <= drop_prob < 1.0
        ):
            raise ValueError(f"drop_prob must be in [0, 1), got {short_repr(drop_prob)}")
        if mask_seed is None:
            mask_seed = int(torch.randint(0, 2**62, (1,), device="cpu").item())
        mask_seed = check_seed("mask_seed", mask_seed)
        widths = check_widths(widths)
        masks = random_dense_masks(
            check_positive_int("in_features", in_features),
            widths,
            check_positive_int("out_features", out_features),
            float(drop_prob),
            derived_generator(mask_seed, MASK_STREAM),
        )
        return cls(in_features, widths, out_features, connectivity="dense", masks=masks, **kwargs)

    @classmethod
    def from_edges(
        cls,
        edges: Iterable[Sequence[Hashable]],
        inputs: Sequence[Hashable] | None = None,
        outputs: Sequence[Hashable] | None = None,
        **kwargs,
    ) -> LayeredNTKNet:
        """A network on an arbitrary DAG given as ``(u, v)`` edges, layered by longest path (004 Def. 2.5).

        ``x`` columns follow ``inputs`` and ``f`` columns follow ``outputs`` (default: sorted in-degree-0 and
        out-degree-0 vertices). The layout is kept as ``net.layout``.
        """
        layout = layer_edges(edges, inputs, outputs)
        net = cls(
            len(layout.inputs),
            layout.hidden_widths,
            len(layout.outputs),
            connectivity="dense",
            masks=list(layout.masks),
            output_distance=[layout.distance[v] for v in layout.outputs],
            **kwargs,
        )
        net.layout = layout
        return net
