"""Hessian spectral norm: two tables side by side from one run (solvers, then the two paths).

    python benchmarks/hessian.py --threads 1          # the tables of benchmarks/README.md (several minutes)
    python benchmarks/hessian.py --widths 64 256 --path-widths 64 256 --dag-widths 64 --probes 4
    python benchmarks/hessian.py --device cuda

Both tables measure the output Hessians d^2 f(w; x_i)/dw^2 (one per probe point x_i, k = 1 output) at
initialisation, in float32, with one relative residual tolerance (default 1e-3: the estimate is then within
1e-3 of an eigenvalue) and one budget of products per probe, the same for both sides of a table.

Solvers (NTK FCN, tanh, depth 3, d = 16): Lanczos vs Rayleigh-quotient power iteration, both on the same
batched forward-over-reverse Hessian-vector products (the operator of the generic path of
``hessian_spectral_norm``). Columns: Hessian-vector products (HVPs) in total over the probes, wall time,
and the largest relative error against a reference (Lanczos at tol 1e-6, one probe at a time). A
power-iteration count marked ``+`` includes probes that hit the budget without converging: it is a lower
bound on what power iteration would need.

Paths: ``hessian_spectral_norm(method="structured")`` vs ``method="generic"`` (Lanczos either way, default
chunking and start vectors) on NTK FCNs (tanh, depth 3, d = 16), a DenseNet and a masked DenseNet (every
edge dropped with probability 1/2, mask seed 0). Columns: parameters P, the structured path's coordinates
R = sum over layers of (out_features + in_features), wall time of both paths (after a warm-up call on one
probe; the best of 3 calls for a path that takes under a second), speed-up, HVPs of both (``info.num_hvps``),
the largest relative difference between the two paths' norms, and the peak extra memory of a call (on CPU:
the resident-set high-water mark above the level before the call, Linux only, so memory that the allocator
kept from earlier calls and reuses is not counted; on CUDA: the peak of allocated memory). The generic path
is skipped, and marked ``—``, where its time estimated from the previous generic row (seconds per HVP per
parameter, times P and the structured path's HVP count) exceeds ``--max-generic-seconds``.

Foreign models: a user's MLP ``nn.Sequential(nn.Linear(64, m), act, nn.Linear(m, m), act, nn.Linear(m, m),
act, nn.Linear(m, 10))`` (PyTorch's default initialisation, act = ReLU or Tanh) on the structured path
(recognised as a chain of Linear layers and elementwise activations, checked against autograd on the first
probe point: both are inside its time), its twin ``NTKFCN`` of the same widths (bias, seed 0) on the
structured path, and the same MLP on the generic path; two cases, 1 probe x 10 outputs and 8 probes x 1
output (``columns=[0]``). The three are interleaved in one run (foreign, twin, generic for each case;
foreign and twin best of 3 calls after a warm-up, generic once: tens of seconds at m = 1024). Columns: the
times, foreign/twin (the target is at most 10x), generic/foreign, the HVPs of each, and the largest
relative difference between the foreign structured and generic norms (a tolerance-level difference:
Lanczos from different start vectors, each within ``tol`` of an eigenvalue).

    python benchmarks/hessian.py --threads 1 --tables foreign    # the foreign-model table only
"""

from __future__ import annotations

import argparse
import itertools
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from lightning_linearity.metrics._functional import num_parameters, single_input_model, trainable_parameters
from lightning_linearity.metrics._linalg import EigenResult, lanczos, power_iteration
from lightning_linearity.metrics.hessian import hessian_operator, hessian_spectral_norm
from lightning_linearity.nets import LayeredNTKNet

IN_FEATURES, DEPTH, OUTPUTS = 16, 3, 1
NETWORKS = {
    "FCN": LayeredNTKNet.fcn,
    "DenseNet": LayeredNTKNet.densenet,
    "masked DenseNet (p=1/2)": lambda *args, **kwargs: LayeredNTKNet.masked_dag(
        *args, drop_prob=0.5, mask_seed=0, **kwargs
    ),
}


def build(family: str, width: int, probes: int, device: torch.device) -> tuple[LayeredNTKNet, torch.Tensor]:
    """The network (tanh, depth 3, seed 0) and its probe points (seed 1)."""
    net = NETWORKS[family](IN_FEATURES, [width] * DEPTH, OUTPUTS, activation="tanh", seed=0).to(device)
    x = torch.randn(probes, IN_FEATURES, generator=torch.Generator().manual_seed(1)).to(device)
    return net, x


