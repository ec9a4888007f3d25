"""CIFAR-10 python batches: small folders written by the tests, validation errors, and the safe unpickler."""

from __future__ import annotations

import builtins
import os
import pickle
import re
import struct
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lightning_linearity.data import CIFAR10DataModule, UnsafePickleError, load_cifar10_batch

NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_CLASS = 3  # images of each class in each training batch
TEST_PER_CLASS = 2


def _batch(rng: np.random.Generator, per_class: int) -> dict:
    labels = [c for c in range(10) for _ in range(per_class)]
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {
        b"batch_label": b"batch",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"img.png"] * len(labels),
    }


def _py2_pickle(content: dict) -> bytes:
    """Hand-written protocol-2 opcodes as Python 2's cPickle wrote the original CIFAR-10 files.

    Python-2 ``str`` objects (the keys, the raw pixel bytes) appear as ``BINSTRING`` and the array as a call
    to ``numpy.core.multiarray._reconstruct`` (the pre-NumPy-2 module name).
    """

    def s(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:
        return b"J" + struct.pack("<i", v)

    data = content[b"data"]
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + i(0) + b"\x85" + s(b"b") + b"\x87R("
        + i(1) + i(data.shape[0]) + i(data.shape[1]) + b"\x86"
        + b"cnumpy\ndtype\n" + s(b"u1") + i(0) + i(1) + b"\x87R("
        + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0)
        + b"tb\x89" + s(data.tobytes()) + b"tb"
    )  # fmt: skip
    labels = b"](" + b"".join(i(v) for v in content[b"labels"]) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + labels + b"u."


