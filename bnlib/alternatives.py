r"""The alternatives to batch norm in torch, with hand-written backward passes.

Drop-ins for torch's modules, with the same constructors, parameters, buffers
and state-dict keys, outputs and gradients:

- :class:`LayerNorm` (``torch.nn.LayerNorm``), :class:`GroupNorm`
  (``torch.nn.GroupNorm``), :class:`InstanceNorm1d` / :class:`InstanceNorm2d` /
  :class:`InstanceNorm3d` (``torch.nn.InstanceNorm1d/2d/3d``): normalize
  groups of values *of one sample* (see ``bnlib.reference_alternatives`` for
  the math); :class:`RMSNorm` (``torch.nn.RMSNorm``), layer norm without the
  centering;
- :func:`weight_norm` and :func:`spectral_norm`
  (``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``):
  reparametrize a weight, ``w = g v / ||v||`` and ``W_SN = W / sigma(W)``,
  registered with ``torch.nn.utils.parametrize`` under the same names
  (``parametrizations.weight.original0/original1``; ``original`` and
  ``0._u`` / ``0._v``), so state dicts move between the two;
- :func:`weight_standardization`, where torch has none: each output unit's
  weights to mean 0 and variance 1 (Qiao et al. 2019), or the scaled form of
  normalizer-free networks (Brock et al. 2021);

and, where torch has none, :class:`BatchRenorm1d` / :class:`BatchRenorm2d`
(Ioffe 2017), batch norm whose batch statistics are corrected towards the
running ones by two constants ``r`` and ``d``; and :func:`masked_batch_norm`,
batch norm of zero-padded sequences over their real tokens only.

Every normalization is written as a ``torch.autograd.Function`` whose
backward is batch norm's compact formula applied to the right groups of values
(``_rows_backward``), not autograd replaying the forward. float16 and
bfloat16 inputs are computed in float32 and returned in their own dtype.
Layer, group, instance and RMS norm (and so filter response norm) of a
float32 or float64 CPU tensor run the same formulas in bnlib's
C++ loops (``grouped_norm_forward`` and ``grouped_norm_backward`` in
``bnlib/csrc/batch_norm_cpu.cpp``), a row at a time, and a channels-last
input of group, instance or filter response norm in loops of its own
(``grouped_norm_forward_cl`` / ``_backward_cl``), a sample at a time;
``bnlib.functional.cpu_backend("tensor_ops")`` keeps them on tensor ops.

The modules with running statistics derive from ``bnlib.batchnorm._NormBase``,
the base of bnlib's batch norm: the same parameters, buffers and state-dict
handling as torch's modules.
"""

import math
from numbers import Integral, Real

import torch
from torch import nn
from torch.nn.utils import parametrize

from bnlib import functional as bnF
from bnlib.functional import _compute_dtype
from bnlib.batchnorm import NotScriptable, _LazyNorm, _NormBase, _version, register_affine_parameters, reset_affine_parameters
from bnlib._checks import (
    InputError,
    check_eps,
    check_floating_dtype,
    check_input_dims,
    check_norm_args,
    check_num_channels,
    check_positive_finite,
    values_per_channel,
)

__all__ = [
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "batch_renorm",
    "LayerNorm",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LazyInstanceNorm1d",
    "LazyInstanceNorm2d",
    "LazyInstanceNorm3d",
    "RMSNorm",
    "filter_response_norm",
    "FilterResponseNorm",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "LinearRamp",
    "paper_schedule",
    "masked_batch_norm",
    "weight_norm",
    "weight_standardization",
    "spectral_norm",
]


def _check_eps(eps):
    # numbers.Real: NumPy scalars and 0-dim tensors too, as torch and the BN
    # modules take them; InputError, as for the other bad arguments of a call
    try:
        check_eps(eps)
    except ValueError as error:
        raise InputError(str(error)) from None


def _check_channel_params(input, **tensors):
    """Per-channel tensors (those given) must be float vectors of one value
    per channel of ``input``, on its device: batch norm's check
    (:func:`bnlib.functional._check_per_channel`), with a 0-dim tensor
    refused for one channel too, as torch's group norm refuses it."""
    for name, tensor in tensors.items():
        bnF._check_per_channel(name, tensor, input, vector_only=True)


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


# --------------------------------------------------------------------------
# One autograd Function for layer, group and instance norm
# --------------------------------------------------------------------------


def _rows_backward(dx_hat, x_hat, invstd):
    r"""Batch norm's compact formula, per row of ``m`` values (last axis):

    ``dx = invstd * (dx_hat - mean(dx_hat) - x_hat * mean(dx_hat * x_hat))``,

    the ``- mean(dx_hat)`` term being the path through ``mu`` and the
    ``- x_hat * mean(...)`` term the path through ``var``; ``gamma`` is
    already inside ``dx_hat = dy * gamma``.
    """
    mean_dx_hat = dx_hat.mean(-1, keepdim=True)
    mean_dx_hat_x_hat = (dx_hat * x_hat).mean(-1, keepdim=True)
    return invstd * (dx_hat - mean_dx_hat - x_hat * mean_dx_hat_x_hat)


def _sum_over(t, dims):
    """``t`` summed over ``dims``; ``t`` itself when there are none (``t.sum(())``
    would sum over every dim)."""
    return t.sum(dims) if dims else t


def _row_mean(rows):
    """Each row's mean (over the last dim, kept), corrected once by the mean of
    ``rows - mean``: a mean a unit in the last place off, times
    ``1/sqrt(eps)``, would leave a constant row far from 0 (float32 rows of
    10000.1 gave 0.3); corrected, they give 0, as torch's layer norm and
    bnlib's C++ loops (whose shifted sums do the same) give."""
    mu = rows.mean(-1, keepdim=True)
    return mu + (rows - mu).mean(-1, keepdim=True)


def _grouped_norm_formula(input, weight, bias, row_shape, param_view, eps):
    """``GroupedNormFunction``'s map in plain differentiable tensor ops (for second derivatives)."""
    x = input.to(_compute_dtype(input.dtype))
    rows = x.reshape(row_shape)
    x_centered = rows - _row_mean(rows)
    x_hat = (x_centered * torch.rsqrt(x_centered.square().mean(-1, keepdim=True) + bnF._eps_in(eps, x.dtype))
             ).reshape(x.shape)
    y = x_hat if weight is None else x_hat * weight.to(x.dtype).view(param_view)
    if bias is not None:
        y = y + bias.to(x.dtype).view(param_view)
    return y.to(input.dtype)


def _grouped_norm(input, weight, bias, row_shape, param_view, param_dims, eps):
    """``GroupedNormFunction.apply``; under a ``torch.func`` transform the same
    outputs from ``_grouped_norm_formula`` (see ``bnF.under_func_transform``)."""
    if bnF.under_func_transform():
        rows = input.detach().to(_compute_dtype(input.dtype)).reshape(row_shape)
        mu = _row_mean(rows)
        var = (rows - mu).square().mean(-1)
        mu = mu.squeeze(-1)
        return _grouped_norm_formula(input, weight, bias, row_shape, param_view, eps), mu, var
    kernel = _grouped_kernel(input, row_shape, param_view)
    out = _grouped_train_op(input, weight, bias, row_shape, kernel, eps, centered=True)
    if out is None and kernel is not None and not torch.is_grad_enabled():
        # nothing to record (a channels-last input): the C++ loops without the Function's overhead
        out = _kernel_forward(kernel, input, weight, bias, row_shape, eps, centered=True)[:3]
    if out is not None:
        y, mu, var = out
        return y, mu.view(row_shape[:-1]), var.view(row_shape[:-1])
    return GroupedNormFunction.apply(input, weight, bias, row_shape, param_view, param_dims, eps)


def _grouped_train_op(input, weight, bias, row_shape, kernel, eps, centered):
    """``(y, mean, var)`` (the statistics one per row) from the C++ autograd
    op ``bnlib_cpu::grouped_norm_train``: ``GroupedNormFunction`` (with
    ``centered``) or ``RMSNormFunction`` (without) on the same loops, with
    autograd's bookkeeping in C++, which on small inputs takes a fraction of
    the Python Function's per-call time. Without grad it records nothing,
    and takes the parameters' conversions for the loops into C++ too.
    ``kernel``: what :func:`_grouped_kernel` said of this input. None where
    the op does not apply: no loops for this input, a channels-last one (its
    own loops, left to the Functions), or under ``torch.compile``, which
    traces the Functions."""
    if kernel is None or kernel[2] or torch.compiler.is_compiling():
        return None
    inner, params, _ = kernel
    # Conversions here, outside the op, so that autograd carries the
    # gradients back through them (as batch norm's _per_channel_arg).
    x = input.contiguous()
    weight, bias = (t if t is None or t.dtype == x.dtype else t.to(x.dtype) for t in (weight, bias))
    return bnF._cpu["ops"].grouped_norm_train(x, weight, bias, math.prod(row_shape[:-1]), inner, params, eps, centered)


