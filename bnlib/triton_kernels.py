r"""Fused Triton kernels for batch norm on CUDA (chapter "Making BN fast").

``batch_norm(input, running_mean, running_var, weight, bias, training,
momentum, eps)`` computes exactly what ``torch.nn.functional.batch_norm``
computes, in a few passes over memory:

- training forward: ``y = (x - mu) * invstd * gamma + beta`` with the batch's
  ``mu`` and ``var = M2 / m`` (biased), ``invstd = 1 / sqrt(var + eps)``; the
  running estimates, when given, become
  ``running = (1 - momentum) * running + momentum * batch`` with the unbiased
  ``M2 / (m - 1)`` for ``running_var``, except in channels whose batch
  statistics are not finite (NaN or Inf in the batch), which keep theirs.
- backward: the two per-channel sums ``sum(dy)`` and ``sum(dy * x_hat)``, then
  the compact formula
  ``dx = gamma * invstd / m * (m * dy - sum(dy) - x_hat * sum(dy * x_hat))``,
  ``dgamma = sum(dy * x_hat)``, ``dbeta = sum(dy)``.
- eval: ``y = (x - running_mean) * scale + beta`` with
  ``scale = gamma / sqrt(running_var + eps)``: one subtraction and one fused
  multiply-add per element (the subtraction first keeps ``y`` accurate when
  ``|mean| >> std``; memory, not arithmetic, sets the time).

Statistics are accumulated in float32 (float64 for float64 input); the
output has the input's dtype.

**One view for every layout.** Each kernel sees the input as a 3-D array
``(R, C, S)`` with strides ``(s_r, s_c, 1)``:

- contiguous ``(N, C, *spatial)``: ``R = N``, ``S = prod(spatial)``,
  strides ``(C*S, S, 1)``; a program owns one channel.
- channels-last (``torch.channels_last``, ``channels_last_3d``) and ``(N, C)``:
  ``R = N * prod(spatial)``, ``S = 1``, strides ``(C, 1, 1)``; a program owns
  a block of ``BLOCK_C`` neighbouring channels, read as rows of a matrix.

Any other strides are made contiguous first (a copy).

**Grid and reductions.** The grid is ``(channel blocks, splits)``: split ``j``
owns the rows ``[j * rows_per_split, (j + 1) * rows_per_split)``, so a channel
with many values is reduced by many programs at once. Inside a program every
lane keeps its own Welford summary ``(mean, M2, count)`` of the channel's
values minus its first one, ``pivot = x[0, c, 0]`` (``_pivot``; every program
and split of the channel loads the same one): with ``v = x - pivot``,
``count += 1; delta = v - mean; mean += delta / count; M2 += delta * (v - mean)``.
The lanes, then the splits, are merged with Chan's formula for k parts (never
``E[x^2] - E[x]^2``):

    n = sum(n_i),  mean = sum(n_i * mean_i) / n,
    M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2)

and the channel's mean is ``pivot + mean``. The shift (since commit c40a2e0)
keeps every stored mean of the order of the channel's spread: unshifted, a
lane's float32 mean of a few values near 1e4 is rounded by up to 5e-4, which
the merge's ``(mean_i - mean)^2`` term carries into the variance.

With several splits a pass is two or three launches: the partial summaries,
then either the elementwise pass, each of whose programs merges the splits'
summaries itself (up to ``fuse_finalize_max_splits`` splits: a few hundred
bytes to a few tens of KB per program, read from L2, instead of a launch), or a small
finalize kernel over the splits and then the elementwise pass. When the
channel blocks alone fill the GPU there is one split and one launch: the
program reduces its channels and then normalizes them, the second loop running
backwards over the tiles so that it starts with what the first loop left in
L2. ``CONFIG`` holds the block sizes and the split rule; the defaults are
what sweeps on an H100 favoured (``bench/bench_gpu.py``, ``bench/results/``),
except ``fuse_finalize_max_splits``, which no GPU has timed yet.

``momentum`` and ``eps`` reach the kernels as float32 (as in torch's CUDA
kernels for float32 input); for float64 input that limits the running
statistics to about 1e-8 relative accuracy, and the output too in a channel
whose variance is close to ``eps`` (there ``eps`` rounded to float32 moves
it by about 1e-8, relative).

Triton is optional (from the checkout, ``pip install '.[triton]'``): without
it, or with a Triton older than ``MIN_TRITON``, this module still imports and
``is_available()`` is False. With ``TRITON_INTERPRET=1`` in
the environment before this module is imported, the same kernels run on CPU
tensors through Triton's interpreter (that is how the tests check them on a
machine without a GPU).
"""

from __future__ import annotations

import contextlib
import os
import re

import torch

from bnlib._checks import InputError

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional; nothing below runs without it.
    triton = tl = None

__all__ = ["batch_norm", "is_available"]

# Triton chooses interpreter or compiler when a kernel is defined, i.e. when
# this module is imported, from the same environment variable.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _jit(fn):
    """``triton.jit`` when Triton is installed; else the plain function (never called)."""
    return fn if triton is None else triton.jit(fn)


# The oldest Triton the kernels are tested on: through the interpreter with
# Triton 3.2 to 3.9, compiled with 3.6 (on an H100). The interpreters of 3.0
# and 3.1 reject them (``tl.arange`` of a constexpr handed to a helper) or
# run a loop with a computed bound zero times, so an older Triton is not used:
# CUDA tensors then take bnlib's tensor-op path.
MIN_TRITON = (3, 2)


def _version_tuple(version):
    """"3.6.0" -> (3, 6); "3.2.0+git1a2b" -> (3, 2)."""
    major, minor = re.match(r"(\d+)\.(\d+)", version).groups()
    return int(major), int(minor)


_TRITON_VERSION = None if triton is None else _version_tuple(triton.__version__)


def is_available():
    """True when the kernels can run: Triton >= ``MIN_TRITON`` importable, and CUDA present (or the interpreter on)."""
    if _TRITON_VERSION is None or _TRITON_VERSION < MIN_TRITON:
        return False
    return _INTERPRET or torch.cuda.is_available()