def proc_status_mib(field: str) -> float | None:
    """A memory field of ``/proc/self/status`` (Linux) in MiB; None where there is no such file."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(field)) / 1024
    except OSError:
        return None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # VmHWM := VmRSS
    except OSError:
        pass


def timed(call: Callable[[], Any], device: torch.device) -> tuple[Any, float, float | None]:
    """``call()``, its wall time in seconds and its peak extra memory in MiB (None where unknown)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device) / 2**20 if cuda else proc_status_mib("VmRSS")
    reset_peak_memory(device)
    start = time.perf_counter()
    result = call()
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else proc_status_mib("VmHWM")
    return result, seconds, None if before is None or peak is None else max(0.0, peak - before)


def print_header(*columns: str) -> None:
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


# ------------------------------------------------------------------------ Lanczos vs power iteration
def run(solver, operator, batch: int, dim: int, device: torch.device, tol: float, max_iter: int):
    """One solve from a fixed start (seed 0); returns the result and its wall time in seconds."""
    result, seconds, _ = timed(
        lambda: solver(
            operator, batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32,
            device=device, tol=tol, max_iter=max_iter,
        ),
        device,
    )  # fmt: skip
    return result, seconds


def measure_solvers(width: int, probes: int, device: torch.device, tol: float, max_iter: int) -> dict:
    net, x = build("FCN", width, probes, device)
    params = trainable_parameters(net)
    f, dim = single_input_model(net), num_parameters(params)
    operator = hessian_operator(f, params, x, OUTPUTS)
    batch = torch.arange(probes * OUTPUTS, device=device)
    operator(torch.zeros(len(batch), dim, device=device), batch)  # warm-up

    def alone(i: int) -> torch.Tensor:
        """The reference: Lanczos at tol 1e-6 on probe i alone."""
        operator_i = hessian_operator(f, params, x[i : i + 1], OUTPUTS)
        return run(lanczos, operator_i, OUTPUTS, dim, device, 1e-6, 1000)[0].eigenvalue

    reference = torch.cat([alone(i) for i in range(probes)]).abs()
    lz, lz_seconds = run(lanczos, operator, probes * OUTPUTS, dim, device, tol, max_iter)
    pw, pw_seconds = run(power_iteration, operator, probes * OUTPUTS, dim, device, tol, max_iter)

    def error(result: EigenResult) -> float:
        return float(((result.eigenvalue.abs() - reference).abs() / reference).max())

    return {
        "width": width, "P": dim,
        "lanczos_hvps": lz.num_matvecs, "power_hvps": pw.num_matvecs,
        "lanczos_s": lz_seconds, "power_s": pw_seconds,
        "lanczos_failed": int((~lz.converged).sum()), "power_failed": int((~pw.converged).sum()),
        "lanczos_err": error(lz), "power_err": error(pw),
    }  # fmt: skip


def solver_table(args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"NTK FCN tanh, depth {DEPTH}, d={IN_FEATURES}, k={OUTPUTS}, {args.probes} probes, float32, "
        f"tol={args.tol}, budget {args.max_iter} HVPs/probe, device={device}, "
        f"threads={torch.get_num_threads()}"
    )
    print_header(
        "width", "P", "HVPs Lanczos", "HVPs power", "HVP ratio", "time Lanczos (s)", "time power (s)",
        "time ratio", "not converged (Lanczos / power)", "max rel. error (Lanczos / power)",
    )  # fmt: skip
    for width in args.widths:
        row = measure_solvers(width, args.probes, device, args.tol, args.max_iter)
        mark = "+" if row["power_failed"] else ""
        print(
            f"| {row['width']} | {row['P']:,} | {row['lanczos_hvps']} | {row['power_hvps']}{mark} "
            f"| {row['power_hvps'] / row['lanczos_hvps']:.1f}x{mark} | {row['lanczos_s']:.2f} "
            f"| {row['power_s']:.2f} | {row['power_s'] / row['lanczos_s']:.1f}x{mark} "
            f"| {row['lanczos_failed']} / {row['power_failed']} of {args.probes} "
            f"| {row['lanczos_err']:.1e} / {row['power_err']:.1e} |",
            flush=True,
        )