def write_cifar(folder: Path, *, seed: int = 0, protocol: int | str = 2) -> dict[str, dict]:
    """Write a tiny CIFAR-10 python-format folder; return what each file holds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    contents = {f"data_batch_{k}": _batch(rng, PER_CLASS) for k in range(1, 6)}
    contents["test_batch"] = _batch(rng, TEST_PER_CLASS)
    for name, content in contents.items():
        raw = _py2_pickle(content) if protocol == "py2" else pickle.dumps(content, protocol=protocol)
        (folder / name).write_bytes(raw)
    meta = {b"label_names": [n.encode() for n in NAMES], b"num_cases_per_batch": 30, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return contents


@pytest.fixture
def cifar(tmp_path) -> tuple[Path, dict[str, dict]]:
    folder = tmp_path / "cifar-10-batches-py"
    return folder, write_cifar(folder)


def _images_by_class(contents: dict[str, dict], files: list[str]) -> dict[int, set[bytes]]:
    out: dict[int, set[bytes]] = {c: set() for c in range(10)}
    for f in files:
        for row, label in zip(contents[f][b"data"], contents[f][b"labels"], strict=True):
            out[label].add(row.tobytes())
    return out


def _as_bytes(x: torch.Tensor) -> list[bytes]:
    return [r.tobytes() for r in np.rint(x.double().numpy() * 255).astype(np.uint8)]


TRAIN_FILES = [f"data_batch_{k}" for k in range(1, 6)]


# ------------------------------------------------------------------------------------------ loading
@pytest.mark.parametrize("protocol", [2, 4, 5, "py2"])
def test_cifar_reads_every_pickle_flavour(tmp_path, protocol):
    contents = write_cifar(tmp_path, protocol=protocol)
    data, labels = load_cifar10_batch(tmp_path / "data_batch_3")
    assert data.dtype == np.uint8 and data.shape == (30, 3072)
    assert np.array_equal(data, contents["data_batch_3"][b"data"])
    assert labels.dtype == np.int64 and labels.tolist() == contents["data_batch_3"][b"labels"]


def test_cifar_module_pixels_labels_and_splits(cifar):
    folder, contents = cifar
    dm = CIFAR10DataModule(str(folder), classes=["airplane", "bird"], num_samples=10, normalize="none")
    assert (dm.in_features, dm.num_classes, dm.out_features, dm.task) == (3072, 2, 2, "classification")
    assert dm.class_names == ["airplane", "bird"]
    train_imgs = _images_by_class(contents, TRAIN_FILES)
    test_imgs = _images_by_class(contents, ["test_batch"])
    available = 2 * 5 * PER_CLASS
    assert [len(dm.train_split), len(dm.val_split), len(dm.test_split)] == [
        10,
        available // 10,
        2 * TEST_PER_CLASS,
    ]
    seen: list[bytes] = []
    for split, source in (
        (dm.train_split, train_imgs),
        (dm.val_split, train_imgs),
        (dm.test_split, test_imgs),
    ):
        x = split.x
        assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0
        for row, label in zip(_as_bytes(x), split.y.tolist(), strict=True):
            assert row in source[[0, 2][label]]  # airplane -> 0, bird -> 1
            seen.append(row)
    assert len(set(seen)) == len(seen)  # no image in two splits
    assert Counter(dm.train_split.y.tolist()) == {0: 5, 1: 5}


def test_cifar_classes_by_index_follow_the_listed_order(cifar):
    folder, contents = cifar
    dm = CIFAR10DataModule(str(folder), classes=[9, "cat", 0], normalize="none", num_test=6)
    imgs = _images_by_class(contents, ["test_batch"])
    assert dm.class_names == ["truck", "cat", "airplane"]
    assert Counter(dm.test_split.y.tolist()) == {0: 2, 1: 2, 2: 2}
    for row, label in zip(_as_bytes(dm.test_split.x), dm.test_split.y.tolist(), strict=True):
        assert row in imgs[[9, 3, 0][label]]


def test_cifar_all_classes_and_default_sizes(cifar):
    folder, _ = cifar
    dm = CIFAR10DataModule(str(folder))
    n = 10 * 5 * PER_CLASS
    assert dm.num_classes == 10
    assert [len(dm.train_split), len(dm.val_split), len(dm.test_split)] == [
        n - n // 10,
        n // 10,
        10 * TEST_PER_CLASS,
    ]


def test_cifar_is_deterministic_and_standardised_on_train(cifar):
    folder, _ = cifar
    kwargs = {"classes": ["cat", "dog"], "num_samples": 8, "num_val": 4, "seed": 1}
    a, b = CIFAR10DataModule(str(folder), **kwargs), CIFAR10DataModule(str(folder), **kwargs)
    for sa, sb in zip(
        (a.train_split, a.val_split, a.test_split), (b.train_split, b.val_split, b.test_split), strict=True
    ):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)
    raw = CIFAR10DataModule(str(folder), normalize="none", **kwargs)
    xtr = raw.train_split.x.double().numpy()
    mean, sd = xtr.mean(0), xtr.std(0)
    expected = (raw.test_split.x.double().numpy() - mean) / sd  # random pixels: no constant feature
    np.testing.assert_allclose(a.test_split.x.numpy(), expected, rtol=1e-4, atol=1e-4)
    sphere = CIFAR10DataModule(str(folder), normalize="sphere", **kwargs)
    torch.testing.assert_close(sphere.train_split.x.norm(dim=1), torch.full((8,), 3072**0.5))


def test_cifar_full_batch(cifar):
    folder, _ = cifar
    dm = CIFAR10DataModule(str(folder), classes=["airplane", "bird"], num_samples=10, full_batch=True)
    (batch,) = list(dm.train_dataloader())
    assert torch.equal(batch[0], dm.train_split.x) and torch.equal(batch[1], dm.train_split.y)


# ------------------------------------------------------------------------------------------- errors
def test_cifar_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"CIFAR-10 folder not found: {tmp_path / 'nope'}"):
        CIFAR10DataModule(str(tmp_path / "nope"))


@pytest.mark.parametrize("missing", ["data_batch_4", "test_batch", "batches.meta"])
def test_cifar_missing_file(cifar, missing):
    folder, _ = cifar
    (folder / missing).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{folder}.*lacks \['{missing}'\]"):
        CIFAR10DataModule(str(folder))


def _rewrite(folder: Path, name: str, content: object) -> None:
    (folder / name).write_bytes(pickle.dumps(content, protocol=2))


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (b"this is not a pickle at all", r"not a readable pickle"),
        (None, r"not a readable pickle \("),  # truncated: set below
        (b"", r"not a readable pickle"),
    ],
)
def test_cifar_corrupted_batch(cifar, raw, match):
    folder, _ = cifar
    path = folder / "data_batch_2"
    if raw is None:
        raw = path.read_bytes()[:5000]
    path.write_bytes(raw)
    dm = CIFAR10DataModule(str(folder))
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}: {match}"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (
            lambda c: c.pop(b"labels"),
            r"needs the keys 'data' and 'labels', found \['batch_label', 'data', 'filenames'\]",
        ),
        (
            lambda c: c.update({b"data": c[b"data"].astype(np.float32)}),
            r"'data' must be a uint8 array .* float32",
        ),
        (
            lambda c: c.update({b"data": c[b"data"][:, :100]}),
            r"shape \(N, 3072\), got uint8 array of shape \(30, 100\)",
        ),
        (lambda c: c.update({b"data": c[b"data"].tolist()}), r"'data' must be a uint8 array .* got list"),
        (lambda c: c.update({b"labels": c[b"labels"][:-1]}), r"30 images but 29 labels"),
        (lambda c: c.update({b"labels": [10] * 30}), r"labels must lie in 0\.\.9, found 10\.\.10"),
        (lambda c: c.update({b"labels": "cats"}), r"'labels' must be a list of ints, got str"),
    ],
)
def test_cifar_invalid_batch_content(cifar, mutate, match):
    folder, contents = cifar
    content = dict(contents["data_batch_5"])
    mutate(content)
    _rewrite(folder, "data_batch_5", content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(folder / 'data_batch_5'))}: .*{match}"):
        CIFAR10DataModule(str(folder)).setup("fit")


def test_cifar_batch_that_is_not_a_dict(cifar):
    folder, _ = cifar
    _rewrite(folder, "test_batch", [1, 2, 3])
    with pytest.raises(ValueError, match=rf"{folder / 'test_batch'}: expected a pickled dict"):
        CIFAR10DataModule(str(folder)).setup("test")


def test_cifar_bad_meta(cifar):
    folder, _ = cifar
    _rewrite(folder, "batches.meta", {b"label_names": [b"cat", b"dog"]})
    with pytest.raises(
        ValueError, match=rf"{folder / 'batches.meta'}: expected .*'label_names', a list of 10"
    ):
        CIFAR10DataModule(str(folder))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"classes": ["airplane", "horsey"]},
            r"unknown CIFAR-10 class 'horsey' .* \['airplane', 'automobile'",
        ),
        ({"classes": [10]}, r"unknown CIFAR-10 class 10 .*indices 0\.\.9"),
        ({"classes": ["bird", 2]}, r"must not repeat a class"),
        ({"classes": []}, r"non-empty list"),
        ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
        ({"num_test": -1}, r"num_test must be an integer >= 0"),
        ({"normalize": "unit"}, r"normalize must be one of \['standard', 'sphere', 'none'\], got 'unit'"),
    ],
)
def test_cifar_bad_arguments(cifar, kwargs, match):
    folder, _ = cifar
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(str(folder), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"classes": ["cat", "dog"], "num_samples": 31},
            r"num_samples=31 is more than the 30 points available",
        ),
        (
            {"classes": ["cat", "dog"], "num_samples": 28, "num_val": 3},
            r"num_val=3 is more than the 2 points",
        ),
        ({"classes": ["cat"], "num_test": 3}, r"num_test=3 is more than the 2 test points .*test_batch"),
    ],
)
def test_cifar_sizes_that_do_not_fit(cifar, kwargs, match):
    folder, _ = cifar
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(str(folder), **kwargs).setup("fit")


# ----------------------------------------------------------------------------------- unsafe pickles
class _Payload:
    """Pickles to a call of ``func(*args)``: what an attacker would plant in a data file."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize(
    ("make_payload", "func_name"),
    [
        (lambda marker: _Payload(os.system, f"touch {marker}"), "system"),
        (lambda marker: _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"), "exec"),
        (lambda marker: _Payload(subprocess.call, ["touch", str(marker)]), "call"),
    ],
)
@pytest.mark.parametrize("where", ["data_batch_1", "batches.meta"])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_pickle_is_refused_and_not_executed(cifar, make_payload, func_name, where, protocol):
    folder, contents = cifar
    marker = folder.parent / "pwned"
    if where == "batches.meta":
        content = {b"label_names": NAMES, b"num_vis": make_payload(marker)}
    else:
        content = {**contents[where], b"labels": make_payload(marker)}
    path = folder / where
    path.write_bytes(pickle.dumps(content, protocol=protocol))
    # (protocol 2 writes Python-2 module names, e.g. __builtin__.exec: refused all the same)
    expected = rf"{re.escape(str(path))}: refusing to unpickle the global '[\w.]+\.{func_name}'"
    with pytest.raises(UnsafePickleError, match=expected):
        CIFAR10DataModule(str(folder)).setup("fit")
    assert not marker.exists()


def test_unsafe_pickle_error_is_a_value_error_and_codecs_is_restricted(cifar):
    folder, _ = cifar
    assert issubclass(UnsafePickleError, ValueError)
    import _codecs

    path = folder / "data_batch_1"
    path.write_bytes(
        pickle.dumps({b"data": _Payload(_codecs.encode, "abc", "rot13"), b"labels": []}, protocol=2)
    )
    with pytest.raises(ValueError, match=rf"{path}: .*only allowed as encode\(str, 'latin1'\)"):
        load_cifar10_batch(path)


def test_the_malicious_payload_is_real(cifar):
    """Control for the test above: plain ``pickle.load`` of the same file does run the payload."""
    folder, contents = cifar
    marker = folder.parent / "pwned"
    path = folder / "data_batch_1"
    path.write_bytes(
        pickle.dumps({**contents["data_batch_1"], b"labels": _Payload(os.system, f"touch {marker}")})
    )
    with pytest.raises(UnsafePickleError):
        load_cifar10_batch(path)
    assert not marker.exists()
    with path.open("rb") as f:
        pickle.load(f)  # deliberately unsafe: proves the payload would run
    assert marker.exists()
