"""One forward pass with hooks and one backward pass batched over the k outputs (docs/math.md section 2.1).

Forward hooks on the engine's sites record every call (arguments and output). Each output is handed on as a
copy, so in-place operations downstream (``ReLU(inplace=True)``) cannot change the tensor whose gradient is
taken; an output that carries no autograd history (nothing upstream is trainable) becomes a leaf that
requires grad. One ``torch.autograd.grad`` call with the k output basis vectors as a batch of cotangents
(``is_grads_batched``; a loop over the outputs where the model's operations cannot be batched) then gives
D[i,a] = d f_a(x_i) / d y for every recorded output y. No parameter gradient is formed: the parameters'
``.grad`` and the model are left as they were.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

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


class Recorder:
    """Forward hooks recording the calls of ``modules`` (while :attr:`active`)."""

    def __init__(self, modules: list[nn.Module]):
        self.calls: dict[nn.Module, list[Call]] = {module: [] for module in modules}
        self.active = True
        self._handles = []

    @contextmanager
    def hooks(self) -> Iterator[Recorder]:
        self._handles = [module.register_forward_hook(self._hook, with_kwargs=True) for module in self.calls]
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
        self.calls[module].append(Call(args, kwargs, handles))
        if not is_sequence:
            return passed_on[0]
        return type(output)(passed_on) if isinstance(output, list) else tuple(passed_on)


def record(
    model: nn.Module, x: Tensor, modules: list[nn.Module], batched: bool = True
) -> tuple[Tensor, dict[nn.Module, list[Call]]]:
    """Run ``model(x)`` recording the calls of ``modules``; fill in every call's D. Returns f (n, k), calls.

    ``batched``: one backward pass with the k cotangents batched (``is_grads_batched``), else k passes
    (faster for convolutions on CPU, whose batched backward is slower than k plain ones).

    Raises ``ValueError`` if the output does not depend differentiably on the recorded outputs.
    """
    recorder = Recorder(modules)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.enable_grad(), recorder.hooks():
        out = as_2d_output(model(x), x.shape[0])
    handles = [
        h for calls in recorder.calls.values() for call in calls for h in call.outputs if h is not None
    ]
    if not out.requires_grad or not handles:
        raise ValueError(
            f"the output of {type(model).__name__} does not depend differentiably on its trainable "
            f"parameters (no autograd graph: detach(), argmax or integer ops in forward?)"
        )
    grads = _batched_gradients(out, handles, batched)
    n, k = out.shape
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


def _batched_gradients(out: Tensor, handles: list[Tensor], batched: bool) -> tuple[Tensor | None, ...]:
    """d (e_a . f) / d h for a = 1..k and every handle h, stacked as (k, *h.shape)."""
    n, k = out.shape
    basis = torch.eye(k, dtype=out.dtype, device=out.device)[:, None, :].expand(k, n, k)
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
