r"""The running estimates of batch norm as a moving average.

In training, a BN layer keeps a running estimate of the mean (and of the
variance) of its input, updated once per mini-batch with the batch value
``mu_t``. The same exponential moving average (EMA) is written three ways:

- the lecture (Hung-yi Lee 2021):  ``mu_bar <- p * mu_bar + (1 - p) * mu_t``
- PyTorch and bnlib:               ``running = (1 - momentum) * running + momentum * mu_t``
  (``momentum = 1 - p``, default 0.1)
- Keras / TensorFlow:              ``moving = momentum * moving + (1 - momentum) * mu_t``
  (``momentum = p``, default 0.99)

Internally everything is PyTorch's ``alpha = momentum``, the weight of the
newest batch. Unrolled from the start value ``init`` after ``t`` updates,

.. math::

    \bar\mu_t = (1 - \alpha)^t\,\mathrm{init} + \sum_{k=1}^{t} \alpha (1 - \alpha)^{t-k}\,\mu_k ,

so a batch ``j`` steps old weighs ``alpha (1 - alpha)^j``: the effective window
is about ``1 / alpha`` batches, and the start value (0 for the mean, 1 for the
variance) still weighs ``(1 - alpha)^t`` (the early bias). ``momentum=None``
(PyTorch's convention only) is the cumulative average, factor ``1 / t``.

:func:`precise_bn` replaces the moving averages of every BN layer of a model
by exact averages over many batches, computed with the final weights
(Wu and Johnson 2021, "precise BN"). :func:`population_statistics` computes
what both estimate, each BN layer's input statistics over a data set under the
eval-mode model, and :func:`running_stat_gaps` how far the running statistics
are from them.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Iterable

import numpy as np

__all__ = [
    "CONVENTIONS",
    "to_torch_momentum",
    "from_torch_momentum",
    "convert_momentum",
    "effective_window",
    "equivalent_batches",
    "ema_sampling_std",
    "epoch_batch_stats",
    "steps_to_forget",
    "ema_weights",
    "ema_trace",
    "debias",
    "conversion_table",
    "is_batchnorm",
    "running_stat_layers",
    "precise_bn",
    "population_statistics",
    "running_stat_gaps",
]

#: The conventions and what their number means (the weight of the OLD average
#: for "lecture" and "keras", of the NEW batch for "torch").
CONVENTIONS = {
    "torch": "momentum = weight of the new batch (PyTorch, bnlib; default 0.1)",
    "lecture": "p = weight of the old average (Hung-yi Lee's lecture)",
    "keras": "momentum = weight of the old average (Keras / TensorFlow; default 0.99)",
}
_ALIASES = {"pytorch": "torch", "bnlib": "torch", "tensorflow": "keras", "tf": "keras", "p": "lecture"}


def _convention(convention: str) -> str:
    name = _ALIASES.get(convention, convention) if isinstance(convention, str) else convention
    if name not in CONVENTIONS:
        raise ValueError(f"convention must be one of {sorted(CONVENTIONS)}, got {convention!r}")
    return name


def _check_unit_interval(value, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    return float(value)


def to_torch_momentum(value, convention: str = "torch"):
    """PyTorch's ``momentum`` (``alpha``, the weight of the new batch) for ``value`` in ``convention``.

    ``"torch"``: ``alpha = value``; ``"lecture"`` and ``"keras"``: ``alpha = 1 - value``.
    ``None`` (the cumulative average) exists only in the ``"torch"`` convention.
    """
    name = _convention(convention)
    if value is None:
        if name != "torch":
            raise ValueError(f"momentum=None (cumulative average) exists only in the 'torch' convention, got {convention!r}")
        return None
    v = _check_unit_interval(value, f"{name} momentum")
    return v if name == "torch" else 1.0 - v


def from_torch_momentum(alpha, convention: str = "torch"):
    """The number ``convention`` uses for PyTorch's ``momentum = alpha`` (the inverse of :func:`to_torch_momentum`)."""
    name = _convention(convention)
    if alpha is None:
        if name != "torch":
            raise ValueError(f"momentum=None (cumulative average) has no {name!r} equivalent")
        return None
    a = _check_unit_interval(alpha, "torch momentum")
    return a if name == "torch" else 1.0 - a


