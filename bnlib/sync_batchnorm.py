r"""Batch norm across processes: ``SyncBatchNorm`` on ``torch.distributed``.

In data-parallel training each process (rank) holds a slice of the
mini-batch. Plain BN would normalize every slice with its own statistics;
``SyncBatchNorm`` normalizes all of them with the statistics of the whole
batch, so the result is that of BatchNorm on the concatenated batch in one
process. It runs on CPU tensors (gloo) and CUDA tensors (NCCL): the only
transport is ``torch.distributed``.

Forward, training, a process group of ``P > 1`` ranks (input ``(N_r, C, *S)``
on rank ``r``, ``m_r = N_r * prod(S)`` values per channel, possibly 0):

1. every rank computes per channel, in two passes of tensor ops, or on CPU
   in one pass of bnlib's fused loops that sum deviations from a shift near
   the mean (never ``E[x^2] - E[x]^2``),

   .. math::

       n_r = m_r, \quad \mu_r = \frac{1}{m_r}\sum_{i \in r} x_i, \quad
       M2_r = \sum_{i \in r} (x_i - \mu_r)^2

   (``n_r = mu_r = M2_r = 0`` for an empty slice);
2. **collective 1**: one ``all_gather`` of the ``(3, C)`` tensor
   ``[n_r; mu_r; M2_r]``, so every rank holds all ``P`` triples;
3. every rank merges them with Chan, Golub and LeVeque's parallel formula,
   all parts at once (:func:`merge_stats`):

   .. math::

       m = \sum_r n_r, \quad \mu = \sum_r \frac{n_r}{m}\,\mu_r,

       M2 = \sum_r M2_r + \sum_r n_r (\mu_r - \mu)^2, \quad
       \mathrm{var} = M2 / m;

   for two parts this is the pairwise update
   ``M2 = M2_a + M2_b + delta**2 * n_a * n_b / (n_a + n_b)`` with
   ``delta = mu_b - mu_a``. It is exact for any slice sizes and stable: it
   adds only non-negative terms, and ``mu_r - mu`` are small differences of
   means, not of large sums of squares;
4. ``x_hat = (x - mu) * invstd`` with ``invstd = 1 / sqrt(var + eps)``,
   ``y = gamma * x_hat + beta``.

The running estimates use the global ``m``: ``running_var`` gets the
unbiased ``var * m / (m - 1)``, and ``num_batches_tracked`` grows by one on
every rank. A channel whose global statistics are not finite (a NaN or Inf
on any rank) keeps its running estimates, on every rank alike.

Backward: each rank sums over its slice ``sum(dy)`` and ``sum(dy * x_hat)``
per channel; **collective 2**, one ``all_reduce`` (sum) of the ``(2, C)``
tensor, makes them global, and the compact formula, with the global ``m``,

.. math::

    dx = \frac{\gamma\,\mathrm{invstd}}{m}
         \Bigl(m\,dy - \textstyle\sum dy - \hat{x} \sum dy\,\hat{x}\Bigr),

gives each rank the matching slice of the whole-batch ``dx``.

On CPU (float32, float64, and half inputs computed in float32) the passes
over ``x`` are those of :func:`bnlib.functional.batch_norm`'s C++ loops,
split where the collectives must come between them (as torch's own
SyncBatchNorm splits its CUDA kernels): ``batch_norm_stats``, then the
eval-mode kernel with the global ``mu`` and ``var``; ``batch_norm_backward_reduce``,
then ``batch_norm_backward_elemt``. So a rank reads ``x`` twice and writes
``y`` forward, and reads ``x`` and ``dy`` twice and writes ``dx`` backward,
as a local BN does; elsewhere (CUDA, or ``set_cpu_backend("tensor_ops")``)
the same formulas run as tensor ops.
``dgamma = sum(dy * x_hat)`` and ``dbeta = sum(dy)`` stay local: each rank
returns its own contribution and the sum over ranks is the whole-batch
gradient (``DistributedDataParallel`` all-reduces parameter gradients
anyway; it averages them, so train with a per-rank loss that is the mean
over the rank's slice to get the whole-batch mean loss).

Cost per BN layer per training step, with ``C`` channels, ``P`` ranks and
``b`` bytes per value (4 for float32, also for float16/bfloat16 inputs,
whose statistics are float32): **two collectives**, both blocking.
Forward: each rank sends ``3*C*b`` bytes and receives ``3*C*b*(P - 1)``.
Backward: an all-reduce of ``2*C*b`` bytes (a ring moves ``2*(P-1)/P`` times
that per rank); :func:`sync_cost` computes these numbers. Why one
all_gather and not all-reduces: the merge needs every ``(n_r, mu_r, M2_r)``,
which is not a sum; the exact alternative, an all-reduce of
``(n_r, n_r * mu_r)`` then one of ``sum (x - mu)^2`` about the global mean,
is two dependent round trips (a ring all-reduce takes ``2(P - 1)`` latency
steps, an all_gather ``P - 1``) and a second pass over ``x`` between them.
BN statistics are a few kilobytes per layer, so the latency is the price;
the all_gather's bytes grow with ``P`` and overtake the all-reduces' from
``P = 3`` on, but stay far below the gradients' all-reduce that
data-parallel training does anyway until ``P`` reaches the hundreds (the
chapter computes it for ResNet-50). torch's ``SyncBatchNorm`` makes the
same choice (an all_gather of ``2C + 1`` values: mean, invstd, count). The
count is kept per channel here (3 rows, ``C - 1`` values more) so that the
merge is one column-wise formula.

Errors, and why they cannot deadlock: the shape checks (at least 2 dims,
``num_features`` channels) are local and come before any collective; a
rank that fails them raises at once, as torch's ``SyncBatchNorm`` does
(a wrong shape is a bug of the calling code, normally on every rank alike).
"More than one value per channel when training" is a property of the whole
batch, so it is checked **globally**, after the all_gather, from the counts
every rank now holds: each rank takes part in the collective first, and
the ranks that could see a global count of 1 (those with ``m_r <= 1``;
the others know ``m >= 2`` without looking) read it. If it is 1, every rank
has ``m_r <= 1``, so every rank reads it and every rank raises the same
``ValueError``; no rank is left waiting in a later collective. The read is
a host sync only on that rare path. A rank with an empty slice takes part
in both collectives and contributes ``n_r = 0``.
"""

