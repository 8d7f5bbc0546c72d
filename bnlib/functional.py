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
own dtype. The formulas are written here with tensor ops, so any device
works as it is. Two fused back ends do the same work in fewer passes over
memory: on CPU (float32 and float64), the C++ loops of ``bnlib.cpu_kernels``,
used when they could be built here; on CUDA, when Triton is importable, the
kernels of ``bnlib.triton_kernels``. :func:`cpu_backend` picks the CPU path
(``"auto"``, ``"kernels"`` or ``"tensor_ops"``), e.g. to compare the two.

Under a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jacfwd``,
``hessian``, ...), or while a forward-mode AD level
(``torch.autograd.forward_ad.dual_level``) is open, every entry point takes
a third path, the formula path (``under_func_transform()``): the same map
in plain differentiable tensor ops (``batch_norm_formula`` in training mode,
``batch_norm_eval_formula`` in eval mode), which the transform
differentiates itself. The hand-written backward passes, the C++ kernels
and the Triton kernels step aside there; outside a transform they run as
above.
"""

import contextlib
import functools
import math
import numbers
import warnings

import torch

from bnlib._checks import InputError, InputTypeError, check_batch_size, check_floating_dtype, values_per_channel

__all__ = ["batch_norm", "batch_norm_train", "cpu_backend", "get_cpu_backend", "set_cpu_backend"]


CPU_BACKENDS = ("auto", "kernels", "tensor_ops")
_cpu = {"backend": "auto"}


def get_cpu_backend():
    """The CPU path in use: ``"auto"`` (the fused kernels where they run, else
    tensor ops), ``"kernels"`` or ``"tensor_ops"``."""
    return _cpu["backend"]


def set_cpu_backend(name):
    """Choose the CPU path (see :func:`get_cpu_backend`); returns the previous one.

    Raises:
        ValueError: a name that is not one of ``CPU_BACKENDS``.
        RuntimeError: ``"kernels"`` where the fused kernels cannot be built.
    """
    if name not in CPU_BACKENDS:
        raise ValueError(f"cpu backend should be one of {CPU_BACKENDS}, got {name!r}")
    if name == "kernels":
        from bnlib import cpu_kernels

        if not cpu_kernels.is_available():
            raise RuntimeError(f"bnlib's fused CPU kernels are not available: {cpu_kernels._state['error']}")
        _cpu["ops"] = cpu_kernels.ops()  # loaded now, so that torch.compile finds them loaded
    previous, _cpu["backend"] = _cpu["backend"], name
    return previous


@contextlib.contextmanager
def cpu_backend(name):
    """``with cpu_backend("tensor_ops"): ...`` runs the block on that CPU path."""
    previous = set_cpu_backend(name)
    try:
        yield
    finally:
        _cpu["backend"] = previous


_KERNEL_DTYPES = (torch.float32, torch.float64)


# torch's own test for it (torch.autograd.Function asks it too); a torch
# without it has no torch.func.
_functorch_check = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
# torch 2.4's dynamo cannot trace the check (a non-Tensor bool from a torch._C
# call; pytorch#134889 taught it, after 2.4): while it traces, no transform is active.
_DYNAMO_TRACES_FUNCTORCH_CHECK = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def _functorch_transforms_active():
    if not _DYNAMO_TRACES_FUNCTORCH_CHECK and torch.compiler.is_compiling():
        return False
    return _functorch_check()


def _forward_ad_active():
    """Whether a ``torch.autograd.forward_ad.dual_level()`` is open (its
    level counter, -1 outside one)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0