def convert_momentum(value, source: str, target: str):
    """``value`` in convention ``source`` written in convention ``target``.

    ``convert_momentum(0.99, "keras", "torch")`` is 0.01 (up to rounding);
    ``convert_momentum(0.1, "torch", "lecture")`` is 0.9.
    """
    return from_torch_momentum(to_torch_momentum(value, source), target)


def _alpha(momentum, convention, allow_none=True):
    alpha = to_torch_momentum(momentum, convention)
    if alpha is None and not allow_none:
        raise ValueError("this needs a number, not momentum=None (the cumulative average has no fixed window)")
    return alpha


def effective_window(momentum, convention: str = "torch") -> float:
    """About how many recent batches the estimate averages: ``1 / alpha``.

    The newest batch weighs ``alpha``, as in a plain average over the last
    ``1 / alpha`` batches. The EMA reaches further back, though: its weights
    ``alpha (1 - alpha)^j`` for the batch ``j`` steps old have mean age
    ``(1 - alpha) / alpha``, twice that plain window's; a plain average of
    :func:`equivalent_batches` batches, ``(2 - alpha) / alpha``, matches the
    EMA in both mean age and noise. ``alpha = 0`` (the estimate never moves)
    gives ``inf``.
    """
    alpha = _alpha(momentum, convention, allow_none=False)
    return math.inf if alpha == 0 else 1.0 / alpha


def equivalent_batches(momentum, convention: str = "torch") -> float:
    r"""How many batches a plain average needs to be as noisy as the EMA: ``(2 - alpha) / alpha``.

    With independent batch values of variance ``v``, the steady-state EMA
    has variance ``v * sum_j w_j^2`` with weights ``w_j = alpha (1 - alpha)^j``,

    .. math::

        \sum_{j \ge 0} \alpha^2 (1 - \alpha)^{2j} = \frac{\alpha^2}{1 - (1 - \alpha)^2}
        = \frac{\alpha}{2 - \alpha},

    and the average of ``K`` batches has variance ``v / K``: equal for
    ``K = (2 - alpha) / alpha`` (19 batches at the default 0.1; Kish's
    effective sample size ``1 / sum w_j^2``). That plain average also has the
    EMA's mean age, ``(K - 1) / 2 = (1 - alpha) / alpha``: in noise and in lag
    the EMA behaves like the last ``K`` batches, for independent batch values
    (for epochs of disjoint batches of a finite set, see :func:`ema_sampling_std`). This is about twice
    :func:`effective_window`, ``1 / alpha``, which matches only the newest
    batch's weight. ``alpha = 0`` gives ``inf``.
    """
    alpha = _alpha(momentum, convention, allow_none=False)
    return math.inf if alpha == 0 else (2.0 - alpha) / alpha