class GroupedNormFunction(torch.autograd.Function):
    """Normalize every row of ``input.reshape(row_shape)``; then ``y = x_hat * w + b``.

    ``param_view`` is the shape ``weight`` and ``bias`` are viewed as to
    broadcast against the input (``(1, C, 1, ...)`` per channel, or the
    normalized shape for layer norm), ``param_dims`` the input dims summed for
    their gradients. ``forward`` returns ``(y, mu, var)``, the per-row
    statistics (shape ``row_shape[:-1]``, not differentiable). Where
    ``_grouped_kernel`` says the C++ loops can, both passes run there; an
    eager call on contiguous rows takes this Function's C++ twin instead
    (``_grouped_train_op``).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, row_shape, param_view, param_dims, eps):
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.row_shape, ctx.param_view, ctx.param_dims = row_shape, param_view, param_dims
        ctx.kernel = _grouped_kernel(input, row_shape, param_view)
        if ctx.kernel is not None:
            y, mu, var, invstd = _kernel_forward(ctx.kernel, input, weight, bias, row_shape, eps, centered=True)
            stats_shape = tuple(row_shape[:-1]) + (1,)
            ctx.save_for_backward(input, mu.view(stats_shape), invstd.view(stats_shape), weight, bias)
            mu, var = mu.view(row_shape[:-1]), var.view(row_shape[:-1])
            ctx.mark_non_differentiable(mu, var)
            return y, mu, var
        x = input.to(_compute_dtype(input.dtype))
        rows = x.reshape(row_shape)
        mu = rows.mean(-1, keepdim=True)
        x_centered = rows - mu  # after the mean: stable when |mu| >> std
        # _row_mean's correction in one more read: shift = mean(x - mu), and
        # x - (mu + shift) taken as x_centered * invstd - shift * invstd in
        # the pass that writes x_hat (a constant row comes out 0, not 0.3).
        shift = x_centered.mean(-1, keepdim=True)
        var = ((x_centered * x_centered).mean(-1, keepdim=True) - shift * shift).clamp_min(0)
        mu = mu + shift
        invstd = torch.rsqrt(var + bnF._eps_in(eps, var.dtype))
        # Written through a view into a tensor of x's shape, so that x_hat is
        # not itself a view: returned as y (no weight, no bias), a view would
        # refuse in-place ops after it (ReLU(inplace=True), out += residual).
        x_hat = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.addcmul(-shift * invstd, x_centered, invstd, out=x_hat.view(row_shape))
        y = x_hat if weight is None else x_hat * weight.to(x.dtype).view(param_view)
        if bias is not None:
            y = y + bias.to(x.dtype).view(param_view)
        # The input and the (row,) statistics, not x_hat: the input is alive
        # anyway, and the backward recomputes x_hat in one pass (as torch's).
        ctx.save_for_backward(input, mu, invstd, weight, bias)
        mu, var = mu.squeeze(-1), var.squeeze(-1)
        ctx.mark_non_differentiable(mu, var)
        return y.to(input.dtype), mu, var

    @staticmethod
    def backward(ctx, dy, _grad_mu, _grad_var):
        input, mu, invstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = bnF.grads_through_formula(
                lambda *t: _grouped_norm_formula(*t, ctx.row_shape, ctx.param_view, ctx.eps), (input, weight, bias), dy)
            return (*grads, None, None, None, None)
        param_grads = (weight is not None and ctx.needs_input_grad[1]) or (ctx.has_bias and ctx.needs_input_grad[2])
        if ctx.kernel is not None and dy.dtype == input.dtype and (ctx.needs_input_grad[0] or param_grads):
            dx, dw, db = _kernel_backward(ctx, dy, input, mu, invstd, weight, param_grads, centered=True)
            dw = dw.view(weight.shape).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
            db = db.view(ctx.bias_shape).to(bias.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
            return dx, dw, db, None, None, None, None
        x_hat = ((input.to(invstd.dtype).reshape(ctx.row_shape) - mu) * invstd).reshape(input.shape)
        dy32 = dy.to(x_hat.dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            dx_hat = dy32 if weight is None else dy32 * weight.to(x_hat.dtype).view(ctx.param_view)
            dx = _rows_backward(dx_hat.reshape(ctx.row_shape), x_hat.reshape(ctx.row_shape), invstd)
            grad_input = dx.reshape(x_hat.shape).to(dy.dtype)
        param_dtype = weight.dtype if weight is not None else dy32.dtype
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = _sum_over(dy32 * x_hat, ctx.param_dims).reshape(weight.shape).to(param_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = _sum_over(dy32, ctx.param_dims).reshape(ctx.bias_shape).to(param_dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


def _grouped_kernel(input, row_shape, param_view):
    """``(inner, params, channels_last)`` when bnlib's C++ loops can run
    ``GroupedNormFunction`` on ``input`` (a float32 or float64 CPU tensor, its
    parameters one block of dims), else None.

    The loops give value ``i`` of the flattened input the parameter
    ``(i // inner) % params``: for group and instance norm the channel
    (``inner`` the spatial size, ``params`` = C), for layer norm the position
    in the row (``inner`` = 1, ``params`` = the row's length).

    They read rows in memory order. ``channels_last`` is True for a
    channels-last input whose rows are whole groups of channels with one
    parameter per channel (or none): group, instance and filter response
    norm, which the loops ``grouped_norm_*_cl`` run in that layout. Any other
    strided input is copied to a contiguous one first, in each pass (a copy
    costs less than the tensor ops' passes; the input itself is what is
    saved, as on the tensor-op path, so that second derivatives still reach it).
    """
    if bnF._cpu_kernels(input) is None:
        return None
    shape = tuple(input.shape)
    view = (1,) * (len(shape) - len(param_view)) + tuple(param_view)
    varying = [d for d, v in enumerate(view) if v != 1]
    if not varying:  # one parameter for every value
        inner, params = row_shape[-1], 1
    else:
        first, last = varying[0], varying[-1] + 1
        if any(view[d] == 1 and shape[d] != 1 for d in range(first, last)):
            return None
        inner, params = math.prod(shape[last:]), math.prod(shape[first:last])
    row = row_shape[-1]
    if row % inner or params % (row // inner):
        return None
    return inner, params, _channel_groups(input, row_shape, inner, params)


def _channel_groups(input, row_shape, inner, params):
    """True when the channels-last loops fit: ``input`` channels last (and
    not also contiguous), each row ``C / G`` whole channels of a sample, and
    one parameter per channel or one for all."""
    if bnF._channels_last_format(input) is None:
        return False
    channels, spatial = input.shape[1], math.prod(input.shape[2:])
    row = row_shape[-1]
    per_channel = (inner, params) == (spatial, channels) or params == 1
    return per_channel and row % spatial == 0 and channels % (row // spatial) == 0


def _param_values(param, params, input):
    """A layer's weight or bias as the C++ loops take it: ``params`` contiguous
    values of the input's dtype (ones for a layer without a weight)."""
    if param is None:
        return torch.ones(params, dtype=input.dtype, device=input.device)  # (not the default device)
    return param.detach().to(input.dtype).reshape(-1).contiguous()


def _channel_values(param, params, input):
    """:func:`_param_values` with one value per channel, as the channels-last
    loops take them (``params`` is the channel count, or 1 for one value for all)."""
    return _param_values(param, params, input).expand(input.shape[1]).contiguous()


def _kernel_forward(kernel, input, weight, bias, row_shape, eps, centered):
    """``grouped_norm_forward`` of the C++ loops (``grouped_norm_forward_cl``
    on a channels-last input), ``kernel`` from :func:`_grouped_kernel`:
    ``(y, mean, var, invstd)``, the statistics one value per row (without
    ``centered``: mean 0, var the mean square)."""
    inner, params, channels_last = kernel
    rows = math.prod(row_shape[:-1])
    if channels_last:  # the loops take one value per channel
        bias_values = None if bias is None else _channel_values(bias, params, input)
        return bnF._cpu["ops"].grouped_norm_forward_cl(input, _channel_values(weight, params, input), bias_values,
                                                       rows // input.shape[0], eps, centered)
    bias_values = None if bias is None else _param_values(bias, params, input)
    return bnF._cpu["ops"].grouped_norm_forward(input.contiguous(), _param_values(weight, params, input), bias_values,
                                                rows, inner, params, eps, centered)


def _kernel_backward(ctx, dy, input, mean, invstd, weight, param_grads, centered):
    """``grouped_norm_backward`` of the C++ loops (``_cl`` on a channels-last
    input), for a Function whose forward ran them (``ctx.kernel``): dx (None
    where the input needs none), and the weight's and bias's gradients as
    ``params`` values (when ``param_grads``)."""
    inner, params, channels_last = ctx.kernel
    ops = bnF._cpu["ops"]
    if channels_last:
        dx, dw, db = ops.grouped_norm_backward_cl(
            bnF._dense_like(dy, input), input, mean.reshape(-1), invstd.reshape(-1),
            _channel_values(weight, params, input), centered, ctx.needs_input_grad[0], param_grads)
        if param_grads and params == 1:  # one parameter for every channel: its channels' sum
            dw, db = dw.sum(0, keepdim=True), db.sum(0, keepdim=True)
    else:
        dx, dw, db = ops.grouped_norm_backward(
            dy.contiguous(), input.contiguous(), mean.reshape(-1), invstd.reshape(-1),
            _param_values(weight, params, input), inner, centered, ctx.needs_input_grad[0], param_grads)
    return (dx if ctx.needs_input_grad[0] else None), dw, db


def _channel_view(ndim):
    return (1, -1) + (1,) * (ndim - 2)


def _not_channel_dims(ndim):
    return (0,) + tuple(range(2, ndim))


# --------------------------------------------------------------------------
# Functional forms (the signatures of torch.nn.functional's)
# --------------------------------------------------------------------------


# torch's autocast runs layer, group and RMS norm in float32 on CUDA (they are
# on its list of float32 ops): the input and parameters are cast up and the
# output stays float32. On the CPU it runs them in the input's dtype. A
# device type listed here gets torch's CUDA behaviour (tests list "cpu" to
# exercise the path without a GPU).
AUTOCAST_FLOAT32_DEVICES = ("cuda",)


def _autocast_enabled(device_type):
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 asks about CUDA only
        return device_type == "cuda" and torch.is_autocast_enabled()


def _autocast_float32(*tensors):
    """The tensors cast to float32 when autocast is on for the first one's
    device type and that device runs these norms in float32; else None.
    As torch's autocast, float64 tensors are left as they are."""
    device_type = tensors[0].device.type
    if device_type not in AUTOCAST_FLOAT32_DEVICES or not _autocast_enabled(device_type):
        return None
    return tuple(t.float() if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _normalized_shape_tuple(normalized_shape):
    if isinstance(normalized_shape, Integral):
        normalized_shape = (normalized_shape,)
    return tuple(normalized_shape)


def _module_normalized_shape(normalized_shape):
    """A module's ``normalized_shape`` as a tuple of at least one positive int (LayerNorm, RMSNorm)."""
    normalized_shape = _normalized_shape_tuple(normalized_shape)
    if len(normalized_shape) == 0:
        raise ValueError("normalized_shape must have at least one dimension, got ()")
    for size in normalized_shape:
        _check_positive_int("every entry of normalized_shape", size)
    return normalized_shape


def _check_trailing_params(fn_name, normalized_shape, **params):
    """Each given parameter must have the shape ``normalized_shape``: the shape,
    not only the count, since a (3, 4) weight for normalized_shape (4, 3) would
    be viewed as (4, 3), its elements on the wrong features."""
    for name, tensor in params.items():
        if tensor is not None and tuple(tensor.shape) != normalized_shape:
            raise InputError(f"{fn_name} expected {name} of shape {list(normalized_shape)} "
                             f"(normalized_shape), got {list(tensor.shape)}")


def _check_layer_norm_input(input, normalized_shape):
    if len(normalized_shape) == 0:
        raise InputError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
                         "element, but got normalized_shape = []")
    k = len(normalized_shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != normalized_shape:
        raise InputError(
            f"Given normalized_shape={list(normalized_shape)}, expected input with shape "
            f"[*, {', '.join(map(str, normalized_shape))}], but got input of size{list(input.shape)}"
        )


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    r"""Layer norm; the signature and meaning of ``torch.nn.functional.layer_norm``.

    Each sample is normalized over its trailing ``normalized_shape`` dims
    (``m = prod(normalized_shape)`` values), ``y = x_hat * weight + bias`` with
    ``weight``, ``bias`` of shape ``normalized_shape`` (Ba et al. 2016).
    """
    bnF.check_tensor_input("layer_norm", input)
    normalized_shape = _normalized_shape_tuple(normalized_shape)
    _check_layer_norm_input(input, normalized_shape)
    check_floating_dtype("layer_norm", input.dtype, input.is_floating_point())
    cast = _autocast_float32(input, weight, bias)
    if cast is not None:
        with torch.autocast(input.device.type, enabled=False):
            return layer_norm(cast[0], normalized_shape, cast[1], cast[2], eps)
    k = len(normalized_shape)
    _check_trailing_params("layer_norm", normalized_shape, weight=weight, bias=bias)
    bnF.check_same_device(input, weight=weight, bias=bias)
    _check_eps(eps)
    lead = tuple(input.shape[: input.dim() - k])
    row_shape = lead + (math.prod(normalized_shape),)
    param_dims = tuple(range(input.dim() - k))
    y, _, _ = _grouped_norm(input, weight, bias, row_shape, normalized_shape, param_dims, eps)
    return y.contiguous()  # torch's layer norm returns a contiguous tensor whatever the input's layout


def _check_group_size(input, num_groups):
    """torch's ``_verify_batch_size`` on ``[N * C / G, G, *spatial]``: raises when it holds one value."""
    size = [input.shape[0] * input.shape[1] // num_groups, num_groups] + list(input.shape[2:])
    if values_per_channel(size) == 1:
        raise InputError(f"Expected more than 1 value per channel when training, got input size {size}")


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):
    r"""Group norm; the signature and meaning of ``torch.nn.functional.group_norm``.

    For ``(N, C, *spatial)``, sample ``n``'s channels are split into
    ``num_groups`` groups of ``C / num_groups`` consecutive channels, and each
    group is normalized over its ``m = C / G * prod(spatial)`` values
    (Wu & He 2018); ``weight``, ``bias``: per channel, ``(C,)``.
    """
    bnF.check_tensor_input("group_norm", input)
    if input.dim() < 2:
        raise InputError(f"group_norm expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D input")
    _check_positive_int("num_groups", num_groups)
    num_channels = input.shape[1]
    check_floating_dtype("group_norm", input.dtype, input.is_floating_point())
    cast = _autocast_float32(input, weight, bias)
    if cast is not None:
        with torch.autocast(input.device.type, enabled=False):
            return group_norm(cast[0], num_groups, cast[1], cast[2], eps)
    if num_channels % num_groups != 0:
        raise InputError(
            f"Expected number of channels in input to be divisible by num_groups, "
            f"but got input of shape {list(input.shape)} and num_groups={num_groups}"
        )
    _check_channel_params(input, weight=weight, bias=bias)
    _check_eps(eps)
    _check_group_size(input, num_groups)
    m = num_channels // num_groups * math.prod(input.shape[2:])
    row_shape = (input.shape[0], num_groups, m)
    ndim = input.dim()
    y, _, _ = _grouped_norm(input, weight, bias, row_shape, _channel_view(ndim), _not_channel_dims(ndim), eps)
    fmt = bnF._channels_last_format(input)
    if fmt is not None and input.device.type == "cpu":
        # as torch's group norm, whose CPU kernel keeps a channels-last layout
        # (its CUDA kernel returns a contiguous tensor, as ours does)
        y = y.contiguous(memory_format=fmt)
    return y


# --------------------------------------------------------------------------
# RMS norm: layer norm without the mean
# --------------------------------------------------------------------------


def _rms_norm_eps(eps, dtype):
    """torch's default: the machine epsilon of the computation (float32's for half inputs)."""
    return torch.finfo(_compute_dtype(dtype)).eps if eps is None else eps


def _rms_norm_formula(input, weight, row_shape, eps):
    """``RMSNormFunction``'s map in plain differentiable tensor ops (for second derivatives)."""
    x = input.to(_compute_dtype(input.dtype))
    rows = x.reshape(row_shape)
    x_hat = (rows * torch.rsqrt(rows.square().mean(-1, keepdim=True) + bnF._eps_in(eps, x.dtype))).reshape(x.shape)
    y = x_hat if weight is None else x_hat * weight.to(x.dtype)
    return y.to(input.dtype)


class RMSNormFunction(torch.autograd.Function):
    r"""``y = x / rms * weight``, ``rms = sqrt(mean(x^2) + eps)`` over each row of ``input.reshape(row_shape)``.

    ``weight`` has the normalized shape (the trailing dims of ``input``);
    ``param_dims`` are the leading dims, summed for its gradient. The backward
    is batch norm's compact formula without the ``- mean(dx_hat)`` term
    (there is no mean to flow through):
    ``dx = inv_rms * (dx_hat - x_hat * mean(dx_hat * x_hat))``.
    """

    @staticmethod
    def forward(ctx, input, weight, row_shape, param_dims, eps):
        ctx.row_shape, ctx.param_dims, ctx.eps = row_shape, param_dims, eps
        ctx.kernel = _grouped_kernel(input, row_shape, (1,) if weight is None else weight.shape)
        if ctx.kernel is not None:  # bnlib's C++ loops, without the mean
            y, zeros, _, inv_rms = _kernel_forward(ctx.kernel, input, weight, None, row_shape, eps, centered=False)
            ctx.save_for_backward(input, inv_rms, weight, zeros)
            return y
        x = input.to(_compute_dtype(input.dtype))
        rows = x.reshape(row_shape)
        inv_rms = torch.rsqrt((rows * rows).mean(-1, keepdim=True) + bnF._eps_in(eps, x.dtype))
        # into a fresh tensor of x's shape, not a view (see GroupedNormFunction)
        x_hat = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        torch.mul(rows, inv_rms, out=x_hat.view(row_shape))
        y = x_hat if weight is None else x_hat * weight.to(x.dtype)
        ctx.save_for_backward(input, inv_rms, weight)
        return y.to(input.dtype)

    @staticmethod
    def backward(ctx, dy):
        input, inv_rms, weight, *zeros = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = bnF.grads_through_formula(
                lambda *t: _rms_norm_formula(*t, ctx.row_shape, ctx.eps), (input, weight), dy)
            return (*grads, None, None, None)
        weight_grad = weight is not None and ctx.needs_input_grad[1]
        if ctx.kernel is not None and dy.dtype == input.dtype and (ctx.needs_input_grad[0] or weight_grad):
            dx, dw, _ = _kernel_backward(ctx, dy, input, zeros[0], inv_rms, weight, weight_grad, centered=False)
            return dx, dw.view(weight.shape).to(weight.dtype) if weight_grad else None, None, None, None
        inv_rms = inv_rms.view(tuple(ctx.row_shape[:-1]) + (1,))
        x_hat = input.to(inv_rms.dtype).reshape(ctx.row_shape) * inv_rms
        dy32 = dy.to(x_hat.dtype)
        grad_input = grad_weight = None
        if ctx.needs_input_grad[0]:
            dx_hat = (dy32 if weight is None else dy32 * weight.to(x_hat.dtype)).reshape(ctx.row_shape)
            mean_dx_hat_x_hat = (dx_hat * x_hat).mean(-1, keepdim=True)
            grad_input = (inv_rms * (dx_hat - x_hat * mean_dx_hat_x_hat)).reshape(input.shape).to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = _sum_over(dy32 * x_hat.reshape(input.shape), ctx.param_dims).to(weight.dtype)
        return grad_input, grad_weight, None, None, None


def rms_norm(input, normalized_shape, weight=None, eps=None):
    r"""RMS norm; the signature and meaning of ``torch.nn.functional.rms_norm``.

    Each sample is divided by the root mean square of its trailing
    ``normalized_shape`` dims, ``rms = sqrt(mean(x^2) + eps)``, then scaled by
    ``weight`` (shape ``normalized_shape``; Zhang & Sennrich 2019). No mean is
    subtracted and there is no bias. ``eps=None`` is the machine epsilon of
    the computation (float32's for float16, bfloat16 and float32 input), as
    in torch 2.13; older torch versions took a half input's own epsilon.
    Stricter than torch: ``eps`` must be > 0.
    """
    bnF.check_tensor_input("rms_norm", input)
    normalized_shape = _normalized_shape_tuple(normalized_shape)
    _check_layer_norm_input(input, normalized_shape)
    check_floating_dtype("rms_norm", input.dtype, input.is_floating_point())
    cast = _autocast_float32(input, weight)
    if cast is not None:
        with torch.autocast(input.device.type, enabled=False):
            return rms_norm(cast[0], normalized_shape, cast[1], eps)
    _check_trailing_params("rms_norm", normalized_shape, weight=weight)
    bnF.check_same_device(input, weight=weight)
    eps = _rms_norm_eps(eps, input.dtype)
    _check_eps(eps)
    k = len(normalized_shape)
    row_shape = tuple(input.shape[: input.dim() - k]) + (math.prod(normalized_shape),)
    param_dims = tuple(range(input.dim() - k))
    if bnF.under_func_transform():
        y = _rms_norm_formula(input, weight, row_shape, eps)
    else:
        kernel = _grouped_kernel(input, row_shape, (1,) if weight is None else weight.shape)
        out = _grouped_train_op(input, weight, None, row_shape, kernel, eps, centered=False)
        y = RMSNormFunction.apply(input, weight, row_shape, param_dims, eps) if out is None else out[0]
    # as torch's: channels-last stays channels-last, anything else comes back contiguous
    fmt = bnF._channels_last_format(input)
    return y.contiguous() if fmt is None else y.contiguous(memory_format=fmt)


# --------------------------------------------------------------------------
# Filter response normalization: RMS norm of each channel's map, and a threshold
# --------------------------------------------------------------------------


def _frn_formula(input, weight, bias, tau, eps):
    """``filter_response_norm``'s map in plain differentiable tensor ops (a
    learned ``eps``, ``torch.func`` transforms, second derivatives)."""
    x = input.to(_compute_dtype(input.dtype))
    view = (1, -1) + (1,) * (x.dim() - 2)
    eps_c = eps.to(x.dtype).reshape(view) if torch.is_tensor(eps) else bnF._eps_in(eps, x.dtype)
    x_hat = x * torch.rsqrt(x.square().mean(tuple(range(2, x.dim())), keepdim=True) + eps_c)
    return _frn_affine_threshold(x_hat, weight, bias, tau).to(input.dtype)


def _frn_affine_threshold(x_hat, weight, bias, tau):
    """``z = max(gamma * x_hat + beta, tau)``, per channel, in autograd's tensor ops."""
    view = (1, -1) + (1,) * (x_hat.dim() - 2)
    y = x_hat if weight is None else x_hat * weight.to(x_hat.dtype).view(view)
    if bias is not None:
        y = y + bias.to(x_hat.dtype).view(view)
    # where, not maximum: a tie y == tau (beta = tau = 0 at the start, and an
    # input of exact zeros, give one) sends its whole gradient to tau, as the
    # reference does; torch.maximum would split it in two.
    if tau is None:
        return y
    tau = tau.to(x_hat.dtype).view(view)
    return torch.where(y > tau, y, tau)


def _check_frn_input(name, input):
    bnF.check_tensor_input(name, input)
    if input.dim() < 3:
        raise InputError(
            f"{name} expected an input with at least one spatial dimension (N, C, L, ...), got "
            f"{input.dim()}D input: with one value per sample and channel, x / sqrt(x^2 + eps) is "
            "nearly sign(x)"
        )
    check_floating_dtype(name, input.dtype, input.is_floating_point())


def filter_response_norm(input, weight=None, bias=None, tau=None, eps=1e-6):
    r"""Filter response normalization with a thresholded linear unit (Singh & Krishnan 2020).

    For ``input`` of shape ``(N, C, *spatial)`` (at least one spatial dim),
    per sample and channel, over its ``m = prod(spatial)`` values:
    ``nu2 = mean(x^2)``, ``x_hat = x / sqrt(nu2 + eps)``,
    ``y = weight * x_hat + bias``, ``z = max(y, tau)``. ``weight``, ``bias``,
    ``tau``: ``(C,)`` or ``None`` (1, 0, and no threshold: ``z = y``). The
    NumPy reference is :func:`bnlib.reference_alternatives.frn_forward`.

    ``eps``: a float > 0, or a tensor broadcast against ``(C,)`` that is
    positive (a learned ``eps``, as :class:`FilterResponseNorm` makes it). With
    a float, ``x_hat`` comes from ``RMSNormFunction``, whose backward is
    written by hand (RMS norm over each channel's map); the affine map and
    the threshold are plain tensor ops. With a tensor ``eps``, under a
    ``torch.func`` transform, or for second derivatives, the whole map runs
    in tensor ops and autograd differentiates it.

    No statistics cross samples, so the output of a sample does not depend
    on its batch, and training and evaluation compute the same map. With a
    1x1 map (``m = 1``) ``x_hat = x / sqrt(x^2 + eps)`` is nearly
    ``sign(x)``: the paper's remedy is a learned ``eps``.
    """
    _check_frn_input("filter_response_norm", input)
    channels = input.shape[1]
    for what, t in (("weight", weight), ("bias", bias), ("tau", tau)):
        if t is not None and t.numel() != channels:
            raise InputError(f"{what} should have {channels} elements (one per channel of the input), got {t.numel()}")
    if torch.is_tensor(eps):
        if eps.numel() not in (1, channels):
            raise InputError(f"a tensor eps should have 1 or {channels} elements, got {eps.numel()}")
        # a host read of eps; FilterResponseNorm, whose eps is positive by
        # construction, calls _filter_response_norm and skips it
        if not bnF.under_func_transform() and not bool((eps > 0).all()):
            raise InputError(f"eps must be > 0 in every channel, got {eps.detach().flatten().tolist()}")
    else:
        _check_eps(eps)
    return _filter_response_norm(input, weight, bias, tau, eps)


def _filter_response_norm(input, weight, bias, tau, eps):
    """:func:`filter_response_norm` after its checks."""
    if torch.is_tensor(eps) or bnF.under_func_transform():
        z = _frn_formula(input, weight, bias, tau, eps)
    else:
        # A half input is converted first (a differentiable copy), so that x_hat
        # is not rounded to half before the affine map and the threshold.
        x = input.to(_compute_dtype(input.dtype))
        row_shape = (input.shape[0] * input.shape[1], math.prod(input.shape[2:]))  # a row per sample and channel
        x_hat = RMSNormFunction.apply(x, None, row_shape, (), eps)
        z = _frn_affine_threshold(x_hat, weight, bias, tau).to(input.dtype)
    fmt = bnF._channels_last_format(input)  # a channels-last input gets a channels-last output
    return z if fmt is None else z.contiguous(memory_format=fmt)


@bnF.buffer_update
def _update_instance_running_stats(running_mean, running_var, mu, var, m, momentum):
    """torch's rule for instance norm: the per-instance statistics (``(N, C)``)
    averaged over the batch, the variance unbiased over ``m`` spatial values,
    then ``running = (1 - momentum) * running + momentum * batch``.
    A channel with non-finite statistics keeps its estimates (no host sync)."""
    unbiased_var = var * (m / (m - 1)) if m > 1 else var
    bnF.update_running_estimates(running_mean, running_var, mu.mean(0), unbiased_var.mean(0), momentum)


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5):
    r"""Instance norm; the signature and meaning of ``torch.nn.functional.instance_norm``.

    ``use_input_stats``: each channel of each sample normalized over its
    spatial dims, ``m = prod(spatial)`` values (Ulyanov et al. 2016), and the
    running estimates, when given, updated in place with the batch average of
    the per-instance statistics. Otherwise the running estimates normalize,
    as in batch norm's eval mode.
    """
    bnF.check_tensor_input("instance_norm", input)
    if input.dim() < 3:
        raise InputError(f"instance_norm expected an input with at least 3 dimensions (N, C, L, ...), got {input.dim()}D input")
    num_channels = input.shape[1]
    check_floating_dtype("instance_norm", input.dtype, input.is_floating_point())
    bnF.check_running_pair("instance_norm", running_mean, running_var)
    _check_channel_params(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    _check_eps(eps)
    if use_input_stats and running_mean is not None:
        bnF.check_momentum("instance_norm", momentum)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise InputError("instance_norm with use_input_stats=False needs running_mean and running_var")
        # (contiguous, as torch's instance norm returns whatever the input's layout)
        return bnF.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps).contiguous()
    m = math.prod(input.shape[2:])
    if m == 1:
        raise InputError(f"Expected more than 1 spatial element when training, got input size {input.size()}")
    ndim = input.dim()
    row_shape = (input.shape[0], num_channels, m)
    y, mu, var = _grouped_norm(input, weight, bias, row_shape, _channel_view(ndim), _not_channel_dims(ndim), eps)
    if running_mean is not None and running_var is not None:
        _update_instance_running_stats(running_mean, running_var, mu, var, m, momentum)
    return y.contiguous()


# --------------------------------------------------------------------------
# Modules: LayerNorm, GroupNorm, InstanceNorm1d/2d/3d
# --------------------------------------------------------------------------


class LayerNorm(NotScriptable, nn.Module):
    """Drop-in for ``torch.nn.LayerNorm``: normalize each sample over its last dims.

    ``weight`` and ``bias`` have shape ``normalized_shape`` (one per element).
    The same in training and evaluation: no running statistics.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        normalized_shape = _module_normalized_shape(normalized_shape)
        check_eps(eps)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        register_affine_parameters(self, normalized_shape, elementwise_affine, bias, factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self):
        reset_affine_parameters(self)

    def forward(self, input):
        return layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class RMSNorm(NotScriptable, nn.Module):
    """Drop-in for ``torch.nn.RMSNorm``: divide each sample by the root mean square of its last dims.

    ``weight`` has shape ``normalized_shape`` (one per element); there is no
    bias. ``eps=None`` (the default, as torch's) is the machine epsilon of the
    computation. No running statistics: the same in training and evaluation.
    Stricter than torch at construction: ``eps`` must be None or > 0, and
    every entry of ``normalized_shape`` at least 1.
    """

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None):
        normalized_shape = _module_normalized_shape(normalized_shape)
        if eps is not None:
            check_eps(eps)
        super().__init__()
        self.normalized_shape = normalized_shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        # a weight only: torch's RMSNorm has no bias entry at all (not even None)
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self):
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x):  # torch's RMSNorm names it x (its other norms: input)
        return rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"


class FilterResponseNorm(NotScriptable, nn.Module):
    """Filter response normalization and its thresholded linear unit (Singh & Krishnan 2020);
    torch has none. See :func:`filter_response_norm`.

    Input ``(N, C, *spatial)`` with at least one spatial dim. Parameters
    ``weight`` (gamma, ones), ``bias`` (beta, zeros) and, with ``tlu=True``,
    ``tau`` (zeros): the layer replaces a normalization *and* the activation
    after it (``tlu=False`` leaves the threshold out, for an activation of
    your own). ``learnable_eps=True`` adds ``eps_learned``, one per channel,
    starting at ``learnable_eps_init``; the layer then uses
    ``eps + |eps_learned|``, the paper's remedy for small maps (a 1x1 map
    gives nearly ``sign(x)`` with a small fixed ``eps``). No running
    statistics: the same map in training and evaluation, and no dependence
    on the batch.
    """

    def __init__(self, num_features, eps=1e-6, learnable_eps=False, tlu=True, device=None, dtype=None,
                 *, learnable_eps_init=1e-4):
        _check_positive_int("num_features", num_features)
        check_eps(eps)
        if learnable_eps:
            check_positive_finite("learnable_eps_init", learnable_eps_init)
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.learnable_eps, self.tlu, self.learnable_eps_init = learnable_eps, tlu, learnable_eps_init
        self.weight = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        self.bias = nn.Parameter(torch.empty(num_features, **factory_kwargs))
        self.tau = nn.Parameter(torch.empty(num_features, **factory_kwargs)) if tlu else None
        self.eps_learned = nn.Parameter(torch.empty(num_features, **factory_kwargs)) if learnable_eps else None
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        if self.tau is not None:
            nn.init.zeros_(self.tau)
        if self.eps_learned is not None:
            nn.init.constant_(self.eps_learned, self.learnable_eps_init)

    def forward(self, input):
        _check_frn_input(type(self).__name__, input)
        check_num_channels(type(self).__name__, input.shape, self.num_features)
        eps = self.eps if self.eps_learned is None else self.eps + self.eps_learned.abs()
        return _filter_response_norm(input, self.weight, self.bias, self.tau, eps)

    def extra_repr(self):
        text = f"{self.num_features}, eps={self.eps}, learnable_eps={self.learnable_eps}, tlu={self.tlu}"
        if self.learnable_eps:
            text += f", learnable_eps_init={self.learnable_eps_init}"
        return text


class GroupNorm(NotScriptable, nn.Module):
    """Drop-in for ``torch.nn.GroupNorm``: per sample, per group of ``C // num_groups`` channels.

    ``num_channels`` must be divisible by ``num_groups`` (``ValueError`` at
    construction). ``weight`` and ``bias`` are per channel, ``(C,)``. The same
    in training and evaluation: no running statistics.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True):
        _check_positive_int("num_groups", num_groups)
        _check_positive_int("num_channels", num_channels)
        check_eps(eps)
        if num_channels % num_groups != 0:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        register_affine_parameters(self, (num_channels,), affine, bias, factory_kwargs)
        self.reset_parameters()

    def reset_parameters(self):
        reset_affine_parameters(self)

    def forward(self, input):
        name = type(self).__name__
        bnF.check_tensor_input(name, input)
        if input.dim() < 2:
            raise InputError(f"{name} expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D input")
        check_num_channels(name, input.shape, self.num_channels)
        return group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class _InstanceNorm(_NormBase):
    """Instance norm with torch's defaults: ``affine=False, track_running_stats=False``.

    As in torch: an unbatched input (no N axis) is accepted; with
    ``track_running_stats`` the running estimates are the batch average of the
    per-instance statistics, updated with ``momentum`` (torch passes
    ``momentum=None`` as 0, so they then stay put) without counting
    ``num_batches_tracked``, and used in eval mode. Unlike torch, a channel
    count other than ``num_features`` is always a ``ValueError`` (torch only
    warns when ``affine=False``), and a batch whose statistics are not finite
    (NaN or Inf in it, or no samples) leaves the running estimates of the
    channels it reaches unchanged (torch writes NaN), per bnlib's contract.
    """

    allowed_dims = ()  # batched input dims, e.g. (3,) for InstanceNorm1d

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False,
                 device=None, dtype=None, *, bias=True):
        check_norm_args(num_features, eps, momentum)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype, bias=bias)

    def _get_no_batch_dim(self):
        """The dims of an unbatched input, ``(C, *spatial)`` (torch's hook)."""
        return self.allowed_dims[0] - 1

    def _check_input_dim(self, input):
        """torch's hook, which a subclass may override: batched or unbatched dims."""
        check_input_dims(type(self).__name__, input.shape, (self._get_no_batch_dim(), self.allowed_dims[0]))

    def forward(self, input):
        name = type(self).__name__
        bnF.check_tensor_input(name, input)
        self._check_input_dim(input)
        unbatched = input.dim() == self._get_no_batch_dim()
        channel_dim = 0 if unbatched else 1  # torch takes (C, ...) without the N axis
        if input.shape[channel_dim] != self.num_features:
            raise InputError(
                f"{name} expected input with {self.num_features} channels (num_features) on axis {channel_dim}, "
                f"got {input.shape[channel_dim]} (input shape {tuple(input.shape)})"
            )
        x = input.unsqueeze(0) if unbatched else input
        use_input_stats = self.training or not self.track_running_stats
        update = self.training and self.track_running_stats
        y = instance_norm(
            x,
            self.running_mean if update or not use_input_stats else None,
            self.running_var if update or not use_input_stats else None,
            self.weight,
            self.bias,
            use_input_stats,
            self.momentum if self.momentum is not None else 0.0,
            self.eps,
        )
        return y.squeeze(0) if unbatched else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Before torch 0.4 instance norm kept running estimates by default;
        # a checkpoint of then (no version) carries them. As torch: an error,
        # strict or not, saying so.
        if local_metadata.get("version", None) is None and not self.track_running_stats:
            keys = [prefix + n for n in ("running_mean", "running_var") if prefix + n in state_dict]
            if keys:
                klass = type(self).__name__
                names = " and ".join('"' + k + '"' for k in keys)
                error_msgs.append(
                    f"Unexpected running stats buffer(s) {names} for {klass} "
                    f"with track_running_stats=False. If state_dict is a checkpoint saved before 0.4.0, this "
                    f"may be expected because {klass} does not track running stats by default since 0.4.0. "
                    f"Please remove these keys from state_dict. If the running stats are actually needed, "
                    f"instead set track_running_stats=True in {klass} to enable them.")
                for key in keys:
                    state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


