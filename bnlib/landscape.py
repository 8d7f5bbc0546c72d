r"""Why BN works: noisy BN, internal covariate shift as gradient change, smoothness, scale invariance.

The chapter "Why does BN work?" uses these tools to repeat, at small scale,
the measurements of Santurkar, Tsipras, Ilyas and Madry (2018), *How does
batch normalization help optimization?*, and to check the scale invariance
of BN numerically.

- :class:`NoisyBatchNorm1d`: BN followed by noise whose mean and variance
  change at every training step (their section 2.1), so that the
  distribution of every layer's input keeps shifting on purpose.
- :class:`LpBatchNorm1d`: BN that divides by an :math:`\ell_p` average of
  the centered activations instead of their standard deviation (their
  section 3.3): ``p = 2`` is BN; ``p = 1`` and ``p = inf`` fix each unit's
  :math:`\ell_p` spread at 1, so its variance at another value than 1
  (:math:`\pi/2` for normal inputs at ``p = 1``; at ``p = inf`` one that
  shrinks with the batch size).
- :func:`ics_gradient_change`: internal covariate shift as they define it
  (their section 2.2): for layer ``i`` with weight ``W_i``, the gradient
  ``G`` of the loss at the current parameters, and the gradient ``G'`` after
  the *earlier* layers ``1 .. i-1`` (and only those) took their SGD step on
  the same batch,

  .. math::

      G  = \nabla_{W_i} L(W_1, \dots, W_{i-1}, W_i, \dots, W_k; x, y),

      G' = \nabla_{W_i} L(W_1', \dots, W_{i-1}', W_i, \dots, W_k; x, y),

  with :math:`W_j' = W_j - \text{lr}\, \nabla_{W_j} L` and the result
  :math:`\lVert G - G' \rVert_2` and :math:`\cos(G, G')`.
- :func:`gradient_norms_by_layer`: the norm of the gradient of every hidden
  layer's weights on one batch, without an update: at initialization, in a
  deep network without residual connections, BN makes it grow
  exponentially toward the input (Yang, Pennington, Rao, Sohl-Dickstein
  and Schoenholz 2019, *A mean field theory of batch normalization*).
- :func:`loss_landscape_along_gradient`: the loss and the gradient at
  ``w - eta * g`` for a range of step sizes ``eta`` (their section 3.1,
  Figure 4): "variation of the loss", "gradient predictiveness"
  :math:`\lVert g(w - \eta g) - g(w) \rVert` and the effective
  :math:`\beta_{\mathrm{sm}}`-smoothness (not BN's shift :math:`\beta`)
  :math:`\max_{\eta > 0} \lVert g(w - \eta g) - g(w) \rVert / \lVert \eta g \rVert`.
- :func:`filter_normalized_direction`, :func:`loss_surface`,
  :func:`negative_curvature_mask` and :func:`negative_curvature_fraction`: the loss on a plane through the
  trained parameters, as Li, Xu, Taylor, Studer and Goldstein (2018),
  *Visualizing the loss landscape of neural nets*, draw it;
  :func:`filter_norm_growth` and ``loss_surface(..., keep_filter_norms=True)``
  separate what the plane does to the weights' norms from what it does to
  their directions.
- Scale invariance: :func:`linear_bn`, :func:`scale_invariance`,
  :func:`weight_norms`, :func:`effective_lr` and the training callback
  :class:`WeightNorms`.
- :class:`Probe`: a training callback that evaluates named measurements
  every few steps.

Every measurement leaves the model as it found it: parameters, buffers
(running statistics, ``num_batches_tracked``, the noise counter) and the
train/eval mode are restored; only ``.grad`` is cleared
(:func:`gradient_norms_by_layer` leaves ``.grad`` untouched too).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bnlib import functional as bnF
from bnlib.functional import _per_channel, _stat_dims, _update_running_stats
from bnlib._checks import values_per_channel
from bnlib.models import buffers_kept, modes_kept
from bnlib.nn import BatchNorm1d

__all__ = [
    "NoisyBatchNorm1d",
    "LpBatchNorm1d",
    "PartialBatchNorm1d",
    "GradientChange",
    "ics_gradient_change",
    "gradient_norms_by_layer",
    "Landscape",
    "loss_landscape_along_gradient",
    "filter_normalized_direction",
    "filter_norm_growth",
    "loss_surface",
    "negative_curvature_mask",
    "negative_curvature_fraction",
    "linear_bn",
    "ScaleCheck",
    "scale_invariance",
    "weight_norms",
    "effective_lr",
    "WeightNorms",
    "Probe",
]

_LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------
# Noisy BN
# --------------------------------------------------------------------------


class NoisyBatchNorm1d(BatchNorm1d):
    r"""BN followed by time-varying noise with non-zero mean and non-unit variance.

    In training mode, at training step ``t`` (one call of ``forward``), every
    unit ``j`` gets its own scale and shift, drawn afresh at every step:

    .. math::

        s_j^{(t)} \sim \mathcal U(1, n_\sigma), \qquad
        m_j^{(t)} \sim \mathcal U(-n_\mu, n_\mu), \qquad
        \text{out}_{ij} = s_j^{(t)}\, y_{ij} + m_j^{(t)},

    where ``y = gamma * x_hat + beta`` is the output of ordinary batch norm
    (``bnlib.nn.BatchNorm1d``) for sample ``i``. So at every step each unit's
    output has, over the batch, the mean :math:`s_j \beta_j + m_j` and the
    standard deviation :math:`s_j |\gamma_j|` instead of :math:`\beta_j`
    and :math:`|\gamma_j|`: a distribution with a non-zero mean and a
    non-unit variance that changes from step to step, which is the
    perturbation of Santurkar et al. (2018, section 2.1). The uniform
    ranges follow our reading of their appendix; the defaults
    ``n_mu = 1``, ``n_sigma = 2`` are ours.

    ``n_mu = 0`` and ``n_sigma = 1`` give no noise: the layer is exactly
    ``BatchNorm1d``. In eval mode the noise is replaced by its expectation,
    as dropout is at inference: ``out = E[s] * y + E[m] = (1 + n_sigma) / 2 * y``
    (with ``y`` from the running statistics, as in plain BN), so the layer
    above sees at test time the scale it saw on average during training.

    The noise of step ``t`` is a function of ``(seed, t)`` alone (a fresh
    ``torch.Generator`` seeded from both), where ``t`` is the buffer
    ``noise_step`` that every training-mode forward increments. A measurement
    that saves and restores the buffers (``recorders.probe``, the functions of
    this module) therefore sees the noise of the next training step and does
    not change the noise that training will see. ``seed=None`` draws the seed
    from torch's global generator at construction (so
    ``models.make_mlp(..., seed=s)`` is reproducible).

    Shapes: input ``(N, C)`` or ``(N, C, L)``, output the same.
    """

    #: Its eval-mode output is BN's times the mean noise scale, so bnlib.fold
    #: refuses it (False).
    foldable = False

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, n_mu: float = 1.0, n_sigma: float = 2.0,
                 seed: int | None = None):
        if not (isinstance(n_mu, (int, float)) and math.isfinite(n_mu) and n_mu >= 0):
            raise ValueError(f"n_mu must be a finite number >= 0, got {n_mu!r}")
        if not (isinstance(n_sigma, (int, float)) and math.isfinite(n_sigma) and n_sigma >= 1):
            raise ValueError(f"n_sigma must be a finite number >= 1, got {n_sigma!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.n_mu = float(n_mu)
        self.n_sigma = float(n_sigma)
        if seed is None:
            seed = int(torch.randint(0, 2**31 - 1, (1,)))
        self.seed = int(seed)
        self.register_buffer("noise_step", torch.tensor(0, dtype=torch.long, device=device), persistent=False)

    def noise(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, shift)`` of training step ``step``, each of shape ``(num_features,)``, float64 on the CPU."""
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + int(step)) % (2**63 - 1))
        u = torch.rand(2, self.num_features, generator=g, dtype=torch.float64)
        scale = 1.0 + (self.n_sigma - 1.0) * u[0]
        shift = self.n_mu * (2.0 * u[1] - 1.0)
        return scale, shift

    def forward(self, input):
        y = super().forward(input)  # checks the input before any state changes
        if not self.training:
            return y * ((1.0 + self.n_sigma) / 2.0)
        self.noise_step.add_(1)
        scale, shift = self.noise(int(self.noise_step))
        shape = (1, -1) + (1,) * (y.dim() - 2)
        scale = scale.to(device=y.device, dtype=y.dtype).view(shape)
        shift = shift.to(device=y.device, dtype=y.dtype).view(shape)
        return y * scale + shift

    def extra_repr(self):
        return super().extra_repr() + f", n_mu={self.n_mu}, n_sigma={self.n_sigma}, seed={self.seed}"


