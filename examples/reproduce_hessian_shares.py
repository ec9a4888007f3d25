"""Where the masked DAG's Hessian norm lives: the top eigenvector's share per layer and per neuron.

004 Theorem 3.6 predicts ||H_f|| = O~(1/sqrt(m)); the masked DAG of ``hessian_masked_dag.yaml`` measures a
shallower exponent (about -0.38, docs/reproductions.md). This script looks at the unit eigenvector v of
the eigenvalue reported (docs/math.md 2.4), at init, for the probe point with the largest norm (the one the
sweep's ``hessian_norm`` takes):

* the share ||v_g||^2 of each parameter group g (``layer_1`` .. ``layer_3``, ``output``);
* the largest share of one hidden neuron (its own input weights and the weights of later layers reading
  it, the output layer's direct edge included), and the layer that neuron is in
  (``hessian_spectral_norm(..., eigenvector_shares=True, return_info=True)``).

It also computes the norm of one neuron's block alone: for a first-layer neuron r with a direct edge v_r to
the output (DenseNet connectivity, docs/math.md 1), f holds the term s_out v_r tanh(z_r(x)), with
z_r = s_r sum_{s in S_r} W_1[r, s] x_s, s = deg^(-1/2). Its Hessian in (W_1[r, S_r], v_r) is the rank-two
matrix s_out [[v_r tanh''(z_r) s_r^2 x_S x_S^T, tanh'(z_r) s_r x_S], [., 0]], of norm
s_out (|A| + sqrt(A^2 + 4 C^2)) / 2 with A = v_r tanh''(z_r) s_r^2 ||x_S||^2, C = tanh'(z_r) s_r ||x_S||.
The column ``one-neuron block`` is its maximum over neurons and points: a maximum over m neurons of
O(1) / sqrt(deg_out) terms with Gaussian tails (v_r), which grows like sqrt(log m) / sqrt(m).

Claim checked: from m = 128 on, the top eigenvector sits on one first-layer neuron (largest-neuron share
>= 0.5 on average, that neuron in layer 1 in at least 3/4 of the runs); narrower networks are reported,
not checked (there the eigenvector often sits on a layer-2 neuron). An FCN (``--config hessian_fcn``) has
no such neuron: its first layer reaches the output only through m neurons per layer.

Usage::

    python examples/reproduce_hessian_shares.py [--widths 32 64 ...] [--seeds 0 1 ...] [--out DIR]
    python examples/reproduce_hessian_shares.py --profile ci      # the config's reduced widths and seeds
    python examples/reproduce_hessian_shares.py --config hessian_fcn     # another network, for comparison

Widths and seeds default to the config's (``--profile`` applies its overrides); the table is printed and
written to ``DIR/hessian_shares.md``, the runs to ``DIR/hessian_shares.csv``.
"""

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch

from lightning_linearity.configs import resolve as resolve_config
from lightning_linearity.metrics import hessian_spectral_norm
from lightning_linearity.sweeps.config import load_config_file, make_config
from lightning_linearity.sweeps.run import build_data, build_model

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sweeps" / "hessian_masked_dag.yaml"
#: The claim's thresholds: mean largest-neuron share, fraction of runs with that neuron in layer 1, and the
#: smallest width it is checked at.
MIN_NEURON_SHARE, MIN_FIRST_LAYER, MIN_WIDTH = 0.5, 0.75, 128


@torch.no_grad()
def one_neuron_block(net, x: torch.Tensor) -> float:
    """max over first-layer neurons r and points i of the norm of the direct-path block (module docstring,
    with sigma' and sigma'' of the network's activation); NaN for an FCN (no direct edge)."""
    if net.connectivity != "dense":
        return float("nan")
    first, out = net.layers[0], net.layers[-1]
    mask = first.mask if first.mask is not None else torch.ones_like(first.weight)
    s_r = first.in_degree.rsqrt()  # (m_1,)
    norm_x = (x.pow(2) @ mask.T).sqrt()  # ||x_{i, S_r}||, (n, m_1)
    z, sigma = net.preactivations(x)[0], net.activation  # (n, m_1)
    offset = sum(net.hidden_widths[1:])  # the output layer reads h_L, ..., h_2, then h_1, then x
    v = out.effective_weight()[0, offset : offset + net.hidden_widths[0]]  # 0 where the edge is dropped
    edge = (v != 0).to(x.dtype)
    a = v * sigma.second_derivative(z) * s_r**2 * norm_x**2
    c = edge * sigma.derivative(z) * s_r * norm_x
    block = out.in_degree[0].rsqrt() * (a.abs() + (a**2 + 4 * c**2).sqrt()) / 2
    return float(block.max())


