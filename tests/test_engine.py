"""The engine of per-module derivative rules (docs/math.md 2.1) against an explicit float64 Jacobian."""

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

from lightning_linearity.metrics.engine import UnsupportedModel, ntk_from_rows, ntk_plan, ntk_rows
from lightning_linearity.metrics.hessian import hessian_spectral_norm
from lightning_linearity.metrics.ntk import empirical_ntk
from lightning_linearity.models import NTKFCN, MaskedDAGNet, NTKDenseNet

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


def jacobian_kernel(model, x, x2=None):
    """J(x) J(x2)^T, J = torch.autograd.functional.jacobian of the flat output w.r.t. the flat parameters."""
    named = [(name, p.detach()) for name, p in model.named_parameters() if p.requires_grad]
    flat = torch.cat([p.reshape(-1) for _, p in named])
    buffers = dict(model.named_buffers())

    def jacobian(inputs):
        def f(vector):
            params, start = {}, 0
            for name, p in named:
                params[name] = vector[start : start + p.numel()].view_as(p)
                start += p.numel()
            return functional_call(model, (params, buffers), (inputs,)).reshape(-1)

        return torch.autograd.functional.jacobian(f, flat)

    jac = jacobian(x)
    return jac @ (jac if x2 is None else jacobian(x2)).T


def assert_relative(actual, expected, rtol=1e-10):
    assert actual.shape == expected.shape
    scale = expected.abs().max()
    assert scale > 0
    assert ((actual - expected).abs().max() / scale).item() <= rtol


def randn(*shape, seed=0):
    return torch.randn(*shape, dtype=F64, generator=torch.Generator().manual_seed(seed))


def engine_kernel(model, x, routes=None, x2=None):
    plan = ntk_plan(model, x, routes=routes)
    rows2 = None if x2 is None else ntk_rows(model, x2, plan)
    return ntk_from_rows(plan, ntk_rows(model, x, plan), rows2), plan


def check(model, x, routes=None):
    """The engine's kernel (every route in ``routes``) equals J J^T; returns the plan."""
    model = model.to(F64).eval()
    kernel, plan = engine_kernel(model, x, routes)
    assert_relative(kernel, jacobian_kernel(model, x))
    assert torch.equal(kernel, kernel.T)
    return plan


def sites(plan):
    return {site.name: (site.kind, site.route) for site in plan.sites}


# ------------------------------------------------------------------------------------------------ Linear
@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_mlp(out, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6, bias=bias), nn.ReLU(),
                          nn.Linear(6, out, bias=bias))  # fmt: skip
    plan = check(model, randn(6, 5))
    assert set(sites(plan).values()) == {("linear", "gram")}


@pytest.mark.parametrize("route", ["gram", "gradient"])
@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_on_sequences_both_routes(route, out, bias):
    class SequenceModel(nn.Module):  # (n, T, d) -> (n, k): positions summed by the mean
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 6, bias=bias)
            self.head = nn.Linear(6, out, bias=bias)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x))).mean(dim=1)

    torch.manual_seed(1)
    plan = check(SequenceModel(), randn(5, 3, 4), routes={"inner": route, "head": route})
    assert sites(plan) == {"inner": ("linear", route), "head": ("linear", route)}


def test_linear_on_more_leading_dimensions_and_reused_module():
    class Shared(nn.Module):  # one Linear called twice (weight sharing) on (n, A, B, d) inputs
        def __init__(self):
            super().__init__()
            self.shared = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = self.shared(torch.tanh(self.shared(x)))
            return self.head(h).sum(dim=(1, 2))

    torch.manual_seed(2)
    for route in ("gram", "gradient"):
        check(Shared(), randn(4, 2, 3, 3), routes={"shared": route})


# -------------------------------------------------------------------------------------------- convolutions
CONVS = [
    (nn.Conv1d, dict(kernel_size=3, stride=2, padding=1), (7,)),
    (nn.Conv1d, dict(kernel_size=2, dilation=2, groups=2, padding="same"), (6,)),
    (nn.Conv2d, dict(kernel_size=3, stride=2, padding=1, dilation=1), (7, 6)),
    (nn.Conv2d, dict(kernel_size=(3, 2), stride=(1, 2), padding=(2, 1), dilation=(2, 1), groups=2), (6, 5)),
    (nn.Conv2d, dict(kernel_size=3, padding=1, padding_mode="reflect"), (5, 5)),
    (nn.Conv2d, dict(kernel_size=2, padding=1, padding_mode="circular", groups=4), (4, 4)),
    (nn.Conv3d, dict(kernel_size=2, stride=(1, 2, 1), padding=1, groups=2), (3, 4, 3)),
    (nn.Conv3d, dict(kernel_size=(1, 2, 2), dilation=(1, 2, 1), padding="same", padding_mode="replicate"),
     (3, 4, 3)),
]  # fmt: skip


