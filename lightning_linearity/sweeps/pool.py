"""Running the unfinished runs of a sweep, one after another or in parallel processes, with progress.

With ``jobs > 1`` the runs go to a ``ProcessPoolExecutor`` with the ``spawn`` start method (safe with
torch's threads, and the same on every platform); each worker uses ``threads`` torch threads (default
``cpu_count // jobs``). Sequential runs use ``threads`` torch threads if given (torch's setting is restored
afterwards), else torch's default. The small networks of a sweep gain little from intra-op threads, and on a
busy machine extra threads cost more than they give, so ``threads=1`` is often the fastest choice.
The widest runs are started first, so the slowest ones do not trail at the end. Results come back to the
main process, the sweep's only writer of the :class:`~lightning_linearity.sweeps.store.RunStore`, as each
run finishes. Every run is claimed in the store before it starts, so sweeps started concurrently on one
output folder share the runs between them and each waits for the runs the others hold. Progress: a
``tqdm`` bar over the runs when tqdm is installed, else one line per run; both on stderr.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
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
    poll_seconds: float = 1.0,
) -> int:
    """Execute the runs of ``specs`` that ``store`` does not hold yet; returns how many this call executed.

    Each run is claimed in the store just before it starts (:meth:`RunStore.claim`): sweeps running at the
    same time on one folder never execute a run twice. The runs another live sweep holds are waited for
    (checked every ``poll_seconds``) and taken over if that sweep dies, so on return every run of ``specs``
    is stored unless one raised.
    ``execute`` must be a module-level function (it is pickled for the worker processes when ``jobs > 1``).
    If a run raises, the runs already finished stay stored, the others are cancelled, the claims lapse, and
    the error is raised.
    """
    pending = [spec for spec in specs if spec.run_id not in store]
    if jobs > 1:
        pending.sort(key=lambda s: -s.width)
    queue = _Queue(pending, store, name, poll_seconds)
    bar = _Progress(len(specs), len(specs) - len(pending), name, progress)
    try:
        with store.claiming():
            if jobs == 1 or len(pending) <= 1:
                before = torch.get_num_threads()
                torch.set_num_threads(threads or before)
                try:
                    while (spec := queue.next(block=True)) is not None:
                        record, history = execute(spec)
                        store.add(record, history)
                        bar.update(record)
                        queue.executed += 1
                finally:
                    torch.set_num_threads(before)
            else:
                threads = threads or max(1, (os.cpu_count() or 1) // jobs)
                _run_parallel(queue, store, execute, jobs, threads, bar)
    finally:
        bar.close()
    return queue.executed


class _Queue:
    """The pending runs, handed out as this process claims them in the store."""

    def __init__(self, pending: list[RunSpec], store: RunStore, name: str, poll_seconds: float) -> None:
        self.specs = {spec.run_id: spec for spec in pending}
        self.store, self.name, self.poll_seconds = store, name, poll_seconds
        self.executed = 0
        self._told: set[str] = set()

    def next(self, block: bool) -> RunSpec | None:
        """The next run this process claimed; ``None`` when none is left to claim.

        With ``block``, first wait while other live sweeps hold the remaining runs (``None``: all finished).
        """
        while True:
            run_id = self.store.claim(self.specs)
            if run_id is not None:
                return self.specs.pop(run_id)
            held = self.store.held_elsewhere(self.specs)
            if not block or not held:
                return None
            holders = sorted(set(held.values()))
            if not self._told.issuperset(holders):
                self._told.update(holders)
                print(
                    f"{self.name}: waiting for {len(held)} run(s) that another sweep ({', '.join(holders)}) "
                    f"is running in {self.store.folder}",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(self.poll_seconds)


def _run_parallel(
    queue: _Queue, store: RunStore, execute: Executor, jobs: int, threads: int, bar: _Progress
) -> None:
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)) as pool:
        futures: set[Future] = set()
        try:
            while True:
                while len(futures) < jobs and (spec := queue.next(block=not futures)) is not None:
                    futures.add(pool.submit(execute, spec))
                if not futures:
                    return
                finished, futures = wait(futures, return_when=FIRST_COMPLETED)
                for future in finished:
                    if future.exception() is None:
                        record, history = future.result()
                        store.add(record, history)
                        bar.update(record)
                        queue.executed += 1
                errors = [future.exception() for future in finished if future.exception() is not None]
                if errors:
                    raise errors[0]
        finally:
            for future in futures:
                future.cancel()