class InstanceNorm1d(_InstanceNorm):
    """Drop-in for ``torch.nn.InstanceNorm1d``: ``(N, C, L)`` or unbatched ``(C, L)``."""

    allowed_dims = (3,)


class InstanceNorm2d(_InstanceNorm):
    """Drop-in for ``torch.nn.InstanceNorm2d``: ``(N, C, H, W)`` or unbatched ``(C, H, W)``."""

    allowed_dims = (4,)


class InstanceNorm3d(_InstanceNorm):
    """Drop-in for ``torch.nn.InstanceNorm3d``: ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)``."""

    allowed_dims = (5,)


class _LazyInstanceNorm(_LazyNorm):
    """Lazy instance norm. Its defaults are torch's lazy instance norms' (in
    torch 2.13), ``affine=True, track_running_stats=True``, those of every
    lazy norm module, not ``InstanceNorm*d``'s ``False, False`` (which
    torch's docstrings for them state)."""

    def _channels_of_first_input(self, input):
        name = type(self).__name__
        bnF.check_tensor_input(name, input)
        batched = self.allowed_dims[0]
        check_input_dims(name, input.shape, (batched - 1, batched))
        check_floating_dtype(name, input.dtype, input.is_floating_point())
        x = input.unsqueeze(0) if input.dim() == batched - 1 else input  # unbatched: (C, ...)
        if (self.training or not self.track_running_stats) and math.prod(x.shape[2:]) == 1:
            raise InputError(f"Expected more than 1 spatial element when training, got input size {x.size()}")
        return x.shape[1]


