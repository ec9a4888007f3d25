"""The ``lightning-linearity`` command (also ``python -m lightning_linearity``), built on ``LightningCLI``.

Usage::

    lightning-linearity fit --config fcn_digits [--trainer.max_steps 50] [--print_config]
    lightning-linearity fit --config path/to/your.yaml
    lightning-linearity --version
    lightning-linearity validate|test|predict --config ... --ckpt_path ...
    lightning-linearity sweep ...                     # width sweeps, see lightning_linearity.sweep

``fit``/``validate``/``test``/``predict`` are a standard ``LightningCLI`` in subclass mode: ``model`` is any
``LightningModule`` and ``data`` any ``LightningDataModule``, given by short class name for the package's
own (``NTKFCN``, ``NTKDenseNet``, ``MaskedDAGNet``, ``DigitsDataModule``, ``GaussianDataModule``,
``CIFAR10DataModule``, ``TensorDataModule``; callbacks such as ``LinearityMonitor``; Lightning's loggers)
or by full import path for yours. Differences from a bare ``LightningCLI``:

* ``model.in_features`` is linked to ``data.in_features`` when the data module declares it, so a config
  switches data sets without repeating the input dimension (``out_features`` stays the model's choice:
  one output with +/-1 labels is the papers' setting for two classes).
* the default logger is a ``CSVLogger`` writing under ``runs/``; TensorBoard and W&B are chosen with
  ``trainer.logger`` in a config or on the command line.
* the resolved config is saved as ``config.yaml`` in the run's own directory (the one holding the
  metrics and the report PNGs; see :func:`lightning_linearity.plots.report_dir`), also with W&B.
* expected user errors (unknown class, wrong argument type, missing file or folder, a logger whose
  package is not installed, W&B not logged in) are reported in one line with a non-zero exit status
  instead of a traceback; set ``LIGHTNING_LINEARITY_TRACEBACK=1`` to see the traceback anyway.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import torch
from jsonargparse import ArgumentError

# Imported for their side effect too: subclasses known to Python can be named by their short class name.
import lightning_linearity.callbacks
import lightning_linearity.data
import lightning_linearity.models  # noqa: F401
from lightning_linearity import __version__
from lightning_linearity._compat import MISCONFIGURATION, PRIMARY
from lightning_linearity.callbacks import LinearityMonitor
from lightning_linearity.configs import resolve_args
from lightning_linearity.models import LinearityModule
from lightning_linearity.plots import report_dir

# The command runs on the preferred installed namespace (lightning.pytorch, else pytorch_lightning); the
# package's classes belong to both, so configs name them, and Lightning's loggers, by short class name.
_lightning_cli = importlib.import_module(f"{PRIMARY.__name__}.cli")
LightningArgumentParser = _lightning_cli.LightningArgumentParser
LightningCLI = _lightning_cli.LightningCLI
SaveConfigCallback = _lightning_cli.SaveConfigCallback
Callback, Logger = PRIMARY.Callback, PRIMARY.loggers.Logger
LightningDataModule, LightningModule = PRIMARY.LightningDataModule, PRIMARY.LightningModule

PROG = "lightning-linearity"
#: Environment variable that makes :func:`main` re-raise expected errors with their traceback.
TRACEBACK_ENV = "LIGHTNING_LINEARITY_TRACEBACK"
#: Loggers whose package is an optional extra: class name -> (importable modules, extra to install).
LOGGER_EXTRAS = {
    "WandbLogger": (("wandb",), "wandb"),
    "TensorBoardLogger": (("tensorboard", "tensorboardX"), "tensorboard"),
}
#: The base class of each subclass-mode key, for the list of known classes in "unknown class" errors.
KEY_BASES: dict[str, type] = {
    "model": LightningModule,
    "data": LightningDataModule,
    "trainer.callbacks": Callback,
    "trainer.logger": Logger,
}
TRAINER_DEFAULTS = {
    "logger": {"class_path": f"{PRIMARY.__name__}.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
}
DESCRIPTION = (
    "Train and evaluate wide networks while watching them transition to linearity (NTK, PL*, Hessian "
    f"norm, neuron-gradient cosines). Width sweeps: `{PROG} sweep --help`."
)


class UserError(Exception):
    """A mistake in the user's input, reported by :func:`main` in one line without a traceback."""


class RunConfigCallback(SaveConfigCallback):
    """Save the resolved config as ``config.yaml`` in the run's own directory, on rank 0.

    Lightning's default writes to ``trainer.log_dir``, which for W&B is the shared ``save_dir`` (a second
    run then refuses to start); here the file goes next to the run's metrics and report PNGs.
    """

    def __init__(self, parser: LightningArgumentParser, config: Any, **kwargs: Any) -> None:
        super().__init__(parser, config, **{**kwargs, "save_to_log_dir": False})

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        directory = report_dir(trainer)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / self.config_filename
        self.parser.save(self.config, path, skip_none=False, overwrite=True, multifile=self.multifile)


