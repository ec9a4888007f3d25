"""Hessian spectral norm: Lanczos vs Rayleigh-quotient power iteration, side by side from one run.

    python benchmarks/hessian.py --threads 1          # the table of benchmarks/README.md (~2-3 min)
    python benchmarks/hessian.py --widths 64 256 --probes 4
    python benchmarks/hessian.py --device cuda

Both solvers run on the same batched forward-over-reverse Hessian-vector products (the operator that
``hessian_spectral_norm`` uses) for the output Hessian d^2 f(w; x_i)/dw^2 of an NTK FCN (tanh, depth 3,
one output) at initialisation, with the same relative residual tolerance (default 1e-3: the estimate is
then within 1e-3 of an eigenvalue) and the same budget of products per probe. Columns: Hessian-vector
products (HVPs) in total over the probes, wall time, and the largest relative error against a reference
(Lanczos at tol 1e-6, one probe at a time). A power-iteration count marked ``+`` includes probes that hit
the budget without converging: it is a lower bound on what power iteration would need.
"""

from __future__ import annotations

import argparse
import time

import torch

from lightning_linearity.metrics._functional import num_parameters, single_input_model, trainable_parameters
from lightning_linearity.metrics._linalg import EigenResult, lanczos, power_iteration
from lightning_linearity.metrics.hessian import hessian_operator
from lightning_linearity.nets import LayeredNTKNet

IN_FEATURES, DEPTH = 16, 3


def run(solver, operator, batch: int, dim: int, device: torch.device, tol: float, max_iter: int):
    """One solve from a fixed start (seed 0); returns the result and its wall time in seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result: EigenResult = solver(
        operator, batch, dim, generator=torch.Generator().manual_seed(0), dtype=torch.float32, device=device,
        tol=tol, max_iter=max_iter,
    )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return result, time.perf_counter() - start


def measure(width: int, probes: int, device: torch.device, tol: float, max_iter: int) -> dict:
    net = LayeredNTKNet.fcn(IN_FEATURES, [width] * DEPTH, 1, activation="tanh", seed=0).to(device)
    x = torch.randn(probes, IN_FEATURES, generator=torch.Generator().manual_seed(1)).to(device)
    params = trainable_parameters(net)
    f, dim = single_input_model(net), num_parameters(params)
    operator = hessian_operator(f, params, x, 1)
    operator(torch.zeros(probes, dim, device=device), torch.arange(probes, device=device))  # warm-up

    reference = torch.cat([
        run(lanczos, hessian_operator(f, params, x[i : i + 1], 1), 1, dim, device, 1e-6, 1000)[0].eigenvalue
        for i in range(probes)
    ]).abs()  # fmt: skip
    lz, lz_seconds = run(lanczos, operator, probes, dim, device, tol, max_iter)
    pw, pw_seconds = run(power_iteration, operator, probes, dim, device, tol, max_iter)

    def error(result: EigenResult) -> float:
        return float(((result.eigenvalue.abs() - reference).abs() / reference).max())

    return {
        "width": width, "P": dim,
        "lanczos_hvps": lz.num_matvecs, "power_hvps": pw.num_matvecs,
        "lanczos_s": lz_seconds, "power_s": pw_seconds,
        "lanczos_failed": int((~lz.converged).sum()), "power_failed": int((~pw.converged).sum()),
        "lanczos_err": error(lz), "power_err": error(pw),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--probes", type=int, default=8, help="probe points (one Hessian each)")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative residual tolerance of both solvers")
    parser.add_argument("--max-iter", type=int, default=300, help="HVP budget per probe, both solvers")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"NTK FCN tanh, depth {DEPTH}, d={IN_FEATURES}, k=1, {args.probes} probes, float32, tol={args.tol}, "
        f"budget {args.max_iter} HVPs/probe, device={device}, threads={torch.get_num_threads()}"
    )
    header = (
        "| width | P | HVPs Lanczos | HVPs power | HVP ratio | time Lanczos (s) | time power (s) "
        "| time ratio | not converged (Lanczos / power) | max rel. error (Lanczos / power) |"
    )
    print(header)
    print("|" + "---|" * header.count(" |"))
    for width in args.widths:
        row = measure(width, args.probes, device, args.tol, args.max_iter)
        mark = "+" if row["power_failed"] else ""
        print(
            f"| {row['width']} | {row['P']:,} | {row['lanczos_hvps']} | {row['power_hvps']}{mark} "
            f"| {row['power_hvps'] / row['lanczos_hvps']:.1f}x{mark} | {row['lanczos_s']:.2f} "
            f"| {row['power_s']:.2f} | {row['power_s'] / row['lanczos_s']:.1f}x{mark} "
            f"| {row['lanczos_failed']} / {row['power_failed']} of {args.probes} "
            f"| {row['lanczos_err']:.1e} / {row['power_err']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