class LazyInstanceNorm1d(_LazyInstanceNorm, InstanceNorm1d):
    """Drop-in for ``torch.nn.LazyInstanceNorm1d``: an ``InstanceNorm1d`` whose ``num_features``
    is its first input's ``C`` (``bnlib.batchnorm._LazyNorm``)."""

    cls_to_become = InstanceNorm1d


class LazyInstanceNorm2d(_LazyInstanceNorm, InstanceNorm2d):
    """Drop-in for ``torch.nn.LazyInstanceNorm2d``: an ``InstanceNorm2d`` whose ``num_features``
    is its first input's ``C`` (``bnlib.batchnorm._LazyNorm``)."""

    cls_to_become = InstanceNorm2d


class LazyInstanceNorm3d(_LazyInstanceNorm, InstanceNorm3d):
    """Drop-in for ``torch.nn.LazyInstanceNorm3d``: an ``InstanceNorm3d`` whose ``num_features``
    is its first input's ``C`` (``bnlib.batchnorm._LazyNorm``)."""

    cls_to_become = InstanceNorm3d


# --------------------------------------------------------------------------
# Batch renormalization
# --------------------------------------------------------------------------


def _batch_renorm_formula(input, weight, bias, r, d, eps):
    """Training-mode batch renorm in plain differentiable tensor ops, with ``r`` and ``d`` as given: constants
    (the paper's; for second derivatives), or with their graph (``stop_gradient=False``)."""
    y = bnF.batch_norm_formula(input.to(_compute_dtype(input.dtype)), None, None, eps)
    ndim = y.dim()
    y = y * bnF._per_channel(r, ndim) + bnF._per_channel(d, ndim)
    if weight is not None:
        y = y * bnF._per_channel(weight.to(y.dtype), ndim)
    if bias is not None:
        y = y + bnF._per_channel(bias.to(y.dtype), ndim)
    return y.to(input.dtype)


