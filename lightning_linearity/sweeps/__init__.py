"""The parts of a width sweep, one job per module (the entry point is :mod:`lightning_linearity.sweep`).

- :mod:`~lightning_linearity.sweeps.config`: :class:`SweepConfig`, its checks, YAML files, run identities.
- :mod:`~lightning_linearity.sweeps.collect`: the collectable metrics and their reductions over training.
- :mod:`~lightning_linearity.sweeps.run`: one run (data, model, step size, Lightning training, collection).
- :mod:`~lightning_linearity.sweeps.store`: ``runs.csv`` / ``histories.jsonl``, which make sweeps resumable.
- :mod:`~lightning_linearity.sweeps.pool`: the pending runs, sequential or in parallel processes, progress.
- :mod:`~lightning_linearity.sweeps.fit`: log-log slope fits with t or bootstrap intervals, and log-corrected
  fits log y = a + alpha log m + b log log m.
- :mod:`~lightning_linearity.sweeps.report`: markdown report and log-log plots.
- :mod:`~lightning_linearity.sweeps.claims`: the papers' claims, checked against the measurements.
"""

from lightning_linearity.sweeps.config import RunSpec, SweepConfig, SweepError, load_config_file
from lightning_linearity.sweeps.fit import LogCorrectedFit, SlopeFit, fit_log_corrected, fit_loglog

__all__ = [
    "LogCorrectedFit",
    "RunSpec",
    "SlopeFit",
    "SweepConfig",
    "SweepError",
    "fit_log_corrected",
    "fit_loglog",
    "load_config_file",
]
