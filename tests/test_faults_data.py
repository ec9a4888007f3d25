"""Faults a new user runs into with the data modules and their file loaders: every public argument gets a
one-line ``ValueError`` naming it (or works), and crafted, corrupt or malicious files are refused in one
line without running anything. Complements tests/test_data*.py, which hold the first-order cases."""

from __future__ import annotations

import io
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lightning_linearity.data import (
    CIFAR10DataModule,
    DigitsDataModule,
    GaussianDataModule,
    TensorDataModule,
    UnsafePickleError,
    load_cifar10_batch,
)

NAN, INF = float("nan"), float("inf")
NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
X3, Y3 = np.arange(6.0).reshape(3, 2), np.array([0, 1, 1])


def _batch(rng: np.random.Generator, per_class: int = 1) -> dict:
    labels = [c for c in range(10) for _ in range(per_class)]
    return {b"labels": labels, b"data": rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)}


@pytest.fixture
def cifar(tmp_path) -> Path:
    """A tiny CIFAR-10 folder: one image per class in each of the six batches."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(_batch(rng), protocol=2))
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [n.encode() for n in NAMES]}))
    return folder


def _one_line(info: pytest.ExceptionInfo) -> None:
    assert len(str(info.value).splitlines()) == 1, str(info.value)


# ------------------------------------------------------------------------------- shared arguments
# The arguments every data module takes from the base class, with values of every wrong kind.
SHARED_BAD = [
    ("batch_size", 0, "batch_size must be an integer >= 1, got 0"),
    ("batch_size", 2.5, "batch_size must be an integer >= 1, got 2.5"),
    ("batch_size", NAN, "batch_size must be an integer >= 1, got nan"),
    ("batch_size", "64", "batch_size must be an integer >= 1, got '64'"),
    ("batch_size", True, "batch_size must be an integer >= 1, got True"),
    ("batch_size", None, "batch_size must be an integer >= 1, got None"),
    ("batch_size", [64], r"batch_size must be an integer >= 1, got \[64\]"),
    ("num_workers", -1, "num_workers must be an integer >= 0, got -1"),
    ("num_workers", False, "num_workers must be an integer >= 0, got False"),
    ("seed", -1, "seed must be an integer >= 0.* got -1"),
    ("seed", 2**64, r"seed must be an integer >= 0 and <= 2\*\*64 - 1, got 18446744073709551616"),
    ("seed", 0.0, "seed must be an integer .* got 0.0"),
    ("seed", INF, "seed must be an integer .* got inf"),
    ("full_batch", 1, "full_batch must be True or False, got 1"),
    ("full_batch", "false", "full_batch must be True or False, got 'false'"),
    ("shuffle", None, "shuffle must be True or False, got None"),
]

MODULES = {
    "digits": lambda folder, **kw: DigitsDataModule(**kw),
    "gaussian": lambda folder, **kw: GaussianDataModule(**kw),
    "tensor": lambda folder, **kw: TensorDataModule(x=X3, y=Y3, **kw),
    "cifar": lambda folder, **kw: CIFAR10DataModule(str(folder), **kw),
}


@pytest.mark.parametrize("module", sorted(MODULES))
@pytest.mark.parametrize(("name", "value", "match"), SHARED_BAD, ids=[f"{n}={v!r}" for n, v, _ in SHARED_BAD])
def test_shared_arguments_get_one_line_errors(cifar, module, name, value, match):
    with pytest.raises(ValueError, match=match) as info:
        MODULES[module](cifar, **{name: value})
    _one_line(info)


def test_the_largest_seed_works_through_the_loaders():
    """Before: seeds >= 2**64 were accepted and failed only in train_dataloader ('Overflow when unpacking
    long long'); the largest accepted seed must work end to end."""
    dm = DigitsDataModule(classes=[0, 1], num_samples=8, seed=2**64 - 1, batch_size=4)
    batches = list(dm.train_dataloader())
    assert [len(b[0]) for b in batches] == [4, 4]
    assert DigitsDataModule(seed=np.uint64(2**64 - 1)).seed == 2**64 - 1


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.floats(), st.text(max_size=3), st.booleans(), st.none(), st.integers(max_value=0)))
def test_any_batch_size_that_is_not_a_positive_integer_is_named(value):
    with pytest.raises(ValueError, match=r"^batch_size must be an integer >= 1, got ") as info:
        GaussianDataModule(batch_size=value)
    _one_line(info)