def under_func_transform():
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``,
    ``jacfwd``, ``hessian``, ...) is running, or a forward-mode AD level
    (``torch.autograd.forward_ad.dual_level``) is open.

    bnlib's autograd Functions have hand-written backward passes, but no vmap
    or forward-mode rules, and the fused kernels are opaque to the
    transforms. Under a transform every entry point computes the same map in
    plain tensor ops instead (the ``*_formula`` functions that second
    derivatives differentiate), which every transform composes with; the
    transforms then differentiate the formula themselves (forward-mode AD
    too: the Functions have no ``jvp``). Outside one, the hand-written
    passes and the kernels run as always.

    ``torch.jit.trace`` takes the same path: it records a Function and also
    the operations inside its forward, so a Function that updates the
    running estimates would have them updated twice per call of the traced
    module; the formula path's ops are recorded once, as torch's are.

    So does ``torch.export``: it keeps a Function's forward but not its
    backward, nor a gradient for the C++ kernels, so an exported module
    would give no gradients (silently, on float32) or fail on an ``out=``
    write with grad on; and a program that names the kernels' ops loads only
    where they are built and loaded. The formula's ops are torch's own: the
    exported program trains, loads anywhere, and keeps dynamic sizes.
    """
    return (_functorch_transforms_active() or _forward_ad_active() or torch.jit.is_tracing()
            or _is_exporting())


# torch >= 2.5; the non-strict and strict export both set it
# (torch 2.4 has no is_exporting; its export is dynamo's tracing, so any dynamo trace counts)
_is_exporting = getattr(torch.compiler, "is_exporting", torch.compiler.is_dynamo_compiling)


def buffer_update(fn):
    """``torch.no_grad()`` for a function that writes running estimates (or
    other buffers) from statistics that must not enter the graph. Under
    ``torch.export`` the tensors it is given are detached instead: torch 2.13
    saves a program that holds a ``no_grad`` region, but cannot load it
    ("wrap_with_set_grad_enabled is missing val field")."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if _is_exporting():
            return fn(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


_functorch_level = getattr(getattr(torch._C, "_functorch", None), "maybe_get_level", None)


def from_inside_transform(t):
    """Whether ``t``, inside a running ``torch.func`` transform, is a tensor
    of its innermost level (an input it maps over or differentiates, e.g.
    buffers stacked by ``torch.func.stack_module_state`` and vmapped over)
    rather than one captured from outside it, which the transform will not
    let a layer update. Without the functorch internals to ask: False."""
    if _functorch_level is None:
        return False
    return _functorch_level(t) >= torch._C._functorch.current_level()


def captured_by_transform(t):
    """Whether a ``torch.func`` transform is running and ``t`` comes from
    outside it: the transform then refuses in-place methods on ``t``, but
    takes an op's ``out=`` (which is how bnlib writes such a buffer)."""
    return _functorch_transforms_active() and not from_inside_transform(t)


def _cpu_kernels(x):
    """``torch.ops.bnlib_cpu`` when the fused CPU kernels should handle ``x``, else None.

    They take float32 and float64 CPU tensors with at least one element;
    half inputs, empty batches and other devices stay on the tensor-op path.
    (Called on every step, so it is written for speed: attribute reads only.
    Under a ``torch.func`` transform its callers take the formulas before
    asking it.)
    """
    if _cpu["backend"] == "tensor_ops" or not x.is_cpu or x.dtype not in _KERNEL_DTYPES or x.numel() == 0:
        return None
    ops = _cpu.get("ops")
    if ops is None:
        if torch.compiler.is_compiling():
            # Loading looks at files, which torch.compile cannot trace: a graph
            # compiled before any eager call takes the tensor-op path.
            return None
        from bnlib import cpu_kernels

        ops = _cpu["ops"] = cpu_kernels.ops() if cpu_kernels.load() else False
    return ops or None


def _channels_last_format(t):
    """``torch.channels_last`` (4-D) or ``torch.channels_last_3d`` (5-D) when ``t`` is laid out so, else None."""
    if t.is_contiguous():
        return None
    for ndim, fmt in ((4, torch.channels_last), (5, torch.channels_last_3d)):
        if t.dim() == ndim and t.is_contiguous(memory_format=fmt):
            return fmt
    return None


def to_float64(t, device=None):
    """``t`` detached, as float64, on ``device`` (default: its own), or on
    the CPU where that device has no float64 (MPS): for small per-channel
    computations (folding, statistics) that want the digits. Moved first,
    then converted, so no float64 tensor is made on MPS."""
    device = t.device if device is None else torch.device(device)
    if device.type == "mps":
        device = torch.device("cpu")
    return t.detach().to(device).to(torch.float64)


def _dense(t):
    """``t`` itself when its memory is in (N, C, ...) or channels-last order, else a contiguous copy."""
    if t.is_contiguous() or _channels_last_format(t) is not None:
        return t
    return t.contiguous()


def _dense_like(t, x):
    """``t`` laid out in memory as ``x`` (a tensor ``_dense`` returned)."""
    if x.is_contiguous():
        return t.contiguous()
    fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _per_channel_arg(t, x):
    """A (C,) tensor as the kernels take it: x's dtype, contiguous (a
    differentiable conversion, when one is needed)."""
    if t is None or (t.dtype == x.dtype and t.is_contiguous()):
        return t
    return t.to(x.dtype).contiguous()


def _running_args(running_mean, running_var, x):
    """The running estimates when the kernels can update them in place (both
    given, of x's dtype, contiguous, on CPU), else None."""
    if running_mean is None or running_var is None:
        return None
    for t in (running_mean, running_var):
        if t.dtype != x.dtype or not t.is_contiguous() or not t.is_cpu:
            return None
    return running_mean, running_var


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
    if torch.compiler.is_compiling():
        out = None  # the compiler plans memory itself (and older versions cannot trace out=)
    if ndim == 2:
        return torch.addcmul(shift.expand_as(x), x, scale, out=out)
    return torch.mul(x, scale, out=out).add_(shift)


def _stat_dims(ndim):
    return [0] + list(range(2, ndim))


def _eps_in(eps, dtype):
    """``eps`` as it can be added in ``dtype``: at least the dtype's smallest
    positive (subnormal) number, ``tiny * eps`` of its ``finfo``. An ``eps``
    below float32's (1.4e-45), which bnlib accepts as torch does, would round
    to 0 there, and a constant channel (variance 0) would give 0 * inf = NaN
    instead of torch's 0. (Lifting it to the smallest normal number, 1.2e-38,
    changed the result for an eps of 1e-40 on values near 1e-20, where the C++
    loops, which add eps in float64, and torch use it as given.)"""
    info = torch.finfo(dtype)
    return max(eps, info.tiny * info.eps)


def _channel_mean(t, ones_over_m=None):
    """Per-channel mean of ``t`` (over every axis but 1), as a (C,) tensor.

    ``t.mean(dims)`` is the plain spelling; two faster ones are used where
    they apply (1 thread, torch 2.13, data not in cache):

    - ``ones_over_m`` given, for (N, C): the matrix-vector product
      ``t^T @ (1/m, ..., 1/m)`` runs in BLAS, 0.5x the time of ``t.mean(0)``
      for (4096, 1024) and 0.4x for (256, 1024). BLAS adds the N terms in
      order, so its relative error grows like N * 2^-24 in the worst case
      (torch's reduction sums pairwise): callers use it for sums whose
      error the result can carry (squares, gradients), not for the mean of
      the input, which at mean 1e4 would come out ~3e-6 off and move the
      variance by ~1e-3; and only up to ``BLAS_MEAN_MAX_ROWS`` rows.
    - contiguous (N, C, *spatial): summing the contiguous inner axis first,
      ``t.flatten(2).sum(2).sum(0)``, takes 0.4x the time of one
      reduction over (0, 2, 3) for (64, 64, 32, 32) and (128, 256, 14, 14).
    """
    if ones_over_m is not None:
        return torch.mv(t.t(), ones_over_m)
    if t.dim() > 2 and t.is_contiguous():
        return t.flatten(2).sum(2).sum(0).div_(values_per_channel(t.shape))
    return t.mean(_stat_dims(t.dim()))


# The most rows _channel_mean's BLAS path adds up. Its error grows with the
# rows: for float32 squares of mean 1e4, std 1 data, the variance's relative
# error was 4.7e-4 at 2^20 rows and 1.4e-3 at 2^21, over the contract's 1e-3;
# at 2^18 it is about 1e-4. Beyond that, torch's pairwise reduction.
BLAS_MEAN_MAX_ROWS = 2**18


def _ones_over_m(x, m):
    """``(1/m, ..., 1/m)`` for ``_channel_mean``'s BLAS path on (N, C) with at
    most ``BLAS_MEAN_MAX_ROWS`` rows, else None."""
    if x.dim() != 2 or not 0 < m <= BLAS_MEAN_MAX_ROWS:
        return None
    return torch.full((m,), 1.0 / m, dtype=x.dtype, device=x.device)


def _mean_var(x, ones_over_m=None):
    """Per-channel mean and biased variance of ``x``, and a tensor of x's
    shape holding the squares ``(x - mu)^2``, which the caller may reuse
    (the forward pass writes y into it, so it allocates one tensor, not two).

    Two passes, stable in float32 for any mean: first ``mu``, then the mean
    of ``(x - mu)^2``. The one-pass ``E[x^2] - E[x]^2`` loses every digit
    when ``|mu| >> std``. ``mse_loss(..., reduction="none")`` is the
    elementwise ``(x - mu)^2`` in one pass over memory: 0.75-0.9x the time
    of a subtraction followed by an in-place square (1 thread, all four
    benchmark shapes).
    """
    mu = _channel_mean(x)
    squares = torch.nn.functional.mse_loss(x, _per_channel(mu, x.dim()).expand_as(x), reduction="none")
    return mu, _channel_mean(squares, ones_over_m), squares


def _batch_stats(x):
    """Per-channel mean and biased variance, the centered input, and a
    scratch buffer of x's shape, for callers that want ``x - mu`` itself
    (batch renorm). Stable: see ``_mean_var``.
    """
    mu, var, squares = _mean_var(x, _ones_over_m(x, values_per_channel(x.shape)))
    return mu, var, x - _per_channel(mu, x.dim()), squares


def grads_through_formula(formula, inputs, dy):
    """The gradients of ``formula(*inputs)`` with respect to the ``inputs``
    that require grad (None for the others), found by autograd with a graph,
    so that they can be differentiated again.

    The hand-written backward passes compute with statistics their forward
    saved (``mu``, ``invstd``), which carry no graph: differentiating their
    result (``create_graph=True``, as a gradient penalty does) would treat
    the statistics as constants and give wrong second derivatives. So when a
    backward is asked for a graph, it calls this with the same map written
    in differentiable tensor ops; first-order gradients stay hand-written.
    """
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    with torch.enable_grad():
        grads = iter(torch.autograd.grad(formula(*inputs), wanted, dy, create_graph=True, allow_unused=True))
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


def batch_norm_formula(input, weight, bias, eps):
    """Training-mode batch norm in plain differentiable tensor ops (the
    definition, two passes), for :func:`grads_through_formula`."""
    x = input.to(_compute_dtype(input.dtype))
    dims = _stat_dims(x.dim())
    mu = x.mean(dims, keepdim=True)
    x_centered = x - mu
    y = x_centered * torch.rsqrt(x_centered.square().mean(dims, keepdim=True) + _eps_in(eps, x.dtype))
    if weight is not None:
        y = y * _per_channel(weight.to(x.dtype), x.dim())
    if bias is not None:
        y = y + _per_channel(bias.to(x.dtype), x.dim())
    return y.to(input.dtype)


def batch_norm_eval_formula(input, weight, bias, running_mean, running_var, eps):
    """Eval-mode batch norm in plain differentiable tensor ops: the map of
    ``BatchNormEvalFunction``, for ``torch.func`` transforms."""
    x = input.to(_compute_dtype(input.dtype))
    ndim = x.dim()
    y = (x - _per_channel(running_mean.to(x.dtype), ndim)) * _per_channel(
        torch.rsqrt(running_var.to(x.dtype) + _eps_in(eps, x.dtype)), ndim)
    if weight is not None:
        y = y * _per_channel(weight.to(x.dtype), ndim)
    if bias is not None:
        y = y + _per_channel(bias.to(x.dtype), ndim)
    return y.to(input.dtype)


def _detached_batch_stats(input):
    """Per-channel mean and biased variance of ``input``, without a graph (for
    the running estimates), in plain tensor ops."""
    x = input.detach().to(_compute_dtype(input.dtype))
    dims = _stat_dims(x.dim())
    mu = x.mean(dims)
    return mu, (x - _per_channel(mu, x.dim())).square().mean(dims)


_legacy_batched = getattr(getattr(torch._C, "_functorch", None), "is_legacy_batchedtensor", None)


def _is_legacy_batched(t):
    """Whether ``t`` is batched by autograd's own vmap, as ``dy`` is in a
    backward under ``torch.autograd.grad(..., is_grads_batched=True)`` (no
    functorch level is active there). Without the internals to ask, or while
    torch.compile traces (it cannot call them, and compiles no such backward): False."""
    if _legacy_batched is None or torch.compiler.is_compiling():
        return False
    return _legacy_batched(t)


def _train_backward_plain(ctx, x, mu, invstd, weight, dy32, dy_dtype):
    """``BatchNormTrainFunction.backward``'s three gradients in plain
    out-of-place tensor ops: the same formulas, for a batched ``dy``."""
    ndim, dims = x.dim(), _stat_dims(x.dim())
    x_hat = (x - _per_channel(mu, ndim)) * _per_channel(invstd, ndim)
    grad_input = grad_weight = grad_bias = None
    if ctx.needs_input_grad[0]:
        k = invstd if weight is None else invstd * weight.to(invstd.dtype)
        # (an empty batch: NaN means, broadcast into an empty gradient)
        mean_dy, mean_dy_x_hat = dy32.mean(dims, keepdim=True), (dy32 * x_hat).mean(dims, keepdim=True)
        grad_input = (_per_channel(k, ndim) * (dy32 - mean_dy - x_hat * mean_dy_x_hat)).to(dy_dtype)
    if weight is not None and ctx.needs_input_grad[1]:
        grad_weight = (dy32 * x_hat).sum(dims).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = dy32.sum(dims).to(weight.dtype if weight is not None else dy32.dtype)
    return grad_input, grad_weight, grad_bias


class BatchNormTrainFunction(torch.autograd.Function):
    """Training mode: batch statistics; the compact backward formula.

    ``forward`` returns ``(y, mu, var)``; ``mu`` and ``var`` (biased) are not
    differentiable outputs, returned so the caller can update running stats.

    Memory traffic, not arithmetic, sets the time on CPU, and so does every
    fresh tensor of x's size (glibc hands big blocks back to the OS, so each
    one costs page faults). The forward pass therefore allocates one such
    tensor (y, first used as scratch for the statistics) and saves the input
    itself, not ``x - mu``, for the backward, which allocates one (dx).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps, running_mean=None, running_var=None, momentum=0.0):
        x = input.to(_compute_dtype(input.dtype))
        ndim = x.dim()
        m = values_per_channel(x.shape)
        ones_over_m = _ones_over_m(x, m)
        mu, var, y = _mean_var(x, ones_over_m)  # y is, for now, the squares
        invstd = torch.rsqrt(var + _eps_in(eps, var.dtype))
        # y = gamma * (x - mu) * invstd + beta = x * scale + shift, one pass over x
        # (the same spelling as torch's own kernel): scale = gamma * invstd,
        # shift = beta - mu * scale.
        scale = invstd if weight is None else invstd * weight.to(x.dtype)
        if bias is None:
            shift = torch.mul(mu, scale).neg_()
        else:
            shift = torch.addcmul(bias.to(x.dtype), mu, scale, value=-1)
        y = _fma(shift, x, scale, out=y)
        if running_mean is not None and running_var is not None:
            # Here, before anything is saved for backward, as torch's op and
            # bnlib's kernels update them: a non-reentrant checkpoint stops
            # its recomputation at the last saved tensor, and torch's BN has
            # then updated its estimates a second time (and counted the batch).
            _update_running_stats(running_mean, running_var, mu, var, m, momentum)
        # The input itself, not x (for half inputs x is a float32 copy, twice
        # the bytes): the backward converts it again, and a backward asked
        # for a graph differentiates the formula from the input.
        ctx.save_for_backward(input, mu, invstd, weight, bias)
        ctx.eps = eps
        ctx.ones_over_m = ones_over_m
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mu, var)
        # mu and var get no gradient: leave theirs None rather than have
        # autograd fill two tensors of zeros that backward ignores.
        ctx.set_materialize_grads(False)
        return y.to(input.dtype), mu, var

    @staticmethod
    def backward(ctx, dy, _grad_mu, _grad_var):
        r"""With ``x_hat = (x - mu) * invstd`` and ``m`` values per channel:

        dbeta  = sum(dy)
        dgamma = sum(dy * x_hat)
        dx     = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))

        The last line is the chain rule through x_hat, mu and var collapsed:
        the mean's path contributes ``-sum(dy)/m`` and the variance's path
        ``-x_hat * sum(dy * x_hat) / m`` (derived in the chapter "The Batch
        Normalization algorithm"). With ``k = gamma * invstd`` it is affine in
        ``dy`` and ``x``, per channel, in the chapter's letters:

        ``dx = k * dy + c1 * (x - mu) + c0``,
        ``c1 = -k * invstd^2 * mean(dy * (x - mu))``, ``c0 = -k * mean(dy)``.

        The code folds the constants into ``dx = k * dy + a * x + b`` with
        ``a = c1`` and ``b = c0 - c1 * mu``, so after the two reductions dx
        takes two passes over memory.
        """
        input, mu, invstd, weight, bias = ctx.saved_tensors
        if dy is None:  # grads are not materialized (see forward); no gradient reached y
            return None, None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: gradients that can be differentiated again
            inputs = (input, weight, bias)
            return (*grads_through_formula(lambda *t: batch_norm_formula(*t, ctx.eps), inputs, dy),
                    None, None, None, None)
        x = input.to(mu.dtype)
        ndim = x.dim()
        ones_over_m = ctx.ones_over_m
        dy32 = dy.to(x.dtype)
        if under_func_transform() or _is_legacy_batched(dy):
            # A batched dy (autograd.grad(..., is_grads_batched=True), a
            # vectorized jacobian): the same formula out of place, in ops vmap
            # has rules for (no flatten, no in-place product, no BLAS mean).
            return (*_train_backward_plain(ctx, x, mu, invstd, weight, dy32, dy.dtype), None, None, None, None)
        if values_per_channel(x.shape) == 0:
            # An empty batch: its statistics are NaN, but nothing depends on them.
            zeros = torch.zeros_like(invstd)
            mean_dy, mean_dy_xc, invstd = zeros, zeros, zeros
        else:
            mean_dy = _channel_mean(dy32, ones_over_m)
            # dy * (x - mu), in the buffer that becomes dx. A subtraction and an
            # in-place product measured as fast as the one fused op that exists
            # (aten's mse_loss_backward, 2 * (x - mu) * dy): 0.93-1.0x.
            products = torch.sub(x, _per_channel(mu, ndim)).mul_(dy32)
            mean_dy_xc = _channel_mean(products, ones_over_m)

        grad_input = grad_weight = grad_bias = None
        m = values_per_channel(x.shape)
        if ctx.needs_input_grad[0]:
            k = invstd if weight is None else invstd * weight.to(invstd.dtype)
            a = k * invstd.square() * mean_dy_xc
            a.neg_()
            b = torch.addcmul(k * mean_dy, a, mu).neg_()
            dx = _fma(b, x, a, out=products if m > 0 else None)
            dx.addcmul_(dy32, _per_channel(k, ndim))
            grad_input = dx.to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (mean_dy_xc * invstd * m).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = (mean_dy * m).to(weight.dtype if weight is not None else dy32.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class FusedCPUTrainFunction(torch.autograd.Function):
    """Training mode on the fused CPU kernels: the math of
    ``BatchNormTrainFunction`` in one C++ call each way
    (``bnlib/csrc/batch_norm_cpu.cpp``), the forward also updating the
    running estimates when it is given them. Nothing else happens on the way:
    on small inputs Python's per-call work is a visible share of a step. Eager
    calls take this Function's C++ twin, ``bnlib_cpu::batch_norm_train``
    (the same kernels, autograd's bookkeeping in C++); ``torch.compile``
    traces this one.

    Takes what ``batch_norm_train`` prepared: ``x`` dense (contiguous or
    channels-last), ``weight`` and ``bias`` in x's dtype, running estimates in
    x's dtype or None. Returns ``(y, mu, var)`` as ``BatchNormTrainFunction``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
        y, mu, var, invstd = _cpu["ops"].batch_norm_forward(x, weight, bias, running_mean, running_var, momentum, eps)
        ctx.save_for_backward(x, mu, invstd, weight, bias)
        ctx.eps = eps
        ctx.mark_non_differentiable(mu, var)
        ctx.set_materialize_grads(False)
        return y, mu, var

    @staticmethod
    def backward(ctx, dy, _grad_mu, _grad_var):
        if dy is None:
            return None, None, None, None, None, None, None
        x, mu, invstd, weight, bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: see BatchNormTrainFunction.backward
            grads = grads_through_formula(lambda *t: batch_norm_formula(*t, ctx.eps), (x, weight, bias), dy)
            return (*grads, None, None, None, None)
        needs = ctx.needs_input_grad
        dx, dgamma, dbeta = _cpu["ops"].batch_norm_backward(_dense_like(dy, x), x, mu, invstd, weight, needs[0])
        return (dx if needs[0] else None, dgamma if needs[1] else None, dbeta if needs[2] else None,
                None, None, None, None)


def batch_norm_train(input, weight, bias, eps, running_mean=None, running_var=None, momentum=0.0):
    """Training-mode batch norm: ``(y, mu, var)``, with ``mu`` and ``var``
    (biased) the batch statistics, which carry no gradient; the running
    estimates, when both are given, are updated in place with ``momentum``.

    Runs ``FusedCPUTrainFunction`` where the fused CPU kernels apply, else
    ``BatchNormTrainFunction`` (tensor ops); under a ``torch.func`` transform,
    ``batch_norm_formula``. No argument checks: callers
    (``batch_norm``, the ghost-batch module) have made them.
    """
    update = running_mean is not None and running_var is not None
    if under_func_transform():
        y = batch_norm_formula(input, weight, bias, eps)
        mu, var = _detached_batch_stats(input)
        if update:
            _update_running_stats(running_mean, running_var, mu, var, values_per_channel(input.shape), momentum)
        return y, mu, var
    if _cpu_kernels(input) is not None:
        x = _dense(input)
        running = _running_args(running_mean, running_var, x)
        # Conversions happen here, outside the Function, so autograd carries
        # the gradients back through them.
        args = (x, _per_channel_arg(weight, x), _per_channel_arg(bias, x), *(running or (None, None)),
                float(momentum), eps)
        if not torch.is_grad_enabled():  # no graph is recorded (inference, a benchmark): no Function at all
            y, mu, var, _ = _cpu["ops"].batch_norm_forward(*args)
        elif torch.compiler.is_compiling():
            y, mu, var = FusedCPUTrainFunction.apply(*args)  # the Python Function, which the compiler traces
        else:
            # The same Function written in C++ (bnlib_cpu::batch_norm_train),
            # the same numbers: on (32, 64) its forward adds 9 us to the
            # kernel's call where the Python one adds 29, and forward+backward
            # takes 35 us less.
            y, mu, var = _cpu["ops"].batch_norm_train(*args)
        if update and running is None:  # buffers the kernel cannot update in place
            _update_running_stats(running_mean, running_var, mu, var, values_per_channel(x.shape), momentum)
        return y, mu, var
    # _dense: a strided input's output comes back contiguous, as torch's
    y, mu, var = BatchNormTrainFunction.apply(_dense(input), weight, bias, eps, running_mean if update else None,
                                              running_var if update else None, momentum)
    return y, mu, var


def _eval_kernel(input, weight, bias, running_mean, running_var, eps):
    """Eval mode on the fused CPU kernels: ``(y, mean, invstd)``, the last two
    as the backward needs them."""
    x = _dense(input)
    mean = _per_channel_arg(running_mean, x)
    y, invstd = _cpu["ops"].batch_norm_eval(
        x, _per_channel_arg(weight, x), _per_channel_arg(bias, x), mean, _per_channel_arg(running_var, x), eps
    )
    return y, mean, invstd


def _mean_for_backward(ctx, mean, weight):
    """The running mean as the eval-mode forward used it, for ``dgamma``
    (nothing else in the backward needs it): a copy, since ``mean`` may be
    the buffer itself, which a train-mode call of the same layer before
    this backward (a teacher branch in eval mode, a student in training)
    updates in place. torch's own op then computes ``dgamma`` from the
    updated buffer; this is the gradient of the map the forward applied,
    as the Triton path computes it."""
    return mean.clone() if weight is not None and ctx.needs_input_grad[1] else None


class BatchNormEvalFunction(torch.autograd.Function):
    """Eval mode: the running estimates are constants, so y is affine in x.

    ``y = x * scale + shift`` with ``scale = gamma * invstd`` and
    ``shift = beta - mean * scale`` (the C++ kernels compute
    ``(x - mean) * scale + beta``, the same map), ``dx = dy * scale``,
    ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)``. An eager call on the
    C++ kernels takes this Function's C++ twin,
    ``bnlib_cpu::batch_norm_eval_with_grad`` (the same ops); ``torch.compile``
    and the tensor-op path take this one.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, eps):
        ctx.has_bias = bias is not None
        if _cpu_kernels(input) is not None:
            y, mean, invstd = _eval_kernel(input, weight, bias, running_mean, running_var, eps)
            ctx.save_for_backward(input, _mean_for_backward(ctx, mean, weight), invstd, weight)
            return y
        dtype = _compute_dtype(input.dtype)
        x = input.to(dtype)
        mean = running_mean.to(dtype)
        invstd = torch.rsqrt(running_var.to(dtype) + _eps_in(eps, dtype))
        scale = invstd if weight is None else invstd * weight.to(dtype)
        shift = -mean * scale
        if bias is not None:
            shift = shift + bias.to(dtype)
        y = _fma(shift, x, scale)
        ctx.save_for_backward(input, _mean_for_backward(ctx, mean, weight), invstd, weight)
        return y.to(input.dtype)

    @staticmethod
    def backward(ctx, dy):
        input, mean, invstd, weight = ctx.saved_tensors
        ndim = input.dim()
        dims = _stat_dims(ndim)
        dy32 = dy.to(invstd.dtype)
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            scale = invstd if weight is None else invstd * weight.to(invstd.dtype)
            grad_input = (dy32 * _per_channel(scale, ndim)).to(dy.dtype)
            fmt = _channels_last_format(input)
            if fmt is not None and not grad_input.is_contiguous(memory_format=fmt):
                # dx in the input's layout, as torch's and the training path's:
                # a contiguous dy would otherwise hand a channels-last network
                # an NCHW gradient to convert at its next layer
                grad_input = grad_input.contiguous(memory_format=fmt)
        if weight is not None and ctx.needs_input_grad[1]:
            x_hat = (input.to(invstd.dtype) - _per_channel(mean, ndim)) * _per_channel(invstd, ndim)
            grad_weight = (dy32 * x_hat).sum(dims).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = dy32.sum(dims).to(weight.dtype if weight is not None else dy32.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


def check_same_device(input, **tensors):
    """The tensors given (by name) must be on ``input``'s device. The C++
    kernels' ops dispatch on every argument: a meta weight beside a CPU
    input ran their fake kernel, which returns uninitialized memory, where
    torch raises."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != input.device:
            raise InputError(f"Expected all tensors to be on the same device, but got the input on {input.device} "
                             f"and {name} on {tensor.device}")


def check_tensor_input(caller, input):
    """``input`` is a tensor: an array or a list gets an ``InputTypeError``
    that names the caller, not an ``AttributeError`` from deep inside it."""
    if not isinstance(input, torch.Tensor):
        raise InputTypeError(f"{caller} expected the input to be a tensor, got {type(input).__name__}")


def check_training_batch(input):
    """Training needs more than one value per channel
    (:func:`bnlib._checks.check_batch_size`), the size printed as torch
    prints it. The text is built only when the check fails: under
    ``torch.compile`` with dynamic shapes, printing a symbolic size breaks
    the graph. ``torch.export`` assumes every dynamic size is at least 2, so
    the test above is settled at export time and the program would take a
    batch of one and divide by ``m - 1 = 0``: an op of the graph checks it
    instead, at run time."""
    m = values_per_channel(input.shape)
    if _is_exporting():
        torch._assert_async(torch.scalar_tensor(m) > 1, "Expected more than 1 value per channel when training")
    elif m == 1:
        check_batch_size(input.shape, str(input.size()))


# The fast path of check_batch_norm_args takes these types only; a tensor
# subclass (which may override dim or device) gets the full check.
_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _check_per_channel(name, tensor, input, vector_only=False):
    """``tensor`` (if given) holds one real floating-point value per channel
    of ``input``, on its device, in a vector (C,): torch's kernels require
    it of the running estimates (and take a weight of shape (C, 1), which is
    refused here, as torch's group norm refuses it; a 0-dim weight for one
    channel passes, as in torch's batch norm, unless ``vector_only``: group
    norm refuses it). Checked before anything
    is written: an integer running estimate would be truncated, a (C, 1) one
    half updated before the update failed."""
    if tensor is None:
        return
    if not isinstance(tensor, torch.Tensor):
        raise InputTypeError(f"{name} should be a tensor (or None), got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise InputError(f"{name} should be a floating-point tensor, got {tensor.dtype}")
    scalar_refused = vector_only or name.startswith("running_")
    if (tensor.dim() > 1 or (tensor.dim() == 0 and scalar_refused)) and tensor.numel() == input.shape[1]:
        raise InputError(f"{name} should be a vector of {input.shape[1]} elements (one per channel), "
                         f"got shape {list(tensor.shape)}")
    if tensor.numel() != input.shape[1]:
        raise InputError(
            f"{name} should have {input.shape[1]} elements (one per channel of the input), "
            f"got {tensor.numel()}"
        )
    check_same_device(input, **{name: tensor})


@buffer_update
def _update_running_stats(running_mean, running_var, mu, var, m, momentum):
    """Batch norm's update of its running estimates from the batch's ``mu``
    and biased ``var`` over ``m`` values: :func:`update_running_estimates`
    with the unbiased variance, or the same in one call of the CPU kernels.
    """
    # (forward-mode AD alone writes buffers as eager code does; an exported
    # program must hold torch's ops only)
    transformed = _functorch_transforms_active()
    kernels = None if transformed or _is_exporting() else _cpu_kernels(mu)
    if kernels is not None and _running_args(running_mean, running_var, mu) is not None:
        # The same update in one call: on (C,) vectors the time is per-op overhead.
        kernels.update_running_stats(running_mean, running_var, mu, var, m, float(momentum))
        return
    update_running_estimates(running_mean, running_var, mu, var * (m / (m - 1)) if m > 1 else var, momentum)


@buffer_update
def update_running_estimates(running_mean, running_var, mu, unbiased_var, momentum):
    """``running = (1 - momentum) * running + momentum * batch``, per channel,
    skipping channels whose batch statistics are not finite. The one update
    of every module with running estimates (batch norm here; synchronized,
    ghost and instance norm give their own batch statistics).

    ``torch.where`` on a per-channel finiteness mask keeps this free of host
    syncs: no ``.item()``, no Python branch on tensor values. For one
    batch's statistics a finite variance implies a finite mean (an infinite
    or NaN mean makes every ``x - mu`` infinite or NaN), but a caller may
    pass statistics of its own (this is public, and SyncBatchNorm passes
    merged ones), so the mask tests both. A skipped channel gets
    ``lerp(running, running) = running``, exactly. ``lerp_`` is the update
    in one op: on (C,) vectors the time is per-op overhead.
    """
    transformed = _functorch_transforms_active()
    finite = torch.isfinite(unbiased_var) & torch.isfinite(mu)
    if torch.promote_types(mu.dtype, running_mean.dtype) != running_mean.dtype:
        # Buffers narrower than the statistics (a module made .half()): average
        # in float32, round once, as torch does. Rounding the batch variance
        # first would turn a finite one above float16's 65504 into inf, and
        # the buffer into inf, then NaN.
        _lerp_narrow_buffer(running_mean, torch.where(finite, mu, running_mean.to(mu.dtype)), momentum, transformed)
        _lerp_narrow_buffer(running_var, torch.where(finite, unbiased_var, running_var.to(unbiased_var.dtype)), momentum, transformed)
        return
    mean_target = torch.where(finite, mu, running_mean).to(running_mean.dtype)
    var_target = torch.where(finite, unbiased_var, running_var).to(running_var.dtype)
    if transformed and not from_inside_transform(running_mean):
        # A torch.func transform refuses in-place methods on tensors from
        # outside it, but takes an op's out= (torch's own spectral norm writes
        # its buffers so). Outside one, lerp_: torch.compile traces no out=.
        torch.lerp(running_mean, mean_target, momentum, out=running_mean)
        torch.lerp(running_var, var_target, momentum, out=running_var)
    elif transformed:  # buffers the transform maps over; lerp_ has no batching rule
        running_mean.copy_(torch.lerp(running_mean, mean_target, momentum))
        running_var.copy_(torch.lerp(running_var, var_target, momentum))
    else:
        running_mean.lerp_(mean_target, momentum)
        running_var.lerp_(var_target, momentum)


def _lerp_narrow_buffer(buffer, target, momentum, transformed):
    """``buffer = lerp(buffer, target, momentum)`` computed in ``target``'s
    wider dtype and rounded once into ``buffer``'s (a skipped channel's
    target is the buffer itself, which survives the round trip exactly)."""
    if transformed and not from_inside_transform(buffer):
        torch.lerp(buffer.to(target.dtype), target, momentum, out=buffer)  # out= rounds to buffer's dtype
    else:
        buffer.copy_(torch.lerp(buffer.to(target.dtype), target, momentum))


_warned = set()  # warnings given once per process


def _triton_path():
    """``bnlib.triton_kernels`` when it can run here, else None (with one
    warning when Triton is installed but older than the kernels need)."""
    try:
        from bnlib import triton_kernels
    except ImportError:
        return None
    if triton_kernels.is_available():
        return triton_kernels
    version = triton_kernels._TRITON_VERSION
    if version is not None and version < triton_kernels.MIN_TRITON and "old triton" not in _warned:
        _warned.add("old triton")
        warnings.warn(
            f"bnlib's Triton kernels need Triton >= {'.'.join(map(str, triton_kernels.MIN_TRITON))}, found "
            f"{triton_kernels.triton.__version__}: CUDA tensors use the tensor-op path",
            RuntimeWarning, stacklevel=3,
        )
    return None


def check_running_pair(name, running_mean, running_var):
    """Both running estimates or neither, as torch asks: with one, it would be
    updated and the other not, unnoticed."""
    if (running_mean is None) != (running_var is None):
        raise InputError(
            f"{name} expected running_mean and running_var both given or both None, got only "
            f"{'running_mean' if running_var is None else 'running_var'}"
        )


def _finite_number(value):
    """A momentum torch's batch norm takes (a real number, a bool, or a
    one-element real tensor) that is not NaN or infinite. Under
    ``torch.compile`` a float argument may be symbolic, and ``math.isfinite``
    of it breaks the graph: only its type is checked there; and a tensor's
    value is read only on the CPU (elsewhere it would wait for the device)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            return False
        if torch.compiler.is_compiling() or value.device.type != "cpu":
            return True
        value = value.item()
    if not isinstance(value, (numbers.Real, torch.SymFloat, torch.SymInt)):
        return False
    return torch.compiler.is_compiling() or math.isfinite(value)


def check_momentum(caller, momentum):
    """A ``momentum`` with which running estimates are updated: what
    :func:`_finite_number` takes (``None``, the modules' cumulative average,
    is theirs to turn into ``1 / num_batches_tracked``; NaN would make the
    estimates NaN)."""
    if not _finite_number(momentum):
        raise InputError(f"{caller} updating running estimates expected a finite number for momentum, got "
                         f"{momentum!r} (the modules turn momentum=None into 1 / num_batches_tracked)")


def check_training_args(running_mean, running_var, momentum, eps):
    """What torch's batch norm refuses in training mode, before any state
    changes: one running estimate without the other, ``momentum=None`` (the
    cumulative average is the modules' business: they pass
    ``1 / num_batches_tracked``) and ``eps <= 0`` (the variance of a constant
    channel is 0); and, stricter than torch, a NaN or infinite ``momentum``
    with running estimates (it would make them NaN)."""
    check_running_pair("batch_norm", running_mean, running_var)
    if running_mean is not None:
        check_momentum("batch_norm", momentum)
    if not eps > 0:
        raise InputError(f"batch_norm expected eps > 0 in training (the variance of a constant channel is 0), got {eps}")


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps):
    """Every argument check of :func:`batch_norm` (and of the Triton
    kernels' entry point, which calls it too), before anything is written;
    ``InputError`` names what was expected."""
    check_tensor_input("batch_norm", input)
    if not isinstance(training, bool):
        raise InputTypeError(f"batch_norm expected training to be a bool, got {training!r}")
    if input.dim() < 2:
        raise InputError(f"batch_norm expected an input with at least 2 dimensions (N, C, ...), got {input.dim()}D input")
    check_floating_dtype("batch_norm", input.dtype, input.is_floating_point())
    # The usual case, float vectors (C,) on the input's device, in one test
    # each (this runs on every step: on a (256, 1024) batch the four full
    # checks were 4 of the forward's 70 us); anything else gets the full
    # check, which names what is wrong.
    channels, device = input.shape[1], input.device
    for name, tensor in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if tensor is not None and not (
            type(tensor) in _PLAIN_TENSOR_TYPES and tensor.dim() == 1 and tensor.shape[0] == channels
            and tensor.is_floating_point() and tensor.device == device
        ):
            _check_per_channel(name, tensor, input)
    if ((running_mean is not None and running_mean.requires_grad)
            or (running_var is not None and running_var.requires_grad)) and not under_func_transform():
        # torch refuses them too ("not differentiable with respect to
        # running_mean"): they are estimates, not parameters, and the
        # hand-written backward gives them no gradient.
        raise InputError("batch_norm expected running_mean and running_var that do not require grad "
                         "(running estimates get no gradient; pass them detached)")
    if training:
        check_training_args(running_mean, running_var, momentum, eps)
        check_training_batch(input)
    elif running_mean is None or running_var is None:
        raise InputError("batch_norm in eval mode (training=False) needs running_mean and running_var")
    elif not eps >= 0:  # torch's rule and words (a NaN eps too)
        raise InputError(f"batch_norm eps must be non-negative, but got {eps}")


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
        ``y``, with the shape and dtype of ``input``. Under a ``torch.func``
        transform, computed by ``batch_norm_formula`` or
        ``batch_norm_eval_formula`` (see ``under_func_transform()``).

    Raises:
        ValueError: a non-floating-point input, fewer than 2 dims, one value per channel in training,
            per-channel tensors of the wrong length, only one of the running
            estimates or ``eps <= 0`` in training, or eval mode without
            running estimates, ``eps < 0`` in eval mode, a ``training`` that is
            not a bool, running estimates that are not float vectors (C,) or
            that require grad, ``momentum`` None or not finite with running
            estimates in training, a per-channel tensor on another device.
            All are ``InputError`` (``InputTypeError``, also a ``TypeError``,
            for an input that is not a tensor). Nothing is updated when it
            raises.
    """
    check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    transformed = under_func_transform()
    if input.is_cuda and not transformed:
        triton = _triton_path()
        if triton is not None:
            return triton._checked_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)

    if not training:
        if transformed:
            return batch_norm_eval_formula(input, weight, bias, running_mean, running_var, eps)
        if _cpu_kernels(input) is not None:
            if not torch.is_grad_enabled():
                return _eval_kernel(input, weight, bias, running_mean, running_var, eps)[0]  # no graph to record
            if not torch.compiler.is_compiling():
                # BatchNormEvalFunction written in C++ (bnlib_cpu::batch_norm_eval_with_grad),
                # the same numbers with autograd's bookkeeping in C++; the
                # conversions outside it, where autograd carries gradients through them.
                x = _dense(input)
                return _cpu["ops"].batch_norm_eval_with_grad(
                    x, *(_per_channel_arg(t, x) for t in (weight, bias, running_mean, running_var)), eps)
        # _dense: a strided input's output comes back contiguous, as torch's
        return BatchNormEvalFunction.apply(_dense(input), weight, bias, running_mean, running_var, eps)
    return batch_norm_train(input, weight, bias, eps, running_mean, running_var, momentum)[0]
