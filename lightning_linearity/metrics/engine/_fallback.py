"""The exact fallback rule for any other module with trainable parameters (docs/math.md section 2.1).

For a module y = g(theta, u) (its own parameters theta; u its inputs for probe i, recorded by the engine's
hooks) the per-sample gradient is a vector-Jacobian product of the module alone,

    d f_a(x_i)/d theta = (d g(theta, u_i) / d theta)^T D[i,a],     K = G G^T,

summed over the calls of the module. ``torch.func``: ``vmap`` over the probe points of ``vjp`` of
``functional_call(module, theta, u_i)``, ``vmap``-ed again over the k cotangents D[i,1..k]. A tensor
argument whose leading dimension is the number of probe points is taken as batched, every other argument
as shared. Modules whose operations ``vmap`` cannot batch are evaluated probe by probe. ``functional_call``
runs with ``tie_weights=False``: a child used under two names is one object, and torch would otherwise
restore only one of its names after the call.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call, vjp, vmap
from torch.utils import _pytree as pytree

from lightning_linearity.metrics.engine._base import Call, Rule, gradient_diagonal, gradient_kernel


class FallbackRule(Rule):
    """Per-sample gradients of the module's own parameters by ``torch.func`` (gradient route)."""

    kind = "torch.func"

    def choose_route(self, calls: list[Call], n: int, k: int, diagonal: bool = False) -> None:
        size = sum(p.numel() for p in self.params.values())
        self.costs = {"gradient": float((n if diagonal else n * n) * k * k * size)}

    def factors(self, calls: list[Call], k: int) -> list[Tensor]:
        total = None
        for call in calls:
            grads = self._call_gradients(call)
            total = grads if total is None else total + grads
        return [total]

    def _call_gradients(self, call: Call) -> Tensor:
        """(n, k, P_m): per-sample gradients of this call, parameters flattened in ``self.params`` order."""
        selected = [i for i, out in enumerate(call.outputs) if out is not None]
        cotangents = tuple(call.grads[i] for i in selected)
        n = cotangents[0].shape[0]
        theta = {name: p.detach() for name, p in self.params.items()}
        leaves, spec = pytree.tree_flatten((call.args, call.kwargs))
        leaves = [a.detach() if isinstance(a, Tensor) else a for a in leaves]
        dims = tuple(0 if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n else None for a in leaves)
        module = self.module

        def one(leaves_i: tuple, cot_i: tuple[Tensor, ...]) -> dict[str, Tensor]:
            restored = [a.unsqueeze(0) if d == 0 else a for a, d in zip(leaves_i, dims, strict=True)]
            args_b, kwargs_b = pytree.tree_unflatten(restored, spec)

            def g(params: dict[str, Tensor]) -> tuple[Tensor, ...]:
                out = functional_call(module, params, args_b, kwargs_b, tie_weights=False)
                outs = [out] if isinstance(out, Tensor) else list(out)
                return tuple(outs[i].squeeze(0) for i in selected)

            _, pullback = vjp(g, theta)
            return vmap(pullback)(cot_i)[0]

        try:
            grads = vmap(one, in_dims=(dims, 0))(tuple(leaves), cotangents)
        except RuntimeError:  # an operation vmap cannot batch: probe by probe
            per_probe = [
                one(
                    tuple(a[i] if d == 0 else a for a, d in zip(leaves, dims, strict=True)),
                    tuple(c[i] for c in cotangents),
                )
                for i in range(n)
            ]
            grads = {name: torch.stack([p[name] for p in per_probe]) for name in theta}
        k = cotangents[0].shape[1]
        return torch.cat([grads[name].reshape(n, k, -1) for name in theta], dim=2)

    def kernel(
        self, parts1: list[Tensor], parts2: list[Tensor], symmetric: bool, chunk: int | None
    ) -> Tensor:
        return gradient_kernel(parts1[0], parts2[0], symmetric)

    def diagonal(self, parts: list[Tensor], chunk: int | None) -> Tensor:
        return gradient_diagonal(parts[0])
