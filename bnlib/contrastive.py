r"""Contrastive learning with per-device BN: a shortcut through the batch (chapter 8).

A contrastive objective learns features without labels: two noisy views of
the same input should have similar features, views of different inputs
dissimilar ones. For a batch of ``B`` inputs the encoder ``f`` gives the
*queries* :math:`q_i = f(x_i + \text{noise})` and the *keys*
:math:`k_i = f(x_i + \text{other noise})`, both scaled to unit length, and
the InfoNCE loss is a classification of the right key among all ``B`` keys
of the batch, with temperature ``tau``:

.. math::

    L = -\frac{1}{B} \sum_{i=1}^{B}
        \log \frac{\exp(q_i \cdot k_i / \tau)}{\sum_{j=1}^{B} \exp(q_i \cdot k_j / \tau)} .

This is a simplified, one-directional, in-batch form. MoCo (He et al. 2020)
takes its negatives from a queue of keys of earlier batches, computed by a
slowly moving copy of the encoder; SimCLR (Chen et al. 2020) is symmetric
in the two views and gives each view the other ``2B - 2`` views of the
batch as negatives.

Data-parallel training puts ``device_batch`` consecutive rows on each
device, and a BN layer there normalizes with the statistics of those rows
only (:func:`encode`, ``device_batch=b``). Then :math:`q_i` and :math:`k_i`
are normalized with the statistics of the same ``b`` images, a mark that
the query shares with its own key and the ``b - 1`` other keys of its
device, and with no key elsewhere; the encoder can learn to match it
instead of the images. He et al. saw a shortcut of this kind in MoCo
(where the positive is the only key of the current batch in the logits)
and removed it by *shuffling BN*: the keys are encoded in a random
regrouping of the rows over the devices and put back in order afterwards
(``order=``), so that a query and its key are normalized with the
statistics of different, random groups of rows (which share, on average,
``1 + (b - 1)**2 / (N - 1)`` of their ``b`` rows). SimCLR takes BN's
statistics over all devices instead
("global BN", here :mod:`bnlib.sync_batchnorm`).

Here the devices are simulated in one process: the encoder's BN layers are
:class:`bnlib.nn.GhostBatchNorm <bnlib.ghost_batchnorm.GhostBatchNorm>`, whose virtual batches are the devices'
slices, and :func:`encode` sets their size to ``device_batch``. Every other
layer must treat each row on its own (an MLP's linear layers, activations,
LN, dropout); then one call on all rows computes what the devices would
compute on their slices, without a Python loop over the devices. A layer
that mixes rows in some other way is not detected. With
``running_stats="first"`` the running estimates are the ones DDP keeps
(rank 0's, from its own slice, once per call). Inputs are CPU tensors (the
noise and the targets are made on the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bnlib._checks import check_integer_at_least
from bnlib.alternatives import _InstanceNorm
from bnlib.frozen_batchnorm import FrozenBatchNorm
from bnlib.ghost_batchnorm import GhostBatchNorm
from bnlib.models import buffers_kept, modes_kept

__all__ = [
    "augment",
    "device_batches",
    "encode",
    "info_nce",
    "retrieval_accuracy",
    "train_contrastive",
    "positive_retrieval",
    "nearest_neighbour_accuracy",
]


def _check_rows(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[0] < 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D tensor (N, d) with N >= 2, got {shape}")


def _check_device_batch(n: int, device_batch: int | None) -> None:
    if device_batch is None:
        return
    check_integer_at_least("device_batch", device_batch, 2)   # BN needs two rows
    if n % device_batch:
        raise ValueError(f"device_batch must divide the {n} rows of the batch, got {device_batch}")


def augment(x: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """One view of ``x``: ``x`` plus Gaussian noise of standard deviation ``noise``, drawn from ``generator``."""
    return x + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _uses_batch_statistics(module: nn.Module) -> bool:
    """A BN-like layer (it keeps ``running_mean``, possibly ``None``) that
    normalizes with the statistics of the rows it is given: in training mode,
    or without running estimates. Instance norms normalize each row on its
    own and a frozen BN never looks at the batch."""
    per_row = (nn.modules.instancenorm._InstanceNorm, _InstanceNorm, FrozenBatchNorm)
    return (hasattr(module, "running_mean") and not isinstance(module, per_row)
            and (module.training or module.running_mean is None))


@contextlib.contextmanager
def device_batches(encoder: nn.Module, device_batch: int) -> Iterator[None]:
    """Within the block, every :class:`GhostBatchNorm <bnlib.ghost_batchnorm.GhostBatchNorm>` of ``encoder``
    that uses batch statistics (training mode) normalizes virtual batches of
    ``device_batch`` rows: one device each (a remainder of ``N`` rows that
    ``device_batch`` does not divide is a last, smaller device).

    Raises ``ValueError``, before anything changes, when another layer would
    normalize with the statistics of all rows at once (a BatchNorm, SyncBN,
    Batch Renorm or any layer with a ``running_mean``, in training mode or
    without running estimates): it cannot stand for per-device BN. The
    GhostBatchNorm layers get their own sizes back afterwards, also when the
    block raises; running estimates that a layer had already updated stay
    updated.
    """
    check_integer_at_least("device_batch", device_batch, 2)   # BN needs two rows
    for name, module in encoder.named_modules():
        if _uses_batch_statistics(module) and not isinstance(module, GhostBatchNorm):
            raise ValueError(
                "per-device BN is simulated with GhostBatchNorm layers, but "
                f"{f'layer {name!r}' if name else 'the encoder'} ({type(module).__name__}) would normalize "
                "with the statistics of all rows; build the encoder with bnlib.nn.GhostBatchNorm instead")
    ghosts = [m for m in encoder.modules() if isinstance(m, GhostBatchNorm)]
    sizes = [m.virtual_batch_size for m in ghosts]
    try:
        for module in ghosts:
            module.virtual_batch_size = device_batch
        yield
    finally:
        for module, size in zip(ghosts, sizes):
            module.virtual_batch_size = size


def encode(
    encoder: nn.Module,
    x: torch.Tensor,
    device_batch: int | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """``encoder(x)`` scaled to unit length per row, shape ``(N, d_out)``.

    ``device_batch=None``: one call on all ``N`` rows, the encoder as it is
    (in eval mode, BN uses its running estimates). ``device_batch=b``: the
    rows are cut into ``N / b`` consecutive slices of ``b`` rows, one per
    device, and every BN layer (a :class:`GhostBatchNorm <bnlib.ghost_batchnorm.GhostBatchNorm>`; see
    :func:`device_batches`) normalizes each slice with that slice's
    statistics in training mode. ``order`` (a permutation of ``range(N)``):
    the slices are cut from ``x[order]`` instead, and the output is put back
    in the order of ``x`` (shuffle BN: row ``i`` of the result is still
    ``f(x_i)``, normalized with the statistics of another group of rows).
    Each GhostBatchNorm's own ``virtual_batch_size`` is overridden for the
    call (ghost batches within a device are not simulated), and its running
    estimates move as its ``running_stats`` says, once per call: ``"first"``
    from the first device's rows, as DDP keeps them; ``"pooled"`` from the
    statistics of all devices pooled.
    """
    _check_rows(x)
    n = x.shape[0]
    _check_device_batch(n, device_batch)
    if order is not None:
        if device_batch is None:
            raise ValueError("order regroups the rows over devices: it needs device_batch")
        if not torch.is_tensor(order) or order.is_floating_point() or order.is_complex() or order.dtype == torch.bool:
            raise ValueError(f"order must be an integer tensor, a permutation of range({n})")
        if not torch.equal(torch.sort(order.long()).values, torch.arange(n)):
            raise ValueError(f"order must be a permutation of range({n})")
    if device_batch is None:
        return F.normalize(encoder(x), dim=1)
    rows = torch.arange(n) if order is None else order.long()
    with device_batches(encoder, device_batch):
        out = encoder(x[rows])
    # out[j] is f(x[rows[j]]); put row rows[j] back at place rows[j]
    restored = torch.empty_like(out)
    restored[rows] = out
    return F.normalize(restored, dim=1)


def info_nce(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    r"""The InfoNCE loss of the module docstring: cross-entropy of the logits
    :math:`q k^\top / \tau` (``(B, B)``) with the right key of row ``i`` at column ``i``."""
    _check_pairs(q, k)
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    return F.cross_entropy(q @ k.T / tau, torch.arange(q.shape[0]))


def _check_pairs(q: torch.Tensor, k: torch.Tensor) -> None:
    if q.ndim != 2 or q.shape != k.shape or q.shape[0] < 1:
        raise ValueError(f"q and k must be (B, d) of the same shape with B >= 1, got {tuple(q.shape)} and {tuple(k.shape)}")


def retrieval_accuracy(q: torch.Tensor, k: torch.Tensor) -> float:
    r"""Fraction of rows ``i`` whose most similar key is their own: :math:`\arg\max_j q_i \cdot k_j = i`.

    ``q`` and ``k``: ``(B, d)``, row ``i`` of ``k`` the key of query ``i``.
    """
    _check_pairs(q, k)
    return float(((q @ k.T).argmax(dim=1) == torch.arange(q.shape[0])).double().mean())


def train_contrastive(
    encoder: nn.Module,
    x: torch.Tensor,
    *,
    steps: int,
    batch_size: int,
    device_batch: int,
    shuffle_keys: bool = False,
    noise: float = 0.7,
    tau: float = 0.2,
    lr: float = 0.1,
    momentum: float = 0.9,
    seed: int = 0,
) -> list[float]:
    """Train ``encoder`` in place with InfoNCE on per-device BN; return the loss of every step.

    Every step draws ``batch_size`` rows of ``x`` at random, two views of
    them (:func:`augment`), encodes the queries on devices of
    ``device_batch`` rows and the keys on the same devices, or, with
    ``shuffle_keys``, on a random regrouping of the rows (shuffle BN), and
    takes one SGD step (``lr``, ``momentum``). The batches, the noise and
    the regroupings come from one generator seeded with ``seed``; anything
    inside the encoder that draws from torch's global generator (dropout)
    runs under ``torch.manual_seed(seed)`` in a forked generator, so the run
    repeats and the caller's random state is left alone. The encoder is left
    in training mode.
    """
    _check_rows(x)
    check_integer_at_least("steps", steps, 0)
    check_integer_at_least("batch_size", batch_size, 2)
    if batch_size > x.shape[0]:
        raise ValueError(f"batch_size must be at most the {x.shape[0]} rows of x, got {batch_size}")
    if device_batch is None:
        raise ValueError("device_batch is required: the rows each device normalizes together")
    _check_device_batch(batch_size, device_batch)
    if not noise >= 0 or not tau > 0 or not lr > 0:
        raise ValueError(f"noise must be >= 0, tau and lr > 0; got noise={noise}, tau={tau}, lr={lr}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=lr, momentum=momentum)
    encoder.train()
    losses = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(steps):
            losses.append(_contrastive_step(encoder, optimizer, x, generator, batch_size,
                                            device_batch, shuffle_keys, noise, tau))
    return losses


def _contrastive_step(encoder, optimizer, x, generator, batch_size, device_batch, shuffle_keys, noise, tau):
    """One step of :func:`train_contrastive`; returns its loss."""
    batch = x[torch.randperm(x.shape[0], generator=generator)[:batch_size]]
    queries, keys = augment(batch, noise, generator), augment(batch, noise, generator)
    order = torch.randperm(batch_size, generator=generator) if shuffle_keys else None
    loss = info_nce(encode(encoder, queries, device_batch),
                    encode(encoder, keys, device_batch, order), tau)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def positive_retrieval(
    encoder: nn.Module,
    x: torch.Tensor,
    *,
    device_batch: int | None = None,
    regroup: bool = False,
    noise: float = 0.7,
    seed: int = 0,
) -> float:
    r"""Fraction of rows ``i`` of ``x`` whose query finds its own key: :math:`\arg\max_j q_i \cdot k_j = i`.

    Two views of all rows of ``x`` (the batch), drawn from ``seed``.
    ``device_batch=None``: the encoder in eval mode (running statistics, no
    batch), which measures what the features know about the images alone.
    ``device_batch=b``: every module of the encoder in training mode (a BN
    layer kept in eval mode on purpose too) on devices of ``b`` rows, as in
    :func:`train_contrastive`; ``regroup=True`` encodes the keys on a random
    regrouping of the rows. Dropout, if any, draws under
    ``torch.manual_seed(seed)`` in a forked generator. Every module's mode
    and every buffer are restored afterwards; no gradients are taken.
    """
    _check_rows(x)
    _check_device_batch(x.shape[0], device_batch)
    if regroup and device_batch is None:
        raise ValueError("regroup regroups the rows over devices: it needs device_batch")
    if not noise >= 0:  # (NaN too)
        raise ValueError(f"noise must be >= 0, got {noise}")
    generator = torch.Generator().manual_seed(seed)
    queries, keys = augment(x, noise, generator), augment(x, noise, generator)
    order = torch.randperm(x.shape[0], generator=generator) if regroup else None
    with torch.no_grad(), modes_kept(encoder), buffers_kept(encoder), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder.train(device_batch is not None)
        q = encode(encoder, queries, device_batch)
        k = encode(encoder, keys, device_batch, order)
    return retrieval_accuracy(q, k)


def nearest_neighbour_accuracy(
    encoder: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
) -> float:
    """Test accuracy of the 1-nearest-neighbour classifier on the features (cosine similarity).

    Features of every row in eval mode (:func:`encode`); each test row gets
    the label of the training row whose feature is closest. A common check of
    features learned without labels: no training, so it scores the features
    themselves. The encoder's modes are restored afterwards.
    """
    for t in (x_train, x_test):
        _check_rows(t)
    if y_train.shape != (x_train.shape[0],) or y_test.shape != (x_test.shape[0],):
        raise ValueError("y_train and y_test must hold one label per row of x_train and x_test")
    with torch.no_grad(), modes_kept(encoder):
        encoder.eval()
        train_features, test_features = encode(encoder, x_train), encode(encoder, x_test)
    nearest = (test_features @ train_features.T).argmax(dim=1)
    return float((y_train[nearest] == y_test).double().mean())