# ------------------------------------------------------------------------ structured vs generic path
def measure_path(
    net: LayeredNTKNet, x: torch.Tensor, method: str, args: argparse.Namespace, device: torch.device
) -> dict:
    """One path of ``hessian_spectral_norm`` after a warm-up call on one probe: the norms, HVPs, probes not
    converged, wall time (best of 3 calls when under a second) and peak extra MiB of the first call."""
    result = measure_call(net, x, method, None, args, device, warm=True)
    if result["seconds"] < 1.0:
        repeats = [measure_call(net, x, method, None, args, device, warm=False) for _ in range(2)]
        result["seconds"] = min([result["seconds"]] + [r["seconds"] for r in repeats])
    return result


def measure_call(
    net: torch.nn.Module,
    x: torch.Tensor,
    method: str,
    columns: list[int] | None,
    args: argparse.Namespace,
    device: torch.device,
    warm: bool,
) -> dict:
    """One timed call of ``hessian_spectral_norm`` (after a 2-step warm-up call on one probe if ``warm``):
    the norms, HVPs, values not converged, wall time and peak extra MiB."""

    def call(probes: torch.Tensor = x, max_iter: int = args.max_iter):
        return hessian_spectral_norm(
            net, probes, method=method, columns=columns, tol=args.tol, max_iter=max_iter, return_info=True
        )

    if warm:
        with warnings.catch_warnings():  # the warm-up stops after 2 steps, unconverged
            warnings.simplefilter("ignore")
            call(x[:1], 2)
    (values, info), seconds, peak = timed(call, device)
    assert info.method == method, (info.method, method)
    return {"values": values, "hvps": info.num_hvps, "failed": int((~info.converged).sum()),
            "seconds": seconds, "peak": peak}  # fmt: skip


def hvp_cell(result: dict) -> str:
    return f"{result['hvps']}" + (f" ({result['failed']} not converged)" if result["failed"] else "")


def mib_cell(peak: float | None) -> str:
    return "?" if peak is None else f"{peak:.0f}"


def path_table(args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"\nhessian_spectral_norm, structured vs generic path: tanh, depth {DEPTH}, d={IN_FEATURES}, "
        f"k={OUTPUTS}, {args.probes} probes, float32, tol={args.tol}, max_iter={args.max_iter}, "
        f"device={device}, threads={torch.get_num_threads()}"
    )
    print_header(
        "network", "width", "P", "R", "time structured (s)", "time generic (s)", "speed-up",
        "HVPs structured", "HVPs generic", "max rel. diff", "peak MiB (structured / generic)",
    )  # fmt: skip
    rows = [("FCN", width) for width in args.path_widths]
    rows += [(family, width) for family in list(NETWORKS)[1:] for width in args.dag_widths]
    rate = None  # seconds per HVP per parameter of the last generic run
    for family, width in rows:
        net, x = build(family, width, args.probes, device)
        size = sum(layer.out_features + layer.in_features for layer in net.layers)
        params = num_parameters(trainable_parameters(net))
        structured = measure_path(net, x, "structured", args, device)
        estimate = None if rate is None else rate * params * structured["hvps"]
        generic = {"time": "—", "speed-up": "—", "hvps": "—", "diff": "—", "peak": "—"}
        if estimate is not None and estimate > args.max_generic_seconds:
            generic["time"] = f"— (est. {estimate:.0f} s)"
        else:
            result = measure_path(net, x, "generic", args, device)
            rate = result["seconds"] / (result["hvps"] * params)
            speedup = result["seconds"] / structured["seconds"]
            diff = ((structured["values"] - result["values"]).abs() / result["values"]).max()
            generic = {
                "time": f"{result['seconds']:.2f}", "hvps": hvp_cell(result), "diff": f"{float(diff):.1e}",
                "speed-up": f"{speedup:.1f}x" if speedup < 10 else f"{speedup:.0f}x",
                "peak": mib_cell(result["peak"]),
            }  # fmt: skip
        print(
            f"| {family} | {width} | {params:,} | {size:,} | {structured['seconds']:.3f} | {generic['time']} "
            f"| {generic['speed-up']} | {hvp_cell(structured)} | {generic['hvps']} | {generic['diff']} "
            f"| {mib_cell(structured['peak'])} / {generic['peak']} |",
            flush=True,
        )


# ------------------------------------------------------------------------ foreign model vs its NTK twin
FOREIGN_IN, FOREIGN_OUT = 64, 10
FOREIGN_ACTIVATIONS = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh}
FOREIGN_CASES = [(1, None), (8, [0])]  # (probes, columns): 1 probe x 10 outputs, 8 probes x 1 output