# --------------------------------------------------------------------------
# l_p batch norm
# --------------------------------------------------------------------------


class LpBatchNorm1d(BatchNorm1d):
    r"""Batch norm that divides by an :math:`\ell_p` average instead of the standard deviation.

    Santurkar et al. (2018, section 3.3) ask whether BN is the only way to
    smooth the landscape, and train networks whose normalization layers fix
    the mean of every unit, as BN does, but divide by an :math:`\ell_p`
    average of the activations for ``p = 1, 2, inf`` instead of making the
    variance 1. For a unit with values :math:`x_1, \dots, x_m` over the
    batch (and positions, for ``(N, C, L)`` input):

    .. math::

        \mu = \frac{1}{m} \sum_i x_i, \qquad
        s_p = \Bigl(\frac{1}{m} \sum_i |x_i - \mu|^p\Bigr)^{1/p}, \qquad
        s_\infty = \max_i |x_i - \mu|,

    .. math::

        \hat{x}_i = \frac{x_i - \mu}{\sqrt{s_p^2 + \epsilon}}, \qquad
        y_i = \gamma\, \hat{x}_i + \beta .

    ``p = 2`` gives :math:`s_2^2 = \sigma^2`, the biased variance: exactly
    ``BatchNorm1d``. For other ``p`` the normalized values have mean 0 but
    no fixed variance: for normal inputs :math:`s_1 = \sigma\sqrt{2/\pi}`, so
    the variance of :math:`\hat{x}` is :math:`\pi/2`, and :math:`s_\infty`
    (the largest deviation in the batch) grows with the batch size, so the
    variance of :math:`\hat{x}` shrinks with it. The paper's own definition
    differs in detail (it divides by the average :math:`\ell_p` norm of the
    activations); ours keeps BN's :math:`\epsilon` and mean so that
    ``p = 2`` is BN and only the measure of spread changes.

    Running estimates: ``running_mean`` tracks :math:`\mu`, and
    ``running_var`` tracks :math:`s_p^2` (with BN's factor
    :math:`m / (m - 1)` for ``p = 2``, so the layer stays identical to
    BN; without it for other ``p``, where that factor has no meaning).
    Eval mode normalizes with them, as BN does. A channel whose batch
    statistics are not finite leaves its running estimates unchanged (the
    contract's NaN rule). The gradient is autograd's through these tensor
    operations (at ``p = inf`` it goes to the sample with the largest
    deviation).

    Shapes: input ``(N, C)`` or ``(N, C, L)``, output the same.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, p: float = 2.0):
        valid = isinstance(p, (int, float)) and not isinstance(p, bool) and not math.isnan(p) and p >= 1
        if not valid:
            raise ValueError(f"p must be a number >= 1 or math.inf, got {p!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.p = float(p)

    def spread_squared(self, centered: torch.Tensor, dims: list[int]) -> torch.Tensor:
        r""":math:`s_p^2` of each channel of ``centered`` (already minus its mean) over ``dims``."""
        if math.isinf(self.p):
            return centered.abs().amax(dim=dims) ** 2
        mean_p = centered.abs().pow(self.p).mean(dim=dims)
        # u^(2/p) has an infinite slope at 0 for p > 2: a constant channel
        # (mean_p = 0, a dead unit) would pass NaN back; it gets 0 and no gradient.
        # (a NaN channel stays NaN: the NaN rule of the running estimates needs it)
        zero = mean_p == 0
        safe = torch.where(zero, torch.ones_like(mean_p), mean_p)
        return torch.where(zero, torch.zeros_like(mean_p), safe.pow(2.0 / self.p))

    def forward(self, input):
        self._check_input(input)  # before any state changes
        ndim = input.dim()
        x = input.to(bnF._compute_dtype(input.dtype))  # half inputs: float32 statistics, as BN
        dims = _stat_dims(ndim)
        use_batch_stats = self.training or self.running_mean is None
        if use_batch_stats:
            mean = x.mean(dim=dims)
            centered = x - _per_channel(mean, ndim)
            spread_sq = self.spread_squared(centered, dims)
            if self.training and self.track_running_stats:
                factor = self._count_batch()
                # BN's update and NaN rule; its factor m / (m - 1) only for
                # p = 2 (a count of 1 turns it off).
                m = values_per_channel(input.shape) if self.p == 2.0 else 1
                with torch.no_grad():
                    _update_running_stats(self.running_mean, self.running_var, mean, spread_sq, m, factor)
        else:
            centered = x - _per_channel(self.running_mean.to(x.dtype), ndim)
            spread_sq = self.running_var.to(x.dtype)
        x_hat = centered / _per_channel(torch.sqrt(spread_sq + self.eps), ndim)
        return self._scale_and_shift(x_hat).to(input.dtype)

    def _scale_and_shift(self, x_hat: torch.Tensor) -> torch.Tensor:
        """``gamma * x_hat + beta`` per channel (either may be absent)."""
        ndim = x_hat.dim()
        if self.weight is not None:
            x_hat = x_hat * _per_channel(self.weight, ndim)
        if self.bias is not None:
            x_hat = x_hat + _per_channel(self.bias, ndim)
        return x_hat

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}"


class PartialBatchNorm1d(LpBatchNorm1d):
    r"""Batch norm taken apart: only the centring, only the scaling, or both.

    For a unit with batch mean :math:`\mu` and biased variance :math:`\sigma^2`:

    .. math::

        \hat{x}_i = \begin{cases}
            (x_i - \mu) / \sqrt{\sigma^2 + \epsilon} & \text{center, scale (BN)} \\
            x_i - \mu & \text{center only (mean-only BN)} \\
            x_i / \sqrt{\sigma^2 + \epsilon} & \text{scale only}
        \end{cases}

        y_i = \gamma\,\hat{x}_i + \beta .

    ``center=True, scale=True`` is exactly ``BatchNorm1d``; ``scale=False`` is
    Salimans and Kingma's (2016) mean-only BN. The running
    estimates are BN's (``running_mean`` tracks :math:`\mu`, ``running_var``
    the unbiased variance), and eval mode uses them in place of the batch's
    for the parts that are on. Not foldable by :mod:`bnlib.fold` unless both are on.
    Shapes: input ``(N, C)`` or ``(N, C, L)``, output the same.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, center: bool = True, scale: bool = True):
        if not isinstance(center, bool) or not isinstance(scale, bool) or not (center or scale):
            raise ValueError(f"center and scale must be booleans, at least one True; got {center!r}, {scale!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                         bias=bias, p=2.0)
        self.center, self.scale = center, scale
        self.foldable = center and scale

    def forward(self, input):
        if self.center and self.scale:
            return super().forward(input)
        self._check_input(input)  # before any state changes
        ndim = input.dim()
        x = input.to(bnF._compute_dtype(input.dtype))
        dims = _stat_dims(ndim)
        if self.training or self.running_mean is None:
            mean = x.mean(dim=dims)
            var = (x - _per_channel(mean, ndim)).pow(2).mean(dim=dims)
            if self.training and self.track_running_stats:
                factor = self._count_batch()
                with torch.no_grad():
                    _update_running_stats(self.running_mean, self.running_var, mean, var,
                                          values_per_channel(input.shape), factor)
        else:
            mean, var = self.running_mean.to(x.dtype), self.running_var.to(x.dtype)
        x_hat = x - _per_channel(mean, ndim) if self.center else x
        if self.scale:
            x_hat = x_hat / _per_channel(torch.sqrt(var + self.eps), ndim)
        return self._scale_and_shift(x_hat).to(input.dtype)

    def extra_repr(self):
        return super().extra_repr() + f", center={self.center}, scale={self.scale}"


# --------------------------------------------------------------------------
# Leaving the model as it was
# --------------------------------------------------------------------------


@contextlib.contextmanager
def _preserved(model: nn.Module, train: bool = True) -> Iterator[None]:
    """Run a block in ``train`` mode, then restore parameters, buffers and mode; clear ``.grad``."""
    params = [p.detach().clone() for p in model.parameters()]
    with buffers_kept(model), modes_kept(model):
        try:
            model.train(train)
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(model.parameters(), params):
                    p.copy_(s)
            model.zero_grad(set_to_none=True)


def _restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):
            b.copy_(s)


