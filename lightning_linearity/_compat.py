"""The package's one door to Lightning: ``lightning`` (``lightning.pytorch``) and ``pytorch_lightning`` alike.

Lightning ships the same trainer under two import names, and each Trainer only accepts objects of its own
namespace (``isinstance(model, <its>.LightningModule)``, ``issubclass(cls, <its>.Callback)`` in LightningCLI).
So that the package's callback, LightningModules and DataModules work whichever Trainer the user builds,
even with both packages installed, the base classes here derive from the classes of *every* installed
namespace (``lightning.pytorch`` first, so its implementation of each default hook is the one that runs).

Lightning decides some behaviour by asking whether a hook is overridden, comparing the code of the
instance's method with its own class's (``is_overridden``). The two namespaces are generated from one
source, so most default hooks compare equal across them and look "not overridden" to both Trainers. The
few whose code differs would look overridden to ``pytorch_lightning``; those whose absence means something
(a data loader that is not there, the deprecated ``configure_sharded_model``) are set to ``None`` here,
which every Trainer reads as "not defined", exactly what the default means. The tests run every public
class under both Trainers.

Everything else in the package reaches Lightning through :func:`classes` (an ``isinstance`` tuple over
the installed namespaces), :func:`namespace_of` and the names exported below.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

#: Import names of the Lightning trainer namespaces, in order of preference.
NAMESPACE_NAMES = ("lightning.pytorch", "pytorch_lightning")


def _import_namespaces() -> tuple[ModuleType, ...]:
    found = []
    for name in NAMESPACE_NAMES:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            continue
    if not found:
        raise ImportError(
            "lightning-linearity needs Lightning: `pip install lightning` (or pytorch-lightning)"
        )
    return tuple(found)


#: The installed namespaces, ``lightning.pytorch`` first.
NAMESPACES: tuple[ModuleType, ...] = _import_namespaces()
#: The namespace used where the package itself builds a Trainer or a LightningCLI.
PRIMARY: ModuleType = NAMESPACES[0]


def classes(path: str) -> tuple[type, ...]:
    """The class at ``path`` (e.g. ``"strategies.DDPStrategy"``) in every installed namespace.

    For ``isinstance`` checks against objects that may come from either namespace.
    """
    found = []
    for namespace in NAMESPACES:
        obj: Any = namespace
        try:
            for part in path.split("."):
                obj = getattr(obj, part, None) or importlib.import_module(f"{obj.__name__}.{part}")
        except ImportError:
            continue
        found.append(obj)
    return tuple(found)


def namespace_of(obj: object) -> ModuleType:
    """The Lightning namespace ``obj`` (a Trainer, a strategy, a logger, ...) belongs to."""
    module = type(obj).__module__
    for namespace in NAMESPACES:
        if module == namespace.__name__ or module.startswith(namespace.__name__ + "."):
            return namespace
    return PRIMARY


#: Every installed namespace's ``MisconfigurationException``, to catch what Lightning itself raises.
MISCONFIGURATION: tuple[type[Exception], ...] = classes("utilities.exceptions.MisconfigurationException")


class MisconfigurationException(*MISCONFIGURATION):  # type: ignore[misc]
    """Raised by the package for a wrong argument or setting; an instance of every installed namespace's
    ``MisconfigurationException``, so ``except`` clauses written for either one catch it."""


class Callback(*classes("callbacks.Callback")):  # type: ignore[misc]
    """Base of the package's callbacks: a ``Callback`` of every installed Lightning namespace."""


class LightningModule(*classes("LightningModule")):  # type: ignore[misc]
    """Base of the package's LightningModules: a ``LightningModule`` of every installed namespace."""

    # Hooks whose absence means something to a Trainer (see the module docstring). A subclass that
    # defines one overrides these.
    configure_sharded_model = None
    train_dataloader = None
    val_dataloader = None
    test_dataloader = None
    predict_dataloader = None


class LightningDataModule(*classes("LightningDataModule")):  # type: ignore[misc]
    """Base of the package's DataModules: a ``LightningDataModule`` of every installed namespace."""

    train_dataloader = None
    val_dataloader = None
    test_dataloader = None
    predict_dataloader = None


__all__ = [
    "MISCONFIGURATION",
    "NAMESPACES",
    "NAMESPACE_NAMES",
    "PRIMARY",
    "Callback",
    "LightningDataModule",
    "LightningModule",
    "MisconfigurationException",
    "classes",
    "namespace_of",
]
