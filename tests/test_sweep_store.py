"""The sweep store under crashes and concurrency: torn records, killed writers, two sweeps on one folder.

Fake runs (a record and a history, no training) drive :func:`run_pending` and :class:`RunStore` directly,
in this process and in child processes; every child is bounded by a timeout. Whether a run was executed
twice is counted by the fake runs themselves (one marker file per execution), independently of the store.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from lightning_linearity.sweeps.pool import run_pending
from lightning_linearity.sweeps.store import RunStore

TIMEOUT = 90  # seconds any child process may take


@dataclass(frozen=True)
class FakeSpec:
    run_id: str
    width: int
    seed: int = 0


def fake_record(spec: FakeSpec, **extra) -> dict:
    return {"run_id": spec.run_id, "width": spec.width, "seed": spec.seed, "value:last": 1.0 / spec.width,
            "status": "converged", "seconds": 0.0, **extra}  # fmt: skip


def fake_execute(spec: FakeSpec):
    return fake_record(spec), [{"step": 0, "linearity/x": float(spec.width)}]


SPECS = [FakeSpec(f"run{i:02d}", width=4 * (i + 1)) for i in range(6)]


def record_lines(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "runs.jsonl").read_text().splitlines() if line.strip()]


def csv_rows(folder: Path) -> list[dict]:
    with (folder / "runs.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------ one process
def test_records_are_appended_never_rewritten_when_columns_are_added(tmp_path):
    first = RunStore(tmp_path)
    first.add(fake_record(SPECS[0]), [])
    before = (tmp_path / "runs.jsonl").read_bytes()
    second = RunStore(tmp_path)  # e.g. another sweep: its rows bring a new column
    second.add(fake_record(SPECS[1], **{"extra:max": 2.5}), [{"step": 0}])
    after = (tmp_path / "runs.jsonl").read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 2
    rows = first.rows([SPECS[0].run_id, SPECS[1].run_id])  # the first store sees the second one's row
    assert [r["run_id"] for r in rows] == ["run00", "run01"]
    assert math.isnan(rows[0]["extra:max"]) and rows[1]["extra:max"] == 2.5
    table = csv_rows(tmp_path)
    assert [r["run_id"] for r in table] == ["run00", "run01"]
    assert table[0]["extra:max"] == "" and float(table[1]["extra:max"]) == 2.5
    (tmp_path / "runs.csv").unlink()  # the CSV is only a view: opening the store writes it again
    RunStore(tmp_path)
    assert csv_rows(tmp_path) == table


@pytest.mark.parametrize("cut", [1, 20, -2, -1])
def test_a_torn_last_record_is_skipped_with_a_warning_and_run_again(tmp_path, cut):
    """A writer killed mid-write leaves part of its line (``cut`` bytes kept, or all but ``-cut``)."""
    run_pending(SPECS[:3], RunStore(tmp_path), fake_execute, progress=False)
    path = tmp_path / "runs.jsonl"
    data = path.read_bytes()
    last_start = data.rindex(b"\n", 0, len(data) - 1) + 1
    path.write_bytes(data[: last_start + cut] if cut > 0 else data[:cut])
    complete = cut == -1  # only the newline is missing: the record itself is whole
    if complete:
        store = RunStore(tmp_path)
    else:
        with pytest.warns(RuntimeWarning, match=r"runs.jsonl: skipped damaged line 3 .*counts as unfinished"):
            store = RunStore(tmp_path)
    assert len(store) == (3 if complete else 2) and (SPECS[2].run_id in store) == complete
    # the later sweep in this folder re-runs what was lost and everything reads back whole
    assert run_pending(SPECS, store, fake_execute, progress=False) == (3 if complete else 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error" if complete else "ignore")  # the torn line stays, and is warned about
        reread = RunStore(tmp_path)
    assert [r["run_id"] for r in reread.rows(s.run_id for s in SPECS)] == [s.run_id for s in SPECS]
    assert [r["run_id"] for r in csv_rows(tmp_path)] == sorted(s.run_id for s in SPECS)
    assert set(reread.histories([SPECS[2].run_id])) == {SPECS[2].run_id}


def test_a_torn_history_means_the_run_is_run_again(tmp_path):
    """The history line is written before the record: a kill between them leaves the run unfinished."""
    store = RunStore(tmp_path)
    run_pending(SPECS[:2], store, fake_execute, progress=False)
    with (tmp_path / "histories.jsonl").open("ab") as handle:
        handle.write(b'{"run_id": "run02", "hist')
    with pytest.warns(RuntimeWarning, match=r"histories.jsonl: skipped damaged line 3"):
        assert RunStore(tmp_path).histories(["run00"]) == {"run00": [{"step": 0, "linearity/x": 4.0}]}
    assert run_pending(SPECS[:3], RunStore(tmp_path), fake_execute, progress=False) == 1
    with pytest.warns(RuntimeWarning, match="damaged line 3"):
        assert RunStore(tmp_path).histories(["run02"]) == {"run02": [{"step": 0, "linearity/x": 12.0}]}


def write_old_csv(folder: Path, rows: list[list[str]], tail: str = "") -> None:
    """``runs.csv`` as the CSV-only store wrote it (header, rows; ``tail``: a torn last row)."""
    header = ["run_id", "width", "seed", "value:last", "status"]
    with (folder / "runs.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
        handle.write(tail)


def test_an_old_csv_only_folder_is_read_and_continued(tmp_path):
    write_old_csv(tmp_path, [["run00", "4", "0", "0.25", "converged"], ["run01", "8", "0", "", "max_steps"]])
    store = RunStore(tmp_path)
    assert len(store) == 2 and (tmp_path / "runs.jsonl").exists()
    old = store.rows(["run00", "run01"])
    assert old[0]["value:last"] == 0.25 and old[0]["width"] == 4 and math.isnan(old[1]["value:last"])
    assert run_pending(SPECS[:3], store, fake_execute, progress=False) == 1
    ids = ["run00", "run01", "run02"]
    assert [r["run_id"] for r in RunStore(tmp_path).rows(ids)] == ids


def test_an_old_csv_with_short_rows_and_a_torn_last_row_no_longer_crashes(tmp_path):
    """The issue's broken folder: rows with fewer fields than the header, and a row cut in half."""
    rows = [["run00", "4", "0", "0.25", "converged"], ["run01", "8", "0", "max_steps"],
            ["run02", "12", "0", "0.083", "converged"]]  # fmt: skip
    write_old_csv(tmp_path, rows, tail="run03,16,0,0.06")
    with pytest.warns(RuntimeWarning) as caught:
        store = RunStore(tmp_path)
    messages = [str(w.message) for w in caught]
    assert any("skipped row 3 (4 fields under a header of 5)" in m for m in messages)
    assert any("skipped row 5 (4 fields under a header of 5)" in m for m in messages)
    assert sorted(store._rows) == ["run00", "run02"]
    assert run_pending(SPECS[:4], store, fake_execute, progress=False) == 2  # run01 and run03 again
    assert sorted(r["run_id"] for r in csv_rows(tmp_path)) == ["run00", "run01", "run02", "run03"]