def foreign_mlp(width: int, activation: str, device: torch.device) -> torch.nn.Sequential:
    """The user's MLP: PyTorch's default initialisation, drawn from seed 0 (torch's global RNG restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sizes = [FOREIGN_IN] + [width] * DEPTH
        layers: list[torch.nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes):
            layers += [torch.nn.Linear(n_in, n_out), FOREIGN_ACTIVATIONS[activation]()]
        return torch.nn.Sequential(*layers, torch.nn.Linear(width, FOREIGN_OUT)).to(device)


def foreign_table(args: argparse.Namespace, device: torch.device) -> None:
    print(
        f"\nhessian_spectral_norm on a foreign MLP (nn.Sequential, default init, d={FOREIGN_IN}, "
        f"depth {DEPTH}, k={FOREIGN_OUT}) vs its NTKFCN twin: float32, tol={args.tol}, "
        f"max_iter={args.max_iter}, device={device}, threads={torch.get_num_threads()}"
    )
    print_header(
        "activation", "width", "probes x outputs", "time foreign (s)", "time twin (s)", "foreign / twin",
        "time generic (s)", "generic / foreign", "HVPs foreign / twin / generic",
        "max rel. diff (foreign, generic)",
    )  # fmt: skip
    for width in args.foreign_widths:
        for activation in FOREIGN_ACTIVATIONS:
            model = foreign_mlp(width, activation, device)
            twin = LayeredNTKNet.fcn(
                FOREIGN_IN, [width] * DEPTH, FOREIGN_OUT, activation=activation, bias=True, seed=0
            ).to(device)
            for probes, columns in FOREIGN_CASES:
                x = torch.randn(probes, FOREIGN_IN, generator=torch.Generator().manual_seed(1)).to(device)
                runs = {
                    "foreign": (model, "structured"),
                    "twin": (twin, "structured"),
                    "generic": (model, "generic"),
                }
                results = {}
                for repeat in range(3):
                    for name, (net, method) in runs.items():
                        if name == "generic" and repeat:
                            continue
                        result = measure_call(net, x, method, columns, args, device, warm=repeat == 0)
                        best = results.get(name)
                        results[name] = (
                            result if best is None or result["seconds"] < best["seconds"] else best
                        )
                foreign, twin_result, generic = results["foreign"], results["twin"], results["generic"]
                diff = ((foreign["values"] - generic["values"]).abs() / generic["values"]).max()
                outputs = FOREIGN_OUT if columns is None else len(columns)
                print(
                    f"| {activation} | {width} | {probes} x {outputs} | {foreign['seconds']:.3f} "
                    f"| {twin_result['seconds']:.3f} | {foreign['seconds'] / twin_result['seconds']:.2f}x "
                    f"| {generic['seconds']:.1f} | {generic['seconds'] / foreign['seconds']:.0f}x "
                    f"| {hvp_cell(foreign)} / {hvp_cell(twin_result)} / {hvp_cell(generic)} "
                    f"| {float(diff):.1e} |",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024],
                        help="FCN widths of the solver table")  # fmt: skip
    parser.add_argument("--path-widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024, 2048],
                        help="FCN widths of the path table")  # fmt: skip
    parser.add_argument("--dag-widths", type=int, nargs="+", default=[256, 1024],
                        help="DenseNet and masked DenseNet widths of the path table")  # fmt: skip
    parser.add_argument("--probes", type=int, default=8, help="probe points (one Hessian each)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance, both sides")
    parser.add_argument("--max-iter", type=int, default=300, help="HVP budget per probe, both sides")
    parser.add_argument("--max-generic-seconds", type=float, default=60.0,
                        help="skip a generic-path run estimated to take longer")  # fmt: skip
    parser.add_argument("--foreign-widths", type=int, nargs="+", default=[1024],
                        help="hidden widths m of the foreign-model table")  # fmt: skip
    parser.add_argument("--tables", nargs="+", default=["solvers", "paths", "foreign"],
                        choices=["solvers", "paths", "foreign"], help="which tables to run")  # fmt: skip
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    start, cpu = time.perf_counter(), time.process_time()
    if "solvers" in args.tables:
        solver_table(args, device)
    if "paths" in args.tables:
        path_table(args, device)
    if "foreign" in args.tables:
        foreign_table(args, device)
    print(f"\nTotal {time.perf_counter() - start:.0f} s wall ({time.process_time() - cpu:.0f} s CPU)")


if __name__ == "__main__":
    main()
