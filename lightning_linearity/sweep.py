"""Width sweeps: watch transition to linearity happen, with the scaling exponent measured.

For a model config and a list of widths m (and seeds), every run trains with full-batch gradient descent on
the square loss (or stays at init), a :class:`~lightning_linearity.callbacks.LinearityMonitor` measures
the metrics along the way, and the sweep fits each collected metric against the width on log-log axes:
log y = a + alpha log m over all runs, with a confidence interval for alpha (regression t-interval or
bootstrap). The papers predict alpha = -1/2 for the Hessian norm and the relative kernel change (004
Theorem 3.6, Figure 2). Outputs in the ``out`` folder:

* ``runs.jsonl`` (append-only, crash-safe; the record of truth) and its view ``runs.csv``: one row per
  run, keyed by the hash of its parameters, so a rerun skips finished runs; ``histories.jsonl``: every
  run's metric rounds and losses. Two sweeps started on one folder share its runs (each run is claimed
  under a lock before it starts) and never run one twice; a record cut short by a killed process is
  skipped with a warning and its run done again;
* ``<name>.md``: the fitted exponents, the claims checked, per-width means and step-size diagnostics;
* ``<name>_<metric>.png``: metric vs width, log-log, with the fitted line and the 1/sqrt(m) reference;
  ``<name>_<quantity>_vs_step.png`` for the ``curves`` of the config: the quantity along training.

Command line (``lightning-linearity sweep ...`` or ``python -m lightning_linearity.sweep ...``)::

    lightning-linearity sweep --config configs/sweeps/fig2_kernel_change.yaml [--profile paper] [--jobs 2]
    lightning-linearity sweep --model NTKFCN --model-arg depth=3 --widths 16 32 64 128 --seeds 0 1 \\
        --metrics kernel_change hessian_norm:init --max-steps 500 --out runs/my_sweep

Flags override the config file's fields. Exit status: 0 done (and every claim held), 1 a mistake in the
configuration (one line on stderr; ``LIGHTNING_LINEARITY_TRACEBACK=1`` shows the traceback), 2 arguments
that do not parse, 3 done but a claim of the config failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_linearity.sweeps.claims import Claim, ClaimResult, check_claim
from lightning_linearity.sweeps.collect import REDUCTIONS, check_layers, check_metric_specs
from lightning_linearity.sweeps.config import (
    DEFAULT_DATA,
    FIT_AGAINST,
    SweepConfig,
    SweepError,
    load_config_file,
    make_config,
)
from lightning_linearity.sweeps.fit import CI_METHODS, SlopeFit
from lightning_linearity.sweeps.pool import run_pending
from lightning_linearity.sweeps.report import (
    Fit,
    fit_column,
    markdown_report,
    slug,
    write_curves,
    write_plot,
)
from lightning_linearity.sweeps.run import build_data, build_model, execute_run
from lightning_linearity.sweeps.store import RunStore

__all__ = ["SweepConfig", "SweepError", "SweepResult", "main", "run_sweep"]

PROG = "lightning-linearity sweep"
#: Environment variable that makes :func:`main` re-raise configuration errors with their traceback.
TRACEBACK_ENV = "LIGHTNING_LINEARITY_TRACEBACK"
EXIT_USER_ERROR, EXIT_CLAIM_FAILED = 1, 3


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` measured and wrote.

    Attributes:
        config: the sweep.
        rows: the CSV records of its runs (widths ascending, then seeds).
        fits: per metric column, the :class:`~lightning_linearity.sweeps.fit.SlopeFit` or why it has none.
        claims: the checked claims of the config.
        executed: runs executed by this call (the others were finished before).
        files: ``"csv"``, ``"report"`` and one entry per plotted column -> path.
    """

    config: SweepConfig
    rows: list[dict[str, Any]]
    fits: dict[str, Fit]
    claims: list[ClaimResult]
    executed: int
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """Whether every claim held (true when there are none)."""
        return all(result.passed for result in self.claims)

    def slope(self, column: str) -> SlopeFit:
        """The fit of ``column``; ``ValueError`` if it has none."""
        fit = self.fits[column]
        if isinstance(fit, str):
            raise ValueError(f"{column}: {fit}")
        return fit

    def report(self) -> str:
        """The markdown report (also written to ``files["report"]``)."""
        return markdown_report(self.config, self.rows, self.fits, [r.line() for r in self.claims])


