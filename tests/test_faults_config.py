"""Faults in a width sweep's configuration: every field of :class:`SweepConfig` given a value of the wrong
kind is a one-line :class:`SweepError` naming it; crafted YAML files (invalid, binary, recursive aliases,
alias bombs, deep nesting, odd keys and profiles) are refused in one line, quickly."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_linearity.sweeps.config import (
    MAX_CONFIG_VALUES,
    SweepConfig,
    SweepError,
    load_config_file,
    make_config,
)

NAN, INF = float("nan"), float("inf")
BASE = {"widths": [4, 8, 16], "metrics": ["lambda_min"]}


def config(tmp_path, **overrides) -> SweepConfig:
    return make_config({**BASE, "out": str(tmp_path / "sweep"), **overrides})


def _one_line(info: pytest.ExceptionInfo) -> None:
    assert len(str(info.value).splitlines()) == 1, str(info.value)


FIELD_BAD = [
    ({"widths": "4,8,16"}, "widths must be a list, got '4,8,16'"),
    ({"widths": np.arange(1, 300).reshape(1, -1)}, r"widths must be a list, got array\(\[\[ ?1, "),
    ({"widths": [4, 8, NAN]}, "widths must be positive integers"),
    ({"widths": [4, 8, np.float64(16)]}, "widths must be positive integers"),
    (
        {"seeds": [2**64]},
        r"seeds must be distinct non-negative integers below 2\*\*64, got \[18446744073709551616\]",
    ),
    ({"seeds": [0, 0.5]}, "seeds must be distinct non-negative integers"),
    ({"seeds": "0"}, "seeds must be a list, got '0'"),
    ({"seeds": [True]}, "seeds must be distinct non-negative integers"),
    ({"metrics": "lambda_min"}, "metrics must be a list, got 'lambda_min'"),
    ({"model": ["NTKFCN"]}, "model must be one of"),
    ({"mode": None}, "mode must be one of"),
    ({"model_args": [("depth", 2)]}, r"model_args must be a mapping, got \[\('depth', 2\)\]"),
    ({"data": "digits"}, "data must be a mapping, got 'digits'"),
    ({"monitor_args": {"ntk": 5}}, r"monitor_args\['ntk'\] must be a mapping of that metric's options"),
    ({"monitor_args": {"ntk": ["pl_ratio"]}}, r"monitor_args\['ntk'\] must be a mapping"),
    ({"claims": [5]}, r"each claim must be a mapping \(column, slope, ...\), got 5"),
    ({"claims": "slope"}, "claims must be a list, got 'slope'"),
    ({"curves": "lambda_min"}, "curves must be a list"),
    ({"max_steps": INF}, "max_steps must be a positive integer, got inf"),
    ({"max_steps": True}, "max_steps must be a positive integer, got True"),
    ({"loss_threshold": NAN}, "loss_threshold must be a positive number or null, got nan"),
    ({"loss_threshold": "1e-4"}, "loss_threshold must be a positive number or null"),
    ({"lr_scale": INF}, "lr_scale must be a positive number, got inf"),
    ({"lr_scale": None, "lr": True}, "lr must be a positive number, got True"),
    ({"every_n_steps": 0}, "every_n_steps must be a positive integer or null, got 0"),
    ({"every_n_steps": 2.5}, "every_n_steps must be a positive integer or null, got 2.5"),
    ({"jobs": "2"}, "jobs must be a positive integer, got '2'"),
    ({"threads": NAN}, "threads must be a positive integer or null, got nan"),
    ({"reference_slope": True}, "reference_slope must be a number or null, got True"),
    ({"reference_slope": INF}, "reference_slope must be a number or null, got inf"),
    ({"fit_against": None}, "fit_against must be one of"),
    ({"ci": ["t"]}, "ci must be one of"),
    ({"confidence": 1.0}, r"confidence must be in \(0, 1\), got 1.0"),
    ({"confidence": NAN}, r"confidence must be in \(0, 1\), got nan"),
    ({"out": None}, r"out must be an output folder path \(a non-empty string\), got None"),
    ({"out": 5}, "out must be an output folder path .* got 5"),
    ({"out": "  "}, "out must be an output folder path .* got '  '"),
    ({"name": None}, r"name must be a string \(the sweep's title\), got None"),
    ({"name": ["a"]}, r"name must be a string .* got \['a'\]"),
    ({"progress": "no"}, "progress must be true or false, got 'no'"),
    ({"progress": 0}, "progress must be true or false, got 0"),
]


@pytest.mark.parametrize(("overrides", "match"), FIELD_BAD, ids=[m[:40] for _, m in FIELD_BAD])
def test_bad_fields_get_one_line_errors(tmp_path, overrides, match):
    with pytest.raises(SweepError, match=match) as info:
        config(tmp_path, **overrides)
    _one_line(info)


def test_numpy_widths_and_seeds_are_plain_integers(tmp_path):
    """Widths and seeds from numpy name the same runs as Python ints (same run ids)."""
    a = config(tmp_path, widths=np.array([4, 8, 16]), seeds=[np.int64(0), np.uint64(1)])
    b = config(tmp_path, widths=[4, 8, 16], seeds=[0, 1])
    assert a.widths == b.widths and all(type(w) is int for w in (*a.widths, *a.seeds))
    assert [r.run_id for r in a.runs()] == [r.run_id for r in b.runs()]


def test_the_largest_seed_is_accepted(tmp_path):
    assert config(tmp_path, seeds=[2**64 - 1]).seeds == (2**64 - 1,)


def test_make_config_needs_a_mapping():
    with pytest.raises(
        SweepError, match=r"sweep config must be a mapping of sweep fields, got \[1, 2\]"
    ) as info:
        make_config([1, 2])
    _one_line(info)


@settings(max_examples=30, deadline=None)
@given(
    st.one_of(st.text(max_size=4), st.integers(), st.floats(), st.none(), st.lists(st.booleans(), max_size=2))
)
def test_progress_is_a_flag_whatever_else_is_given(value):
    if isinstance(value, bool):
        return
    with pytest.raises(SweepError, match=r"^progress must be true or false, got ") as info:
        make_config({**BASE, "progress": value})
    _one_line(info)


# ------------------------------------------------------------------------------------------- YAML files
def _load(tmp_path, text: str | bytes, profile: str | None = None):
    path = tmp_path / "sweep.yaml"
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    return load_config_file(path, profile)


LAUGHS = (
    "widths: [4, 8, 16]\nmetrics: [lambda_min]\nmodel_args:\n  a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    + "".join(f"  a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9))
)  # 10**9 ones in a file of 1 kB

YAML_BAD = [
    (
        "widths: [1, 2\nmetrics: x\n",
        None,
        r"is not valid YAML: expected ',' or '\]', but got ':' at line 2, column 8",
    ),
    ("widths: [4, 8, 16]\n\tmetrics: x\n", None, "is not valid YAML: .* at line 2"),
    (b"\xff\xfe\x00\x81garbage", None, r"is not UTF-8 text \(byte 0\)"),
    ("- 4\n- 8\n", None, "must hold a mapping of sweep fields"),
    ("", None, "must hold a mapping of sweep fields"),
    ("1: 2\nwidths: [4, 8, 16]\nfoo: 3\n", None, r"unknown field\(s\) \['foo', 1\]"),
    (
        "widths: [4, 8, 16]\nprofiles: [ci]\n",
        "ci",
        r"profiles must be a mapping name -> overrides, got \['ci'\]",
    ),
    ("widths: [4, 8, 16]\nprofiles: ci\n", "ci", "profiles must be a mapping name -> overrides, got 'ci'"),
    (
        "widths: [4, 8, 16]\nprofiles: {ci: 5}\n",
        "ci",
        "profile 'ci' must be a mapping of field overrides, got 5",
    ),
    ("widths: [4, 8, 16]\nprofiles: {1: {}}\n", "ci", r"has no profile 'ci'; profiles: \['1'\]"),
    ("widths: [4, 8, 16]\nmodel_args: &a {x: *a}\n", None, "refers to itself"),
    ("widths: &w [4, 8, *w]\n", None, "refers to itself"),
    (LAUGHS, None, f"holds more than {MAX_CONFIG_VALUES} values"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", None, "nested too deeply"),
]


@pytest.mark.parametrize(("text", "profile", "match"), YAML_BAD, ids=[m[:40] for *_, m in YAML_BAD])
def test_crafted_config_files_are_one_line_and_quick(tmp_path, text, profile, match):
    start = time.perf_counter()
    with pytest.raises(SweepError, match=match) as info:
        _load(tmp_path, text, profile)
    assert time.perf_counter() - start < 5
    _one_line(info)
    assert str(tmp_path / "sweep.yaml") in str(info.value)


def test_a_folder_given_as_the_config_file(tmp_path):
    with pytest.raises(SweepError, match="is a folder; give the path of a YAML file") as info:
        load_config_file(tmp_path)
    _one_line(info)
    with pytest.raises(SweepError, match=r"the config path must be a file path \(str\), got None"):
        load_config_file(None)


def test_a_recursive_value_given_in_python_is_refused(tmp_path):
    args: dict = {"depth": 2}
    args["self"] = args
    with pytest.raises(SweepError, match="model_args refers to itself") as info:
        config(tmp_path, model_args=args)
    _one_line(info)


def test_shared_yaml_anchors_within_the_limit_still_load(tmp_path):
    """Anchors used as intended (a value shared by two profiles) are fine."""
    text = (
        "widths: [4, 8, 16]\nmetrics: [lambda_min]\n"
        "profiles:\n  a: &common {seeds: [0, 1], max_steps: 5}\n  b: *common\n"
    )
    assert _load(tmp_path, text, "b")["seeds"] == [0, 1]
    assert make_config({**_load(tmp_path, text, "a"), "out": str(tmp_path / "s")}).max_steps == 5


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"column": "lambda_min:init", "decreasing": "no"}, "decreasing must be true or false"),
        ({"column": "lambda_min:init", "at_least": "x"}, "at_least must be a number"),
        ({"column": "lambda_min:init", "at_most": float("nan")}, "at_most must be a number"),
        ({"column": "lambda_min:init", "at_least": 0.1, "min_width": "8"}, "min_width must be an integer"),
        ({"column": "lambda_min:init", "slope": ["a", "b"]}, r"slope must be a range \[low, high\]"),
        ({"column": "lambda_min:init", "slope": "ab"}, r"slope must be a range \[low, high\]"),
    ],
)
def test_claims_refuse_values_they_would_misread(raw, match):
    from lightning_linearity.sweeps.claims import Claim

    with pytest.raises(ValueError, match=match):
        Claim.from_mapping(raw, ["lambda_min:init"])
