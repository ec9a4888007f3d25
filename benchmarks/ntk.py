"""Empirical NTK: structured path vs the generic torch.func paths, side by side from one run.

    python benchmarks/ntk.py                 # the table of benchmarks/README.md (a few minutes on 2 cores)
    python benchmarks/ntk.py --quick         # n = 64 only
    python benchmarks/ntk.py --max-seconds 60 --threads 1

Every (network, n, method) is timed in a fresh subprocess, so the peak-memory column is that process's own
high-water mark: ``/proc/self/clear_refs`` resets VmHWM after the setup, and the column reports
VmHWM - VmRSS(before) around the call (Linux only; CPU memory, so meaningful on CPU runs). A run that
exceeds ``--max-seconds`` (or dies, e.g. out of memory) is reported as such, not skipped.

Next to the measurements: the size of the n-by-P Jacobian that the structured path never forms, and the
structured path's largest intermediate (computed from the shapes it uses). The generic paths run with the
default chunking (no intermediate above ``DEFAULT_CHUNK_ELEMENTS``); its Jacobian-contraction path
recomputes Jacobian blocks when the whole Jacobian exceeds that budget. The last column checks the kernels
against each other: max |K_generic - K_structured| / max |K_structured|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from lightning_linearity.metrics.ntk import DEFAULT_CHUNK_ELEMENTS, empirical_ntk
from lightning_linearity.nets import LayeredNTKNet

IN_FEATURES, DEPTH, OUTPUTS = 64, 3, 1
METHODS = {"structured": ("structured", "jacobian"), "jacobian": ("generic", "jacobian"),
           "ntk_vp": ("generic", "ntk_vp")}  # fmt: skip


def build(family: str, width: int) -> LayeredNTKNet:
    widths = [width] * DEPTH
    if family == "fcn":
        return LayeredNTKNet.fcn(IN_FEATURES, widths, OUTPUTS, seed=0)
    return LayeredNTKNet.masked_dag(IN_FEATURES, widths, OUTPUTS, drop_prob=0.5, mask_seed=0, seed=0)


def memory_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field))


def worker(family: str, width: int, n: int, name: str) -> dict:
    """Time one kernel computation (in this process) and measure its peak extra memory."""
    net = build(family, width)
    x = torch.randn(n, IN_FEATURES, generator=torch.Generator().manual_seed(1))
    method, impl = METHODS[name]
    empirical_ntk(net, x[:2], method=method, generic_impl=impl)  # warm-up, lazy initialisation
    rss = memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark
    start = time.perf_counter()
    kernel = empirical_ntk(net, x, method=method, generic_impl=impl)
    seconds = time.perf_counter() - start
    peak_mib = (memory_kib("VmHWM") - rss) / 1024
    if name == "structured" and seconds < 1.0:  # repeat fast runs, keep the best
        for _ in range(4):
            start = time.perf_counter()
            empirical_ntk(net, x, method=method, generic_impl=impl)
            seconds = min(seconds, time.perf_counter() - start)
    result = {"seconds": seconds, "peak_mib": peak_mib}
    if name != "structured":
        reference = empirical_ntk(net, x, method="structured")
        result["rel_diff"] = ((kernel - reference).abs().max() / reference.abs().max()).item()
    return result


def run(family: str, width: int, n: int, name: str, max_seconds: float, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps([family, width, n, name])]
    command += ["--threads", str(threads)] if threads else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max_seconds, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"> {max_seconds:.0f} s (stopped)"}
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1]
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def shapes(family: str, width: int, n: int) -> tuple[int, int]:
    """(#parameters P, elements of the structured path's largest intermediate)."""
    net = build(family, width)
    params = sum(p.numel() for p in net.parameters())
    largest = max(n * OUTPUTS * n * OUTPUTS, n * max(layer.in_features for layer in net.layers))
    for layer in net.layers if family != "fcn" else []:  # the chunks of the masked layers
        fan, m = layer.in_features, layer.out_features
        if 8 * m <= n:  # per-neuron grouping: (neurons, n, max(in, n * k))
            per_neuron = n * max(fan, n * OUTPUTS)
            largest = max(largest, min(m, max(1, DEFAULT_CHUNK_ELEMENTS // per_neuron)) * per_neuron)
        else:  # probe-pair grouping, >= 8 chunks: (rows, n, max(in, k * m))
            per_row = n * max(fan, OUTPUTS * m)
            largest = max(largest, min(max(1, DEFAULT_CHUNK_ELEMENTS // per_row), -(-n // 8)) * per_row)
    return params, largest


def cell(result: dict, key: str, fmt: str) -> str:
    return result["error"] if "error" in result else format(result[key], fmt)


def ratio(result: dict, base: dict) -> str:
    if "error" in result or "error" in base:
        return "-"
    value = result["seconds"] / base["seconds"]
    return f"{value:.1f}x" if value < 10 else f"{value:.0f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="n = 64 only")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="per (network, n, method) run")
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's choice)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(*json.loads(args.worker))))
        return

    configs = [("fcn", width, n) for n in (64, 256) for width in (256, 1024, 2048)]
    configs += [("masked", 256, 64), ("masked", 1024, 64), ("masked", 256, 256)]
    if args.quick:
        configs = [c for c in configs if c[2] == 64]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32, "
        f"input dim {IN_FEATURES}, depth {DEPTH}, k = {OUTPUTS}; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| network | width | n | P | n-by-P Jacobian | structured largest | structured s | jacobian s "
        "| ntk_vp s | jacobian / structured | ntk_vp / structured | peak MiB struct / jac / vp "
        "| max rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for family, width, n in configs:
        results = {name: run(family, width, n, name, args.max_seconds, args.threads) for name in METHODS}
        params, largest = shapes(family, width, n)
        base, jac, vp = results["structured"], results["jacobian"], results["ntk_vp"]
        diffs = ", ".join(f"{r['rel_diff']:.0e}" for r in (jac, vp) if "error" not in r) or "-"
        peaks = " / ".join(cell(r, "peak_mib", ".0f") for r in (base, jac, vp))
        label = "FCN" if family == "fcn" else "masked DenseNet (p=1/2)"
        print(
            f"| {label} | {width} | {n} | {params / 1e6:.2f} M | {n * OUTPUTS * params * 4 / 2**30:.2f} GiB "
            f"| {largest * 4 / 2**20:.1f} MiB | {cell(base, 'seconds', '.3f')} "
            f"| {cell(jac, 'seconds', '.2f')} | {cell(vp, 'seconds', '.2f')} "
            f"| {ratio(jac, base)} | {ratio(vp, base)} | {peaks} | {diffs} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
