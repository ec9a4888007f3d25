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

    lightning-linearity sweep --config fig2_kernel_change [--profile paper] [--jobs 2]
    lightning-linearity sweep --model NTKFCN --model_args '{depth: 3}' --widths [16,32,64,128] \\
        --seeds [0,1] --metrics [kernel_change,hessian_norm:init] --max_steps 500 --out runs/my_sweep
    lightning-linearity sweep --config fig2_kernel_change --print_config     # the resolved sweep as YAML

Flags are the fields of :class:`SweepConfig`, in the style of ``fit`` (jsonargparse); they override the
config file's fields (a path or a packaged sweep's name) and those of its ``--profile``. Exit status: 0
done (and every claim held), 1 a mistake in the configuration (one line on stderr;
``LIGHTNING_LINEARITY_TRACEBACK=1`` shows the traceback), 2 arguments that do not parse, 3 done but a claim
of the config failed.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

from jsonargparse import ArgumentError, ArgumentParser

from lightning_linearity.cli import summarize_error
from lightning_linearity.configs import resolve as resolve_config
from lightning_linearity.sweeps.claims import Claim, ClaimResult, check_claim
from lightning_linearity.sweeps.collect import REDUCTIONS, check_layers, check_metric_specs
from lightning_linearity.sweeps.config import (
    FIT_AGAINST,
    SweepConfig,
    SweepError,
    load_config_file,
    make_config,
)
from lightning_linearity.sweeps.fit import CI_METHODS, SlopeFit
from lightning_linearity.sweeps.pool import run_pending
from lightning_linearity.sweeps.report import (
    CorrectedFit,
    Fit,
    fit_column,
    fit_column_corrected,
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
EXIT_USER_ERROR, EXIT_BAD_ARGUMENTS, EXIT_CLAIM_FAILED = 1, 2, 3


@dataclass(frozen=True)
class SweepResult:
    """What :func:`run_sweep` measured and wrote.

    Attributes:
        config: the sweep.
        rows: the CSV records of its runs (widths ascending, then seeds).
        fits: per metric column, the :class:`~lightning_linearity.sweeps.fit.SlopeFit` or why it has none.
        corrected: with ``log_corrected``, per metric column its log-corrected fits (alpha free, alpha fixed
            at the reference slope; :class:`~lightning_linearity.sweeps.fit.LogCorrectedFit`) or why none.
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
    corrected: dict[str, CorrectedFit] = field(default_factory=dict)

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
        lines = [r.line() for r in self.claims]
        return markdown_report(self.config, self.rows, self.fits, lines, self.corrected)


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
    needing = [claim.column for claim in claims if claim.log_power is not None]
    if needing and not config.log_corrected:
        raise SweepError(f"the log_power claims about {needing} need log_corrected: true")
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
    corrected = (
        {column: fit_column_corrected(rows, column, config) for column in columns}
        if config.log_corrected
        else {}
    )
    results = [check_claim(claim, rows, fits[claim.column], corrected.get(claim.column)) for claim in claims]
    result = SweepResult(config, rows, fits, results, executed, {"csv": store.csv_path}, corrected)
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
#: Fields the command line takes as flags, in the order of :class:`SweepConfig` (everything but claims).
FLAG_FIELDS = tuple(f for f in fields(SweepConfig) if f.name != "claims")


def build_parser(defaults: Mapping[str, Any] | None = None) -> ArgumentParser:
    """The jsonargparse parser of the sweep command: one ``--<field>`` per :class:`SweepConfig` field, typed
    like it, in the flag style of ``fit`` (``--widths [16,32,64]``, ``--model_args '{depth: 3}'``,
    ``--max_steps 500``, ``--progress false``); ``defaults`` (a config file's fields) fill in the rest."""
    parser = ArgumentParser(
        prog=PROG,
        description="Width sweep: train (or initialise) a model at several widths and seeds, collect "
        "transition-to-linearity metrics, fit their log-log slope against the width, write a CSV, a "
        "markdown table and PNG plots. Flags override the fields of --config (and of its --profile); "
        "--print_config prints the resolved sweep as YAML and exits.",
        exit_on_error=False,
        default_meta=False,
    )
    parser.add_argument("--config", type=str | None, help="a sweep YAML file, or a packaged sweep's name")
    parser.add_argument("--profile", type=str | None, help="a named set of overrides of the config")
    hints = get_type_hints(SweepConfig)
    for f in FLAG_FIELDS:
        default = defaults[f.name] if defaults and f.name in defaults else _field_default(f)
        kind = hints[f.name] | None
        parser.add_argument(f"--{f.name}", type=kind, default=default, help=_FIELD_HELP.get(f.name))
    return parser


def _field_default(f: Any) -> Any:
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else None


_FIELD_HELP = {
    "widths": "widths m (positive integers, at least 3), e.g. [16,64,256]",
    "metrics": f"metrics to collect, NAME or NAME:REDUCTION with reductions {list(REDUCTIONS)}",
    "model": "NTKFCN, NTKDenseNet or MaskedDAGNet",
    "model_args": "model arguments, e.g. '{depth: 3}' or '{widths: [1000, m, 1000]}'",
    "seeds": "seeds, one run per width and seed, e.g. [0,1,2]",
    "mode": "train (full-batch GD) or init (measure at initialisation only)",
    "data": "the data set and its arguments, e.g. '{name: digits, num_samples: 20}'",
    "lr": "a fixed step size (then lr_scale is not used)",
    "lr_scale": "step size = lr_scale / lambda_max(K_0), per run (then lr is not used)",
    "monitor_args": "LinearityMonitor metric options, e.g. '{hessian_norm: {max_iter: 200}}'",
    "threads": "torch threads per run (default: the cores divided among the jobs)",
    "fit_against": f"the width the slopes are fitted against, one of {list(FIT_AGAINST)}",
    "ci": f"confidence interval of the slope, one of {list(CI_METHODS)}",
}


def _given(argv: Sequence[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def parse_command_line(argv: Sequence[str]) -> tuple[SweepConfig | None, str | None]:
    """The sweep of the command line, or (with ``--print_config``) ``None`` and the resolved YAML.

    The config file (a path or a packaged sweep's name) and its profile give the defaults, the flags
    override them; ``--lr`` on the command line clears the file's ``lr_scale`` and the other way round.

    Raises:
        SweepError: a config file or profile that does not fit (one line).
        jsonargparse.ArgumentError: flags that do not parse.
    """
    found = {"config": None, "profile": None}
    for i, arg in enumerate(argv):  # --config / --profile first: the file gives the other flags' defaults
        for name in found:
            if arg == f"--{name}" and i + 1 < len(argv):
                found[name] = argv[i + 1]
            elif arg.startswith(f"--{name}="):
                found[name] = arg.partition("=")[2]
    path, profile = found["config"], found["profile"]
    if profile and not path:
        raise SweepError("--profile needs --config")
    values: dict[str, Any] = {}
    if path:
        try:
            path = resolve_config(path, "sweep")
        except ValueError as err:
            raise SweepError(str(err)) from None
        values = load_config_file(path, profile)
    claims = values.pop("claims", ())
    if _given(argv, "--lr"):
        values["lr_scale"] = None
    if _given(argv, "--lr_scale"):
        values["lr"] = None
    parser = build_parser(values)
    parsed = parser.parse_args([arg for arg in argv if arg != "--print_config"])
    if "--print_config" in argv:
        return None, parser.dump(parsed, skip_none=False)
    chosen = {f.name: parsed[f.name] for f in FLAG_FIELDS}
    return make_config({**chosen, "claims": claims}), None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sweep command line; returns the exit status (module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        config, printed = parse_command_line(argv)
    except ArgumentError as err:
        print(f"{PROG}: error: {summarize_error(str(err))}", file=sys.stderr)
        return EXIT_BAD_ARGUMENTS
    except SweepError as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    if config is None:
        print(printed, end="")
        return 0
    try:
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
