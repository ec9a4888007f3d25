"""Files that several processes append to safely: JSON-lines logs, an exclusive lock, liveness markers.

:class:`AppendLog`: one JSON object per line, appended as ``json.dumps(entry) + "\\n"`` with a single
``os.write`` on a descriptor opened with ``O_APPEND`` and made durable with ``fsync``. Nothing is ever
rewritten, so a process killed mid-write can only leave one torn line at the end of the file; readers skip a
line that does not parse, with a warning, and the next writer first ends the torn line, so it never glues
itself onto a good entry.

:class:`FolderLock`: an exclusive ``fcntl.flock`` on a lock file, held only for short read-modify-append
steps. :class:`Liveness`: a process marks itself alive by holding an exclusive ``flock`` on its own file;
the kernel drops the lock when the process exits or is killed, so others can tell a live owner from a dead
one (no pid reuse, no clocks). On platforms without ``fcntl`` (Windows) the locks are no-ops and every owner
counts as dead: concurrent writers are then not coordinated.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def _json_default(value: Any) -> Any:
    """Numbers from numpy / torch scalars; anything else as its text (as a CSV cell would hold it)."""
    item = getattr(value, "item", None)
    return item() if callable(item) else str(value)


def encode_line(entry: Any) -> bytes:
    """One entry as one JSON line (NaN and infinities written as JSON5 ``NaN``/``Infinity``)."""
    return (json.dumps(entry, allow_nan=True, default=_json_default) + "\n").encode()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class FolderLock:
    """An exclusive ``flock`` on ``path`` (created if missing) inside ``with lock:``; re-entrant."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._depth = 0

    def __enter__(self) -> FolderLock:
        if self._depth == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)
                except BaseException:
                    os.close(fd)
                    raise
            self._fd = fd
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


class Liveness:
    """Marker files ``folder/<token>``: one held (``flock``-ed) by each live owner."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @contextmanager
    def hold(self, token: str) -> Iterator[None]:
        """Mark ``token`` alive for the duration of the block (and no longer if the process dies)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / token
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    def is_alive(self, token: str) -> bool:
        """Whether the owner ``token`` still holds its marker; a dead owner's marker is removed."""
        if fcntl is None or not token or os.sep in token or token.startswith("."):
            return False
        path = self.folder / token
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            path.unlink(missing_ok=True)  # its owner died without cleaning up
            return False
        finally:
            os.close(fd)


class AppendLog:
    """An append-only JSON-lines file, read incrementally (see the module docstring).

    Args:
        path: the file (created by the first :meth:`append`).
        what: what a damaged line loses, for the warning (e.g. "its run will be run again").
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        self.what = what
        self._offset = 0
        self._line = 0

    def append(self, entries: Iterable[Any]) -> None:
        """Append ``entries`` (one line each) with one ``os.write`` and ``fsync`` them.

        Hold the folder's :class:`FolderLock` around it: the check for a torn last line needs it.
        """
        data = b"".join(encode_line(entry) for entry in entries)
        if not data:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # end a line torn by a killed writer
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def read_new(self) -> list[dict[str, Any]]:
        """The entries appended since the last call (all of them the first time), in file order.

        Hold the folder's :class:`FolderLock`: an unfinished last line then means its writer died, and it is
        skipped with a warning like any line that does not parse as a JSON object.
        """
        try:
            with self.path.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        entries = []
        lines = data.split(b"\n")
        for number, line in enumerate(lines, start=self._line + 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
                entry = None
            if isinstance(entry, dict):
                entries.append(entry)
            else:
                warnings.warn(
                    f"{self.path}: skipped damaged line {number} (a write cut off, e.g. by a killed "
                    f"process); {self.what}",
                    RuntimeWarning,
                    stacklevel=3,
                )
        self._line += len(lines) - 1
        return entries
