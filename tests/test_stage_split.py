"""The DDP split of a metric round without processes: the rows of every rank's share, concatenated in rank
order (what the all-gather does), give the values one process computes from a single share of everything.

The real 2-process gloo run is in test_callback_ddp.py (one small model); here every stage and both
paths (structured for the package's nets, generic for a foreign module) with 1 to 4 "ranks", including
ranks with an empty share.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_linearity.callbacks._distributed import probe_share
from lightning_linearity.callbacks._probe import ProbeSet
from lightning_linearity.callbacks._stages import RoundContext, build_stages, parse_metrics
from lightning_linearity.nets import LayeredNTKNet

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = {
    "ntk": {},
    "kernel_change": {},
    "hessian_norm": {"num_points": 2, "layers": [2], "num_neurons": 3, "tol": 1e-4},
    "grad_cosines": {"num_points": 2, "num_neurons": 4},
}


def split_values(stage, ctx: RoundContext, world_size: int) -> dict[str, float]:
    """The stage's values from the rows of ``world_size`` shares, gathered in rank order."""
    n = stage.num_units(ctx)
    shares = [stage.rows(ctx, probe_share(n, rank, world_size)) for rank in range(world_size)]
    rows = {key: torch.cat([share[key] for share in shares]) for key in shares[0]}
    assert all(value.shape[0] == n for value in rows.values())
    return stage.values(ctx, rows)


def foreign_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 9), nn.Tanh(), nn.Linear(9, 3)).double()


@pytest.mark.parametrize("family", ["fcn", "masked_dag", "foreign"])
def test_every_split_gives_the_single_process_values(family):
    if family == "foreign":
        model = foreign_model()
        metrics = {**METRICS, "hessian_norm": {**METRICS["hessian_norm"], "layers": ["2"]}}
        metrics["grad_cosines"] = {**METRICS["grad_cosines"], "layers": ["0", "2"]}
    else:
        builder = LayeredNTKNet.fcn if family == "fcn" else LayeredNTKNet.masked_dag
        model, metrics = builder(5, [12, 9], 3, bias=True, seed=0).double(), METRICS
    x = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ctx = RoundContext(model, ProbeSet(x), None, seed=0, take_references=True)
    for stage in build_stages(parse_metrics(metrics)):
        stage.setup(model, torch.float64)
        whole = split_values(stage, ctx, 1)
        for world_size in (2, 3, 4):  # 3 and 4 ranks leave some without cosine points
            stage.reset()
            split = split_values(stage, ctx, world_size)
            assert split.keys() == whole.keys()
            for key, value in whole.items():
                assert split[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (family, world_size, key)
