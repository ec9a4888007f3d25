"""Neuron-gradient cosines: the structured Gram recursion, the engine and per-neuron backward passes.

    python benchmarks/cosines.py              # both tables of benchmarks/README.md (minutes on 2 cores)
    python benchmarks/cosines.py --threads 1 --part foreign

Part ``fcn``:
Three ways to get the mean |cos| of docs/math.md 2.5 for the last hidden layer of a tanh FCN (depth 3, input
dim 64, 20 probes as in 000 Figure 3):

* ``structured``: ``neuron_gradient_cosines(method="structured")``, G_l = sum_k J_lk diag(g_k) J_lk^T from one
  batched backward recursion (no per-neuron gradient is ever formed);
* ``generic``: ``neuron_gradient_cosines(method="generic")``, per-probe ``vmap(jacrev)`` of the neurons;
* ``per-neuron``: the textbook loop, one ``torch.autograd.grad`` per probe and neuron over all parameters,
  the gradients stacked and their cosines taken (written out here, independent of the package).

The last column is the largest difference between the three values.

Part ``foreign``: the last hidden layer of a foreign MLP, ``nn.Sequential`` 64 -> 1024 -> 1024 -> 1024 -> 10
with ReLU (PyTorch's default parameterisation, biases), and the third convolution of a small CNN (3x16x16
inputs, 3x3 convolutions with 32, 64 (stride 2) and 64 channels; a neuron is one channel at one position),
20 probes:

* ``engine``: ``neuron_gradient_cosines(method="engine")`` (what ``"auto"`` takes for it), one forward and
  one backward pass seeded at the layer with the sampled neurons, per-module Gram blocks;
* ``generic``: ``method="generic"`` on the same model, the same neurons (the reference path);
* ``structured``: for the MLP, the NTK twin ``LayeredNTKNet.fcn(64, [1024] * 3, 10, activation="relu")``,
  structured path (a different network, so a different value: only its time is compared).

The engine and the structured twin are timed alternately (best of 3 each), the generic path once.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch import nn

from lightning_linearity.metrics.cosines import neuron_gradient_cosines
from lightning_linearity.nets import LayeredNTKNet

IN_FEATURES, DEPTH, PROBES = 64, 3, 20
FOREIGN_WIDTH, FOREIGN_OUT = 1024, 10


def per_neuron_backward(net: LayeredNTKNet, x: torch.Tensor, layer: int, neurons: torch.Tensor) -> float:
    params = list(net.parameters())
    values = []
    for i in range(x.shape[0]):
        z = net.trace(x[i : i + 1]).preactivations[layer - 1][0]
        grads = torch.stack([
            torch.cat([
                g.reshape(-1)
                for g in torch.autograd.grad(z[r], params, retain_graph=True, materialize_grads=True)
            ])
            for r in neurons.tolist()
        ])  # fmt: skip
        unit = grads / grads.norm(dim=1, keepdim=True)
        cos = (unit @ unit.T).abs()
        s = len(neurons)
        values.append(((cos.sum() - cos.diagonal().sum()) / (s * (s - 1))).item())
    return sum(values) / len(values)


def timed(fn, repeat: int) -> tuple[float, float]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, float(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--part", choices=["fcn", "foreign", "all"], default="all")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ("fcn", "all"):
        fcn_table()
    if args.part in ("foreign", "all"):
        foreign_table()


def fcn_table() -> None:
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32, "
        f"tanh FCN depth {DEPTH}, input dim {IN_FEATURES}, n = {PROBES}, layer {DEPTH}; "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| width | neurons compared | structured s | generic s | per-neuron s | generic / structured "
          "| per-neuron / structured | mean abs cos | max diff |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    x = torch.randn(PROBES, IN_FEATURES, generator=torch.Generator().manual_seed(0))
    for width, num_neurons in ((128, None), (512, 128), (1024, 64), (2048, 32)):
        net = LayeredNTKNet.fcn(IN_FEATURES, [width] * DEPTH, 1, seed=0)
        count = num_neurons or width
        neurons = torch.randperm(width, generator=torch.Generator().manual_seed(1))[:count]

        def metric(method, num_neurons=num_neurons, net=net):
            generator = torch.Generator().manual_seed(1)
            return neuron_gradient_cosines(net, x, DEPTH, num_neurons=num_neurons, generator=generator,
                                           method=method)  # fmt: skip

        neuron_gradient_cosines(net, x[:2], DEPTH, num_neurons=2, method="generic")  # warm-up
        fast, value = timed(lambda: metric("structured"), 3)
        generic, generic_value = timed(lambda: metric("generic"), 1)
        loop, loop_value = timed(lambda net=net, rows=neurons: per_neuron_backward(net, x, DEPTH, rows), 1)
        diff = max(value, generic_value, loop_value) - min(value, generic_value, loop_value)
        print(
            f"| {width} | {count} | {fast:.3f} | {generic:.2f} | {loop:.2f} | {generic / fast:.0f}x "
            f"| {loop / fast:.0f}x | {value:.4f} | {diff:.0e} |",
            flush=True,
        )


def foreign_models() -> dict[str, tuple[nn.Module, str, torch.Tensor, nn.Module | None]]:
    """name -> (model, layer, probes, NTK twin or None)."""
    width = FOREIGN_WIDTH
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Linear(IN_FEATURES, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, FOREIGN_OUT),
    )  # fmt: skip
    twin = LayeredNTKNet.fcn(IN_FEATURES, [width] * DEPTH, FOREIGN_OUT, activation="relu", seed=0)
    cnn = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64 * 8 * 8, FOREIGN_OUT),
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    return {
        f"MLP {IN_FEATURES}-{width}-{width}-{width}-{FOREIGN_OUT}": (
            mlp,
            "4",
            torch.randn(PROBES, IN_FEATURES, generator=generator),
            twin,
        ),
        "CNN 3x16x16, conv 32-64(s2)-64": (
            cnn,
            "4",
            torch.randn(PROBES, 3, 16, 16, generator=generator),
            None,
        ),
    }


def foreign_table() -> None:
    print(
        f"\ntorch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32, "
        f"ReLU, layer '4' (hidden layer 3), n = {PROBES}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print("| model | neurons compared | engine s | NTK twin structured s | generic s | engine / structured "
          "| generic / engine | mean abs cos (engine) | engine - generic |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (model, layer, x, twin) in foreign_models().items():
        for num_neurons in (32, 128):
            print(foreign_row(name, model, layer, x, twin, num_neurons), flush=True)


def foreign_row(
    name: str, model: nn.Module, layer: str, x: torch.Tensor, twin: nn.Module | None, num_neurons: int
) -> str:
    def metric(model: nn.Module, layer: int | str, method: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1)
        return neuron_gradient_cosines(model, x, layer, num_neurons=num_neurons, generator=generator,
                                       method=method)  # fmt: skip

    metric(model, layer, "engine")  # warm-up
    engine, structured, value = float("inf"), float("inf"), 0.0
    for _ in range(3):  # alternate, best of 3 each
        seconds, value = timed(lambda: metric(model, layer, "engine"), 1)
        engine = min(engine, seconds)
        if twin is not None:
            structured = min(structured, timed(lambda: metric(twin, DEPTH, "structured"), 1)[0])
    generic, generic_value = timed(lambda: metric(model, layer, "generic"), 1)
    twin_time, ratio = (
        (f"{structured:.3f}", f"{engine / structured:.2f}x") if twin is not None else ("-", "-")
    )
    return (
        f"| {name} | {num_neurons} | {engine:.3f} | {twin_time} | {generic:.2f} | {ratio} "
        f"| {generic / engine:.0f}x | {value:.4f} | {abs(value - generic_value):.0e} |"
    )


if __name__ == "__main__":
    main()
