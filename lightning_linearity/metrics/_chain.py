"""A user's chain of ``nn.Linear`` layers and elementwise activations as a layered network (docs/math.md 3).

A model whose forward pass is

    c_1 = x (flattened by a leading ``nn.Flatten``),   z_l = W_l c_l + b_l,   c_{l+1} = sigma_l(z_l),
    f = z_{L+1},

(an ``nn.Sequential`` such as ``Linear, ReLU, Linear, Tanh, Linear``, or any module whose forward calls
exactly those modules in that order) is a layered network with scaling s_l = 1, no masks and one
activation sigma_l per hidden layer: the composition of the elementwise modules called between Linear l and
Linear l+1 (the identity where there are none). Its Hessian-vector products are then the closed-form
subspace products of :mod:`~lightning_linearity.metrics._structured_hessian`, fed by
:meth:`LinearChain.forms` and :meth:`LinearChain.hessian_pass`.

Elementwise modules recognised, with sigma' and sigma'' in closed form: ``ReLU``, ``LeakyReLU``, ``ELU``,
``Tanh``, ``Sigmoid``, ``Softplus`` (its ``beta`` and ``threshold``), ``GELU`` (exact and ``"tanh"``),
``SiLU``, ``Identity``, and ``Dropout`` in eval mode (the identity there). At their kinks they follow
autograd, so the fast path equals the generic one and the dense Hessian there too: ReLU has sigma'(0) = 0,
LeakyReLU sigma'(0) = negative_slope, ELU sigma'(0) = alpha but sigma''(0) = 0, Softplus is linear where
beta z > threshold (sigma'' = 0 from beta z = threshold on). ReLU and LeakyReLU have sigma'' = 0, so their
Hessian is the pure cross term (the products of docs/math.md 2.4 without the sigma'' term).

:func:`linear_chain` finds the chain from the modules called in one forward pass on the first probe point
and accepts it only if it reproduces the model: the outputs on the first two probe points, and one
Hessian-vector product on the first probe point against autograd (forward-over-reverse through the model
itself). A skip connection, a functional op in ``forward``, any other module (BatchNorm, dropout, a
convolution), a Linear called twice, tied or frozen parameters, or parameters outside the Linear layers
make it refuse, with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, jvp
from torch.nn.utils import parametrize

from lightning_linearity.metrics._functional import functional_model, trainable_parameters
from lightning_linearity.metrics._structured_hessian import LayeredPass, LayerForm, StructuredHessian
from lightning_linearity.nets.activations import ACTIVATIONS, Activation

_TANH_GELU_SCALE, _TANH_GELU_CUBIC = math.sqrt(2.0 / math.pi), 0.044715


def _leaky_relu(module: nn.LeakyReLU) -> Activation:
    slope = module.negative_slope
    return Activation(
        "leaky_relu",
        lambda z: F.leaky_relu(z, slope),
        lambda z: torch.where(z > 0, 1.0, slope).to(z.dtype),
        torch.zeros_like,
    )


def _elu(module: nn.ELU) -> Activation:
    alpha = module.alpha
    return Activation(
        "elu",
        lambda z: F.elu(z, alpha),
        lambda z: torch.where(z > 0, 1.0, alpha * torch.exp(z.clamp(max=0))),
        lambda z: torch.where(z < 0, alpha * torch.exp(z.clamp(max=0)), 0.0),
    )


def _softplus(module: nn.Softplus) -> Activation:
    beta, threshold = module.beta, module.threshold

    def slope(z: Tensor) -> Tensor:
        return torch.where(beta * z > threshold, 1.0, torch.sigmoid(beta * z))

    def curvature(z: Tensor) -> Tensor:
        s = torch.sigmoid(beta * z)
        return torch.where(beta * z < threshold, beta * s * (1.0 - s), 0.0)

    return Activation("softplus", lambda z: F.softplus(z, beta, threshold), slope, curvature)


def _silu_slope(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


def _silu_curvature(z: Tensor) -> Tensor:
    s = torch.sigmoid(z)
    return s * (1.0 - s) * (2.0 + z * (1.0 - 2.0 * s))


def _tanh_gelu_parts(z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """t = tanh(u), u' and u'' for u = k (z + a z^3), the argument of the tanh approximation of GELU."""
    t = torch.tanh(_TANH_GELU_SCALE * (z + _TANH_GELU_CUBIC * z**3))
    du = _TANH_GELU_SCALE * (1.0 + 3.0 * _TANH_GELU_CUBIC * z * z)
    return t, du, _TANH_GELU_SCALE * 6.0 * _TANH_GELU_CUBIC * z


