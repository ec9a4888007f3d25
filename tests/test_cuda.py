"""The metrics and the callback on a CUDA device: values equal to the CPU ones, tensors kept on the model's
device. Skipped without a GPU; ``bash scripts/gpu_check.sh`` runs them (and the GPU benchmarks) in one go."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_linearity import NTKFCN, LinearityMonitor
from lightning_linearity._compat import PRIMARY
from lightning_linearity.keys import is_timing
from lightning_linearity.metrics import empirical_ntk, hessian_spectral_norm, neuron_gradient_cosines

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def models():
    torch.manual_seed(0)
    foreign = nn.Sequential(nn.Linear(6, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 3))
    return {"NTKFCN": NTKFCN(6, 3, width=64, depth=2, init_seed=0).net, "foreign": foreign}


@pytest.mark.parametrize("name", ["NTKFCN", "foreign"])
def test_metrics_on_cuda_equal_the_cpu_values(name):
    cpu = models()[name].double()
    gpu = models()[name].double().cuda()
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kernel = empirical_ntk(gpu, x.cuda())
    assert kernel.device.type == "cuda"
    torch.testing.assert_close(kernel.cpu(), empirical_ntk(cpu, x), rtol=1e-10, atol=1e-12)
    norms = hessian_spectral_norm(gpu, x[:2].cuda(), generator=torch.Generator().manual_seed(0), tol=1e-8)
    reference = hessian_spectral_norm(cpu, x[:2], generator=torch.Generator().manual_seed(0), tol=1e-8)
    torch.testing.assert_close(norms.cpu(), reference, rtol=1e-6, atol=1e-9)
    layer = 1 if name == "NTKFCN" else "2"
    cosines = neuron_gradient_cosines(gpu, x.cuda(), layer)
    torch.testing.assert_close(cosines.cpu(), neuron_gradient_cosines(cpu, x, layer), rtol=1e-10, atol=1e-12)


def test_monitor_on_a_gpu_trainer_logs_the_cpu_values(tmp_path):
    def fit(accelerator):
        data = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(torch.randn(16, 6), torch.randn(16, 3)), batch_size=8
        )
        monitor = LinearityMonitor(every_n_steps=1, probe_size=8, plots=False, dtype="float64")
        trainer = PRIMARY.Trainer(
            accelerator=accelerator, devices=1, max_steps=2, callbacks=[monitor], logger=False,
            enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
        )  # fmt: skip
        trainer.fit(NTKFCN(6, 3, width=64, depth=2, init_seed=0, lr=0.01), data)
        return [{k: v for k, v in row.items() if not is_timing(k)} for row in monitor.history]

    gpu, cpu = fit("gpu"), fit("cpu")
    assert [row["step"] for row in gpu] == [0, 1, 2]
    for a, b in zip(gpu, cpu, strict=True):
        assert a == pytest.approx(b, rel=1e-4)
