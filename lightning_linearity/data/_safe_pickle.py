"""A restricted unpickler for CIFAR-10 python batches.

A pickle can call any importable function while it loads, so ``pickle.load`` on a file from the internet
is arbitrary code execution. A CIFAR-10 batch is a dict of bytes, ints, lists and one NumPy array; the only
globals it needs are NumPy's array reconstruction (``numpy.core.multiarray._reconstruct``, named
``numpy._core.multiarray._reconstruct`` by NumPy 2), ``numpy.ndarray`` and ``numpy.dtype``. Two more cover
copies re-pickled by Python 3: protocol 5 rebuilds arrays with ``numpy.core.numeric._frombuffer`` (a
``frombuffer`` plus ``reshape``), and protocols <= 2 encode ``bytes`` through ``_codecs.encode(text,
"latin1")``, which is allowed in a form that can only do exactly that. Every other global is refused
before it is looked up, so nothing else is imported or called.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

# The functions numpy pickles arrays with, whatever module name this numpy version gives them.
_reconstruct = np.zeros(0).__reduce__()[0]
_frombuffer = np.zeros(0).__reduce_ex__(5)[0]


def _latin1_encode(text: object, encoding: object = "latin1", errors: object = "strict") -> bytes:
    """``_codecs.encode`` restricted to what protocol-2 pickles of ``bytes`` use."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError(
            f"_codecs.encode is only allowed as encode(str, 'latin1'), got encoding={encoding!r}"
        )
    return text.encode("latin1")


_ALLOWED_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class UnsafePickleError(ValueError):
    """A pickle referenced a global outside the allow-list; nothing from it was executed."""


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only the globals a CIFAR-10 python batch needs.

    Args:
        file: binary file object to read from.
        source: name of the file, used in error messages.
    """

    def __init__(self, file, *, source: str) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str) -> object:
        """Return an allowed global; refuse anything else without importing it."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            allowed = ", ".join(sorted(f"{m}.{n}" for m, n in _ALLOWED_GLOBALS))
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle the global '{module}.{name}'. A CIFAR-10 python "
                f"batch only needs {allowed}; this file is not a plain CIFAR-10 batch and was not loaded."
            ) from None

    def persistent_load(self, pid: object) -> object:
        """Refuse persistent ids (a CIFAR batch has none)."""
        raise UnsafePickleError(
            f"{self._source}: refusing a persistent id in the pickle; not a CIFAR-10 batch"
        )


def load_restricted_pickle(path: str | Path) -> object:
    """Unpickle ``path`` with :class:`RestrictedUnpickler`.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        UnsafePickleError: (a ``ValueError``) if the pickle references a global outside the allow-list.
        ValueError: if the file is not a readable pickle (truncated, corrupted), naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open("rb") as f:
        try:
            return RestrictedUnpickler(f, source=str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as err:  # corrupted pickles fail in many ways (EOFError, UnpicklingError, ...)
            raise ValueError(
                f"{path}: not a readable pickle ({type(err).__name__}: {err}); "
                "expected a CIFAR-10 python batch"
            ) from err