def ema_sampling_std(momentum, batch_size: int, population: int, batches_per_epoch: int,
                     convention: str = "torch") -> np.ndarray:
    r"""Standard deviation of the EMA of batch means, in units of the population's, over epochs of disjoint batches.

    Training deals each epoch's batches without replacement: batch means of
    ``batch_size`` (:math:`B`) values from a population of ``population``
    (:math:`N`, with variance :math:`\sigma^2` taken over :math:`N`) have
    variance :math:`\frac{\sigma^2}{B}\frac{N - B}{N - 1}`, and two batches of one
    epoch, being disjoint, have covariance :math:`-\sigma^2/(N - 1)`; batches of
    different epochs are independent. The EMA with weights
    :math:`w_j = \alpha (1 - \alpha)^j` then has, in the steady state,

    .. math::

        \frac{\mathrm{Var}}{\sigma^2} = \frac{N - B}{B (N - 1)} \sum_j w_j^2
        - \frac{1}{N - 1} \sum_{\text{epochs } e}
        \Bigl[\Bigl(\sum_{j \in e} w_j\Bigr)^2 - \sum_{j \in e} w_j^2\Bigr],

    which depends on where in its epoch the newest batch is. Returns the
    standard deviation :math:`\sqrt{\mathrm{Var}}/\sigma` after each of the
    ``batches_per_epoch`` batches of an epoch (position 0: the epoch's first
    batch is the newest). A plain average of :math:`n` batches of one epoch
    has :math:`\frac{1}{nB}\frac{N - nB}{N - 1}`, less than independent batches
    would give: the EMA, whose weights reach back across epoch boundaries,
    gets less of that cancellation, so it is noisier than
    :func:`equivalent_batches` batches of one epoch.
    """
    alpha = _alpha(momentum, convention, allow_none=False)
    for name, value in (("batch_size", batch_size), ("population", population),
                        ("batches_per_epoch", batches_per_epoch)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size * batches_per_epoch > population:
        raise ValueError(f"an epoch of {batches_per_epoch} disjoint batches of {batch_size} needs at least "
                         f"{batch_size * batches_per_epoch} values, got population={population}")
    if alpha == 0:
        raise ValueError("momentum 0 never moves the EMA from its start value: it has no sampling noise")
    # enough weights that the rest of the sum is below 1e-16 of it
    n_weights = 1 if alpha == 1 else int(math.ceil(math.log(1e-16) / math.log1p(-alpha))) + 1
    age = np.arange(n_weights)
    weights = alpha * (1 - alpha) ** age
    own = (population - batch_size) / (batch_size * (population - 1)) * np.sum(weights ** 2)
    std = np.empty(batches_per_epoch)
    for position in range(batches_per_epoch):
        # the weight j steps back falls in the newest batch's epoch while
        # j <= position, then in the epochs before, batches_per_epoch each
        epoch = np.where(age <= position, 0, 1 + (age - position - 1) // batches_per_epoch)
        per_epoch = np.bincount(epoch, weights=weights)
        per_epoch_sq = np.bincount(epoch, weights=weights ** 2)
        shared = np.sum(per_epoch ** 2 - per_epoch_sq) / (population - 1)
        std[position] = math.sqrt(own - shared)
    return std


def epoch_batch_stats(z, batch_size: int, epochs: int, generator, batches: int | None = None):
    r"""The mean and unbiased variance of every batch of ``epochs`` shuffled epochs of ``z``.

    ``z``: shape ``(N, C)``, the values of ``C`` channels for ``N`` samples,
    fixed (say a first layer's outputs ``fc1(x)`` under fixed weights: they
    do not depend on the batch). Every epoch deals a new permutation of the
    ``N`` rows, ``torch.randperm(N, generator=generator)``, into
    ``K = N // batch_size`` disjoint batches of ``batch_size`` (:math:`m`)
    rows, the leftover rows unused: the batches that
    :func:`bnlib.training.minibatches` deals with the same generator. For
    each batch, per channel, the mean :math:`\mu_t` and the unbiased variance
    :math:`\frac{m}{m-1}\sigma^2_t`, what a BN layer fed ``z`` averages into its
    running statistics: an EMA of ``means.reshape(-1, C)`` (:func:`ema_trace`),
    or precise BN over the first ``k`` batches of an epoch,
    ``means[e, :k].mean(0)`` and ``variances[e, :k].mean(0)``, without running
    a model. ``batches``: keep only the first that many batches of each epoch
    (precise BN over them needs no more; the permutations drawn are the same).
    Returns float64 NumPy arrays ``(means, variances)``, each of shape
    ``(epochs, K, C)`` (``K = batches`` when given).
    """
    import torch

    for name, value in (("batch_size", batch_size), ("epochs", epochs)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a variance of one value is undefined), got {batch_size}")
    z = torch.as_tensor(z).detach().to(torch.float64)
    if z.dim() != 2:
        raise ValueError(f"z must have shape (N, C), got shape {tuple(z.shape)}")
    n = z.shape[0]
    if n < batch_size:
        raise ValueError(f"an epoch needs at least one batch of {batch_size} rows, got N={n}")
    k = n // batch_size
    if batches is not None:
        if isinstance(batches, bool) or not isinstance(batches, numbers.Integral) or not 1 <= batches <= k:
            raise ValueError(f"batches must be an integer from 1 to N // batch_size = {k}, got {batches!r}")
        k = int(batches)
    means = np.empty((epochs, k, z.shape[1]))
    variances = np.empty_like(means)
    # the permutations drawn one by one, in order (as minibatches draws them);
    # the batches of up to `chunk` epochs gathered at once (16 MB at most)
    chunk = max(1, 2 ** 21 // (k * batch_size * max(1, z.shape[1])))
    for start in range(0, epochs, chunk):
        stop = min(epochs, start + chunk)
        perms = torch.stack([torch.randperm(n, generator=generator)[:k * batch_size]
                             for _ in range(start, stop)])
        dealt = z[perms].reshape(stop - start, k, batch_size, -1)
        means[start:stop] = dealt.mean(dim=2).numpy()
        variances[start:stop] = dealt.var(dim=2, unbiased=True).numpy()
    return means, variances


def steps_to_forget(momentum, tol: float = 0.01, convention: str = "torch") -> float:
    """The number of updates ``t`` after which the start value weighs less than ``tol``:
    the smallest ``t`` with ``(1 - alpha)^t < tol``, i.e. ``t > ln(tol) / ln(1 - alpha)``.

    ``alpha = 1`` forgets at once (1 step); ``alpha = 0`` never (``inf``).
    """
    alpha = _alpha(momentum, convention, allow_none=False)
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not 0 < tol < 1:
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if alpha == 1:
        return 1
    if alpha == 0:
        return math.inf
    t = math.floor(math.log(tol) / math.log1p(-alpha)) + 1
    # The logarithms round: at an exact boundary (alpha 0.1, tol 0.9, where
    # 0.9^1 == tol) the quotient is 0.999..., one step short. Settle t on the
    # definition itself, by a step or two at most, and only where the base
    # 1 - alpha keeps alpha's digits: for a tiny alpha its rounding moves t
    # by more than the logarithms do (alpha 1e-12: by 1e8 steps, walked one at
    # a time), and below 1.1e-16 it is 1.0 (the walk never ended).
    if alpha > 1e-6:
        for _ in range(2):
            if (1 - alpha) ** t >= tol:
                t += 1
            elif t > 1 and (1 - alpha) ** (t - 1) < tol:
                t -= 1
    return t


def ema_weights(t: int, momentum, convention: str = "torch") -> np.ndarray:
    """The weights of the start value and of the batches in the estimate after ``t`` updates.

    Returns shape ``(t + 1,)``: entry 0 is the weight of ``init``,
    ``(1 - alpha)^t``; entry ``k`` (1..t) that of batch ``k``,
    ``alpha (1 - alpha)^(t - k)``. They sum to 1. ``momentum=None``: init 0,
    every batch ``1 / t``.
    """
    if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0:
        raise ValueError(f"t must be an integer >= 0, got {t!r}")
    alpha = _alpha(momentum, convention)
    w = np.empty(t + 1)
    if alpha is None:
        w[0] = 1.0 if t == 0 else 0.0
        w[1:] = 1.0 / t if t else 0.0
        return w
    ages = np.arange(t - 1, -1, -1, dtype=np.float64)  # batch k is t - k steps old
    w[0] = (1.0 - alpha) ** t
    w[1:] = alpha * (1.0 - alpha) ** ages
    return w


def ema_trace(values, momentum, convention: str = "torch", init=0.0) -> np.ndarray:
    """The running estimate after each update, for a stream of batch values.

    ``values``: shape ``(T,)`` or ``(T, C)`` (one row per batch, e.g. the batch
    means ``mu_t`` of ``C`` channels). Returns float64 of the same shape: row
    ``t - 1`` is the estimate after ``t`` updates, starting from ``init``
    (a number or ``(C,)``; PyTorch starts the mean at 0 and the variance at 1)
    with ``running = (1 - alpha) * running + alpha * values[t - 1]``.
    ``momentum=None``: the cumulative average of ``values[:t]`` (``init`` is
    forgotten at the first update, as in PyTorch).
    """
    alpha = _alpha(momentum, convention)
    v = np.asarray(values, dtype=np.float64)
    if v.ndim not in (1, 2) or v.shape[0] < 1:
        raise ValueError(f"values must have shape (T,) or (T, C) with T >= 1, got shape {v.shape}")
    running = np.broadcast_to(np.asarray(init, dtype=np.float64), v.shape[1:]).copy()
    out = np.empty_like(v)
    for t in range(v.shape[0]):
        factor = 1.0 / (t + 1) if alpha is None else alpha
        running = (1.0 - factor) * running + factor * v[t]
        out[t] = running
    return out


def debias(trace, momentum, init=0.0, convention: str = "torch") -> np.ndarray:
    """Remove the start value's share from an EMA trace (as Adam does for its moments).

    After ``t`` updates the estimate is ``(1 - alpha)^t * init`` plus the batch
    values with weights summing to ``1 - (1 - alpha)^t``; dividing out gives

    ``(trace_t - (1 - alpha)^t * init) / (1 - (1 - alpha)^t)``,

    a weighted average of the batch values only. ``trace``: the output of
    :func:`ema_trace`, shape ``(T,)`` or ``(T, C)``. ``momentum=None``: returned as is.
    """
    alpha = _alpha(momentum, convention)
    tr = np.asarray(trace, dtype=np.float64)
    if tr.ndim not in (1, 2) or tr.shape[0] < 1:
        raise ValueError(f"trace must have shape (T,) or (T, C) with T >= 1, got shape {tr.shape}")
    if alpha is None:
        return tr.copy()
    if alpha == 0:
        raise ValueError("momentum 0 never moves the estimate: there is nothing to debias")
    t = np.arange(1, tr.shape[0] + 1, dtype=np.float64).reshape((-1,) + (1,) * (tr.ndim - 1))
    left = (1.0 - alpha) ** t
    return (tr - left * np.asarray(init, dtype=np.float64)) / (1.0 - left)


def conversion_table(torch_momenta=(0.5, 0.1, 0.01, 0.001), tol: float = 0.01) -> str:
    """A fixed-width text table: one row per PyTorch ``momentum``, with the lecture's ``p``,
    Keras' ``momentum``, the effective window ``1 / momentum`` and :func:`steps_to_forget`
    (updates until the start value weighs less than ``tol``). Headers on two lines, so
    that it fits a book page (52 characters). Print the returned string.
    """
    head = [("torch", "momentum"), ("lecture", "p"), ("keras", "momentum"), ("window", "1/momentum"),
            ("steps until", f"init < {tol:g}")]
    rows = []
    for a in torch_momenta:
        rows.append([
            f"{to_torch_momentum(a):g}",
            f"{convert_momentum(a, 'torch', 'lecture'):.4g}",
            f"{convert_momentum(a, 'torch', 'keras'):.4g}",
            f"{effective_window(a):g}",
            f"{steps_to_forget(a, tol)}",
        ])
    widths = [max(len(h[0]), len(h[1]), *(len(r[j]) for r in rows)) for j, h in enumerate(head)]
    lines = ["  ".join(h[k].rjust(w) for h, w in zip(head, widths)) for k in (0, 1)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Precise BN
# ---------------------------------------------------------------------------


def is_batchnorm(module) -> bool:
    """True for a batch norm layer: torch's ``nn.BatchNorm*d`` / ``SyncBatchNorm``
    or bnlib's (``bnlib.nn.BatchNorm*d``, ``SyncBatchNorm``, ``GhostBatchNorm``).

    Not batch renorm (``bnlib.nn.BatchRenorm1d/2d``): in training mode its
    output is corrected towards its running statistics, so re-estimating them
    with the layer in training mode (:func:`precise_bn`, which leaves it in
    eval mode) or adapting it at test time (``bnlib.adaptation``) is not BN's
    procedure. Folding and freezing take it
    (``frozen_batchnorm.freezable``: its eval mode is BN's), and so does
    ``training.train(decay_bn=False)``, which exempts its gamma and beta."""
    import torch
    from bnlib import nn as bnn

    return isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, bnn._BatchNorm))


def running_stat_layers(model) -> list:
    """The BN layers of ``model`` (in ``model.modules()`` order) that keep running statistics."""
    return [
        m for m in model.modules()
        if is_batchnorm(m) and m.track_running_stats and m.running_mean is not None
    ]


def precise_bn(model, batches: Iterable, max_batches: int | None = None, estimator: str = "batch_average"):
    r"""Recompute the running statistics of every BN layer as exact averages (Wu and Johnson 2021).

    For every BN layer with running statistics: reset them (mean 0, variance 1,
    count 0), set ``momentum=None`` (the cumulative average), and run the model
    forward on ``batches`` (an iterable of input tensors, or of tuples/lists
    whose first entry is the input, e.g. ``(x, y)``; a single tensor is one
    batch), without gradients. After
    ``T`` batches of equal size each layer holds

    .. math::

        \text{running\_mean} = \frac{1}{T}\sum_{t=1}^{T} \mu_t, \qquad
        \text{running\_var} = \frac{1}{T}\sum_{t=1}^{T} \frac{m}{m-1}\,\sigma_t^2,

    the averages of the batch means and of the unbiased batch variances under the
    model's current (final) weights, instead of an EMA that mixes statistics
    of older weights (``estimator="batch_average"``, what torch's
    ``update_bn`` computes). ``estimator="pooled"`` instead pools all ``n``
    values of a channel that reached the layer, as one batch:

    .. math::

        \begin{aligned}
        \text{running\_mean} &= \frac{1}{n}\sum_i z_i,\\
        \text{running\_var} &= \frac{1}{n-1}\sum_i (z_i - \text{running\_mean})^2,
        \end{aligned}

    accumulated in float64 with Chan's merge (the layer's input is read by a
    forward pre-hook; each batch is summarized on its device in its own
    precision, float32 for half inputs). The two differ when the batches' values are not
    independent draws: in training mode an earlier BN layer normalizes each
    batch by its own statistics, so a later layer's batch variances are each
    a little too small or too large, and ``m/(m-1)`` times their average
    misses the variance at inference by a bias that grows as the batches
    shrink; pooling keeps the spread of the batch means and the within-batch
    spread together, and is the better estimate for small batches (Wu and
    Johnson 2021, appendix; fvcore's ``PopulationVarianceEstimator`` pools
    the same way). It pools what this process sees: with more than one process in
    ``torch.distributed`` it raises ``ValueError``. For batches of equal
    size the two means agree.
    During the pass only the BN layers are in training mode
    (dropout and the like are in eval mode, as at inference); afterwards every
    module's mode and every BN's ``momentum`` are as before. Gradients and
    parameters are not touched. ``max_batches`` stops after that many batches.
    An empty batch is skipped: it has nothing to measure, yet the layers would
    count it (torch's ``update_bn`` does, which pulls the averages towards
    the reset values).
    A BN layer that no batch reaches (say, an auxiliary head that runs only
    in training mode) keeps its old statistics instead of the reset ones.

    Returns ``model`` (changed in place). Raises ``ValueError`` when the model
    has no BN layer with running statistics, ``batches`` holds no batch
    that is not empty, or ``estimator`` is neither of the two; then (and on any other error during the pass) every
    running statistic is restored.
    """
    import torch

    from bnlib.batchnorm import check_initialized
    from bnlib.models import modes_kept

    layers = running_stat_layers(model)
    if not layers:
        raise ValueError("precise_bn expected a model with at least one BN layer that tracks running statistics, got none")
    check_initialized(layers, "precise_bn")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral) or max_batches < 1):
        raise ValueError(f"max_batches must be None or an integer >= 1, got {max_batches!r}")
    if estimator not in ("batch_average", "pooled"):
        raise ValueError(f"precise_bn expects estimator='batch_average' or 'pooled', got {estimator!r}")
    pooled = estimator == "pooled"
    if pooled and torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1:
        raise ValueError("precise_bn(estimator='pooled') pools one process's inputs; with "
                         f"{torch.distributed.get_world_size()} processes use estimator='batch_average'")

    batches = _batches_of(batches)
    saved_state = [{k: v.clone() for k, v in bn.named_buffers(recurse=False)} for bn in layers]
    saved_momentum = [bn.momentum for bn in layers]
    if max_batches is not None:
        batches = itertools.islice(batches, max_batches)  # (an iterator loses no batch beyond them)
    def restore(which):
        # copy the saved buffers back into the layers marked True
        with torch.no_grad():
            for bn, state, chosen in zip(layers, saved_state, which):
                if chosen:
                    for k, v in state.items():
                        getattr(bn, k).copy_(v)

    # estimator="pooled": (count, mean, M2) per channel of each layer's inputs
    summaries = [None] * len(layers)
    handles = _record_inputs(layers, summaries) if pooled else []
    n = 0
    with modes_kept(model):
        try:
            model.eval()
            for bn in layers:
                bn.reset_running_stats()
                bn.momentum = None
                bn.train()
            with torch.no_grad():
                for batch in batches:
                    if batch.numel() == 0:  # nothing to measure, yet it would count as a batch
                        continue
                    model(batch)
                    n += 1
            if n == 0:
                raise ValueError("precise_bn expected at least one batch that is not empty, got none")
            # a layer no batch reached measured nothing: it keeps its old statistics
            reached = [int(bn.num_batches_tracked) > 0 for bn in layers]  # (before restore sets old counts)
            restore([not r for r in reached])
            if pooled:
                unseen = [bn for bn, summary, r in zip(layers, summaries, reached) if summary is None and r]
                if unseen:  # (a model that calls bn.forward(x) directly skips the hooks)
                    names = {id(m): name for name, m in model.named_modules()}
                    raise ValueError(f"precise_bn(estimator='pooled') could not read the inputs of "
                                     f"{', '.join(names[id(bn)] for bn in unseen)}: called without its forward "
                                     "pre-hooks (bn.forward(x) instead of bn(x)); use estimator='batch_average'")
            with torch.no_grad():
                for bn, summary in zip(layers, summaries):
                    if summary is not None:  # (pooled; training mode saw > 1 value per channel)
                        count, mean, m2 = summary
                        # (rounded to the buffers' dtype on the host: MPS has no float64)
                        bn.running_mean.copy_(torch.as_tensor(mean, dtype=bn.running_mean.dtype))
                        bn.running_var.copy_(torch.as_tensor(m2 / (count - 1), dtype=bn.running_var.dtype))
        except BaseException:
            restore([True] * len(layers))
            raise
        finally:
            for h in handles:
                h.remove()
            for bn, mom in zip(layers, saved_momentum):
                bn.momentum = mom
    return model


