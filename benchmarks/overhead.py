"""LinearityMonitor's cost: training overhead on the digits FCN, and the DDP split of one metric round.

    python benchmarks/overhead.py                      # both parts with every metric (defaults)
    python benchmarks/overhead.py --part overhead --metrics ntk kernel_change grad_cosines linearization
    python benchmarks/overhead.py --part ddp --option hessian_norm.num_points=2
    python benchmarks/overhead.py --part overhead --every-n-rounds hessian_norm=4

Part 1 (overhead): the digits FCN example (NTKFCN, width 1024, depth 3, tanh, 10 outputs, square loss,
SGD, batch 64) trained for ``--steps`` optimiser steps without the callback and with LinearityMonitor
measuring ``--metrics`` (default: all five, with the callback's default options) every ``--every`` steps.
The two runs alternate ``--repeats`` times in one process; the fastest of each counts, and the overhead is
t_with / t_without - 1; also printed: the rounds' own time / t_without, steadier on a busy machine. The
monitor's rounds (step 0, every ``--every`` steps, the end) and the stages of a round (``Kernel`` = ntk +
kernel_change, ``Hessian``, ``Cosines``, ``Linearization``) are timed too.

Part 2 (DDP split): the same network, metric rounds on 1 rank and on 2 ranks of ``strategy="ddp"`` (gloo,
CPU), each rank with ``--threads`` torch threads: ranks stand for devices, so the 2-rank run is meant to
have twice the hardware. Each run is a fresh process tree; a round is timed between two barriers, and the
fastest round after the first (which also takes K_0 and w_0) counts. Besides wall time, the CPU time of
the busiest rank shows how the work divides whatever else runs on the machine, and a control measures how
much parallelism the machine offers at that moment: two processes sharing a fixed compute job against one
process doing all of it (0.5 with two free cores, 1.0 with one core's worth), measured before and after the
rounds, with the load average.

``--model foreign`` measures a model the package does not know instead (``nn.Sequential`` 64 -> 1024 ->
1024 -> 1024 -> 10, ReLU, square loss): the metrics take the per-module engine and the other foreign-model
paths. ``--code DIR [DIR ...]`` imports the package from each of these checkouts in turn (e.g. the code
before and after a change, ``git archive <commit> | tar -x -C DIR``), runs interleaved:

    python benchmarks/overhead.py --part ddp --model foreign --probe-size 64 --round-steps 3 \
        --metrics ntk kernel_change hessian_norm grad_cosines \
        --option hessian_norm.num_points=8 --option grad_cosines.num_points=32 --code /tmp/before /tmp/after
"""

from __future__ import annotations

import argparse
import ast
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.strategies import DDPStrategy
from torch import nn

from lightning_linearity.callbacks import LinearityMonitor
from lightning_linearity.data import DigitsDataModule
from lightning_linearity.models import NTKFCN

WIDTH, DEPTH = 1024, 3
METRICS = ("ntk", "kernel_change", "hessian_norm", "grad_cosines", "linearization")