@pytest.mark.parametrize("conv, options, size", CONVS)
@pytest.mark.parametrize("out", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
def test_convolutions_both_routes(conv, options, size, out, bias):
    torch.manual_seed(3)
    model = nn.Sequential(conv(4, 4, bias=bias, **options), nn.Tanh(), nn.Flatten()).to(F64)
    x = randn(3, 4, *size)
    model.append(nn.Linear(model(x).shape[1], out))
    for route in ("gram", "gradient"):
        plan = check(model, x, routes={"0": route})
        assert sites(plan)["0"] == ("conv", route)


def test_cnn_with_pooling_and_reused_conv():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.head = nn.Linear(3, 2)

        def forward(self, x):
            h = torch.relu(self.conv(torch.relu(self.conv(x))))  # the same conv twice
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(4)
    for route in ("gram", "gradient"):
        check(Net(), randn(4, 3, 5, 5), routes={"conv": route})


# ---------------------------------------------------------------------------- embeddings, normalisations
@pytest.mark.parametrize("out", [1, 3])
def test_embedding_with_integer_inputs(out):
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(7, 5, padding_idx=0)
            self.norm = nn.LayerNorm(5)
            self.head = nn.Linear(5, out)

        def forward(self, ids):
            return self.head(self.norm(self.embed(ids))).mean(dim=1)

    torch.manual_seed(5)
    ids = torch.randint(0, 7, (5, 4), generator=torch.Generator().manual_seed(0))
    ids[0, 0] = 0  # a padding position, no gradient there
    plan = check(Tokens(), ids)
    assert sites(plan) == {
        "embed": ("embedding", "gram"), "norm": ("norm_affine", "gradient"), "head": ("linear", "gradient"),
    }  # fmt: skip


@pytest.mark.parametrize(
    "norm, shape",
    [(nn.LayerNorm(6), (6,)), (nn.LayerNorm((3, 2), bias=False), (3, 2)), (nn.RMSNorm(6), (6,)),
     (nn.GroupNorm(2, 6), (6, 3)), (nn.BatchNorm1d(6), (6,)), (nn.BatchNorm1d(6), (6, 3)),
     (nn.BatchNorm2d(6), (6, 2, 2)), (nn.BatchNorm3d(6), (6, 2, 1, 2))],
)  # fmt: skip
@pytest.mark.parametrize("out", [1, 3])
def test_norm_affine_weights(norm, shape, out):
    torch.manual_seed(6)
    with torch.no_grad():  # affine weights and running statistics away from their trivial values
        for tensor in [*norm.parameters(), *(b for b in norm.buffers() if b.is_floating_point())]:
            tensor.uniform_(0.5, 1.5)
    model = nn.Sequential(nn.Tanh(), norm, nn.Flatten(), nn.Linear(torch.Size(shape).numel(), out))
    x = randn(4, *shape)
    plan = check(nn.Sequential(nn.Linear(shape[-1], shape[-1]), *model), x)  # a trainable layer before it
    assert sites(plan)["2"] == ("norm_affine", "gradient")


# --------------------------------------------------------------------------------- fallback, mixtures
class Scale(nn.Module):
    """A custom layer with its own parameter: the torch.func fallback rule."""

    def __init__(self, size):
        super().__init__()
        self.gain = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, x):
        return x * self.gain + torch.sin(x) * self.gain**2


@pytest.mark.parametrize("out", [1, 3])
def test_model_mixing_known_and_unknown_layers(out):
    torch.manual_seed(7)
    scale = Scale(6)
    model = nn.Sequential(nn.Linear(4, 6), scale, nn.Tanh(), nn.Linear(6, 6), scale, nn.Linear(6, out))
    plan = check(model, randn(5, 4))  # the custom layer is called twice
    assert sites(plan)["1"] == ("torch.func", "gradient")


def test_module_whose_child_is_not_called_is_one_fallback():
    class Attention(nn.Module):  # MultiheadAttention reads out_proj.weight without calling out_proj
        def __init__(self):
            super().__init__()
            self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.attention(x, x, x, need_weights=False)[0].mean(dim=1))

    torch.manual_seed(8)
    plan = check(Attention(), randn(3, 5, 4))
    assert sites(plan) == {"attention": ("torch.func", "gradient"), "head": ("linear", "gram")}


