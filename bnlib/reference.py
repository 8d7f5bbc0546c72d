r"""Batch Normalization in NumPy: the math on the page.

For an input ``x`` of shape ``(N, C, *spatial)`` the statistics of channel
``c`` are taken over every axis except 1, i.e. over the
``m = N * prod(spatial)`` values that channel holds in the mini-batch:

.. math::

    \mu = \frac{1}{m} \sum_i x_i, \qquad
    \mathrm{var} = \frac{1}{m} \sum_i (x_i - \mu)^2,

    \hat{x}_i = \frac{x_i - \mu}{\sqrt{\mathrm{var} + \epsilon}}, \qquad
    y_i = \gamma \hat{x}_i + \beta.

The names in the code are the book's: ``mu``, ``var``, ``x_hat``, ``gamma``,
``beta``, ``eps``, ``momentum``. float64 is the reference precision; float32
is accepted (float16 is computed in float32). This module never imports torch.

Conditional batch norm (de Vries et al. 2017) makes ``gamma`` and ``beta``
depend on a condition; for a class label, as here, through tables of shape
``(K, C)`` (Dumoulin et al. 2017), and sample ``i`` is scaled and shifted by
the row of its label ``k_i``,
``y_i = gamma[k_i] * x_hat_i + beta[k_i]``. The normalization is batch
norm's with ``gamma = 1, beta = 0``, and so is its backward
(:func:`conditional_batchnorm_forward`, :func:`conditional_batchnorm_backward`).
"""

from dataclasses import dataclass

import numpy as np

from bnlib._checks import (
    InputError,
    check_batch_size,
    check_dy_shape,
    check_input_dims,
    check_labels,
    check_norm_args,
    check_num_channels,
    check_positive_finite,
    check_real_array,
    values_per_channel,
)

__all__ = ["batchnorm_forward", "batchnorm_backward", "BatchNorm", "BatchNormCache",
           "conditional_batchnorm_forward", "conditional_batchnorm_backward", "ConditionalCache"]


def _stat_axes(x):
    """Every axis except the channel axis 1: (0, 2, 3, ...)."""
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v, ndim):
    """Reshape a per-channel vector (C,) to (1, C, 1, ...) so it broadcasts."""
    return np.reshape(v, (1, -1) + (1,) * (ndim - 2))


def gradient_array(caller, dy, dtype, expected_shape):
    """``dy`` as an array of ``dtype``: real numbers in the shape of the
    forward's input, or an ``InputError`` naming ``caller``. (Cast straight
    to float, a complex ``dy`` would lose its imaginary part with only a
    warning, and a boolean one pass as 0 and 1.)"""
    dy = np.asarray(dy)
    check_real_array(caller, dy.dtype)
    check_dy_shape(caller, dy.shape, expected_shape)
    return dy.astype(dtype, copy=False)


def _compute_dtype(x):
    return np.result_type(x.dtype, np.float32)


@dataclass
class BatchNormCache:
    """What the backward pass needs from the forward pass."""

    x_hat: np.ndarray  # normalized input, same shape as x
    gamma: np.ndarray  # (C,), ones when the layer has no scale
    invstd: np.ndarray  # (C,), 1 / sqrt(var + eps)
    has_gamma: bool
    has_beta: bool
    mu: np.ndarray = None  # (C,) batch mean (None in eval mode)
    var: np.ndarray = None  # (C,) biased batch variance (None in eval mode)
    eval_mode: bool = False  # statistics were the running estimates (constants)


