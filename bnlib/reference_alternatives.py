r"""The alternatives to batch norm in NumPy: layer, group, instance and RMS norm,
weight standardization, batch renorm.

Layer, group and instance norm differ from batch norm only in *which values
share a mean and a variance*. For an input ``x`` of shape ``(N, C, *spatial)``:

- layer norm: all the values of one sample, ``(C, *spatial)``;
- group norm: the values of one sample in one group of ``C // num_groups``
  consecutive channels;
- instance norm: the values of one sample in one channel, ``(*spatial)``.

None of them looks at the other samples of the batch, so train and test
compute the same thing. Each is "reshape ``x`` into rows, normalize every
row", with ``m`` values per row:

.. math::

    \mu = \frac{1}{m} \sum_i x_i, \qquad
    \mathrm{var} = \frac{1}{m} \sum_i (x_i - \mu)^2,

    \hat{x}_i = \frac{x_i - \mu}{\sqrt{\mathrm{var} + \epsilon}}, \qquad
    y_i = \gamma \hat{x}_i + \beta,

where ``gamma`` and ``beta`` are per channel (group, instance norm) or per
element of the normalized shape (layer norm, as in ``torch.nn.LayerNorm``).
The backward pass is batch norm's compact formula applied to each row (see
``_rows_backward``).

RMS norm (Zhang & Sennrich 2019) is layer norm without the centering: each
row is divided by its root mean square, ``rms = sqrt(mean(x^2) + eps)``, and
scaled by ``gamma`` (no ``beta``). Its backward is the compact formula without
the path through ``mu``.

Weight standardization (Qiao et al. 2019) applies the same row formula to a
layer's *weight*: each output unit's weights, a row of the weight matrix,
to mean 0 and variance 1.

Batch renormalization (Ioffe 2017) keeps batch norm's statistics but corrects
them towards the running estimates with two constants ``r`` and ``d``:

.. math::

    \hat{x} = \frac{x - \mu_B}{\sigma_B}\, r + d, \quad
    r = \mathrm{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
    d = \mathrm{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big),

with ``sigma_B = sqrt(var_B + eps)`` and, here, ``sigma = sqrt(running_var + eps)``.

Every ``<name>_forward`` returns ``(y, cache)``; every ``<name>_backward(dy,
cache)`` returns ``(dx, dgamma, dbeta)`` (``None`` for an absent parameter).
float64 is the reference precision; float32 is kept; float16 is computed in
float32. Variances are two-pass. This module never imports torch. Like
``bnlib.reference.batchnorm_forward``, the functions compute their formulas
for a group of one value too (``x_hat = 0``), where torch's functional forms
refuse it.
"""

from dataclasses import dataclass
from math import prod
from numbers import Real

import numpy as np

from bnlib._checks import check_positive_finite, check_real_array

__all__ = [
    "NormCache",
    "BatchRenormCache",
    "layernorm_forward",
    "layernorm_backward",
    "groupnorm_forward",
    "groupnorm_backward",
    "instancenorm_forward",
    "instancenorm_backward",
    "RMSNormCache",
    "rmsnorm_forward",
    "rmsnorm_backward",
    "FRNCache",
    "frn_forward",
    "frn_backward",
    "WeightStdCache",
    "weightstd_forward",
    "weightstd_backward",
    "batchrenorm_forward",
    "batchrenorm_backward",
]


def _as_compute(x):
    """NumPy's promotion with float32: float64 stays float64, float16, float32
    and integers of up to 16 bits become float32, int32 and int64 float64;
    complex, string, object or boolean arrays are refused (``InputError``)."""
    x = np.asarray(x)
    check_real_array("the NumPy reference", x.dtype)
    return x.astype(np.result_type(x.dtype, np.float32), copy=False)


def _param(name, value, shape, dtype):
    """``gamma``/``beta`` as an array of ``shape``, or ``None``; ValueError on a wrong shape.

    A copy, never the caller's array: the cache keeps it for the backward,
    which must not see a later in-place change (``gamma *= 2``)."""
    if value is None:
        return None
    # real numbers only: a complex value lost its imaginary part, a string was parsed
    check_real_array(name, np.asarray(value).dtype)
    value = np.array(value, dtype=dtype)
    if value.shape != tuple(shape):
        raise ValueError(f"{name} should have shape {tuple(shape)}, got {value.shape}")
    return value


def _normalize_rows(rows, eps):
    """Normalize the last axis of ``rows`` (shape ``(..., m)``), two-pass variance.

    Returns ``x_hat`` (shape of ``rows``), ``mu``, ``var`` (shape ``rows.shape[:-1]``)
    and ``invstd = 1 / sqrt(var + eps)`` (shape ``(..., 1)``, ready to broadcast).
    """
    mu = rows.mean(axis=-1, keepdims=True)
    # The mean's rounding error, measured and removed: without it a constant
    # float32 row of 10000.1 gives x_hat = 0.3 (the error over sqrt(eps)), not 0.
    mu = mu + (rows - mu).mean(axis=-1, keepdims=True)
    # Subtract the mean first, then average the squares: E[x^2] - E[x]^2
    # would cancel catastrophically when |mu| >> std.
    x_centered = rows - mu
    var = np.mean(x_centered * x_centered, axis=-1, keepdims=True)
    invstd = 1.0 / np.sqrt(var + eps)
    return x_centered * invstd, mu[..., 0], var[..., 0], invstd