def _renorm_correction(mu, var, running_mean, running_var, eps, r_max, d_max):
    """Batch renorm's ``(r, d)`` per channel, from the batch's and the running statistics."""
    eps = bnF._eps_in(eps, var.dtype)
    sigma = torch.sqrt(running_var.to(var.dtype) + eps)
    r = torch.clamp(torch.sqrt(var + eps) / sigma, 1.0 / r_max, r_max)
    d = torch.clamp((mu - running_mean.to(mu.dtype)) / sigma, -d_max, d_max)
    return r, d


class BatchRenormTrainFunction(torch.autograd.Function):
    r"""Training-mode batch renorm (Ioffe 2017, Algorithm 1), ``r`` and ``d`` stop-gradient.

    Per channel, ``sigma_B = sqrt(var_B + eps)``, ``sigma = sqrt(running_var + eps)``:

        r = clamp(sigma_B / sigma, 1 / r_max, r_max)
        d = clamp((mu_B - running_mean) / sigma, -d_max, d_max)
        x_hat = (x - mu_B) / sigma_B * r + d,      y = gamma * x_hat + beta

    ``forward`` returns ``(y, mu_B, var_B, r, d)``; all but ``y`` are not
    differentiable.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps, r_max, d_max):
        x = input.to(_compute_dtype(input.dtype))
        ndim = x.dim()
        mu, var, x_centered, _ = bnF._batch_stats(x)  # two passes
        invstd = torch.rsqrt(var + bnF._eps_in(eps, var.dtype))
        r, d = _renorm_correction(mu, var, running_mean, running_var, eps, r_max, d_max)
        x_hat_batch = x_centered * bnF._per_channel(invstd, ndim)
        x_hat = x_hat_batch * bnF._per_channel(r, ndim) + bnF._per_channel(d, ndim)
        y = x_hat if weight is None else x_hat * bnF._per_channel(weight.to(x.dtype), ndim)
        if bias is not None:
            y = y + bnF._per_channel(bias.to(x.dtype), ndim)
        # The input and per-channel values only: the backward recomputes x_hat
        # in one pass rather than keep two tensors of x's size alive.
        ctx.save_for_backward(input, mu, invstd, r, d, weight, bias)
        ctx.eps = eps
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mu, var, r, d)
        return y.to(input.dtype), mu, var, r, d

    @staticmethod
    def backward(ctx, dy, _grad_mu, _grad_var, _grad_r, _grad_d):
        r"""``r`` and ``d`` are constants, so ``y = (gamma * r) * x_hat_B + (gamma * d + beta)``
        is batch norm with scale ``gamma * r``, and ``dx`` is batch norm's
        compact formula with that scale:
        ``dx = gamma * r * invstd * (dy - mean(dy) - x_hat_B * mean(dy * x_hat_B))``;
        ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)``.
        """
        input, mu, invstd, r, d, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            grads = bnF.grads_through_formula(lambda *t: _batch_renorm_formula(*t, r, d, ctx.eps),
                                              (input, weight, bias), dy)
            return (*grads, None, None, None, None, None)
        ndim = input.dim()
        x_hat_batch = (input.to(invstd.dtype) - bnF._per_channel(mu, ndim)) * bnF._per_channel(invstd, ndim)
        x_hat = x_hat_batch * bnF._per_channel(r, ndim) + bnF._per_channel(d, ndim)
        dims = _not_channel_dims(ndim)
        m = max(values_per_channel(x_hat.shape), 1)
        dy32 = dy.to(x_hat.dtype)
        sum_dy = dy32.sum(dims)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            k = invstd * r if weight is None else invstd * r * weight.to(x_hat.dtype)
            mean_dy = bnF._per_channel(sum_dy / m, ndim)
            mean_dy_x_hat = bnF._per_channel((dy32 * x_hat_batch).sum(dims) / m, ndim)
            dx = bnF._per_channel(k, ndim) * (dy32 - mean_dy - x_hat_batch * mean_dy_x_hat)
            grad_input = dx.to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (dy32 * x_hat).sum(dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else dy32.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None


def _batch_renorm_through_r_d(input, running_mean, running_var, weight, bias, eps, r_max, d_max):
    """Training-mode batch renorm with gradients through ``r`` and ``d`` (not the paper's):
    plain differentiable tensor ops; returns ``(y, mu_B, var_B, r, d)``, the last four detached."""
    x = input.to(_compute_dtype(input.dtype))
    dims = bnF._stat_dims(x.dim())
    mu = x.mean(dims)
    var = (x - bnF._per_channel(mu, x.dim())).square().mean(dims)
    # r and d keep their graph: the paper's formula, differentiated through them
    r, d = _renorm_correction(mu, var, running_mean, running_var, eps, r_max, d_max)
    y = _batch_renorm_formula(input, weight, bias, r, d, eps)
    return y, mu.detach(), var.detach(), r.detach(), d.detach()


def _batch_renorm_train(input, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max,
                        stop_gradient=True):
    """Training step of :func:`batch_renorm`; returns ``(y, r, d)``, ``r``, ``d`` of shape ``(C,)``."""
    if input.dim() < 2:
        raise InputError(f"batch_renorm expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D input")
    check_floating_dtype("batch_renorm", input.dtype, input.is_floating_point())
    _check_channel_params(input, running_mean=running_mean, running_var=running_var, weight=weight, bias=bias)
    bnF.check_training_batch(input)
    _check_limit("r_max", r_max, 1.0)
    _check_limit("d_max", d_max, 0.0)
    _check_stop_gradient(stop_gradient)
    if not stop_gradient:
        y, mu, var, r, d = _batch_renorm_through_r_d(input, running_mean, running_var, weight, bias, eps, r_max, d_max)
    elif bnF.under_func_transform():  # the formula, r and d constants (see bnF.under_func_transform)
        mu, var = bnF._detached_batch_stats(input)
        r, d = _renorm_correction(mu, var, running_mean, running_var, eps, r_max, d_max)
        y = _batch_renorm_formula(input, weight, bias, r, d, eps)
    else:
        y, mu, var, r, d = BatchRenormTrainFunction.apply(input, weight, bias, running_mean, running_var, eps, r_max, d_max)
    bnF._update_running_stats(running_mean, running_var, mu, var, values_per_channel(input.shape), momentum)
    return y, r, d


def batch_renorm(input, running_mean, running_var, weight=None, bias=None, training=False,
                 momentum=0.1, eps=1e-5, r_max=3.0, d_max=5.0, *, stop_gradient=True):
    """Batch renormalization; ``torch.nn.functional.batch_norm``'s arguments plus ``r_max``, ``d_max``.

    Training: normalize with the batch statistics corrected by ``r`` and ``d``
    (``BatchRenormTrainFunction``), then update the running estimates
    in place exactly as batch norm does (the unbiased batch variance goes into
    ``running_var``). Eval: batch norm with the running estimates.

    ``stop_gradient=False`` lets the gradient flow through ``r`` and ``d``
    too (the paper holds them constant). Where neither is clipped the
    training output is then ``gamma * (x - running_mean) / sigma + beta``
    as a function of ``x``, and so is its gradient: the batch's own
    statistics cancel out of both. Where one is clipped, it is a constant
    and its gradient is 0, as in the paper.
    """
    if running_mean is None or running_var is None:
        raise InputError("batch_renorm needs running_mean and running_var (r and d are measured against them)")
    _check_eps(eps)
    _check_stop_gradient(stop_gradient)
    if training:
        bnF.check_momentum("batch_renorm", momentum)
    if not training:
        return bnF.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    y, _, _ = _batch_renorm_train(input, running_mean, running_var, weight, bias, momentum, eps, r_max, d_max,
                                  stop_gradient)
    return y


class LinearRamp:
    """A schedule ``step -> value``: ``start_value`` up to ``start_step``, then a
    straight line to ``end_value`` at ``end_step``, constant after.

    ``LinearRamp(5000, 40000, 1.0, 3.0)`` is the paper's ``r_max`` schedule.
    """

    def __init__(self, start_step, end_step, start_value, end_value):
        if not 0 <= start_step <= end_step:
            raise ValueError(f"need 0 <= start_step <= end_step, got {start_step} and {end_step}")
        self.start_step, self.end_step = start_step, end_step
        self.start_value, self.end_value = float(start_value), float(end_value)

    def __call__(self, step):
        if step <= self.start_step:
            return self.start_value
        if step >= self.end_step:
            return self.end_value
        t = (step - self.start_step) / (self.end_step - self.start_step)
        return self.start_value + t * (self.end_value - self.start_value)

    def __repr__(self):
        return (f"LinearRamp({self.start_step}, {self.end_step}, {self.start_value}, {self.end_value})")


def paper_schedule(scale=1.0, r_max=3.0, d_max=5.0):
    """The ``r_max`` / ``d_max`` schedules of Ioffe (2017), steps multiplied by ``scale``.

    BN for the first 5000 steps (``r_max = 1``, ``d_max = 0``), then ``r_max``
    relaxed linearly to 3 by step 40000 and ``d_max`` to 5 by step 25000.
    Returns ``{"r_max": LinearRamp, "d_max": LinearRamp}``, to pass as
    ``BatchRenorm2d(C, **paper_schedule(scale=0.01))``.
    """
    s = scale
    return {
        "r_max": LinearRamp(round(5000 * s), round(40000 * s), 1.0, r_max),
        "d_max": LinearRamp(round(5000 * s), round(25000 * s), 0.0, d_max),
    }


def _check_stop_gradient(value):
    if not isinstance(value, bool):
        raise ValueError(f"stop_gradient must be True or False, got {value!r}")


def _check_limit(name, value, lowest):
    """``r_max`` must be a finite number >= 1, ``d_max`` one >= 0."""
    if isinstance(value, bool) or not isinstance(value, Real) or not (lowest <= value < math.inf):
        raise ValueError(f"{name} must be a finite number >= {lowest:g}, got {value!r}")


class _BatchRenorm(_NormBase):
    r"""Batch renormalization (Ioffe 2017): batch norm whose training output
    uses the batch statistics corrected towards the running ones.

    Constructor: batch norm's, plus ``r_max`` and ``d_max``, each a number or
    a schedule ``step -> number`` (e.g. :class:`LinearRamp`,
    :func:`paper_schedule`), evaluated at ``step = num_batches_tracked``
    (the number of training batches seen before this one).
    ``r_max = 1, d_max = 0`` is batch norm, outputs, gradients and running
    statistics alike.

    Running statistics: updated exactly like batch norm's (``running_mean``,
    and the unbiased batch variance into ``running_var``), and the running
    standard deviation of the paper is ``sigma = sqrt(running_var + eps)``.
    The paper averages ``sigma_B`` itself; averaging the variance instead
    keeps the buffers, the state dict and eval mode identical to
    ``BatchNorm*d``'s, so a trained BN's state loads into it and back.
    ``track_running_stats`` must be True (``r`` and ``d`` need the estimates).
    After an eager training step ``last_r`` and ``last_d`` hold the ``(C,)`` values used
    and ``last_limits`` the step's ``(r_max, d_max)`` (not in a program from
    ``torch.export``); :meth:`last_at_limits` says which were clipped.

    ``stop_gradient=False`` (not the paper's) lets the gradient flow through
    ``r`` and ``d``; see :func:`batch_renorm`.
    """

    allowed_dims = ()

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 device=None, dtype=None, *, bias=True, r_max=3.0, d_max=5.0, stop_gradient=True):
        check_norm_args(num_features, eps, momentum)
        _check_stop_gradient(stop_gradient)
        if not track_running_stats:
            raise ValueError("BatchRenorm needs track_running_stats=True: r and d compare the batch with the running statistics")
        if not callable(r_max):
            _check_limit("r_max", r_max, 1.0)
        if not callable(d_max):
            _check_limit("d_max", d_max, 0.0)
        super().__init__(num_features, eps, momentum, affine, True, device=device, dtype=dtype, bias=bias)
        self.r_max = r_max
        self.d_max = d_max
        self.stop_gradient = stop_gradient
        self.last_r = None
        self.last_d = None
        self.last_limits = None

    def current_limits(self):
        """``(r_max, d_max)`` for the next training step."""
        # The step only where a schedule needs it (a host read on CUDA); a
        # count set to None (torch allows it) is step 0.
        scheduled = callable(self.r_max) or callable(self.d_max)
        step = int(self.num_batches_tracked) if scheduled and self.num_batches_tracked is not None else 0
        r_max = self.r_max(step) if callable(self.r_max) else self.r_max
        d_max = self.d_max(step) if callable(self.d_max) else self.d_max
        _check_limit("r_max", r_max, 1.0)
        _check_limit("d_max", d_max, 0.0)
        return float(r_max), float(d_max)

    def last_at_limits(self):
        """Which corrections the last training step clipped: boolean ``(C,)``
        masks ``(r_low, r_high, d_clipped)`` for ``r = 1/r_max``,
        ``r = r_max`` and ``|d| = d_max``, with the limits that step used
        (``last_limits``; :meth:`current_limits` gives the next step's).
        ``None`` before an eager training step. At ``r_max = 1`` (batch norm's
        phase of a schedule) every ``r`` is at both limits, at ``d_max = 0``
        every ``d`` at its limit."""
        # (set with last_r and last_d; getattr: a module pickled before it existed)
        if getattr(self, "last_limits", None) is None:
            return None
        r_max, d_max = self.last_limits
        r, d = self.last_r, self.last_d
        # The clamp returns the limit itself, rounded to the statistics'
        # dtype: a few units in the last place of slack.
        slack = 4 * torch.finfo(r.dtype).eps
        return r <= (1 / r_max) * (1 + slack), r >= r_max * (1 - slack), d.abs() >= d_max * (1 - slack)

    def forward(self, input):
        name = type(self).__name__
        bnF.check_tensor_input(name, input)
        check_input_dims(name, input.shape, self.allowed_dims)
        check_num_channels(name, input.shape, self.num_features)
        check_floating_dtype(name, input.dtype, input.is_floating_point())
        if not self.training:
            return bnF.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        bnF.check_training_batch(input)
        self._check_attributes_now(True)
        r_max, d_max = self.current_limits()  # may raise: still before any state changes
        factor = self._count_batch()
        version = _version(self.running_mean)
        try:
            # (getattr: a module pickled before stop_gradient existed)
            y, r, d = _batch_renorm_train(input, self.running_mean, self.running_var, self.weight, self.bias,
                                          factor, self.eps, r_max, d_max, getattr(self, "stop_gradient", True))
        except Exception:
            if _version(self.running_mean) == version:
                self._uncount_batch()  # the estimates are unchanged; so must the count be
            raise
        if not bnF._is_exporting():  # (an exported program would hold them as constants, and warns)
            self.last_r, self.last_d, self.last_limits = r, d, (r_max, d_max)
        return y

    def extra_repr(self):
        extra = f", r_max={self.r_max}, d_max={self.d_max}"
        if not getattr(self, "stop_gradient", True):
            extra += ", stop_gradient=False"
        return super().extra_repr() + extra


class BatchRenorm1d(_BatchRenorm):
    """Batch renorm for ``(N, C)`` or ``(N, C, L)`` inputs."""

    allowed_dims = (2, 3)


class BatchRenorm2d(_BatchRenorm):
    """Batch renorm for ``(N, C, H, W)`` inputs: statistics over (N, H, W)."""

    allowed_dims = (4,)


# --------------------------------------------------------------------------
# Weight normalization
# --------------------------------------------------------------------------


def _norm_except_dim(v, dim):
    """``||v||`` over every dim but ``dim``, keeping dims (the shape of ``g``);
    over the whole tensor (a 0-dim tensor) when ``dim == -1``, as in torch."""
    if dim == -1:
        return torch.linalg.vector_norm(v)
    others = tuple(d for d in range(v.dim()) if d != dim)
    if not others:
        return v.abs()
    return torch.linalg.vector_norm(v, dim=others, keepdim=True)


def _weight_norm_formula(v, g, dim):
    """``w = g * v / ||v||`` in plain differentiable tensor ops."""
    return v * (g / _norm_except_dim(v, dim))


class WeightNormFunction(torch.autograd.Function):
    r"""``w = g * v / ||v||``, the norm over every dim but ``dim``.

    Backward, with ``n = ||v||`` and the sums over the same dims as the norm:

        dg = sum(dw * v) / n
        dv = (g / n) * dw - (g * dg / n**2) * v

    i.e. ``dv`` is ``(g / n)`` times ``dw`` with its component along ``v``
    removed: a step on ``v`` changes the direction, never the length, of ``w``
    (Salimans & Kingma 2016, eq. 3).
    """

    @staticmethod
    def forward(ctx, v, g, dim):
        norm = _norm_except_dim(v, dim)
        ctx.save_for_backward(v, g, norm)
        ctx.dim = dim
        return v * (g / norm)

    @staticmethod
    def backward(ctx, dw):
        v, g, norm = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            dim = ctx.dim
            return (*bnF.grads_through_formula(lambda v, g: _weight_norm_formula(v, g, dim), (v, g), dw), None)
        dv = dg = None
        if ctx.dim == -1:
            dot = (dw * v).sum()
        else:
            others = tuple(d for d in range(v.dim()) if d != ctx.dim)
            dot = (dw * v).sum(others, keepdim=True) if others else dw * v
        if ctx.needs_input_grad[1]:
            dg = (dot / norm).reshape(g.shape)
        if ctx.needs_input_grad[0]:
            dv = (g / norm) * dw - (g * dot / norm**3) * v
        return dv, dg, None


class _WeightNorm(NotScriptable, nn.Module):
    """The parametrization ``(g, v) -> g * v / ||v||``; ``original0`` is ``g``, ``original1`` is ``v``."""

    def __init__(self, dim=0):
        super().__init__()
        self.dim = -1 if dim is None else dim

    def _dim_for(self, v):
        # torch: -1 (dim=None) means the whole tensor; other negative dims wrap.
        return self.dim if self.dim >= -1 else self.dim + v.dim()

    def forward(self, weight_g, weight_v):
        if bnF.under_func_transform():
            return _weight_norm_formula(weight_v, weight_g, self._dim_for(weight_v))
        return WeightNormFunction.apply(weight_v, weight_g, self._dim_for(weight_v))

    def right_inverse(self, weight):
        """From a weight: ``g = ||weight||`` (per ``dim``), ``v = weight``."""
        weight_g = _norm_except_dim(weight, self._dim_for(weight))
        return weight_g, weight


def weight_norm(module, name="weight", dim=0):
    r"""Weight normalization, ``w = g * v / ||v||``; behaves like
    ``torch.nn.utils.parametrizations.weight_norm``.

    Replaces ``module.<name>`` by a parametrization with two parameters,
    ``module.parametrizations.<name>.original0`` (``g``, the length, one per
    slice along ``dim``; one number when ``dim=None``) and ``original1``
    (``v``, the direction), starting from ``g = ||w||``, ``v = w``. Old-style
    state dicts with ``<name>_g`` / ``<name>_v`` load too. Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, Integral)):
        raise InputError(f"weight_norm: dim must be an integer or None, got {dim!r}")
    if dim is not None and not -weight.dim() <= dim < weight.dim():
        raise DimensionError(f"weight_norm: dim out of range (expected None or one in [{-weight.dim()}, "
                             f"{weight.dim() - 1}] for the {weight.dim()}-D {name}), got {dim}")
    parametrize.register_parametrization(module, name, _WeightNorm(dim), unsafe=True)

    def _weight_norm_compat_hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
        if g_key in state_dict and v_key in state_dict:
            state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
            state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)

    module._register_load_state_dict_pre_hook(_weight_norm_compat_hook)
    return module


