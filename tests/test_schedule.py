"""When LinearityMonitor runs its rounds: log-spaced steps, explicit steps, and the overhead budget.

The budget is tested with a fake clock (a training step and a round each advance it by a set amount), never
with timing assertions.
"""

from __future__ import annotations

import itertools
import math

import pytest
from test_callback import fcn, loader, make_monitor, trainer

from lightning_linearity._compat import Callback, MisconfigurationException
from lightning_linearity.callbacks import _stages
from lightning_linearity.callbacks._schedule import OverheadBudget, StepSchedule, log_spaced_steps


def test_log_spaced_steps_are_rounded_powers_of_ten():
    # round(10^(j/4)) for j = 0..8, by hand: 1, 1.78, 3.16, 5.62, 10, 17.8, 31.6, 56.2, 100
    assert log_spaced_steps(4, 100) == [1, 2, 3, 6, 10, 18, 32, 56, 100]
    assert log_spaced_steps(1, 5000) == [1, 10, 100, 1000]
    # more than one step per integer early on: duplicates are dropped
    assert log_spaced_steps(10, 3) == [1, 2, 3]


def test_step_schedule_is_the_union_of_its_parts_and_extends_past_its_cache():
    schedule = StepSchedule(every_n_steps=25, log_spaced=1, steps=(7,))
    due = [step for step in range(1, 101) if schedule.due(step)]
    assert due == [1, 7, 10, 25, 50, 75, 100]
    assert schedule.due(10_000) and not schedule.due(10_001)  # log steps far past the first cache


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        (dict(every_n_steps=None, log_spaced=2), [0, 1, 3, 10, 12]),  # 10^0, 10^0.5 = 3.16, 10^1
        (dict(every_n_steps=None, steps=[2, 5]), [0, 2, 5, 12]),
        (dict(every_n_steps=5, steps=[2]), [0, 2, 5, 10, 12]),
    ],
)
def test_each_schedule_runs_its_steps(kwargs, expected, tmp_path):
    monitor = make_monitor(["ntk"], probe_size=4, **kwargs)
    trainer(tmp_path, [monitor], max_steps=12, logger=False).fit(fcn(), loader(batch_size=4))
    assert [row["step"] for row in monitor.history] == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_overhead=0.0), r"max_overhead must be a fraction of the wall time in \(0, 1\)"),
        (dict(max_overhead=1.5), r"max_overhead must be a fraction"),
        (dict(max_overhead="10%"), r"max_overhead must be a fraction"),
        (dict(log_spaced=0), "log_spaced must be an integer >= 1"),
        (dict(steps=[3, -1]), "steps must be a list of non-negative integers"),
        (dict(steps="100"), "steps must be a list of non-negative integers"),
    ],
)
def test_bad_schedules_raise_at_init(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        make_monitor(**kwargs)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TrainingTime(Callback):
    """Each training step advances the fake clock by one second (before the monitor's hook runs)."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_train_batch_end(self, *args, **kwargs) -> None:
        self.clock.now += 1.0


def budget_run(tmp_path, round_cost: float, monkeypatch, **kwargs):
    clock = FakeClock()
    original = _stages.Kernel.rows

    def slow_rows(self, ctx, share):  # the round's metric takes round_cost seconds
        clock.now += round_cost
        return original(self, ctx, share)

    monkeypatch.setattr(_stages.Kernel, "rows", slow_rows)
    monitor = make_monitor(["ntk"], probe_size=4, max_overhead=0.1, **kwargs)
    monitor._budget.clock = clock
    t = trainer(tmp_path, [TrainingTime(clock), monitor], max_steps=200, logger=False)
    t.fit(fcn(), loader(batch_size=4))
    return monitor


def test_the_budget_spaces_rounds_further_when_they_are_slower(tmp_path, monkeypatch):
    cheap = budget_run(tmp_path, 1.0, monkeypatch, every_n_steps=None)
    dear = budget_run(tmp_path, 5.0, monkeypatch, every_n_steps=None)
    steps_cheap = [row["step"] for row in cheap.history]
    steps_dear = [row["step"] for row in dear.history]
    assert len(steps_dear) < len(steps_cheap) < 200 // 5
    for monitor, cost in ((cheap, 1.0), (dear, 5.0)):
        rows = monitor.history[1:-1]  # after the first round, before the unconditional last one
        assert rows and all(row["linearity/overhead"] <= 0.1 + 1e-12 for row in rows)
        # the steady gap of (R + r) <= b (T + g s + r) with s = 1 s and r = cost: g = cost (1 - b) / b
        gaps = [b["step"] - a["step"] for a, b in itertools.pairwise(rows)]
        assert gaps[-1] == math.ceil(cost * 0.9 / 0.1 - 1e-9)
        assert all(row["linearity/seconds/kernel"] == cost for row in monitor.history)


def test_the_budget_filters_a_fixed_schedule(tmp_path, monkeypatch):
    monitor = budget_run(tmp_path, 1.0, monkeypatch, every_n_steps=5)
    steps = [row["step"] for row in monitor.history]
    assert all(step % 5 == 0 for step in steps)
    assert 5 not in steps  # due, but the budget did not allow it yet
    assert len(steps) < 200 // 5


def test_budget_plan_by_hand():
    clock = FakeClock()
    budget = OverheadBudget(0.25, clock=clock)
    budget.start(step=0)
    clock.now = 2.0
    budget.record(2.0)
    assert budget.plan(0) == 1 and budget.provisional  # no training step timed yet
    clock.now = 3.0  # step 1 took 1 s
    # (R + r) <= b (T + g s + r): (2 + 2) <= 0.25 (3 + g + 2)  ->  g >= 11
    assert budget.plan(1) == 12 and not budget.provisional