def _rows_backward(dx_hat, x_hat, invstd):
    r"""``dx`` from ``dx_hat = dL/dx_hat`` for rows normalized by :func:`_normalize_rows`.

    Batch norm's compact formula, per row of ``m`` values:

    .. math::

        dx_i = \frac{1}{m \sqrt{\mathrm{var} + \epsilon}}
               \Big(m\, d\hat{x}_i - \sum_j d\hat{x}_j - \hat{x}_i \sum_j d\hat{x}_j \hat{x}_j\Big).

    The ``- sum`` term is the path through ``mu`` (``d mu / d x_i = 1/m``), the
    ``- x_hat * sum`` term the path through ``var``
    (``d var / d x_i = 2 (x_i - mu) / m``); ``gamma`` is already in ``dx_hat``.
    """
    mean_dx_hat = dx_hat.mean(axis=-1, keepdims=True)
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(axis=-1, keepdims=True)
    return invstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)


@dataclass
class NormCache:
    """What the backward pass of layer, group or instance norm needs."""

    x_hat: np.ndarray  # normalized input, shape of x
    invstd: np.ndarray  # 1 / sqrt(var + eps), shape row_shape[:-1] + (1,)
    gamma: np.ndarray  # gamma reshaped to broadcast against x, or None
    has_beta: bool
    row_shape: tuple  # x reshaped so that each row is one normalization group
    param_axes: tuple  # axes of x summed for dgamma / dbeta
    param_shape: tuple  # shape of gamma / beta
    mu: np.ndarray = None  # per-group mean, shape row_shape[:-1]
    var: np.ndarray = None  # per-group biased variance, shape row_shape[:-1]


def _grouped_forward(x, gamma, beta, eps, row_shape, param_view, param_axes, param_shape):
    """Normalize every row of ``x.reshape(row_shape)``, then ``y = gamma * x_hat + beta``."""
    rows = x.reshape(row_shape)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty row gives NaN, as the math says
        x_hat_rows, mu, var, invstd = _normalize_rows(rows, eps)
    x_hat = x_hat_rows.reshape(x.shape)
    gamma_b = None if gamma is None else gamma.reshape(param_view)
    y = x_hat.copy() if gamma_b is None else x_hat * gamma_b
    if beta is not None:
        y = y + beta.reshape(param_view)
    cache = NormCache(x_hat, invstd, gamma_b, beta is not None, row_shape, param_axes, param_shape, mu, var)
    return y, cache


def _grouped_backward(dy, cache, caller):
    dy = gradient_array(caller, dy, cache.x_hat.dtype, cache.x_hat.shape)
    dx_hat = dy if cache.gamma is None else dy * cache.gamma
    dx_rows = _rows_backward(dx_hat.reshape(cache.row_shape), cache.x_hat.reshape(cache.row_shape), cache.invstd)
    dx = dx_rows.reshape(cache.x_hat.shape)
    dgamma = None
    if cache.gamma is not None:
        dgamma = (dy * cache.x_hat).sum(axis=cache.param_axes).reshape(cache.param_shape)
    dbeta = dy.sum(axis=cache.param_axes).reshape(cache.param_shape) if cache.has_beta else None
    return dx, dgamma, dbeta


def _check_eps(eps):
    # numbers.Real: NumPy scalars too, as the BatchNorm class takes them
    check_positive_finite("eps", eps)


# --------------------------------------------------------------------------
# Layer norm
# --------------------------------------------------------------------------


def _is_shape(value):
    return isinstance(value, (int, np.integer)) or (
        isinstance(value, (tuple, list)) and all(isinstance(s, (int, np.integer)) for s in value)
    )


def _is_number(value):
    return isinstance(value, Real) and not isinstance(value, bool)


def _trailing_shape(x, gamma, normalized_shape):
    """The trailing axes that layer and RMS norm normalize over, as a tuple:
    ``normalized_shape`` (an int or a sequence), else ``gamma``'s shape, else
    ``x.shape[1:]``; ValueError when ``x`` does not end in that shape."""
    if normalized_shape is None:
        normalized_shape = np.shape(gamma) if gamma is not None else x.shape[1:]
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (normalized_shape,)
    normalized_shape = tuple(int(s) for s in normalized_shape)
    k = len(normalized_shape)
    if k == 0 or x.ndim < k or x.shape[x.ndim - k:] != normalized_shape:
        raise ValueError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size {list(x.shape)}"
        )
    return normalized_shape