import torch
import torch.distributed as dist

from bnlib import batchnorm as bnn
from bnlib._checks import InputError, check_floating_dtype, check_num_channels, values_per_channel
from bnlib.functional import (_compute_dtype, _cpu_kernels, _dense, _dense_like, _eps_in, _per_channel,
                              _per_channel_arg, _stat_dims, check_training_batch, under_func_transform)
# The running-estimate update of every bnlib module, under this module's old name.
from bnlib.functional import buffer_update, check_tensor_input
from bnlib.functional import update_running_estimates as update_running_stats

__all__ = ["SyncBatchNorm", "SyncBatchNormFunction", "local_stats", "merge_stats", "update_running_stats",
           "sync_cost"]


def local_stats(x):
    """Per-channel ``(n, mu, M2)`` of ``x`` of shape ``(N, C, *S)``: three ``(C,)`` tensors.

    ``n`` is the number of values per channel, ``mu`` their mean and ``M2``
    the sum of squared deviations from ``mu``: two passes of tensor ops, or
    on CPU one pass of bnlib's fused loops (``bnlib.cpu_kernels``), which
    sum deviations from a shift near the mean. An empty ``x`` gives zeros.
    Dtype: ``x``'s (callers pass float32 for half inputs).
    """
    num_channels = x.shape[1]
    m = values_per_channel(x.shape)
    count = torch.full((num_channels,), m, dtype=x.dtype, device=x.device)
    if m == 0:
        zeros = torch.zeros(num_channels, dtype=x.dtype, device=x.device)
        return count, zeros, zeros
    # One pass of bnlib's CPU loops (stable: shifted sums, Chan's merge), where
    # no gradient is asked of the result: the op has no backward, and a caller
    # may differentiate this public helper (SyncBatchNormFunction calls it
    # inside its forward, where no graph is recorded).
    recording = (torch.is_grad_enabled() and x.requires_grad) or under_func_transform()
    kernels = None if recording else _cpu_kernels(x)
    if kernels is not None:
        mu, m2 = kernels.batch_norm_stats(_dense(x))
        return count, mu, m2
    dims = _stat_dims(x.dim())
    mu = x.mean(dims)
    deviations = x - _per_channel(mu, x.dim())
    m2 = torch.mul(deviations, deviations).sum(dims)
    return count, mu, m2