@settings(max_examples=25, deadline=None)
@given(batch_size=st.integers(1, 10**12), seed=st.integers(0, 2**64 - 1))
def test_any_positive_batch_size_and_seed_are_accepted(batch_size, seed):
    dm = TensorDataModule(x=X3, y=Y3, batch_size=batch_size, seed=seed)
    (x, _), *rest = list(dm.train_dataloader())  # a huge batch is the whole split
    assert len(x) == min(batch_size, 3) and sum(len(b[0]) for b in rest) == 3 - len(x)


# --------------------------------------------------------------------------- per-module arguments
PER_MODULE_BAD = [
    # digits
    (lambda c: DigitsDataModule(classes="01"), "classes must be a non-empty list of class indices"),
    (lambda c: DigitsDataModule(classes=3), "classes must be a non-empty list of class indices"),
    (lambda c: DigitsDataModule(classes=[True, 2]), "unknown class True"),
    (lambda c: DigitsDataModule(classes=[0, NAN]), "unknown class nan"),
    (lambda c: DigitsDataModule(classes=[0, 1.0]), "unknown class 1.0"),
    (lambda c: DigitsDataModule(num_samples=NAN), "num_samples must be an integer >= 1 or None, got nan"),
    (lambda c: DigitsDataModule(num_test="5"), "num_test must be an integer >= 0 or None, got '5'"),
    (
        lambda c: DigitsDataModule(normalize=None),
        r"normalize must be one of \['standard', 'sphere', 'none'\]",
    ),
    (lambda c: DigitsDataModule(normalize=["none"]), r"normalize must be one of .* got \['none'\]"),
    # gaussian
    (lambda c: GaussianDataModule(in_features=2.0), "in_features must be an integer >= 1, got 2.0"),
    (lambda c: GaussianDataModule(num_samples=True), "num_samples must be an integer >= 1, got True"),
    (lambda c: GaussianDataModule(num_test=None), "num_test must be an integer >= 0, got None"),
    (lambda c: GaussianDataModule(labels=None), r"labels must be one of \['teacher', 'random'\], got None"),
    (lambda c: GaussianDataModule(out_features="1"), "out_features must be an integer >= 1, got '1'"),
    (lambda c: GaussianDataModule(teacher_width=-3), "teacher_width must be an integer >= 1, got -3"),
    (lambda c: GaussianDataModule(noise=INF), "noise must be a finite float >= 0, got inf"),
    (lambda c: GaussianDataModule(noise="0.1"), "noise must be a finite float >= 0, got '0.1'"),
    (lambda c: GaussianDataModule(noise=True), "noise must be a finite float >= 0, got True"),
    # tensor
    (lambda c: TensorDataModule(path=5), "path must be a file path \\(str\\), got 5"),
    (lambda c: TensorDataModule(path=["d.npz"]), r"path must be a file path \(str\), got \['d.npz'\]"),
    (lambda c: TensorDataModule(torch.zeros(5, 1, 8, 8)), r"pass in-memory data as x=\.\.\., y=\.\.\."),
    # a value whose repr spans lines (an array) is shown on one line, cut at 200 characters
    (
        lambda c: GaussianDataModule(noise=np.zeros((40, 40))),
        r"noise must be .*, got array\(\[\[0\., .*\.\.\.$",
    ),
    (lambda c: TensorDataModule(x=X3, y=Y3, classes=3), "classes must be a non-empty list of labels, got 3"),
    (lambda c: TensorDataModule(x=X3, y=Y3, classes="01"), "classes must be a non-empty list of labels"),
    (lambda c: TensorDataModule(x=X3, y=Y3, classes=[1.0]), r"unknown class 1.0 in classes=\[1.0\]"),
    (lambda c: TensorDataModule(x=X3, y=Y3, num_classes=0), "num_classes must be an integer >= 1, got 0"),
    (lambda c: TensorDataModule(x=X3, y=Y3, num_classes=2.0), "num_classes must be an integer >= 1"),
    (lambda c: TensorDataModule(x=X3, y=Y3, num_val=None), "num_val must be an integer >= 0, got None"),
    (lambda c: TensorDataModule(x=X3, y=Y3, flatten="yes"), "flatten must be True or False, got 'yes'"),
    (lambda c: TensorDataModule(x=X3.tolist(), y=Y3), "x must be a torch.Tensor or numpy.ndarray, got list"),
    (lambda c: TensorDataModule(x=X3, y=3), "y must be a torch.Tensor or numpy.ndarray, got int"),
    (
        lambda c: TensorDataModule(x=np.full((3, 2), 1e300), y=Y3, normalize="none"),
        "x: values beyond float32",
    ),
    (lambda c: TensorDataModule(x=X3, y=np.full(3, -1e39)), "y: values beyond float32's range"),
    (
        lambda c: TensorDataModule(x=X3, y=np.array([0, 1, 2**63 + 5], dtype=np.uint64)),
        "class index 9223372036854775813 does not fit int64",
    ),
    (
        lambda c: TensorDataModule(x=torch.eye(3).to_sparse(), y=torch.tensor([0, 1, 1])),
        "x must be a dense tensor of real numbers, got a torch.sparse_coo tensor",
    ),
    # cifar
    (lambda c: CIFAR10DataModule(None), r"data_dir must be a folder path \(str\), got None"),
    (lambda c: CIFAR10DataModule(5), r"data_dir must be a folder path \(str\), got 5"),
    (lambda c: CIFAR10DataModule(str(c), classes="cat"), "classes must be a non-empty list of CIFAR-10"),
    (lambda c: CIFAR10DataModule(str(c), classes=[b"cat"]), "unknown CIFAR-10 class b'cat'"),
    (lambda c: CIFAR10DataModule(str(c), classes=[True]), "unknown CIFAR-10 class True"),
    (lambda c: CIFAR10DataModule(str(c), classes=[3.0]), "unknown CIFAR-10 class 3.0"),
    (lambda c: CIFAR10DataModule(str(c), num_val=NAN), "num_val must be an integer >= 0 or None, got nan"),
]


