"""A real WandbLogger run, offline: the run's local files hold the linearity/ metrics against the global
step, the run config (model hyperparameters and the monitor's settings) and the report images."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from lightning_linearity.cli import main

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (after the importorskip)

ROOT = Path(__file__).resolve().parents[1]
FCN = str(ROOT / "configs" / "fcn_digits.yaml")
FIGURES = ("linearity_curves", "ntk_spectrum", "grad_cosines")
BLOCK = 32 * 1024  # the .wandb file is a LevelDB-style log of 32 KiB blocks after a 7-byte header


def wandb_records(path: Path):
    """The protobuf records of a ``run-*.wandb`` transaction log, reassembled from their chunks.

    Each chunk has a 7-byte header (CRC32, little-endian length, type: 1 full, 2 first, 3 middle,
    4 last); a block's tail shorter than a header is padding. Reading stops at a truncated chunk.
    """
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, payload = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if pos + 7 + length > len(data):
            return  # a chunk still being written
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            payload = b""
            yield record


def finished_run_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run's log once it holds the run's ``exit`` record: wandb's service process may
    still be writing the file when ``wandb.finish()`` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(record.WhichOneof("record_type") == "exit" for record in records):
            return records
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.5)


def items(update) -> dict[str, object]:
    """``{key: value}`` of a history row or config update (nested keys joined with '/')."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def test_offline_wandb_run_records_metrics_config_and_images(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-linearity"])
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    args = ["fit", "--config", FCN, "--model.init_args.width", "16", "--trainer.max_steps", "3"]
    logger = ["--trainer.logger", "WandbLogger", "--trainer.logger.project", "ll-test"]
    try:
        assert main([*args, *logger, "--trainer.logger.save_dir", str(tmp_path)]) == 0
    finally:
        wandb.finish()

    (run_file,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    records = finished_run_records(run_file)
    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    config = {}
    for r in records:
        if r.WhichOneof("record_type") == "config":
            config.update(items(r.config.update))
    metrics = {
        r.metric.glob_name: r.metric.step_metric for r in records if r.WhichOneof("record_type") == "metric"
    }

    # metrics under linearity/, every row carrying the global step, which is their x-axis
    rows = [row for row in history if "linearity/lambda_min" in row]
    assert [row["trainer/global_step"] for row in rows] == [0, 3]
    for key in ("kernel_change", "hessian_norm_max", "grad_cosine/layer_2", "linearization_error_max"):
        assert all(f"linearity/{key}" in row for row in rows)
    assert metrics["linearity/*"] == "trainer/global_step"

    # run config: the model's hyperparameters and the monitor's settings
    assert config["width"] == 16 and config["lr"] == 0.1 and config["loss"] == "mse"
    assert config["linearity_monitor"]["every_n_steps"] == 100
    assert set(config["linearity_monitor"]["metrics"]) == {
        "ntk",
        "kernel_change",
        "hessian_norm",
        "grad_cosines",
        "linearization",
    }

    # the report figures as images, saved with the run
    files = run_file.parent / "files"
    for name in FIGURES:
        (row,) = [row for row in history if f"linearity_plots/{name}/filenames" in row]
        assert row["trainer/global_step"] == 3
        (image,) = row[f"linearity_plots/{name}/filenames"]
        assert (files / image).read_bytes()[:4] == b"\x89PNG"

    # ... and as PNG files with the resolved config in the run's own directory
    run_dir = tmp_path / "ll-test" / run_file.stem.removeprefix("run-")
    assert {p.name for p in run_dir.iterdir()} >= {f"{name}.png" for name in FIGURES} | {"config.yaml"}