# --------------------------------------------------------------------------
# Weight standardization
# --------------------------------------------------------------------------


def _standardize_rows(weight, gain, eps, scale):
    """``(w_std, w_hat, invstd, factor)`` for the rows ``weight.reshape(out,
    -1)``, in plain differentiable tensor ops: ``w_std = factor * w_hat`` with
    ``factor = scale * gain`` (a column, or the float ``scale`` without a
    gain), computed in float32 for half weights (``w_std`` in the
    computation's dtype, shape ``(out, n)``)."""
    # The weights are small, so each op's dispatch costs more than its
    # arithmetic: a .to or .reshape that would return its input is skipped.
    dtype = _compute_dtype(weight.dtype)
    rows = weight if weight.dtype == dtype else weight.to(dtype)
    if rows.dim() != 2:
        rows = rows.reshape(rows.shape[0], -1)
    centered = rows - _row_mean(rows)  # a constant row standardizes to exactly 0
    invstd = torch.rsqrt(centered.square().mean(1, keepdim=True) + eps)
    w_hat = centered * invstd
    if gain is None:
        factor = scale
    else:
        factor = scale * (gain if gain.dtype == dtype else gain.to(dtype)).unsqueeze(1)
    return factor * w_hat, w_hat, invstd, factor


def _rows_to(rows, weight):
    """``rows.reshape(weight.shape).to(weight.dtype)``, without the calls that would return their input."""
    if rows.dim() != weight.dim():
        rows = rows.reshape(weight.shape)
    return rows if rows.dtype == weight.dtype else rows.to(weight.dtype)


