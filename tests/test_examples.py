"""The example scripts run (shrunk: fewer steps, smaller widths) and print what they claim to show."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str) -> str:
    """Run ``examples/<name>`` in a fresh interpreter; return its stdout (fail with its stderr)."""
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def table_rows(out: str, first_column: str) -> dict[int, list[float]]:
    """Rows of a printed table whose first cell is an integer: ``{first cell: the other cells}``."""
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0].isdigit() and len(cells) > 1 and re.fullmatch(r"[-+.\deE]+|nan", cells[1]):
            rows[int(cells[0])] = [float(cell) for cell in cells[1:]]
    assert rows, f"no table with a {first_column!r} column in:\n{out}"
    return rows


def test_quickstart_shows_the_wide_network_closer_to_linear(tmp_path):
    out = run_example("quickstart.py", "--widths", "16", "256", "--max-steps", "20", "--root", str(tmp_path))

    rows = table_rows(out, "width")
    narrow, wide = rows[16], rows[256]
    # columns: lambda_min, kernel change, relative linearisation error, |cos| layer 2
    assert wide[1] < narrow[1] and wide[2] < narrow[2] and wide[3] < narrow[3]
    assert (tmp_path / "width_256" / "version_0" / "linearity_curves.png").is_file()


def test_custom_model_is_measured_through_the_engine(tmp_path):
    out = run_example(
        "custom_model.py", "--width", "32", "--max-steps", "4", "--every", "2", "--root", str(tmp_path)
    )

    rows = table_rows(out, "step")
    assert sorted(rows) == [0, 2, 4]
    assert rows[0][:3] == [0.0, 0.0, 0.0]  # at w_0: no distance, no kernel change, f == f_lin
    assert rows[4][0] > 0 and rows[4][1] > 0
    assert "the NTK on the engine path" in out


def test_cnn_example_gets_every_default_metric_under_the_lightning_namespace(tmp_path):
    out = run_example(
        "cnn_digits.py", "--channels", "8", "--max-steps", "4", "--every", "2", "--root", str(tmp_path)
    )

    assert "cosines measured on layers ['features.0', 'features.2']" in out
    rows = table_rows(out, "step")
    assert sorted(rows) == [0, 2, 4]
    # columns: lambda_min, kernel change, Hessian norm, |cos| of both convolutions, round seconds
    assert all(len(cells) == 6 and all(math.isfinite(c) for c in cells) for cells in rows.values())
    assert rows[0][1] == 0.0 and rows[4][1] > 0  # K_0 is the reference; training moves K
    assert all(0 < cells[3] < 1 and 0 < cells[4] < 1 and cells[2] > 0 for cells in rows.values())
    assert (tmp_path / "channels_8" / "version_0" / "linearity_curves.png").is_file()


@pytest.mark.slow
def test_ddp_cpu_matches_one_process(tmp_path):
    out = run_example("ddp_cpu.py", "--max-steps", "4", "--width", "32", "--root", str(tmp_path))

    assert "2 processes" in out
    compared = [line.split() for line in out.splitlines() if line.strip().startswith("linearity/")]
    assert len(compared) == 3
    for _, single, ddp in compared:
        # float32 rows of K gathered from two ranks vs K in one piece: entries agree to rounding, ~1e-7 of
        # ||K|| ~ 5, which moves lambda_min ~ 0.03 by ~1e-5 of itself at most
        assert float(ddp) == pytest.approx(float(single), rel=1e-4)
    assert (tmp_path / "ddp_cpu" / "version_0" / "metrics.csv").is_file()


def markdown_rows(text: str) -> list[dict[str, str]]:
    """The rows of a markdown table as ``{column: cell}``."""
    lines = [line.strip().strip("|").split("|") for line in text.splitlines() if line.startswith("|")]
    header, body = [cell.strip() for cell in lines[0]], lines[2:]
    return [dict(zip(header, (cell.strip() for cell in cells), strict=True)) for cells in body]


def test_lazy_vs_catapult_quick_run_shows_both_regimes(tmp_path):
    out = run_example("lazy_vs_catapult.py", "--quick", "--out", str(tmp_path))

    rows = {float(row["c"]): row for row in markdown_rows((tmp_path / "table.md").read_text())}
    assert out.count("| 256 |") == 2 and sorted(rows) == [0.5, 3.0]
    lazy, catapult = ({key: float(v) for key, v in row.items() if key != "regime"} for row in rows.values())
    # the same network: the same K_0, the steps eta = c / lambda_max(K_0)
    assert lazy["lambda_max(K_0)"] == catapult["lambda_max(K_0)"]
    for row, c in ((lazy, 0.5), (catapult, 3.0)):
        assert row["eta"] * row["lambda_max(K_0)"] == pytest.approx(c, rel=1e-3)
    # lazy: the loss falls at every step, the kernel hardly moves, eta * lambda_max(K) / 2 stays near c / 2
    assert lazy["loss_rises"] == 0 and lazy["loss_max"] == lazy["loss_0"] > lazy["loss_end"]
    assert lazy["kernel_change_end"] < 0.05
    assert lazy["eta*lambda_max(K_end)/2"] == pytest.approx(0.25, rel=0.05)
    # catapult: the loss rises above its start, lambda_max(K) falls below 2 / eta, then the loss converges
    assert catapult["loss_max"] > 2 * catapult["loss_0"] and catapult["loss_end"] < lazy["loss_end"]
    assert catapult["eta*lambda_max(K_end)/2"] < 0.8
    assert catapult["kernel_change_end"] > 0.3 > 10 * lazy["kernel_change_end"]
    # the loss Hessian's top eigenvalue near a minimum: about its Gauss-Newton part lambda_max(K)
    for row in (lazy, catapult):
        assert row["eta*sharpness_end/2"] == pytest.approx(row["eta*lambda_max(K_end)/2"], rel=0.05)
    assert [rows[0.5]["regime"], rows[3.0]["regime"]] == ["lazy", "catapult"]
    assert (tmp_path / "lazy_vs_catapult.png").read_bytes()[:4] == b"\x89PNG"