@pytest.mark.parametrize(("build", "match"), PER_MODULE_BAD, ids=[m[:45] for _, m in PER_MODULE_BAD])
def test_bad_module_arguments_get_one_line_errors(cifar, build, match):
    with pytest.raises(ValueError, match=match) as info:
        build(cifar).setup("fit")
    _one_line(info)


def test_gaussian_noise_that_overflows_float32_is_named():
    """Before: noise=1e300 gave targets of -inf/inf silently (the float32 cast overflowed)."""
    dm = GaussianDataModule(noise=1e300)
    with pytest.raises(
        ValueError, match=r"the targets: values beyond float32's range .*noise=1e\+300"
    ) as info:
        dm.setup("fit")
    _one_line(info)
    big = GaussianDataModule(noise=1e30, labels="teacher")  # large, yet within float32: fine and finite
    assert torch.isfinite(big.train_split.y).all()


def test_numpy_class_indices_name_cifar_classes(cifar):
    """Before: CIFAR classes=[np.int64(3)] (e.g. from np.arange) was 'unknown CIFAR-10 class 3'."""
    by_numpy = CIFAR10DataModule(str(cifar), classes=list(np.array([3, 5])), normalize="none")
    by_int = CIFAR10DataModule(str(cifar), classes=[3, 5], normalize="none")
    assert by_numpy.classes == [3, 5] and by_numpy.class_names == ["cat", "dog"]
    assert torch.equal(by_numpy.train_split.x, by_int.train_split.x)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.floats(min_value=-3e38, max_value=3e38, allow_nan=False, allow_subnormal=False),
        min_size=4,
        max_size=12,
    )
)
def test_finite_float32_range_inputs_arrive_exactly(values):
    """Any finite input within float32's range is kept as its float32 value (no overflow, no change)."""
    x = np.array(values, dtype=np.float64).reshape(-1, 1)
    dm = TensorDataModule(x=x, y=np.zeros(len(x)), shuffle=False, full_batch=True)
    got = dm.train_split.x.numpy()[:, 0]
    assert np.isfinite(got).all()
    assert sorted(got.tolist()) == sorted(x[:, 0].astype(np.float32).tolist())