def _weight_std_formula(weight, gain, eps, scale):
    """``WeightStandardizationFunction``'s map in plain differentiable tensor ops."""
    return _rows_to(_standardize_rows(weight, gain, eps, scale)[0], weight)


class WeightStandardizationFunction(torch.autograd.Function):
    r"""Each output unit's weights (a row of ``weight.reshape(out, -1)``)
    standardized: ``w_std = gain * scale * (w - mu) / sqrt(var + eps)``.

    Layer norm applied to the rows of the weight, so its backward is the
    compact formula on each row, with ``dw_hat = gain * scale * dw_std``:

        dw    = invstd * (dw_hat - mean(dw_hat) - w_hat * mean(dw_hat * w_hat))
        dgain = scale * sum(dw_std * w_hat)   (per row)

    (``bnlib.reference_alternatives.weightstd_backward`` is the NumPy version.)
    """

    @staticmethod
    def forward(ctx, weight, gain, eps, scale):
        w_std, w_hat, invstd, factor = _standardize_rows(weight, gain, eps, scale)
        # factor (gain * scale, a column) saved, so that backward need not compute it again
        ctx.save_for_backward(weight, gain, w_hat, invstd, None if gain is None else factor)
        ctx.eps, ctx.scale = eps, scale
        return _rows_to(w_std, weight)

    @staticmethod
    def backward(ctx, dw_std):
        weight, gain, w_hat, invstd, factor = ctx.saved_tensors
        scale = ctx.scale
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            eps = ctx.eps
            return (*bnF.grads_through_formula(lambda w, g: _weight_std_formula(w, g, eps, scale),
                                               (weight, gain), dw_std), None, None)
        # dw_std in the rows' shape and dtype (the inverse of _rows_to)
        if dw_std.dtype != w_hat.dtype:
            dw_std = dw_std.to(w_hat.dtype)
        if dw_std.dim() != 2:
            dw_std = dw_std.reshape(w_hat.shape)
        dweight = dgain = None
        if ctx.needs_input_grad[0]:
            if factor is None:  # no gain: dw_hat = scale * dw_std, and 1.0 * dw_std is dw_std, bit for bit
                dw_hat = dw_std if scale == 1.0 else scale * dw_std
            else:
                dw_hat = factor * dw_std
            dweight = _rows_to(_rows_backward(dw_hat, w_hat, invstd), weight)
        if gain is not None and ctx.needs_input_grad[1]:
            dgain = scale * (dw_std * w_hat).sum(1)
            if dgain.dtype != gain.dtype:
                dgain = dgain.to(gain.dtype)
        return dweight, dgain, None, None