class TimedMonitor(LinearityMonitor):
    """LinearityMonitor recording the wall time of each metric round (between barriers under DDP), the CPU
    time of its busiest rank, and the wall time of each stage of a round."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.round_seconds: list[float] = []
        self.round_cpu_seconds: list[float] = []
        self.stage_seconds: dict[str, list[float]] = {}

    def _round(self, trainer, pl_module, take_references=False):
        rounds, strategy = len(self.history), trainer.strategy
        strategy.barrier()
        start, cpu = time.perf_counter(), time.process_time()
        super()._round(trainer, pl_module, take_references)
        cpu = torch.tensor(time.process_time() - cpu)
        strategy.barrier()
        if len(self.history) > rounds:
            self.round_seconds.append(time.perf_counter() - start)
            busiest = strategy.reduce(cpu, reduce_op="max") if strategy.world_size > 1 else cpu
            self.round_cpu_seconds.append(float(busiest))

    def _run_stage(self, strategy, stage, ctx, step):
        start = time.perf_counter()
        values = super()._run_stage(strategy, stage, ctx, step)
        self.stage_seconds.setdefault(type(stage).__name__, []).append(time.perf_counter() - start)
        return values

    def stage_summary(self) -> str:
        """Median seconds per round of each stage, e.g. ``Kernel 0.41 s, Hessian 12.30 s``."""
        return ", ".join(f"{name} {statistics.median(s):.2f} s" for name, s in self.stage_seconds.items())


def metric_options(args) -> dict[str, dict]:
    """``--metrics`` with the ``--option metric.name=value`` settings (values as Python literals)."""
    metrics: dict[str, dict] = {name: {} for name in args.metrics}
    for option in args.option:
        key, value = option.split("=", 1)
        name, field = key.split(".", 1)
        metrics[name][field] = ast.literal_eval(value)
    return metrics


def monitor(args, every: int | None) -> TimedMonitor:
    periods = {name: int(n) for name, n in (item.split("=", 1) for item in args.every_n_rounds)}
    return TimedMonitor(
        metrics=metric_options(args),
        every_n_steps=every,
        probe_size=args.probe_size,
        plots=False,
        every_n_rounds=periods,
    )


def digits(args) -> DigitsDataModule:
    return DigitsDataModule(batch_size=args.batch_size, seed=0)


class ForeignMLP(pl.LightningModule):
    """A model the package does not know: ``nn.Sequential`` in -> 1024 -> 1024 -> 1024 -> out with ReLU,
    square loss on one-hot targets, SGD. The monitor measures it on the engine / generic paths."""

    def __init__(self, in_features: int, out_features: int, lr: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        sizes = [in_features, *[WIDTH] * DEPTH]
        hidden = [m for a, b in itertools.pairwise(sizes) for m in (nn.Linear(a, b), nn.ReLU())]
        self.net = nn.Sequential(*hidden, nn.Linear(WIDTH, out_features))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return 0.5 * (out - F.one_hot(y, out.shape[1]).to(out)).pow(2).sum(dim=1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def network(data: DigitsDataModule, args) -> pl.LightningModule:
    if args.model == "foreign":
        return ForeignMLP(data.in_features, data.out_features, args.lr)
    return NTKFCN(data.in_features, data.out_features, width=WIDTH, depth=DEPTH, init_seed=0, lr=args.lr)


def trainer(args, callbacks, root: Path, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        limit_val_batches=0,
        logger=CSVLogger(root, name="", version=""),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


# ------------------------------------------------------------------------------------------- part 1
def overhead(args) -> None:
    """Fastest training time without and with the monitor, alternating runs."""
    times: dict[str, list[float]] = {"without": [], "with": []}
    for repeat in range(args.repeats):
        for name in ("without", "with"):
            callbacks = [monitor(args, args.every)] if name == "with" else []
            data = digits(args)
            with tempfile.TemporaryDirectory() as root:
                run = trainer(args, callbacks, Path(root))
                model = network(data, args)
                start = time.perf_counter()
                run.fit(model, datamodule=data)
                times[name].append(time.perf_counter() - start)
            timed = callbacks[0] if callbacks else None
            print(f"  repeat {repeat}: {name:7s} {times[name][-1]:7.2f} s", file=sys.stderr, flush=True)
    without, with_ = min(times["without"]), min(times["with"])
    print(f"overhead: {args.steps} steps of batch {args.batch_size}, a round every {args.every} steps")
    print(f"  without {without:.1f} s, with {with_:.1f} s -> overhead {100 * (with_ / without - 1):.1f}%")
    print(
        f"  rounds {', '.join(f'{s:.2f}' for s in timed.round_seconds)} s; per round: {timed.stage_summary()}"
    )
    # steadier on a busy machine: the rounds' own time against the training time
    print(f"  rounds / training without the callback: {100 * sum(timed.round_seconds) / without:.1f}%")


# ------------------------------------------------------------------------------------------- part 2
def ddp_round(args) -> None:
    """Inside one run of 1 or 2 ranks: time metric rounds; rank 0 prints them as JSON."""
    timed = monitor(args, every=1)
    ddp = DDPStrategy(process_group_backend="gloo", timeout=timedelta(minutes=30))
    data = digits(args)
    with tempfile.TemporaryDirectory() as root:
        run = trainer(
            args, [timed], Path(root), devices=args.devices, strategy=ddp if args.devices > 1 else "auto"
        )
        run.fit(network(data, args), datamodule=data)
    if run.is_global_zero:
        summary = {
            "wall": timed.round_seconds,
            "cpu": timed.round_cpu_seconds,
            "stages": timed.stage_summary(),
        }
        print("ROUNDS " + json.dumps(summary), flush=True)


def control_job(args) -> None:
    """The parallelism control's job: wait for the common start time, multiply matrices, print seconds."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    time.sleep(max(0.0, args.control_start - time.time()))
    start = time.perf_counter()
    for _ in range(args.control_iters):
        a @ b
    print(time.perf_counter() - start, flush=True)


