"""The papers' reproductions, reduced: every example script runs its configs' ``ci`` profile (small widths,
one seed) and must exit 0, i.e. every claim of that profile holds (the direction of each trend). The full
versions are documented in docs/reproductions.md."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import yaml

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
