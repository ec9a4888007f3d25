"""Tests of the shared data-module behaviour, the digits and the Gaussian data modules.

Expected numbers come from independent computations: scikit-learn's raw digits, NumPy statistics, the
teacher formula written out with ``torch``; never from the code under test run twice.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_linearity.data import DigitsDataModule, GaussianDataModule, TensorDataModule, teacher_network


@pytest.fixture(scope="module")
def raw_digits() -> tuple[np.ndarray, np.ndarray]:
    return load_digits(return_X_y=True)


def _rows(x: torch.Tensor | np.ndarray) -> list[bytes]:
    return [np.asarray(r, dtype=np.float64).tobytes() for r in np.asarray(x)]


def _all_splits(dm) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(s.x, s.y) for s in (dm.train_split, dm.val_split, dm.test_split)]


# ---------------------------------------------------------------------------------------------- digits
def test_digits_attributes_and_batch_format():
    dm = DigitsDataModule(classes=[0, 1], num_samples=10)
    assert (dm.in_features, dm.num_classes, dm.out_features, dm.task) == (64, 2, 2, "classification")
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (10, 64)
    assert y.dtype == torch.int64 and y.shape == (10,)
    assert dm.hparams["classes"] == [0, 1] and dm.hparams["num_samples"] == 10


def test_digits_is_deterministic_and_seeded():
    a, b = DigitsDataModule(num_samples=30, seed=3), DigitsDataModule(num_samples=30, seed=3)
    for (xa, ya), (xb, yb) in zip(_all_splits(a), _all_splits(b), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = DigitsDataModule(num_samples=30, seed=4)
    assert not torch.equal(a.train_split.x, c.train_split.x)


def test_digits_class_subset_is_remapped_in_the_listed_order(raw_digits):
    x_raw, y_raw = raw_digits
    dm = DigitsDataModule(classes=[7, 3], normalize="none")
    rows_of = {c: Counter(_rows(x_raw[y_raw == c])) for c in (7, 3)}
    for x, y in _all_splits(dm):
        assert set(y.tolist()) <= {0, 1}
        for row, label in zip(_rows(x), y.tolist(), strict=True):
            assert row in rows_of[[7, 3][label]]  # label 0 is a 7, label 1 is a 3


def test_digits_splits_partition_the_pool_with_default_sizes(raw_digits):
    x_raw, y_raw = raw_digits
    dm = DigitsDataModule(normalize="none")
    n = len(y_raw)
    assert [len(dm.train_split), len(dm.val_split), len(dm.test_split)] == [n - 2 * (n // 5), n // 5, n // 5]
    got = Counter(r for x, _ in _all_splits(dm) for r in _rows(x))
    assert got == Counter(_rows(x_raw))  # disjoint and complete (as multisets of images)


def test_digits_subset_is_class_balanced_and_nested():
    dm10 = DigitsDataModule(classes=[0, 1], num_samples=10)
    assert Counter(dm10.train_split.y.tolist()) == {0: 5, 1: 5}
    dm11 = DigitsDataModule(classes=[4, 5, 6], num_samples=11)
    assert sorted(Counter(dm11.train_split.y.tolist()).values()) == [3, 4, 4]
    dm20 = DigitsDataModule(classes=[0, 1], num_samples=20, normalize="none")
    dm10_raw = DigitsDataModule(classes=[0, 1], num_samples=10, normalize="none")
    assert torch.equal(dm20.train_split.x[:10], dm10_raw.train_split.x)  # more samples only add points
    # held-out splits are balanced too and sized as asked
    dm = DigitsDataModule(classes=[0, 1], num_samples=10, num_val=6, num_test=4)
    assert Counter(dm.val_split.y.tolist()) == {0: 3, 1: 3}
    assert len(dm.test_split) == 4


def test_digits_standard_normalisation_uses_train_statistics_only():
    raw = DigitsDataModule(classes=[0, 1], num_samples=20, normalize="none")
    std = DigitsDataModule(classes=[0, 1], num_samples=20, normalize="standard")
    xtr = raw.train_split.x.numpy().astype(np.float64)
    mean, sd = xtr.mean(axis=0), xtr.std(axis=0)
    constant = np.all(xtr == xtr[0], axis=0)
    assert constant.any()  # 20 digits leave border pixels constant: the case below is exercised
    for raw_split, std_split in ((raw.train_split, std.train_split), (raw.val_split, std.val_split)):
        expected = (raw_split.x.numpy() - mean) / np.where(constant, 1.0, sd)
        expected[:, constant] = 0.0
        np.testing.assert_allclose(std_split.x.numpy(), expected, rtol=1e-5, atol=1e-5)
    got = std.train_split.x.numpy()
    np.testing.assert_allclose(got[:, ~constant].mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(got[:, ~constant].std(axis=0), 1.0, atol=1e-5)


def test_digits_sphere_normalisation_keeps_direction_and_sets_norm_sqrt_d():
    raw = DigitsDataModule(num_samples=50, normalize="none")
    sph = DigitsDataModule(num_samples=50, normalize="sphere")
    x_raw, x_sph = raw.train_split.x.double(), sph.train_split.x.double()
    torch.testing.assert_close(x_sph.norm(dim=1), torch.full((50,), 8.0, dtype=torch.float64))
    torch.testing.assert_close(x_sph, x_raw / x_raw.norm(dim=1, keepdim=True) * 8.0, rtol=1e-6, atol=1e-6)


def test_digits_none_keeps_raw_grey_levels(raw_digits):
    x = DigitsDataModule(num_samples=40, normalize="none").train_split.x
    assert torch.equal(x, x.round()) and x.min() >= 0 and x.max() <= 16


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": [0, 10]}, r"unknown class 10 .*0\.\.9"),
        ({"classes": [-1]}, r"unknown class -1"),
        ({"classes": [1, 1]}, r"must not repeat"),
        ({"classes": []}, r"non-empty list"),
        ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
        ({"num_samples": 2.5}, r"num_samples must be an integer"),
        ({"num_val": -1}, r"num_val must be an integer >= 0"),
        ({"normalize": "zscore"}, r"normalize must be one of \['standard', 'sphere', 'none'\], got 'zscore'"),
        ({"batch_size": 0}, r"batch_size must be an integer >= 1"),
        ({"num_workers": -1}, r"num_workers must be an integer >= 0"),
        ({"seed": -3}, r"seed must be an integer >= 0"),
        ({"full_batch": "yes"}, r"full_batch must be True or False"),
    ],
)
def test_digits_bad_arguments_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DigitsDataModule(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"classes": [0, 1], "num_samples": 361}, r"num_samples=361 is more than the 360 points"),
        ({"classes": [0, 1], "num_samples": 300, "num_val": 61}, r"num_val=61 is more than the 60 points"),
        (
            {"classes": [0, 1], "num_samples": 300, "num_val": 50, "num_test": 11},
            r"num_test=11 .* the 10 points",
        ),
        ({"classes": [0, 1], "num_val": 200, "num_test": 160}, r"leave no training points out of the 360"),
    ],
)
def test_digits_sizes_that_do_not_fit_raise_at_setup(kwargs, match):
    dm = DigitsDataModule(**kwargs)
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


# -------------------------------------------------------------------------------------------- loaders
@pytest.mark.parametrize(
    ("cls", "kwargs"), [(DigitsDataModule, {"num_samples": 100}), (GaussianDataModule, {"num_samples": 70})]
)
def test_full_batch_yields_exactly_one_batch_of_the_whole_split(cls, kwargs):
    full = cls(**kwargs, full_batch=True, batch_size=8)
    full.setup("fit")
    for loader, split in (
        (full.train_dataloader(), full.train_split),
        (full.val_dataloader(), full.val_split),
        (full.test_dataloader(), full.test_split),
        (full.predict_dataloader(), full.test_split),
    ):
        batches = list(loader)
        assert len(batches) == 1
        assert torch.equal(batches[0][0], split.x) and torch.equal(batches[0][1], split.y)


def test_minibatches_cover_the_split_and_shuffling_is_seeded():
    dm = DigitsDataModule(num_samples=100, batch_size=32, seed=1)
    batches = list(dm.train_dataloader())
    assert [len(b[1]) for b in batches] == [32, 32, 32, 4]
    x = torch.cat([b[0] for b in batches])
    assert Counter(_rows(x)) == Counter(_rows(dm.train_split.x))
    assert not torch.equal(x, dm.train_split.x)  # shuffled...
    again = torch.cat(
        [b[0] for b in DigitsDataModule(num_samples=100, batch_size=32, seed=1).train_dataloader()]
    )
    assert torch.equal(x, again)  # ...the same way for the same seed
    loader = dm.train_dataloader()
    epoch1, epoch2 = (torch.cat([b[0] for b in loader]) for _ in range(2))
    assert not torch.equal(epoch1, epoch2)  # reshuffled each epoch
    plain = DigitsDataModule(num_samples=100, batch_size=32, shuffle=False)
    assert torch.equal(torch.cat([b[0] for b in plain.train_dataloader()]), plain.train_split.x)
    val = torch.cat([b[0] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.val_split.x)  # evaluation loaders never shuffle


def test_global_rngs_are_left_untouched():
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()  # noqa: NPY002 (checking the legacy global RNG)
    for dm in (
        DigitsDataModule(num_samples=20),
        GaussianDataModule(),
        TensorDataModule.from_tensors(
            torch.arange(12.0).reshape(6, 2), torch.tensor([0, 1, 0, 1, 0, 1]), num_val=2
        ),
    ):
        dm.setup("fit")
        for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
            list(loader)
    assert torch.equal(torch_state, torch.get_rng_state())
    after = np.random.get_state()  # noqa: NPY002 (checking the legacy global RNG)
    assert np_state[0] == after[0] and np.array_equal(np_state[1], after[1]) and np_state[2:] == after[2:]


def test_empty_split_gives_an_empty_loader():
    dm = DigitsDataModule(classes=[0, 1], num_samples=10, num_val=0, num_test=0)
    assert dm.val_dataloader() == [] and dm.test_dataloader() == [] and dm.predict_dataloader() == []


def test_trainer_runs_one_step_per_epoch_with_full_batch():
    import pytorch_lightning as pl

    class Tiny(pl.LightningModule):
        def __init__(self, in_features: int, out_features: int):
            super().__init__()
            self.net = torch.nn.Linear(in_features, out_features)
            self.batch_sizes: list[int] = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.batch_sizes.append(len(y))
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = DigitsDataModule(classes=[0, 1], num_samples=10, full_batch=True)
    model = Tiny(dm.in_features, dm.out_features)
    trainer = pl.Trainer(
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 3 and model.batch_sizes == [10, 10, 10]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jsonargparse API used by pytorch_lightning.cli
def test_modules_are_lightning_cli_class_path_targets(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["lightning-linearity"])
    import pytorch_lightning as pl
    from pytorch_lightning.cli import LightningCLI

    class Model(pl.LightningModule):
        def __init__(self, in_features: int = 1, out_features: int = 1):
            super().__init__()
            self.net = torch.nn.Linear(in_features, out_features)

    class CLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.link_arguments("data.in_features", "model.in_features", apply_on="instantiate")
            parser.link_arguments("data.out_features", "model.out_features", apply_on="instantiate")

    path = tmp_path / "d.npz"
    np.savez(path, x=np.ones((8, 5)), y=np.zeros((8, 3)))
    cases = [
        ("DigitsDataModule", ["--data.init_args.classes=[0, 1]", "--data.init_args.num_samples=10"], (64, 2)),
        ("GaussianDataModule", ["--data.init_args.in_features=4", "--data.init_args.out_features=2"], (4, 2)),
        ("TensorDataModule", [f"--data.init_args.path={path}", "--data.init_args.full_batch=true"], (5, 3)),
    ]
    for name, args, (d, k) in cases:
        cli = CLI(
            Model,
            pl.LightningDataModule,
            subclass_mode_data=True,
            run=False,
            seed_everything_default=False,  # leave the global RNGs alone
            save_config_callback=None,
            trainer_defaults={"logger": False, "enable_progress_bar": False},
            args=[f"--data.class_path=lightning_linearity.data.{name}", *args],
        )
        assert type(cli.datamodule).__name__ == name
        assert (cli.model.net.in_features, cli.model.net.out_features) == (d, k)


# ------------------------------------------------------------------------------------------- gaussian
def test_gaussian_attributes_shapes_and_determinism():
    dm = GaussianDataModule(in_features=7, num_samples=12, num_val=5, num_test=3, out_features=2, seed=5)
    assert (dm.in_features, dm.num_classes, dm.out_features, dm.task) == (7, None, 2, "regression")
    shapes = [(tuple(x.shape), tuple(y.shape), x.dtype, y.dtype) for x, y in _all_splits(dm)]
    f32 = torch.float32
    assert shapes == [((12, 7), (12, 2), f32, f32), ((5, 7), (5, 2), f32, f32), ((3, 7), (3, 2), f32, f32)]
    again = GaussianDataModule(in_features=7, num_samples=12, num_val=5, num_test=3, out_features=2, seed=5)
    for (xa, ya), (xb, yb) in zip(_all_splits(dm), _all_splits(again), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    other = GaussianDataModule(in_features=7, num_samples=12, num_val=5, num_test=3, out_features=2, seed=6)
    assert not torch.equal(dm.train_split.x, other.train_split.x)


def test_gaussian_inputs_are_standard_normal():
    x = GaussianDataModule(in_features=8, num_samples=20000, num_val=0, num_test=0).train_split.x.double()
    # mean has standard error 1/sqrt(n) = 0.007, covariance entries about 0.01
    torch.testing.assert_close(x.mean(0), torch.zeros(8, dtype=torch.float64), atol=0.04, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), torch.eye(8, dtype=torch.float64), atol=0.06, rtol=0)


@pytest.mark.parametrize("kwargs", [{}, {"noise": 0.3}, {"labels": "random"}])
def test_gaussian_splits_are_independent_streams(kwargs):
    small = GaussianDataModule(num_samples=10, num_val=4, **kwargs)
    large = GaussianDataModule(num_samples=20, num_val=9, **kwargs)
    assert torch.equal(large.train_split.x[:10], small.train_split.x)
    assert torch.equal(large.train_split.y[:10], small.train_split.y)
    assert torch.equal(large.val_split.x[:4], small.val_split.x)
    assert not torch.equal(small.train_split.x[:4], small.val_split.x)


def test_gaussian_teacher_targets_follow_the_documented_network():
    d, k, m, seed = 6, 2, 16, 11
    dm = GaussianDataModule(in_features=d, num_samples=25, out_features=k, teacher_width=m, seed=seed)
    # The teacher's weights come from numpy.random.default_rng([seed, 0]): W (m, d) then V (k, m).
    rng = np.random.default_rng([seed, 0])
    w = torch.from_numpy(rng.standard_normal((m, d)))
    v = torch.from_numpy(rng.standard_normal((k, m)))
    for split in (dm.train_split, dm.val_split):
        x = split.x.double()
        expected = (v @ torch.tanh(w @ x.T / math.sqrt(d))).T / math.sqrt(m)  # written out independently
        torch.testing.assert_close(split.y.double(), expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(teacher_network(x.numpy(), w.numpy(), v.numpy()), expected.numpy())


def test_gaussian_teacher_noise_and_random_labels():
    clean = GaussianDataModule(num_samples=4000, num_val=0, num_test=0, seed=2)
    noisy = GaussianDataModule(num_samples=4000, num_val=0, num_test=0, noise=0.5, seed=2)
    assert torch.equal(clean.train_split.x, noisy.train_split.x)
    residual = noisy.train_split.y - clean.train_split.y
    assert abs(float(residual.std()) - 0.5) < 0.03
    rand = GaussianDataModule(in_features=3, num_samples=4000, num_val=0, num_test=0, labels="random")
    y, x = rand.train_split.y.double().squeeze(1), rand.train_split.x.double()
    assert abs(float(y.mean())) < 0.06 and abs(float(y.std()) - 1.0) < 0.05
    corr = torch.corrcoef(torch.cat([x.T, y[None]]))[-1, :-1]
    assert corr.abs().max() < 0.06  # independent of the inputs


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_features": 0}, r"in_features must be an integer >= 1, got 0"),
        ({"num_samples": 0}, r"num_samples must be an integer >= 1"),
        ({"num_samples": None}, r"num_samples must be an integer >= 1, got None"),
        ({"num_val": -2}, r"num_val must be an integer >= 0"),
        ({"labels": "teachers"}, r"labels must be one of \['teacher', 'random'\], got 'teachers'"),
        ({"out_features": 0}, r"out_features must be an integer >= 1"),
        ({"teacher_width": 0}, r"teacher_width must be an integer >= 1"),
        ({"noise": -0.1}, r"noise must be a finite float >= 0, got -0.1"),
        ({"noise": float("nan")}, r"noise must be a finite float >= 0, got nan"),
    ],
)
def test_gaussian_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianDataModule(**kwargs)