def test_claims_are_exclusive_and_lapse_with_their_owner(tmp_path):
    first, second = RunStore(tmp_path), RunStore(tmp_path)
    ids = [s.run_id for s in SPECS[:3]]
    with first.claiming():
        assert first.claim(ids) == "run00" and first.claim(ids) == "run01"
        with second.claiming():
            assert second.claim(ids) == "run02" and second.claim(ids) is None
            assert set(second.held_elsewhere(ids)) == {"run00", "run01"}
            first.add(fake_record(SPECS[0]), [])
            assert set(second.held_elsewhere(ids)) == {"run01"}  # finished runs are no longer held
    with second.claiming():  # the first owner is gone: its unfinished claim lapsed
        assert second.claim(ids) == "run01" and second.claim(ids) == "run02" and second.claim(ids) is None
    with pytest.raises(RuntimeError, match=r"inside `with store\.claiming"):
        first.claim(ids)


# ----------------------------------------------------------------------------- child processes
CHILD = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from test_sweep_store import FakeSpec, fake_record
    from lightning_linearity.sweeps.pool import run_pending
    from lightning_linearity.sweeps.store import RunStore

    folder, marks, name = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    count, seconds, together = int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
    specs = [FakeSpec(f"run{{i:02d}}", width=4 * (i + 1)) for i in range(count)]

    def execute(spec):
        (marks / f"{{spec.run_id}}.{{name}}").touch()  # one marker per execution, counted by the test
        time.sleep(seconds)
        return fake_record(spec), [{{"step": 0}}]

    (marks / f"ready.{{name}}").touch()
    deadline = time.time() + 60
    while len(list(marks.glob("ready.*"))) < together and time.time() < deadline:
        time.sleep(0.01)  # start together
    executed = run_pending(specs, RunStore(folder), execute, progress=False, poll_seconds=0.05)
    print(json.dumps({{"executed": executed}}))
    """
)


def child(tmp_path: Path, name: str, count: int, seconds: float, together: int) -> subprocess.Popen:
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD.format(tests=str(Path(__file__).parent)))
    (tmp_path / "marks").mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "out"), str(tmp_path / "marks"), name, str(count), str(seconds), str(together)]
    return subprocess.Popen([sys.executable, str(script), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip


def executions(tmp_path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for mark in (tmp_path / "marks").glob("run*"):
        run_id = mark.name.split(".")[0]
        counts[run_id] = counts.get(run_id, 0) + 1
    return counts


def test_two_concurrent_sweeps_on_one_folder_run_every_run_once_and_lose_nothing(tmp_path):
    count = 12
    processes = [child(tmp_path, name, count, 0.2, together=2) for name in ("a", "b")]
    outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err
    executed = [json.loads(out.strip().splitlines()[-1])["executed"] for out, _ in outputs]
    ids = [f"run{i:02d}" for i in range(count)]
    assert executions(tmp_path) == dict.fromkeys(ids, 1)  # nothing run twice, nothing left out
    assert sum(executed) == count and min(executed) > 0  # the two sweeps shared the work
    lines = record_lines(tmp_path / "out")
    assert sorted(line["run_id"] for line in lines) == ids  # every row stored exactly once
    assert sorted(r["run_id"] for r in csv_rows(tmp_path / "out")) == ids
    assert all(None not in row and None not in row.values() for row in csv_rows(tmp_path / "out"))
    store = RunStore(tmp_path / "out")  # a later sweep in this folder finds everything finished
    assert run_pending([FakeSpec(i, 4) for i in ids], store, fake_execute, progress=False) == 0


def wait_for(condition, what: str, seconds: float = TIMEOUT) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_killed_sweeps_claims_are_waited_for_then_taken_over_and_nothing_is_duplicated(tmp_path, capfd):
    """A sweep killed (SIGKILL) in the middle of a run: its live claim is respected and waited for, then
    taken over once it is dead."""
    victim = child(tmp_path, "victim", 2, 600.0, together=1)  # claims run00, then "trains" for 10 minutes
    ids = ["run00", "run01"]
    result: dict[str, int] = {}
    try:
        wait_for(lambda: (tmp_path / "marks" / "run00.victim").exists() or victim.poll() is not None, "run00")
        assert victim.poll() is None, victim.communicate()[1]
        store = RunStore(tmp_path / "out")
        with store.claiming():
            assert store.claim(["run00"]) is None  # the victim is alive and holds it
            assert store.held_elsewhere(ids) == {"run00": f"pid {victim.pid} on {socket.gethostname()}"}

        def sweep() -> None:
            specs = [FakeSpec(i, 4 * (k + 1)) for k, i in enumerate(ids)]
            result["executed"] = run_pending(specs, store, fake_execute, progress=False, poll_seconds=0.05)

        thread = threading.Thread(target=sweep, daemon=True)
        thread.start()  # runs run01, then waits for run00
        wait_for(lambda: "run01" in RunStore(tmp_path / "out"), "run01")
        time.sleep(0.2)
        assert thread.is_alive()  # still waiting for the victim's run
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=TIMEOUT)
        thread.join(timeout=TIMEOUT)
    finally:
        if victim.poll() is None:
            victim.kill()
            victim.wait()
    assert victim.returncode == -signal.SIGKILL and not thread.is_alive()
    assert result["executed"] == 2  # run01, then run00 taken over from the dead victim
    assert sorted(line["run_id"] for line in record_lines(tmp_path / "out")) == ids
    assert executions(tmp_path) == {"run00": 1}  # the fake runs of this process leave no marker
    assert f"sweep: waiting for 1 run(s) that another sweep (pid {victim.pid} on" in capfd.readouterr().err


def test_two_concurrent_command_line_sweeps_on_one_folder(tmp_path):
    """The issue's case end to end: the same sweep started twice at once on one output folder."""
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lightning_linearity.sweep", "--model", "NTKFCN",
            "--model_args", "{depth: 2, out_features: 1}", "--widths", "[4, 8, 16]", "--seeds", "[0, 1]",
            "--mode", "init", "--metrics", "[lambda_min]", "--data", "{name: digits, num_samples: 6}",
            "--threads", "1", "--progress", "false", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=TIMEOUT) for p in processes]
    resumed = []
    for p, (stdout, stderr) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, stderr
        summary = next(line for line in stdout.splitlines() if line.startswith("6 runs ("))
        resumed.append(int(summary.split("(")[1].split()[0]))
    assert (6 - resumed[0]) + (6 - resumed[1]) == 6  # the two executed 6 runs between them
    records = record_lines(out)
    assert len(records) == 6 and len({r["run_id"] for r in records}) == 6
    assert sorted((r["width"], r["seed"]) for r in records) == [(w, s) for w in (4, 8, 16) for s in (0, 1)]
