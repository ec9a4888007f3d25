"""The papers' reproductions, reduced: every example script runs its configs' ``ci`` profile (small widths,
one seed) and must exit 0, i.e. every claim of that profile holds (the direction of each trend); the other
profiles run end to end at tiny widths. The full versions are documented in docs/reproductions.md."""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from lightning_linearity.sweep import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("reproduce_*.py"))
CONFIGS = sorted((ROOT / "configs" / "sweeps").glob("*.yaml"))


def test_every_config_has_an_example_and_a_ci_profile():
    used = set()
    for script in EXAMPLES:
        namespace = runpy.run_path(str(script))  # not as __main__: only defines its config paths
        used |= set(namespace.get("CONFIGS", [namespace.get("CONFIG")]))
    assert used == set(CONFIGS)
    for config in CONFIGS:
        raw = yaml.safe_load(config.read_text())
        assert raw["claims"], config.name
        assert "ci" in raw["profiles"], config.name


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_reduced_reproduction_holds(script, tmp_path, monkeypatch, capsys):
    argv = [str(script), "--profile", "ci", "--out", str(tmp_path), "--threads", "1", "--progress", "false"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    printed = capsys.readouterr().out
    assert done.value.code == 0, printed
    assert "PASS" in printed and "FAIL" not in printed


#: Tiny widths for the profiles that are not ``ci``: the pipeline end to end, not the claims' numbers.
TINY = "--widths [16,32,64] --seeds [0,1] --max_steps 30 --threads 1 --progress false".split()
#: Two probe points for the Hessian (the frozen profile's generic path is the slow part).
FEW_POINTS = ["--monitor_args", "{hessian_norm: {num_points: 2, tol: 1.0e-3, max_iter: 100}}"]


@pytest.mark.parametrize("profile", ["seeds8", "frozen_first_layer"])
def test_masked_dag_hessian_profiles_run_end_to_end(profile, tmp_path, capsys):
    """The log-corrected fit (b at alpha = -1/2) is reported and claimed; the frozen profile, at init."""
    status = main(
        ["--config", "hessian_masked_dag", "--profile", profile, "--out", str(tmp_path), *TINY, *FEW_POINTS]
    )
    printed = capsys.readouterr().out
    assert status in (0, 3), printed  # 3: a claim fails at these widths, which decide nothing
    assert "Log-corrected fits" in printed and "b at alpha = -0.5" in printed
    with (tmp_path / "runs.csv").open() as handle:
        runs = list(csv.DictReader(handle))
    assert len(runs) == 6 and all(run["status"] != "diverged" for run in runs)
    if profile == "frozen_first_layer":
        assert all(run["status"] == "init" for run in runs)
    else:
        assert "expected b in [0.5, 2]" in printed
