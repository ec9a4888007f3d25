"""Faults a new user runs into with the networks and the sweep store: a one-line ``ValueError`` that names
the argument (and the fix), or correct behaviour; crafted and corrupt store files never crash a sweep."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_linearity.models import NTKFCN, MaskedDAGNet
from lightning_linearity.nets import LayeredNTKNet, NTKLinear, layer_edges
from lightning_linearity.sweeps.store import RunStore

NAN, INF = float("nan"), float("inf")
EDGES = [("x", "h"), ("h", "o")]

# ----------------------------------------------------------------------------------------- networks
BAD_ARGUMENTS = [
    # NTKLinear
    (lambda: NTKLinear(-1, 3), "in_features must be a positive integer, got -1"),
    (lambda: NTKLinear(2.5, 3), "in_features must be a positive integer, got 2.5"),
    (lambda: NTKLinear(NAN, 3), "in_features must be a positive integer, got nan"),
    (lambda: NTKLinear("4", 3), "in_features must be a positive integer, got '4'"),
    (lambda: NTKLinear(True, 3), "in_features must be a positive integer, got True"),
    (lambda: NTKLinear(3, 0), "out_features must be a positive integer, got 0"),
    (lambda: NTKLinear(2, 2, bias="no"), "bias must be True or False, got 'no'"),
    (lambda: NTKLinear(2, 2, mask="abc"), r"mask must be a 0/1 tensor of shape \(2, 2\), got str"),
    (lambda: NTKLinear(2, 2, mask=torch.tensor([[1.0, NAN], [1, 1]])), "mask entries must be 0 or 1"),
    # LayeredNTKNet and its builders
    (lambda: LayeredNTKNet(3, None), "hidden_widths must be a non-empty list of positive integers, got None"),
    (lambda: LayeredNTKNet(3, 8.0), "hidden_widths must be a non-empty list .* got 8.0"),
    (lambda: LayeredNTKNet(3, "8"), "hidden_widths must be a non-empty list .* got '8'"),
    (lambda: LayeredNTKNet(3, [NAN]), "every hidden width must be a positive integer, got nan"),
    (lambda: LayeredNTKNet(3, [INF]), "every hidden width must be a positive integer, got inf"),
    (lambda: LayeredNTKNet(3, [-4]), "every hidden width must be a positive integer, got -4"),
    (lambda: LayeredNTKNet(3, [True]), "every hidden width must be a positive integer, got True"),
    (lambda: LayeredNTKNet(3, [8.0]), "every hidden width must be a positive integer, got 8.0"),
    (lambda: LayeredNTKNet(3, [4], bias="yes"), "bias must be True or False, got 'yes'"),
    (lambda: LayeredNTKNet(3, [4], masks="ab"), "masks must be a list of 2 0/1 tensors or None, got str"),
    (
        lambda: LayeredNTKNet(3, [4], output_distance=["a"]),
        "every output_distance must be a positive integer",
    ),
    (
        lambda: LayeredNTKNet(3, [4], seed=-1),
        r"seed \(the models' init_seed\) must be an integer in \[0, 2\*\*64\)",
    ),
    (
        lambda: LayeredNTKNet(3, [4], seed=1.5),
        r"seed .* must be an integer in \[0, 2\*\*64\) or None, got 1.5",
    ),
    (lambda: LayeredNTKNet(3, [4], seed=NAN), "seed .* got nan"),
    (lambda: LayeredNTKNet(3, [4], seed="3"), "seed .* got '3'"),
    (lambda: LayeredNTKNet(3, [4], seed=True), "seed .* got True"),
    (lambda: LayeredNTKNet(3, [4], seed=2**70), r"seed .* \[0, 2\*\*64\)"),
    (lambda: LayeredNTKNet.masked_dag(3, 4), "hidden_widths must be a non-empty list .* got 4"),
    (lambda: LayeredNTKNet.masked_dag(3, [4], mask_seed=1.5), "mask_seed must be an integer .* got 1.5"),
    (lambda: LayeredNTKNet.masked_dag(3, [4], mask_seed="x"), "mask_seed must be an integer .* got 'x'"),
    (lambda: LayeredNTKNet.masked_dag(3, [4], mask_seed=-2), "mask_seed must be an integer .* got -2"),
    # edge lists
    (lambda: layer_edges(None), r"edges must be a list of \(u, v\) pairs, got None"),
    (lambda: layer_edges(5), r"edges must be a list of \(u, v\) pairs, got 5"),
    (lambda: layer_edges("ab"), r"edges must be a list of \(u, v\) pairs, got 'ab'"),
    (lambda: layer_edges([5]), r"each edge must be a pair \(u, v\); got 5"),
    (lambda: layer_edges([([1], 2)]), r"vertex \[1\] is not hashable; use strings, integers or tuples"),
    (lambda: layer_edges([(None, "h"), ("h", "o")]), "vertex None is not a usable label"),
    (lambda: layer_edges([(NAN, "h"), ("h", "o")]), "vertex nan is not a usable label"),
    (
        lambda: layer_edges(EDGES, inputs="x"),
        r"`inputs` must be a list of vertices, got 'x'; e.g. write \['x'\]",
    ),
    (lambda: layer_edges(EDGES, outputs=5), "`outputs` must be a list of vertices, got 5"),
    (lambda: layer_edges(EDGES, outputs=[None]), "`outputs`: vertex None is not a usable label"),
    # through the LightningModules
    (lambda: NTKFCN(4, 1, width=8, depth=1, init_seed=1.5), "seed .*init_seed.* got 1.5"),
    (lambda: NTKFCN(4, 1, width=8, depth=1, bias="no"), "bias must be True or False"),
    (lambda: NTKFCN(4, 1, widths=[8, NAN]), "every hidden width must be a positive integer, got nan"),
    (lambda: MaskedDAGNet(4, 1, width=8, depth=1, mask_seed="3"), "mask_seed must be an integer .* got '3'"),
    (lambda: MaskedDAGNet(2, 1, edges=[[0, 2], [1, None]]), "vertex None is not a usable label"),
]


@pytest.mark.parametrize(("build", "match"), BAD_ARGUMENTS, ids=[m[:40] for _, m in BAD_ARGUMENTS])
def test_bad_network_arguments_get_one_line_errors(build, match):
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert len(str(info.value).splitlines()) == 1


def test_numpy_integers_are_integers():
    """Widths and seeds read from numpy arrays (e.g. a grid) build the same network as Python ints."""
    a = LayeredNTKNet(np.int64(3), [np.int64(8), np.int32(5)], np.int64(2), seed=np.uint64(7))
    b = LayeredNTKNet(3, [8, 5], 2, seed=7)
    assert a.hidden_widths == [8, 5] and all(type(w) is int for w in a.hidden_widths)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)
    masked = LayeredNTKNet.masked_dag(3, np.array([6, 6]), mask_seed=np.int64(1), seed=2)
    assert masked.hidden_widths == [6, 6]


def test_numpy_bool_bias_is_a_flag():
    assert NTKLinear(3, 2, bias=np.bool_(True)).bias is not None


# ------------------------------------------------------------------------------------ store files
def record(run_id: str, **values) -> dict:
    return {"run_id": run_id, "width": 8, "seed": 0, "status": "converged", **values}


CRAFTED_LINES = [
    b"[1, 2, 3]",  # JSON, but not an object
    b'"just a string"',
    b"\xff\xfe\x00garbage",
    b"[" * 100_000 + b"]" * 100_000,  # deep enough to overflow the parser's recursion
    b'{"run_id": 5, "width": 8}',  # a run_id that is no string
    b'{"width": 8}',  # no run_id at all
]


@pytest.mark.parametrize("line", CRAFTED_LINES, ids=["list", "string", "binary", "deep", "int_id", "no_id"])
def test_crafted_record_lines_are_skipped_with_a_warning(tmp_path, line):
    store = RunStore(tmp_path)
    store.add(record("good", value=1.5), [])
    with (tmp_path / "runs.jsonl").open("ab") as handle:
        handle.write(line + b"\n")
    with pytest.warns(RuntimeWarning, match=r"runs.jsonl: skipped"):
        reread = RunStore(tmp_path)
    assert len(reread) == 1 and reread.rows(["good"])[0]["value"] == 1.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reread.add(record("after", value=2.5), [])  # the folder stays usable
        assert [r["run_id"] for r in RunStore(tmp_path).rows(["good", "after"])] == ["good", "after"]


def test_an_old_csv_without_run_ids_is_read_as_empty_with_warnings(tmp_path):
    (tmp_path / "runs.csv").write_text("width,seed\n8,0\n16,x\n")
    with pytest.warns(RuntimeWarning) as caught:
        store = RunStore(tmp_path)
    assert [str(w.message).split(": ", 1)[1] for w in caught] == [
        "skipped row 2 (no run_id); its run will be run again",
        "skipped row 3 (a number column holds text); its run will be run again",
    ]
    assert len(store) == 0


def test_values_keep_their_type_and_non_finite_values_survive(tmp_path):
    RunStore(tmp_path).add(
        record("r", nan=NAN, inf=INF, big=2**62, tiny=5e-324, numpy=np.float32(0.25), text='a,b\n"c"'), []
    )
    row = RunStore(tmp_path).rows(["r"])[0]
    assert math.isnan(row["nan"]) and row["inf"] == INF and row["big"] == 2**62 and row["tiny"] == 5e-324
    assert row["numpy"] == 0.25 and row["text"] == 'a,b\n"c"'


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=400))
def test_any_damage_after_the_good_records_never_crashes_a_later_sweep(tmp_path_factory, garbage, cut):
    """Whatever a crash or a stray writer left after the good lines (cut off mid-line or garbage): the good
    records still read, the damage is at most warned about, and the next record is stored whole."""
    folder = tmp_path_factory.mktemp("store")
    store = RunStore(folder)
    for i in range(2):
        store.add(record(f"r{i}", value=float(i)), [{"step": 0}])
    lost = json.dumps(record("lost", value=9.0)).encode()
    with (folder / "runs.jsonl").open("ab") as handle:
        handle.write(lost[:cut] + garbage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reread = RunStore(folder)
        assert {"r0", "r1"} <= set(reread._rows)
        reread.add(record("next", value=3.0), [])
        final = RunStore(folder)
    assert [r["value"] for r in final.rows(["r0", "r1", "next"])] == [0.0, 1.0, 3.0]
