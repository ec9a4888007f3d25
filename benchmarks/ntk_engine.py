"""Empirical NTK of foreign models: the engine of per-module rules vs the structured twin vs the generic path.

    python benchmarks/ntk_engine.py --threads 1                  # the table of benchmarks/README.md
    python benchmarks/ntk_engine.py --threads 1 --skip-generic   # without the slow generic runs (~2 min each)

Models (float32, default PyTorch init for the foreign ones):

* ``mlp``: a user's ``nn.Sequential`` 64 -> 1024 -> 1024 -> 1024 -> k with ReLU, through
  ``empirical_ntk(method="auto")``, which takes the engine; its twin ``NTKFCN(64, k, width=1024, depth=3,
  activation="relu")`` on the structured path (and, as one more column, through the engine's NTKLinear rule);
  ``empirical_ntk(method="generic")`` on the foreign MLP is today's path for it.
* ``cnn``: three 3x3 convolutions of 64 channels (padding 1, ReLU) on 3x16x16 inputs, global average pooling,
  a linear head; engine vs generic, with the route the engine chose for each layer.

Every (case, path) runs in a fresh subprocess after a warm-up call on two probes; the time is the best of 5
calls when one takes under 2 s. For the MLPs the engine, the twin and the twin through the engine are also
timed in turns within one process (best of 7 rounds), so that a change of the machine's load between the
subprocesses cannot skew their ratio. The peak-memory column is the process's resident high-water mark above
its level before the call (``/proc/self/clear_refs``, Linux; as in ``benchmarks/ntk.py``), next to the size of
the n*k*P Jacobian the engine never forms. "rel diff" is max |K_generic - K_engine| / max |K_engine|.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from ntk import memory_kib  # benchmarks/ntk.py, next to this script
from torch import nn

from lightning_linearity import NTKFCN
from lightning_linearity.metrics.engine import ntk_plan
from lightning_linearity.metrics.ntk import empirical_ntk

CASES = {"mlp n=64 k=10": ("mlp", 64, 10), "mlp n=256 k=1": ("mlp", 256, 1), "cnn n=32 k=10": ("cnn", 32, 10)}
PATHS = {"mlp": ("engine", "twin", "twin_engine", "generic"), "cnn": ("engine", "generic")}


def build(family: str, k: int, twin: bool = False) -> nn.Module:
    torch.manual_seed(0)
    if family == "mlp" and twin:
        return NTKFCN(64, k, width=1024, depth=3, activation="relu", init_seed=0)
    if family == "mlp":
        layers = [nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 1024)]
        return nn.Sequential(*layers, nn.ReLU(), nn.Linear(1024, k))
    convs = [nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()]
    head = [
        nn.Conv2d(64, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, k),
    ]
    return nn.Sequential(*convs, *head)


def probes(family: str, n: int) -> torch.Tensor:
    shape = (n, 64) if family == "mlp" else (n, 3, 16, 16)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def worker(case: str, path: str) -> dict:
    family, n, k = CASES[case]
    model = build(family, k, twin=path.startswith("twin"))
    x = probes(family, n)
    method = {"engine": "auto", "twin": "structured", "twin_engine": "engine", "generic": "generic"}[path]
    empirical_ntk(model, x[:2], method=method)  # warm-up, lazy initialisation
    rss = memory_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset the high-water mark
    start = time.perf_counter()
    kernel = empirical_ntk(model, x, method=method)
    seconds = time.perf_counter() - start
    peak_mib = (memory_kib("VmHWM") - rss) / 1024
    if seconds < 2.0:  # repeat fast runs, keep the best (the machine may be shared)
        for _ in range(4):
            start = time.perf_counter()
            empirical_ntk(model, x, method=method)
            seconds = min(seconds, time.perf_counter() - start)
    result = {"seconds": seconds, "peak_mib": peak_mib}
    if path == "generic":
        reference = empirical_ntk(model, x, method="engine")
        result["rel_diff"] = ((kernel - reference).abs().max() / reference.abs().max()).item()
    return result


def interleaved(case: str, rounds: int = 7) -> dict:
    """Best times of the engine, the twin's structured path and the twin through the engine, measured in
    turns within one process (so a change of the machine's load hits all three alike)."""
    family, n, k = CASES[case]
    x = probes(family, n)
    runs = {
        "engine": (build(family, k), "auto"),
        "twin": (build(family, k, twin=True), "structured"),
        "twin_engine": (build(family, k, twin=True), "engine"),
    }
    best = dict.fromkeys(runs, float("inf"))
    for model, method in runs.values():
        empirical_ntk(model, x[:2], method=method)  # warm-up
    for _ in range(rounds):
        for name, (model, method) in runs.items():
            start = time.perf_counter()
            empirical_ntk(model, x, method=method)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def run(case: str, path: str, max_seconds: float, threads: int | None) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps([case, path])]
    command += ["--threads", str(threads)] if threads else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=max_seconds, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"> {max_seconds:.0f} s (stopped)"}
    if done.returncode != 0:
        reason = "killed (out of memory?)" if done.returncode < 0 else done.stderr.strip().splitlines()[-1]
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def seconds(result: dict | None) -> str:
    if result is None:
        return "skipped"
    return result.get("error") or f"{result['seconds']:.3f}"


