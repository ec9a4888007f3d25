"""TensorDataModule: in-memory tensors, .npz and .pt files written by the tests, and every error case."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections import Counter

import numpy as np
import pytest
import torch

from lightning_linearity.data import TensorDataModule, load_xy_file


def _pairs(x: torch.Tensor, y: torch.Tensor) -> Counter:
    """Multiset of (input row, target) pairs: order-free comparison of data sets."""
    ys = y.reshape(len(y), -1).double().numpy()
    return Counter((r.tobytes(), t.tobytes()) for r, t in zip(x.double().numpy(), ys, strict=True))


@pytest.fixture
def classification() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.standard_normal((24, 5)), np.arange(24) % 3


@pytest.fixture
def regression() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    return rng.standard_normal((15, 4)), rng.standard_normal((15, 2))


# --------------------------------------------------------------------------------------- inference
def test_in_memory_classification(classification):
    x, y = classification
    dm = TensorDataModule.from_tensors(torch.from_numpy(x), torch.from_numpy(y))
    assert (dm.in_features, dm.num_classes, dm.out_features, dm.task) == (5, 3, 3, "classification")
    assert dm.train_split.x.dtype == torch.float32 and dm.train_split.y.dtype == torch.int64
    assert _pairs(dm.train_split.x, dm.train_split.y) == _pairs(
        torch.from_numpy(x).float(), torch.from_numpy(y)
    )
    assert len(dm.val_split) == 0 and len(dm.test_split) == 0  # by default every point trains
    assert "x" not in dm.hparams and "y" not in dm.hparams  # tensors stay out of checkpoints and logs


def test_in_memory_regression_and_reshapes():
    x = torch.arange(24.0).reshape(4, 2, 3)  # (n, ...) keeps its per-sample shape unless flattened
    y = torch.tensor([0.5, -1.0, 2.0, 3.5], dtype=torch.float64)  # 1-d float -> (n, 1)
    dm = TensorDataModule(x=x, y=y, flatten=True)
    assert (dm.in_features, dm.num_classes, dm.out_features, dm.task) == (6, None, 1, "regression")
    assert dm.input_shape == (6,)
    assert dm.train_split.y.shape == (4, 1) and dm.train_split.y.dtype == torch.float32
    assert _pairs(dm.train_split.x, dm.train_split.y) == _pairs(x.reshape(4, 6), y[:, None])


def test_images_keep_their_shape_through_normalisation_and_the_loader():
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(10, 1, 4, 4, generator=generator) * 3 + 1  # (n, C, H, W)
    dm = TensorDataModule(x=x, y=torch.arange(10) % 2, normalize="sphere", batch_size=4)
    dm.setup("fit")
    assert dm.input_shape == (1, 4, 4) and dm.in_features == 16
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 1, 4, 4) and labels.shape == (4,)
    # sphere normalisation by hand: each image scaled to norm sqrt(16) = 4, its shape untouched
    train = dm.train_split.x
    assert train.shape == (10, 1, 4, 4)
    expected = x / x.flatten(1).norm(dim=1)[:, None, None, None] * 4
    for image in train:  # every training image is one of the inputs, scaled (the split order is seeded)
        assert min(float((image - e).abs().max()) for e in expected) < 1e-6


def test_half_precision_and_integer_inputs_become_float32():
    dm = TensorDataModule(x=torch.ones(3, 2, dtype=torch.bfloat16), y=torch.tensor([0, 1, 0]))
    assert dm.train_split.x.dtype == torch.float32
    dm = TensorDataModule(x=np.full((3, 2), 7, dtype=np.uint8), y=np.array([1.0, 2.0, 3.0], dtype=np.float32))
    assert torch.equal(dm.train_split.x, torch.full((3, 2), 7.0))


def test_data_is_copied_at_construction():
    x = torch.zeros(4, 2)
    dm = TensorDataModule(x=x, y=torch.zeros(4, 1))
    x += 1.0
    assert torch.equal(dm.train_split.x, torch.zeros(4, 2))


def test_class_subset_remapping_and_num_classes(classification):
    x, y = classification
    dm = TensorDataModule(x=x, y=y, classes=[2, 0])
    assert dm.num_classes == 2
    original = {r.tobytes(): int(c) for r, c in zip(x.astype(np.float32), y, strict=True)}
    for row, label in zip(dm.train_split.x.numpy(), dm.train_split.y.tolist(), strict=True):
        assert original[row.tobytes()] == [2, 0][label]
    assert len(dm.train_split) == 16
    assert TensorDataModule(x=x, y=y, num_classes=7).out_features == 7


def test_splits_are_balanced_disjoint_and_deterministic(classification):
    x, y = classification
    dm = TensorDataModule(x=x, y=y, num_samples=9, num_val=6, num_test=3, seed=4)
    assert Counter(dm.train_split.y.tolist()) == {0: 3, 1: 3, 2: 3}
    assert Counter(dm.val_split.y.tolist()) == {0: 2, 1: 2, 2: 2}
    together = Counter()
    for s in (dm.train_split, dm.val_split, dm.test_split):
        together += _pairs(s.x, s.y)
    assert len(together) == 18 and max(together.values()) == 1  # no point in two splits
    again = TensorDataModule(x=x, y=y, num_samples=9, num_val=6, num_test=3, seed=4)
    assert torch.equal(dm.train_split.x, again.train_split.x) and torch.equal(
        dm.val_split.y, again.val_split.y
    )


def test_regression_split_and_standardisation(regression):
    x, y = regression
    dm = TensorDataModule(x=x, y=y, num_samples=10, num_val=5, normalize="standard")
    raw = TensorDataModule(x=x, y=y, num_samples=10, num_val=5, normalize="none")
    xtr = raw.train_split.x.double().numpy()
    expected = (raw.val_split.x.double().numpy() - xtr.mean(0)) / xtr.std(0)
    np.testing.assert_allclose(dm.val_split.x.numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(dm.val_split.y, raw.val_split.y)  # targets are never normalised


def test_sphere_normalisation_leaves_zero_rows_at_zero():
    x = np.array([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0]])
    dm = TensorDataModule(x=x, y=np.zeros(3), normalize="sphere", shuffle=False)
    norms = sorted(dm.train_split.x.norm(dim=1).tolist())
    assert norms[0] == 0.0 and norms[1:] == pytest.approx([2**0.5, 2**0.5])


def test_full_batch_yields_one_batch(classification):
    x, y = classification
    dm = TensorDataModule(x=x, y=y, full_batch=True, batch_size=4)
    (batch,) = list(dm.train_dataloader())
    assert torch.equal(batch[0], dm.train_split.x) and torch.equal(batch[1], dm.train_split.y)


# ------------------------------------------------------------------------------------------- files
def test_npz_file_with_default_and_custom_keys(tmp_path, classification):
    x, y = classification
    np.savez(tmp_path / "a.npz", x=x, y=y)
    np.savez_compressed(tmp_path / "b.npz", inputs=x, labels=y)
    a = TensorDataModule(str(tmp_path / "a.npz"))
    b = TensorDataModule(str(tmp_path / "b.npz"), x_key="inputs", y_key="labels")
    expected = _pairs(torch.from_numpy(x).float(), torch.from_numpy(y))
    assert _pairs(a.train_split.x, a.train_split.y) == expected == _pairs(b.train_split.x, b.train_split.y)
    assert a.hparams["path"] == str(tmp_path / "a.npz")


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
def test_pt_file(tmp_path, regression, suffix):
    x, y = regression
    torch.save(
        {"x": torch.from_numpy(x), "y": torch.from_numpy(y), "note": torch.tensor(1)}, tmp_path / f"d{suffix}"
    )
    dm = TensorDataModule(str(tmp_path / f"d{suffix}"), num_val=3)
    assert (dm.in_features, dm.out_features, dm.task) == (4, 2, "regression")
    together = _pairs(dm.train_split.x, dm.train_split.y) + _pairs(dm.val_split.x, dm.val_split.y)
    assert together == _pairs(torch.from_numpy(x).float(), torch.from_numpy(y).float())


# ------------------------------------------------------------------------------------------ errors
def test_missing_file(tmp_path):
    path = tmp_path / "missing.npz"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data file not found: {path}")):
        TensorDataModule(str(path))


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("1,2\n")
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: unsupported file type '.csv'; use ['.npz', '.pt', '.pth']")
    ):
        TensorDataModule(str(path))


def test_corrupted_npz(tmp_path, classification):
    path = tmp_path / "bad.npz"
    np.savez(path, x=classification[0], y=classification[1])
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable NumPy .npz archive")):
        TensorDataModule(str(path))


def test_npz_with_damaged_member(tmp_path):
    path = tmp_path / "bad.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", b"\x93NUMPY garbage")
        z.writestr("y.npy", b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match=re.escape(f"{path}: could not read arrays ['x', 'y']")):
        TensorDataModule(str(path))


def test_npz_holding_one_npy_array(tmp_path):
    path = tmp_path / "single.npz"
    with path.open("wb") as f:
        np.save(f, np.zeros(3))
    with pytest.raises(ValueError, match=re.escape(f"{path}: expected a .npz archive of named arrays")):
        TensorDataModule(str(path))


def test_npz_missing_key(tmp_path, classification):
    path = tmp_path / "d.npz"
    np.savez(path, inputs=classification[0], y=classification[1])
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: no array named ['x'] (it holds ['inputs', 'y'])")
    ):
        TensorDataModule(str(path))


def test_npz_object_array_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object), y=np.zeros(2))
    with pytest.raises(ValueError, match=re.escape(f"{path}: could not read arrays ['x', 'y']") + ".*pickle"):
        TensorDataModule(str(path))


def test_corrupted_pt(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(ValueError, match=re.escape(f"{path}: not a readable torch file")):
        TensorDataModule(str(path))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pt_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(2, 2), "y": _Payload(marker)}, path)
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: not a readable torch file of tensors with weights_only")
    ):
        TensorDataModule(str(path))
    assert not marker.exists()


def test_malicious_npz_member_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.npz"
    with zipfile.ZipFile(path, "w") as z:  # .npy members whose payload is a pickle
        for key in ("x", "y"):
            z.writestr(f"{key}.npy", pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        TensorDataModule(str(path))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ([torch.zeros(2, 2), torch.zeros(2)], "expected a dict of tensors with keys ['x', 'y'], got list"),
        ({"x": torch.zeros(2, 2)}, "no entry named ['y'] (it holds ['x'])"),
        ({"x": torch.zeros(2, 2), "y": 3}, "y must be a torch.Tensor or numpy.ndarray, got int"),
    ],
)
def test_pt_with_wrong_content(tmp_path, content, match):
    path = tmp_path / "d.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=re.escape(f"{path}: {match}")):
        TensorDataModule(str(path))


M = "TensorDataModule(x=..., y=...): "


@pytest.mark.parametrize(
    ("x", "y", "kwargs", "match"),
    [
        (
            np.zeros(4),
            np.zeros(4),
            {},
            M + "x must have shape (n, ...) with samples of 1 entry or more, got (4,)",
        ),
        (np.zeros((0, 3)), np.zeros(0), {}, M + "x is empty (shape (0, 3))"),
        (np.zeros((3, 2), dtype=complex), np.zeros(3), {}, M + "x must hold real numbers (float or int)"),
        (np.full((2, 2), np.nan), np.zeros(2), {}, M + "x contains NaN or infinite values"),
        (np.zeros((3, 2)), np.zeros(4), {}, M + "x has 3 points but y has shape (4,)"),
        (
            np.zeros((3, 2)),
            np.zeros((3, 2), dtype=int),
            {},
            M + "integer (class index) targets must have shape (n,)",
        ),
        (np.zeros((3, 2)), np.array([0, -1, 1]), {}, M + "class indices must be >= 0, found -1"),
        (
            np.zeros((3, 2)),
            np.array([True, False, True]),
            {},
            M + "y has dtype bool; use integer class indices",
        ),
        (np.zeros((3, 2)), np.array([0.0, np.inf, 1.0]), {}, M + "y contains NaN or infinite values"),
        (np.zeros((3, 2)), np.zeros((3, 2, 2)), {}, M + "regression targets must have shape (n,) or (n, k)"),
        (
            np.zeros((3, 2)),
            np.array([0, 1, 5]),
            {"num_classes": 4},
            M + "num_classes=4 but y holds class index 5",
        ),
        (np.zeros((3, 2)), np.array([0, 1, 1]), {"classes": [1, 3]}, M + "unknown class 3 in classes=[1, 3]"),
        (np.zeros((3, 2)), np.array([0, 1, 1]), {"classes": [1, 1]}, "classes must not repeat a class"),
        (np.zeros((3, 2)), np.array([0, 1, 1]), {"classes": []}, M + "classes must be a non-empty list"),
        (
            np.zeros((3, 2)),
            np.array([0, 1, 1]),
            {"classes": [0], "num_classes": 2},
            M + "give classes or num_classes",
        ),
        (np.zeros((3, 2)), np.zeros(3), {"classes": [0]}, M + "classes / num_classes need integer labels"),
        (
            np.zeros((3, 2)),
            np.zeros(3),
            {"normalize": "l2"},
            "normalize must be one of ['standard', 'sphere', 'none']",
        ),
        (
            np.zeros((3, 2)),
            np.zeros(3),
            {"num_samples": 0},
            "num_samples must be an integer >= 1 or None, got 0",
        ),
        ([[0.0, 1.0]], np.zeros(1), {}, M + "x must be a torch.Tensor or numpy.ndarray, got list"),
    ],
)
def test_bad_in_memory_data(x, y, kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        TensorDataModule(x=x, y=y, **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "give either path (a .npz / .pt file) or both x and y"),
        ({"path": "d.npz", "x": np.zeros((2, 2)), "y": np.zeros(2)}, "give either path"),
        ({"x": np.zeros((2, 2))}, "in-memory data needs both x and y"),
    ],
)
def test_source_arguments(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        TensorDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_samples": 25}, "num_samples=25 is more than the 24 points available in TensorDataModule"),
        ({"num_samples": 20, "num_val": 5}, "num_val=5 is more than the 4 points"),
        (
            {"num_val": 12, "num_test": 12},
            "num_val=12 and num_test=12 leave no training points out of the 24",
        ),
    ],
)
def test_sizes_that_do_not_fit(classification, kwargs, match):
    x, y = classification
    dm = TensorDataModule(x=x, y=y, **kwargs)
    with pytest.raises(ValueError, match=re.escape(match)):
        dm.setup("fit")


def test_load_xy_file_is_public(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.ones((2, 3)), y=np.zeros(2))
    x, y = load_xy_file(tmp_path / "d.npz")
    assert x.shape == (2, 3) and y.shape == (2,)