def parallel_control(args, iterations: int = 400) -> float:
    """Wall time of a fixed compute job split over 2 concurrent processes / done by 1 process."""

    def slowest(iters: int, processes: int) -> float:
        start = str(time.time() + 20)  # every process has imported torch by then
        command = [sys.executable, __file__, "--control-start", start, "--threads", str(args.threads)]
        jobs = [
            subprocess.Popen([*command, "--control-iters", str(iters)], stdout=subprocess.PIPE, text=True)
            for _ in range(processes)
        ]
        return max(float(job.communicate()[0]) for job in jobs)

    return slowest(iterations // 2, 2) / slowest(iterations, 1)


def rounds_run(args, devices: int, code: str | None) -> dict:
    """One fresh process tree of ``devices`` ranks (importing the package from ``code`` if given)."""
    command = [sys.executable, __file__, "--ddp-round", "--devices", str(devices), "--model", args.model]
    command += ["--steps", str(args.round_steps), "--threads", str(args.threads)]
    command += ["--probe-size", str(args.probe_size), "--batch-size", str(args.batch_size)]
    command += ["--lr", str(args.lr), "--metrics", *args.metrics]
    command += [f"--option={option}" for option in args.option]
    command += [f"--every-n-rounds={item}" for item in args.every_n_rounds]
    env = {**os.environ, "PYTHONPATH": code} if code else None
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=env).stdout
    run = json.loads(next(line for line in out.splitlines() if line.startswith("ROUNDS "))[7:])
    print(f"  {code or 'this checkout'}, {devices} rank(s): {run}", file=sys.stderr, flush=True)
    return run


