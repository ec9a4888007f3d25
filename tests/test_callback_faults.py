"""LinearityMonitor under faults (issue 12): metrics that recover their reference, failures that only warn,
models with several outputs or integer tokens, and a resume with other probe settings."""

from __future__ import annotations

import pytest
import torch
from test_callback import OUT, ForeignMLP, dataset, fcn, loader, make_monitor, trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_linearity.callbacks import _stages
from lightning_linearity.metrics import empirical_ntk, kernel_spectrum


def fail_in_first_round(monkeypatch, stage: type) -> None:
    original = stage.rows

    def rows(self, ctx, share):
        if ctx.take_references:
            raise RuntimeError("injected failure in the first round")
        return original(self, ctx, share)

    monkeypatch.setattr(stage, "rows", rows)


def test_kernel_reference_is_taken_at_the_next_successful_round(monkeypatch, tmp_path):
    fail_in_first_round(monkeypatch, _stages.Kernel)
    monitor = make_monitor(["ntk", "kernel_change"], every_n_steps=2, probe_size=8)
    with pytest.warns(UserWarning) as record:
        trainer(tmp_path, [monitor], max_steps=6, logger=False).fit(fcn(), loader())
    messages = [str(w.message) for w in record]
    assert any("injected failure in the first round" in m for m in messages)
    assert any("K_0 was not measured at the start of training" in m and "step 2" in m for m in messages)
    rounds = {row["step"]: row for row in monitor.history}
    assert "linearity/lambda_min" not in rounds.get(0, {})
    assert rounds[2]["linearity/kernel_change"] == 0.0 and rounds[6]["linearity/kernel_change"] > 0
    assert all("linearity/lambda_min" in rounds[step] for step in (2, 4, 6))  # logged in every later round
    assert monitor.state_dict()["stages"]["Kernel"]["reference_step"] == 2


def test_linearization_reference_is_taken_at_the_next_successful_round(monkeypatch, tmp_path):
    fail_in_first_round(monkeypatch, _stages.Linearization)
    monitor = make_monitor(["linearization"], every_n_steps=2, probe_size=8)
    with pytest.warns(UserWarning, match="w_0 was not recorded at the start of training"):
        trainer(tmp_path, [monitor], max_steps=4, logger=False).fit(fcn(), loader())
    rounds = {row["step"]: row for row in monitor.history}
    assert rounds[2]["linearity/distance_from_init"] == 0.0 and rounds[4]["linearity/distance_from_init"] > 0


def test_nan_in_the_probe_set_only_warns(tmp_path):
    x, y = dataset().tensors
    x = x.clone()
    x[1, 0] = float("nan")
    monitor = make_monitor(["ntk", "kernel_change"], every_n_steps=1, probe_data=(x[:6], y[:6]))
    with pytest.warns(UserWarning, match="non-finite|NaN"):
        t = trainer(tmp_path, [monitor], max_steps=2, logger=False)
        t.fit(fcn(), loader())
    assert t.global_step == 2


class TupleOutput(ForeignMLP):
    """A model whose forward returns (logits, features), as many real models do."""

    def forward(self, x):
        return self.net(x), x

    def training_step(self, batch, batch_idx):
        x, y = batch
        return 0.5 * (self(x)[0] - y).pow(2).sum()


def test_a_tuple_output_is_named_and_output_transform_picks_the_tensor(tmp_path):
    with pytest.warns(UserWarning, match=r"returned a tuple, not one tensor.*output_transform"):
        plain = make_monitor(["ntk"], every_n_steps=1, probe_size=6)
        t = trainer(tmp_path, [plain], max_steps=1, logger=False)
        t.fit(TupleOutput(), loader())
    assert t.global_step == 1 and plain.history == []

    torch.manual_seed(0)
    model = TupleOutput()
    picked = make_monitor(["ntk"], every_n_steps=None, probe_size=6, output_transform=lambda out: out[0])
    kernel = empirical_ntk(model.net, dataset().tensors[0][:6], method="generic")  # at init, independently
    trainer(tmp_path, [picked], max_steps=1, logger=False).fit(model, loader())
    first = picked.history[0]
    assert first["linearity/lambda_min"] == pytest.approx(float(kernel_spectrum(kernel).lambda_min), rel=1e-4)
    assert picked.settings()["output_transform"].startswith("<function")


class TokenModel(ForeignMLP):
    """Integer token ids (n, 4) through an nn.Embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 3)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, OUT))

    def forward(self, x):
        return self.net(self.embed(x))


def test_hessian_norms_of_an_integer_token_model_are_floats(tmp_path):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 10, (16, 4), generator=generator)
    data = DataLoader(TensorDataset(tokens, torch.randn(16, OUT, generator=generator)), batch_size=8)
    metrics = {"hessian_norm": {"max_iter": 10}}
    monitor = make_monitor(metrics, every_n_steps=1, probe_size=4, on_error="raise")
    trainer(tmp_path, [monitor], max_steps=1, logger=False).fit(TokenModel(), data)
    norms = [row["linearity/hessian_norm_max"] for row in monitor.history]
    assert len(norms) == 2 and all(isinstance(v, float) and v > 0 for v in norms)


def test_resume_with_other_probe_settings_keeps_the_checkpoint_probe_set_and_says_so(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    first = make_monitor(["ntk", "kernel_change"], every_n_steps=2, probe_size=6)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(tmp_path, [first, checkpoints], max_steps=2, enable_checkpointing=True, logger=False).fit(
        fcn(), loader(batch_size=32)
    )
    (checkpoint,) = (tmp_path / "ckpt").glob("*step=2.ckpt")
    resumed = make_monitor(["ntk", "kernel_change"], every_n_steps=2, probe_size=10)
    match = r"checkpoint's probe set of 6 points.*probe_size=10 given now is not used"
    with pytest.warns(UserWarning, match=match):
        t = trainer(tmp_path, [resumed], max_steps=4, logger=False)
        t.fit(fcn(), loader(batch_size=32), ckpt_path=checkpoint)
    assert len(resumed.probe) == 6 and torch.equal(resumed.probe.x, first.probe.x)


def test_probe_size_larger_than_the_data_turns_the_monitor_off_with_a_warning(tmp_path):
    monitor = make_monitor(["ntk"], every_n_steps=1, probe_size=10_000)
    with pytest.warns(UserWarning, match="no probe set, so no metric is measured in this run"):
        t = trainer(tmp_path, [monitor], max_steps=2, logger=False)
        t.fit(fcn(), loader())
    assert t.global_step == 2 and monitor.history == []


def test_wrong_output_transform_raises_at_init():
    with pytest.raises(Exception, match="output_transform must be a callable"):
        make_monitor(output_transform="out[0]")
