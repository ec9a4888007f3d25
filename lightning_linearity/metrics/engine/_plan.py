"""Which rule takes which module, the factor rows of the probe points, and K from them (docs/math.md 2.1)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.nn.modules.dropout import _DropoutNd
from torch.utils import _pytree as pytree

from lightning_linearity._text import short_repr
from lightning_linearity.metrics._functional import (
    as_2d_output,
    check_output,
    evaluation_error,
    trainable_parameters,
)
from lightning_linearity.metrics.engine._base import Call, Rule
from lightning_linearity.metrics.engine._conv import CONV_TYPES, ConvRule
from lightning_linearity.metrics.engine._fallback import FallbackRule
from lightning_linearity.metrics.engine._linear import EmbeddingRule, LinearRule, exact_index_limit
from lightning_linearity.metrics.engine._norm import NORM_TYPES, NormAffineRule, is_sample_wise
from lightning_linearity.metrics.engine._ntk_linear import NTKLinearRule
from lightning_linearity.metrics.engine._trace import record
from lightning_linearity.nets.layers import NTKLinear

T = TypeVar("T")


class UnsupportedModel(ValueError):
    """The engine cannot take this model (the message says why); the generic path can."""


def unless_unsupported(compute: Callable[[], T], *, required: bool) -> T | None:
    """``compute()``, or ``None`` if the engine refuses the model and ``required`` is False (the caller then
    takes the generic path); with ``required`` (``method="engine"``) the refusal is a one-line ValueError."""
    try:
        return compute()
    except UnsupportedModel as err:
        if required:
            raise ValueError(
                f"method='engine' cannot handle this model: {err}. Use method='generic'."
            ) from err
        return None


@dataclass
class NTKPlan:
    """The engine's plan for a model: one rule per site, its route, and the layout of a factor row.

    Attributes:
        model: the model planned for.
        sites: the rules, each owning the trainable parameters of one module (or of a whole subtree).
        shapes: per site, the per-probe shapes of its factors (a row is all of them, flattened, in order).
        k: the number of outputs.
        dtype: the dtype of the factors (the model output's).
    """

    model: nn.Module
    sites: list[Rule]
    shapes: list[list[tuple[int, ...]]]
    k: int
    dtype: torch.dtype

    @property
    def batched_backward(self) -> bool:
        """See :func:`batched_backward`."""
        return batched_backward(self.sites)

    @property
    def row_size(self) -> int:
        """Entries in the factor row of one probe point."""
        return sum(math.prod(shape) for shapes in self.shapes for shape in shapes)

    def describe(self) -> str:
        """One line per site: module, rule, route chosen and the estimated flops of the routes."""
        return "\n".join(site.describe() for site in self.sites)


def batched_backward(sites: list[Rule]) -> bool:
    """One backward pass batched over the outputs, except for models with convolutions (on CPU k plain
    passes are faster there: 0.54 s vs 0.59 s for the benchmark CNN, while batching saves 17% on MLPs)."""
    return not any(isinstance(site, ConvRule) for site in sites)


def _standard_forward(module: nn.Module, bases: tuple[type, ...]) -> bool:
    return any(isinstance(module, base) and type(module).forward is base.forward for base in bases)


def _rule_class(module: nn.Module, params: set[str], calls: int, input_dim: int) -> type[Rule]:
    """The rule of a module with trainable parameters ``params`` of its own (called ``calls`` times)."""
    if not params <= {"weight", "bias"}:  # e.g. weight_g / weight_v of a weight-normed layer
        return FallbackRule
    if _standard_forward(module, (NTKLinear,)):
        return NTKLinearRule if calls == 1 and input_dim == 2 else FallbackRule
    if _standard_forward(module, (nn.Linear,)):
        return LinearRule
    if _standard_forward(module, CONV_TYPES):
        return ConvRule
    if _standard_forward(module, (nn.Embedding,)):
        plain = module.max_norm is None and not module.scale_grad_by_freq
        return EmbeddingRule if plain else FallbackRule
    if _standard_forward(module, NORM_TYPES):
        return NormAffineRule
    return FallbackRule


def sample_mixing_reason(model: nn.Module) -> str | None:
    """Why the forward pass of ``model`` is not a function of each probe point alone, if it is not."""
    for name, module in model.named_modules():
        if not is_sample_wise(module):
            return (
                f"{name or type(model).__name__} ({type(module).__name__}) normalises by batch statistics "
                f"(training mode or no running statistics), which mixes probe points; call model.eval()"
            )
        if isinstance(module, _DropoutNd | nn.AlphaDropout) and module.training and module.p > 0:
            return f"{name} ({type(module).__name__}) is random in training mode; call model.eval()"
    return None


def _called_modules(model: nn.Module, x: Tensor) -> dict[nn.Module, tuple[int, int]]:
    """Per module called with the probe points (a tensor argument of leading dimension ``len(x)``) in one
    forward pass on ``x``: (times called, dimension of its first argument in the first call)."""
    seen: dict[nn.Module, tuple[int, int]] = {}
    n = x.shape[0]

    def count(module: nn.Module, args: tuple, kwargs: dict) -> None:
        leaves = pytree.tree_leaves((args, kwargs))
        if not any(isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in leaves):
            return
        calls, dim = seen.get(module, (0, -1))
        first = args[0].dim() if args and isinstance(args[0], Tensor) else -1
        seen[module] = (calls + 1, dim if calls else first)

    handles = [module.register_forward_pre_hook(count, with_kwargs=True) for module in model.modules()]
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _sites(model: nn.Module, x: Tensor) -> list[Rule]:
    """One rule per module owning trainable parameters; a subtree fallback where parameters are read
    without their module's forward being called on the probe points (``nn.MultiheadAttention.out_proj``;
    the parametrisations of ``torch.nn.utils.parametrize``)."""
    named = dict(model.named_modules())
    owner: dict[int, str] = {}
    own: dict[str, dict[str, nn.Parameter]] = {}
    for name, module in named.items():
        params = {p_name: p for p_name, p in module.named_parameters(recurse=False) if p.requires_grad}
        for p_name, p in params.items():
            if id(p) in owner:
                raise UnsupportedModel(
                    f"parameter {name}.{p_name} is shared with {owner[id(p)]} (tied weights): the per-module "
                    f"kernel blocks would miss the cross terms"
                )
            owner[id(p)] = f"{name}.{p_name}"
        if params:
            own[name] = params
    called = _called_modules(model, x)
    subtrees: set[str] = set()
    for name in own:
        if named[name] not in called:
            ancestor = name
            while ancestor and named[ancestor] not in called:
                ancestor = ancestor.rpartition(".")[0]
            subtrees.add(ancestor)

    def inside(name: str, root: str) -> bool:
        return root == "" or name == root or name.startswith(root + ".")

    roots = {r for r in subtrees if not any(o != r and inside(r, o) for o in subtrees)}
    sites: list[Rule] = []
    for root in sorted(roots):
        params = {p_name: p for p_name, p in named[root].named_parameters() if p.requires_grad}
        sites.append(FallbackRule(root, named[root], params))
    for name, params in own.items():
        if any(inside(name, root) for root in roots):
            continue
        module = named[name]
        calls, dim = called[module]
        rule = _rule_class(module, set(params), calls, dim)
        if rule is EmbeddingRule and module.num_embeddings > exact_index_limit(module.weight.dtype):
            rule = FallbackRule
        sites.append(rule(name, module, params))
    return sites


def _forward(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` as (n, k) without autograd (the model's own parameters: ``functional_call`` would not
    restore a submodule used under two names); clear errors for a bad input or a non-finite output."""
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
            out = as_2d_output(model(x), x.shape[0])
    except (RuntimeError, ValueError) as err:
        raise evaluation_error(model, x, err) from err
    return check_output(model, x, out)