# ----------------------------------------------------------------------------
# Building blocks (inlined into the kernels)
# ----------------------------------------------------------------------------


@_jit
def _chan_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Merge two Welford summaries of disjoint sets (Chan, Golub, LeVeque 1983).

    n = n_a + n_b;  mean = mean_a + delta * n_b / n;
    M2 = M2_a + M2_b + delta^2 * n_a * n_b / n,  with delta = mean_b - mean_a.
    An empty side (count 0) leaves the other one unchanged: its delta^2 term
    is taken as 0, not computed as 0 times delta^2, which overflows to inf
    (and inf * 0 is NaN) once |delta| > 1.8e19 in float32.
    """
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1.0), 0.0)
    delta = mean_b - mean_a
    mean = mean_a + delta * w_b
    m2 = m2_a + m2_b + tl.where((n_a > 0) & (n_b > 0), delta * delta * n_a * w_b, 0.0)
    return mean, m2, n


@_jit
def _merge(mean, m2, count, AXIS: tl.constexpr):
    """Merge k Welford summaries along AXIS at once (Chan's formula for k parts):

        n = sum(n_i),  mean = sum(n_i * mean_i) / n,
        M2 = sum(M2_i) + sum(n_i * (mean_i - mean)^2).

    Every term of M2 is >= 0: no cancellation. Parts with n_i = 0 add nothing.
    """
    n = tl.sum(count, AXIS)
    mean_all = tl.sum(count * mean, AXIS) / tl.maximum(n, 1.0)
    dev = mean - tl.expand_dims(mean_all, AXIS)
    m2_all = tl.sum(m2 + count * dev * dev, AXIS)
    return mean_all, m2_all, n


@_jit
def _invstd(var, eps):
    """1 / sqrt(var + eps), the square root correctly rounded (tl.sqrt is approximate in float32)."""
    if var.dtype == tl.float64:
        return 1.0 / tl.sqrt(var + eps)
    else:
        return 1.0 / tl.sqrt_rn(var + eps)


@_jit
def _tile(t, r_start, r_end, c_offs, s_r, s_c, C, S,
          BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr, INT64: tl.constexpr):
    """Offsets and mask of a program's tile number t, shape (BLOCK_R, BLOCK_C, BLOCK_S).

    A program's tiles run over its rows [r_start, r_end) in steps of BLOCK_R and,
    inside each, over the positions [0, S) in steps of BLOCK_S. A t past the
    last tile (or negative) gives an all-false mask.
    """
    n_s_tiles = tl.cdiv(S, BLOCK_S)
    r0 = tl.where(t >= 0, r_start + (t // n_s_tiles) * BLOCK_R, r_end)  # t < 0: rows past the end
    r = r0 + tl.arange(0, BLOCK_R)[:, None, None]
    s = (t % n_s_tiles) * BLOCK_S + tl.arange(0, BLOCK_S)[None, None, :]
    c = c_offs[None, :, None]
    mask = (r < r_end) & (c < C) & (s < S)
    if INT64:  # (c * s_c too: channel 2 of a (1, 3, 2**30) input starts at 2**31)
        r = r.to(tl.int64)
        c = c.to(tl.int64)
    return r * s_r + c * s_c + s, mask


@_jit
def _n_tiles(r_start, r_end, S, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    return tl.cdiv(r_end - r_start, BLOCK_R) * tl.cdiv(S, BLOCK_S)


@_jit
def _pivot(x_ptr, c_offs, s_c, C, R, S):
    """Each channel's first value, x[0, c, 0], in x's dtype: the shift of its
    Welford sums (0 for an empty input). Every program and split of a
    channel loads the same one, so their summaries are of the same shifted
    values. (64-bit offsets always: a few loads per program.)"""
    return tl.load(x_ptr + c_offs.to(tl.int64) * s_c, mask=(c_offs < C) & (R > 0) & (S > 0), other=0.0)


@_jit
def _welford(x_ptr, pivot, r_start, r_end, c_offs, s_r, s_c, C, S,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
             INT64: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr):
    """(mean, M2, count) of x - pivot over rows [r_start, r_end) and all S, per channel in c_offs.

    Every lane of the tile runs Welford's update on the values it sees,
        count += 1;  delta = x - mean;  mean += delta / count;  M2 += delta * (x - mean),
    and the lanes are merged with ``_merge`` at the end. With PREFETCH the
    next tile is loaded before the current one is used: two tiles in flight.

    Of x - pivot (``_pivot``), not x: the merge adds n_i (mean_i - mean)^2,
    and a lane's mean of a few values near 1e4 is rounded to float32 by up
    to 5e-4, which that term carries at first order (a variance of 0.87 over
    4 such values came out 1.2e-3 too small). Shifted by a value of the
    channel, the means are of the order of its spread and keep their digits.
    The mean of x is pivot + the returned mean.
    """
    mean = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    count = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    n_tiles = _n_tiles(r_start, r_end, S, BLOCK_R, BLOCK_S)
    offs, mask = _tile(0, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for t in range(0, n_tiles):
        if PREFETCH:
            offs, next_mask = _tile(t + 1, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            next_x = tl.load(x_ptr + offs, mask=next_mask, other=0.0)
        elif t > 0:
            offs, mask = _tile(t, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        xf = x.to(ACC) - pivot[None, :, None]
        count += mask.to(ACC)
        delta = xf - mean
        mean += tl.where(mask, delta / tl.maximum(count, 1.0), 0.0)
        m2 += tl.where(mask, delta * (xf - mean), 0.0)
        if PREFETCH:
            x = next_x
            mask = next_mask
    mean, m2, count = _merge(mean, m2, count, 2)
    mean, m2, count = _merge(mean, m2, count, 0)
    return mean, m2, count


@_jit
def _grad_sums(x_ptr, dy_ptr, mean, r_start, r_end, c_offs, s_r, s_c, C, S,
               BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
               INT64: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr):
    """sum(dy) and sum(dy * (x - mean)) over rows [r_start, r_end) and all S, per channel."""
    sum_dy = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_R, BLOCK_C, BLOCK_S], ACC)
    mu = mean[None, :, None]
    n_tiles = _n_tiles(r_start, r_end, S, BLOCK_R, BLOCK_S)
    offs, mask = _tile(0, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    for t in range(0, n_tiles):
        if PREFETCH:
            offs, next_mask = _tile(t + 1, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            next_x = tl.load(x_ptr + offs, mask=next_mask, other=0.0)
            next_dy = tl.load(dy_ptr + offs, mask=next_mask, other=0.0)
        elif t > 0:
            offs, mask = _tile(t, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
        dyf = dy.to(ACC)
        sum_dy += dyf
        sum_dy_xmu += dyf * (x.to(ACC) - mu)  # dy is 0 in masked lanes
        if PREFETCH:
            x = next_x
            dy = next_dy
    sum_dy = tl.sum(tl.sum(sum_dy, 2), 0)
    sum_dy_xmu = tl.sum(tl.sum(sum_dy_xmu, 2), 0)
    return sum_dy, sum_dy_xmu


@_jit
def _lerp(old, batch, momentum):
    """(1 - momentum) * old + momentum * batch, in old's dtype: in float64 for
    float64 buffers (a float32 input's float32 statistics would otherwise
    round them, 0.1 to 0.10000000149 even at momentum 0), else in batch's
    (float32 for half buffers)."""
    if old.dtype == tl.float64:
        new = (1.0 - momentum) * old + momentum * batch.to(tl.float64)
    else:
        new = (1.0 - momentum) * old.to(batch.dtype) + momentum * batch
    return new.to(old.dtype)


@_jit
def _finish_stats(mean, m2, count, c_offs, C, stats_ptr, rmean_ptr, rvar_ptr, momentum, eps, store,
                  UPDATE_RMEAN: tl.constexpr, UPDATE_RVAR: tl.constexpr):
    """From (mean, M2, count): store mean and invstd = 1/sqrt(M2/count + eps) in stats, update the running estimates.

    running = (1 - momentum) * running + momentum * batch, with the unbiased
    M2 / (count - 1) for the variance; a channel whose batch mean or variance is
    not finite keeps its running estimates. Only where ``store`` is true are
    stats and the running estimates written: when every split's program merges
    the statistics itself, one of them writes. Returns (mean, invstd).
    """
    c_mask = (c_offs < C) & store
    invstd = _invstd(m2 / tl.maximum(count, 1.0), eps)
    tl.store(stats_ptr + c_offs, mean, mask=c_mask)
    tl.store(stats_ptr + C + c_offs, invstd, mask=c_mask)
    if UPDATE_RMEAN or UPDATE_RVAR:
        var_unbiased = m2 / tl.maximum(count - 1.0, 1.0)
        # v - v is 0 for a finite v and NaN for NaN and +-Inf (NaN == 0 is False).
        finite = ((mean - mean) == 0.0) & ((var_unbiased - var_unbiased) == 0.0)
        if UPDATE_RMEAN:
            old = tl.load(rmean_ptr + c_offs, mask=c_mask, other=0.0)
            tl.store(rmean_ptr + c_offs, tl.where(finite, _lerp(old, mean, momentum), old), mask=c_mask)
        if UPDATE_RVAR:
            old = tl.load(rvar_ptr + c_offs, mask=c_mask, other=0.0)
            tl.store(rvar_ptr + c_offs, tl.where(finite, _lerp(old, var_unbiased, momentum), old), mask=c_mask)
    return mean, invstd


@_jit
def _merged_split_stats(part_ptr, c_offs, C, n_split, BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """(mean, M2, count) per channel of c_offs, merged (Chan) from the splits' summaries in part[3, n_split, C]."""
    ACC = part_ptr.dtype.element_ty
    mean = tl.zeros([BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_C], ACC)
    count = tl.zeros([BLOCK_C], ACC)
    for j0 in range(0, n_split, BLOCK_SPLIT):
        j = j0 + tl.arange(0, BLOCK_SPLIT)[:, None]
        mask = (j < n_split) & (c_offs[None, :] < C)
        offs = j * C + c_offs[None, :]
        part_count = tl.load(part_ptr + offs, mask=mask, other=0.0)
        part_mean = tl.load(part_ptr + n_split * C + offs, mask=mask, other=0.0)
        part_m2 = tl.load(part_ptr + 2 * n_split * C + offs, mask=mask, other=0.0)
        block_mean, block_m2, block_count = _merge(part_mean, part_m2, part_count, 0)
        mean, m2, count = _chan_combine(mean, m2, count, block_mean, block_m2, block_count)
    return mean, m2, count


@_jit
def _summed_split_grads(part_ptr, c_offs, C, n_split, BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """sum(dy) and sum(dy * (x - mean)) per channel of c_offs, added up over the splits' sums in part[2, n_split, C]."""
    ACC = part_ptr.dtype.element_ty
    sum_dy = tl.zeros([BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_C], ACC)
    for j0 in range(0, n_split, BLOCK_SPLIT):
        j = j0 + tl.arange(0, BLOCK_SPLIT)[:, None]
        mask = (j < n_split) & (c_offs[None, :] < C)
        offs = j * C + c_offs[None, :]
        sum_dy += tl.sum(tl.load(part_ptr + offs, mask=mask, other=0.0), 0)
        sum_dy_xmu += tl.sum(tl.load(part_ptr + n_split * C + offs, mask=mask, other=0.0), 0)
    return sum_dy, sum_dy_xmu


# ----------------------------------------------------------------------------
# Kernels. Grid: (cdiv(C, BLOCK_C), n_split); program (pid_c, j) owns channels
# pid_c*BLOCK_C + [0, BLOCK_C) and rows [j*rows_per_split, (j+1)*rows_per_split).
# ----------------------------------------------------------------------------

# What the elementwise kernels take their per-channel statistics from.
_FROM_BUFFER = 0  # a buffer the finalize kernel wrote (several splits)
_COMPUTE = 1  # this program reduces its channels itself (one split)
_RUNNING = 2  # the running estimates (eval mode)
_NONE = 3  # none needed (backward of eval mode without parameter gradients)
_FROM_PARTS = 4  # the splits' partial results, merged by every program itself (no finalize launch)


@_jit
def _partial_stats_kernel(x_ptr, part_ptr, C, S, R, s_r, s_c, rows_per_split,
                          BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                          INT64: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr):
    """Training forward, pass 1 of 3: each program's (count, mean, M2) into
    part[3, n_split, C], the mean of x minus the channel's pivot (``_welford``)."""
    pid_c = tl.program_id(0)
    j = tl.program_id(1)
    n_split = tl.num_programs(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    r_start = j * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    pivot = _pivot(x_ptr, c_offs, s_c, C, R, S).to(ACC)
    mean, m2, count = _welford(x_ptr, pivot, r_start, r_end, c_offs, s_r, s_c, C, S,
                               BLOCK_R, BLOCK_C, BLOCK_S, INT64, ACC, PREFETCH)
    c_mask = c_offs < C
    out = part_ptr + j * C + c_offs
    tl.store(out, count, mask=c_mask)
    tl.store(out + n_split * C, mean, mask=c_mask)
    tl.store(out + 2 * n_split * C, m2, mask=c_mask)


@_jit
def _finalize_stats_kernel(part_ptr, x_ptr, stats_ptr, rmean_ptr, rvar_ptr, C, S, R, s_c, n_split, momentum, eps,
                           UPDATE_RMEAN: tl.constexpr, UPDATE_RVAR: tl.constexpr,
                           BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Training forward, pass 2 of 3: merge the splits' summaries (Chan), write mean/invstd, update running stats."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean, m2, count = _merged_split_stats(part_ptr, c_offs, C, n_split, BLOCK_C, BLOCK_SPLIT)
    mean += _pivot(x_ptr, c_offs, s_c, C, R, S).to(mean.dtype)
    _finish_stats(mean, m2, count, c_offs, C, stats_ptr, rmean_ptr, rvar_ptr, momentum, eps, c_offs < C,
                  UPDATE_RMEAN, UPDATE_RVAR)


@_jit
def _normalize_kernel(x_ptr, y_ptr, w_ptr, b_ptr, stats_ptr, rmean_ptr, rvar_ptr, part_ptr,
                      C, S, R, s_r, s_c, rows_per_split, momentum, eps,
                      STATS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                      UPDATE_RMEAN: tl.constexpr, UPDATE_RVAR: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                      INT64: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr,
                      BLOCK_SPLIT: tl.constexpr):
    """y = (x - mean) * (invstd * gamma) + beta.

    STATS says where mean and invstd come from: _FROM_BUFFER (training, pass
    3 of 3, after the finalize kernel), _COMPUTE (training with one split: reduce here first, one launch),
    _FROM_PARTS (training, pass 2 of 2: merge the splits' summaries here; the
    program of split 0 writes stats and the running estimates), _RUNNING
    (eval: running_mean, 1/sqrt(running_var + eps)).
    """
    pid_c = tl.program_id(0)
    j = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    r_start = j * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    if STATS == 1:  # _COMPUTE
        pivot = _pivot(x_ptr, c_offs, s_c, C, R, S).to(ACC)
        mean, m2, count = _welford(x_ptr, pivot, r_start, r_end, c_offs, s_r, s_c, C, S,
                                   BLOCK_R, BLOCK_C, BLOCK_S, INT64, ACC, PREFETCH)
        mean, invstd = _finish_stats(mean + pivot, m2, count, c_offs, C, stats_ptr, rmean_ptr, rvar_ptr,
                                     momentum, eps, j == 0, UPDATE_RMEAN, UPDATE_RVAR)
    elif STATS == 4:  # _FROM_PARTS
        mean, m2, count = _merged_split_stats(part_ptr, c_offs, C, tl.num_programs(1), BLOCK_C, BLOCK_SPLIT)
        mean += _pivot(x_ptr, c_offs, s_c, C, R, S).to(ACC)
        mean, invstd = _finish_stats(mean, m2, count, c_offs, C, stats_ptr, rmean_ptr, rvar_ptr,
                                     momentum, eps, j == 0, UPDATE_RMEAN, UPDATE_RVAR)
    elif STATS == 2:  # _RUNNING
        mean = tl.load(rmean_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
        var = tl.load(rvar_ptr + c_offs, mask=c_mask, other=1.0).to(ACC)
        invstd = _invstd(var, eps)
    else:  # _FROM_BUFFER
        mean = tl.load(stats_ptr + c_offs, mask=c_mask, other=0.0)
        invstd = tl.load(stats_ptr + C + c_offs, mask=c_mask, other=0.0)
    scale = invstd
    if HAS_W:
        scale = scale * tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    shift = tl.zeros([BLOCK_C], ACC)
    if HAS_B:
        shift = tl.load(b_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    mean = mean[None, :, None]
    scale = scale[None, :, None]
    shift = shift[None, :, None]
    # Tiles last to first: after a reduction loop in this program, the tiles it
    # read last are the likeliest to still be in L2.
    n_tiles = _n_tiles(r_start, r_end, S, BLOCK_R, BLOCK_S)
    offs, mask = _tile(n_tiles - 1, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for i in range(0, n_tiles):
        t = n_tiles - 1 - i
        if PREFETCH:
            next_offs, next_mask = _tile(t - 1, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            next_x = tl.load(x_ptr + next_offs, mask=next_mask, other=0.0)
        elif i > 0:
            offs, mask = _tile(t, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        y = (x.to(ACC) - mean) * scale + shift
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        if PREFETCH:
            x, offs, mask = next_x, next_offs, next_mask


@_jit
def _partial_grad_sums_kernel(x_ptr, dy_ptr, stats_ptr, part_ptr, C, S, R, s_r, s_c, rows_per_split,
                              BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                              INT64: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr):
    """Backward, pass 1 of 3: each program's sum(dy) and sum(dy * (x - mean)) into part[2, n_split, C]."""
    pid_c = tl.program_id(0)
    j = tl.program_id(1)
    n_split = tl.num_programs(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    r_start = j * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    mean = tl.load(stats_ptr + c_offs, mask=c_mask, other=0.0)
    sum_dy, sum_dy_xmu = _grad_sums(x_ptr, dy_ptr, mean, r_start, r_end, c_offs, s_r, s_c, C, S,
                                    BLOCK_R, BLOCK_C, BLOCK_S, INT64, ACC, PREFETCH)
    out = part_ptr + j * C + c_offs
    tl.store(out, sum_dy, mask=c_mask)
    tl.store(out + n_split * C, sum_dy_xmu, mask=c_mask)


@_jit
def _finalize_grad_sums_kernel(part_ptr, stats_ptr, sums_ptr, C, n_split,
                               BLOCK_C: tl.constexpr, BLOCK_SPLIT: tl.constexpr):
    """Backward, pass 2 of 3: add up the splits; sums[0] = sum(dy * x_hat) = dgamma, sums[1] = sum(dy) = dbeta."""
    c_offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    sum_dy, sum_dy_xmu = _summed_split_grads(part_ptr, c_offs, C, n_split, BLOCK_C, BLOCK_SPLIT)
    invstd = tl.load(stats_ptr + C + c_offs, mask=c_mask, other=0.0)
    tl.store(sums_ptr + c_offs, sum_dy_xmu * invstd, mask=c_mask)
    tl.store(sums_ptr + C + c_offs, sum_dy, mask=c_mask)


@_jit
def _grad_input_kernel(x_ptr, dy_ptr, dx_ptr, w_ptr, stats_ptr, sums_ptr, part_ptr,
                       C, S, R, s_r, s_c, rows_per_split, m,
                       SUMS: tl.constexpr, TRAINING: tl.constexpr, HAS_W: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
                       INT64: tl.constexpr, ACC: tl.constexpr, PREFETCH: tl.constexpr,
                       BLOCK_SPLIT: tl.constexpr):
    r"""dx, from the saved mean and invstd (stats) and the sums.

    Training: dx = gamma * invstd * (dy - sum(dy)/m - x_hat * sum(dy * x_hat)/m)
    with x_hat = (x - mean) * invstd: the compact formula, the mean's path giving
    -sum(dy)/m and the variance's path -x_hat * sum(dy * x_hat)/m.
    Eval (running estimates are constants): dx = gamma * invstd * dy.

    SUMS says where the sums come from: _FROM_BUFFER (pass 3 of 3), _COMPUTE
    (one split: reduce here first and store them as dgamma, dbeta in sums),
    _FROM_PARTS (pass 2 of 2: add up the splits' sums here; the program of
    split 0 stores dgamma, dbeta), _NONE (eval without parameter gradients).
    """
    pid_c = tl.program_id(0)
    j = tl.program_id(1)
    c_offs = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c_offs < C
    r_start = j * rows_per_split
    r_end = tl.minimum(r_start + rows_per_split, R)
    mean = tl.load(stats_ptr + c_offs, mask=c_mask, other=0.0)
    invstd = tl.load(stats_ptr + C + c_offs, mask=c_mask, other=0.0)
    if SUMS == 1 or SUMS == 4:  # _COMPUTE, _FROM_PARTS
        if SUMS == 1:
            sum_dy, sum_dy_xmu = _grad_sums(x_ptr, dy_ptr, mean, r_start, r_end, c_offs, s_r, s_c, C, S,
                                            BLOCK_R, BLOCK_C, BLOCK_S, INT64, ACC, PREFETCH)
        else:
            sum_dy, sum_dy_xmu = _summed_split_grads(part_ptr, c_offs, C, tl.num_programs(1), BLOCK_C, BLOCK_SPLIT)
        sum_dy_xhat = sum_dy_xmu * invstd
        store = c_mask & (j == 0)
        tl.store(sums_ptr + c_offs, sum_dy_xhat, mask=store)
        tl.store(sums_ptr + C + c_offs, sum_dy, mask=store)
    elif SUMS == 0:  # _FROM_BUFFER
        sum_dy_xhat = tl.load(sums_ptr + c_offs, mask=c_mask, other=0.0)
        sum_dy = tl.load(sums_ptr + C + c_offs, mask=c_mask, other=0.0)
    else:  # _NONE
        sum_dy_xhat = tl.zeros([BLOCK_C], ACC)
        sum_dy = tl.zeros([BLOCK_C], ACC)
    inv_m = 1.0 / tl.full([BLOCK_C], m, ACC)  # m = R * S values per channel
    k = invstd  # gamma * invstd
    if HAS_W:
        k = k * tl.load(w_ptr + c_offs, mask=c_mask, other=0.0).to(ACC)
    mean_dy = (sum_dy * inv_m)[None, :, None]
    # x_hat * mean(dy * x_hat) = (x - mean) * (invstd * mean(dy * x_hat))
    xmu_coef = (invstd * sum_dy_xhat * inv_m)[None, :, None]
    mean = mean[None, :, None]
    k = k[None, :, None]
    n_tiles = _n_tiles(r_start, r_end, S, BLOCK_R, BLOCK_S)
    offs, mask = _tile(n_tiles - 1, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
    x = dy
    if TRAINING:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    for i in range(0, n_tiles):  # last tiles first (see _normalize_kernel)
        t = n_tiles - 1 - i
        if PREFETCH:
            next_offs, next_mask = _tile(t - 1, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            next_dy = tl.load(dy_ptr + next_offs, mask=next_mask, other=0.0)
            next_x = next_dy
            if TRAINING:
                next_x = tl.load(x_ptr + next_offs, mask=next_mask, other=0.0)
        elif i > 0:
            offs, mask = _tile(t, r_start, r_end, c_offs, s_r, s_c, C, S, BLOCK_R, BLOCK_S, INT64)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0)
            if TRAINING:
                x = tl.load(x_ptr + offs, mask=mask, other=0.0)
        if TRAINING:
            dx = k * (dy.to(ACC) - mean_dy - (x.to(ACC) - mean) * xmu_coef)
        else:
            dx = k * dy.to(ACC)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if PREFETCH:
            dy, x, offs, mask = next_dy, next_x, next_offs, next_mask


# ----------------------------------------------------------------------------
# Host side: layout, launch configuration, autograd
# ----------------------------------------------------------------------------

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Launch configuration knobs (bench/bench_gpu.py sweeps them on the GPU; the
# defaults are what its sweeps on an H100 favoured, see bench/results/).
#   tile: elements of x per tile (a power of 2), for 4-byte dtypes; 2-byte dtypes
#         use twice as many elements (the same bytes), float64 half.
#   block_c: channels per program in the channels-last view (power of 2).
#   programs_per_sm: the grid aims at this many programs per SM, splitting the
#         rows when there are fewer channel blocks. None: 4 in the channels-last
#         view; in the contiguous view one split (one launch per pass) when the
#         channels alone give an SM each, else 2 per SM.
#   n_split: force the number of splits (tests and sweeps).
#   max_block_s: the most spatial positions per tile in the contiguous view.
#   num_warps, num_stages: Triton's, for the big kernels (num_stages None: Triton's default).
#   prefetch: load the next tile before using the current one (two tiles in flight).
#   fuse_finalize_max_splits: with 2 to this many splits, the elementwise kernel
#         of each pass merges the splits' partial results itself (every program
#         reads n_split x BLOCK_C of them) instead of a finalize launch between
#         the two: two launches per pass instead of three. 0: always finalize.
#         64 takes in the small channels-last ResNet-50 shapes that an H100 ran
#         slower than native (17 and 33 splits there), and not the 66 to 523
#         splits of the big ones, where each program would re-read a lot.
CONFIG = {"tile": 2048, "block_c": 64, "programs_per_sm": None, "num_warps": 8, "max_block_s": 1024,
          "num_stages": None, "prefetch": False, "fuse_finalize_max_splits": 64}
# Channels-last problems of fewer elements than this take SMALL_CHANNELS_LAST's
# values instead: measured 5-25% faster there (forward and backward), slower
# on bigger ones.
SMALL_CHANNELS_LAST_ELEMENTS = 8 * 2**20
SMALL_CHANNELS_LAST = {"block_c": 32, "programs_per_sm": 2, "prefetch": True}


def _next_pow2(n):
    return 1 << max(int(n) - 1, 0).bit_length()


def _cdiv(a, b):
    """ceil(a / b) for positive ints. (``triton.cdiv`` is the same on the host,
    but as a Triton constexpr function it costs ~8 us per call there.)"""
    return -(-a // b)


_SMS = {}


def _num_sms(device):
    sms = _SMS.get(device)
    if sms is None:
        if device.type == "cuda":
            sms = torch.cuda.get_device_properties(device).multi_processor_count
        else:
            sms = 4  # the interpreter: a few programs, so several splits get tested
        _SMS[device] = sms
    return sms


def _rcs_view(x):
    """(x, R, C, S) with x laid out as (R, C, S) (the strides are ``_Launch``'s
    ``s_r``, ``s_c`` and 1); copies x only for other layouts."""
    N, C = x.shape[0], x.shape[1]
    S = 1
    for d in x.shape[2:]:
        S *= d
    if x.is_contiguous():
        return x, N, C, S
    channels_last = x.movedim(1, -1)
    if channels_last.is_contiguous():
        return x, N * S, C, 1
    return x.contiguous(), N, C, S


def _view_and_launch(input, config):
    """``input`` as the kernels read it (``_rcs_view``) and its cached ``_Launch``."""
    x, R, C, S = _rcs_view(input)
    return x, _launch(R, C, S, x.dtype, x.device, config)


# Launches already worked out, by problem: a training step sees the same few
# shapes again and again, and on small inputs the host's work per call, not
# the GPU's, sets the time.
_LAUNCHES = {}


def _launch(R, C, S, dtype, device, config=None):
    """The ``_Launch`` of an (R, C, S) problem under ``CONFIG`` and ``config``, cached."""
    key = (R, C, S, dtype, device, tuple(CONFIG.items()), tuple(SMALL_CHANNELS_LAST.items()),
           SMALL_CHANNELS_LAST_ELEMENTS, None if not config else tuple(sorted(config.items())))
    launch = _LAUNCHES.get(key)
    if launch is None:
        if len(_LAUNCHES) >= 1024:  # a bound for programs that see ever new shapes
            _LAUNCHES.clear()
        launch = _LAUNCHES[key] = _Launch(R, C, S, dtype, device, config)
    return launch


class _Launch:
    """Block sizes, grid and split of one (R, C, S) problem, and the strides
    (s_r, s_c) of its (R, C, S) view (``_rcs_view``)."""

    def __init__(self, R, C, S, dtype, device, config=None):
        cfg = dict(CONFIG)
        if S == 1 and R * C < SMALL_CHANNELS_LAST_ELEMENTS:
            cfg.update(SMALL_CHANNELS_LAST)
        cfg.update(config or {})
        tile = cfg["tile"] * 4 // dtype.itemsize
        if S > 1:  # one channel per program, tiles of (BLOCK_R rows, BLOCK_S positions)
            self.BLOCK_C = 1
            self.BLOCK_S = min(_next_pow2(S), cfg["max_block_s"], tile)
            self.BLOCK_R = min(max(tile // self.BLOCK_S, 1), _next_pow2(R))
        else:  # channels-last / (N, C): tiles of (BLOCK_R rows, BLOCK_C channels)
            self.BLOCK_S = 1
            self.BLOCK_C = min(_next_pow2(C), cfg["block_c"], tile)
            self.BLOCK_R = min(max(tile // self.BLOCK_C, 1), _next_pow2(R))
        c_blocks = _cdiv(C, self.BLOCK_C)
        n_sm = _num_sms(device)
        per_sm = cfg["programs_per_sm"]
        if per_sm is None:
            per_sm = 4 if S == 1 else (0 if c_blocks >= n_sm else 2)
        n_split = max(1, min(_cdiv(per_sm * n_sm, c_blocks), _cdiv(R, self.BLOCK_R)))
        if "n_split" in cfg:
            n_split = max(1, min(cfg["n_split"], R))
        # Whole tiles per split, so no tile straddles two splits.
        self.rows_per_split = _cdiv(_cdiv(R, n_split), self.BLOCK_R) * self.BLOCK_R
        self.n_split = _cdiv(R, self.rows_per_split)
        self.grid = (c_blocks, self.n_split)
        self.num_warps = cfg["num_warps"]
        self.num_stages = cfg["num_stages"]
        self.prefetch = cfg["prefetch"]
        self.R, self.C, self.S = R, C, S
        self.s_r, self.s_c = (C * S, S) if S > 1 else (C, 1)
        # The finalize kernels: up to 256 splits per step, then as many channels as fit in 4096 lanes.
        # Merged in the elementwise kernels instead (fuse_finalize): all splits in one step.
        self.fuse_finalize = 1 < self.n_split <= cfg["fuse_finalize_max_splits"]
        self.BLOCK_SPLIT = min(_next_pow2(self.n_split), 256)
        self.BLOCK_C_FINAL = min(_next_pow2(C), max(4096 // self.BLOCK_SPLIT, 16))
        self.final_grid = (_cdiv(C, self.BLOCK_C_FINAL),)
        self.acc = _acc_dtype(dtype)
        # The compile-time arguments every big kernel takes.
        self.common = dict(INT64=R * C * S >= 2**31, ACC=_tl_acc(dtype), **self.blocks())

    def blocks(self):
        out = dict(BLOCK_R=self.BLOCK_R, BLOCK_C=self.BLOCK_C, BLOCK_S=self.BLOCK_S, num_warps=self.num_warps,
                   PREFETCH=self.prefetch)
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tl_acc(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _on_device(device):
    """``device`` as the current CUDA device while kernels launch: Triton
    launches on the current device and its stream, so a tensor on ``cuda:1``
    while ``cuda:0`` is current would be refused ("Pointer argument cannot be
    accessed from Triton"), or, with peer access, be read on the other
    device's stream, unordered with its own. A no-op on the current device
    (and on the CPU, under the interpreter)."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _forward(x, launch, weight, bias, running_mean, running_var, training, momentum, eps):
    """The forward kernels on ``x`` (laid out as ``launch`` says): ``(y, stats)``,
    with ``stats[0]``, ``stats[1]`` the batch mean and invstd in training mode
    (eval mode leaves ``stats`` unwritten). Launched with x's device current.
    """
    with _on_device(x.device):
        return _launch_forward(x, launch, weight, bias, running_mean, running_var, training, momentum, eps)


def _launch_forward(x, launch, weight, bias, running_mean, running_var, training, momentum, eps):
    C = launch.C
    y = torch.empty_like(x)
    stats = torch.empty((2, C), dtype=launch.acc, device=x.device)  # mean, invstd
    dummy = stats
    w = weight if weight is not None else dummy
    b = bias if bias is not None else dummy
    rmean = running_mean if running_mean is not None else dummy
    rvar = running_var if running_var is not None else dummy
    update_rmean = training and running_mean is not None
    update_rvar = training and running_var is not None
    if training and launch.n_split > 1:
        part = torch.empty((3, launch.n_split, C), dtype=launch.acc, device=x.device)
        _partial_stats_kernel[launch.grid](x, part, C, launch.S, launch.R, launch.s_r, launch.s_c,
                                           launch.rows_per_split, **launch.common)
        if launch.fuse_finalize:
            mode = _FROM_PARTS
        else:
            _finalize_stats_kernel[launch.final_grid](
                part, x, stats, rmean, rvar, C, launch.S, launch.R, launch.s_c, launch.n_split, momentum, eps,
                UPDATE_RMEAN=update_rmean, UPDATE_RVAR=update_rvar,
                BLOCK_C=launch.BLOCK_C_FINAL, BLOCK_SPLIT=launch.BLOCK_SPLIT)
            mode = _FROM_BUFFER
    else:
        part = dummy
        mode = _COMPUTE if training else _RUNNING
    _normalize_kernel[launch.grid](x, y, w, b, stats, rmean, rvar, part, C, launch.S, launch.R, launch.s_r,
                                   launch.s_c, launch.rows_per_split, momentum, eps, STATS=mode,
                                   HAS_W=weight is not None, HAS_B=bias is not None,
                                   UPDATE_RMEAN=update_rmean, UPDATE_RVAR=update_rvar,
                                   BLOCK_SPLIT=launch.BLOCK_SPLIT if mode == _FROM_PARTS else 1, **launch.common)
    return y, stats


class _TritonBatchNorm(torch.autograd.Function):
    """The fused kernels behind one autograd node; the backward is the compact formula (see the kernels)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training, momentum, eps, config):
        x, launch = _view_and_launch(input, config)
        y, stats = _forward(x, launch, weight, bias, running_mean, running_var, training, momentum, eps)
        ctx.training = training
        ctx.eps = eps
        ctx.launch = launch
        ctx.has_weight = weight is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        if any(ctx.needs_input_grad[:3]):
            if not training:  # the running estimates as they are now, for dx and dgamma
                stats[0].copy_(running_mean)
                stats[1].copy_(torch.rsqrt(running_var.to(launch.acc) + eps))
            # The input, not x (a copy of it when its strides are unusual: the
            # backward makes it again rather than keep both), and the bias, for
            # a backward asked for a graph.
            ctx.save_for_backward(input, weight, stats, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        input, weight, stats, bias = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: gradients that can be differentiated again, from
            # autograd of the formula (bnlib.functional.grads_through_formula).
            from bnlib import functional as bnF

            if ctx.training:
                eps = ctx.eps

                def formula(i, w, b):
                    return bnF.batch_norm_formula(i, w, b, eps)
            else:
                mean, invstd = stats[0], stats[1]  # the running estimates at the forward: constants

                def formula(i, w, b):
                    xf = i.to(mean.dtype)
                    view = (1, -1) + (1,) * (i.dim() - 2)
                    y = (xf - mean.view(view)) * invstd.view(view)
                    y = y if w is None else y * w.to(y.dtype).view(view)
                    return (y if b is None else y + b.to(y.dtype).view(view)).to(i.dtype)

            grads = bnF.grads_through_formula(formula, (input, weight, bias), dy)
            return (*grads, None, None, None, None, None, None)
        with _on_device(input.device):  # (autograd's device threads set it too; kept for direct calls)
            return _TritonBatchNorm._backward_kernels(ctx, input, weight, stats, dy)

    @staticmethod
    def _backward_kernels(ctx, input, weight, stats, dy):
        x = _rcs_view(input)[0]
        launch = ctx.launch
        C = launch.C
        if dy.stride() != x.stride():  # the kernels read dy with x's strides
            dy = torch.empty_like(x).copy_(dy)
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        need_sums = ctx.training or need_w or need_b
        sums = torch.empty((2, C), dtype=launch.acc, device=x.device)  # dgamma, dbeta
        part = sums
        if need_sums and (launch.n_split > 1 or not need_dx):
            part = torch.empty((2, launch.n_split, C), dtype=launch.acc, device=x.device)
            _partial_grad_sums_kernel[launch.grid](x, dy, stats, part, C, launch.S, launch.R, launch.s_r, launch.s_c,
                                                   launch.rows_per_split, **launch.common)
            if need_dx and launch.fuse_finalize:
                mode = _FROM_PARTS
            else:
                _finalize_grad_sums_kernel[launch.final_grid](
                    part, stats, sums, C, launch.n_split,
                    BLOCK_C=launch.BLOCK_C_FINAL, BLOCK_SPLIT=launch.BLOCK_SPLIT)
                mode = _FROM_BUFFER
        else:
            mode = _COMPUTE if need_sums else _NONE
        dx = None
        if need_dx:
            dx = torch.empty_like(x)
            _grad_input_kernel[launch.grid](x, dy, dx, weight if ctx.has_weight else stats, stats, sums, part,
                                            C, launch.S, launch.R, launch.s_r, launch.s_c, launch.rows_per_split,
                                            launch.R * launch.S, SUMS=mode, TRAINING=ctx.training,
                                            HAS_W=ctx.has_weight,
                                            BLOCK_SPLIT=launch.BLOCK_SPLIT if mode == _FROM_PARTS else 1,
                                            **launch.common)
        dw = sums[0].to(weight.dtype) if need_w else None
        db = sums[1].to(ctx.bias_dtype) if need_b else None
        return dx, dw, db, None, None, None, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, config=None):
    """``torch.nn.functional.batch_norm`` on the fused Triton kernels.

    Args:
        input: ``(N, C, *spatial)``, float16, bfloat16, float32 or float64, on
            CUDA (CPU under ``TRITON_INTERPRET=1``). Contiguous and
            channels-last layouts are read as they are; others are copied.
        running_mean, running_var: ``(C,)`` or None; updated in place in
            training mode, used in eval mode (then required).
        weight, bias: ``gamma``, ``beta`` of shape ``(C,)``, or None.
        training, momentum, eps: as in torch.
        config: overrides of ``CONFIG`` (block sizes, split), for benchmarks.

    Returns:
        ``y``, the shape, dtype and memory layout of ``input``.

    Raises:
        ValueError: bad input (see the contract); nothing is updated then.
    """
    from bnlib import functional as bnF  # (here: bnlib.functional imports this module lazily too)

    if triton is None:
        raise RuntimeError("bnlib.triton_kernels needs Triton: pip install triton")
    if _TRITON_VERSION < MIN_TRITON:
        raise RuntimeError(f"bnlib.triton_kernels needs Triton >= {'.'.join(map(str, MIN_TRITON))}, "
                           f"found {triton.__version__}")
    # bnlib.functional.batch_norm's checks (dims, dtype, per-channel tensors,
    # training arguments, eval's estimates), then what only the kernels need
    bnF.check_batch_norm_args(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _checked_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, config)


def _checked_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps, config=None):
    """:func:`batch_norm` after ``bnlib.functional.check_batch_norm_args``:
    what ``bnlib.functional.batch_norm`` calls, having made those checks
    (made twice, they cost a few microseconds per call)."""
    from bnlib import functional as bnF

    if input.dtype not in _DTYPES:
        raise InputError(f"batch_norm's Triton kernels take float16, bfloat16, float32 or float64 input, got {input.dtype}")
    if not (_INTERPRET or input.is_cuda):
        raise InputError(f"batch_norm's Triton kernels need a CUDA tensor, got one on {input.device}")
    if bnF.under_func_transform():
        # torch.func or forward-mode AD: the kernels' Function has no vmap or
        # jvp rule, so the formulas in tensor ops (bnlib.functional's path)
        # compute it, before any running estimate is touched.
        return bnF.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)
    if momentum is None:  # eval mode: the running estimates are only read
        momentum = 0.0
    if input.numel() == 0:  # as torch: an empty output still connected to weight and bias
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        return out
    # The kernels index per-channel tensors with stride 1: strided running
    # estimates are updated through a contiguous copy, then copied back.
    weight, bias = (t if t is None or t.is_contiguous() else t.contiguous() for t in (weight, bias))
    rmean, rvar = (t if t is None or t.is_contiguous() else t.contiguous() for t in (running_mean, running_var))
    # Without an autograd node only when nothing could want a derivative: no
    # tensor requires grad and no forward-mode AD level is open (dual tensors).
    if (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias))) or (
            torch.autograd.forward_ad._current_level >= 0):
        y = _TritonBatchNorm.apply(input, weight, bias, rmean, rvar, bool(training), float(momentum), float(eps), config)
    else:  # no graph to record (inference): the kernels without the autograd node
        x, launch = _view_and_launch(input, config)
        y = _forward(x, launch, weight, bias, rmean, rvar, bool(training), float(momentum), float(eps))[0]
    if training:
        for t, copy in ((running_mean, rmean), (running_var, rvar)):
            if copy is not t:
                t.copy_(copy)
    return y