def work_division(args) -> tuple[float, float]:
    """CPU seconds of a round's stages for 1 rank and for 2 ranks (per stage the slower rank's share of the
    rows, then the values from all rows), run in this process: the work split without collectives or a
    second process. Random probe inputs and targets; the fastest of two repeats per stage."""
    # imported here: the rank processes of --code may import an older checkout without these names
    from lightning_linearity.callbacks._probe import ProbeSet
    from lightning_linearity.callbacks._stages import RoundContext, build_stages, parse_metrics
    from lightning_linearity.metrics import as_layered_net

    data = digits(args)
    model = network(data, args).eval()
    measured = as_layered_net(model) or model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.probe_size, data.in_features, generator=generator)
    y = torch.randn(args.probe_size, data.out_features, generator=generator)
    ctx = RoundContext(measured, ProbeSet(x), y, seed=0, take_references=False, lr=args.lr)
    totals = [0.0, 0.0]
    for stage in build_stages(parse_metrics(metric_options(args))):
        stage.setup(measured, torch.float32)
        n = stage.num_units(ctx)
        rows = stage.rows(ctx, slice(0, n))
        stage.values(ctx, rows)  # the references (K_0, w_0) of the first round
        for index, ranks in enumerate((1, 2)):
            seconds = []
            for rank in range(ranks):  # the ranks meet at every stage's gather: the slower one counts
                best = float("inf")
                for _ in range(2):
                    start = time.process_time()
                    stage.rows(ctx, slice(rank * n // ranks, (rank + 1) * n // ranks))
                    stage.values(ctx, rows)
                    best = min(best, time.process_time() - start)
                seconds.append(best)
            totals[index] += max(seconds)
    return totals[0], totals[1]


def ddp_split(args) -> None:
    """Metric rounds on 1 rank and on 2 ranks, each a fresh process tree, and the parallelism control
    (measured twice: before and after the rounds); with ``--code``, the runs of each tree interleaved."""
    print(f"  load before: {Path('/proc/loadavg').read_text().strip()}", flush=True)
    controls = [parallel_control(args)]
    codes = args.code or [None]
    runs = {(code, devices): rounds_run(args, devices, code) for devices in (1, 2) for code in codes}
    controls.append(parallel_control(args))
    one_rank, two_ranks = work_division(args)
    print(f"ddp split, {args.model} model, one metric round, {args.threads} thread(s) per rank:")
    for code in codes:
        one, two = runs[code, 1], runs[code, 2]
        # the rounds after the first (which also takes K_0 and w_0): the fastest counts
        (wall_1, wall_2), (cpu_1, cpu_2) = ([min(r[key][1:]) for r in (one, two)] for key in ("wall", "cpu"))
        print(f" {code or 'this checkout'}:")
        print(f"  wall: 1 rank {wall_1:.2f} s, 2 ranks {wall_2:.2f} s -> ratio {wall_2 / wall_1:.2f}")
        print(
            f"  CPU of the busiest rank: 1 rank {cpu_1:.2f} s, 2 ranks {cpu_2:.2f} s -> "
            f"ratio {cpu_2 / cpu_1:.2f}"
        )
        print(f"  per round, 1 rank: {one['stages']}; 2 ranks: {two['stages']}")
    print(
        f"  control: 2 processes sharing a fixed job / 1 process doing it: {controls[0]:.2f} before the "
        f"rounds, {controls[1]:.2f} after"
    )
    print(
        f"  work division (this checkout, one process, no collectives): a round's stages take {one_rank:.2f} "
        f"s of CPU on 1 rank, {two_ranks:.2f} s on 2 (the slower per stage) -> {two_ranks / one_rank:.2f}"
    )
    print(f"  load after: {Path('/proc/loadavg').read_text().strip()}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--part", choices=("overhead", "ddp", "both"), default="both")
    parser.add_argument("--metrics", nargs="+", choices=METRICS, default=list(METRICS))
    parser.add_argument("--option", action="append", default=[], help="metric.name=value (repeatable)")
    parser.add_argument(
        "--every-n-rounds", action="append", default=[], help="metric=n: the monitor's every_n_rounds"
    )
    parser.add_argument("--probe-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of the part 1 runs")
    parser.add_argument("--every", type=int, default=50, help="every_n_steps of the monitor in part 1")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of part 1")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (per rank in part 2)")
    parser.add_argument(
        "--round-steps", type=int, default=2, help="steps of the part 2 runs: steps + 1 rounds"
    )
    parser.add_argument(
        "--model",
        choices=("ntkfcn", "foreign"),
        default="ntkfcn",
        help="the package's NTKFCN or a foreign MLP",
    )
    parser.add_argument(
        "--code", nargs="+", default=None, help="part 2: checkouts to import the package from, interleaved"
    )
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--ddp-round", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--control-start", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--control-iters", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ddp_round:
        ddp_round(args)
    elif args.control_start is not None:
        control_job(args)
    else:
        print(
            f"torch {torch.__version__}, {args.threads} thread(s), {args.model} width {WIDTH} depth {DEPTH}, "
            f"digits"
        )
        print(
            f"probe {args.probe_size}, metrics (callback defaults unless given here) {metric_options(args)}, "
            f"every_n_rounds {args.every_n_rounds or 'none'}"
        )
        if args.part in ("overhead", "both"):
            overhead(args)
        if args.part in ("ddp", "both"):
            ddp_split(args)


if __name__ == "__main__":
    main()
