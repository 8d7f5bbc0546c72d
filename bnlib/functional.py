r"""Batch norm in torch, with the backward pass written by hand.

``batch_norm`` has the signature and meaning of
``torch.nn.functional.batch_norm``. Training mode normalizes with the
statistics of the batch, per channel (axis 1) over every other axis:

.. math::

    \mu = \frac{1}{m}\sum_i x_i, \quad
    \mathrm{var} = \frac{1}{m}\sum_i (x_i - \mu)^2, \quad
    \hat{x} = \frac{x - \mu}{\sqrt{\mathrm{var} + \epsilon}}, \quad
    y = \gamma \hat{x} + \beta,

and, when running estimates are given, updates them in place with
``running = (1 - momentum) * running + momentum * batch`` (the unbiased
variance ``var * m / (m - 1)`` goes into ``running_var``). Eval mode uses the
running estimates instead: ``y = x * scale + shift`` with
``scale = gamma / sqrt(running_var + eps)`` and
``shift = beta - running_mean * scale``.

float16 and bfloat16 inputs are computed in float32 and returned in their
own dtype. Everything is tensor ops, so CUDA tensors work as they are; on
CUDA, when Triton is importable, the fused kernels of
``bnlib.triton_kernels`` do the same work in fewer passes over memory.
"""

import torch

from bnlib._checks import check_batch_size, values_per_channel

__all__ = ["batch_norm"]


def _compute_dtype(dtype):
    """Half inputs are computed in float32; float32 and float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _per_channel(v, ndim):
    """(C,) -> (1, C, 1, ..., 1), so it broadcasts against (N, C, *spatial)."""
    return v.view((1, -1) + (1,) * (ndim - 2))


def _fma(shift, x, scale, out=None):
    """``x * scale + shift`` with per-channel ``shift`` and ``scale`` (C,).

    How it is spelled matters on CPU (measured in bench/, torch 2.13): for
    (N, C) one ``addcmul`` with the shift expanded to x's shape is fastest;
    for (N, C, *spatial) a ternary op with a broadcast first operand is
    1.5-2x slower than a multiply followed by an in-place add.
    """
    ndim = x.dim()
    shift, scale = _per_channel(shift, ndim), _per_channel(scale, ndim)
    if ndim == 2:
        return torch.addcmul(shift.expand_as(x), x, scale, out=out)
    return torch.mul(x, scale, out=out).add_(shift)


def _stat_dims(ndim):
    return [0] + list(range(2, ndim))


def _batch_stats(x):
    """Per-channel mean and biased variance, the centered input, and a
    scratch buffer of x's shape (the squares), which the caller reuses for
    the output so the forward pass allocates two tensors, not three.

    Two passes, stable in float32 for any mean: the one-pass
    ``E[x^2] - E[x]^2`` loses every digit when ``|mu| >> std``.
    """
    dims = _stat_dims(x.dim())
    mu = x.mean(dims)
    x_centered = x - _per_channel(mu, x.dim())
    squares = torch.mul(x_centered, x_centered)
    var = squares.mean(dims)
    return mu, var, x_centered, squares


class BatchNormTrainFunction(torch.autograd.Function):
    """Training mode: batch statistics; the compact backward formula.

    ``forward`` returns ``(y, mu, var)``; ``mu`` and ``var`` (biased) are not
    differentiable outputs, returned so the caller can update running stats.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps):
        x = input.to(_compute_dtype(input.dtype))
        ndim = x.dim()
        mu, var, x_centered, y = _batch_stats(x)
        invstd = torch.rsqrt(var + eps)
        # y = gamma * (x - mu) * invstd + beta, one pass over x_centered,
        # written into the scratch buffer of the squares (no new allocation).
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        shift = torch.zeros_like(scale) if bias is None else bias.to(x.dtype)
        _fma(shift, x_centered, scale, out=y)
        ctx.save_for_backward(x_centered, invstd, weight)
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mu, var)
        return y.to(input.dtype), mu, var

    @staticmethod
    def backward(ctx, dy, _grad_mu, _grad_var):
        r"""With ``x_hat = x_centered * invstd`` and ``m`` values per channel:

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))

        The last line is the chain rule through x_hat, mu and var collapsed:
        the mean's path contributes ``-sum(dy)/m`` and the variance's path
        ``-x_hat * sum(dy * x_hat) / m`` (derived in the chapter "The Batch
        Normalization algorithm"). Written as two fused passes:
        ``dx = k*dy - k*mean(dy) - x_centered * (k * invstd * mean(dy*x_hat))``
        with ``k = gamma * invstd``.
        """
        x_centered, invstd, weight = ctx.saved_tensors
        ndim = x_centered.dim()
        dims = _stat_dims(ndim)
        m = values_per_channel(x_centered.shape)
        dy32 = dy.to(x_centered.dtype)
        if m == 0:
            # An empty batch: its statistics are NaN, but nothing depends on them.
            invstd = torch.zeros_like(invstd)
            m = 1

        sum_dy = dy32.sum(dims)
        products = torch.mul(dy32, x_centered)  # reused below as dx's buffer
        sum_dy_x_hat = products.sum(dims) * invstd

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            k = invstd if weight is None else invstd * weight.to(invstd.dtype)
            dx = _fma(-k * sum_dy / m, dy32, k, out=products)
            dx.addcmul_(x_centered, _per_channel(-k * invstd * sum_dy_x_hat / m, ndim))
            grad_input = dx.to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_x_hat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else dy32.dtype)
        return grad_input, grad_weight, grad_bias, None