def _list_read_as_gamma(x, values, normalized_shape):
    """Whether a list of ints in second place is this module's ``gamma``
    rather than torch's ``normalized_shape``: when ``normalized_shape`` comes
    by keyword, or when only the gamma reading fits ``x`` (as a gamma, its
    normalized shape is ``(len(values),)``). Where both fit, as ``[2, 2]``
    does for an ``(N, 2, 2)`` input, the two readings give different layers:
    a ``ValueError`` asks which."""
    if not isinstance(values, list):
        return False
    if normalized_shape is not None:
        return True
    shape, k = np.shape(x), len(values)
    fits_as_shape = 0 < k <= len(shape) and tuple(shape[len(shape) - k:]) == tuple(values)
    fits_as_gamma = len(shape) >= 1 and shape[-1] == k
    if fits_as_shape and fits_as_gamma and k > 1:
        raise ValueError(f"layernorm_forward: {values!r} in second place fits the input of shape {tuple(shape)} both "
                         "as torch's normalized_shape and as gamma; pass normalized_shape= by keyword, or gamma "
                         "as an array")
    return fits_as_gamma and not fits_as_shape


def layernorm_forward(x, gamma=None, beta=None, *more, eps=None, normalized_shape=None):
    r"""Layer norm: each sample normalized over its trailing ``normalized_shape`` axes.

    With ``normalized_shape = x.shape[k:]``, the statistics of sample
    ``x[i_0, ..., i_{k-1}]`` are taken over its ``m = prod(normalized_shape)``
    values (Ba et al. 2016); ``gamma`` and ``beta`` have shape
    ``normalized_shape`` (one per element, as in ``torch.nn.LayerNorm``).

    Args:
        x: array ``(*, *normalized_shape)``.
        gamma, beta: arrays of shape ``normalized_shape``, or ``None``.
        eps: added to the variance (None: 1e-5); by position after ``beta``, or by keyword.
        normalized_shape: the trailing shape to normalize over (by position after ``eps``, or by keyword). Default: the
            shape of ``gamma`` if given, else every axis but the first
            (``x.shape[1:]``, the layer norm of the GN paper's figure).
            torch's order ``layernorm_forward(x, normalized_shape, gamma, beta, eps)``
            is accepted too (an int, or a tuple or list of ints, in second
            place), with ``gamma`` and ``beta`` by position and ``eps`` by
            position or keyword.

    Returns:
        ``(y, cache)``; ``cache.mu`` and ``cache.var`` have shape ``x.shape[:-len(normalized_shape)]``.
    """
    if len(more) > 2:
        raise TypeError(f"layernorm_forward takes at most 5 positional arguments, got {3 + len(more)}")
    if _is_shape(gamma) and not _list_read_as_gamma(x, gamma, normalized_shape):
        # torch.nn.functional.layer_norm's order (x, normalized_shape, weight, bias, eps)
        if normalized_shape is not None:
            raise ValueError("layernorm_forward got normalized_shape twice: in torch's place "
                             f"(second) as {gamma!r} and by keyword as {normalized_shape!r}")
        normalized_shape, gamma, beta = gamma, beta, (more[0] if more else None)
        positional_eps = more[1:]
    else:  # this module's order (x, gamma, beta, eps, normalized_shape)
        positional_eps = more[:1]
        if len(more) == 2:
            if normalized_shape is not None:
                raise ValueError("layernorm_forward got normalized_shape twice: by position and by keyword")
            normalized_shape = more[1]
    if positional_eps:
        if eps is not None:
            raise ValueError(f"layernorm_forward got eps twice: {positional_eps[0]!r} by position and {eps!r} by keyword")
        eps = positional_eps[0]
    eps = 1e-5 if eps is None else eps
    _check_eps(eps)
    x = _as_compute(x)
    normalized_shape = _trailing_shape(x, gamma, normalized_shape)
    k = len(normalized_shape)
    gamma = _param("gamma", gamma, normalized_shape, x.dtype)
    beta = _param("beta", beta, normalized_shape, x.dtype)
    lead = x.shape[: x.ndim - k]
    row_shape = lead + (prod(normalized_shape),)
    param_axes = tuple(range(x.ndim - k))
    return _grouped_forward(x, gamma, beta, eps, row_shape, normalized_shape, param_axes, normalized_shape)


def layernorm_backward(dy, cache):
    """Gradients of :func:`layernorm_forward`: ``(dx, dgamma, dbeta)``.

    ``dx`` is the compact formula per sample with ``dx_hat = dy * gamma``;
    ``dgamma = sum(dy * x_hat)`` and ``dbeta = sum(dy)`` over the leading axes.
    """
    return _grouped_backward(dy, cache, "layernorm_backward")


# --------------------------------------------------------------------------
# Group norm and instance norm
# --------------------------------------------------------------------------