def _check_sample_wise(model: nn.Module, x: Tensor) -> Tensor:
    """Raise ``UnsupportedModel`` unless f(x_1) is the same alone and in a batch with x_2; returns the
    output on the first two probe points."""
    reason = sample_mixing_reason(model)  # before any forward pass: train-mode BatchNorm updates its stats
    if reason is not None:
        raise UnsupportedModel(f"the engine needs a model that treats probe points independently: {reason}")
    both = _forward(model, x[:2])
    if x.shape[0] >= 2:
        first = _forward(model, x[:1])
        tol = 1e3 * torch.finfo(first.dtype).eps * max(1.0, first.abs().max().item())
        if (both[:1] - first).abs().max().item() > tol:
            reason = "its output on a probe point changes with the other points of the batch"
    if reason is not None:
        raise UnsupportedModel(f"the engine needs a model that treats probe points independently: {reason}")
    return both


def ntk_plan(
    model: nn.Module, x: Tensor, *, n: int | None = None, routes: dict[str, str] | None = None
) -> NTKPlan:
    """Plan the engine's NTK of ``model`` for ``n`` probe points like ``x`` (default ``len(x)``).

    Traces the model on the first two probe points: which module each rule takes, the route each rule
    picks for ``n`` points by its flop estimate (``routes`` forces the route of the sites it names, e.g.
    ``{"features.0": "gram"}``), and the factor layout. Checks that the model treats probe points
    independently and in dimension 0 of every parametrised module's input and output, and that the engine
    reproduces ||d (u . f(x_1, x_2)) / dw||^2 from autograd for a fixed random u (a guard against
    parameters read outside their module's forward).

    Raises:
        UnsupportedModel: (a ``ValueError``) the engine cannot take the model; the message says why.
        ValueError: the model cannot be evaluated on ``x``, or has no trainable parameters.
    """
    n = x.shape[0] if n is None else n
    trainable_parameters(model)  # raises if there are none
    k = _check_sample_wise(model, x).shape[1]
    planning = x[:2]  # the planning trace: two probe points, to see which dimension holds them
    sites = _sites(model, planning)
    unknown = set(routes or {}) - {site.name for site in sites}
    if unknown:
        raise ValueError(
            f"routes names no site of the plan: {sorted(unknown)}; sites: {[s.name for s in sites]}"
        )
    out, calls = record(model, planning, [site.module for site in sites])
    with torch.no_grad():
        parts = []
        for site in sites:
            _check_batch_first(site, calls[site.module], planning.shape[0])
            site.choose_route(calls[site.module], n, k)
            _force_route(site, (routes or {}).get(site.name))
            parts.append(site.factors(calls[site.module], k))
    shapes = [[tuple(p.shape[1:]) for p in site_parts] for site_parts in parts]
    plan = NTKPlan(model, sites, shapes, k, out.dtype)
    _self_check(plan, planning, parts)
    return plan