class _WeightStandardization(NotScriptable, nn.Module):
    """The parametrization ``weight -> gain * scale * (weight - mu) / sqrt(var + eps)``, per output unit.

    ``gain`` (a parameter, one per output unit, starting at 1) and ``scale =
    1 / sqrt(fan_in)`` exist only in the scaled form.
    """

    def __init__(self, out_features, fan_in, eps, scaled, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.scaled = scaled
        self.scale = 1.0 / math.sqrt(fan_in) if scaled else 1.0
        if scaled:
            self.gain = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("gain", None)

    def forward(self, weight):
        # Without grad there is nothing for the Function to record: the same
        # ops without its overhead. Under a torch.func transform the formula
        # is what the transform can differentiate (see bnF.under_func_transform).
        if not torch.is_grad_enabled() or bnF.under_func_transform():
            return _weight_std_formula(weight, self.gain, self.eps, self.scale)
        return WeightStandardizationFunction.apply(weight, self.gain, self.eps, self.scale)

    def extra_repr(self):
        return f"eps={self.eps}, scaled={self.scaled}"


def weight_standardization(module, name="weight", eps=1e-6, scaled=False):
    r"""Weight standardization: every output unit's weights to mean 0, variance 1.

    Registers a parametrization (``torch.nn.utils.parametrize``) on
    ``module.<name>``, a weight of shape ``(out, in, *kernel)`` (``Linear``,
    ``Conv1d/2d/3d``): with ``mu_i`` and ``var_i`` the mean and (biased)
    variance of output unit ``i``'s ``n = in * prod(kernel)`` weights,

    .. math::

        \hat{w}_{ij} = \frac{w_{ij} - \mu_i}{\sqrt{\mathrm{var}_i + \epsilon}}

    (Qiao et al. 2019): layer norm of the weight's rows. The stored weight is
    ``module.parametrizations.<name>.original``; the layer computes with
    ``\hat{w}``. Paired with group norm it is meant for batches too small for BN.

    ``scaled=True`` is the *scaled* weight standardization of normalizer-free
    networks (Brock et al. 2021), ``g_i \hat{w}_{ij} / \sqrt{n}``, with a
    learnable gain ``g`` (``module.parametrizations.<name>[0].gain``, one per
    output unit, starting at 1): each row has length ``|g_i|``, so with
    ``g_i = 1`` an output unit's variance is that of its inputs when they are
    uncorrelated and of equal variance. A nonlinearity in between changes the
    variance (a ReLU passes on ``(1 - 1/pi) / 2`` of it), which the paper
    undoes with a constant after it (``1 / sqrt((1 - 1/pi) / 2) = 1.71`` for
    ReLU); setting the following layer's gain to that constant computes the same.

    ``eps`` must be small next to the rows' variance, which torch's default
    initialization makes ``1 / (3 n)``: ``7.2e-5`` for a 3x3 convolution over
    512 channels, whose standardized weights come out 0.7% too small with the
    default ``1e-6`` (6% with ``1e-5``). A constant row (all weights equal,
    for example zero-initialized) standardizes to zeros, and its gradient is
    scaled by ``1 / sqrt(eps)``.

    Only weights whose dim 0 is the output unit: a transposed convolution's
    weight, ``(in, out / groups, *kernel)``, is refused, and so is a weight
    that already has weight standardization.

    torch has no weight standardization; this follows the papers and the
    style of :func:`weight_norm`. ``torch.nn.utils.parametrize.remove_parametrizations(module,
    name)`` stores the standardized weight for inference. Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    check_positive_finite("eps", eps)
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise ValueError(f"weight_standardization standardizes each output unit's weights along dim 0; the weight "
                         f"of {type(module).__name__} has its input channels there, (in, out / groups, *kernel)")
    if parametrize.is_parametrized(module, name) and any(
            isinstance(p, _WeightStandardization) for p in module.parametrizations[name]):
        raise ValueError(f"{name} of {type(module).__name__} already has weight standardization")
    if not isinstance(scaled, bool):
        raise ValueError(f"scaled must be True or False, got {scaled!r}")
    fan_in = math.prod(weight.shape[1:])
    if weight.dim() < 2 or fan_in < 2:
        raise ValueError(f"weight_standardization: expected a {name} of shape (out, in, *kernel) with at least "
                         f"2 weights per output unit, got shape {tuple(weight.shape)}")
    parametrization = _WeightStandardization(weight.shape[0], fan_in, float(eps), scaled,
                                             device=weight.device, dtype=weight.dtype)
    parametrize.register_parametrization(module, name, parametrization)
    return module


# --------------------------------------------------------------------------
# Spectral normalization
# --------------------------------------------------------------------------


class DimensionError(IndexError, ValueError):
    """A dimension out of range: an ``IndexError`` as in torch, and a ``ValueError`` as in bnlib."""


def _l2_normalize(x, eps):
    """``x / max(||x||, eps)``, as ``torch.nn.functional.normalize``."""
    return x / torch.linalg.vector_norm(x).clamp_min(eps)


def _to_matrix(weight, dim):
    """``dim`` first, the rest flattened: ``(weight.shape[dim], -1)``."""
    if dim != 0:
        weight = weight.permute(dim, *(d for d in range(weight.dim()) if d != dim))
    return weight.flatten(1)


def _from_matrix(matrix, like, dim):
    """Inverse of :func:`_to_matrix`: a ``(h, w)`` matrix back to ``like``'s layout."""
    if dim == 0:
        return matrix.reshape(like.shape)
    order = [dim] + [d for d in range(like.dim()) if d != dim]
    permuted = matrix.reshape([like.shape[d] for d in order])
    return permuted.permute(*[order.index(d) for d in range(like.dim())])


def _spectral_norm_formula(weight, u, v, dim):
    """``W / (u^T W_mat v)`` in plain differentiable tensor ops, ``u`` and ``v`` constants."""
    return weight / torch.dot(u, torch.mv(_to_matrix(weight, dim), v))


class SpectralNormFunction(torch.autograd.Function):
    r"""``W_SN = W / sigma`` with ``sigma = u^T W_mat v``, ``u`` and ``v`` constants.

    Backward (Miyato et al. 2018, eq. 12), with ``d sigma / d W_mat = u v^T``:

        dW = dW_SN / sigma - (sum(dW_SN * W) / sigma**2) * u v^T

    (the ``u v^T`` term in the weight's layout): the gradient loses its
    component that would grow the largest singular value.
    """

    @staticmethod
    def forward(ctx, weight, u, v, dim):
        sigma = torch.dot(u, torch.mv(_to_matrix(weight, dim), v))
        ctx.save_for_backward(weight, u, v, sigma)
        ctx.dim = dim
        return weight / sigma

    @staticmethod
    def backward(ctx, grad_out):
        weight, u, v, sigma = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            dim = ctx.dim
            grad_weight, = bnF.grads_through_formula(
                lambda w: _spectral_norm_formula(w, u, v, dim), (weight,), grad_out)
            return grad_weight, None, None, None
        outer = _from_matrix(torch.outer(u, v), weight, ctx.dim)
        grad_weight = grad_out / sigma - ((grad_out * weight).sum() / sigma**2) * outer
        return grad_weight, None, None, None


class _SpectralNorm(NotScriptable, nn.Module):
    """The parametrization ``W -> W / sigma(W)``, ``sigma`` from power iteration.

    Buffers ``_u`` (``(h,)``) and ``_v`` (``(w,)``) hold the estimates of the
    top singular vectors of ``W_mat`` (``(h, w)``, ``dim`` first). At
    registration: random normal, then 15 iterations; then
    ``n_power_iterations`` more at every forward in training mode, none in
    eval mode. The same draws and order as torch's, so the same seed gives the
    same ``u``, ``v``.
    """

    def __init__(self, weight, n_power_iterations=1, dim=0, eps=1e-12):
        super().__init__()
        ndim = weight.ndim
        if dim >= ndim or dim < -ndim:
            raise DimensionError(f"Dimension out of range (expected to be in range of [-{ndim}, {ndim - 1}] but got {dim})")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, Integral) or n_power_iterations <= 0:
            raise ValueError(f"Expected n_power_iterations to be positive, but got n_power_iterations={n_power_iterations}")
        self.dim = dim if dim >= 0 else dim + ndim
        self.eps = eps
        if ndim > 1:
            self.n_power_iterations = n_power_iterations
            weight_mat = _to_matrix(weight, self.dim)
            h, w = weight_mat.size()
            u = weight_mat.new_empty(h).normal_(0, 1)
            v = weight_mat.new_empty(w).normal_(0, 1)
            self.register_buffer("_u", _l2_normalize(u, self.eps))
            self.register_buffer("_v", _l2_normalize(v, self.eps))
            self._power_method(weight_mat, 15)

    @bnF.buffer_update
    def _power_method(self, weight_mat, n_power_iterations):
        """``u <- normalize(W v)``, ``v <- normalize(W^T u)``, in place in the buffers."""
        captured = bnF.captured_by_transform(self._u)
        for _ in range(n_power_iterations):
            for buffer, matrix, other in ((self._u, weight_mat, self._v), (self._v, weight_mat.t(), self._u)):
                product = torch.mv(matrix, other)
                if captured:  # out=, the write a transform allows (see bnF.captured_by_transform)
                    torch.div(product, torch.linalg.vector_norm(product).clamp_min(self.eps), out=buffer)
                else:
                    buffer.copy_(_l2_normalize(product, self.eps))

    def forward(self, weight):
        if weight.ndim == 1:
            return _l2_normalize(weight, self.eps)
        if self.training:
            self._power_method(_to_matrix(weight.detach(), self.dim), self.n_power_iterations)
        u = self._u.clone(memory_format=torch.contiguous_format)
        v = self._v.clone(memory_format=torch.contiguous_format)
        if bnF.under_func_transform():
            return _spectral_norm_formula(weight, u, v, self.dim)
        return SpectralNormFunction.apply(weight, u, v, self.dim)

    def right_inverse(self, value):
        return value


def spectral_norm(module, name="weight", n_power_iterations=1, eps=1e-12, dim=None):
    r"""Spectral normalization, ``W_SN = W / sigma(W)``; behaves like
    ``torch.nn.utils.parametrizations.spectral_norm``.

    ``sigma(W)``, the largest singular value of the weight seen as a matrix
    (``dim`` first: 0, or 1 for transposed convolutions), is estimated by
    power iteration (``_SpectralNorm``) as in Miyato et al. (2018), so
    the layer's Lipschitz constant is about 1. The original weight lives in
    ``module.parametrizations.<name>.original``, the vectors in
    ``module.parametrizations.<name>[0]._u`` / ``._v``. Returns ``module``.
    """
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"Module '{module}' has no parameter or buffer with name '{name}'")
    if dim is None:
        dim = 1 if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    parametrize.register_parametrization(module, name, _SpectralNorm(weight, n_power_iterations, dim, eps))
    return module


# --------------------------------------------------------------------------
# Batch norm of padded sequences
# --------------------------------------------------------------------------


def masked_batch_norm(input, mask, running_mean=None, running_var=None, weight=None, bias=None,
                      training=False, momentum=0.1, eps=1e-5):
    r"""Batch norm of zero-padded sequences, over their real tokens only.

    ``input`` is ``(N, L, D)``, the layout of sequence models: ``N``
    sequences padded to length ``L``, ``D`` features per token; ``mask`` is
    ``(N, L)``, ``True`` at real tokens and ``False`` at padding. The
    result is batch norm (:func:`bnlib.functional.batch_norm`, with its
    hand-written backward and the other arguments' meaning) of the
    ``(M, D)`` matrix of the ``M`` real tokens, put back in their places,
    with 0 at the padding:

    .. math::

        \mu_d = \frac{1}{M} \sum_{(n, l)\,:\,\text{mask}_{nl}} x_{nld}, \qquad
        \sigma_d^2 = \frac{1}{M} \sum_{(n, l)\,:\,\text{mask}_{nl}} (x_{nld} - \mu_d)^2 .

    So a sequence's output does not depend on how far the batch is padded;
    it still depends on the other sequences of the batch, as batch norm's
    always does. Plain batch norm of the padded batch (``(N, D, L)`` for
    ``BatchNorm1d``) would average the padding's zeros into :math:`\mu`
    and :math:`\sigma^2`.

    The values at the padding are never read (they need not be zeros) and
    get no gradient. As in ``batch_norm``, ``training=False`` (the default)
    normalizes with ``running_mean`` and ``running_var``, which must then be
    given; ``training=True`` uses the real tokens' statistics and updates the
    running estimates, when given, from them alone. Fewer than two real
    tokens in training is an error, as one value per channel is for
    batch norm.
    """
    if not torch.is_tensor(input) or input.dim() != 3:
        shape = tuple(input.shape) if torch.is_tensor(input) else type(input).__name__
        raise InputError(f"masked_batch_norm expected input of shape (N, L, D), got {shape}")
    if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != tuple(input.shape[:2]):
        got = (f"{mask.dtype} of shape {tuple(mask.shape)}" if torch.is_tensor(mask) else type(mask).__name__)
        raise InputError(f"masked_batch_norm expected a bool mask of shape (N, L) = {tuple(input.shape[:2])}, "
                         f"got {got}")
    real = input[mask]                                  # (M, D): every real token of every sequence
    if training and real.shape[0] < 2:
        raise InputError(f"masked_batch_norm needs more than 1 real token when training "
                         f"(a variance of fewer is 0/0), got {real.shape[0]}")
    y = bnF.batch_norm(real, running_mean, running_var, weight, bias, training, momentum, eps)
    return input.new_zeros(input.shape).index_put((mask,), y)
