"""Running the unfinished runs of a sweep, one after another or in parallel processes, with progress.

With ``jobs > 1`` the runs go to a ``ProcessPoolExecutor`` with the ``spawn`` start method (safe with
torch's threads, and the same on every platform); each worker uses ``threads`` torch threads (default
``cpu_count // jobs``). Sequential runs use ``threads`` torch threads if given (torch's setting is restored
afterwards), else torch's default. The small networks of a sweep gain little from intra-op threads, and on a
busy machine extra threads cost more than they give, so ``threads=1`` is often the fastest choice.
The widest runs are started first, so the slowest ones do not trail at the end. Results come back to the
main process, the only writer of the :class:`~lightning_linearity.sweeps.store.RunStore`, as each run
finishes. Progress: a ``tqdm`` bar over the runs when tqdm is installed, else one line per run; both on
stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from typing import Any

import torch

from lightning_linearity.sweeps.config import RunSpec
from lightning_linearity.sweeps.store import RunStore

Executor = Callable[[RunSpec], tuple[dict[str, Any], list[dict[str, float]]]]


class _Progress:
    """A tqdm bar over the runs, or plain lines on stderr without tqdm; nothing when disabled."""

    def __init__(self, total: int, done: int, name: str, enabled: bool) -> None:
        self.total, self.count, self.enabled = total, done, enabled
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print(f"{name}: {done}/{total} runs already finished", file=sys.stderr)
            else:
                self.bar = tqdm(total=total, initial=done, desc=name, unit="run", file=sys.stderr)

    def update(self, record: dict[str, Any]) -> None:
        self.count += 1
        summary = f"m={record['width']} seed={record['seed']} {record['status']} {record['seconds']:.1f}s"
        if self.bar is not None:
            self.bar.set_postfix_str(summary)
            self.bar.update()
        elif self.enabled:
            print(f"[{self.count}/{self.total}] {summary}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def run_pending(
    specs: Sequence[RunSpec],
    store: RunStore,
    execute: Executor,
    *,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
    name: str = "sweep",
) -> int:
    """Execute the runs of ``specs`` that ``store`` does not hold yet; returns how many were executed.

    ``execute`` must be a module-level function (it is pickled for the worker processes when ``jobs > 1``).
    If a run raises, the runs already finished stay stored, the others are cancelled, and the error is
    raised.
    """
    pending = [spec for spec in specs if spec.run_id not in store]
    bar = _Progress(len(specs), len(specs) - len(pending), name, progress)
    try:
        if jobs == 1 or len(pending) <= 1:
            before = torch.get_num_threads()
            torch.set_num_threads(threads or before)
            try:
                for spec in pending:
                    record, history = execute(spec)
                    store.add(record, history)
                    bar.update(record)
            finally:
                torch.set_num_threads(before)
        else:
            threads = threads or max(1, (os.cpu_count() or 1) // jobs)
            _run_parallel(sorted(pending, key=lambda s: -s.width), store, execute, jobs, threads, bar)
    finally:
        bar.close()
    return len(pending)


def _run_parallel(
    pending: list[RunSpec], store: RunStore, execute: Executor, jobs: int, threads: int, bar: _Progress
) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures: set[Future] = {pool.submit(execute, spec) for spec in pending}
        try:
            while futures:
                finished, futures = wait(futures, return_when=FIRST_EXCEPTION)
                for future in finished:
                    if future.exception() is None:
                        record, history = future.result()
                        store.add(record, history)
                        bar.update(record)
                errors = [future.exception() for future in finished if future.exception() is not None]
                if errors:
                    raise errors[0]
        finally:
            for future in futures:
                future.cancel()