def test_frozen_parameters_are_not_part_of_w():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Unflatten(1, (1, 5)), nn.Conv1d(1, 2, 2),
                          nn.Flatten(), nn.Linear(8, 3))  # fmt: skip
    model[0].weight.requires_grad_(False)
    model[3].weight.requires_grad_(False)  # only the conv's bias stays
    model[5].bias.requires_grad_(False)
    plan = check(model, randn(5, 4))
    assert [sorted(site.params) for site in plan.sites] == [["bias"], ["bias"], ["weight"]]


def test_cross_kernel():
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3), Scale(3))
    model = model.to(F64).eval()
    x, x2 = randn(4, 2, 4), randn(3, 2, 4, seed=1)
    kernel, _ = engine_kernel(model, x, x2=x2)
    assert_relative(kernel, jacobian_kernel(model, x, x2))
    assert_relative(empirical_ntk(model, x, x2), jacobian_kernel(model, x, x2))


def test_rows_of_shares_assemble_the_whole_kernel():
    # what DDP ranks do: rows for their own probe points, gathered, assembled on any rank
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.GroupNorm(1, 3), nn.Flatten(), nn.Linear(12, 3),
                          Scale(3)).to(F64).eval()  # fmt: skip
    x = randn(7, 2, 3, 3)
    plan = ntk_plan(model, x)
    rows = torch.cat([ntk_rows(model, part, plan) for part in (x[:3], x[3:5], x[5:])])
    assert rows.shape == (7, plan.row_size)
    assert_relative(ntk_from_rows(plan, rows), jacobian_kernel(model, x))
    assert_relative(ntk_from_rows(plan, rows[:3], rows[3:]), jacobian_kernel(model, x[:3], x[3:]))
    with pytest.raises(ValueError, match="rows must have shape"):
        ntk_from_rows(plan, rows[:, 1:])


# ----------------------------------------------------------------------------------- package networks
@pytest.mark.parametrize(
    "model",
    [NTKFCN(4, 3, widths=[6, 5], bias=True, init_seed=1), NTKDenseNet(4, 3, widths=[6, 5], init_seed=2),
     MaskedDAGNet(4, 3, widths=[6, 5], drop_prob=0.5, bias=True, init_seed=3, mask_seed=4)],
    ids=["fcn", "densenet", "masked"],
)  # fmt: skip
def test_package_networks_through_the_ntk_linear_rule_equal_the_structured_path(model):
    model = model.to(F64)
    x = randn(6, 4)
    structured = empirical_ntk(model, x, method="structured")
    engine = empirical_ntk(model, x, method="engine")
    plan = ntk_plan(model, x)
    assert {kind for kind, _ in sites(plan).values()} == {"ntk_linear"}
    assert_relative(engine, structured, 1e-12)
    assert_relative(engine, jacobian_kernel(model, x))


# ------------------------------------------------------------------------------------ dispatch, checks
def test_auto_uses_the_engine_for_foreign_models_and_equals_generic():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.LayerNorm(5), nn.Linear(5, 2)).to(F64)
    x = randn(4, 3)
    assert_relative(empirical_ntk(model, x), empirical_ntk(model, x, method="generic"), 1e-12)


def test_models_mixing_probe_points_are_left_to_the_generic_path():
    class Centre(nn.Module):  # subtracts the batch mean: the output of a point depends on the others
        def forward(self, x):
            return x - x.mean(dim=0, keepdim=True)

    torch.manual_seed(13)
    model = nn.Sequential(nn.Linear(3, 4), Centre(), nn.Linear(4, 2)).to(F64)
    x = randn(5, 3)
    with pytest.raises(ValueError, match="treats probe points independently"):
        empirical_ntk(model, x, method="engine")
    assert_relative(empirical_ntk(model, x), empirical_ntk(model, x, method="generic"), 0.0)

    batch_norm = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(F64).train()
    with pytest.raises(ValueError, match=r"batch statistics.*model.eval\(\)"):
        ntk_plan(batch_norm, x)
    with pytest.raises(UnsupportedModel, match="random in training mode"):
        ntk_plan(nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).to(F64), x)