# --------------------------------------------------------------------------------------- CIFAR files
class _Call:
    """Pickles to ``func(*args)``: an attacker's payload."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol-0 opcodes calling ``module.name(arg)``, for globals Python would not pickle by reference."""
    return f"c{module}\n{name}\n(V{arg}\ntR.".encode()


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("os", "system"),
        ("posix", "system"),
        ("builtins", "eval"),
        ("builtins", "getattr"),
        ("builtins", "__import__"),
        ("importlib", "import_module"),
        ("pickle", "loads"),
        ("numpy", "load"),
        ("numpy.lib.npyio", "load"),
        ("numpy", "frombuffer"),
        ("torch", "load"),
        ("_codecs", "decode"),
    ],
)
def test_every_other_global_is_refused_before_import(tmp_path, module, name):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(_global_call(module, name, f"touch {marker}"))
    with pytest.raises(
        UnsafePickleError, match=rf"refusing to unpickle the global '{re.escape(module)}\."
    ) as info:
        load_cifar10_batch(path)
    _one_line(info)
    assert not marker.exists()


def test_a_payload_hidden_in_an_array_reconstruction_is_refused(tmp_path):
    """An allowed global (numpy's _reconstruct) handed a forbidden callable as its class: refused on the
    callable's own lookup, nothing imported or run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    reconstruct = np.zeros(0).__reduce__()[0]
    content = {b"data": _Call(reconstruct, _Call(os.system, f"touch {marker}"), (0,), b"b")}
    path.write_bytes(pickle.dumps(content, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        load_cifar10_batch(path)
    assert not marker.exists()


@pytest.fixture(scope="module")
def batch_bytes() -> bytes:
    return pickle.dumps(_batch(np.random.default_rng(1)), protocol=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=31000))
def test_a_batch_cut_anywhere_is_one_line_naming_the_file(tmp_path, batch_bytes, cut):
    path = tmp_path / "data_batch_1"
    path.write_bytes(batch_bytes[: min(cut, len(batch_bytes) - 1)])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: ") as info:
        load_cifar10_batch(path)
    _one_line(info)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(position=st.integers(min_value=0, max_value=30999), byte=st.integers(0, 255))
@example(position=16, byte=128)  # a key byte that is not UTF-8: used to escape as UnicodeDecodeError
def test_a_damaged_byte_gives_a_valid_batch_or_one_line(tmp_path, batch_bytes, position, byte):
    raw = bytearray(batch_bytes)
    raw[position % len(raw)] = byte
    path = tmp_path / "data_batch_1"
    path.write_bytes(bytes(raw))
    try:
        data, labels = load_cifar10_batch(path)
    except ValueError as err:
        assert str(err).startswith(f"{path}: ") and len(str(err).splitlines()) == 1
    else:  # a flipped pixel or label still makes a valid batch
        assert data.dtype == np.uint8 and data.shape == (10, 3072) and labels.min() >= 0 and labels.max() <= 9


def test_a_folder_in_place_of_a_batch(cifar):
    (cifar / "test_batch").unlink()
    (cifar / "test_batch").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks \['test_batch'\]") as info:
        CIFAR10DataModule(str(cifar))
    _one_line(info)


# ----------------------------------------------------------------------------------- .npz / .pt files
def _npz(path: Path, **members: bytes) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, raw in members.items():
            z.writestr(f"{name}.npy", raw)
    return path


def _npy_header(shape: tuple[int, ...], descr: str = "<f8") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


NPZ_FILES = [
    # a header claiming 8 TB: refused without allocating it
    (lambda p: _npz(p, x=_npy_header((10**12, 1)), y=_npy_header((3,))), "could not read arrays"),
    # a header claiming more than its data
    (lambda p: _npz(p, x=_npy_header((3, 2)) + b"\0" * 8, y=_npy_header((3,))), "could not read arrays"),
    # an object array written by numpy (a pickle inside): refused, never unpickled
    (lambda p: np.savez(p, x=np.zeros((2, 1)), y=np.array([None, 1], dtype=object)), "could not read arrays"),
    (lambda p: np.savez(p, x=np.array([["a"], ["b"]]), y=np.zeros(2)), "x must hold real numbers .* <U1"),
    (lambda p: np.savez(p, x=np.zeros((2, 1), "datetime64[s]"), y=np.zeros(2)), "x must hold real numbers"),
    (lambda p: np.savez(p, x=np.zeros((2, 1)), y=np.zeros(2, [("a", "f4")])), r"y has dtype \[\('a'"),
    (lambda p: np.savez(p, x=np.zeros((2, 1), bool), y=np.zeros(2)), "x must hold real numbers .* bool"),
    (lambda p: np.savez(p, x=np.zeros((2, 1)), y=np.full(2, 1e39)), "y: values beyond float32's range"),
    (lambda p: p.write_bytes(b"PK\x03\x04" + b"\0" * 40), "not a readable NumPy .npz archive"),
    (lambda p: p.write_bytes(b""), "not a readable NumPy .npz archive"),
]


@pytest.mark.parametrize(("write", "match"), NPZ_FILES, ids=[m[:40] for _, m in NPZ_FILES])
def test_crafted_npz_files_are_one_line_naming_the_file(tmp_path, write, match):
    path = tmp_path / "d.npz"
    write(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{match}") as info:
        TensorDataModule(str(path))
    _one_line(info)


@pytest.fixture(scope="module")
def npz_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("npz") / "d.npz"
    np.savez_compressed(path, x=np.arange(12.0).reshape(6, 2), y=np.arange(6) % 2)
    return path.read_bytes()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=2000))
def test_an_npz_cut_anywhere_is_one_line_naming_the_file(tmp_path, npz_bytes, cut):
    path = tmp_path / "d.npz"
    path.write_bytes(npz_bytes[: min(cut, len(npz_bytes) - 1)])
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: ") as info:
        TensorDataModule(str(path))
    _one_line(info)


PT_PAYLOADS = [
    ({"x": torch.eye(3).to_sparse(), "y": torch.arange(3)}, "x must be a dense tensor .* torch.sparse_coo"),
    (
        {"x": torch.eye(3).to_sparse_csr(), "y": torch.arange(3)},
        "x must be a dense tensor .* torch.sparse_csr",
    ),
    ({"x": torch.zeros(3, 2), "y": torch.arange(3).to_sparse()}, "y must be a dense tensor"),
    (
        {"x": torch.zeros(3, 2, dtype=torch.cfloat), "y": torch.arange(3)},
        "x must hold real numbers .* complex64",
    ),
    ({"x": {"nested": torch.zeros(3, 2)}, "y": torch.arange(3)}, "x must be a torch.Tensor or numpy.ndarray"),
    ({"x": "x.npy", "y": torch.arange(3)}, "x must be a torch.Tensor or numpy.ndarray, got str"),
    ({"x": torch.tensor(1.0), "y": torch.arange(3)}, r"x must have shape \(n, ...\)"),
    ({"x": torch.zeros(3, 2), "y": torch.tensor([True, False, True])}, "y has dtype bool"),
    ({"x": torch.full((3, 2), NAN), "y": torch.arange(3)}, "x contains NaN or infinite values"),
    ({0: torch.zeros(3, 2), 1: torch.arange(3)}, r"no entry named \['x', 'y'\] \(it holds \['0', '1'\]\)"),
    ((torch.zeros(3, 2), torch.arange(3)), r"expected a dict of tensors with keys \['x', 'y'\], got tuple"),
    (None, "expected a dict of tensors .* got NoneType"),
]


@pytest.mark.parametrize(("content", "match"), PT_PAYLOADS, ids=[m[:40] for _, m in PT_PAYLOADS])
def test_pt_files_with_other_payloads_are_one_line(tmp_path, content, match):
    path = tmp_path / "d.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: .*{match}") as info:
        TensorDataModule(str(path))
    _one_line(info)


def test_a_pt_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "d.pth"
    torch.save({"x": torch.zeros(2, 2), "y": _Call(os.system, f"touch {marker}")}, path)
    # torch's own refusal spans six lines; the one kept names the refused global
    with pytest.raises(
        ValueError, match=r"weights_only=True \(UnpicklingError: .*GLOBAL \w+\.system"
    ) as info:
        TensorDataModule(str(path))
    _one_line(info)
    assert not marker.exists()


def test_a_folder_named_like_a_data_file(tmp_path):
    (tmp_path / "d.npz").mkdir()
    with pytest.raises(FileNotFoundError, match="data file not found"):
        TensorDataModule(str(tmp_path / "d.npz"))