def _tanh_gelu_slope(z: Tensor) -> Tensor:
    # d/dz z (1 + t) / 2 = (1 + t) / 2 + z (1 - t^2) u' / 2
    t, du, _ = _tanh_gelu_parts(z)
    return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * du


def _tanh_gelu_curvature(z: Tensor) -> Tensor:
    # (1 - t^2) u' + z/2 (1 - t^2) (u'' - 2 t u'^2)
    t, du, ddu = _tanh_gelu_parts(z)
    sech2 = 1.0 - t * t
    return sech2 * du + 0.5 * z * sech2 * (ddu - 2.0 * t * du * du)


def _gelu(module: nn.GELU) -> Activation:
    if module.approximate == "tanh":
        return Activation(
            "gelu_tanh", lambda z: F.gelu(z, approximate="tanh"), _tanh_gelu_slope, _tanh_gelu_curvature
        )
    exact = ACTIVATIONS["gelu"]
    return Activation("gelu", F.gelu, exact.derivative, exact.second_derivative)


#: sigma, sigma', sigma'' of each recognised elementwise module (exact types: a subclass may change forward)
ELEMENTWISE: dict[type[nn.Module], Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda _: ACTIVATIONS["relu"],
    nn.Tanh: lambda _: ACTIVATIONS["tanh"],
    nn.Sigmoid: lambda _: ACTIVATIONS["sigmoid"],
    nn.Identity: lambda _: ACTIVATIONS["identity"],
    nn.LeakyReLU: _leaky_relu,
    nn.ELU: _elu,
    nn.Softplus: _softplus,
    nn.GELU: _gelu,
    nn.SiLU: lambda _: Activation("silu", F.silu, _silu_slope, _silu_curvature),
}


def _elementwise(module: nn.Module) -> Activation | None:
    """sigma of a recognised elementwise module (``nn.Dropout`` in eval mode or with p = 0: the identity)."""
    if type(module) is nn.Dropout and (not module.training or module.p == 0):
        return ACTIVATIONS["identity"]
    factory = ELEMENTWISE.get(type(module))
    return None if factory is None else factory(module)


def compose(outer: Activation, inner: Activation) -> Activation:
    """outer∘inner: (o∘i)' = o'(i) i',  (o∘i)'' = o''(i) i'^2 + o'(i) i'' (the identity drops out)."""
    if inner.name == "identity" or outer.name == "identity":
        return outer if inner.name == "identity" else inner

    def slope(z: Tensor) -> Tensor:
        return outer.derivative(inner.fn(z)) * inner.derivative(z)

    def curvature(z: Tensor) -> Tensor:
        h, d = inner.fn(z), inner.derivative(z)
        return outer.second_derivative(h) * d * d + outer.derivative(h) * inner.second_derivative(z)

    return Activation(f"{outer.name}∘{inner.name}", lambda z: outer.fn(inner.fn(z)), slope, curvature)


