"""One forward pass with hooks and one backward pass batched over the k outputs (docs/math.md section 2.1).

Forward hooks on the engine's sites record every call (arguments and output). Each output is handed on as a
copy, so in-place operations downstream (``ReLU(inplace=True)``) cannot change the tensor whose gradient is
taken; an output that carries no autograd history (nothing upstream is trainable) becomes a leaf that
requires grad. One ``torch.autograd.grad`` call with the k output basis vectors as a batch of cotangents
(``is_grads_batched``; a loop over the outputs where the model's operations cannot be batched) then gives
D[i,a] = d f_a(x_i) / d y for every recorded output y. No parameter gradient is formed: the parameters'
``.grad`` and the model are left as they were.

With a :class:`NeuronTarget` the backward pass is seeded at the output of one layer instead of f: the
cotangents are the one-hot vectors of the sampled neurons (entries of one sample's output, flattened), so
D[i,r] = d z[r](x_i) / d y (docs/math.md 2.5, 2.7). Only the calls recorded before the layer's output
existed can reach it; the later ones are dropped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_linearity.metrics._functional import as_2d_output
from lightning_linearity.metrics.engine._base import Call


def _output_tensors(output: object) -> tuple[list[object], bool]:
    if isinstance(output, Tensor):
        return [output], False
    if isinstance(output, tuple | list) and all(isinstance(o, Tensor) or o is None for o in output):
        return list(output), True
    raise ValueError(
        f"a module output of type {type(output).__name__} (expected a tensor or a tuple of them)"
    )


@dataclass
class NeuronTarget:
    """Seed the backward pass at the output z of ``module`` (called once per forward pass) with the one-hot
    vectors of ``neurons``, flat indices into one sample's output (``z.reshape(n, -1)``)."""

    module: nn.Module
    neurons: Tensor


class Recorder:
    """Forward hooks recording the calls of ``modules`` (while :attr:`active`) and the outputs of
    ``target`` (with the number of calls of each module recorded before each of them)."""

    def __init__(self, modules: list[nn.Module], target: nn.Module | None = None):
        self.calls: dict[nn.Module, list[Call]] = {module: [] for module in modules}
        self.target = target
        self.targets: list[tuple[Tensor | None, dict[nn.Module, int]]] = []
        self.active = True
        self._handles = []

    @contextmanager
    def hooks(self) -> Iterator[Recorder]:
        extra = [] if self.target is None or self.target in self.calls else [self.target]
        hooked = [*self.calls, *extra]
        self._handles = [module.register_forward_hook(self._hook, with_kwargs=True) for module in hooked]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if not self.active:
            return None
        tensors, is_sequence = _output_tensors(output)
        handles: list[Tensor | None] = []
        passed_on: list[object] = []
        for tensor in tensors:
            if tensor is None or not torch.is_floating_point(tensor):
                handles.append(None)
                passed_on.append(tensor)
                continue
            handle = tensor if tensor.requires_grad else tensor.detach().requires_grad_()
            handles.append(handle)
            passed_on.append(handle.clone())
        if module in self.calls:
            self.calls[module].append(Call(args, kwargs, handles))
        if module is self.target:
            self.targets.append(
                (None if is_sequence else handles[0], {m: len(c) for m, c in self.calls.items()})
            )
        if not is_sequence:
            return passed_on[0]
        return type(output)(passed_on) if isinstance(output, list) else tuple(passed_on)


def record(
    model: nn.Module,
    x: Tensor,
    modules: list[nn.Module],
    batched: bool = True,
    target: NeuronTarget | None = None,
) -> tuple[Tensor, dict[nn.Module, list[Call]]]:
    """Run ``model(x)`` recording the calls of ``modules``; fill in every call's D. Returns f (n, k), calls.

    ``batched``: one backward pass with the k cotangents batched (``is_grads_batched``), else k passes
    (faster for convolutions on CPU, whose batched backward is slower than k plain ones). ``target``: the
    cotangents are the one-hot vectors of its neurons at its module's output z, k = len(neurons), and the
    first return value is z as (n, width).

    Raises ``ValueError`` if the output does not depend differentiably on the recorded outputs, or if the
    target module does not run exactly once or returns anything but one tensor.
    """
    recorder = Recorder(modules, None if target is None else target.module)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), recorder.hooks():
        out = as_2d_output(model(x), x.shape[0])
    if target is not None:
        out = _target_output(recorder, x.shape[0])
    handles = [
        h for calls in recorder.calls.values() for call in calls for h in call.outputs if h is not None
    ]
    if (not out.requires_grad or not handles) and target is not None:
        raise ValueError(
            f"no trainable parameter of {type(model).__name__} acts at or before the layer "
            f"({type(target.module).__name__}): every neuron gradient vanishes"
        )
    if not out.requires_grad or not handles:
        raise ValueError(
            f"the output of {type(model).__name__} does not depend differentiably on its trainable "
            f"parameters (no autograd graph: detach(), argmax or integer ops in forward?)"
        )
    n = out.shape[0]
    seeds = _one_hot(torch.arange(out.shape[1]) if target is None else target.neurons, out)
    grads = _batched_gradients(out, handles, seeds, batched)
    k = seeds.shape[0]
    position = 0
    for calls in recorder.calls.values():
        for call in calls:
            for h in call.outputs:
                if h is None:
                    call.grads.append(None)
                    continue
                grad = grads[position]
                position += 1
                call.grads.append(h.new_zeros(n, k, *h.shape[1:]) if grad is None else grad.movedim(0, 1))
    return out.detach(), recorder.calls


def _target_output(recorder: Recorder, n: int) -> Tensor:
    """The target's output z as (n, width); drop the calls recorded after it (they cannot reach z)."""
    if len(recorder.targets) != 1:
        raise ValueError(
            f"the layer ({type(recorder.target).__name__}) ran {len(recorder.targets)} times in one forward "
            f"pass; its neurons need it to run once"
        )
    z, counts = recorder.targets[0]
    if z is None:
        raise ValueError(f"the layer ({type(recorder.target).__name__}) returned several tensors, not one")
    for module, calls in recorder.calls.items():
        del calls[counts[module] :]
    return as_2d_output(z, n)


def _one_hot(rows: Tensor, out: Tensor) -> Tensor:
    """Rows ``rows`` of the identity of size out.shape[1], shape (len(rows), out.shape[1])."""
    seeds = out.new_zeros(len(rows), out.shape[1])
    return seeds.scatter_(1, rows.to(out.device)[:, None], 1.0)


def _batched_gradients(
    out: Tensor, handles: list[Tensor], seeds: Tensor, batched: bool
) -> tuple[Tensor | None, ...]:
    """d (e . out) / d h for every seed e (a row of ``seeds``, the same for every probe point) and every
    handle h, stacked as (k, *h.shape), k = len(seeds)."""
    n = out.shape[0]
    k = seeds.shape[0]
    basis = seeds[:, None, :].expand(k, n, out.shape[1])
    try:
        if batched and k > 1:
            return torch.autograd.grad(
                out, handles, basis, retain_graph=True, is_grads_batched=True, allow_unused=True
            )
    except RuntimeError:  # an operation without a batching rule for its backward: one output at a time
        pass
    per_output = [
        torch.autograd.grad(out, handles, basis[a], retain_graph=a < k - 1, allow_unused=True)
        for a in range(k)
    ]
    return tuple(None if parts[0] is None else torch.stack(parts) for parts in zip(*per_output, strict=True))
