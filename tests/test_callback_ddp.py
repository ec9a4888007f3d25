"""LinearityMonitor under real DDP on the CPU (2 ranks, gloo), against a single-process run.

One DDP run (a subprocess with a hard timeout, see ``ddp_linearity_run.py``) serves both tests: it splits
every metric across the ranks, and a fault injected into ``grad_cosines`` on rank 1 only at step 2 must be
skipped on both ranks with a warning while training finishes everywhere.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ddp_linearity_run import EVERY_N_STEPS, MAX_STEPS, fit, read_rounds

from lightning_linearity.keys import is_timing

HELPER = Path(__file__).with_name("ddp_linearity_run.py")
FAIL_RANK, FAIL_STEP, FAIL_VALUES_STEP = 1, 2, 4
KERNEL_KEYS = ("lambda", "condition_number", "ntk_trace", "pl_ratio", "kernel_change", "catapult")
STEPS = list(range(0, MAX_STEPS + 1, EVERY_N_STEPS))

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    command = [sys.executable, str(HELPER), str(out), "--devices", "2"]
    command += ["--fail-rank", str(FAIL_RANK), "--fail-step", str(FAIL_STEP)]
    command += ["--fail-values-step", str(FAIL_VALUES_STEP)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=out)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out, proc.stderr


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    monitor = fit(out, devices=1)
    return read_rounds(out / "metrics.csv"), monitor


def test_ddp_logs_the_single_process_values(ddp_run, single_run):
    out, _ = ddp_run
    ddp, (single, monitor) = read_rounds(out / "metrics.csv"), single_run
    assert sorted(ddp) == sorted(single) == STEPS
    # the single-process run logs what its history holds, on the same steps
    measured = {
        h["step"]: {k: v for k, v in h.items() if k != "step" and not is_timing(k)} for h in monitor.history
    }
    assert measured == single
    for step in STEPS:
        expected = dict(single[step])
        if step == FAIL_STEP:  # skipped on every rank in the DDP run
            for key in [k for k in expected if k.startswith("linearity/grad_cosine/")]:
                del expected[key]
        if step == FAIL_VALUES_STEP:  # the kernel failed after its gather on one rank: skipped everywhere
            for key in [k for k in expected if k.removeprefix("linearity/").startswith(KERNEL_KEYS)]:
                del expected[key]
        assert sorted(ddp[step]) == sorted(expected), step
        for key, value in expected.items():
            assert ddp[step][key] == pytest.approx(value, rel=1e-9, abs=1e-12), (step, key)
    assert single[MAX_STEPS]["linearity/lambda_min"] > 0
    assert single[MAX_STEPS]["linearity/kernel_change"] > 0


def test_a_fault_on_one_rank_is_skipped_everywhere_and_training_finishes(ddp_run):
    out, stderr = ddp_run
    assert (out / "done_rank0").exists() and (out / "done_rank1").exists()
    assert f"grad_cosines failed at step {FAIL_STEP} on rank {FAIL_RANK}" in stderr
    assert f"injected fault on rank {FAIL_RANK}" in stderr
    assert f"grad_cosines failed at step {FAIL_STEP} on another rank" in stderr
    assert f"ntk, kernel_change failed at step {FAIL_VALUES_STEP} on rank {FAIL_RANK}" in stderr
    assert f"ntk, kernel_change failed at step {FAIL_VALUES_STEP} on another rank" in stderr
    rounds = read_rounds(out / "metrics.csv")
    with_cosines = [step for step in STEPS if "linearity/grad_cosine/layer_2" in rounds[step]]
    assert with_cosines == [step for step in STEPS if step != FAIL_STEP]
    assert all(torch.isfinite(torch.tensor(list(values.values()))).all() for values in rounds.values())
