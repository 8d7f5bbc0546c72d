r"""Ghost batch normalization (Hoffer, Hubara and Soudry 2017): BN over virtual batches.

One process, one mini-batch of ``N`` samples, cut along axis 0 into
consecutive *virtual* batches of ``virtual_batch_size`` samples (the last
one holds the remainder, ``N mod virtual_batch_size``, when it is not 0).
Each virtual batch ``j``, with ``m_j`` values per channel, is normalized
with its own statistics, exactly as a device would normalize its slice of
a data-parallel batch without synchronization:

.. math::

    \mu_j = \frac{1}{m_j}\sum_{i \in j} x_i, \quad
    \mathrm{var}_j = \frac{1}{m_j}\sum_{i \in j} (x_i - \mu_j)^2, \quad
    y_i = \gamma\,\frac{x_i - \mu_j}{\sqrt{\mathrm{var}_j + \epsilon}} + \beta
    \quad (i \in j),

with one ``gamma`` and ``beta`` for all of them. Forward and backward of
every virtual batch are :func:`bnlib.functional.batch_norm_train`
(the compact backward formula, per virtual batch). So a chapter can show
what per-device batches of 2, 4, 8, ... do to training without starting
several processes. With one virtual batch (``virtual_batch_size >= N``)
this is BatchNorm.

Running estimates: updated **once per forward call**. By default
(``running_stats="pooled"``) with the statistics of the ``k`` virtual
batches pooled (``m = sum_j m_j``):

.. math::

    \mu_{\text{pool}} = \sum_j \frac{m_j}{m}\,\mu_j, \qquad
    \mathrm{var}_{\text{pool}} = \frac{\sum_j m_j\,\mathrm{var}_j}{m - k},

the mean of the whole batch and the pooled unbiased variance within the
virtual batches (each virtual batch's unbiased variance, weighted by
``m_j - 1``). Why this and not ``k`` updates in a row, one per virtual
batch: one forward call is one training step, so ``momentum`` and
``num_batches_tracked`` keep the meaning they have in BatchNorm (``k``
updates would turn ``momentum`` into ``1 - (1 - momentum)**k`` and count
virtual batches as steps, which breaks ``momentum=None``); every virtual
batch's ``mu_j`` and unbiased ``var_j`` estimate the same population
values, and the weighted average is the unbiased estimate of smallest
variance; and the variance is the within-virtual-batch one, the spread the
layer actually divided by in training. With ``k = 1`` it is BatchNorm's update.

``running_stats="first"`` updates them with the first virtual batch's
``mu_0`` and unbiased ``var_0 * m_0 / (m_0 - 1)`` only, BatchNorm's update on
``input[:virtual_batch_size]``. That is what ``k`` devices running
``DistributedDataParallel`` with local BN end with: each updates its buffers
from its own slice, and DDP (``forward_sync_buffers=True``, its default;
the older argument ``broadcast_buffers`` is still accepted in torch 2.13,
but deprecated) overwrites every rank's buffers with rank 0's at the start
of each forward pass in training (precisely: of each forward that follows
one run with gradients), so rank 0's estimates (the ones a checkpoint
saved by rank 0 holds) are moving averages of its own ``b`` rows of every
step. Same expected values as the pooled ones, about ``k`` times their
variance.

Eval mode with running estimates is plain BatchNorm. Without running
estimates (``track_running_stats=False``) eval normalizes each virtual
batch with its own statistics, as training does.

Under a non-reentrant ``torch.utils.checkpoint`` (with its default early
stop) the running estimates are updated once per step, as without the
checkpoint: the update follows the normalization, and the recomputation in
the backward stops before it. torch's BatchNorm (and bnlib's) update them
again in the recomputation, since their update is part of the op.
"""

import numbers

import torch

from bnlib import batchnorm as bnn
from bnlib._checks import InputError, check_floating_dtype, check_num_channels, values_per_channel
from bnlib.functional import _channels_last_format, batch_norm_train, check_tensor_input, update_running_estimates

__all__ = ["GhostBatchNorm"]

# Which virtual batches update the running estimates (see the module docstring).
RUNNING_STATS = ("pooled", "first")