def _preflight(config: SweepConfig) -> tuple[list[str], list[Claim]]:
    """Build the data and the narrowest model once, so that mistakes surface before any run starts.

    Returns the metric columns the sweep fills and its parsed claims.
    """
    specs = check_metric_specs(config.metrics, config.mode)
    try:
        data = build_data(config)
    except (TypeError, ValueError) as err:
        raise SweepError(f"cannot build the data {dict(config.data)}: {err}") from None
    try:
        model = build_model(config, min(config.widths), config.seeds[0], data.in_features)
    except (TypeError, ValueError) as err:
        raise SweepError(
            f"cannot build {config.model} with model_args {dict(config.model_args)}: {err}"
        ) from None
    layer_names = model.layered_net.hidden_layer_names
    try:
        check_layers(specs, layer_names)
    except ValueError as err:
        raise SweepError(str(err)) from None
    columns = [column for spec in specs for column, _ in spec.columns(layer_names)]
    try:
        claims = [Claim.from_mapping(raw, columns) for raw in config.claims]
    except ValueError as err:
        raise SweepError(str(err)) from None
    return columns, claims


def run_sweep(config: SweepConfig) -> SweepResult:
    """Run (or resume) a width sweep, fit the exponents, check the claims and write the outputs.

    Raises:
        SweepError: a configuration the sweep cannot run (checked before any run starts).
    """
    columns, claims = _preflight(config)
    try:
        store = RunStore(config.out)
    except OSError as err:  # not a folder, not writable, ...
        raise SweepError(f"cannot use the output folder {config.out}: {err}") from None
    specs = config.runs()
    executed = run_pending(
        specs,
        store,
        execute_run,
        jobs=config.jobs,
        threads=config.threads,
        progress=config.progress,
        name=config.name,
    )
    rows = store.rows(spec.run_id for spec in specs)
    fits = {column: fit_column(rows, column, config) for column in columns}
    results = [check_claim(claim, rows, fits[claim.column]) for claim in claims]
    result = SweepResult(config, rows, fits, results, executed, {"csv": store.csv_path})
    out = Path(config.out)
    report = out / f"{slug(config.name)}.md"
    report.write_text(result.report())
    result.files["report"] = report
    for column, fit in fits.items():
        if isinstance(fit, SlopeFit):
            path = out / f"{slug(config.name)}_{slug(column)}.png"
            write_plot(path, config, column, rows, fit)
            result.files[column] = path
    histories = store.histories(row["run_id"] for row in rows) if config.curves else {}
    for name in config.curves:
        path = out / f"{slug(config.name)}_{slug(name)}_vs_step.png"
        write_curves(path, config, name, rows, histories)
        result.files[f"{name} vs step"] = path
    return result