def merge_stats(count, mu, m2):
    r"""Merge ``P`` partial statistics into those of the union (Chan et al.).

    Args:
        count, mu, m2: ``(P, C)``; row ``p`` holds ``(n_p, mu_p, M2_p)`` of part ``p``.

    Returns:
        ``(n, mu, M2)``, each ``(C,)``:
        ``n = sum_p n_p``, ``mu = sum_p (n_p / n) mu_p``,
        ``M2 = sum_p M2_p + sum_p n_p (mu_p - mu)^2``.

    Exact for any part sizes (parts with ``n_p = 0`` drop out) and
    independent of the order of the parts up to rounding. That rounding
    includes the parts' means themselves: float32 means of values near
    ``1e4`` are rounded by up to ``5e-4``, which ``n_p (mu_p - mu)^2`` carries
    at first order, so parts of two or three values each with ``|mean| >> std``
    can lose ``1e-3`` of the variance (torch's CUDA SyncBatchNorm merges
    float32 means the same way); the error shrinks as the parts grow.

    When ``n = 0`` (every part empty) ``mu`` and ``M2`` are NaN, so the
    running estimates of such a batch are left alone, as BatchNorm leaves
    them for an empty batch.
    """
    n = count.sum(0)
    mean = (count / n * mu).sum(0)
    deviation = mu - mean
    return n, mean, m2.sum(0) + (count * deviation * deviation).sum(0)


def sync_cost(channels, world_size, bytes_per_value=4):
    """What SyncBatchNorm sends per training step, per rank, for BN layers of ``channels``.

    Args:
        channels: the ``C`` of every BN layer (a list), or of one layer (an int).
        world_size: ``P``, the ranks in the group.
        bytes_per_value: 4 for float32 statistics (also for float16/bfloat16 inputs), 8 for float64.

    Returns a dict: ``collectives`` (2 per layer: an all_gather forward, an
    all_reduce backward), ``forward_sent`` (``3 C b`` per layer),
    ``forward_received`` (``3 C b (P - 1)``), ``backward_payload``
    (``2 C b``, the size of the all-reduced tensor) and
    ``backward_ring_traffic`` (what a ring all-reduce sends per rank,
    ``2 (P - 1) / P`` times the payload), each summed over the layers.
    """
    channels = [channels] if isinstance(channels, int) else list(channels)
    total = sum(channels)
    payload = 2 * total * bytes_per_value
    return {
        "collectives": 2 * len(channels),
        "forward_sent": 3 * total * bytes_per_value,
        "forward_received": 3 * total * bytes_per_value * (world_size - 1),
        "backward_payload": payload,
        "backward_ring_traffic": 2 * (world_size - 1) * payload / world_size,
    }


def _check_global_count(input, count, world_size):
    """The whole batch needs more than one value per channel (see the module docstring)."""
    if values_per_channel(input.shape) > 1:
        return  # then m >= 2 on every rank's view: no need to read anything
    total = int(count[0].item())  # the same on every rank; a host read on this rare path only
    if total == 1:
        raise InputError(
            "Expected more than 1 value per channel when training, got input size "
            f"{input.size()} on this rank and 1 value per channel over the {world_size} "
            "ranks of the process group"
        )


class SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over every rank of ``process_group``.

    ``forward(input, weight, bias, eps, process_group, on_stats=None)``
    returns ``(y, mu, var, count)``: the output (input's dtype) and the
    global mean, biased variance and count per channel (``(C,)``, not
    differentiable). ``on_stats(mu, var, count)``, when given, is called with
    them before anything is saved for backward: the module updates its
    running estimates there, where torch's SyncBatchNorm does (a
    non-reentrant checkpoint stops its recomputation at the last saved
    tensor, after that update). One all_gather in forward, one all_reduce in
    backward.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, eps, process_group, on_stats=None):
        x = input.to(_compute_dtype(input.dtype))
        kernels = _cpu_kernels(x)
        if kernels is not None:
            x = _dense(x)
        world_size = dist.get_world_size(process_group)

        # Collective 1: every rank's (n_r, mu_r, M2_r), a (3, C) tensor.
        local = torch.stack(local_stats(x))
        gathered = [torch.empty_like(local) for _ in range(world_size)]
        dist.all_gather(gathered, local, group=process_group)
        count, mu, m2 = merge_stats(*torch.stack(gathered, dim=1))  # rows of (3, P, C)
        _check_global_count(input, count, world_size)

        var = m2 / count
        if on_stats is not None:
            on_stats(mu, var, count)
        if kernels is not None:
            # With the global mu and var in hand, the normalization is the
            # eval-mode kernel's one pass: (x - mu) * gamma * invstd + beta.
            y, invstd = kernels.batch_norm_eval(x, _per_channel_arg(weight, x), _per_channel_arg(bias, x),
                                                mu, var, eps)
        else:
            invstd = torch.rsqrt(var + _eps_in(eps, var.dtype))
            x_centered = x - _per_channel(mu, x.dim())
            scale = invstd if weight is None else invstd * weight.to(x.dtype)
            shift = torch.zeros_like(scale) if bias is None else bias.to(x.dtype)
            y = torch.addcmul(_per_channel(shift, x.dim()).expand_as(x), x_centered, _per_channel(scale, x.dim()))

        # The input and (C,) statistics, not x_centered: the input is alive
        # anyway, and the backward recomputes x - mu as it reads x (as
        # torch's batch norm does), so no activation-sized buffer waits
        # between the passes.
        ctx.save_for_backward(input, mu, invstd, weight, count)
        ctx.process_group = process_group
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mu, var, count)
        return y.to(input.dtype), mu, var, count

    @staticmethod
    @torch.autograd.function.once_differentiable  # second derivatives raise, rather than come out wrong
    def backward(ctx, dy, _grad_mu, _grad_var, _grad_count):
        r"""With ``x_hat = x_centered * invstd``, global ``m`` and global sums:

        dx = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))

        is the chain rule through ``x_hat``, ``mu`` and ``var`` collapsed
        (derived in the chapter on the BN algorithm). ``mu`` and ``var`` are
        means over every rank's values, so their paths need the sums over
        every rank: hence the all_reduce. ``dgamma`` and ``dbeta`` are this
        rank's share, ``sum(dy * x_hat)`` and ``sum(dy)`` over its slice.
        """
        input, mu, invstd, weight, count = ctx.saved_tensors
        ndim = input.dim()
        x = input.to(invstd.dtype)
        dy32 = dy.to(invstd.dtype)
        kernels = _cpu_kernels(x)
        if kernels is not None:  # the same two sums in one pass of bnlib's CPU loops
            x = _dense(x)
            dy32 = _dense_like(dy32, x)
            sum_dy, sum_dy_x_centered = kernels.batch_norm_backward_reduce(dy32, x, mu)
            sum_dy_x_hat = sum_dy_x_centered * invstd
        else:
            x_centered = x - _per_channel(mu, ndim)
            dims = _stat_dims(ndim)
            sum_dy = dy32.sum(dims)
            if values_per_channel(x_centered.shape) == 0:
                # An empty slice contributes exactly 0, even where invstd is NaN (every slice empty).
                sum_dy_x_hat = torch.zeros_like(sum_dy)
            else:
                sum_dy_x_hat = torch.mul(dy32, x_centered).sum(dims) * invstd

        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            # Collective 2: the two sums over every rank, one (2, C) tensor.
            # Skipped, like torch's, when no rank needs dx (the same graph everywhere).
            sums = torch.stack([sum_dy, sum_dy_x_hat])
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.process_group)
            total_dy, total_dy_x_hat = sums.unbind(0)
            k = invstd if weight is None else invstd * weight.to(invstd.dtype)
            # dx = k * dy + c1 * (x - mu) + c0, per channel, in the letters of
            # the chapter and of functional.BatchNormTrainFunction.backward
            # (the kernel's arguments a and b)
            c1 = -k * invstd * total_dy_x_hat / count
            c0 = -k * total_dy / count
            if kernels is not None:
                dx = kernels.batch_norm_backward_elemt(dy32, x, mu, k.contiguous(), c1, c0)
            else:
                dx = dy32 * _per_channel(k, ndim) + _per_channel(c0, ndim)
                dx += x_centered * _per_channel(c1, ndim)
            grad_input = dx.to(dy.dtype)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = sum_dy_x_hat.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype if weight is not None else dy32.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None