@dataclass(frozen=True)
class LinearChain:
    """Linear layers 1..L+1 (module names and modules, in call order) with sigma_1..sigma_L between them."""

    names: tuple[str, ...]
    linears: tuple[nn.Linear, ...]
    activations: tuple[Activation, ...]
    flatten: bool

    @property
    def depth(self) -> int:
        """L, the number of hidden layers."""
        return len(self.activations)

    def layer_index(self, name: str) -> int | None:
        """l (1-based) if ``name`` is the l-th Linear (its output is z_l), else ``None``."""
        return self.names.index(name) + 1 if name in self.names else None

    def width(self, top: int) -> int:
        """m_top, the number of functions z_top[r]."""
        return self.linears[top - 1].out_features

    def forms(self, top: int) -> list[LayerForm]:
        """Layers 1..``top``: W̃_l = W_l, s_l = 1, c_l = h_{l-1}."""
        return [
            LayerForm(
                linear.weight, 1.0, None, linear.bias is not None, [(l - 1, slice(None))] if l > 1 else []
            )
            for l, linear in enumerate(self.linears[:top], start=1)
        ]

    def hessian_pass(self, x: Tensor, top: int, seed: Tensor) -> LayeredPass:
        """Forward pass to z_top and backpropagation of F_a = seed[a] . z_top on the probes ``x``:

        dF/dz_top = seed,   dF/dh_l = dF/dz_{l+1} W_{l+1},   dF/dz_l = dF/dh_l ∘ sigma_l'(z_l).
        """
        with torch.no_grad():
            c = x.flatten(1) if self.flatten else x
            inputs, slopes, curvatures = [], [], []
            for l, linear in enumerate(self.linears[:top], start=1):
                inputs.append(c)
                z = F.linear(c, linear.weight, linear.bias)
                if l < top:
                    sigma = self.activations[l - 1]
                    slopes.append(sigma.derivative(z))
                    curvatures.append(sigma.second_derivative(z))
                    c = sigma.fn(z)
            deltas = [seed.expand(x.shape[0], *seed.shape)]
            posts = []
            for l in range(top - 1, 0, -1):
                posts.append(deltas[-1] @ self.linears[l].weight)
                deltas.append(posts[-1] * slopes[l - 1].unsqueeze(1))
        return LayeredPass(inputs, deltas[::-1], posts[::-1], slopes, curvatures)

    def output(self, x: Tensor) -> Tensor:
        """f = z_{L+1} on the probes ``x`` (no autograd)."""
        with torch.no_grad():
            c = x.flatten(1) if self.flatten else x
            for linear, sigma in zip(self.linears, (*self.activations, None), strict=True):
                c = F.linear(c, linear.weight, linear.bias)
                c = c if sigma is None else sigma.fn(c)
        return c


def linear_chain(model: nn.Module, x: Tensor) -> LinearChain | str:
    """The chain of ``model`` if its forward pass on the probes ``x`` is one (see the module docstring),
    else the reason why not (one phrase)."""
    called = _called_leaves(model, x[:1])
    names = {id(module): name for name, module in model.named_modules()}
    flatten = bool(called) and type(called[0]) is nn.Flatten
    if flatten:
        first = called.pop(0)
        if (first.start_dim, first.end_dim) != (1, -1):
            return "its nn.Flatten does not flatten dimensions 1..-1"
    elif x.dim() != 2:
        return f"its first layer sees inputs of shape {tuple(x.shape[1:])} per probe, not vectors"
    linears: list[nn.Linear] = []
    activations: list[Activation] = []
    pending: Activation | None = None
    for module in called:
        sigma = _elementwise(module)
        if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
            if parametrize.is_parametrized(module):
                return f"{names[id(module)]} (nn.Linear) is parametrized"
            if any(module is seen for seen in linears):
                return f"{names[id(module)]} (nn.Linear) is called twice"
            if linears:
                activations.append(ACTIVATIONS["identity"] if pending is None else pending)
            linears.append(module)
            pending = None
        elif sigma is not None and linears:
            pending = sigma if pending is None else compose(sigma, pending)
        else:
            where = "in the chain" if sigma is None else "before the first nn.Linear"
            return f"{names.get(id(module), '?')} ({type(module).__name__}) is {where}"
    if not linears:
        return "it calls no nn.Linear"
    if pending is not None and pending.name != "identity":
        return "its output passes through an activation after the last nn.Linear"
    reason = _parameter_mismatch(model, linears, names)
    if reason is not None:
        return reason
    chain = LinearChain(tuple(names[id(m)] for m in linears), tuple(linears), tuple(activations), flatten)
    return _reproduction_mismatch(model, chain, x) or chain