def _check_xy(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim < 2 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"x must be (N, ...) with N >= 1 and y (N, ...) with the same N, got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )


def _grads(model: nn.Module, x, y, loss_fn: _LossFn) -> tuple[float, list[torch.Tensor]]:
    """Loss and the gradient of every parameter (zeros for a parameter the loss does not reach)."""
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model(x), y)
    loss.backward()
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    return float(loss.detach()), grads


# --------------------------------------------------------------------------
# Internal covariate shift as a change of gradients
# --------------------------------------------------------------------------


@dataclass
class GradientChange:
    """Per-layer result of :func:`ics_gradient_change`; arrays of shape ``(n_layers,)``.

    ``l2``: :math:`\\lVert G - G' \\rVert_2`; ``cosine``: :math:`\\cos(G, G')`
    (1 when nothing changed); ``grad_norm``: :math:`\\lVert G \\rVert_2`.
    """

    names: list[str]
    l2: np.ndarray
    cosine: np.ndarray
    grad_norm: np.ndarray

    @property
    def relative(self) -> np.ndarray:
        """:math:`\\lVert G - G' \\rVert / \\lVert G \\rVert`, per layer."""
        return self.l2 / self.grad_norm


def ics_gradient_change(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    layers: Sequence[str] | None = None,
    loss_fn: _LossFn = F.cross_entropy,
) -> GradientChange:
    r"""Internal covariate shift of Santurkar et al. (2018): how much a layer's gradient changes when the layers before it take their step.

    For each layer ``i`` named in ``layers`` (the names of ``model``'s
    children; default: every ``nn.Linear`` child in order, e.g. ``fc1, ...,
    out``), with ``W_i = layer.weight``:

    1. ``G = dL/dW_i`` of ``loss_fn(model(x), y)`` at the current parameters;
    2. every parameter of the children *before* layer ``i`` takes one plain
       SGD step with the gradient of step 1, ``p <- p - lr * dL/dp``
       (layers ``i`` and later keep their values);
    3. ``G' = dL/dW_i`` on the same ``(x, y)``; then everything is restored.

    The model runs in training mode (BN uses the statistics of the batch
    ``x``); every forward pass starts from the same buffers, so a
    :class:`NoisyBatchNorm1d` uses the same noise for ``G`` and ``G'``. For
    the first layer there is nothing before it: ``G' = G``.

    ``x``: ``(N, ...)``, ``y``: targets for ``loss_fn``, ``lr >= 0``.
    Returns a :class:`GradientChange`. The model is left as it was (only
    ``.grad`` is cleared).
    """
    _check_xy(x, y)
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    children = list(model.named_children())
    order = {name: k for k, (name, _) in enumerate(children)}
    if layers is None:
        layers = [name for name, m in children if isinstance(m, nn.Linear)]
    for name in layers:
        if name not in order or getattr(children[order[name]][1], "weight", None) is None:
            raise ValueError(f"layers must name children of the model with a weight, got {name!r}; "
                             f"children are {list(order)}")
    if not layers:
        raise ValueError("the model has no nn.Linear child; name the layers to measure")
    param_index = {id(p): k for k, p in enumerate(model.parameters())}
    l2, cos, norms = [], [], []
    with _preserved(model, train=True):
        buffers = [b.detach().clone() for b in model.buffers()]
        params = list(model.parameters())
        start = [p.detach().clone() for p in params]
        _, grads = _grads(model, x, y, loss_fn)
        for name in layers:
            layer = children[order[name]][1]
            k_w = param_index[id(layer.weight)]
            earlier = {id(p) for _, m in children[: order[name]] for p in m.parameters()}
            with torch.no_grad():
                for p, g in zip(params, grads):
                    if id(p) in earlier:
                        p.sub_(lr * g)
            _restore_buffers(model, buffers)
            _, grads_after = _grads(model, x, y, loss_fn)
            g0, g1 = grads[k_w].double().flatten(), grads_after[k_w].double().flatten()
            l2.append(float((g0 - g1).norm()))
            norms.append(float(g0.norm()))
            denom = float(g0.norm() * g1.norm())
            cos.append(float(g0 @ g1) / denom if denom > 0 else float("nan"))
            with torch.no_grad():
                for p, s in zip(params, start):
                    p.copy_(s)
            _restore_buffers(model, buffers)
    return GradientChange(list(layers), np.array(l2), np.array(cos), np.array(norms))


