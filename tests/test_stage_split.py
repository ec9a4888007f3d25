"""The DDP split of a metric round without processes: the rows of every rank's share, concatenated in rank
order (what the all-gather does), give the values one process computes from a single share of everything.

The real 2-process gloo run is in test_callback_ddp.py (one small model); here every stage and every path
(structured for the package's nets, the per-module engine for a foreign module it takes, generic for one it
refuses) with 1 to 4 "ranks", including ranks with an empty share.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_linearity.callbacks
from lightning_linearity import keys
from lightning_linearity.callbacks._distributed import probe_share
from lightning_linearity.callbacks._probe import ProbeSet
from lightning_linearity.callbacks._stages import Kernel, RoundContext, build_stages, parse_metrics
from lightning_linearity.metrics import hessian_spectral_norm
from lightning_linearity.metrics.engine import ntk_rows
from lightning_linearity.nets import LayeredNTKNet

pytestmark = pytest.mark.usefixtures("one_thread")

METRICS = {
    "ntk": {},
    "kernel_change": {},
    "hessian_norm": {
        "num_points": 2,
        "layers": [2],
        "num_neurons": 3,
        "tol": 1e-4,
        "eigenvector_shares": True,
    },
    "grad_cosines": {"num_points": 2, "num_neurons": 4},
    "linearization": {},
    "sharpness": {"tol": 1e-6},
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


class Tied(nn.Module):
    """Tied weights: the engine refuses the model (its per-module blocks would miss the cross terms)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.hidden, self.last = nn.Linear(5, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.again = nn.Linear(6, 6)
        self.again.weight = self.hidden.weight

    def forward(self, x):
        return self.last(torch.tanh(self.again(torch.tanh(self.hidden(torch.tanh(self.first(x)))))))


def probe() -> torch.Tensor:
    return torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def family_setup(family: str) -> tuple[nn.Module, dict]:
    if family in ("foreign", "tied"):
        model = foreign_model() if family == "foreign" else Tied().double()
        layers = ["0", "2"] if family == "foreign" else ["first", "hidden"]
        metrics = {**METRICS, "hessian_norm": {**METRICS["hessian_norm"], "layers": [layers[1]]}}
        metrics["grad_cosines"] = {**METRICS["grad_cosines"], "layers": layers}
        return model, metrics
    builder = LayeredNTKNet.fcn if family == "fcn" else LayeredNTKNet.masked_dag
    return builder(5, [12, 9], 3, bias=True, seed=0).double(), {**METRICS, "kernel_regime": {}}


@pytest.mark.parametrize("family", ["fcn", "masked_dag", "foreign", "tied"])
def test_every_split_gives_the_single_process_values(family):
    model, metrics = family_setup(family)
    targets = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ctx = RoundContext(model, ProbeSet(probe()), targets, seed=0, take_references=True, lr=0.1)
    for stage in build_stages(parse_metrics(metrics)):
        if family in ("foreign", "tied") and stage.name == "hessian_norm":
            with pytest.warns(UserWarning, match="eigenvector_shares is off for this run"):
                stage.setup(model, torch.float64)
        else:
            stage.setup(model, torch.float64)
        whole = split_values(stage, ctx, 1)
        for world_size in (
            2,
            3,
            4,
            7,
        ):  # 3 and 4 ranks leave some without cosine points, 7 without NTK points
            stage.reset()
            split = split_values(stage, ctx, world_size)
            assert split.keys() == whole.keys()
            for key, value in whole.items():
                assert split[key] == pytest.approx(value, rel=1e-9, abs=1e-12), (family, world_size, key)
        if stage.name == "hessian_norm":
            shares = [key for key in whole if key.startswith(keys.HESSIAN_EIGENVECTOR_SHARE)]
            assert len(shares) == (0 if family in ("foreign", "tied") else 3), shares
            assert (keys.HESSIAN_EIGENVECTOR_NEURON_SHARE in whole) == bool(shares)


def explicit_ntk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J J^T from the explicit Jacobian of the flattened output (torch.autograd.functional.jacobian)."""
    names, params = zip(*[(n, p.detach()) for n, p in model.named_parameters()], strict=True)

    def f(*values):
        return torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,)).reshape(-1)

    jac = torch.autograd.functional.jacobian(f, params)
    flat = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return flat @ flat.T


@pytest.mark.parametrize(
    ("family", "path"), [("fcn", "structured"), ("foreign", "engine"), ("tied", "generic")]
)
def test_the_kernel_stage_takes_each_path_and_gives_the_explicit_kernel(family, path):
    model, _ = family_setup(family)
    x = probe()
    ctx = RoundContext(model, ProbeSet(x), None, seed=0, take_references=True)
    stage = Kernel(parse_metrics(["ntk"])["ntk"], None)
    rows = stage.rows(ctx, slice(1, 3))["ntk"]
    assert stage.path.name == path
    if path == "engine":  # the rank's own points only: the engine's factor rows of x[1:3]
        torch.testing.assert_close(rows, ntk_rows(model, x[1:3], stage.path.plan), rtol=0, atol=0)
    stage.values(
        ctx,
        {"ntk": torch.cat([stage.rows(ctx, slice(0, 1))["ntk"], rows, stage.rows(ctx, slice(3, 5))["ntk"]])},
    )
    torch.testing.assert_close(stage.latest, explicit_ntk(model, x), rtol=1e-10, atol=1e-12)


def test_the_eigenvector_shares_are_those_of_the_metric():
    model = LayeredNTKNet.fcn(5, [12, 9], 3, bias=True, seed=0).double()
    x = probe()
    options = {"num_points": 2, "tol": 1e-6, "max_iter": 80, "eigenvector_shares": True}
    ctx = RoundContext(model, ProbeSet(x), None, seed=7, take_references=True)
    (stage,) = build_stages(parse_metrics({"hessian_norm": options}))
    stage.setup(model, torch.float64)
    logged = split_values(stage, ctx, 2)
    # the metric called directly, point by point (a generator seeded like the round's): the output Hessian
    # of the largest norm over points and outputs, and where its top eigenvector lives
    direct = [
        hessian_spectral_norm(
            model,
            x[i : i + 1],
            generator=torch.Generator().manual_seed(7),
            tol=1e-6,
            max_iter=80,
            return_info=True,
            eigenvector_shares=True,
        )
        for i in range(2)
    ]
    norms = torch.cat([values.flatten() for values, _ in direct])
    top = int(norms.argmax())
    info = direct[top // 3][1]
    assert logged[keys.HESSIAN_NORM_MAX] == pytest.approx(float(norms.max()), rel=1e-12)
    for group, share in zip(info.share_names, info.layer_shares[0, top % 3], strict=True):
        assert logged[keys.eigenvector_share_key(group)] == pytest.approx(float(share), rel=1e-12)
    assert logged[keys.HESSIAN_EIGENVECTOR_NEURON_SHARE] == pytest.approx(
        float(info.neuron_share[0, top % 3]), rel=1e-12
    )
    assert sum(
        logged[keys.eigenvector_share_key(g)] for g in ("layer_1", "layer_2", "output")
    ) == pytest.approx(1)


def test_the_callbacks_import_nothing_private_from_the_metrics():
    """The stages schedule, keep references and gather; the metrics' work splits and helpers are public."""
    folder = Path(lightning_linearity.callbacks.__file__).parent
    private = re.compile(
        r"lightning_linearity\.metrics(\.\w+)*\._\w+|from lightning_linearity\.metrics(\.\w+)* import _"
    )
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in sorted(folder.glob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if private.search(line)
    ]
    assert not found, found


def test_the_engine_can_be_named_for_the_kernel_and_the_cosines():
    """method="engine" in the options of ntk and grad_cosines (the metrics with an engine route) gives what
    "auto" picks for a foreign model; the Hessian has no engine route and refuses it at init."""
    model, metrics = family_setup("foreign")
    ctx = RoundContext(model, ProbeSet(probe()), None, seed=0, take_references=True)
    values = {}
    for method in ("auto", "engine"):
        chosen = {"ntk": {"method": method, "pl_ratio": False}}
        chosen["grad_cosines"] = {**metrics["grad_cosines"], "method": method}
        values[method] = {}
        for stage in build_stages(parse_metrics(chosen)):
            stage.setup(model, torch.float64)
            values[method].update(split_values(stage, ctx, 2))
    assert values["engine"].keys() == values["auto"].keys() and len(values["auto"]) > 4
    for key, value in values["auto"].items():
        assert values["engine"][key] == pytest.approx(value, rel=1e-12, abs=1e-14), key
    with pytest.raises(
        Exception, match="hessian_norm': method must be 'auto', 'structured' or 'generic', got 'engine'"
    ):
        parse_metrics({"hessian_norm": {"method": "engine"}})