class BatchNormEvalFunction(torch.autograd.Function):
    """Eval mode: the running estimates are constants, so y is affine in x.

    ``y = x * scale + shift``, ``dx = dy * scale``,
    ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)``.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps):
        dtype = _compute_dtype(input.dtype)
        x = input.to(dtype)
        ndim = x.dim()
        mean = running_mean.to(dtype)
        invstd = torch.rsqrt(running_var.to(dtype) + eps)
        scale = invstd if weight is None else invstd * weight.to(dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        y = _fma(shift, x, scale)
        ctx.save_for_backward(input, mean, invstd, scale, weight)
        ctx.has_bias = bias is not None
        return y.to(input.dtype)

    @staticmethod
    def backward(ctx, dy):
        input, mean, invstd, scale, weight = ctx.saved_tensors
        ndim = input.dim()
        dims = _stat_dims(ndim)
        dy32 = dy.to(scale.dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_input = (dy32 * _per_channel(scale, ndim)).to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            x_hat = (input.to(scale.dtype) - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
            grad_weight = (dy32 * x_hat).sum(dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy32.sum(dims).to(weight.dtype if weight is not None else dy32.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


def _check_per_channel(name, tensor, num_channels):
    if tensor is not None and tensor.numel() != num_channels:
        raise ValueError(
            f"{name} should have {num_channels} elements (one per channel of the input), "
            f"got {tensor.numel()}"
        )


@torch.no_grad()
def _update_running_stats(running_mean, running_var, mu, var, m, momentum):
    """``running = (1 - momentum) * running + momentum * batch``, per channel,
    skipping channels whose batch statistics are not finite.

    ``torch.where`` on a per-channel finiteness mask keeps this free of host
    syncs: no ``.item()``, no Python branch on tensor values.
    """
    unbiased_var = var * (m / (m - 1)) if m > 1 else var
    finite = torch.isfinite(mu) & torch.isfinite(unbiased_var)
    new_mean = momentum * mu.to(running_mean.dtype) + (1 - momentum) * running_mean
    new_var = momentum * unbiased_var.to(running_var.dtype) + (1 - momentum) * running_var
    running_mean.copy_(torch.where(finite, new_mean, running_mean))
    running_var.copy_(torch.where(finite, new_var, running_var))


def _triton_path():
    """``bnlib.triton_kernels`` when it can run here, else None."""
    try:
        from bnlib import triton_kernels
    except ImportError:
        return None
    return triton_kernels if triton_kernels.is_available() else None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):
    """Batch normalization; the signature and meaning of ``torch.nn.functional.batch_norm``.

    Args:
        input: ``(N, C, *spatial)``, 2 to 5 dims (more are accepted).
        running_mean, running_var: ``(C,)`` running estimates, or ``None``.
            In training mode they are updated in place when given; in eval
            mode they are used and must be given.
        weight, bias: ``gamma`` and ``beta``, ``(C,)``, or ``None``.
        training: use (and update with) the batch statistics.
        momentum: the running-estimate factor (PyTorch's convention).
        eps: added to the variance.

    Returns:
        ``y``, with the shape and dtype of ``input``.

    Raises:
        ValueError: fewer than 2 dims, one value per channel in training,
            per-channel tensors of the wrong length, or eval mode without
            running estimates. Nothing is updated when it raises.
    """
    if input.dim() < 2:
        raise ValueError(f"batch_norm expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D input")
    num_channels = input.shape[1]
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        _check_per_channel(name, tensor, num_channels)
    if training:
        check_batch_size(input.shape, str(input.size()))
    elif running_mean is None or running_var is None:
        raise ValueError("batch_norm in eval mode (training=False) needs running_mean and running_var")

    if input.is_cuda:
        triton = _triton_path()
        if triton is not None:
            return triton.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    if not training:
        return BatchNormEvalFunction.apply(input, weight, bias, running_mean, running_var, eps)
    y, mu, var = BatchNormTrainFunction.apply(input, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        _update_running_stats(running_mean, running_var, mu, var, values_per_channel(input.shape), momentum)
    return y
