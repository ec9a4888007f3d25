"""A seed names one network: the same masks and weights (up to the cast) whatever torch's default dtype.

Before, the weights were drawn by ``normal_`` and the masks by ``rand`` in the default dtype, and a float64
draw is not the float32 draw of the same generator state: MaskedDAGNet at width 64 and seed 0 had another
mask (another minimum in-degree) under a float64 default than under float32. Now every draw is made in
float32 on the CPU: the float64 network of a seed is its float32 network, upcast exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_linearity.models import NTKFCN, MaskedDAGNet, NTKDenseNet
from lightning_linearity.nets import LayeredNTKNet, NTKLinear
from lightning_linearity.nets.dag import WEIGHT_STREAM, derived_generator


@pytest.fixture
def default_dtype():
    """Set torch's default dtype inside a test; restored afterwards."""
    before = torch.get_default_dtype()
    yield torch.set_default_dtype
    torch.set_default_dtype(before)


def seeded_linear() -> nn.Module:
    layer = NTKLinear(37, 23, bias=True)
    layer.reset_parameters(derived_generator(5, WEIGHT_STREAM))
    return layer


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "NTKLinear": seeded_linear,
    "fcn": lambda: LayeredNTKNet.fcn(8, [33, 17], 3, seed=0, bias=True),
    "densenet": lambda: LayeredNTKNet.densenet(8, [33, 17], 3, seed=1),
    "masked_dag": lambda: LayeredNTKNet.masked_dag(8, [64, 64, 64], 2, mask_seed=0, seed=0),
    "masked_dag_sparse": lambda: LayeredNTKNet.masked_dag(5, [20, 20], 1, drop_prob=0.9, mask_seed=3, seed=4),
    "NTKFCN": lambda: NTKFCN(8, 2, width=64, depth=2, init_seed=0),
    "NTKDenseNet": lambda: NTKDenseNet(8, 2, width=16, depth=3, init_seed=2, bias=True),
    "MaskedDAGNet": lambda: MaskedDAGNet(8, 1, width=64, depth=3, init_seed=0, mask_seed=0),
    "MaskedDAGNet_edges": lambda: MaskedDAGNet.from_edges(
        [("x1", "a"), ("x2", "a"), ("x2", "b"), ("a", "c"), ("b", "c"), ("a", "o"), ("c", "o")], init_seed=7
    ),
}


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def width(module: nn.Module) -> int | None:
    net = getattr(module, "net", module)
    return net.width if isinstance(net, LayeredNTKNet) else None


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_seed_names_the_same_network_in_float32_and_float64(name, default_dtype):
    default_dtype(torch.float32)
    single = BUILDERS[name]()
    default_dtype(torch.float64)
    double = BUILDERS[name]()
    a, b = state(single), state(double)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == torch.float32 and b[key].dtype == torch.float64, key
        # masks and in-degrees are small integers; weights: the float32 draws, upcast exactly in float64
        assert torch.equal(a[key].double(), b[key]), key
    masks = [key for key in a if key.endswith("mask")]
    if name.startswith(("masked", "MaskedDAG")):
        assert masks and all(torch.equal(a[k].double(), b[k]) for k in masks)
    assert width(single) == width(double)


def test_masked_dag_width_64_seed_0_keeps_its_min_in_degree(default_dtype):
    """The issue's case: the minimum in-degree (004 Def. 2.7) of MaskedDAGNet(width=64, seed 0)."""
    widths = {}
    for dtype in (torch.float32, torch.float64):
        default_dtype(dtype)
        net = MaskedDAGNet(64, 1, width=64, depth=3, init_seed=0, mask_seed=0).net
        # independent count of the width: min over layers 2..L+1 of each row's number of kept edges
        widths[dtype] = min(int(layer.mask.sum(dim=1).min()) for layer in net.layers[1:])
        assert widths[dtype] == net.width
    assert widths[torch.float32] == widths[torch.float64]


def test_global_generator_draws_do_not_depend_on_the_default_dtype(default_dtype):
    """Without a seed the weights come from torch's global CPU generator, again in one fixed dtype."""
    weights = {}
    for dtype in (torch.float32, torch.float64):
        default_dtype(dtype)
        torch.manual_seed(11)
        weights[dtype] = [layer.weight.detach().clone() for layer in LayeredNTKNet.fcn(6, [9, 9], 2).layers]
    for single, double in zip(weights[torch.float32], weights[torch.float64], strict=True):
        assert torch.equal(single.double(), double)


def test_entries_are_standard_normal_draws_of_the_seed_stream(default_dtype):
    """The weights are the float32 N(0, 1) stream of the seed, layer by layer, cast to the default dtype."""
    default_dtype(torch.float64)
    net = LayeredNTKNet.fcn(4, [60], 2, seed=9)
    generator = derived_generator(9, WEIGHT_STREAM)
    for layer in net.layers:
        expected = torch.randn(layer.weight.shape, generator=generator, dtype=torch.float32)
        assert layer.weight.dtype == torch.float64
        assert torch.equal(layer.weight.detach(), expected.double())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["fcn", "masked_dag", "MaskedDAGNet"])
def test_a_seed_names_the_same_network_on_another_default_device(name):
    cpu = state(BUILDERS[name]())
    torch.set_default_device("cuda")
    try:
        cuda = state(BUILDERS[name]())
    finally:
        torch.set_default_device(None)
    assert sorted(cpu) == sorted(cuda)
    for key in cpu:
        assert cuda[key].device.type == "cuda" and torch.equal(cpu[key], cuda[key].cpu()), key