# --------------------------------------------------------------------------
# Gradient norms layer by layer (Yang et al. 2019)
# --------------------------------------------------------------------------


def _hidden_linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` submodule in ``named_modules()`` order, but the last one (the output layer)."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear)][:-1]


def gradient_norms_by_layer(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    layers: Sequence[str] | None = None,
    loss_fn: _LossFn = F.cross_entropy,
) -> np.ndarray:
    r"""The Frobenius norm of the gradient of each hidden layer's weights, on one batch, without an update.

    For the layers :math:`l = 1, \dots, n` named in ``layers``, with weights
    :math:`W^{[l]}` and :math:`L = \text{loss\_fn}(\text{model}(x), y)`
    computed in training mode (BN normalizes with the statistics of the batch
    ``x``),

    .. math::

        g_l = \Bigl\lVert \frac{\partial L}{\partial W^{[l]}} \Bigr\rVert_F
            = \Bigl( \sum_{j,k} \Bigl( \frac{\partial L}{\partial W^{[l]}_{jk}} \Bigr)^2 \Bigr)^{1/2},

    returned as a float64 array of shape ``(n,)``, computed in float64 from
    the gradients. ``layers`` are names from ``model.named_modules()``
    (``"fc3"``, ``"block2.fc1"``) of modules with a ``weight``; by default
    every ``nn.Linear`` in that order except the last one, the output layer:
    ``fc1 ... fc{depth}`` of :func:`bnlib.models.make_mlp`, ``stem.0,
    block1.fc1, block1.fc2, ...`` of :func:`bnlib.models.make_resmlp`.
    A weight that the loss does not reach has :math:`g_l = 0`.

    Yang, Pennington, Rao, Sohl-Dickstein and Schoenholz (2019) show that at
    initialization, in a deep fully connected network with BN before every
    ReLU and no residual connections, the gradient grows toward the input by
    a fixed factor per layer: for large width and batch,
    :math:`g_l^2 / g_{l+1}^2 \to \pi / (\pi - 1)`, so
    :math:`g_l / g_{l+1} \to \sqrt{\pi/(\pi - 1)} \approx 1.21`.

    The gradients come from ``torch.autograd.grad``: no parameter
    changes and ``.grad`` is left as it was. Buffers (BN's running
    statistics, ``num_batches_tracked``) are restored and every submodule
    gets back its own train/eval mode (:func:`bnlib.models.modes_kept`), also
    when the forward pass raises. :func:`bnlib.recorders.init_grad_norms` is
    the older tool of chapter 1: it runs in the model's current mode, covers
    every ``nn.Linear`` (output layer included) and leaves the gradients in
    ``.grad``.
    """
    _check_xy(x, y)
    modules = dict(model.named_modules())
    if isinstance(layers, str):
        raise ValueError(f"layers must be a list of names, got the string {layers!r}; use [{layers!r}]")
    if layers is None:
        layers = _hidden_linear_names(model)
        if not layers:
            raise ValueError("the model has fewer than two nn.Linear layers, so no hidden one; "
                             "name the layers to measure")
    layers = list(layers)
    if not layers:
        raise ValueError("layers is empty: name at least one layer")
    weights = []
    for name in layers:
        weight = getattr(modules[name], "weight", None) if name in modules else None
        if not isinstance(weight, torch.Tensor) or not weight.requires_grad:
            with_weight = [n for n, m in modules.items() if isinstance(getattr(m, "weight", None), torch.Tensor)]
            shown = ", ".join(with_weight[:8]) + (", ..." if len(with_weight) > 8 else "")
            raise ValueError(f"layers must name submodules with a weight that requires grad, got {name!r}; "
                             f"submodules with a weight: {shown}")
        weights.append(weight)
    with buffers_kept(model), modes_kept(model):
        model.train()
        loss = loss_fn(model(x), y)
        if loss.ndim != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        grads = torch.autograd.grad(loss, weights, allow_unused=True)
    return np.array([0.0 if g is None else float(g.detach().double().norm()) for g in grads])


# --------------------------------------------------------------------------
# Smoothness along the gradient
# --------------------------------------------------------------------------


@dataclass
class Landscape:
    r"""Result of :func:`loss_landscape_along_gradient`; arrays of shape ``(n_steps,)``.

    - ``step_sizes``: the ``eta`` values;
    - ``loss``: :math:`L(w - \eta g)`; ``loss0``: :math:`L(w)`;
    - ``grad_change``: :math:`\lVert g(w - \eta g) - g(w) \rVert_2`, the
      "gradient predictiveness" (small means the gradient at ``w`` predicts
      the gradient after the step);
    - ``grad_norm``: :math:`\lVert g(w) \rVert_2`.
    """

    step_sizes: np.ndarray
    loss: np.ndarray
    grad_change: np.ndarray
    loss0: float
    grad_norm: float

    @property
    def loss_range(self) -> tuple[float, float]:
        """``(min, max)`` of the loss over the step sizes: the "variation of the loss"."""
        return float(self.loss.min()), float(self.loss.max())

    @property
    def beta(self) -> float:
        r"""Effective :math:`\beta_{\mathrm{sm}}`-smoothness
        :math:`\max_{\eta > 0} \lVert g(w - \eta g) - g(w) \rVert / (\eta \lVert g \rVert)`
        (the property is named ``beta``; it is not BN's shift :math:`\beta`).

        For a quadratic loss with Hessian ``H`` this is :math:`\lVert H g \rVert / \lVert g \rVert`
        for every ``eta``: at most the largest absolute eigenvalue of ``H``
        (a direction of negative curvature counts too), equal to it when ``g``
        is an eigenvector of that eigenvalue. NaN when ``g = 0`` or no ``eta > 0``.
        """
        pos = self.step_sizes > 0
        if not pos.any() or self.grad_norm == 0:
            return float("nan")
        return float(np.max(self.grad_change[pos] / (self.step_sizes[pos] * self.grad_norm)))


def loss_landscape_along_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    step_sizes: Sequence[float],
    loss_fn: _LossFn = F.cross_entropy,
) -> Landscape:
    r"""The loss and the gradient at ``w - eta * g`` for every ``eta`` in ``step_sizes``.

    ``w`` is the vector of all the model's parameters, ``g`` the gradient of
    ``loss_fn(model(x), y)`` at ``w``, both in training mode (BN uses the
    statistics of ``x``). For each ``eta >= 0``, the parameters are moved to
    ``w - eta g`` and the loss and the gradient there are computed on the
    same batch; every forward pass starts from the same buffers. See
    :class:`Landscape` for what is returned. The model is left as it was
    (only ``.grad`` is cleared).
    """
    _check_xy(x, y)
    etas = np.asarray(step_sizes, dtype=np.float64).ravel()
    if etas.size == 0 or not np.all(np.isfinite(etas)) or np.any(etas < 0):
        raise ValueError(f"step_sizes must be a non-empty sequence of finite numbers >= 0, got {step_sizes!r}")
    losses, changes = [], []
    with _preserved(model, train=True):
        buffers = [b.detach().clone() for b in model.buffers()]
        params = list(model.parameters())
        start = [p.detach().clone() for p in params]
        loss0, g = _grads(model, x, y, loss_fn)
        g_flat = torch.cat([t.double().flatten() for t in g])
        for eta in etas:
            with torch.no_grad():
                for p, s, gp in zip(params, start, g):
                    p.copy_(s - float(eta) * gp)
            _restore_buffers(model, buffers)
            loss, g_eta = _grads(model, x, y, loss_fn)
            losses.append(loss)
            changes.append(float((torch.cat([t.double().flatten() for t in g_eta]) - g_flat).norm()))
    return Landscape(etas, np.array(losses), np.array(changes), loss0, float(g_flat.norm()))


# --------------------------------------------------------------------------
# A plane through the parameters (Li et al. 2018)
# --------------------------------------------------------------------------


def _filter_norms(t: torch.Tensor) -> torch.Tensor:
    """The norm of each filter ``t[i]``, shaped to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view((-1,) + (1,) * (t.dim() - 1))


def filter_normalized_direction(model: nn.Module, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    r"""A random direction in parameter space, filter-normalized as in Li et al. (2018).

    One tensor per parameter of ``model`` (in ``model.parameters()`` order).
    For a weight with two or more dimensions, each *filter* (each slice
    ``d[k]`` along the first axis: the incoming weights of one unit, or one
    convolution filter) is drawn from a standard normal and rescaled to the
    norm of the same filter of the parameter,

    .. math::

        d_k \leftarrow \frac{d_k}{\lVert d_k \rVert}\, \lVert \theta_k \rVert,

    so that a step of length 1 along ``d`` changes every unit's weights by
    their own size. A network with BN computes the same function when the
    weights feeding a BN layer are scaled; without this rescaling, a fixed
    step would mean little on large weights and much on small ones. Biases,
    BN's gamma and beta, and every other one-dimensional parameter get
    direction 0, as in the paper. ``generator`` (a CPU ``torch.Generator``)
    makes the draw reproducible; the result has each parameter's dtype and
    device.
    """
    directions = []
    for p in model.parameters():
        if p.dim() <= 1:
            directions.append(torch.zeros_like(p))
            continue
        d = torch.randn(p.shape, generator=generator, dtype=torch.float64)
        w = p.detach().to(device="cpu", dtype=torch.float64)
        directions.append((d / _filter_norms(d) * _filter_norms(w)).to(device=p.device, dtype=p.dtype))
    return directions


def filter_norm_growth(
    model: nn.Module, directions: Sequence[Sequence[torch.Tensor]], a: float, b: float
) -> np.ndarray:
    r"""How much a step ``(a, b)`` on the plane lengthens the filters: one factor per weight, shape ``(n_weights,)``.

    For every parameter with two or more dimensions (in ``model.parameters()``
    order), the mean over its filters ``k`` of

    .. math::

        \frac{\lVert \theta_k + a\, d_{1,k} + b\, d_{2,k} \rVert}{\lVert \theta_k \rVert}.

    With filter-normalized directions (:func:`filter_normalized_direction`,
    :math:`\lVert d_{1,k} \rVert = \lVert d_{2,k} \rVert = \lVert \theta_k \rVert`)
    that are orthogonal to :math:`\theta_k` and to each other, every factor is
    :math:`\sqrt{1 + a^2 + b^2}`; random directions in many dimensions are
    nearly orthogonal, so it is close to that. Multiplying all :math:`L`
    weights of a network without normalization by :math:`c` multiplies its
    output by :math:`c^L` (exactly for ReLU without biases), so the product
    of these factors estimates how much the step scales such a network's
    output; a weight that feeds BN does not scale it. A filter that is zero
    in ``theta`` has no ratio and is left out of the mean.
    """
    params = list(model.parameters())
    _check_directions(params, directions)
    if not all(isinstance(t, numbers.Real) and math.isfinite(t) for t in (a, b)):
        raise ValueError(f"a and b must be finite numbers, got {a!r} and {b!r}")
    factors = []
    with torch.no_grad():
        for p, u, v in zip(params, *directions):
            if p.dim() >= 2:
                norm = _filter_norms(p).flatten()
                moved = _filter_norms(p + float(a) * u + float(b) * v).flatten()
                # a zero filter has no ratio: the mean is over the others
                factors.append(float((moved / norm)[norm > 0].double().mean()))
    return np.array(factors)


def _check_directions(params: list[torch.Tensor], directions: Sequence[Sequence[torch.Tensor]]) -> None:
    if len(directions) != 2 or any(len(d) != len(params) for d in directions):
        raise ValueError(f"directions must be two lists of {len(params)} tensors (one per parameter), "
                         f"got {len(directions)} lists of lengths {[len(d) for d in directions]}")
    for d in directions:
        for p, t in zip(params, d):
            if tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"a direction tensor must have its parameter's shape {tuple(p.shape)}, "
                                 f"got {tuple(t.shape)}")


def loss_surface(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    directions: Sequence[Sequence[torch.Tensor]],
    alphas: Sequence[float],
    betas: Sequence[float],
    loss_fn: _LossFn = F.cross_entropy,
    *,
    keep_filter_norms: bool = False,
) -> np.ndarray:
    r"""The loss on a plane through the parameters: ``S[j, i] = L(theta + alphas[i] d1 + betas[j] d2)``.

    ``directions = (d1, d2)``, each a list with one tensor per parameter (see
    :func:`filter_normalized_direction`); ``theta`` is the model's current
    parameters. The loss is ``loss_fn(model(x), y)`` in training mode (BN
    uses the statistics of ``x``, as in training), every forward pass from
    the same buffers. Rows follow ``betas`` and columns ``alphas``, the layout
    ``matplotlib``'s ``contour(alphas, betas, S)`` expects. The model is left
    as it was (only ``.grad`` is cleared).

    ``keep_filter_norms=True`` evaluates every point with each filter of
    every weight of two or more dimensions rescaled to its norm in ``theta``,

    .. math::

        w_k = \frac{\theta_k + a\, d_{1,k} + b\, d_{2,k}}
                   {\lVert \theta_k + a\, d_{1,k} + b\, d_{2,k} \rVert}\,
              \lVert \theta_k \rVert ,

    so the plane is bent onto the parameters with ``theta``'s filter norms
    and only the filters' directions change. A weight that feeds BN gives
    the same loss either way (BN is scale invariant in it, up to ``eps``);
    for a network without normalization this removes the growth of the
    norms along the plane (:func:`filter_norm_growth`), which its layers
    multiply.
    """
    _check_xy(x, y)
    params = list(model.parameters())
    _check_directions(params, directions)
    grid_a = np.asarray(alphas, dtype=np.float64).ravel()
    grid_b = np.asarray(betas, dtype=np.float64).ravel()
    if grid_a.size == 0 or grid_b.size == 0 or not (np.all(np.isfinite(grid_a)) and np.all(np.isfinite(grid_b))):
        raise ValueError(f"alphas and betas must be non-empty sequences of finite numbers, got {alphas!r} and {betas!r}")
    surface = np.empty((grid_b.size, grid_a.size))
    with _preserved(model, train=True), torch.no_grad():
        buffers = [b.detach().clone() for b in model.buffers()]
        start = [p.detach().clone() for p in params]
        for j, b in enumerate(grid_b):
            for i, a in enumerate(grid_a):
                for p, s, u, v in zip(params, start, *directions):
                    w = s + float(a) * u + float(b) * v
                    if keep_filter_norms and p.dim() >= 2:
                        norm = _filter_norms(w)
                        # a zero filter (of theta, with direction 0) stays zero
                        w = w * torch.where(norm > 0, _filter_norms(s) / norm, 1.0)
                    p.copy_(w)
                _restore_buffers(model, buffers)
                surface[j, i] = float(loss_fn(model(x), y))
    return surface


def negative_curvature_mask(surface: np.ndarray, alphas: Sequence[float], betas: Sequence[float],
                            ratio: float = 0.1) -> np.ndarray:
    r"""Where a loss surface curves down markedly: a bool array of its inner grid points.

    ``surface`` has rows along ``betas`` and columns along ``alphas``, both
    increasing and evenly spaced (as :func:`loss_surface` returns it). At every
    inner point (all but the border, so the result is
    ``(len(betas) - 2, len(alphas) - 2)``), the 2x2 Hessian of the slice is
    estimated with central differences, and the point is ``True`` when its
    smaller eigenvalue is negative and at least ``ratio`` times the larger one
    in absolute value, :math:`\lambda_{\min} < 0` and
    :math:`|\lambda_{\min}| \ge \text{ratio}\,|\lambda_{\max}|`: the slice is
    markedly non-convex there. Li et al. (2018) map
    :math:`|\lambda_{\min} / \lambda_{\max}|` of the full Hessian; this is the
    same idea on the plane. A convex surface is ``False`` everywhere; a cap,
    and a saddle whose downward curvature is at least ``ratio`` times its
    upward one, are ``True`` everywhere.
    """
    s = np.asarray(surface, dtype=np.float64)
    a = np.asarray(alphas, dtype=np.float64).ravel()
    b = np.asarray(betas, dtype=np.float64).ravel()
    if s.ndim != 2 or s.shape != (b.size, a.size) or min(s.shape) < 3:
        raise ValueError(f"surface must be (len(betas), len(alphas)) with both >= 3, got {s.shape} "
                         f"for {b.size} betas and {a.size} alphas")
    ha, hb = np.diff(a), np.diff(b)
    if not (np.allclose(ha, ha[0], rtol=1e-6, atol=0) and np.allclose(hb, hb[0], rtol=1e-6, atol=0) and ha[0] > 0 and hb[0] > 0):
        raise ValueError("alphas and betas must be increasing and evenly spaced")
    ha, hb = ha[0], hb[0]
    s_aa = (s[1:-1, 2:] - 2 * s[1:-1, 1:-1] + s[1:-1, :-2]) / ha**2
    s_bb = (s[2:, 1:-1] - 2 * s[1:-1, 1:-1] + s[:-2, 1:-1]) / hb**2
    s_ab = (s[2:, 2:] - s[2:, :-2] - s[:-2, 2:] + s[:-2, :-2]) / (4 * ha * hb)
    half_trace = (s_aa + s_bb) / 2
    root = np.sqrt(np.maximum(half_trace**2 - (s_aa * s_bb - s_ab**2), 0.0))
    lam_min, lam_max = half_trace - root, half_trace + root
    return (lam_min < 0) & (np.abs(lam_min) >= ratio * np.abs(lam_max))


def negative_curvature_fraction(surface: np.ndarray, alphas: Sequence[float], betas: Sequence[float],
                                ratio: float = 0.1) -> float:
    """The fraction of the inner grid points where :func:`negative_curvature_mask` is ``True``."""
    return float(np.mean(negative_curvature_mask(surface, alphas, betas, ratio)))


# --------------------------------------------------------------------------
# Scale invariance
# --------------------------------------------------------------------------


def linear_bn(x: torch.Tensor, W: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    r"""``BN(x W^T)`` in training mode with ``gamma = 1``, ``beta = 0``: ``x`` ``(N, d)``, ``W`` ``(C, d)`` -> ``(N, C)``.

    Uses :func:`bnlib.functional.batch_norm` (no running statistics).
    """
    return bnF.batch_norm(x @ W.T, None, None, training=True, eps=eps)


@dataclass
class ScaleCheck:
    r"""Result of :func:`scale_invariance` for one factor ``a``.

    - ``output_diff``: :math:`\max |\mathrm{BN}(x (aW)^T) - \mathrm{BN}(x W^T)|`;
    - ``grad_ratio``: :math:`\lVert \nabla L(W) \rVert / \lVert \nabla L(aW) \rVert` (``a`` in theory);
    - ``grad_cosine``: the cosine between the two gradients (1 in theory);
    - ``grad_dot_w``: :math:`\langle \nabla L(aW), aW \rangle / (\lVert \nabla L(aW) \rVert \lVert aW \rVert)`
      (0 in theory: the gradient is orthogonal to the weights).
    """

    a: float
    output_diff: float
    grad_ratio: float
    grad_cosine: float
    grad_dot_w: float


def _default_loss(out: torch.Tensor) -> torch.Tensor:
    """A fixed smooth loss of BN's output: ``sum(sin(out))`` (any loss that is not constant would do)."""
    return out.sin().sum()


def scale_invariance(
    x: torch.Tensor,
    W: torch.Tensor,
    a: float,
    loss: Callable[[torch.Tensor], torch.Tensor] = _default_loss,
    eps: float = 1e-5,
) -> ScaleCheck:
    r"""Check :math:`\mathrm{BN}(aWx) = \mathrm{BN}(Wx)` and :math:`\nabla L(aW) = \nabla L(W) / a` for one ``a > 0``.

    With :math:`z = x W^T`, multiplying ``W`` by ``a`` multiplies the batch
    mean by ``a`` and the variance by :math:`a^2`, so
    :math:`(az - a\mu)/\sqrt{a^2 \mathrm{var} + \epsilon} = (z - \mu)/\sqrt{\mathrm{var} + \epsilon/a^2}`:
    the same up to ``eps``. Differentiating :math:`L(aW) = L(W)` with respect
    to ``W`` gives :math:`a \nabla L(aW) = \nabla L(W)`. ``loss`` maps BN's
    output to a scalar. Shapes as in :func:`linear_bn`.
    """
    if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
        raise ValueError(f"a must be a finite number > 0, got {a!r}")
    W1 = W.detach().clone().requires_grad_(True)
    Wa = (a * W.detach()).clone().requires_grad_(True)
    out1, outa = linear_bn(x, W1, eps), linear_bn(x, Wa, eps)
    g1 = torch.autograd.grad(loss(out1), W1)[0].double().flatten()
    ga = torch.autograd.grad(loss(outa), Wa)[0].double().flatten()
    wa = Wa.detach().double().flatten()
    return ScaleCheck(
        a=float(a),
        output_diff=float((out1 - outa).detach().abs().max()),
        grad_ratio=float(g1.norm() / ga.norm()),
        grad_cosine=float(g1 @ ga / (g1.norm() * ga.norm())),
        grad_dot_w=float(ga @ wa / (ga.norm() * wa.norm())),
    )


def weight_norms(model: nn.Module, kind: str = "fc") -> np.ndarray:
    """Frobenius norms :math:`\\lVert W^{[l]} \\rVert` of the hidden layers of ``models.get_layers(model, kind)``, shape ``(n_layers,)``."""
    from bnlib.models import get_layers

    return np.array([float(m.weight.detach().double().norm()) for m in get_layers(model, kind)])


def effective_lr(model: nn.Module, lr: float, kind: str = "fc") -> np.ndarray:
    r"""The effective learning rate :math:`\text{lr} / \lVert W^{[l]} \rVert^2` of every hidden layer, shape ``(n_layers,)``.

    For weights that feed BN the loss depends only on the direction
    :math:`\hat W = W / \lVert W \rVert`, and an SGD step of size ``lr`` moves
    that direction as a step of size :math:`\text{lr} / \lVert W \rVert^2`
    would move a weight of norm 1 (van Laarhoven 2017; Hoffer et al. 2018).
    """
    return lr / weight_norms(model, kind) ** 2


class WeightNorms:
    r"""Training callback: the norm of each hidden layer's weights, and how far its direction turns.

    ``WeightNorms(every=1)`` called as ``rec(step, model)`` stores, every
    ``every`` steps, ``steps`` (list), ``norms`` (list of ``(n_layers,)``
    arrays, :func:`weight_norms`) and ``angles``: the angle in radians
    between :math:`W^{[l]}` now and at the previous record (NaN at the first
    record), the step the direction :math:`W / \lVert W \rVert` actually took.
    Use ``np.array(rec.norms)``, shape ``(n_records, n_layers)``.
    """

    def __init__(self, every: int = 1, kind: str = "fc"):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every = every
        self.kind = kind
        self.steps: list[int] = []
        self.norms: list[np.ndarray] = []
        self.angles: list[np.ndarray] = []
        self._last: list[torch.Tensor] | None = None

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every:
            return
        from bnlib.models import get_layers

        ws = [m.weight.detach().double().flatten().clone() for m in get_layers(model, self.kind)]
        if self._last is None:
            angles = np.full(len(ws), np.nan)
        else:
            angles = np.array([
                math.acos(max(-1.0, min(1.0, float(a @ b / (a.norm() * b.norm())))))
                for a, b in zip(self._last, ws)
            ])
        self._last = ws
        self.steps.append(step)
        self.norms.append(np.array([float(w.norm()) for w in ws]))
        self.angles.append(angles)


# --------------------------------------------------------------------------
# Measuring during training
# --------------------------------------------------------------------------


class Probe:
    """Training callback that evaluates named measurements every ``every`` steps.

    ``Probe(every=20, acc=lambda m: ..., ics=lambda m: ...)`` called as
    ``probe(step, model)`` appends ``step`` to ``probe.steps`` and
    ``fn(model)`` to ``probe.values[name]`` for each measurement. The
    measurements must leave the model as they found it (those of this
    module do), or they change training.
    """

    def __init__(self, every: int = 1, **measurements: Callable[[nn.Module], object]):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if not measurements:
            raise ValueError("give at least one measurement, e.g. Probe(10, loss=fn)")
        self.every = every
        self.measurements = measurements
        self.steps: list[int] = []
        self.values: dict[str, list] = {name: [] for name in measurements}

    def __call__(self, step: int, model: nn.Module) -> None:
        if step % self.every:
            return
        self.steps.append(step)
        for name, fn in self.measurements.items():
            self.values[name].append(fn(model))