class LinearityCLI(LightningCLI):
    """``LightningCLI`` with the package's defaults (see the module docstring).

    Args:
        args: command-line arguments (``None`` reads ``sys.argv``), a dict or a Namespace.
        run: run the subcommand (``fit``, ...) after instantiating the classes.
    """

    def __init__(self, args: Any = None, run: bool = True) -> None:
        # exit_on_error=False: parse errors raise ArgumentError, which main() reports in one line.
        parser_kwargs = {"prog": PROG, "description": DESCRIPTION, "exit_on_error": False}
        parser_kwargs.update({name: {"exit_on_error": False} for name in self.subcommands()})
        super().__init__(
            save_config_callback=RunConfigCallback,
            trainer_defaults=TRAINER_DEFAULTS,
            parser_kwargs=parser_kwargs,
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Link ``model.in_features`` to ``data.in_features`` (applied when the data module declares it)."""
        parser.link_arguments("data.in_features", "model.init_args.in_features", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        """Refuse a logger whose optional package is missing (naming the extra to install), and an optimiser
        set twice: by the package model's own arguments and by LightningCLI's ``optimizer``."""
        config = self._subcommand_config()
        _check_one_optimizer(config)
        loggers = config.get("trainer", {}).get("logger")
        for logger in loggers if isinstance(loggers, list) else [loggers]:
            class_path = str(getattr(logger, "class_path", ""))
            modules, extra = LOGGER_EXTRAS.get(class_path.rpartition(".")[2], ((), ""))
            if modules and not any(_importable(module) for module in modules):
                raise UserError(
                    f"{class_path.rpartition('.')[2]} needs the {modules[0]} package: "
                    f"pip install lightning-linearity[{extra}]"
                )

    def after_fit(self) -> None:
        """Say where the run's files are and print the last round of ``linearity/*`` values as a table."""
        if not self.trainer.is_global_zero:
            return
        directory = report_dir(self.trainer)
        files = sorted(p.name for p in directory.glob("*") if p.suffix in (".csv", ".png", ".yaml"))
        print(f"\nRun directory: {directory}\n  files: {', '.join(files) or '(none)'}")
        for callback in self.trainer.callbacks:
            if isinstance(callback, LinearityMonitor) and callback.history:
                print(final_values_table(callback.history))

    def instantiate_classes(self) -> None:
        """Instantiate as usual; a constructor's rejection of its arguments becomes a :class:`UserError`.

        When LightningCLI's ``optimizer`` trains a package model, the model's hyperparameters (what the
        loggers record) name that optimiser and its arguments instead of the model's unused defaults.
        """
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, FileNotFoundError, *MISCONFIGURATION) as err:
            raise UserError(summarize_error(str(err))) from err
        optimizer = self._subcommand_config().get("optimizer")
        if optimizer and isinstance(self.model, LinearityModule):
            init_args = dict(optimizer.get("init_args") or {})
            used = {name: init_args.get(name) for name in MODEL_OPTIMIZER_ARGS if name != "optimizer"}
            used["optimizer"] = str(optimizer.class_path)
            # Loggers record hparams_initial, the copy taken by save_hyperparameters: update both.
            for record in (self.model.hparams, getattr(self.model, "_hparams_initial", None)):
                if record is not None:
                    record.update(used)

    def _subcommand_config(self) -> Any:
        return self.config[self.subcommand] if self.subcommand else self.config


#: The package models' own optimiser arguments (unused when LightningCLI's ``optimizer`` is given).
MODEL_OPTIMIZER_ARGS = ("optimizer", "lr", "momentum", "weight_decay")


def _check_one_optimizer(config: Any) -> None:
    """Raise :class:`UserError` if LightningCLI's ``optimizer`` is given while the package model's own
    optimiser arguments differ from their defaults: one of the two would be silently ignored."""
    optimizer, model = config.get("optimizer"), config.get("model")
    if not optimizer or model is None or not getattr(model, "class_path", None):
        return
    try:
        module, _, name = str(model.class_path).rpartition(".")
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return
    if not (inspect.isclass(cls) and issubclass(cls, LinearityModule)):
        return
    defaults = inspect.signature(LinearityModule.__init__).parameters
    init_args = model.get("init_args") or {}
    given = [
        f"{name}={init_args[name]!r}"
        for name in MODEL_OPTIMIZER_ARGS
        if name in init_args and init_args[name] != defaults[name].default
    ]
    if given:
        raise UserError(
            f"the optimiser is set twice: model.init_args {', '.join(given)} and optimizer "
            f"{str(optimizer.class_path).rpartition('.')[2]}; set it in one place (remove the model's "
            f"optimiser arguments from the config, or drop --optimizer for --model.optimizer / --model.lr)"
        )


