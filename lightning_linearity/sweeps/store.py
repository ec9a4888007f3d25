"""The results of a sweep on disk, which make it resumable, shared safely by concurrent sweeps.

Files in the output folder:

``runs.jsonl``
    the record: one JSON object per finished run (its CSV row, keyed by ``run_id``, the hash of the run's
    full parameter set, :attr:`~lightning_linearity.sweeps.config.RunSpec.run_id`), appended as the run
    finishes (:class:`~lightning_linearity.sweeps.appendlog.AppendLog`: one ``os.write`` with
    ``O_APPEND``, then ``fsync``). Lines are never rewritten, so a row that brings a new column leaves the
    other rows as they are; if a run was stored twice, the last line wins.
``histories.jsonl``
    one line ``{"run_id": ..., "history": [...]}`` per run, appended just before its record line (a run
    killed in between has a history but no record, and is run again).
``runs.csv``
    a view of ``runs.jsonl`` for reading (the union of all rows' columns, empty cells for missing values),
    rewritten by write-and-rename after every stored run (and when missing); never read back.
``.sweep/``
    the lock file, the claims log and the liveness markers of the sweeps running in the folder.

Crash safety: a killed process leaves at most a torn last line; it is skipped with a warning (its run
counts as unfinished and is run again), and the next write ends it first.

Concurrency: every read-and-append happens under an exclusive ``fcntl.flock`` on ``.sweep/lock``. Before a
sweep starts a run it *claims* it (:meth:`RunStore.claim`): it appends ``{"run_id", "owner", "pid", "host"}``
to ``.sweep/claims.jsonl`` while holding the lock, after checking that the run is neither finished nor
claimed by a live owner. An owner is live while it holds the ``flock`` on its marker ``.sweep/owners/<token>``
(:class:`~lightning_linearity.sweeps.appendlog.Liveness`), which the kernel releases when the process dies,
so the runs of a killed or finished sweep can be claimed again. Two sweeps on one folder therefore share
the work, never run a run twice, and each waits for the runs the other holds before it reports. This needs
a filesystem with working ``flock`` (local disks; NFSv4 on Linux); where ``fcntl`` does not exist
(Windows) nothing is coordinated: run one sweep per folder there.

A folder written by an older version (``runs.csv`` only) is imported into ``runs.jsonl`` on first use; rows
whose number of fields does not match the header, or a torn last row, are skipped with a warning (those runs
are run again).
"""

from __future__ import annotations

import csv
import io
import math
import os
import secrets
import socket
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lightning_linearity.sweeps.appendlog import AppendLog, FolderLock, Liveness

RUNS_JSONL = "runs.jsonl"
RUNS_CSV = "runs.csv"
HISTORIES = "histories.jsonl"
STATE_DIR = ".sweep"
#: Columns that hold text (every other column is a number; a missing one reads as NaN).
TEXT_COLUMNS = ("run_id", "model", "status", "warnings")