# ------------------------------------------------------------------------------------------ command line
def _key_values(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """``["depth=3", "widths=[1000, m, 1000]"]`` -> ``{"depth": 3, "widths": [1000, "m", 1000]}``.

    Values are read as YAML.
    """
    parsed = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SweepError(f"{flag} takes KEY=VALUE, got {item!r}")
        try:
            parsed[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise SweepError(f"{flag} {item!r}: the value is not valid YAML ({err})") from None
    return parsed


def _optional_number(kind: type) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        argument_default=argparse.SUPPRESS,
        description="Width sweep: train (or initialise) a model at several widths and seeds, collect "
        "transition-to-linearity metrics, fit their log-log slope against the width, write a CSV, a "
        "markdown table and PNG plots. Flags override the fields of --config.",
    )
    add = parser.add_argument
    add("--config", help="YAML file with the sweep's fields (see configs/sweeps/)")
    add("--profile", help="apply this named set of overrides from the config's `profiles` (e.g. ci, paper)")
    add("--name", help="the sweep's name (titles and file names)")
    add("--model", help="NTKFCN, NTKDenseNet or MaskedDAGNet")
    add(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="model argument (repeatable), e.g. depth=3 or 'widths=[1000, m, 1000]'",
    )
    add("--widths", nargs="+", type=int, metavar="M", help="widths (positive integers, at least 3)")
    add("--seeds", nargs="+", type=int, metavar="S", help="seeds; one run per width and seed")
    add(
        "--metrics",
        nargs="+",
        metavar="NAME[:RED]",
        help=f"metrics to collect, reductions {list(REDUCTIONS)}",
    )
    add("--mode", choices=["train", "init"], help="train with full-batch GD, or measure at init only")
    add("--data", help="data set: digits or gaussian")
    add("--data-arg", action="append", metavar="KEY=VALUE", help="data module argument (repeatable)")
    add("--max-steps", type=int, help="gradient-descent steps at most")
    add(
        "--loss-threshold",
        type=_optional_number(float),
        help="stop once the training loss is below this (none: never)",
    )
    add("--lr", type=float, help="a fixed step size (instead of --lr-scale)")
    add("--lr-scale", type=float, help="step size = LR_SCALE / lambda_max(K_0), per run")
    add(
        "--every-n-steps",
        type=_optional_number(int),
        help="a metric round every N steps (none: at init and end only)",
    )
    add(
        "--monitor-arg",
        action="append",
        metavar="METRIC.OPTION=VALUE",
        help="LinearityMonitor metric option, e.g. hessian_norm.max_iter=200",
    )
    add("--out", help="output folder")
    add("--jobs", type=int, help="runs in parallel processes")
    add("--threads", type=int, help="torch threads per run (default: the cores divided among the jobs)")
    add(
        "--fit-against",
        choices=list(FIT_AGAINST),
        help="fit slopes against the swept width or 004 Def. 2.7's",
    )
    add("--ci", choices=list(CI_METHODS), help="confidence interval of the slope")
    add("--confidence", type=float, help="level of the interval, e.g. 0.95")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    """The :class:`SweepConfig` from a config file (and profile) overridden by the flags given.

    ``--data NAME`` switches the data set (with that data module's defaults); ``--data-arg``,
    ``--model-arg`` and ``--monitor-arg`` update single entries; ``--lr`` replaces ``lr_scale`` and the
    other way round.
    """
    given = vars(args).copy()  # the parser suppresses defaults: only the flags given are present
    path, profile = given.pop("config", None), given.pop("profile", None)
    if profile and not path:
        raise SweepError("--profile needs --config")
    values = load_config_file(path, profile) if path else {}
    if "lr" in given:
        values["lr_scale"] = None
    if "lr_scale" in given:
        values["lr"] = None
    values["model_args"] = {
        **values.get("model_args", {}),
        **_key_values(given.pop("model_arg", None), "--model-arg"),
    }
    data = {"name": given.pop("data")} if "data" in given else dict(values.get("data", DEFAULT_DATA))
    values["data"] = {**data, **_key_values(given.pop("data_arg", None), "--data-arg")}
    monitor = {metric: dict(options or {}) for metric, options in values.get("monitor_args", {}).items()}
    for key, value in _key_values(given.pop("monitor_arg", None), "--monitor-arg").items():
        metric, dot, option = key.partition(".")
        if not dot:
            raise SweepError(f"--monitor-arg takes METRIC.OPTION=VALUE, got {key!r}")
        monitor.setdefault(metric, {})[option] = value
    values["monitor_args"] = monitor
    if given.pop("no_progress", False):
        values["progress"] = False
    values.update(given)
    return make_config(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep command line; returns the exit status (module docstring)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        result = run_sweep(config)
    except SweepError as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(result.report())
    resumed = len(result.rows) - result.executed
    print(
        f"{len(result.rows)} runs ({resumed} resumed from {result.files['csv']}); wrote "
        + ", ".join(str(path) for key, path in result.files.items() if key != "csv")
    )
    if not result.passed:
        failed = sum(not r.passed for r in result.claims)
        print(f"{failed} of {len(result.claims)} claims FAILED", file=sys.stderr)
        return EXIT_CLAIM_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
