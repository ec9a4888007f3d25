"""When :class:`LinearityMonitor` runs a metric round: fixed step schedules, and an overhead budget.

A round always runs at the start of training (step 0, or the step a run resumes at) and at its end. In
between, a step is *due* when any fixed schedule names it:

* ``every_n_steps``: every n-th optimiser step;
* ``log_spaced``: p steps per decade, 1, 2, 3, 6, 10, 18, 32, 56, 100, ... for p = 4 (the kernel moves
  most early in training, so rounds are dense there and sparse later);
* ``steps``: an explicit list of steps.

With ``max_overhead = b`` the monitor also keeps its rounds' share of the wall time under b: after each
round it plans the first step at which the next round fits, from the time the rounds took so far (R), the
last round's time (r, the estimate of the next one), the wall time since training started (T) and the mean
time of a training step (s): the next round is allowed after g more steps, the smallest g with

    (R + r) <= b * (T + g * s + r).

Without a fixed schedule the rounds then run as often as the budget allows; with one, a due step whose round
does not fit the budget is skipped. All ranks take rank 0's plan (broadcast at the end of each round), so
under DDP they run the same rounds and no rank waits in a collective that another skipped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lightning_linearity._text import short_repr


def log_spaced_steps(per_decade: int, up_to: int) -> list[int]:
    """The distinct steps round(10^(j / per_decade)), j = 0, 1, ..., up to ``up_to`` (1, 2, 3, 6, 10, ...)."""
    steps, j = [], 0
    while (step := round(10 ** (j / per_decade))) <= up_to:
        if not steps or step != steps[-1]:
            steps.append(step)
        j += 1
    return steps


@dataclass
class StepSchedule:
    """The fixed schedules: which optimiser steps are due for a round (see the module docstring)."""

    every_n_steps: int | None = None
    log_spaced: int | None = None
    steps: tuple[int, ...] = ()
    _log_steps: set[int] = field(default_factory=set, init=False, repr=False)
    _log_limit: int = field(default=0, init=False, repr=False)

    @property
    def fixed(self) -> bool:
        """Whether any fixed schedule is set."""
        return self.every_n_steps is not None or self.log_spaced is not None or bool(self.steps)

    def due(self, step: int) -> bool:
        if self.every_n_steps is not None and step % self.every_n_steps == 0:
            return True
        if self.log_spaced is not None:
            if step > self._log_limit:  # extend the cached steps by decades as training goes on
                self._log_limit = 10 * max(step, 10)
                self._log_steps = set(log_spaced_steps(self.log_spaced, self._log_limit))
            if step in self._log_steps:
                return True
        return step in self.steps


@dataclass
class OverheadBudget:
    """Plans rounds so that their share of the wall time stays under ``max_overhead``.

    ``clock`` (seconds) is injectable for tests. Call :meth:`start` when training starts, :meth:`record`
    after each round (it returns rank-local numbers; the caller broadcasts :meth:`plan`'s step from rank 0).
    """

    max_overhead: float
    clock: Callable[[], float] = time.perf_counter
    start_time: float = field(default=0.0, init=False)
    start_step: int = field(default=0, init=False)
    round_seconds: float = field(default=0.0, init=False)  # R, every round so far
    last_round: float = field(default=0.0, init=False)  # r
    next_step: int = field(default=0, init=False)
    provisional: bool = field(default=True, init=False)  # planned before any training step was timed

    def start(self, step: int) -> None:
        self.start_time, self.start_step = self.clock(), step
        self.round_seconds, self.last_round, self.next_step, self.provisional = 0.0, 0.0, step, True

    def record(self, seconds: float) -> None:
        """A round took ``seconds``."""
        self.round_seconds += seconds
        self.last_round = seconds

    def share(self) -> float:
        """The rounds' share of the wall time since :meth:`start`."""
        elapsed = self.clock() - self.start_time
        return self.round_seconds / elapsed if elapsed > 0 else 0.0

    def plan(self, step: int) -> int:
        """The first step after ``step`` at which the next round fits the budget (``step + 1`` while no
        training step has been timed yet: the plan is then made again at that step)."""
        elapsed = self.clock() - self.start_time
        steps_done = step - self.start_step
        training = elapsed - self.round_seconds
        self.provisional = steps_done <= 0 or training <= 0
        if self.provisional:
            return step + 1
        step_time = training / steps_done
        b, r = self.max_overhead, self.last_round
        gap = ((self.round_seconds + r) / b - r - elapsed) / step_time
        return step + max(1, math.ceil(gap))

    def allows(self, step: int) -> bool:
        return step >= self.next_step


def check_steps(steps: Sequence[int] | None) -> tuple[int, ...]:
    """``steps`` as a sorted tuple of distinct non-negative integers; ``ValueError`` otherwise."""
    if steps is None:
        return ()
    if isinstance(steps, str | bytes) or not isinstance(steps, Sequence):
        raise ValueError(f"steps must be a list of non-negative integers, got {short_repr(steps)}")
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"steps must be a list of non-negative integers, got {list(steps)!r}")
    return tuple(sorted(set(steps)))