def _check_batch_first(site: Rule, calls: list[Call], n: int) -> None:
    """Every rule reads dimension 0 of its module's input and output as the probe points: raise
    ``UnsupportedModel`` for a module that sees them elsewhere (e.g. a sequence-first layout)."""
    for call in calls:
        tensors = [t for t in call.outputs if t is not None]
        if not isinstance(site, FallbackRule) and call.args and isinstance(call.args[0], Tensor):
            tensors.append(call.args[0])
        shapes = [tuple(t.shape) for t in tensors if t.dim() == 0 or t.shape[0] != n]
        if shapes:
            raise UnsupportedModel(
                f"module {site.name or '<model>'} ({type(site.module).__name__}) sees tensors of shapes "
                f"{shapes} for {n} probe points: the engine needs the probe points in dimension 0 of every "
                f"parametrised module's input and output (batch-first layout)"
            )


def _force_route(site: Rule, route: str | None) -> None:
    if route is None:
        return
    if route not in site.costs:
        raise ValueError(
            f"routes[{site.name!r}] must be one of {sorted(site.costs)} for its rule, got {short_repr(route)}"
        )
    site.route = route


def _self_check(plan: NTKPlan, x: Tensor, parts: list[list[Tensor]]) -> None:
    """U . K U from the factors of the planning probes against ||grad (U . f)||^2 from autograd, U random."""
    with torch.no_grad():
        kernel = _kernel_from_parts(plan, parts, parts, True, None)
    n = kernel.shape[0]
    kernel = kernel.reshape(n * plan.k, n * plan.k)
    u = random_direction(n * plan.k, kernel)
    with torch.enable_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        value = plan.model(x).reshape(-1) @ u
    check_against_autograd(plan.model, u @ kernel @ u, value, "kernel")


def random_direction(size: int, like: Tensor) -> Tensor:
    """A fixed random vector (seed 0; torch's global generator untouched), dtype and device of ``like``."""
    generator = torch.Generator(device=like.device).manual_seed(0)
    return torch.randn(size, generator=generator, device=like.device, dtype=like.dtype)