def test_tied_parameters_and_parameters_used_outside_their_module():
    torch.manual_seed(14)
    tied = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3)).to(F64)
    tied[2].weight = tied[0].weight
    x = randn(4, 3)
    with pytest.raises(UnsupportedModel, match="tied weights"):
        ntk_plan(tied, x)
    assert_relative(empirical_ntk(tied, x), jacobian_kernel(tied, x))
    # the Hessian sees the tie too: one weight used by both layers, against the dense Hessian of f_a
    weight, first_bias, last_bias = tied[0].weight.detach(), tied[0].bias.detach(), tied[2].bias.detach()

    def output(flat, a):
        w, b0, b2 = flat[:9].reshape(3, 3), flat[9:12], flat[12:]
        return (torch.tanh(x[:1] @ w.T + b0) @ w.T + b2)[0, a]

    flat = torch.cat([weight.reshape(-1), first_bias, last_bias])
    dense = [
        torch.linalg.eigvalsh(torch.autograd.functional.hessian(lambda v, a=a: output(v, a), flat))
        for a in range(3)
    ]
    expected = torch.stack([values.abs().max() for values in dense]).unsqueeze(0)
    assert_relative(hessian_spectral_norm(tied, x[:1]), expected, 1e-8)

    class Sneaky(nn.Module):  # reads inner.weight itself as well as through inner's forward
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)

        def forward(self, x):
            return self.inner(x) + x @ self.inner.weight

    sneaky = Sneaky().to(F64)
    with pytest.raises(UnsupportedModel, match="disagrees with autograd"):
        ntk_plan(sneaky, x)
    assert_relative(empirical_ntk(sneaky, x), jacobian_kernel(sneaky, x))


def test_bad_arguments():
    model = nn.Sequential(nn.Linear(3, 2)).to(F64)
    x = randn(4, 3)
    with pytest.raises(ValueError, match="method must be"):
        empirical_ntk(model, x, method="fast")
    with pytest.raises(ValueError, match=r"routes\['0'\] must be one of"):
        ntk_plan(model, x, routes={"0": "diagonal"})
    with pytest.raises(ValueError, match="routes names no site"):
        ntk_plan(model, x, routes={"missing": "gram"})
    with pytest.raises(ValueError, match="could not be evaluated"):
        empirical_ntk(model, randn(4, 5), method="engine")


def test_model_state_untouched():
    torch.manual_seed(15)
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.BatchNorm1d(2), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(6, 2), Scale(2)).to(F64)  # fmt: skip
    model.eval()
    model[1].train()  # a BatchNorm in training mode: the engine refuses it, nothing is changed either way
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    x = randn(5, 1, 4)
    rng = torch.get_rng_state()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for eval_mode in (False, True):
            model[1].train(not eval_mode)
            modes = [m.training for m in model.modules()]
            if eval_mode:
                empirical_ntk(model, x, method="engine")
            else:
                with pytest.raises(ValueError):
                    empirical_ntk(model, x, method="engine")
            assert [m.training for m in model.modules()] == modes
    assert torch.equal(torch.get_rng_state(), rng)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters())


def test_sequence_first_layouts_and_parametrised_weights():
    class SequenceFirst(nn.Module):  # a Linear applied to (T, n, d): dimension 0 is not the probe points
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(torch.tanh(self.inner(x.transpose(0, 1))).mean(dim=0))

    torch.manual_seed(16)
    model = SequenceFirst()
    plan = check(model, randn(4, 5, 3))  # no module sees the probe points in dimension 0 but the model
    assert sites(plan) == {"": ("torch.func", "gradient")}

    # parameters read through torch.nn.utils.parametrize: the parametrised layer is one fallback
    weight_normed = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    nn.utils.parametrizations.weight_norm(weight_normed[2])
    plan = check(weight_normed, randn(5, 3))
    assert sites(plan) == {"0": ("linear", "gram"), "2": ("torch.func", "gradient")}


def test_symmetric_gradient_gram_in_blocks():
    from lightning_linearity.metrics.engine._base import gradient_kernel

    g = randn(9, 2, 2**17)  # large enough for the blocked product of the symmetric kernel
    expected = torch.einsum("iap,jbp->iajb", g, g)
    assert_relative(gradient_kernel(g, g, symmetric=True), expected, 1e-13)
    assert_relative(gradient_kernel(g[:4], g[4:]), expected[:4, :, 4:], 1e-13)


def test_fallback_module_that_vmap_cannot_batch_runs_probe_by_probe():
    class Branching(nn.Module):  # data-dependent control flow: vmap refuses it, the loop over probes does not
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.linspace(0.5, 1.5, 4))

        def forward(self, x):
            if bool((x.sum(dim=-1) > -100).all()):
                return torch.tanh(x * self.gain)
            return x

    torch.manual_seed(17)
    plan = check(nn.Sequential(nn.Linear(3, 4), Branching(), nn.Linear(4, 2)), randn(4, 3))
    assert sites(plan)["1"] == ("torch.func", "gradient")