class GhostBatchNorm(bnn._BatchNorm):
    """Batch norm over virtual batches of ``virtual_batch_size`` samples.

    Args: BatchNorm's, with ``virtual_batch_size`` (an int >= 1) second:
    ``(num_features, virtual_batch_size, eps=1e-5, momentum=0.1,
    affine=True, track_running_stats=True, device=None, dtype=None, *,
    bias=True, running_stats="pooled")``; ``running_stats`` is ``"pooled"``
    (all virtual batches) or ``"first"`` (the first one only, as DDP's
    rank 0; see the module docstring). Parameters, buffers and state-dict keys are BatchNorm's.
    Input ``(N, C, *S)`` with at least 2 dims; output of the same shape.

    Raises ``ValueError`` (state untouched) for fewer than 2 dims, a channel
    count that is not ``num_features``, and, when batch statistics are
    used, a virtual batch with one value per channel (e.g. ``N = 9`` with
    ``virtual_batch_size=4`` on ``(N, C)`` input leaves a last virtual batch
    of 1 sample).
    """

    def __init__(self, num_features, virtual_batch_size, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, device=None, dtype=None, *, bias=True, running_stats="pooled"):
        if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral) or virtual_batch_size < 1:
            raise ValueError(f"virtual_batch_size must be an integer >= 1, got {virtual_batch_size!r}")
        virtual_batch_size = int(virtual_batch_size)  # (a NumPy integer too; torch.split wants an int)
        if running_stats not in RUNNING_STATS:
            raise ValueError(f"running_stats must be one of {', '.join(map(repr, RUNNING_STATS))}, "
                             f"got {running_stats!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.virtual_batch_size = virtual_batch_size
        self.running_stats = running_stats

    def extra_repr(self):
        running = "" if self.running_stats == "pooled" else f", running_stats={self.running_stats!r}"
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}{running}"

    def _check_input(self, input):
        """Shape checks (the plain path of eval mode calls this too)."""
        check_tensor_input("GhostBatchNorm", input)
        if input.dim() < 2:
            raise InputError(f"GhostBatchNorm expected at least 2D input (N, C, ...) (got {input.dim()}D input)")
        check_num_channels("GhostBatchNorm", input.shape, self.num_features)
        check_floating_dtype("GhostBatchNorm", input.dtype, input.is_floating_point())

    def _check_virtual_batches(self, input):
        """Every virtual batch needs more than one value per channel."""
        n = input.shape[0]
        if n == 0:
            return  # an empty batch, as BatchNorm: empty output, running estimates kept
        smallest = n % self.virtual_batch_size or self.virtual_batch_size  # the last virtual batch
        if values_per_channel((smallest,) + tuple(input.shape[1:])) == 1:
            raise InputError(
                "Expected more than 1 value per channel when training, got a virtual batch of "
                f"input size {[smallest] + list(input.shape[1:])} (input size {list(input.shape)}, "
                f"virtual_batch_size={self.virtual_batch_size})"
            )

    def forward(self, input):
        if not self.training and self.running_mean is not None:
            return super().forward(input)  # eval with running estimates: plain BatchNorm
        self._check_input(input)
        self._check_virtual_batches(input)
        self._check_attributes_now(self.training and self.track_running_stats)  # (before the count)

        n, vbs = input.shape[0], self.virtual_batch_size
        if n > vbs and n % vbs == 0:
            output, mu, var = self._equal_virtual_batches(input)
            counts = torch.full((n // vbs, 1), values_per_channel(input.shape) // (n // vbs), dtype=mu.dtype)
        else:
            outputs, mus, variances, sizes = [], [], [], []
            for chunk in input.split(vbs):
                y, mu, var = batch_norm_train(chunk, self.weight, self.bias, self.eps)
                outputs.append(y)
                mus.append(mu)
                variances.append(var)
                sizes.append(values_per_channel(chunk.shape))
            output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
            mu, var = torch.stack(mus), torch.stack(variances)
            counts = torch.tensor(sizes, dtype=mu.dtype).view(-1, 1)
        fmt = _channels_last_format(input)
        if fmt is not None:  # as BatchNorm2d/3d: the virtual batches come back in (N, C, ...) order
            output = output.contiguous(memory_format=fmt)

        if self.training and self.track_running_stats:
            factor = self._count_batch()
            # counts (k, 1), mu and var (k, C): m_j, mu_j and the biased var_j of virtual batch j.
            # An empty batch (m = 0) gives NaN statistics, so the estimates are kept.
            counts = counts.to(mu.device)
            if self.running_stats == "first":  # DDP's rank 0: its own slice only
                counts, mu, var = counts[:1], mu[:1], var[:1]
            m, k = counts.sum(), counts.shape[0]
            mu_pool = (counts * mu).sum(0) / m
            var_pool = (counts * var).sum(0) / (m - k)
            update_running_estimates(self.running_mean, self.running_var, mu_pool, var_pool, factor)
        return output

    def _equal_virtual_batches(self, input):
        """All ``k`` virtual batches of equal size in one call, the same math as the loop.

        ``(k * vbs, C, *S)`` is viewed as ``(vbs, k * C, *S)``: virtual batch
        ``j``'s channel ``c`` becomes channel ``j * C + c`` of one BatchNorm
        over ``k * C`` channels, with ``gamma`` and ``beta`` repeated ``k``
        times (autograd sums their ``k`` gradients). One pass instead of a
        Python loop over ``k`` small batches.
        """
        k, vbs, c = input.shape[0] // self.virtual_batch_size, self.virtual_batch_size, input.shape[1]
        x = input.unflatten(0, (k, vbs)).transpose(0, 1).flatten(1, 2)
        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        y, mu, var = batch_norm_train(x, weight, bias, self.eps)
        output = y.unflatten(1, (k, c)).transpose(0, 1).flatten(0, 1)
        return output, mu.view(k, c), var.view(k, c)