def check_against_autograd(model: nn.Module, found: Tensor, value: Tensor, what: str) -> None:
    """Raise ``UnsupportedModel`` unless ``found`` is ||d value / dw||^2 (w: the trainable parameters of
    ``model``; ``value`` a scalar with autograd history) up to 10 sqrt(eps) relative."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True) if value.requires_grad else ()
    expected = sum((g.pow(2).sum() for g in grads if g is not None), found.new_zeros(()))
    tol = 10 * torch.finfo(found.dtype).eps ** 0.5
    if (found - expected).abs().item() > tol * max(expected.abs().item(), 1e-30):
        raise UnsupportedModel(
            f"the engine's {what} of {type(model).__name__} disagrees with autograd "
            f"({found.item():.6g} vs {expected.item():.6g}): a parameter is probably used outside the "
            f"forward of its own module"
        )


def ntk_rows(model: nn.Module, x: Tensor, plan: NTKPlan | None = None) -> Tensor:
    """The engine's factor rows of the probe points ``x``: shape (n, plan.row_size), one row per point.

    Rows of disjoint shares of the probe points (e.g. one share per DDP rank), concatenated in order, are
    the rows of all of them: :func:`ntk_from_rows` assembles K from any such set.
    """
    plan = ntk_plan(model, x) if plan is None else plan
    parts = _factors(plan, x)
    return torch.cat([part.reshape(x.shape[0], -1) for site_parts in parts for part in site_parts], dim=1)


def _factors(plan: NTKPlan, x: Tensor) -> list[list[Tensor]]:
    """Per site, its factors of the probe points ``x`` (one forward, one batched backward pass)."""
    _, calls = record(plan.model, x, [site.module for site in plan.sites], batched=plan.batched_backward)
    factors = []
    with torch.no_grad():
        for site, shapes in zip(plan.sites, plan.shapes, strict=True):
            site_calls: list[Call] = calls[site.module]
            _check_batch_first(site, site_calls, x.shape[0])
            parts = site.factors(site_calls, plan.k) if site_calls else None
            if parts is None:  # not called for these probe points
                parts = [x.new_zeros(x.shape[0], *shape, dtype=plan.dtype) for shape in shapes]
            for part, shape in zip(parts, shapes, strict=True):
                if tuple(part.shape[1:]) != shape:
                    raise ValueError(
                        f"the factors of {site.name} have shape {tuple(part.shape[1:])} per probe, the plan "
                        f"expects {shape}: plan with probe points shaped like these"
                    )
            factors.append(parts)
    return factors


def _split(plan: NTKPlan, rows: Tensor) -> list[list[Tensor]]:
    if rows.dim() != 2 or rows.shape[1] != plan.row_size:
        raise ValueError(f"rows must have shape (n, {plan.row_size}) for this plan, got {tuple(rows.shape)}")
    sizes = [math.prod(shape) for shapes in plan.shapes for shape in shapes]
    flat = iter(rows.split(sizes, dim=1))
    return [[next(flat).reshape(rows.shape[0], *shape) for shape in shapes] for shapes in plan.shapes]


def _kernel_from_parts(
    plan: NTKPlan, parts1: list[list[Tensor]], parts2: list[list[Tensor]], symmetric: bool, chunk: int | None
) -> Tensor:
    kernel = None
    for site, p1, p2 in zip(plan.sites, parts1, parts2, strict=True):
        block = site.kernel(p1, p2, symmetric, chunk)
        kernel = block if kernel is None else kernel.add_(block)
    return kernel


def ntk_from_rows(
    plan: NTKPlan, rows: Tensor, rows2: Tensor | None = None, *, chunk_size: int | None = None
) -> Tensor:
    """K from factor rows: (n*k, n*k) from ``rows``, or the cross kernel (n1*k, n2*k) with ``rows2``."""
    parts1 = _split(plan, rows)
    parts2 = parts1 if rows2 is None else _split(plan, rows2)
    with torch.no_grad():
        kernel = _kernel_from_parts(plan, parts1, parts2, rows2 is None, chunk_size)
    return _as_matrix(kernel, rows2 is None)


def _as_matrix(kernel: Tensor, symmetric: bool) -> Tensor:
    n1, k, n2, _ = kernel.shape
    kernel = kernel.reshape(n1 * k, n2 * k)
    if symmetric:  # exact symmetry (the two triangles differ by rounding only)
        kernel = 0.5 * (kernel + kernel.T)
    return kernel


def engine_ntk(
    model: nn.Module,
    x: Tensor,
    x2: Tensor | None = None,
    *,
    chunk_size: int | None = None,
    plan: NTKPlan | None = None,
) -> Tensor:
    """The empirical NTK (or the cross kernel with ``x2``) by the engine in one process: what
    :func:`ntk_from_rows` gives from :func:`ntk_rows`, without forming the rows."""
    plan = ntk_plan(model, x) if plan is None else plan
    parts1 = _factors(plan, x)
    parts2 = parts1 if x2 is None else _factors(plan, x2)
    with torch.no_grad():
        kernel = _kernel_from_parts(plan, parts1, parts2, x2 is None, chunk_size)
    return _as_matrix(kernel, x2 is None)