def batchnorm_forward(x, gamma, beta, eps=1e-5):
    """Training-mode batch norm with the statistics of this batch.

    Args:
        x: array ``(N, C, *spatial)``, 2 to 5 dims.
        gamma, beta: arrays ``(C,)``, or ``None`` for no scale / no shift.
        eps: added to the variance before the square root.

    Returns:
        ``(y, cache)``: ``y = gamma * x_hat + beta`` with the shape of ``x``,
        and the :class:`BatchNormCache` for :func:`batchnorm_backward`.
        ``cache.mu`` and ``cache.var`` are the batch statistics (biased var).

    One value per channel (``m = 1``) is computed, not refused: ``x_hat = 0``,
    ``y = beta`` and ``dx = 0``, the math an exercise of chapter 4 shows. The
    :class:`BatchNorm` layer refuses it in training, as torch does.
    """
    check_positive_finite("eps", eps)
    x = np.asarray(x)
    check_real_array("batchnorm_forward", x.dtype)
    if x.ndim < 2:
        raise InputError(f"batchnorm_forward expected an input with at least 2 dimensions (N, C, ...), got shape {x.shape}")
    for name, param in (("gamma", gamma), ("beta", beta)):
        if param is not None and np.shape(param) != (x.shape[1],):
            raise InputError(f"{name} should have shape ({x.shape[1]},), one value per channel, got {np.shape(param)}")
        if param is not None:  # (a complex gamma lost its imaginary part, a string one was parsed)
            check_real_array(f"batchnorm_forward's {name}", np.asarray(param).dtype)
    dtype = _compute_dtype(x)
    x = x.astype(dtype, copy=False)
    axes = _stat_axes(x)
    num_channels = x.shape[1]
    if values_per_channel(x.shape) == 0:
        # An empty batch has no statistics: NaN, which never reaches the
        # running estimates (see BatchNorm._update_running_stats).
        mu = np.full(num_channels, np.nan, dtype)
        var = np.full(num_channels, np.nan, dtype)
        gamma_vec = np.ones(num_channels, dtype) if gamma is None else np.array(gamma, dtype)
        cache = BatchNormCache(x.copy(), gamma_vec, np.full(num_channels, np.nan, dtype),
                               gamma is not None, beta is not None, mu, var)
        return x.copy(), cache

    mu = x.mean(axis=axes)
    # The mean's rounding error, measured and removed: without it a constant
    # float32 channel of 10000.1 gives x_hat = 0.3 (the error over sqrt(eps)),
    # not 0.
    mu = mu + (x - _per_channel(mu, x.ndim)).mean(axis=axes)
    # Two passes: subtract the mean first, then average the squares. The
    # one-pass E[x^2] - E[x]^2 cancels catastrophically when |mu| >> std.
    x_centered = x - _per_channel(mu, x.ndim)
    var = np.mean(x_centered * x_centered, axis=axes)
    invstd = 1.0 / np.sqrt(var + eps)
    x_hat = x_centered * _per_channel(invstd, x.ndim)

    # a copy: the backward must not see a later in-place change of gamma
    gamma_vec = np.ones(num_channels, dtype) if gamma is None else np.array(gamma, dtype)
    y = x_hat * _per_channel(gamma_vec, x.ndim)
    if beta is not None:
        y = y + _per_channel(np.asarray(beta, dtype), x.ndim)

    cache = BatchNormCache(x_hat, gamma_vec, invstd, gamma is not None, beta is not None, mu, var)
    return y, cache


def batchnorm_backward(dy, cache):
    r"""Gradients of training-mode batch norm: ``(dx, dgamma, dbeta)``.

    With ``m`` values per channel, the chain rule through ``mu`` and ``var``
    collapses to the compact formula (derived in the chapter "The Batch
    Normalization algorithm"):

    .. math::

        \frac{\partial L}{\partial \beta} = \sum_i dy_i, \qquad
        \frac{\partial L}{\partial \gamma} = \sum_i dy_i \hat{x}_i,

        dx_i = \frac{\gamma}{m \sqrt{\mathrm{var} + \epsilon}}
               \Big(m\, dy_i - \sum_j dy_j - \hat{x}_i \sum_j dy_j \hat{x}_j\Big).

    ``dgamma`` / ``dbeta`` are ``None`` when the forward had no gamma / beta.
    """
    dy = gradient_array("batchnorm_backward", dy, cache.x_hat.dtype, cache.x_hat.shape)
    x_hat = cache.x_hat
    ndim = x_hat.ndim
    axes = _stat_axes(x_hat)
    m = values_per_channel(x_hat.shape)

    sum_dy = dy.sum(axis=axes)
    sum_dy_x_hat = (dy * x_hat).sum(axis=axes)
    if m == 0:
        dx = np.zeros_like(x_hat)
    else:
        scale = _per_channel(cache.gamma * cache.invstd / m, ndim)
        dx = scale * (m * dy - _per_channel(sum_dy, ndim) - x_hat * _per_channel(sum_dy_x_hat, ndim))
    dgamma = sum_dy_x_hat if cache.has_gamma else None
    dbeta = sum_dy if cache.has_beta else None
    return dx, dgamma, dbeta