def measure(config, width: int, seed: int, x: torch.Tensor, in_features: int) -> dict:
    """The largest Hessian norm over the probes at init, and its eigenvector's shares."""
    model = build_model(config, width, seed, in_features)
    options = config.monitor_args.get("hessian_norm", {})
    norms, info = hessian_spectral_norm(
        model,
        x,
        tol=options.get("tol", 1e-3),
        max_iter=options.get("max_iter", 100),
        eigenvector_shares=True,
        return_info=True,
    )
    i = int(norms.argmax())  # one output: row i of the (n, 1) results
    shares = dict(zip(info.share_names, info.layer_shares.view(len(norms), -1)[i].tolist(), strict=True))
    return {
        "width": width,
        "seed": seed,
        "in_degree": model.layered_net.width,
        "norm": float(norms.view(-1)[i]),
        "block": one_neuron_block(model.layered_net, x),
        **shares,
        "neuron_share": float(info.neuron_share.view(-1)[i]),
        "neuron_layer": int(info.top_neuron.view(-1, 2)[i, 0]),
    }


def table(records: list[dict], groups: tuple[str, ...]) -> str:
    """Per width, means over seeds (markdown)."""
    header = ["m", "in-degree", "Hessian norm (max over points)", "one-neuron block", "block / norm"]
    header += [f"share `{g}`" for g in groups]
    header += ["largest neuron share", "runs with that neuron in layer 1"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for width in sorted({r["width"] for r in records}):
        rows = [r for r in records if r["width"] == width]
        keys = ("in_degree", "norm", "block", *groups, "neuron_share")
        mean = {key: np.mean([r[key] for r in rows]) for key in keys}
        ratio = np.mean([r["block"] / r["norm"] for r in rows])
        first = sum(r["neuron_layer"] == 1 for r in rows)
        cells = [str(width), f"{mean['in_degree']:.0f}", f"{mean['norm']:.4f}", f"{mean['block']:.4f}"]
        cells += [f"{ratio:.3f}"]
        cells += [f"{mean[g]:.3f}" for g in groups]
        cells += [f"{mean['neuron_share']:.3f}", f"{first}/{len(rows)}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="a Hessian sweep config (default: masked DAG)")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--widths", type=int, nargs="+", default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--frozen_layers", type=int, nargs="*", default=None)
    parser.add_argument("--out", default="runs/hessian_shares")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--progress", default="true")  # accepted like the sweep's flag; nothing to show
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    fields = load_config_file(resolve_config(args.config, "sweep"), args.profile)
    for name in ("widths", "seeds", "frozen_layers"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    config = make_config(fields)
    data = build_data(config)
    x = data.train_split.x
    start = time.perf_counter()
    records = [
        measure(config, width, seed, x, data.in_features)
        for width in sorted(config.widths)
        for seed in config.seeds
    ]
    groups = tuple(k for k in records[0] if k.startswith(("layer_", "output")))
    frozen = f", layers {list(config.frozen_layers)} frozen" if config.frozen_layers else ""
    report = (
        f"Top Hessian eigenvector of {config.model} {dict(config.model_args)}{frozen} at init, widths "
        f"{sorted(config.widths)}, seeds {list(config.seeds)}; per width, means over seeds "
        f"({time.perf_counter() - start:.0f} s):\n\n" + table(records, groups)
    )
    verdicts = []
    for width in sorted(w for w in config.widths if w >= MIN_WIDTH):
        rows = [r for r in records if r["width"] == width]
        share = float(np.mean([r["neuron_share"] for r in rows]))
        first = sum(r["neuron_layer"] == 1 for r in rows) / len(rows)
        ok = share >= MIN_NEURON_SHARE and first >= MIN_FIRST_LAYER
        verdicts.append(ok)
        report += (
            f"\n- {'PASS' if ok else 'FAIL'} m = {width}: largest neuron share {share:.3f} (expected >= "
            f"{MIN_NEURON_SHARE}), in layer 1 in {first:.0%} of the runs (expected >= {MIN_FIRST_LAYER:.0%})"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "hessian_shares.md").write_text(report + "\n")
    with (out / "hessian_shares.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    print(report)
    return 0 if all(verdicts) else 3


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