def _called_leaves(model: nn.Module, x: Tensor) -> list[nn.Module]:
    """The modules without submodules called in one forward pass on ``x``, in call order (a functional pass:
    normalisation layers in training mode update copies of their running statistics)."""
    calls: list[nn.Module] = []
    leaves = [module for module in model.modules() if next(module.children(), None) is None]
    handles = [leaf.register_forward_pre_hook(lambda module, _: calls.append(module)) for leaf in leaves]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            functional_model(model)(trainable_parameters(model), x)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _parameter_mismatch(model: nn.Module, linears: list[nn.Linear], names: dict[int, str]) -> str | None:
    """Why w (the trainable parameters) is not exactly the weights and biases of the chain's Linears."""
    own = [p for linear in linears for p in (linear.weight, linear.bias) if p is not None]
    if len({id(p) for p in own}) < len(own):
        return "its Linear layers share (tie) parameters"
    frozen = [
        names[id(linear)] for linear in linears if not all(p.requires_grad for p in linear.parameters())
    ]
    if frozen:
        return f"{', '.join(frozen)} {'has' if len(frozen) == 1 else 'have'} frozen parameters"
    chain = {id(p) for p in own}
    outside = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in chain]
    if outside:
        return f"it has trainable parameters outside its Linear layers ({', '.join(outside)})"
    return None


def _reproduction_mismatch(model: nn.Module, chain: LinearChain, x: Tensor) -> str | None:
    """Why the chain is not the model: its outputs on the first two probe points, or one Hessian-vector
    product on the first (a random function u . f and a random direction E(v) of the subspace) differ
    from the model's by more than 10 sqrt(eps) relative."""
    params = trainable_parameters(model)
    f = functional_model(model)
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        expected = f(params, x[:2])
    mismatch = "its output is not that of the chain of its Linear layers and activations (skip connection?)"
    try:
        found = chain.output(x[:2])
    except RuntimeError:  # shapes that only a reshape between the layers makes fit
        return mismatch
    tol = 10 * torch.finfo(found.dtype).eps ** 0.5
    if found.shape != expected.shape or not _close(found, expected, tol):
        return mismatch
    generator = torch.Generator(device=x.device).manual_seed(0)
    seed = torch.randn(1, found.shape[1], generator=generator, device=x.device, dtype=found.dtype)
    top = chain.depth + 1
    operator = StructuredHessian(chain.forms(top), chain.hessian_pass(x[:1], top, seed))
    v = torch.randn(1, operator.dim, generator=generator, device=x.device, dtype=found.dtype)
    active = torch.arange(1, device=x.device)
    direction = operator.tangents(v)
    product = operator.tangents(operator.matvec(v, active))
    tangent, structured = {}, {}
    for name, linear, (weight, bias), (h_weight, h_bias) in zip(
        chain.names, chain.linears, direction, product, strict=True
    ):
        prefix = f"{name}." if name else ""
        tangent[prefix + "weight"], structured[prefix + "weight"] = weight[0], h_weight[0]
        if linear.bias is not None:
            tangent[prefix + "bias"], structured[prefix + "bias"] = bias[0], h_bias[0]
    tangent = {key: tangent[key] for key in params}

    def function(p: dict[str, Tensor]) -> Tensor:
        return f(p, x[:1])[0] @ seed[0]

    with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        autograd = jvp(grad(function), (params,), (tangent,))[1]
    flat = torch.cat([structured[key].reshape(-1) for key in params])
    reference = torch.cat([autograd[key].reshape(-1) for key in params])
    if not _close(flat, reference, tol):
        return "its Hessian-vector product differs from autograd's (a parameter used outside its Linear?)"
    return None


def _close(found: Tensor, expected: Tensor, tol: float) -> bool:
    scale = max(found.norm().item(), expected.norm().item())
    return (found - expected).norm().item() <= tol * scale
