"""LightningModules: training on the embedded digits data, checkpoints, losses, bad arguments."""

import pytest
import pytorch_lightning as pl
import torch

from lightning_linearity import NTKFCN, MaskedDAGNet, NTKDenseNet
from lightning_linearity.data import DigitsDataModule

FAMILIES = [NTKFCN, NTKDenseNet, MaskedDAGNet]


def full_batch_loss(model, data):
    x, y = next(iter(data.train_dataloader()))
    with torch.no_grad():
        return model.compute_loss(model(x), y).item()


def trainer(tmp_path, **kwargs):
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_fit_on_digits_decreases_the_loss_and_checkpoint_reloads(family, tmp_path):
    data = DigitsDataModule(num_samples=128, full_batch=True, seed=0)
    data.setup("fit")
    model = family(data.in_features, data.out_features, width=128, depth=2, lr=0.005, init_seed=0)
    before = full_batch_loss(model, data)
    t = trainer(tmp_path, max_steps=20, enable_checkpointing=True, limit_val_batches=0)
    t.fit(model, datamodule=data)
    after = full_batch_loss(model, data)
    assert after < 0.7 * before, (before, after)

    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    reloaded = family.load_from_checkpoint(path)
    x, _ = next(iter(data.train_dataloader()))
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_edge_list_dag_reloads_from_checkpoint(tmp_path):
    edges = [[0, 2], [1, 2], [1, 3], [2, 4], [3, 4], [0, 4]]
    model = MaskedDAGNet.from_edges(edges, activation="erf")
    assert model.net.in_features == 2
    t = trainer(tmp_path, max_steps=1)
    t.strategy.connect(model)
    path = tmp_path / "dag.ckpt"
    t.save_checkpoint(path)
    reloaded = MaskedDAGNet.load_from_checkpoint(path)
    x = torch.randn(5, 2)
    torch.testing.assert_close(reloaded(x), model(x), rtol=0, atol=0)


def test_random_mask_is_restored_by_the_checkpoint(tmp_path):
    model = MaskedDAGNet(8, 1, width=32, depth=2, drop_prob=0.5)  # mask_seed=None: drawn at random
    t = trainer(tmp_path, max_steps=1)
    t.strategy.connect(model)
    t.save_checkpoint(tmp_path / "m.ckpt")
    reloaded = MaskedDAGNet.load_from_checkpoint(tmp_path / "m.ckpt")
    for a, b in zip(model.net.layers, reloaded.net.layers, strict=True):
        torch.testing.assert_close(a.mask, b.mask, rtol=0, atol=0)
        torch.testing.assert_close(a.in_degree, b.in_degree, rtol=0, atol=0)


def test_mse_is_half_the_sum_of_squares_with_encoded_targets():
    model = NTKFCN(3, 4, width=8, depth=1)
    out = torch.tensor([[0.5, -1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    y = torch.tensor([2, 0])
    onehot = torch.tensor([[0.0, 0.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert model.compute_loss(out, y).item() == pytest.approx(0.5 * ((out - onehot) ** 2).sum().item())
    scalar = NTKFCN(3, 1, width=8, depth=1)
    out1 = torch.tensor([[0.25], [-0.5]])
    assert scalar.compute_loss(out1, torch.tensor([1, 0])).item() == pytest.approx(0.5 * (0.75**2 + 0.5**2))
    with pytest.raises(ValueError, match="labelled 0 and 1"):
        scalar.compute_loss(out1, torch.tensor([2, 0]))


def test_cross_entropy_loss():
    model = NTKFCN(3, 3, width=8, depth=1, loss="cross_entropy")
    out = torch.randn(4, 3)
    y = torch.tensor([0, 2, 1, 2])
    expected = -torch.log_softmax(out, 1)[torch.arange(4), y].mean()
    assert model.compute_loss(out, y).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bottleneck_widths_and_adam():
    model = NTKFCN(5, 1, widths=[64, 4, 64], optimizer="adam", lr=1e-3)
    assert model.net.hidden_widths == [64, 4, 64]
    assert model.net.width == 4
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width must be a positive integer, got 0"),
        ({"depth": -1}, "depth must be a positive integer, got -1"),
        ({"activation": "swish"}, "unknown activation"),
        ({"loss": "hinge"}, "loss must be 'mse' or 'cross_entropy'"),
        ({"optimizer": "lbfgs"}, "optimizer must be 'sgd' or 'adam'"),
        ({"lr": 0.0}, "lr must be positive"),
    ],
)
def test_bad_module_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NTKFCN(4, 1, **kwargs)


@pytest.mark.parametrize("drop_prob", [-0.5, 1.0])
def test_bad_drop_prob(drop_prob):
    with pytest.raises(ValueError, match="drop_prob must be in"):
        MaskedDAGNet(4, 1, width=8, depth=1, drop_prob=drop_prob)


def test_edge_list_must_match_in_features():
    with pytest.raises(ValueError, match="in_features=3 but the edge list has 2"):
        MaskedDAGNet(3, 1, edges=[[0, 2], [1, 2], [2, 3]])


def test_in_features_that_do_not_match_the_data(tmp_path):
    data = DigitsDataModule(num_samples=16, full_batch=True)
    model = NTKFCN(10, 10, width=8, depth=1)
    with pytest.raises(ValueError, match=r"in_features=10"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, datamodule=data)


def test_model_and_data_hyperparameters_log_together(tmp_path):
    """The model's init_seed and the data's seed are distinct names, so a logger can record both."""
    from pytorch_lightning.loggers import CSVLogger

    data = DigitsDataModule(num_samples=32, full_batch=True, seed=3)
    model = NTKFCN(data.in_features, data.out_features, width=16, depth=1)
    t = pl.Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        max_steps=1,
        limit_val_batches=0,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    t.fit(model, datamodule=data)
    hparams = (tmp_path / "lightning_logs" / "version_0" / "hparams.yaml").read_text()
    assert "init_seed: null" in hparams and "seed: 3" in hparams