class BatchNorm:
    """A batch-norm layer with running statistics, for inputs ``(N, C, *spatial)``.

    Training mode normalizes with the batch statistics and updates the running
    estimates (PyTorch's convention):

        ``running = (1 - momentum) * running + momentum * batch``

    where the batch variance in the running estimate is the unbiased one,
    ``var * m / (m - 1)``; ``momentum=None`` uses the cumulative average
    (factor ``1 / num_batches_tracked``). Eval mode normalizes with the
    running estimates. A channel whose batch statistics are not finite (NaN
    or Inf in the batch) leaves its running estimates unchanged.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        check_norm_args(num_features, eps, momentum)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.gamma = np.ones(num_features) if affine else None
        self.beta = np.zeros(num_features) if affine else None
        self.dgamma = None
        self.dbeta = None
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0
        else:
            self.running_mean = None
            self.running_var = None
            self.num_batches_tracked = None
        self.training = True
        self._cache = None

    def train(self, mode=True):
        if not isinstance(mode, (bool, np.bool_)):  # bool("False") is True
            raise ValueError(f"training mode is expected to be boolean, got {mode!r}")
        self.training = bool(mode)
        return self

    def eval(self):
        return self.train(False)

    def _check_input(self, x):
        check_real_array(type(self).__name__, x.dtype)
        check_input_dims(type(self).__name__, x.shape, (2, 3, 4, 5))
        check_num_channels(type(self).__name__, x.shape, self.num_features)
        if self.training or not self.track_running_stats:  # batch statistics
            check_batch_size(x.shape)

    def forward(self, x):
        x = np.asarray(x)
        self._check_input(x)
        use_batch_stats = self.training or not self.track_running_stats
        if use_batch_stats:
            with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
                y, cache = batchnorm_forward(x, self.gamma, self.beta, self.eps)
            if self.training and self.track_running_stats:
                self._update_running_stats(cache.mu, cache.var, values_per_channel(x.shape))
        else:
            y, cache = self._forward_with_running_stats(x)
        self._cache = cache
        return y

    __call__ = forward

    def _update_running_stats(self, mu, var, m):
        self.num_batches_tracked += 1
        factor = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
        unbiased_var = var * m / max(m - 1, 1)
        finite = np.isfinite(mu) & np.isfinite(unbiased_var)
        new_mean = (1 - factor) * self.running_mean + factor * mu
        new_var = (1 - factor) * self.running_var + factor * unbiased_var
        self.running_mean = np.where(finite, new_mean, self.running_mean)
        self.running_var = np.where(finite, new_var, self.running_var)

    def _forward_with_running_stats(self, x):
        """Eval mode: ``x_hat = (x - running_mean) / sqrt(running_var + eps)``."""
        dtype = _compute_dtype(x)
        x = x.astype(dtype, copy=False)
        # (in the input's precision, as training: the float64 estimates would
        # make the output and gradients of a float32 input float64)
        invstd = (1.0 / np.sqrt(self.running_var + self.eps)).astype(dtype)
        x_hat = (x - _per_channel(self.running_mean.astype(dtype), x.ndim)) * _per_channel(invstd, x.ndim)
        # a copy, as in training: the backward must not see a later in-place change
        gamma = np.ones(self.num_features, dtype) if self.gamma is None else np.array(self.gamma, dtype)
        y = x_hat * _per_channel(gamma, x.ndim)
        if self.beta is not None:
            y = y + _per_channel(np.asarray(self.beta, dtype), x.ndim)
        cache = BatchNormCache(x_hat, gamma, invstd, self.gamma is not None, self.beta is not None, eval_mode=True)
        return y.astype(dtype, copy=False), cache

    def backward(self, dy):
        """Gradient of the last forward; sets ``self.dgamma`` and ``self.dbeta``."""
        if self._cache is None:
            raise ValueError("backward() called before forward()")
        cache = self._cache
        if cache.eval_mode:
            # The statistics are constants: y is an affine map of x.
            dy = gradient_array("BatchNorm.backward", dy, cache.x_hat.dtype, cache.x_hat.shape)
            axes = _stat_axes(cache.x_hat)
            dx = dy * _per_channel(cache.gamma * cache.invstd, dy.ndim)
            dgamma = (dy * cache.x_hat).sum(axis=axes) if cache.has_gamma else None
            dbeta = dy.sum(axis=axes) if cache.has_beta else None
        else:
            dx, dgamma, dbeta = batchnorm_backward(dy, cache)
        self.dgamma, self.dbeta = dgamma, dbeta
        return dx


# --------------------------------------------------------------------------
# Conditional batch norm: one gamma and one beta per class
# --------------------------------------------------------------------------


@dataclass
class ConditionalCache:
    """What :func:`conditional_batchnorm_backward` needs: the cache of the
    plain batch norm (``gamma = 1, beta = 0``), the labels, the gamma table."""

    bn_cache: BatchNormCache
    labels: np.ndarray
    gamma: np.ndarray  # (K, C)


def _per_sample(table, labels, ndim):
    """``table[labels]``, shape ``(N, C)``, viewed as ``(N, C, 1, ...)`` to meet an ``ndim``-dim input."""
    rows = table[labels]
    return rows.reshape(rows.shape + (1,) * (ndim - 2))


def conditional_batchnorm_forward(x, labels, gamma, beta, eps=1e-5):
    r"""Training-mode conditional batch norm with a row of ``gamma`` and ``beta`` per class.

    .. math::

        \hat{x}_i = \frac{x_i - \mu}{\sqrt{\mathrm{var} + \epsilon}}, \qquad
        y_i = \gamma_{k_i} \hat{x}_i + \beta_{k_i},

    with ``mu`` and ``var`` batch norm's per-channel statistics over the
    whole batch, every class together, and ``k_i = labels[i]``.

    Args:
        x: array ``(N, C, *spatial)``, 2 to 5 dims.
        labels: integers ``(N,)`` in ``[0, K)``, one class per sample.
        gamma, beta: arrays ``(K, C)``, a row of scales and shifts per class.

    Returns ``(y, cache)``, ``y`` with the shape of ``x``.
    """
    x, labels = np.asarray(x), np.asarray(labels)
    gamma, beta = np.asarray(gamma), np.asarray(beta)
    if x.ndim < 2:
        raise InputError("conditional_batchnorm_forward expected an input with at least 2 dimensions "
                         f"(N, C, ...), got shape {x.shape}")
    if gamma.ndim != 2 or gamma.shape[1] != x.shape[1] or beta.shape != gamma.shape:
        raise InputError(f"gamma and beta should both have shape (K, {x.shape[1]}), a row per class, "
                         f"got {gamma.shape} and {beta.shape}")
    integer = np.issubdtype(labels.dtype, np.integer)
    seen = integer and labels.size > 0
    check_labels("conditional_batchnorm_forward", labels.shape, integer, x.shape[0],
                 labels.min() if seen else None, labels.max() if seen else None, gamma.shape[0])
    x_hat, bn_cache = batchnorm_forward(x, None, None, eps)
    gamma, beta = gamma.astype(x_hat.dtype), beta.astype(x_hat.dtype)
    y = _per_sample(gamma, labels, x.ndim) * x_hat + _per_sample(beta, labels, x.ndim)
    return y, ConditionalCache(bn_cache, labels, gamma)


def conditional_batchnorm_backward(dy, cache):
    r"""Gradients of :func:`conditional_batchnorm_forward`: ``(dx, dgamma, dbeta)``.

    Class ``k``'s rows of the tables collect the gradients of its own samples:

    .. math::

        \frac{\partial L}{\partial \gamma_k} = \sum_{i:\, k_i = k} \sum_{s} dy_{is}\, \hat{x}_{is}, \qquad
        \frac{\partial L}{\partial \beta_k} = \sum_{i:\, k_i = k} \sum_{s} dy_{is}

    (``s`` runs over the spatial positions), and ``dx`` is batch norm's
    compact formula applied to ``gamma[k_i] * dy_i``: through the shared
    statistics every sample's gradient still reaches every other's.
    """
    x_hat = cache.bn_cache.x_hat
    dy = gradient_array("conditional_batchnorm_backward", dy, x_hat.dtype, x_hat.shape)
    spatial = tuple(range(2, dy.ndim))
    dgamma = np.zeros_like(cache.gamma)
    dbeta = np.zeros_like(cache.gamma)
    np.add.at(dgamma, cache.labels, (dy * x_hat).sum(axis=spatial))
    np.add.at(dbeta, cache.labels, dy.sum(axis=spatial))
    dx, _, _ = batchnorm_backward(dy * _per_sample(cache.gamma, cache.labels, dy.ndim), cache.bn_cache)
    return dx, dgamma, dbeta


from bnlib.reference_alternatives import *  # noqa: E402,F401,F403