class SyncBatchNorm(bnn._BatchNorm, bnn._TorchBatchNorm):
    """Drop-in for ``torch.nn.SyncBatchNorm`` that also runs on CPU (gloo).

    Args: those of ``torch.nn.SyncBatchNorm`` in torch 2.13:
    ``(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, process_group=None, device=None, dtype=None,
    *, bias=True)``; ``process_group=None`` means the default (world) group.
    Parameters, buffers and state-dict keys are BatchNorm's, so a state dict
    loads into and from ``torch.nn.BatchNorm*d``, ``torch.nn.SyncBatchNorm``
    and ``bnlib.nn.BatchNorm*d``.

    Input ``(N, C, *S)`` with at least 2 dims (2 to 5 in practice), on every
    rank with the same ``C`` and trailing sizes; ``N`` may differ, 0 included.
    In training with an initialized process group of more than one rank:
    :class:`SyncBatchNormFunction` (global statistics, see the module
    docstring). Otherwise (eval mode, no process group, a group of one rank,
    or a rank outside ``process_group``): plain batch norm,
    :func:`bnlib.functional.batch_norm`, with no communication (so eval mode
    without running estimates uses the rank's own batch, as torch's does).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 process_group=None, device=None, dtype=None, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_shape(self, input):
        check_tensor_input("SyncBatchNorm", input)
        self._check_input_dim(input)  # (a subclass may override it, as torch's)
        check_num_channels("SyncBatchNorm", input.shape, self.num_features)
        check_floating_dtype("SyncBatchNorm", input.dtype, input.is_floating_point())

    def _check_input_dim(self, input):  # torch's hook (see bnlib.batchnorm._TorchBatchNorm)
        if input.dim() < 2:
            raise InputError(f"SyncBatchNorm expected at least 2D input (N, C, ...) (got {input.dim()}D input)")

    def _check_input(self, input):
        """The plain (local) path's checks: shape, and in training the local batch."""
        self._check_shape(input)
        if self.training:
            check_training_batch(input)

    def _sync_group(self):
        """The process group to synchronize over, or None for plain batch norm."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        # A rank outside the group sees -1 here: it runs plain batch norm.
        return group if dist.get_world_size(group) > 1 else None

    def forward(self, input):
        group = self._sync_group()
        if group is None:
            return super().forward(input)  # plain BatchNorm; checks first, then state
        self._check_shape(input)
        on_stats = self._update_running_stats if self.track_running_stats else None
        return SyncBatchNormFunction.apply(input, self.weight, self.bias, self.eps, group, on_stats)[0]

    @buffer_update
    def _update_running_stats(self, mu, var, count):
        # Called inside SyncBatchNormFunction, after its global check: only
        # then is state changed.
        factor = self._count_batch()
        if self.running_mean is None or self.running_var is None:
            return  # estimates set to None (torch allows it): the batch is counted, nothing updated
        update_running_stats(self.running_mean, self.running_var, mu, var * (count / (count - 1)), factor)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """Replace every BatchNorm in ``module`` by a :class:`SyncBatchNorm`; return the module.

        Converted: ``torch.nn.BatchNorm1d/2d/3d`` (any ``torch.nn`` batch
        norm, ``torch.nn.SyncBatchNorm`` included), ``bnlib.nn.BatchNorm1d/2d/3d``
        and this class (re-scoped to ``process_group``). Not converted:
        ``GhostBatchNorm``, whose small batches are the point.
        The new layer shares the old one's parameter and buffer tensors (so
        ``requires_grad``, device, dtype and an optimizer's references are
        kept) and its training flag. When ``module`` itself is a BatchNorm,
        the new layer is returned instead, as in torch.
        """
        convertible = (torch.nn.modules.batchnorm._BatchNorm, bnn.BatchNorm1d, bnn.BatchNorm2d,
                       bnn.BatchNorm3d, SyncBatchNorm)
        # every layer checked once, before any is converted
        bnn.check_initialized([m for m in module.modules() if isinstance(m, convertible)], "convert_sync_batchnorm")
        return cls._convert(module, process_group, convertible)

    @classmethod
    def _convert(cls, module, process_group, convertible):
        module_output = module
        if isinstance(module, convertible):
            like = module.weight if module.affine else module.running_mean  # None: neither exists
            factory = {} if like is None else {"device": like.device, "dtype": like.dtype}
            module_output = cls(module.num_features, module.eps, module.momentum, module.affine,
                                module.track_running_stats, process_group, bias=module.bias is not None,
                                **factory)
            if module.affine:
                with torch.no_grad():
                    module_output.weight = module.weight
                    module_output.bias = module.bias
            module_output.running_mean = module.running_mean
            module_output.running_var = module.running_var
            module_output.num_batches_tracked = module.num_batches_tracked
            module_output.training = module.training
            if hasattr(module, "qconfig"):
                module_output.qconfig = module.qconfig
        for name, child in module.named_children():
            module_output.add_module(name, cls._convert(child, process_group, convertible))
        return module_output
