"""The package as a user installs it: a wheel built from the repo, installed into a fresh virtual environment
outside the checkout, answers ``--version`` and trains with a packaged config by name."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import lightning_linearity

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def run(*command: str | Path, cwd: Path, timeout: float = 300, env: dict | None = None) -> str:
    done = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )
    assert done.returncode == 0, f"{command}: {done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv holding only the built wheel; the dependencies (torch, Lightning, ...) are borrowed
    from the test environment through a path file, so nothing is downloaded."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"  # a copy: building writes build/ and egg-info next to the sources
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "runs", "*.egg-info", "__pycache__", "wandb")
    shutil.copytree(ROOT, source, ignore=ignore, symlinks=True)
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", tmp / "dist", source, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("lightning_linearity-*.whl")
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(run(python, "-c", purelib, cwd=tmp).strip())
    # the test environment's packages, after the fresh venv's own (a .pth in a non-site folder, such as the
    # editable install's, is not processed, so the checkout stays out of sys.path)
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(*pip, "install", "--no-deps", "--target", site, wheel, cwd=tmp)
    return env_dir


def test_wheel_in_a_fresh_venv_runs_version_and_a_packaged_config(installed, tmp_path):
    python = installed / "bin" / "python"
    env = {**os.environ, "PYTHONPATH": ""}
    where = run(python, "-c", "import lightning_linearity as m; print(m.__file__)", cwd=tmp_path, env=env)
    assert str(installed) in where and str(ROOT) not in where  # the installed copy, not the checkout
    version = run(python, "-m", "lightning_linearity", "--version", cwd=tmp_path, env=env)
    assert version.startswith(f"lightning-linearity {lightning_linearity.__version__} ")
    args = ["fit", "--config", "fcn_digits", "--model.init_args.width", "16", "--trainer.max_steps", "2"]
    args += ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]
    out = run(python, "-m", "lightning_linearity", *args, cwd=tmp_path, env=env)
    assert "linearity/lambda_min" in out
    assert (tmp_path / "runs" / "fcn_digits" / "version_0" / "metrics.csv").is_file()
    # the typing marker and the sweep configs ship too
    package = Path(where.strip()).parent
    assert (package / "py.typed").is_file() and list((package / "configs" / "sweeps").glob("*.yaml"))
