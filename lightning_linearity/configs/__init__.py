"""The YAML configs shipped inside the package, usable by name after a plain ``pip install``.

``lightning-linearity fit --config fcn_digits`` runs ``lightning_linearity/configs/fcn_digits.yaml`` and
``lightning-linearity sweep --config fig2_kernel_change`` runs ``configs/sweeps/fig2_kernel_change.yaml``. A
value that names an existing file is used as a path, as LightningCLI does; in a checkout, the top-level
``configs/`` folder is a link to this one, so ``--config configs/fcn_digits.yaml`` works too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

#: The folder holding the packaged configs (``sweeps/`` below it for the sweep command).
DIRECTORY = Path(__file__).resolve().parent

Kind = Literal["fit", "sweep"]


def folder(kind: Kind) -> Path:
    """Where the packaged configs of a command live."""
    return DIRECTORY / "sweeps" if kind == "sweep" else DIRECTORY


def names(kind: Kind = "fit") -> list[str]:
    """The packaged config names of a command (``fit`` for fit/validate/test/predict, or ``sweep``)."""
    return sorted(path.stem for path in folder(kind).glob("*.yaml"))


def resolve(value: str, kind: Kind = "fit") -> str:
    """``value`` itself if it is an existing file or a path; else the packaged config it names.

    Raises:
        ValueError: ``value`` is neither a file nor the name of a packaged config (the message lists them).
    """
    if Path(value).is_file() or any(char in value for char in "/\\{:\n"):
        return value  # a path (a missing one is reported by the parser) or inline YAML
    candidate = folder(kind) / (value if value.endswith((".yaml", ".yml")) else f"{value}.yaml")
    if candidate.is_file():
        return str(candidate)
    raise ValueError(
        f"--config {value!r} does not exist: it is neither a file nor a packaged config; packaged {kind} "
        f"configs: {', '.join(names(kind))}"
    )


def resolve_args(args: Sequence[str], kind: Kind = "fit") -> list[str]:
    """The arguments with each ``--config VALUE`` / ``--config=VALUE`` passed through :func:`resolve`."""
    resolved, args = [], list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" and i + 1 < len(args):
            resolved += [arg, resolve(args[i + 1], kind)]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + resolve(arg.partition("=")[2], kind)
        resolved.append(arg)
        i += 1
    return resolved