def _batches_of(data):
    # the inputs of precise_bn and population_statistics: a tensor is one
    # batch; otherwise an iterable of batches (tensors, or tuples/lists whose
    # first entry is the input), so a pair (x, y) is two batches, x and y
    import torch

    if isinstance(data, torch.Tensor):
        return [data]
    if not isinstance(data, Iterable):
        raise ValueError(f"expected an input tensor or an iterable of batches, got {type(data).__name__}")
    return (b[0] if isinstance(b, (tuple, list)) else b for b in data)


def _record_inputs(layers, summaries):
    """Forward pre-hooks that merge each call's input into ``summaries[k]``,
    the ``(count, mean, M2)`` per channel of layer ``k`` (Chan's merge; an
    empty input adds nothing); returns their handles, to remove."""
    from bnlib.perf import chan_merge

    def recorder(k):
        def hook(module, args, kwargs):
            z = args[0] if args else kwargs["input"]
            if z.numel() > 0:
                part = _channel_summary(z, None if summaries[k] is None else summaries[k][1])
                summaries[k] = part if summaries[k] is None else chan_merge(summaries[k], part)
        return hook

    return [bn.register_forward_pre_hook(recorder(k), with_kwargs=True) for k, bn in enumerate(layers)]


def _channel_summary(z, shift=None):
    """(count, mean, M2) per channel (dim 1) of ``z``, as float64 NumPy arrays.

    Computed on z's device in z's precision (float32 for half inputs), not
    in a float64 copy of z (twice the memory on a GPU; MPS has no float64);
    only the (C,) results go to the host, where Chan's merge pools the
    batches in float64. The values are summed as ``d = z - shift``, with
    ``shift`` the mean so far (float64, from the host) or, for the first
    batch, z's own mean: ``d`` is on the scale of the spread, so its float32
    sums keep the digits a mean of 1e4 would round away, and the mean comes
    out as ``shift + mean(d)`` in float64. Two passes over ``d`` (its mean,
    then the squared deviations from it): stable for any mean."""
    import torch

    from bnlib.functional import to_float64

    z = z.detach()
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    z = z.transpose(0, 1).reshape(z.shape[1], -1)
    if shift is None:
        shift = z.mean(dim=1)
    else:  # rounded to z's dtype: the shift used is the one added back
        shift = torch.as_tensor(shift, dtype=z.dtype).to(z.device)
    d = z - shift[:, None]
    mean_d = d.mean(dim=1)
    m2 = (d - mean_d[:, None]).square().sum(dim=1)
    host = [to_float64(t, "cpu").numpy() for t in (shift, mean_d, m2)]
    return float(z.shape[1]), host[0] + host[1], host[2]


