"""The results of a sweep on disk, which make it resumable.

``runs.csv`` holds one row per finished run, keyed by ``run_id`` (the hash of the run's full parameter
set, :attr:`~lightning_linearity.sweeps.config.RunSpec.run_id`); ``histories.jsonl`` holds one line
``{"run_id": ..., "history": [...]}`` per run. Rows are appended as runs finish, so an interrupted sweep
keeps what it finished and a rerun skips those runs. Several sweeps may share a folder: the CSV's columns
are the union of all rows' keys (the file is rewritten when a row brings a new column). Only the
sweep's main process writes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

RUNS_CSV = "runs.csv"
HISTORIES = "histories.jsonl"
#: Columns kept as text when read back (every other column is a number).
TEXT_COLUMNS = ("run_id", "model", "status", "warnings")


def _parse(column: str, text: str) -> Any:
    if column in TEXT_COLUMNS:
        return text
    if text == "":
        return float("nan")
    try:
        return int(text)
    except ValueError:
        return float(text)


class RunStore:
    """Finished runs of the sweeps written to ``folder`` (created if missing).

    Raises:
        NotADirectoryError: ``folder`` exists and is not a folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"the output folder {str(self.folder)!r} is a file; give a folder path")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.folder / RUNS_CSV
        self.histories_path = self.folder / HISTORIES
        self._columns: list[str] = []
        self._rows: dict[str, dict[str, Any]] = {}
        if self.csv_path.exists():
            with self.csv_path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self._columns = list(reader.fieldnames or [])
                for row in reader:
                    self._rows[row["run_id"]] = {k: _parse(k, v) for k, v in row.items()}

    def __contains__(self, run_id: str) -> bool:
        return run_id in self._rows

    def __len__(self) -> int:
        return len(self._rows)

    def rows(self, run_ids: Iterable[str]) -> list[dict[str, Any]]:
        """The stored records of ``run_ids`` that are finished, in the given order."""
        return [self._rows[r] for r in run_ids if r in self._rows]

    def add(self, record: Mapping[str, Any], history: list[dict[str, float]]) -> None:
        """Store a finished run: its history line first, then its CSV row (the CSV marks it finished)."""
        record = dict(record)
        with self.histories_path.open("a") as handle:
            handle.write(json.dumps({"run_id": record["run_id"], "history": history}, allow_nan=True) + "\n")
        new_columns = [c for c in record if c not in self._columns]
        self._rows[record["run_id"]] = record
        if new_columns or not self.csv_path.exists():
            self._columns += new_columns
            self._rewrite()
        else:
            with self.csv_path.open("a", newline="") as handle:
                csv.DictWriter(handle, self._columns).writerow(_cells(record))

    def _rewrite(self) -> None:
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, self._columns)
            writer.writeheader()
            writer.writerows(_cells(row) for row in self._rows.values())
        os.replace(tmp, self.csv_path)

    def histories(self, run_ids: Iterable[str]) -> dict[str, list[dict[str, float]]]:
        """The stored histories of ``run_ids`` (the last line wins if a run was stored twice)."""
        wanted, found = set(run_ids), {}
        if self.histories_path.exists():
            with self.histories_path.open() as handle:
                for line in handle:
                    entry = json.loads(line)
                    if entry["run_id"] in wanted:
                        found[entry["run_id"]] = entry["history"]
        return found


def _cells(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record as CSV cells: NaN as an empty cell, floats in full precision."""
    return {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}