def _check_channels_first(name, x, min_ndim=2):
    if x.ndim < min_ndim:
        raise ValueError(f"{name} expected an input with at least {min_ndim} dimensions (N, C, ...), got {x.ndim}D input")


def groupnorm_forward(x, gamma=None, beta=None, num_groups=None, eps=1e-5):
    r"""Group norm: each sample's channels split into ``num_groups`` groups, each normalized.

    For ``x`` of shape ``(N, C, *spatial)``, group ``g`` of sample ``n`` is
    ``x[n, g*C/G:(g+1)*C/G, ...]``, with ``m = (C / G) * prod(spatial)`` values
    (Wu & He 2018). ``gamma``, ``beta``: per channel, shape ``(C,)``.
    ``num_groups = 1`` is layer norm over ``(C, *spatial)`` (with per-channel
    gamma); ``num_groups = C`` is instance norm.

    torch's order ``groupnorm_forward(x, num_groups, gamma, beta, eps)`` is
    accepted too (an int in second place).

    Returns:
        ``(y, cache)``; ``cache.mu`` and ``cache.var`` have shape ``(N, num_groups)``.
    """
    if isinstance(gamma, (int, np.integer)) and not isinstance(gamma, bool):  # F.group_norm's order
        num_groups, gamma, beta, eps = gamma, beta, num_groups, eps
    _check_eps(eps)
    x = _as_compute(x)
    _check_channels_first("groupnorm_forward", x)
    num_channels = x.shape[1]
    if not isinstance(num_groups, (int, np.integer)) or isinstance(num_groups, bool) or num_groups < 1:
        raise ValueError(f"num_groups must be an integer >= 1, got {num_groups!r}")
    if num_channels % num_groups != 0:
        raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
    gamma = _param("gamma", gamma, (num_channels,), x.dtype)
    beta = _param("beta", beta, (num_channels,), x.dtype)
    m = (num_channels // num_groups) * prod(x.shape[2:])
    row_shape = (x.shape[0], num_groups, m)
    param_view = (1, num_channels) + (1,) * (x.ndim - 2)
    param_axes = (0,) + tuple(range(2, x.ndim))
    return _grouped_forward(x, gamma, beta, eps, row_shape, param_view, param_axes, (num_channels,))


def groupnorm_backward(dy, cache):
    """Gradients of :func:`groupnorm_forward`: ``(dx, dgamma, dbeta)``.

    ``dx`` is the compact formula per (sample, group) with ``dx_hat = dy * gamma[c]``;
    ``dgamma[c] = sum(dy * x_hat)`` and ``dbeta[c] = sum(dy)`` over ``(N, *spatial)``.
    """
    return _grouped_backward(dy, cache, "groupnorm_backward")


def instancenorm_forward(x, gamma=None, beta=None, eps=1e-5):
    r"""Instance norm: each channel of each sample normalized over its spatial axes.

    For ``x`` of shape ``(N, C, *spatial)`` (at least one spatial axis),
    ``mu[n, c]`` and ``var[n, c]`` are taken over ``x[n, c]``, ``m = prod(spatial)``
    values (Ulyanov et al. 2016). ``gamma``, ``beta``: per channel, ``(C,)``.
    Group norm with ``num_groups = C``.

    Returns:
        ``(y, cache)``; ``cache.mu`` and ``cache.var`` have shape ``(N, C)``.
    """
    x = _as_compute(x)
    _check_channels_first("instancenorm_forward", x, min_ndim=3)
    return groupnorm_forward(x, gamma, beta, num_groups=x.shape[1], eps=eps)


def instancenorm_backward(dy, cache):
    """Gradients of :func:`instancenorm_forward`: ``(dx, dgamma, dbeta)``."""
    return _grouped_backward(dy, cache, "instancenorm_backward")


# --------------------------------------------------------------------------
# RMS norm
# --------------------------------------------------------------------------


@dataclass
class RMSNormCache:
    """What the backward pass of RMS norm needs."""

    x_hat: np.ndarray  # x / rms, shape of x
    inv_rms: np.ndarray  # 1 / sqrt(mean_square + eps), shape row_shape[:-1] + (1,)
    gamma: np.ndarray  # gamma (shape normalized_shape), or None
    row_shape: tuple  # x reshaped so that each row is one sample's normalized values
    param_axes: tuple  # the leading axes of x, summed for dgamma
    mean_square: np.ndarray  # mean(x^2) per row, shape row_shape[:-1]


def rmsnorm_forward(x, gamma=None, eps=None, normalized_shape=None):
    r"""RMS norm: each sample divided by the root mean square of its trailing axes.

    With ``m = prod(normalized_shape)`` values per sample (Zhang & Sennrich 2019):

    .. math::

        \mathrm{rms} = \sqrt{\frac{1}{m} \sum_i x_i^2 + \epsilon}, \qquad
        \hat{x}_i = \frac{x_i}{\mathrm{rms}}, \qquad
        y_i = \gamma_i \hat{x}_i.

    Layer norm without subtracting the mean (and without ``beta``): the
    output does not change when a sample is scaled, but it does when a
    constant is added to it. ``gamma`` has shape ``normalized_shape``, as in
    ``torch.nn.RMSNorm``.

    Args:
        x: array ``(*, *normalized_shape)``.
        gamma: array of shape ``normalized_shape``, or ``None``.
        eps: added to the mean square; ``None`` (torch's default) is the
            machine epsilon of the computation: float32's for float16 and
            float32 input, float64's for float64.
        normalized_shape: the trailing shape to normalize over. Default: the
            shape of ``gamma`` if given, else every axis but the first.

    Returns:
        ``(y, cache)``; ``cache.mean_square`` has shape ``x.shape[:-len(normalized_shape)]``.
    """
    x = _as_compute(x)
    if eps is None:
        eps = float(np.finfo(x.dtype).eps)
    _check_eps(eps)
    normalized_shape = _trailing_shape(x, gamma, normalized_shape)
    k = len(normalized_shape)
    gamma = _param("gamma", gamma, normalized_shape, x.dtype)
    row_shape = x.shape[: x.ndim - k] + (prod(normalized_shape),)
    rows = x.reshape(row_shape)
    with np.errstate(invalid="ignore", divide="ignore"):  # an empty row gives NaN, as the math says
        mean_square = np.mean(rows * rows, axis=-1, keepdims=True)
        inv_rms = 1.0 / np.sqrt(mean_square + eps)
    x_hat = (rows * inv_rms).reshape(x.shape)
    y = x_hat.copy() if gamma is None else x_hat * gamma
    cache = RMSNormCache(x_hat, inv_rms, gamma, row_shape, tuple(range(x.ndim - k)), mean_square[..., 0])
    return y, cache


def rmsnorm_backward(dy, cache):
    r"""Gradients of :func:`rmsnorm_forward`: ``(dx, dgamma)``.

    With ``dx_hat = dy * gamma``, per row of ``m`` values:

    .. math::

        dx_i = \frac{1}{\mathrm{rms}}
               \Big(d\hat{x}_i - \hat{x}_i \frac{1}{m} \sum_j d\hat{x}_j \hat{x}_j\Big),

    batch norm's compact formula without its ``- mean(dx_hat)`` term: there
    is no ``mu`` for the gradient to flow through. The remaining term is the
    path through ``rms`` (``d rms / d x_i = x_i / (m rms)``). ``dgamma`` is
    ``sum(dy * x_hat)`` over the leading axes (``None`` without ``gamma``).
    """
    dy = gradient_array("rmsnorm_backward", dy, cache.x_hat.dtype, cache.x_hat.shape)
    dx_hat = dy if cache.gamma is None else dy * cache.gamma
    dx_hat_rows = dx_hat.reshape(cache.row_shape)
    x_hat_rows = cache.x_hat.reshape(cache.row_shape)
    mean_dx_hat_x_hat = (dx_hat_rows * x_hat_rows).mean(axis=-1, keepdims=True)
    dx = (cache.inv_rms * (dx_hat_rows - x_hat_rows * mean_dx_hat_x_hat)).reshape(cache.x_hat.shape)
    dgamma = None if cache.gamma is None else (dy * cache.x_hat).sum(axis=cache.param_axes)
    return dx, dgamma


# --------------------------------------------------------------------------
# Filter response normalization with a thresholded linear unit
# --------------------------------------------------------------------------


@dataclass
class FRNCache:
    """What the backward pass of FRN + TLU needs."""

    x_hat: np.ndarray  # x / sqrt(nu2 + eps), shape of x
    inv_rms: np.ndarray  # 1 / sqrt(nu2 + eps), shape (N, C, 1, ...)
    gamma: np.ndarray  # (C,)
    above: np.ndarray  # y > tau (where z = y), shape of x; all True without tau
    nu2: np.ndarray  # mean of x^2 over the spatial axes, shape (N, C)
    has_tau: bool


def frn_forward(x, gamma=None, beta=None, tau=None, eps=1e-6):
    r"""Filter response normalization and its thresholded linear unit (Singh & Krishnan 2020).

    For ``x`` of shape ``(N, C, *spatial)`` (at least one spatial axis), per
    sample ``n`` and channel ``c``, over the ``m = prod(spatial)`` values of
    ``x[n, c]``:

    .. math::

        \nu^2 = \frac{1}{m} \sum_i x_i^2, \qquad
        \hat{x}_i = \frac{x_i}{\sqrt{\nu^2 + \epsilon}}, \qquad
        y_i = \gamma \hat{x}_i + \beta,

        z_i = \max(y_i, \tau).

    No mean is subtracted (instance norm's statistics without the centring:
    RMS norm over each channel's map); the learned threshold ``tau`` (TLU)
    replaces the ReLU that would follow and lets the layer shift what the
    missing centring would have. ``gamma``, ``beta``, ``tau``: ``(C,)``;
    ``None`` means 1, 0 and no threshold (``z = y``). ``eps`` > 0: a float,
    or an array broadcast against ``(C,)`` (the learned ``eps`` of the
    paper, which a caller keeps positive). With ``m = 1`` (a 1x1 map)
    ``x_hat = x / sqrt(x^2 + eps)`` is close to ``sign(x)`` unless ``eps`` is
    of the order of ``x^2``.

    Returns:
        ``(z, cache)``; ``cache.nu2`` has shape ``(N, C)``.
    """
    x = _as_compute(x)
    _check_channels_first("frn_forward", x, min_ndim=3)
    channels = x.shape[1]
    view = (1, channels) + (1,) * (x.ndim - 2)
    eps_array = np.asarray(eps)
    if eps_array.dtype.kind not in "fiu":  # not a string, a bool, an object
        raise ValueError(f"eps must be a finite number > 0 (or an array of them), got {eps!r}")
    eps_c = np.broadcast_to(eps_array.astype(x.dtype), (channels,))
    if not ((eps_c > 0) & np.isfinite(eps_c)).all():
        raise ValueError(f"eps must be a finite number > 0 (or an array of them), got {eps}")
    gamma = np.ones(channels, x.dtype) if gamma is None else _param("gamma", gamma, (channels,), x.dtype)
    beta = np.zeros(channels, x.dtype) if beta is None else _param("beta", beta, (channels,), x.dtype)
    tau = None if tau is None else _param("tau", tau, (channels,), x.dtype)
    axes = tuple(range(2, x.ndim))
    nu2 = np.mean(x * x, axis=axes, keepdims=True)
    inv_rms = 1.0 / np.sqrt(nu2 + eps_c.reshape(view))
    x_hat = x * inv_rms
    y = gamma.reshape(view) * x_hat + beta.reshape(view)
    if tau is None:
        above = np.ones(x.shape, dtype=bool)
        z = y
    else:
        above = y > tau.reshape(view)
        z = np.where(above, y, tau.reshape(view))
    return z, FRNCache(x_hat, inv_rms, gamma, above, nu2.reshape(x.shape[:2]), tau is not None)


def frn_backward(dz, cache):
    r"""Gradients of :func:`frn_forward`: ``(dx, dgamma, dbeta, dtau)``.

    The threshold passes ``dz`` to ``y`` where ``y > tau`` and to ``tau``
    elsewhere: ``dy = dz [y > tau]``, ``dtau = sum(dz [y <= tau])``. Then,
    with ``dx_hat = dy * gamma``, per sample and channel (RMS norm's formula):

    .. math::

        dx_i = \frac{1}{\sqrt{\nu^2 + \epsilon}}
               \Big(d\hat{x}_i - \hat{x}_i \frac{1}{m} \sum_j d\hat{x}_j \hat{x}_j\Big),

    and ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)`` over the sample and
    spatial axes (``dtau`` is ``None`` without a threshold).
    """
    x_hat = cache.x_hat
    dz = gradient_array("frn_backward", dz, x_hat.dtype, x_hat.shape)
    view = (1, x_hat.shape[1]) + (1,) * (x_hat.ndim - 2)
    axes = tuple(range(2, x_hat.ndim))
    dy = np.where(cache.above, dz, 0.0)
    dx_hat = dy * cache.gamma.reshape(view)
    mean_dx_hat_x_hat = np.mean(dx_hat * x_hat, axis=axes, keepdims=True)
    dx = cache.inv_rms * (dx_hat - x_hat * mean_dx_hat_x_hat)
    param_axes = (0,) + axes
    dtau = np.where(cache.above, 0.0, dz).sum(axis=param_axes) if cache.has_tau else None
    return dx, (dy * x_hat).sum(axis=param_axes), dy.sum(axis=param_axes), dtau


# --------------------------------------------------------------------------
# Weight standardization
# --------------------------------------------------------------------------


@dataclass
class WeightStdCache:
    """What the backward pass of weight standardization needs."""

    w_hat: np.ndarray  # each output unit's weights standardized, shape (out, n)
    invstd: np.ndarray  # 1 / sqrt(var + eps) per output unit, shape (out, 1)
    gain: np.ndarray  # the gain per output unit, shape (out,), or None
    scale: float  # 1 / sqrt(n) for the scaled form, else 1
    shape: tuple  # the weight's shape


def weightstd_forward(w, gain=None, eps=1e-6, scaled=False):
    r"""Weight standardization: each output unit's weights to mean 0, variance 1.

    For the weight of a linear layer ``(out, in)`` or a convolution ``(out,
    in, *kernel)``, row ``i`` is output unit ``i``'s ``n`` weights (``n`` is
    the fan-in). Each row is standardized (Qiao et al. 2019):

    .. math::

        \mu_i = \frac{1}{n} \sum_j w_{ij}, \qquad
        \sigma_i^2 = \frac{1}{n} \sum_j (w_{ij} - \mu_i)^2, \qquad
        \hat{w}_{ij} = \frac{w_{ij} - \mu_i}{\sqrt{\sigma_i^2 + \epsilon}},

    which is layer norm applied to the rows of the weight, not to
    activations. ``scaled=True`` gives the scaled form of normalizer-free
    networks (Brock et al. 2021), ``g_i \hat{w}_{ij} / \sqrt{n}``: rows of
    length ``|g_i|``, so that with ``g_i = 1`` a unit's output has the
    variance of its inputs when they are uncorrelated and of equal variance;
    ``gain`` is ``g`` (one per output unit; ``None``: 1).

    Returns ``(w_std, cache)``, ``w_std`` of the shape of ``w``.
    """
    w = _as_compute(w)
    _check_eps(eps)
    if w.ndim < 2 or prod(w.shape[1:]) < 2:
        raise ValueError(f"weight standardization needs a weight of shape (out, in, *kernel) with at least 2 "
                         f"weights per output unit, got shape {w.shape}")
    rows = w.reshape(w.shape[0], -1)
    gain = _param("gain", gain, (w.shape[0],), w.dtype)
    w_hat, _, _, invstd = _normalize_rows(rows, eps)
    scale = 1.0 / np.sqrt(rows.shape[1]) if scaled else 1.0
    factor = scale if gain is None else scale * gain[:, None]
    w_std = (factor * w_hat).reshape(w.shape)
    return w_std, WeightStdCache(w_hat, invstd, gain, scale, w.shape)


def weightstd_backward(dw_std, cache):
    r"""Gradients of :func:`weightstd_forward`: ``(dw, dgain)``.

    Layer norm's backward on each row, with ``d\hat{w} = g_i\, s\, dw_{std}``
    (``s = 1/\sqrt{n}`` or 1):

    .. math::

        dw_{ij} = \frac{1}{\sqrt{\sigma_i^2 + \epsilon}}
                  \Big(d\hat{w}_{ij} - \frac{1}{n}\sum_k d\hat{w}_{ik}
                  - \hat{w}_{ij} \frac{1}{n}\sum_k d\hat{w}_{ik} \hat{w}_{ik}\Big),

    so each row of ``dw`` sums to 0 and is orthogonal to ``\hat{w}_i`` (up
    to ``eps / (var + eps)``): an SGD step never changes a row's mean and, to
    first order, not its spread, which the output ignores anyway. ``dgain_i = s \sum_j dw_{std,ij}\, \hat{w}_{ij}``
    (``None`` without ``gain``).
    """
    dw_std = gradient_array("weightstd_backward", dw_std, cache.w_hat.dtype, cache.shape)
    dw_std = dw_std.reshape(cache.w_hat.shape)
    factor = cache.scale if cache.gain is None else cache.scale * cache.gain[:, None]
    dw = _rows_backward(factor * dw_std, cache.w_hat, cache.invstd).reshape(cache.shape)
    dgain = None if cache.gain is None else cache.scale * (dw_std * cache.w_hat).sum(axis=1)
    return dw, dgain


# --------------------------------------------------------------------------
# Batch renormalization
# --------------------------------------------------------------------------


@dataclass
class BatchRenormCache:
    """What the backward pass of batch renorm needs, and the statistics it used."""

    x_hat_batch: np.ndarray  # (x - mu) / sigma_B, shape of x
    x_hat: np.ndarray  # x_hat_batch * r + d, shape of x
    gamma: np.ndarray  # (C,), ones when the layer has no scale
    invstd: np.ndarray  # (C,), 1 / sigma_B = 1 / sqrt(var + eps)
    r: np.ndarray  # (C,), the clipped ratio sigma_B / sigma (a constant in backward)
    d: np.ndarray  # (C,), the clipped shift (mu - running_mean) / sigma (a constant in backward)
    mu: np.ndarray  # (C,) batch mean
    var: np.ndarray  # (C,) biased batch variance
    has_gamma: bool
    has_beta: bool


def _stat_axes(ndim):
    return (0,) + tuple(range(2, ndim))


def _per_channel(v, ndim):
    return np.reshape(v, (1, -1) + (1,) * (ndim - 2))


def batchrenorm_forward(x, gamma, beta, running_mean, running_var, r_max=3.0, d_max=5.0, eps=1e-5):
    r"""Training-mode batch renormalization (Ioffe 2017, Algorithm 1).

    Per channel, over every axis but 1, with ``sigma = sqrt(running_var + eps)``:

    .. math::

        \sigma_B = \sqrt{\mathrm{var}_B + \epsilon}, \quad
        r = \mathrm{clip}\big(\sigma_B / \sigma,\ 1/r_{max},\ r_{max}\big),

        d = \mathrm{clip}\big((\mu_B - \mu_{running}) / \sigma,\ -d_{max},\ d_{max}\big),

        \hat{x} = \frac{x - \mu_B}{\sigma_B}\, r + d, \qquad y = \gamma \hat{x} + \beta.

    ``r_max = 1, d_max = 0`` gives ``r = 1, d = 0``: batch norm. Updating the
    running estimates is the caller's job (as for batch norm: ``cache.mu``,
    and ``cache.var * m / (m - 1)``).

    Args:
        x: ``(N, C, *spatial)``. gamma, beta: ``(C,)`` or ``None``.
        running_mean, running_var: ``(C,)``, the current running estimates.
        r_max, d_max: the clipping limits, ``r_max >= 1`` and ``d_max >= 0``.
    """
    x = _as_compute(x)
    _check_channels_first("batchrenorm_forward", x)
    _check_eps(eps)
    if not (_is_number(r_max) and r_max >= 1):
        raise ValueError(f"r_max must be a number >= 1, got {r_max!r}")
    if not (_is_number(d_max) and d_max >= 0):
        raise ValueError(f"d_max must be a number >= 0, got {d_max!r}")
    num_channels = x.shape[1]
    running_mean = _param("running_mean", running_mean, (num_channels,), x.dtype)
    running_var = _param("running_var", running_var, (num_channels,), x.dtype)
    if (running_var < 0).any():
        raise ValueError(f"running_var must be >= 0 (a variance), got {running_var}")
    has_gamma, has_beta = gamma is not None, beta is not None
    gamma = _param("gamma", gamma, (num_channels,), x.dtype)
    beta = _param("beta", beta, (num_channels,), x.dtype)
    if gamma is None:
        gamma = np.ones(num_channels, x.dtype)

    axes = _stat_axes(x.ndim)
    mu = x.mean(axis=axes)
    mu = mu + (x - _per_channel(mu, x.ndim)).mean(axis=axes)  # the mean's rounding error removed, as batch norm's
    x_centered = x - _per_channel(mu, x.ndim)
    var = np.mean(x_centered * x_centered, axis=axes)  # two passes
    sigma_batch = np.sqrt(var + eps)
    sigma = np.sqrt(running_var + eps)
    r = np.clip(sigma_batch / sigma, 1.0 / r_max, r_max)
    d = np.clip((mu - running_mean) / sigma, -d_max, d_max)
    x_hat_batch = x_centered / _per_channel(sigma_batch, x.ndim)
    x_hat = x_hat_batch * _per_channel(r, x.ndim) + _per_channel(d, x.ndim)
    y = x_hat * _per_channel(gamma, x.ndim)
    if has_beta:
        y = y + _per_channel(beta, x.ndim)
    cache = BatchRenormCache(x_hat_batch, x_hat, gamma, 1.0 / sigma_batch, r, d, mu, var, has_gamma, has_beta)
    return y, cache


def batchrenorm_backward(dy, cache):
    r"""Gradients of training-mode batch renorm, with ``r`` and ``d`` held constant.

    ``r`` and ``d`` are stop-gradient in the paper, so ``y = (gamma * r) * x_hat_B + ...``
    is batch norm with scale ``gamma * r``, and ``dx`` is batch norm's compact
    formula with that scale:

    .. math::

        dx_i = \frac{\gamma r}{m \sigma_B}
               \Big(m\, dy_i - \sum_j dy_j - \hat{x}_{B,i} \sum_j dy_j \hat{x}_{B,j}\Big),

        d\gamma = \sum_i dy_i \hat{x}_i, \quad d\beta = \sum_i dy_i.
    """
    dy = gradient_array("batchrenorm_backward", dy, cache.x_hat.dtype, cache.x_hat.shape)
    ndim = dy.ndim
    axes = _stat_axes(ndim)
    m = prod(dy.shape) // dy.shape[1] if dy.shape[1] else 0
    sum_dy = dy.sum(axis=axes)
    sum_dy_x_hat_batch = (dy * cache.x_hat_batch).sum(axis=axes)
    scale = _per_channel(cache.gamma * cache.r * cache.invstd / max(m, 1), ndim)
    dx = scale * (m * dy - _per_channel(sum_dy, ndim) - cache.x_hat_batch * _per_channel(sum_dy_x_hat_batch, ndim))
    dgamma = (dy * cache.x_hat).sum(axis=axes) if cache.has_gamma else None
    dbeta = sum_dy if cache.has_beta else None
    return dx, dgamma, dbeta


# Last, not at the top: bnlib.reference re-exports this module's names with
# `import *` at its own end. Imported first, this module used to load
# bnlib.reference from its top, whose `import *` then found this module
# still empty, and bnlib.reference lacked layernorm_forward and the rest. Here
# every name is defined first; and when bnlib.reference is imported first,
# gradient_array, near its top, already exists when this line runs.
from bnlib.reference import gradient_array  # noqa: E402
