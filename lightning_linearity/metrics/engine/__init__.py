"""One engine of per-module derivative rules for the empirical NTK of any model (docs/math.md section 2.1).

    K[(i,a),(j,b)] = sum over modules m of < d f_a(x_i)/d theta_m , d f_b(x_j)/d theta_m >

where theta_m are the trainable parameters a module owns. One forward pass with hooks records each such
module's inputs; one backward pass batched over the k output basis vectors records
D_m[i,a] = d f_a(x_i) / d y_m for each module output y_m; each module's *rule* turns inputs and D into
factors (one row per probe point) and contracts them into its block of K. No per-sample Jacobian of the
whole model is formed.

Rules (one module file per family):

* ``nn.Linear`` (inputs (n, d) or (n, ..., d), the positions summed): (C C^T + 1) ⊙ (D D^T), or per-sample
  gradients when cheaper (:mod:`._linear`); ``nn.Embedding``: index equality ⊙ D D^T;
* ``nn.Conv1d/2d/3d`` (stride, padding and padding modes, dilation, groups, bias): per-sample weight
  gradients from unfolded patches or the patch-Gram route, the cheaper by flop count (:mod:`._conv`);
* the affine weights of LayerNorm, RMSNorm, GroupNorm and eval-mode BatchNorm (:mod:`._norm`);
* the package's :class:`~lightning_linearity.nets.layers.NTKLinear` (mask, per-neuron in-degree), the same
  contraction as the structured path of :mod:`lightning_linearity.metrics.ntk` (:mod:`._ntk_linear`);
* any other module with parameters of its own: its per-sample parameter gradients by ``torch.func``
  (:mod:`._fallback`). Parameters read without their module's forward being called (e.g.
  ``nn.MultiheadAttention.out_proj``) make the nearest called ancestor a fallback for its whole subtree.

A module called several times in one forward pass (weight sharing) is exact: its calls are pooled as
further positions (Linear, conv, Embedding) or their gradients summed (the others). Parameters with
``requires_grad=False`` are not part of w.

Not taken (:class:`UnsupportedModel`, a ``ValueError``; ``empirical_ntk(method="auto")`` then uses the
generic path): a model whose output on a probe point depends on the other points of the batch (BatchNorm
in training mode or without running statistics, dropout in training mode, or any module that fails the
check f(x_1 | batch x_1, x_2) = f(x_1 | batch x_1)); parameters tied between modules; a model whose
engine kernel disagrees with autograd on the first probe point (a parameter read outside its module).
The metrics run in eval mode (docs/math.md 2.7; the callback puts the model there), where BatchNorm uses
running statistics and is sample-wise. The per-module factorisation is that of docs/math.md section 3
("Any model made of standard layers").

Work split (DDP): :func:`ntk_plan` (cheap, the same on every rank), :func:`ntk_rows` for a rank's share of
the probe points, :func:`ntk_from_rows` from all gathered rows.

Neuron-gradient Gram matrices (docs/math.md 2.5, for ``neuron_gradient_cosines`` on foreign models):
:func:`neuron_gram` seeds the backward pass at a layer's output with the one-hot vectors of its sampled
neurons instead of the outputs of f, and sums the rules' blocks of single probe points
(:meth:`Rule.diagonal`); see :mod:`._neurons`.
"""

from lightning_linearity.metrics.engine._base import DEFAULT_CHUNK_ELEMENTS
from lightning_linearity.metrics.engine._neurons import neuron_gram
from lightning_linearity.metrics.engine._plan import (
    NTKPlan,
    UnsupportedModel,
    engine_ntk,
    ntk_from_rows,
    ntk_plan,
    ntk_rows,
    unless_unsupported,
)

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "NTKPlan",
    "UnsupportedModel",
    "engine_ntk",
    "neuron_gram",
    "ntk_from_rows",
    "ntk_plan",
    "ntk_rows",
    "unless_unsupported",
]