class RunStore:
    """Finished runs of the sweeps written to ``folder`` (created if missing); see the module docstring.

    ``in`` and ``len`` see the runs stored when the store was opened or last refreshed (by :meth:`rows`,
    :meth:`add` or :meth:`claim`), including those of other processes.

    Raises:
        NotADirectoryError: ``folder`` exists and is not a folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"the output folder {str(self.folder)!r} is a file; give a folder path")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.records_path = self.folder / RUNS_JSONL
        self.csv_path = self.folder / RUNS_CSV
        self.histories_path = self.folder / HISTORIES
        state = self.folder / STATE_DIR
        self._lock = FolderLock(state / "lock")
        self._records = AppendLog(self.records_path, "the run it held counts as unfinished")
        self._claims_log = AppendLog(state / "claims.jsonl", "a run it claimed may be started again")
        self._liveness = Liveness(state / "owners")
        self._owner: str | None = None
        self._columns: dict[str, None] = {}  # an ordered set
        self._rows: dict[str, dict[str, Any]] = {}
        self._claims: dict[str, dict[str, Any]] = {}
        with self._lock:
            if not self.records_path.exists() and self.csv_path.exists():
                self._import_csv()
            self._refresh()
            if self._rows and not self.csv_path.exists():
                self._write_csv()

    # ------------------------------------------------------------------------------------- reading
    def _refresh(self) -> None:
        """Take in the records and claims appended since the last refresh (call with the lock held)."""
        for record in self._records.read_new():
            run_id = record.get("run_id")
            if isinstance(run_id, str) and run_id:
                self._rows[run_id] = record
                self._columns.update(dict.fromkeys(record))
            else:
                warnings.warn(
                    f"{self.records_path}: skipped a record without a run_id (keys {sorted(record)[:5]})",
                    RuntimeWarning,
                    stacklevel=3,
                )
        for claim in self._claims_log.read_new():
            if isinstance(claim.get("run_id"), str):
                self._claims[claim["run_id"]] = claim

    def refresh(self) -> None:
        """Take in what other processes stored since the store was opened."""
        with self._lock:
            self._refresh()

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, run_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The stored records of ``run_ids`` that are finished, in the given order.

        Every row has every column any stored row has; a missing value is NaN ("" for a text column).
        """
        self.refresh()
        return [self._full_row(self._rows[r]) for r in run_ids if r in self._rows]

    def _full_row(self, record: Mapping[str, Any]) -> dict[str, Any]:
        return {c: record.get(c, "" if c in TEXT_COLUMNS else math.nan) for c in self._columns}

    def histories(self, run_ids: Iterable[str]) -> dict[str, list[dict[str, float]]]:
        """The stored histories of ``run_ids`` (the last line wins if a run was stored twice)."""
        wanted, found = set(run_ids), {}
        log = AppendLog(self.histories_path, "the history it held is missing")
        with self._lock:
            entries = log.read_new()
        for entry in entries:
            if entry.get("run_id") in wanted:
                found[entry["run_id"]] = entry.get("history", [])
        return found

    # ------------------------------------------------------------------------------------- writing
    def add(self, record: Mapping[str, Any], history: list[dict[str, float]]) -> None:
        """Store a finished run: its history line, then its record line (which marks it finished)."""
        record = dict(record)
        with self._lock:
            AppendLog(self.histories_path, "").append([{"run_id": record["run_id"], "history": history}])
            self._records.append([record])
            self._refresh()
            self._write_csv()

    def _write_csv(self) -> None:
        """Rewrite the ``runs.csv`` view of every stored row (write-and-rename; call with the lock held)."""
        tmp = self.csv_path.with_name(f".{RUNS_CSV}.{os.getpid()}.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, list(self._columns))
            writer.writeheader()
            writer.writerows(_cells(self._full_row(row)) for row in self._rows.values())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.csv_path)

    # ------------------------------------------------------------------------------------ claiming
    @contextmanager
    def claiming(self) -> Iterator[None]:
        """Make this process an owner that may :meth:`claim` runs; its claims lapse when the block ends."""
        if self._owner is not None:
            raise RuntimeError("this RunStore is already claiming runs")
        token = secrets.token_hex(8)
        with self._liveness.hold(token):
            self._owner = token
            try:
                yield
            finally:
                self._owner = None

    def _holder(self, run_id: str, alive: dict[str, bool]) -> dict[str, Any] | None:
        """The claim on an unfinished ``run_id`` by a live owner (this one included), if any."""
        claim = self._claims.get(run_id)
        if claim is None:
            return None
        owner = claim.get("owner")
        if owner == self._owner:
            return claim
        if owner not in alive:
            alive[owner] = isinstance(owner, str) and self._liveness.is_alive(owner)
        return claim if alive[owner] else None

    def claim(self, run_ids: Iterable[str]) -> str | None:
        """Claim the first of ``run_ids`` neither stored nor claimed by a live owner; ``None`` if none.

        Call inside :meth:`claiming`.
        """
        if self._owner is None:
            raise RuntimeError("call RunStore.claim inside `with store.claiming():`")
        alive: dict[str, bool] = {}
        with self._lock:
            self._refresh()
            for run_id in run_ids:
                if run_id not in self._rows and self._holder(run_id, alive) is None:
                    claim = {"run_id": run_id, "owner": self._owner, "pid": os.getpid(), "host": _host()}
                    self._claims_log.append([claim])
                    self._claims[run_id] = claim
                    return run_id
        return None

    def held_elsewhere(self, run_ids: Iterable[str]) -> dict[str, str]:
        """The unfinished ``run_ids`` that other live owners hold -> ``"pid P on HOST"`` of each holder."""
        alive: dict[str, bool] = {}
        held = {}
        with self._lock:
            self._refresh()
            for run_id in run_ids:
                claim = None if run_id in self._rows else self._holder(run_id, alive)
                if claim is not None and claim.get("owner") != self._owner:
                    held[run_id] = f"pid {claim.get('pid')} on {claim.get('host')}"
        return held

    # ------------------------------------------------------------------------ the old CSV-only format
    def _import_csv(self) -> None:
        """Copy the rows of an old ``runs.csv`` into ``runs.jsonl`` (call with the lock held)."""
        with self.csv_path.open(newline="") as handle:
            text = handle.read()
        table = list(csv.reader(io.StringIO(text, newline="")))
        header, rows = (table[0], table[1:]) if table else ([], [])
        records = []
        for number, cells in enumerate(rows, start=2):
            record = _parse_row(dict(zip(header, cells, strict=False)))
            if len(cells) != len(header):
                problem = f"{len(cells)} fields under a header of {len(header)}"
            elif number == len(rows) + 1 and not text.endswith("\n"):
                problem = "cut off"
            elif record is None:
                problem = "a number column holds text"
            elif not record.get("run_id"):
                problem = "no run_id"
            else:
                records.append(record)
                continue
            warnings.warn(
                f"{self.csv_path}: skipped row {number} ({problem}); its run will be run again",
                RuntimeWarning,
                stacklevel=3,
            )
        self._records.append(records)
        self.records_path.touch()
        self._refresh()
        self._write_csv()


def _host() -> str:
    try:
        return socket.gethostname()
    except OSError:  # pragma: no cover
        return "?"


def _parse_row(row: Mapping[str, str]) -> dict[str, Any] | None:
    """A row of an old ``runs.csv``, numbers parsed (an empty cell: NaN); ``None`` if a cell is no number."""
    record: dict[str, Any] = {}
    for column, text in row.items():
        if column in TEXT_COLUMNS:
            record[column] = text
        elif text == "":
            record[column] = math.nan
        else:
            try:
                record[column] = int(text)
            except ValueError:
                try:
                    record[column] = float(text)
                except ValueError:
                    return None
    return record


def _cells(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as CSV cells: NaN as an empty cell, floats in full precision."""
    return {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
