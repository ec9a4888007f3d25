"""Networks of docs/math.md section 1, checked against hand computations."""

import math

import numpy as np
import pytest
import torch

from lightning_linearity.nets import ACTIVATIONS, LayeredNTKNet, NTKLinear, get_activation, layer_edges
from lightning_linearity.nets.dag import MASK_STREAM, derived_generator


def hand_mlp(x, weights, sigma):
    """NTK-parameterised MLP written out directly: z_l = W_l h_{l-1} / sqrt(fan_in)."""
    h = x
    for l, w in enumerate(weights):
        z = h @ w.T / math.sqrt(w.shape[1])
        h = sigma(z) if l < len(weights) - 1 else z
    return h


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_derivatives_match_autograd(activation):
    act = get_activation(activation)
    z = torch.linspace(-3, 3, 61, dtype=torch.float64).requires_grad_()
    (grad,) = torch.autograd.grad(act(z).sum(), z, create_graph=True)
    if grad.requires_grad:
        (second,) = torch.autograd.grad(grad.sum(), z, allow_unused=True, materialize_grads=True)
    else:  # sigma' is constant (identity)
        second = torch.zeros_like(grad)
    keep = z.detach().abs() > 1e-9  # relu's kink
    torch.testing.assert_close(act.derivative(z.detach())[keep], grad.detach()[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.second_derivative(z.detach())[keep], second[keep], rtol=1e-12, atol=1e-12)


def test_fcn_equals_hand_written_ntk_mlp():
    torch.manual_seed(0)
    net = LayeredNTKNet.fcn(7, [11, 5, 9], 3).double()
    x = torch.randn(6, 7, dtype=torch.float64)
    weights = [layer.weight.detach() for layer in net.layers]
    torch.testing.assert_close(net(x), hand_mlp(x, weights, torch.tanh), rtol=0, atol=1e-14)


def test_bias_is_a_weight_on_a_constant_input():
    torch.manual_seed(1)
    layer = NTKLinear(4, 3, bias=True).double()
    c = torch.randn(5, 4, dtype=torch.float64)
    augmented = torch.cat([c, torch.ones(5, 1, dtype=torch.float64)], dim=1)
    w = torch.cat([layer.weight, layer.bias[:, None]], dim=1).detach()
    torch.testing.assert_close(layer(c), augmented @ w.T / math.sqrt(5))
    assert layer.in_degree.tolist() == [5.0, 5.0, 5.0]


def test_densenet_reads_all_earlier_layers():
    torch.manual_seed(2)
    net = LayeredNTKNet.densenet(3, [4, 5], 2).double()
    x = torch.randn(2, 3, dtype=torch.float64)
    w1, w2, w3 = (layer.weight.detach() for layer in net.layers)
    h1 = torch.tanh(x @ w1.T / math.sqrt(3))
    h2 = torch.tanh(torch.cat([h1, x], 1) @ w2.T / math.sqrt(7))
    f = torch.cat([h2, h1, x], 1) @ w3.T / math.sqrt(12)
    torch.testing.assert_close(net(x), f, rtol=0, atol=1e-14)
    assert [layer.in_features for layer in net.layers] == [3, 7, 12]
    assert net.width == 7  # min in-degree over layers 2..L+1


def test_init_statistics():
    torch.manual_seed(3)
    net = LayeredNTKNet.fcn(64, [1024, 1024], 1)
    w = torch.cat([layer.weight.flatten() for layer in net.layers])
    assert abs(w.mean().item()) < 0.01
    assert abs(w.std().item() - 1.0) < 0.01


def test_output_is_order_one_at_any_width():
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    stds = {}
    for width in (64, 4096):
        outs = torch.stack([LayeredNTKNet.fcn(16, [width, width], 1, seed=s)(x).detach() for s in range(30)])
        stds[width] = outs.std(dim=0).mean().item()
    assert 0.5 < stds[4096] / stds[64] < 2.0, stds


def test_masked_dag_statistics_and_row_degrees():
    net = LayeredNTKNet.masked_dag(16, [512, 512, 512], 1, drop_prob=0.5, mask_seed=7)
    for layer in net.layers:
        kept = layer.mask.mean().item()
        assert 0.45 <= kept <= 0.55
        assert (layer.mask.sum(dim=1) >= 1).all()
        torch.testing.assert_close(layer.in_degree, layer.mask.sum(dim=1))
    assert net.width == int(torch.cat([l.mask.sum(1) for l in net.layers[1:]]).min())


def test_masked_forward_uses_each_rows_own_in_degree():
    torch.manual_seed(4)
    net = LayeredNTKNet.masked_dag(6, [5], 3, drop_prob=0.6, mask_seed=1).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    l1, l2 = net.layers
    h1 = torch.zeros(4, 5, dtype=torch.float64)
    for r in range(5):
        edges = [s for s in range(6) if l1.mask[r, s] == 1]
        h1[:, r] = torch.tanh(sum(l1.weight[r, s].item() * x[:, s] for s in edges) / math.sqrt(len(edges)))
    c2 = torch.cat([h1, x], dim=1)
    for r in range(3):
        edges = [s for s in range(11) if l2.mask[r, s] == 1]
        expected = sum(l2.weight[r, s].item() * c2[:, s] for s in edges) / math.sqrt(len(edges))
        torch.testing.assert_close(net(x)[:, r], expected, rtol=0, atol=1e-13)


def test_empty_rows_get_exactly_one_edge_back():
    net = LayeredNTKNet.masked_dag(2, [50], 1, drop_prob=0.95, mask_seed=0)
    degrees = net.layers[0].mask.sum(dim=1)
    assert (degrees >= 1).all()
    # with p = 0.95 and 2 inputs most rows are emptied; each refilled row has exactly one edge
    assert (degrees == 1).sum() > 25


def test_mask_stream_is_independent_of_the_weight_stream():
    """Same seed for mask and weights (and torch.manual_seed) must not give correlated draws."""
    seed = 123
    torch.manual_seed(seed)
    net = LayeredNTKNet.masked_dag(256, [256], 1, drop_prob=0.5, mask_seed=seed)
    torch.manual_seed(seed)
    same_stream_mask = (torch.rand(256, 256) >= 0.5).float()
    mask = net.layers[0].mask
    agreement = (mask == same_stream_mask).float().mean().item()
    assert 0.47 < agreement < 0.53  # independent: agree half the time, not always
    weights = net.layers[0].weight.detach().flatten().numpy()
    corr = np.corrcoef(weights, mask.flatten().numpy())[0, 1]
    assert abs(corr) < 0.02
    a = torch.rand(1000, generator=derived_generator(seed, MASK_STREAM))
    b = torch.rand(1000, generator=derived_generator(seed, MASK_STREAM))
    torch.testing.assert_close(a, b)  # but reproducible


def test_seeded_weights_are_reproducible_and_leave_global_rng_alone():
    state = torch.get_rng_state()
    a = LayeredNTKNet.fcn(4, [8], 1, seed=5)
    b = LayeredNTKNet.fcn(4, [8], 1, seed=5)
    torch.set_rng_state(state)
    for la, lb in zip(a.layers, b.layers, strict=True):
        torch.testing.assert_close(la.weight, lb.weight)


# --- DAGs from edge lists (004 Def. 2.1, 2.5, 2.7) -------------------------------------------------

# Like 004 Figure 1(b): inputs x1, x2; the output's longest path has length 4.
FIG1_EDGES = [
    ("x1", "a"),
    ("x2", "a"),
    ("x2", "b"),
    ("a", "c"),
    ("b", "c"),
    ("c", "d"),
    ("x1", "d"),
    ("d", "o"),
    ("a", "o"),
]


def test_from_edges_layers_by_longest_path():
    layout = layer_edges(FIG1_EDGES)
    assert layout.inputs == ("x1", "x2")
    assert layout.outputs == ("o",)
    assert layout.hidden_layers == (("a", "b"), ("c",), ("d",))
    assert layout.distance == {"x1": 0, "x2": 0, "a": 1, "b": 1, "c": 2, "d": 3, "o": 4}
    # c_l = concat(h_{l-1}, ..., h_1, x): written out by hand
    expected = [
        [[1, 1], [0, 1]],  # a <- x1, x2 ; b <- x2           columns (x1, x2)
        [[1, 1, 0, 0]],  # c <- a, b                         columns (a, b, x1, x2)
        [[1, 0, 0, 1, 0]],  # d <- c, x1                     columns (c, a, b, x1, x2)
        [[1, 0, 1, 0, 0, 0]],  # o <- d, a                   columns (d, c, a, b, x1, x2)
    ]
    assert [m.tolist() for m in layout.masks] == expected


def test_from_edges_output_value_by_hand():
    net = LayeredNTKNet.from_edges(FIG1_EDGES).double()
    weight = {}
    rng = np.random.default_rng(0)
    for u, v in FIG1_EDGES:
        weight[(u, v)] = float(rng.normal())
    # place each edge weight where the hand-written masks above say it lives
    positions = {
        ("x1", "a"): (0, 0, 0),
        ("x2", "a"): (0, 0, 1),
        ("x2", "b"): (0, 1, 1),
        ("a", "c"): (1, 0, 0),
        ("b", "c"): (1, 0, 1),
        ("c", "d"): (2, 0, 0),
        ("x1", "d"): (2, 0, 3),
        ("d", "o"): (3, 0, 0),
        ("a", "o"): (3, 0, 2),
    }
    with torch.no_grad():
        for layer in net.layers:
            layer.weight.fill_(100.0)  # masked entries must not matter
        for edge, (l, r, s) in positions.items():
            net.layers[l].weight[r, s] = weight[edge]
    x1, x2 = 0.3, -1.2
    t, w = math.tanh, weight
    a = t((w["x1", "a"] * x1 + w["x2", "a"] * x2) / math.sqrt(2))
    b = t(w["x2", "b"] * x2)
    c = t((w["a", "c"] * a + w["b", "c"] * b) / math.sqrt(2))
    d = t((w["c", "d"] * c + w["x1", "d"] * x1) / math.sqrt(2))
    o = (w["d", "o"] * d + w["a", "o"] * a) / math.sqrt(2)
    out = net(torch.tensor([[x1, x2]], dtype=torch.float64))
    assert out.item() == pytest.approx(o, rel=1e-13)


def test_bottleneck_dag_like_004_figure_3():
    """Two bottleneck neurons of in-degree 1; the width (004 Def. 2.7) is therefore 1."""
    inputs = ["x1", "x2", "x3"]
    first = [f"h{i}" for i in range(4)]
    edges = [(x, h) for x in inputs for h in first]
    edges += [("h0", "b1"), ("h1", "b2")]  # bottleneck neurons
    edges += [(h, g) for h in first for g in ("g1", "g2")]
    edges += [(v, "o") for v in ("b1", "b2", "g1", "g2")]
    net = LayeredNTKNet.from_edges(edges)
    assert net.layout.hidden_layers == (tuple(first), ("b1", "b2", "g1", "g2"))
    assert [d.tolist() for d in net.in_degrees] == [[3, 3, 3, 3], [1, 1, 4, 4], [4]]
    assert net.width == 1
    assert net.depth == 2


def test_early_outputs_go_to_the_output_layer_but_keep_their_distance():
    edges = [("x", "h"), ("h", "g"), ("g", "o1"), ("h", "o2")]
    net = LayeredNTKNet.from_edges(edges, outputs=["o1", "o2"])
    assert net.layout.distance["o2"] == 2 and net.layout.distance["o1"] == 3
    assert net.layout.hidden_layers == (("h",), ("g",))
    assert net.out_features == 2
    assert net.width == 1


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hidden_widths": [0]}, "every hidden width must be a positive integer, got 0"),
        ({"hidden_widths": [8, -3]}, "got -3"),
        ({"hidden_widths": []}, "non-empty"),
        ({"activation": "swish"}, "unknown activation 'swish'; choose one of"),
        ({"in_features": 0}, "in_features must be a positive integer"),
    ],
)
def test_bad_network_arguments(kwargs, match):
    args = {"in_features": 4, "hidden_widths": [8], "out_features": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        LayeredNTKNet(args.pop("in_features"), args.pop("hidden_widths"), **args)


@pytest.mark.parametrize("drop_prob", [-0.1, 1.0, 1.5])
def test_drop_prob_outside_unit_interval(drop_prob):
    with pytest.raises(ValueError, match=r"drop_prob must be in \[0, 1\)"):
        LayeredNTKNet.masked_dag(4, [8], 1, drop_prob=drop_prob)


@pytest.mark.parametrize(
    ("edges", "kwargs", "match"),
    [
        ([("a", "b"), ("b", "c"), ("c", "a"), ("x", "a"), ("c", "o")], {}, "has a cycle"),
        ([("x", "h"), ("h", "h")], {}, "self-loop"),
        ([("x", "h"), ("x", "h"), ("h", "o")], {}, "duplicate edge"),
        ([("x", "h"), ("h", "o"), ("x", "dead")], {"outputs": ["o"]}, "'dead' has no path to an output"),
        ([("x", "h"), ("h", "o"), ("stray", "o")], {"inputs": ["x"]}, "'stray' has no incoming edge"),
        ([("x", "h"), ("h", "o")], {"inputs": ["h"]}, "has incoming edges"),
        ([("x", "o")], {}, "no hidden vertex"),
        ([], {}, "empty"),
        ([("x", "h", "o")], {}, "pair"),
    ],
)
def test_bad_edge_lists(edges, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LayeredNTKNet.from_edges(edges, **kwargs)


def test_cycle_search_starting_downstream_of_the_cycle():
    """'o' is listed first among the vertices that cannot be ordered but only lies downstream of the cycle."""
    edges = [("o2", "o"), ("c", "o"), ("a", "b"), ("b", "c"), ("c", "a"), ("x", "a")]
    with pytest.raises(ValueError, match=r"has a cycle 'c' -> 'a' -> 'b' -> 'c'; it must be acyclic"):
        layer_edges(edges)


def test_input_of_the_wrong_size():
    net = LayeredNTKNet.fcn(4, [8], 1)
    with pytest.raises(ValueError, match=r"expects \(n, in_features=4\)"):
        net(torch.randn(3, 5))


def test_unknown_hidden_layer_lists_valid_ones():
    net = LayeredNTKNet.fcn(4, [8, 8], 1)
    assert net.resolve_hidden_layer("layer_2") == 2 and net.resolve_hidden_layer("layers.0") == 1
    with pytest.raises(ValueError, match=r"valid: 1..2, \['layer_1', 'layer_2'\]"):
        net.resolve_hidden_layer(3)