def ratio(numerator: dict | None, denominator: dict | None) -> str:
    if not numerator or not denominator or "error" in numerator or "error" in denominator:
        return "-"
    value = numerator["seconds"] / denominator["seconds"]
    return f"{value:.2f}x" if value < 10 else f"{value:.0f}x"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="torch threads in every run (default: torch's choice)")
    parser.add_argument("--skip-generic", action="store_true", help="leave out the generic path")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="per (case, path) run")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        case, path = json.loads(args.worker)
        print(json.dumps(interleaved(case) if path == "interleaved" else worker(case, path)))
        return

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, float32; "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| case | P | n*k*P Jacobian | engine s | twin structured s | twin engine s | generic s "
        "| engine / twin | generic / engine | peak MiB engine / twin / generic | rel diff "
        "| interleaved engine / twin / twin engine s | interleaved engine / twin |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for case, (family, n, k) in CASES.items():
        paths = [p for p in PATHS[family] if not (args.skip_generic and p == "generic")]
        results = {path: run(case, path, args.max_seconds, args.threads) for path in paths}
        engine, twin, twin_engine, generic = (results.get(p) for p in PATHS["mlp"])
        params = sum(p.numel() for p in build(family, k).parameters())
        peaks = " / ".join(
            "-" if r is None or "error" in r else f"{r['peak_mib']:.0f}" for r in (engine, twin, generic)
        )
        diff = f"{generic['rel_diff']:.0e}" if generic and "rel_diff" in generic else "-"
        turns, turns_ratio = "-", "-"
        if family == "mlp":
            times = run(case, "interleaved", args.max_seconds, args.threads)
            if "error" not in times:
                turns = " / ".join(f"{times[p]:.3f}" for p in ("engine", "twin", "twin_engine"))
                turns_ratio = f"{times['engine'] / times['twin']:.2f}x"
        print(
            f"| {family} n={n} k={k} | {params / 1e6:.3f} M | {n * k * params * 4 / 2**30:.2f} GiB "
            f"| {seconds(engine)} | {seconds(twin) if family == 'mlp' else '-'} "
            f"| {seconds(twin_engine) if family == 'mlp' else '-'} | {seconds(generic)} "
            f"| {ratio(engine, twin)} | {ratio(generic, engine)} | {peaks} | {diff} "
            f"| {turns} | {turns_ratio} |",
            flush=True,
        )
    print("\nroutes the engine chose (flop estimates of the routes it compared):")
    for case, (family, n, k) in CASES.items():
        print(f"{case}:")
        print("  " + ntk_plan(build(family, k), probes(family, n)).describe().replace("\n", "\n  "))


if __name__ == "__main__":
    main()