def population_statistics(model, data) -> list:
    r"""Each BN layer's input mean and unbiased variance per channel over ``data``,
    under the eval-mode model: the statistics inference needs, and that the
    running statistics (EMA, or :func:`precise_bn`) only estimate.

    ``data`` is one input tensor (e.g. the whole training set) or an iterable
    of batches as for :func:`precise_bn` (a pair ``(x, y)`` is two batches:
    pass ``x`` alone, or ``[(x, y)]``). For each BN layer with running
    statistics (:func:`running_stat_layers` order), over all ``n`` values of
    channel ``c`` that reach it (every sample, and every position for
    ``(N, C, *)`` inputs),

    .. math::

        \mu_c = \frac{1}{n}\sum_i z_{i,c}, \qquad
        \sigma^2_c = \frac{1}{n - 1}\sum_i (z_{i,c} - \mu_c)^2 ,

    accumulated batch by batch in float64 with Chan's merge
    (:func:`bnlib.perf.chan_merge`), so the batches need not fit in memory
    together; empty batches add nothing. A layer called more than once per
    forward pass pools the inputs of all its calls. The model runs in eval
    mode without gradients; its modes and buffers are left as they were.
    Returns a list of ``(mean, var)`` pairs of float64 tensors of shape
    ``(C,)``, on the layer's device (on the CPU for a layer on MPS, which has
    no float64). Raises ``ValueError`` for a model without such a BN layer, empty
    ``data``, a lazy BN layer that has not seen an input yet, a BN layer that
    no batch reaches (named in the message), or a layer that saw one value
    per channel (no variance).
    """
    import torch

    from bnlib.batchnorm import check_initialized
    from bnlib.functional import to_float64
    from bnlib.models import modes_kept

    layers = running_stat_layers(model)
    if not layers:
        raise ValueError("population_statistics expected a model with at least one BN layer that tracks running statistics, got none")
    # (a lazy layer's first call would initialize it: no longer "left as it was")
    check_initialized(layers, "population_statistics")
    batches = _batches_of(data)
    summaries = [None] * len(layers)
    handles = _record_inputs(layers, summaries)
    try:
        with modes_kept(model), torch.no_grad():
            model.eval()
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    if all(s is None for s in summaries):
        raise ValueError("population_statistics expected at least one batch, got none (or only empty ones)")
    if any(s is None for s in summaries):
        names = {id(m): name for name, m in model.named_modules()}
        missing = [names[id(bn)] for bn, s in zip(layers, summaries) if s is None]
        raise ValueError(f"population_statistics expected every BN layer to see the data; no batch reached {', '.join(missing)}")
    stats = []
    for bn, (n, mean, m2) in zip(layers, summaries):
        if n < 2:
            raise ValueError(f"population_statistics needs at least 2 values per channel, got {n:g}")
        stats.append((to_float64(torch.as_tensor(mean), bn.running_mean.device),
                      to_float64(torch.as_tensor(m2 / (n - 1)), bn.running_mean.device)))
    return stats


def running_stat_gaps(model, data) -> list:
    r"""How far each BN layer's running statistics are from :func:`population_statistics`:
    per layer, a pair of float64 tensors of shape ``(C,)``,

    .. math::

        \text{mean gap}_c = \frac{|\bar\mu_c - \mu_c|}{\sigma_c}, \qquad
        \text{variance gap}_c = \frac{\bar\sigma^2_c}{\sigma^2_c} - 1,

    with ``running_mean`` :math:`\bar\mu` and ``running_var``
    :math:`\bar\sigma^2`: the mean's error in standard deviations, and the
    variance's relative error (signed: above 0 when too large). A channel
    whose input does not vary (:math:`\sigma_c = 0`) gets ``inf`` or ``nan``.
    Same arguments, checks and guarantees as :func:`population_statistics`.
    """
    from bnlib.functional import to_float64

    gaps = []
    for bn, (mean, var) in zip(running_stat_layers(model), population_statistics(model, data)):
        running_mean, running_var = to_float64(bn.running_mean), to_float64(bn.running_var)
        gaps.append(((running_mean - mean).abs() / var.sqrt(), running_var / var - 1))
    return gaps