def final_values_table(history: list[dict[str, float]]) -> str:
    """A markdown table of the last round, e.g. ``| linearity/lambda_min | 0.0354 |``; a metric measured
    less often (``every_n_rounds``) shows its latest value with that round's step."""
    step = int(history[-1]["step"])
    latest: dict[str, tuple[float, int]] = {}
    for row in history:
        latest.update({key: (value, int(row["step"])) for key, value in row.items() if key != "step"})
    lines = [f"\nLinearity metrics at step {step}:", "| metric | value |", "|---|---|"]
    lines += [
        f"| {key} | {value:.6g}{'' if at == step else f' (step {at})'} |"
        for key, (value, at) in latest.items()
    ]
    return "\n".join(lines)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package fails to import, or a stub without __spec__
        return False


def known_classes(base: type) -> list[str]:
    """Short names of the subclasses of ``base`` that a config can name: defined by this package or by
    Lightning's loggers, public, concrete, and not themselves the base of another of them."""
    found, stack = [], [base]
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        ours = cls.__module__.startswith(("lightning_linearity", f"{PRIMARY.__name__}.loggers"))
        if ours and not cls.__name__.startswith("_") and not inspect.isabstract(cls):
            found.append(cls)
    leaves = [cls for cls in found if not any(other is not cls and issubclass(other, cls) for other in found)]
    return sorted({cls.__name__ for cls in leaves})


# jsonargparse's messages nest "Parser key" / "Errors:" blocks; these lines only describe the structure.
_STRUCTURE = re.compile(
    r"^(Does not validate against any of the Union subtypes|Subtypes:|Errors:|Given value|"
    r"Expected a path but|Problem with given class_path)"
)
# Union alternatives that never explain the mistake (the value was not meant to be None, a bool, a list).
_ALTERNATIVE = re.compile(r"^Expected a <class '(NoneType|bool|collections\.abc\.Iterable)'>")
# Type names as jsonargparse prints them -> as a user reads them.
_TYPE_NAMES = (
    (re.compile(r"Expected a (typing\.)?Literal\[(.*?)\]\."), r"Expected one of \2."),
    (re.compile(r"Expected a <class '(?:builtins\.)?([\w.]+)'>"), r"Expected \1"),
)


def summarize_error(message: str) -> str:
    """One line from a (multi-line) jsonargparse / constructor error: ``where: what``.

    ``where`` is the dotted config key (``model.loss``) or, for a constructor's own check, the class
    (``NTKFCN``); ``what`` is the first line that explains the mistake. An unknown short class name lists
    the known ones.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    lines = [re.sub(r'^(- )?(Parser key "[^"]*":)?\s*', "", line.strip()) for line in message.splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return "invalid arguments"
    given = next((line.partition(":")[2].strip() for line in lines if line.startswith("Given value:")), "")
    class_path = re.search(r"class_path[=\s]'([^']+)'", message)
    candidates = [line for line in lines if not _STRUCTURE.match(line)]
    reasons = [line for line in candidates if not _ALTERNATIVE.match(line)] or candidates or lines
    reason = reasons[0]
    unknown = re.match(r"Expected a dot import path string: (\S+)", reason)
    if unknown:
        base = KEY_BASES.get(keys[0] if keys else "")
        known = f"; known: {', '.join(known_classes(base))}" if base else ""
        reason = f"unknown class {unknown.group(1)!r}{known} (or give a full import path)"
    elif given and not re.search(r"Namespace\(|NestedArg\(", given) and given not in reason:
        reason = f"{reason} (given: {given})"
    for pattern, replacement in _TYPE_NAMES:
        reason = pattern.sub(replacement, reason)
    if keys:
        where = ".".join(keys)
    elif class_path:
        where = class_path.group(1).rpartition(".")[2]
    else:
        return reason
    return reason if reason.startswith(f"{where}:") else f"{where}: {reason}"


def _expected_error(err: BaseException) -> str | None:
    """The one-line report of an error that is the user's to fix (bad input, missing files, W&B account),
    ``None`` for any other error (a bug: its traceback is wanted)."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if isinstance(err, (UserError, FileNotFoundError, *MISCONFIGURATION)):
        return first_line
    if type(err).__module__.startswith("wandb.errors"):
        return f"W&B: {first_line} (to log without an account: WANDB_MODE=offline)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a user error, 2 unparsable arguments).

    ``sweep`` as the first argument is handed to :func:`lightning_linearity.sweep.main`; everything else
    goes to :class:`LinearityCLI`.
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"{PROG} {__version__} (torch {torch.__version__}, {PRIMARY.__name__} {PRIMARY.__version__})")
        return 0
    if args[:1] == ["sweep"]:
        from lightning_linearity.sweep import main as sweep_main

        return sweep_main(args[1:])
    try:
        args = resolve_args(args, "fit")
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    try:
        LinearityCLI(args=args)
    except ArgumentError as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{PROG}: error: {summarize_error(str(err))}", file=sys.stderr)
        return 2
    except Exception as err:
        report = _expected_error(err)
        if report is None or os.environ.get(TRACEBACK_ENV):
            raise
        print(f"{PROG}: error: {report}", file=sys.stderr)
        return 1
    return 0
